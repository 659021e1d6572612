"""A client of a deployment of several sets: one Cluster per set, every
request sent to the set that holds it (routing.home_set for a user's
wallet, routing.set_of for a packet), steered to the right worker inside
it. A WRONG_SET answer (a topology file older than the server's) is
followed once, to the set it names."""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from . import wire
from .checks import check, check_int
from .client import DEFAULT_TIMEOUT_MS, MAX_INFLIGHT_DEFAULT
from .cluster import Cluster
from .errors import WrongSet
from .protocol import Op
from .routing import SetTopology, home_set, set_of

T = TypeVar("T")


class SetCluster:
    def __init__(self, topology: SetTopology, clusters: dict[int, Cluster]) -> None:
        self.topology = topology
        self.clusters = clusters

    @classmethod
    async def connect(
        cls,
        topology: SetTopology,
        token: str | bytes,
        *,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        max_inflight: int = MAX_INFLIGHT_DEFAULT,
        ssl: ssl_module.SSLContext | None = None,
    ) -> SetCluster:
        clusters: dict[int, Cluster] = {}
        try:
            for s in topology.sets.values():
                clusters[s.set_id] = await Cluster.connect(
                    s.host, s.port, token, timeout_ms=timeout_ms, max_inflight=max_inflight, ssl=ssl
                )
        except BaseException:
            await asyncio.gather(*(c.close() for c in clusters.values()))
            raise
        return cls(topology, clusters)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clusters.values()))

    async def __aenter__(self) -> SetCluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def home(self, user_id: int, name: str = "user_id") -> int:
        check_int(name, user_id, "Q")  # before its value chooses a set
        return home_set(user_id, self.topology)

    async def _at(self, set_id: int, call: Callable[[Cluster], Awaitable[T]]) -> T:
        try:
            return await call(self.clusters[set_id])
        except WrongSet as exc:
            if exc.set_id not in self.clusters or exc.set_id == set_id:
                raise
            return await call(self.clusters[exc.set_id])

    # ------------------------------------------------------------ packets: their set

    async def grab(self, packet_id: int, user_id: int) -> wire.Grabbed:
        check_int("packet_id", packet_id, "Q")
        return await self._at(set_of(packet_id), lambda c: c.grab(packet_id, user_id))

    async def packet(self, packet_id: int, *, claims_offset: int = 0, claims_limit: int = 100) -> wire.PacketInfo:
        check_int("packet_id", packet_id, "Q")
        return await self._at(
            set_of(packet_id),
            lambda c: c.packet(packet_id, claims_offset=claims_offset, claims_limit=claims_limit),
        )

    async def send(self, sender_id: int, total_cents: int, count: int, **kwargs: Any) -> wire.Sent:
        """A packet lives in its sender's home set (its id says so)."""
        return await self._at(
            self.home(sender_id, "sender_id"), lambda c: c.send(sender_id, total_cents, count, **kwargs)
        )

    # ------------------------------------------------------------ wallets: the user's home set

    async def register(self, user_ids: list[int]) -> int:
        check(Op.REGISTER, user_ids=user_ids)
        by_set: dict[int, list[int]] = {}
        for u in user_ids:
            by_set.setdefault(self.home(u), []).append(u)
        done = await asyncio.gather(*(self.clusters[s].register(ids) for s, ids in by_set.items()))
        return sum(done)

    async def deposit(self, user_id: int, amount_cents: int, *, key: bytes | None = None) -> wire.Deposited:
        return await self._at(self.home(user_id), lambda c: c.deposit(user_id, amount_cents, key=key))

    async def withdraw(self, user_id: int, amount_cents: int, *, key: bytes | None = None) -> wire.Withdrawn:
        return await self._at(self.home(user_id), lambda c: c.withdraw(user_id, amount_cents, key=key))

    async def balance(self, user_id: int) -> int:
        return await self._at(self.home(user_id), lambda c: c.balance(user_id))

    async def balance_detail(self, user_id: int) -> wire.Balance:
        return await self._at(self.home(user_id), lambda c: c.balance_detail(user_id))

    async def statement(self, user_id: int, *, cursor: int = 0, limit: int = 100) -> wire.Statement:
        return await self._at(self.home(user_id), lambda c: c.statement(user_id, cursor=cursor, limit=limit))

    async def sent(self, user_id: int, *, cursor: int = 0, limit: int = 100) -> wire.Page:
        return await self._at(self.home(user_id), lambda c: c.sent(user_id, cursor=cursor, limit=limit))

    async def received(self, user_id: int, *, cursor: int = 0, limit: int = 100) -> wire.Page:
        """Every share the user won, asked at their home set: a share of
        another set's packet shows once its credit arrived (BALANCE's
        in_flight_cents counts it before)."""
        return await self._at(self.home(user_id), lambda c: c.received(user_id, cursor=cursor, limit=limit))

    # ------------------------------------------------------------ groups: mirrored in every set
    # A group packet is sent in its sender's set, which snapshots the group's
    # members there: so every set holds every group (the operations are
    # idempotent in effect), and the first set answers reads.

    async def group_create(self, group_id: int, members: Sequence[int] = (), *, name: str = "") -> wire.GroupCreated:
        out = await asyncio.gather(*(c.group_create(group_id, members, name=name) for c in self.clusters.values()))
        return out[0]

    async def group_add(self, group_id: int, user_ids: Sequence[int]) -> wire.GroupChange:
        out = await asyncio.gather(*(c.group_add(group_id, user_ids) for c in self.clusters.values()))
        return out[0]

    async def group_remove(self, group_id: int, user_ids: Sequence[int]) -> wire.GroupChange:
        out = await asyncio.gather(*(c.group_remove(group_id, user_ids) for c in self.clusters.values()))
        return out[0]

    async def group_info(self, group_id: int, *, cursor: int = 0, limit: int = 1000) -> wire.GroupInfo:
        first = min(self.clusters)
        return await self.clusters[first].group_info(group_id, cursor=cursor, limit=limit)

    # ------------------------------------------------------------ per set

    async def audit(self) -> dict[int, wire.AuditResult]:
        return {s: await c.audit() for s, c in self.clusters.items()}

    async def stats(self) -> dict[int, dict[str, Any]]:
        return {s: await c.stats() for s, c in self.clusters.items()}
