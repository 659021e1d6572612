"""A small synchronous wrapper: the async Client on a private event loop.

Every operation of Client is here by name, with the same signature, run to
completion on the wrapper's own loop (so editors and type checkers see
them); call it from one thread at a time, never from inside a running loop.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from . import wire
from .client import DEFAULT_TIMEOUT_MS, MAX_INFLIGHT_DEFAULT, Client

T = TypeVar("T")


class SyncClient:
    def __init__(
        self,
        host: str,
        port: int,
        token: str | bytes,
        *,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        max_inflight: int = MAX_INFLIGHT_DEFAULT,
        ssl: ssl_module.SSLContext | None = None,
        local_port: int | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._client = self._loop.run_until_complete(
                Client.connect(
                    host, port, token, timeout_ms=timeout_ms, max_inflight=max_inflight, ssl=ssl, local_port=local_port
                )
            )
        except BaseException:
            self._loop.close()
            raise

    def _run(self, operation: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(operation)

    @property
    def client(self) -> Client:
        """The async Client underneath (its loop is this wrapper's)."""
        return self._client

    @property
    def hello(self) -> wire.Hello | None:
        return self._client.hello

    @property
    def timeout_ms(self) -> int:
        return self._client.timeout_ms

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ operations (Client's, one by one)

    def ping(self) -> int:
        return self._run(self._client.ping())

    def register(self, user_ids: list[int]) -> int:
        """Opens wallets for these user ids; returns how many were new."""
        return self._run(self._client.register(user_ids))

    def deposit(self, user_id: int, amount_cents: int, *, key: bytes | None = None) -> wire.Deposited:
        return self._run(self._client.deposit(user_id, amount_cents, key=key))

    def balance(self, user_id: int) -> int:
        return self._run(self._client.balance(user_id))

    def balance_detail(self, user_id: int) -> wire.Balance:
        return self._run(self._client.balance_detail(user_id))

    def withdraw(self, user_id: int, amount_cents: int, *, key: bytes | None = None) -> wire.Withdrawn:
        return self._run(self._client.withdraw(user_id, amount_cents, key=key))

    def statement(self, user_id: int, *, cursor: int = 0, limit: int = 100) -> wire.Statement:
        return self._run(self._client.statement(user_id, cursor=cursor, limit=limit))

    def sent(self, user_id: int, *, cursor: int = 0, limit: int = 100) -> wire.Page:
        return self._run(self._client.sent(user_id, cursor=cursor, limit=limit))

    def received(self, user_id: int, *, cursor: int = 0, limit: int = 100) -> wire.Page:
        return self._run(self._client.received(user_id, cursor=cursor, limit=limit))

    def group_create(self, group_id: int, members: Sequence[int] = (), *, name: str = "") -> wire.GroupCreated:
        return self._run(self._client.group_create(group_id, members, name=name))

    def group_add(self, group_id: int, user_ids: Sequence[int]) -> wire.GroupChange:
        return self._run(self._client.group_add(group_id, user_ids))

    def group_remove(self, group_id: int, user_ids: Sequence[int]) -> wire.GroupChange:
        return self._run(self._client.group_remove(group_id, user_ids))

    def group_info(self, group_id: int, *, cursor: int = 0, limit: int = 1000) -> wire.GroupInfo:
        return self._run(self._client.group_info(group_id, cursor=cursor, limit=limit))

    def audit(self) -> wire.AuditResult:
        return self._run(self._client.audit())

    def send(
        self,
        sender_id: int,
        total_cents: int,
        count: int,
        *,
        mode: wire.Mode = wire.Mode.RANDOM,
        members: list[int] | None = None,
        to_user: int | None = None,
        group: int | None = None,
        greeting: str = "",
        expiry_seconds: int = 0,
        key: bytes | None = None,
    ) -> wire.Sent:
        return self._run(
            self._client.send(
                sender_id,
                total_cents,
                count,
                mode=mode,
                members=members,
                to_user=to_user,
                group=group,
                greeting=greeting,
                expiry_seconds=expiry_seconds,
                key=key,
            )
        )

    def grab(self, packet_id: int, user_id: int) -> wire.Grabbed:
        return self._run(self._client.grab(packet_id, user_id))

    def topology(self) -> wire.Topology:
        return self._run(self._client.topology())

    def stats(self) -> dict[str, Any]:
        return self._run(self._client.stats())

    def packet(self, packet_id: int, *, claims_offset: int = 0, claims_limit: int = 100) -> wire.PacketInfo:
        return self._run(self._client.packet(packet_id, claims_offset=claims_offset, claims_limit=claims_limit))

    def events_page(self, after: int = 0, *, limit: int = 1000, wait_ms: int = 0) -> wire.EventsPage:
        """One EVENTS request (see Client.events_page)."""
        return self._run(self._client.events_page(after, limit=limit, wait_ms=wait_ms))

    def events(self, after: int = 0, *, limit: int = 1000) -> Iterator[wire.Event]:
        """Every event numbered after `after`, up to the feed's head (no
        following: a synchronous caller loops on it with the last number)."""
        cursor = after
        while True:
            page = self.events_page(cursor, limit=limit)
            yield from page.events
            if not page.events:
                return
            cursor = page.next_cursor
