"""A small synchronous wrapper: the async Client on a private event loop.

Every operation (Operations') is here by name, with the same signature, run
to completion on the wrapper's own loop; call it from one thread at a time,
never from inside a running loop.
"""

from __future__ import annotations

import asyncio
import functools
import ssl as ssl_module
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

from . import wire
from .client import DEFAULT_TIMEOUT_MS, MAX_INFLIGHT_DEFAULT, Client
from .operations import EVENTS_WAIT_MS, Operations
from .protocol import MAX_EVENTS_PAGE

T = TypeVar("T")
P = ParamSpec("P")


def _blocking(
    operation: Callable[Concatenate[Operations, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[SyncClient, P], T]:
    """An operation of the mixin as a SyncClient method: the same
    signature, run on the wrapper's loop with its Client."""

    @functools.wraps(operation)
    def run(self: SyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(operation(self._client, *args, **kwargs))

    return run


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

    def _run(self, operation: Awaitable[T]) -> T:
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

    def topology(self) -> wire.Topology:
        return self._run(self._client.topology())

    # ------------------------------------------------------------ the operations, run to completion
    # Operations' own methods, each run on this wrapper's loop: one line each
    # so type checkers see them (tests/test_sdk_operations.py holds the list
    # to the mixin's).

    ping = _blocking(Operations.ping)
    register = _blocking(Operations.register)
    deposit = _blocking(Operations.deposit)
    withdraw = _blocking(Operations.withdraw)
    balance = _blocking(Operations.balance)
    balance_detail = _blocking(Operations.balance_detail)
    statement = _blocking(Operations.statement)
    sent = _blocking(Operations.sent)
    received = _blocking(Operations.received)
    group_create = _blocking(Operations.group_create)
    group_add = _blocking(Operations.group_add)
    group_remove = _blocking(Operations.group_remove)
    group_info = _blocking(Operations.group_info)
    audit = _blocking(Operations.audit)
    stats = _blocking(Operations.stats)
    send = _blocking(Operations.send)
    grab = _blocking(Operations.grab)
    packet = _blocking(Operations.packet)
    events_page = _blocking(Operations.events_page)

    def events(
        self, after: int = 0, *, follow: bool = True, limit: int = MAX_EVENTS_PAGE, wait_ms: int = EVENTS_WAIT_MS
    ) -> Iterator[wire.Event]:
        """Operations.events, one event at a time: with follow (the default)
        it blocks for new events and never ends; without, it ends at the
        head of the feed."""
        feed = self._client.events(after, follow=follow, limit=limit, wait_ms=wait_ms)
        try:
            while True:
                try:
                    yield self._run(anext(feed))
                except StopAsyncIteration:
                    return
        finally:
            self._run(feed.aclose())
