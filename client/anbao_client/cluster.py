"""A topology-aware client: one connection per worker, each steered to its
worker by its source port, and every packet operation sent straight to the
packet's owner. Works unsteered too (NAT, a proxy): the server relays."""

from __future__ import annotations

import asyncio
import itertools
import ssl as ssl_module
from typing import Any, TypeVar

from . import wire
from .checks import check_int
from .client import DEFAULT_TIMEOUT_MS, MAX_INFLIGHT_DEFAULT, Client
from .operations import Operations, Request
from .protocol import Route
from .routing import local_port_for, owner_of

T = TypeVar("T")

PORT_ATTEMPTS = 20


class Cluster(Operations):
    """The operations (Operations'), each sent where it belongs: by packet
    (GRAB, PACKET) to the packet's owner, SEND spread over the workers (the
    worker that takes a SEND owns the new packet), everything else on the
    first connection. `topology` is what the first worker said at connect
    time."""

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

    # ------------------------------------------------------------ routing: to the packet's owner

    def _client_for(self, request: Request[Any]) -> Client:
        route = request.route
        if route is Route.PACKET:
            return self.for_packet(request.key)
        if route is Route.NEW_PACKET:
            return self.any()  # whichever worker takes a SEND owns the new packet: spread them
        return self.clients[0]

    async def _submit(self, request: Request[T]) -> T:
        return await self._client_for(request)._submit(request)

    async def _open_feed(self) -> Client:
        return await self.clients[0]._open_feed()
