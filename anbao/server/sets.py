"""The set gate: a request whose user is homed in another set, or whose
packet lives in another set, is answered WRONG_SET with that set and its
address (the typed redirect of PROTOCOL.md "Sets"); it is never forwarded.
Which field decides is read from the protocol table: a packet id if the
request has one, else the user (sender_id, user_id), else REGISTER's ids.
Groups are mirrored in every set and pass; so do AUDIT, STATS, TOPOLOGY."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from anbao_client.protocol import MESSAGES, Op
from anbao_client.routing import SET_SHIFT, SetTopology, home_set

from ..config import PeerSetTuning
from . import answers

log = logging.getLogger("anbao.sets")

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


# ---------------------------------------------------------------- the other sets' databases

PEER_READER_NAME = "anbao-set-peers"  # application_name of the connections, as other sets see them

T = TypeVar("T")


class SetPeers:
    """The one way a worker reads another set's database: BALANCE asks what
    a set owes a user homed here (storage.sets.owed_to), and SetWatch how
    many of this set's credits it has applied. Each read is bounded by
    PeerSetTuning.peer_set_read_timeout_ms (or the caller's own bound), over at
    most peer_set_connections connections per set; a set that failed is
    not asked again for peer_set_retry_ms, so a set that is down or hangs
    costs a reader nothing but a None."""

    def __init__(self, topology: SetTopology, set_id: int, tuning: PeerSetTuning):
        self.set_id = set_id
        self.peers = {s: i.dsn or "" for s, i in topology.sets.items() if s != set_id}  # "": never asked
        self.last_error = {s: "no dsn in the topology" for s, dsn in self.peers.items() if not dsn}
        self._timeout_s = tuning.peer_set_read_timeout_ms / 1000
        self._retry_ms = tuning.peer_set_retry_ms
        self._connections = tuning.peer_set_connections
        self._pools: dict[int, Any] = {}
        self._down_until_s: dict[int, float] = {}  # time.monotonic()
        # One slot per connection of a set's pool: a read waits for a slot
        # here, where the wait is this worker's queue, not the peer's time
        # (the read's bound starts when it has its slot).
        self._slots: dict[int, asyncio.Semaphore] = {}
        self._queue_timeout_s = tuning.peer_set_queue_timeout_ms / 1000
        self.queue_timeouts = 0  # reads that found every connection busy past the queue bound

    async def _pool(self, s: int):
        """Set s's pool; a new one after _drop. Made and awaited (min_size 0:
        that connects nobody) before it is shared, so no caller ever sees a
        pool that is not ready or a second one for the same set."""
        import asyncpg

        pool = self._pools.get(s)
        if pool is None:
            made = await asyncpg.create_pool(
                self.peers[s],
                min_size=0,
                max_size=self._connections,
                server_settings={"application_name": PEER_READER_NAME},
            )
            pool = self._pools.setdefault(s, made)
            if pool is not made:
                made.terminate()
        return pool

    async def _read(self, s: int, read: Callable[[Any], Awaitable[T]], slotted: asyncio.Event) -> T:
        async with self._slots.setdefault(s, asyncio.Semaphore(self._connections)):
            slotted.set()  # from here on, the time is the peer's (connecting included)
            async with (await self._pool(s)).acquire() as conn:
                return await read(conn)

    async def ask(self, s: int, read: Callable[[Any], Awaitable[T]], timeout_s: float | None = None) -> T | None:
        """read(connection to set s), or None when set s could not be asked
        (why: last_error[s])."""
        if not self.peers[s] or time.monotonic() < self._down_until_s.get(s, 0.0):
            return None
        slotted = asyncio.Event()
        task = asyncio.ensure_future(self._read(s, read, slotted))
        try:
            if not await self._slotted(task, slotted):
                return None
            done, _ = await asyncio.wait({task}, timeout=timeout_s or self._timeout_s)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if done and task.exception() is None:
            return task.result()
        if not done:
            # Not cancelled and awaited (asyncio.wait_for would): asyncpg
            # then cancels the query and resets the connection, each a wait
            # on the hung peer. Its pool is cut off instead, which ends the
            # read at once, whatever it was waiting on.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        exc = task.exception() if done else TimeoutError(f"no answer in {timeout_s or self._timeout_s} s")
        self.last_error[s] = f"unreachable ({type(exc).__name__})"
        log.warning("set %d: a read failed: %s: %s", s, type(exc).__name__, exc)
        self._drop(s)
        self._down_until_s[s] = time.monotonic() + self._retry_ms / 1000
        return None

    async def _slotted(self, task: asyncio.Future, slotted: asyncio.Event) -> bool:
        """Waits (at most peer_set_queue_timeout_ms) until the read has one of
        the set's connections, or is done. False when it never got one:
        this worker is overloaded, which says nothing of the set, so the
        set is neither marked down nor its pool cut off (a single bound
        for both made 309 of 1,806 BALANCEs at 64 in flight say
        sets_unreached=1 with both sets up)."""
        waiting = asyncio.ensure_future(slotted.wait())
        try:
            await asyncio.wait({task, waiting}, timeout=self._queue_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
        if slotted.is_set() or task.done():
            return True
        task.cancel()  # still queued: nothing reached the peer
        self.queue_timeouts += 1
        return False

    def _drop(self, s: int) -> None:
        pool = self._pools.pop(s, None)
        if pool is not None:
            pool.terminate()

    async def in_flight(self, user_id: int, applied_here: dict[int, int]) -> tuple[int, int]:
        """BALANCE: (cents other sets owe `user_id` beyond what this set has
        applied from them, how many sets could not be asked). `applied_here`
        must have been read before this call (storage.sets.balance_at_home)."""
        from ..storage.sets import owed_to

        assert set(applied_here) <= set(self.peers), f"credits from sets not in the topology: {applied_here}"
        sets = sorted(self.peers)

        def owed_by(s: int) -> Callable[[Any], Awaitable[int]]:
            return lambda conn: owed_to(conn, s, self.set_id, user_id)

        owed = await asyncio.gather(*(self.ask(s, owed_by(s)) for s in sets))
        cents = unreached = 0
        for s, o in zip(sets, owed, strict=True):
            if o is None:
                unreached += 1
            elif o < applied_here.get(s, 0):
                # Applied here but never sent there: the sets' databases
                # disagree (a restore from an old backup?). The audit
                # across sets says where; BALANCE cannot say what is due.
                log.error("set %d owes user %d %d cents, but %d were applied here", s, user_id, o, applied_here[s])
                unreached += 1
            else:
                cents += o - applied_here.get(s, 0)
        return cents, unreached

    async def close(self) -> None:
        for s in list(self._pools):
            self._drop(s)


# ---------------------------------------------------------------- the set's health, for STATS and metrics


class SetWatch:
    """Reads this set's replication (storage.sets.replication_on: slots'
    backlog and wal_status, subscriptions' last receipt, credits sent and
    applied) every set_watch_interval_ms in the background, and from each
    other set (through SetPeers) how many of this set's credits it has
    applied, so credits in flight = sent here - applied there. STATS and
    the metrics read `latest`, never the database. This set's database on
    a connection of its own, reopened when lost; every call bounded by
    set_watch_timeout_ms (config.PeerSetTuning)."""

    def __init__(self, set_id: int, dsn: str, peers: SetPeers, tuning: PeerSetTuning):
        self.set_id = set_id
        self.dsn = dsn
        self.peers = peers
        self.interval_s = tuning.set_watch_interval_ms / 1000
        self.timeout_s = tuning.set_watch_timeout_ms / 1000
        self.latest: dict[str, Any] = {"set_id": set_id, "read_at_ms": None}
        self._conn: Any = None

    async def _own(self):
        import asyncpg

        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.dsn, timeout=self.timeout_s)
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def read(self) -> dict[str, Any]:
        from ..storage.sets import credits_between, replication_on

        t = self.timeout_s
        doc: dict[str, Any] = {"set_id": self.set_id}

        # Each peer first, then here: sent only grows, so in flight is never
        # under-reported (a gauge, not the audit's consistent cut).
        def applied_at(s: int) -> Callable[[Any], Awaitable[int]]:
            return lambda conn: credits_between(conn, self.set_id, s)

        applied_there: dict[int, int | str] = {}
        for s in sorted(self.peers.peers):
            applied = await self.peers.ask(s, applied_at(s), timeout_s=t)
            applied_there[s] = applied if applied is not None else self.peers.last_error.get(s, "unreachable")
        try:
            conn = await self._own()
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
            self._drop()
            doc["error"] = f"{type(exc).__name__}: {exc}"
        doc["read_at_ms"] = int(time.time() * 1000)
        return doc

    async def run(self) -> None:
        try:
            while True:
                self.latest = await self.read()
                await asyncio.sleep(self.interval_s)
        finally:
            self._drop()
