"""The set gate: a request whose user is homed in another set, or whose
packet lives in another set, is answered WRONG_SET with that set and its
address (the typed redirect of PROTOCOL.md "Sets"); it is never forwarded.
Which field decides is read from the protocol table: a packet id if the
request has one, else the user (sender_id, user_id), else REGISTER's ids.
Groups are mirrored in every set and pass; so do AUDIT, STATS, TOPOLOGY."""

from __future__ import annotations

from typing import Any

from anbao_client.protocol import MESSAGES, Op
from anbao_client.routing import SET_SHIFT, SetTopology, home_set

from . import answers

_PACKET, _USER, _USERS = 0, 1, 2


def _deciding_field(op: Op) -> tuple[int, int] | None:
    names = MESSAGES[op].request.names
    if "packet_id" in names:
        return _PACKET, names.index("packet_id")
    if op in (Op.GROUP_CREATE, Op.GROUP_ADD, Op.GROUP_REMOVE, Op.GROUP_INFO):
        return None
    for name in ("sender_id", "user_id"):
        if name in names:
            return _USER, names.index(name)
    if op == Op.REGISTER:
        return _USERS, names.index("user_ids")
    return None


class SetGate:
    def __init__(self, topology: SetTopology, set_id: int, worker_id: int):
        assert set_id in topology.sets, f"set {set_id} is not in the topology"
        self.topology = topology
        self.set_id = set_id
        self.wid = worker_id
        self._fields = {int(op): f for op in MESSAGES if (f := _deciding_field(op)) is not None}

    def redirect(self, opcode: int, rid: int, args: tuple[Any, ...]) -> bytes | None:
        """None when the request is this set's; else its WRONG_SET answer."""
        f = self._fields.get(opcode)
        if f is None:
            return None
        kind, i = f
        if kind == _PACKET:
            there = args[i] >> SET_SHIFT
            what = f"packet {args[i]} lives in set {there}"
        elif kind == _USER:
            there = home_set(args[i], self.topology)
            what = f"user {args[i]} is homed in set {there}"
        else:
            there = self.set_id
            for u in args[i]:
                there = home_set(u, self.topology)
                if there != self.set_id:
                    what = f"user {u} is homed in set {there}: register each user at its home set"
                    break
        if there == self.set_id:
            return None
        target = self.topology.sets.get(there)
        host, port = (target.host, target.port) if target is not None else ("", 0)
        return answers.wrong_set(
            opcode, rid, self.wid, what + (f" ({host}:{port})" if target else ""), there, host, port
        )


# ---------------------------------------------------------------- the set's health, for STATS and metrics

SET_WATCH_INTERVAL_S = 1.0  # how often a worker reads its set's replication
SET_WATCH_TIMEOUT_S = 2.0  # per reading, per database: a hung peer never holds it up


class SetWatch:
    """Reads this set's replication (storage.sets.replication_on: slots'
    backlog and wal_status, subscriptions' last receipt, credits sent and
    applied) every SET_WATCH_INTERVAL_S in the background, and from each
    other set how many of this set's credits it has applied, so credits in
    flight = sent here - applied there. STATS and the metrics read
    `latest`, never the database. Each database on one connection of its
    own, reopened when lost; every call bounded by SET_WATCH_TIMEOUT_S."""

    def __init__(self, topology: SetTopology, set_id: int, dsn: str):
        self.set_id = set_id
        self.dsn = dsn
        self.peers = {s: i.dsn for s, i in topology.sets.items() if s != set_id}
        self.latest: dict[str, Any] = {"set_id": set_id, "read_at_ms": None}
        self._conns: dict[int, Any] = {}

    async def _conn(self, s: int, dsn: str):
        import asyncpg

        c = self._conns.get(s)
        if c is None or c.is_closed():
            c = self._conns[s] = await asyncpg.connect(dsn, timeout=SET_WATCH_TIMEOUT_S)
        return c

    def _drop(self, s: int) -> None:
        c = self._conns.pop(s, None)
        if c is not None:
            c.terminate()

    async def read(self) -> dict[str, Any]:
        import time

        from ..storage.sets import credits_between, replication_on

        t = SET_WATCH_TIMEOUT_S
        doc: dict[str, Any] = {"set_id": self.set_id}
        # Each peer first, then here: sent only grows, so in flight is never
        # under-reported (a gauge, not the audit's consistent cut).
        applied_there: dict[int, int | str] = {}
        for s, dsn in sorted(self.peers.items()):
            if not dsn:
                applied_there[s] = "no dsn in the topology"
                continue
            try:
                applied_there[s] = await credits_between(await self._conn(s, dsn), self.set_id, s, timeout=t)
            except Exception as exc:  # the peer down or slow: say so, next time again
                self._drop(s)
                applied_there[s] = f"unreachable ({type(exc).__name__})"
        try:
            conn = await self._conn(self.set_id, self.dsn)
            doc.update(await replication_on(conn, timeout=t))
            flight: dict[str, Any] = {}
            for s, there in applied_there.items():
                sent = await credits_between(conn, self.set_id, s, timeout=t)
                flight[str(s)] = (
                    {"sent": sent, "applied_there": there, "in_flight": max(0, sent - there)}
                    if isinstance(there, int)
                    else {"sent": sent, "applied_there": None, "in_flight": None, "error": there}
                )
            doc["to_sets"] = flight
            doc["error"] = ""
        except Exception as exc:
            self._drop(self.set_id)
            doc["error"] = f"{type(exc).__name__}: {exc}"
        doc["read_at_ms"] = int(time.time() * 1000)
        return doc

    async def run(self) -> None:
        import asyncio

        try:
            while True:
                self.latest = await self.read()
                await asyncio.sleep(SET_WATCH_INTERVAL_S)
        finally:
            for s in list(self._conns):
                self._drop(s)
