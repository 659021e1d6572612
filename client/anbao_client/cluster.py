"""A topology-aware client: one connection per worker, each steered to its
worker by its source port, and every packet operation sent straight to the
packet's owner. Works unsteered too (NAT, a proxy): the server relays."""

from __future__ import annotations

import asyncio
import itertools
import ssl as ssl_module
from collections.abc import AsyncIterator, Sequence
from typing import Any

from . import wire
from .checks import check_int
from .client import DEFAULT_TIMEOUT_MS, EVENTS_WAIT_MS, MAX_INFLIGHT_DEFAULT, Client
from .routing import local_port_for, owner_of

PORT_ATTEMPTS = 20


class Cluster:
    """Client's operations, each sent where it belongs: GRAB and PACKET to
    the packet's owner, SEND spread over the workers (the worker that takes
    a SEND owns the new packet), everything else on the first connection.
    `topology` is what the first worker said at connect time."""

    def __init__(self, clients: list[Client], topology: wire.Topology) -> None:
        self.clients = clients
        self.topology = topology
        self._round_robin = itertools.cycle(range(len(clients)))

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        token: str | bytes,
        *,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        max_inflight: int = MAX_INFLIGHT_DEFAULT,
        ssl: ssl_module.SSLContext | None = None,
    ) -> Cluster:
        options: dict[str, Any] = {"timeout_ms": timeout_ms, "max_inflight": max_inflight, "ssl": ssl}
        first = await Client.connect(host, port, token, **options)
        topo = await first.topology()
        if topo.worker_count == 1:
            return cls([first], topo)
        clients: list[Client | None] = [None] * topo.worker_count
        clients[topo.worker_id] = first
        for w in range(topo.worker_count):
            if clients[w] is None:
                clients[w] = await cls._steered(host, port, token, w, topo.worker_count, options)
        return cls([c for c in clients if c is not None], topo)

    @staticmethod
    async def _steered(
        host: str, port: int, token: str | bytes, worker_id: int, worker_count: int, options: dict[str, Any]
    ) -> Client:
        last_error: Exception | None = None
        for _ in range(PORT_ATTEMPTS):
            try:
                return await Client.connect(
                    host, port, token, local_port=local_port_for(worker_id, worker_count), **options
                )
            except OSError as exc:  # the port was taken: draw another
                last_error = exc
        assert last_error is not None
        raise last_error

    async def steered_workers(self) -> list[int]:
        """The worker that actually serves each connection (index = intended)."""
        return [(await c.topology()).worker_id for c in self.clients]

    def for_packet(self, packet_id: int) -> Client:
        check_int("packet_id", packet_id, "Q")  # before its bits choose a connection
        return self.clients[owner_of(packet_id, len(self.clients))]

    def any(self) -> Client:
        return self.clients[next(self._round_robin)]

    @property
    def hello(self) -> wire.Hello | None:
        return self.clients[0].hello

    @property
    def timeout_ms(self) -> int:
        return self.clients[0].timeout_ms

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients))

    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ packet operations: to the owner

    async def grab(self, packet_id: int, user_id: int) -> wire.Grabbed:
        return await self.for_packet(packet_id).grab(packet_id, user_id)

    async def packet(self, packet_id: int, *, claims_offset: int = 0, claims_limit: int = 100) -> wire.PacketInfo:
        return await self.for_packet(packet_id).packet(
            packet_id, claims_offset=claims_offset, claims_limit=claims_limit
        )

    async def send(
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
        # Whichever worker takes a SEND owns the new packet: spread them.
        return await self.any().send(
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

    # ------------------------------------------------------------ everything else: the first connection

    async def events_page(self, after: int = 0, *, limit: int = 1000, wait_ms: int = 0) -> wire.EventsPage:
        return await self.clients[0].events_page(after, limit=limit, wait_ms=wait_ms)

    def events(
        self, after: int = 0, *, follow: bool = True, limit: int = 1000, wait_ms: int = EVENTS_WAIT_MS
    ) -> AsyncIterator[wire.Event]:
        """The event feed (Client.events), read on a connection of its own."""
        return self.clients[0].events(after, follow=follow, limit=limit, wait_ms=wait_ms)

    async def ping(self) -> int:
        return await self.clients[0].ping()

    async def register(self, user_ids: list[int]) -> int:
        """Opens wallets for these user ids; returns how many were new."""
        return await self.clients[0].register(user_ids)

    async def deposit(self, user_id: int, amount_cents: int, *, key: bytes | None = None) -> wire.Deposited:
        return await self.clients[0].deposit(user_id, amount_cents, key=key)

    async def balance(self, user_id: int) -> int:
        return await self.clients[0].balance(user_id)

    async def balance_detail(self, user_id: int) -> wire.Balance:
        return await self.clients[0].balance_detail(user_id)

    async def withdraw(self, user_id: int, amount_cents: int, *, key: bytes | None = None) -> wire.Withdrawn:
        return await self.clients[0].withdraw(user_id, amount_cents, key=key)

    async def statement(self, user_id: int, *, cursor: int = 0, limit: int = 100) -> wire.Statement:
        return await self.clients[0].statement(user_id, cursor=cursor, limit=limit)

    async def sent(self, user_id: int, *, cursor: int = 0, limit: int = 100) -> wire.Page:
        return await self.clients[0].sent(user_id, cursor=cursor, limit=limit)

    async def received(self, user_id: int, *, cursor: int = 0, limit: int = 100) -> wire.Page:
        return await self.clients[0].received(user_id, cursor=cursor, limit=limit)

    async def group_create(self, group_id: int, members: Sequence[int] = (), *, name: str = "") -> wire.GroupCreated:
        return await self.clients[0].group_create(group_id, members, name=name)

    async def group_add(self, group_id: int, user_ids: Sequence[int]) -> wire.GroupChange:
        return await self.clients[0].group_add(group_id, user_ids)

    async def group_remove(self, group_id: int, user_ids: Sequence[int]) -> wire.GroupChange:
        return await self.clients[0].group_remove(group_id, user_ids)

    async def group_info(self, group_id: int, *, cursor: int = 0, limit: int = 1000) -> wire.GroupInfo:
        return await self.clients[0].group_info(group_id, cursor=cursor, limit=limit)

    async def audit(self) -> wire.AuditResult:
        return await self.clients[0].audit()

    async def stats(self) -> dict[str, Any]:
        """The first worker's figures; `[await c.stats() for c in cluster.clients]` for each."""
        return await self.clients[0].stats()
