"""A topology-aware client: one connection per worker, each steered to its
worker by its source port, and every packet operation sent straight to the
packet's owner. Works unsteered too (NAT, a proxy): the server relays."""
from __future__ import annotations

import asyncio
import itertools

from . import wire
from .client import Client
from .routing import local_port_for, owner_of

PORT_ATTEMPTS = 20


class Cluster:
    def __init__(self, clients: list[Client], topology: wire.Topology):
        self.clients = clients
        self.topology = topology
        self._round_robin = itertools.cycle(range(len(clients)))

    @classmethod
    async def connect(cls, host: str, port: int, token: str | bytes, **kwargs) -> "Cluster":
        first = await Client.connect(host, port, token, **kwargs)
        topo = await first.topology()
        if topo.worker_count == 1:
            return cls([first], topo)
        clients: list[Client | None] = [None] * topo.worker_count
        clients[topo.worker_id] = first
        for w in range(topo.worker_count):
            if clients[w] is None:
                clients[w] = await cls._steered(host, port, token, w, topo.worker_count, kwargs)
        return cls(clients, topo)

    @staticmethod
    async def _steered(host, port, token, worker_id, worker_count, kwargs) -> Client:
        last_error: Exception | None = None
        for _ in range(PORT_ATTEMPTS):
            try:
                return await Client.connect(host, port, token, local_port=local_port_for(worker_id, worker_count),
                                            **kwargs)
            except OSError as exc:  # the port was taken: draw another
                last_error = exc
        raise last_error

    async def steered_workers(self) -> list[int]:
        """The worker that actually serves each connection (index = intended)."""
        return [(await c.topology()).worker_id for c in self.clients]

    def for_packet(self, packet_id: int) -> Client:
        return self.clients[owner_of(packet_id, len(self.clients))]

    def any(self) -> Client:
        return self.clients[next(self._round_robin)]

    async def grab(self, packet_id: int, user_id: int) -> wire.Grabbed:
        return await self.for_packet(packet_id).grab(packet_id, user_id)

    async def packet(self, packet_id: int, **kwargs) -> wire.PacketInfo:
        return await self.for_packet(packet_id).packet(packet_id, **kwargs)

    async def send(self, *args, **kwargs) -> wire.Sent:
        # Whichever worker takes a SEND owns the new packet: spread them.
        return await self.any().send(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.clients[0], name)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients))
