"""A client of a deployment of several sets: one Cluster per set, every
request sent to the set that holds it (routing.home_set for a user's
wallet, routing.set_of for a packet), steered to the right worker inside
it. A WRONG_SET answer (a topology file older than the server's) is
followed once, to the set it names. With several sets, `events` reads the
first set's feed (each set numbers its own): `sc.clusters[s].events()`
reads set s's."""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections.abc import Callable
from typing import Any, TypeVar

from . import wire
from .checks import check_int
from .client import DEFAULT_TIMEOUT_MS, MAX_INFLIGHT_DEFAULT, Client
from .cluster import Cluster
from .errors import WrongSet
from .operations import Operations, Request
from .protocol import MESSAGES, Op, Route
from .routing import SetTopology, home_set, set_of

T = TypeVar("T")


class SetCluster(Operations):
    """The operations (Operations'), each sent to the set that holds it
    (protocol.Route): by packet to the packet's set, by user to the user's
    home set, groups and AUDIT to every set, the rest to the first set."""

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

    # ------------------------------------------------------------ routing: to the set

    async def _submit(self, request: Request[T]) -> T:
        route = request.route
        if route is Route.PACKET:
            packet_id = request.key
            check_int("packet_id", packet_id, "Q")  # before its bits choose a set
            return await self._at(set_of(packet_id), request)
        if route is Route.USER or route is Route.NEW_PACKET:
            if isinstance(request.key, list):
                return await self._each_home(request)
            return await self._at(self.home(request.key, MESSAGES[request.op].route_field), request)
        if route is Route.EVERY_SET:
            # Groups: a group packet is sent in its sender's set, which
            # snapshots the group's members there, so every set holds every
            # group (the changes are idempotent in effect). AUDIT: each set
            # checks its own database.
            answers = await asyncio.gather(*(c._submit(request) for c in self.clusters.values()))
            return _combine(request.op, answers)
        return await self.clusters[min(self.clusters)]._submit(request)

    async def _each_home(self, request: Request[T]) -> T:
        """REGISTER: each set opens the wallets of the users it is home to."""
        by_set: dict[int, list[int]] = {}
        for u in request.key:
            by_set.setdefault(self.home(u), []).append(u)
        answers = await asyncio.gather(*(self.clusters[s]._submit(request.with_key(ids)) for s, ids in by_set.items()))
        return _combine(request.op, answers)

    async def _at(self, set_id: int, request: Request[T]) -> T:
        try:
            return await self.clusters[set_id]._submit(request)
        except WrongSet as exc:
            if exc.set_id not in self.clusters or exc.set_id == set_id:
                raise
            return await self.clusters[exc.set_id]._submit(request)

    async def _open_feed(self) -> Client:
        return await self.clusters[min(self.clusters)]._open_feed()


def _audits(answers: list[wire.AuditResult]) -> wire.AuditResult:
    """The sets' audits as one: it holds where every set's holds; counts and
    offending rows add up (`sc.clusters[s].audit()` for one set's)."""
    counts: dict[str, int] = {}
    checks: dict[str, int] = {}
    for a in answers:
        for name, n in a.counts.items():
            counts[name] = counts.get(name, 0) + n
        for name, n in a.checks.items():
            checks[name] = checks.get(name, 0) + n
    return wire.AuditResult(all(a.ok for a in answers), counts, checks)


# How the answers of several sets make one, per operation (as redis-py's
# cluster keeps a result callback per command it fans out).
_COMBINE: dict[Op, Callable[[list[Any]], Any]] = {
    Op.REGISTER: sum,  # wallets opened, each in its home set
    Op.GROUP_CREATE: lambda answers: answers[0],  # the same change in every set: the first set's answer
    Op.GROUP_ADD: lambda answers: answers[0],
    Op.GROUP_REMOVE: lambda answers: answers[0],
    Op.AUDIT: _audits,
}


def _combine(op: Op, answers: list[T]) -> T:
    combined: T = _COMBINE[op](answers)
    return combined
