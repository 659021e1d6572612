"""Where a grab becomes durable: the append-only batch commit, and the
roll-up that turns committed claims into balances behind it.

A batch commit is one transaction on one of a few dedicated connections
(slots): BEGIN, one INSERT of the batch's row (its claims as arrays), then
COMMIT. Several batches run at once, each on its own slot, but they
commit in the order they were built: a batch's COMMIT waits for the outcome
of the batch before it, and if that one did not land, this one rolls back.
So no batch is ever durable on top of a share that never landed, and
PostgreSQL's work (the INSERTs) still overlaps.

A COMMIT whose outcome is unknown (the connection broke under it) is
resolved by reading back the batch's row (or, rolled up since, its first
claim) after making sure the old backend is gone; it is never run again.

The roll-up (anbao_rollup, storage/functions) is exactly once by construction:
it deletes the batch's grab_rollups row in the transaction that applies it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import asyncpg

from .. import _fastpath
from ..clock import Wakeup
from ..config import CommitTuning, RollupTuning

log = logging.getLogger("anbao.commit")

BATCH_BLOCK_BITS = 20
IDS_PER_BLOCK = (1 << BATCH_BLOCK_BITS) - 1  # ids 1 .. 2^20 - 1 of each block
APPLICATION_NAME = "anbao-grab-commit"  # then "-<worker id>": a slot's backends, found by its replacement

# Server errors that mean the backend is going away, not that it refused
# the statement: a COMMIT under them may or may not have happened.
SERVER_GONE_ERRORS = (
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.PostgresConnectionError,
)
# Errors that reaching the database again may cure.
CONNECT_ERRORS = (
    asyncpg.exceptions.InterfaceError,
    asyncpg.PostgresError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
    TimeoutError,
)

# A batch's users as a bitmap (grab_rollups.user_bits, migration 0017): bit
# (user_id & (USER_BITS - 1)) set for each (_fastpath.user_bits). A reader
# of one user's pending grabs reads a row's users array only where that bit
# is set (accounts.PENDING_GRABS_OF_USER, with MAY_HOLD_USER for user $1);
# a row without it (an older worker's) is read as before. 2048 bits: a
# batch of 300 users sets about 14% of them.
USER_BITS = 2048
MAY_HOLD_USER = f"(r.user_bits IS NULL OR get_bit(r.user_bits, ($1::bigint & {USER_BITS - 1})::int) = 1)"
# The same for any of the users in the array $1.
MAY_HOLD_ANY_USER = (
    "(r.user_bits IS NULL OR EXISTS (SELECT 1 FROM unnest($1::bigint[]) AS q(u)"
    f" WHERE get_bit(r.user_bits, (q.u & {USER_BITS - 1})::int) = 1))"
)

# The batch in one row: the durable record of its grabs, and what the
# roll-up will consume. One round trip, no row shared by two batches, and
# no index entry per grab.
# The same statement writes the batch's one event row (migration 0005): its
# share-taken and sold-out events, expanded when read. A CTE, not a trigger:
# no PL/pgSQL call on the hot path.
_INSERT_BATCH = (
    "/* anbao_commit_grabs */ WITH b AS (INSERT INTO grab_rollups (batch_id, worker_id, packet_ids, packets, seqs,"
    " users, amounts, user_bits)"
    " VALUES ($1, $2, $3::bigint[], $4::bigint[], $5::int[], $6::bigint[], $7::bigint[], $8::bytea)"
    " RETURNING batch_id, committed_at)"
    " INSERT INTO event_log (kind, batch_id, at) SELECT 0, batch_id, committed_at FROM b"
)
# In a set of several (anbao_set_identity names it, $9), the same statement
# also sends the batch's shares won by users homed in other sets: one
# credit_batches row per destination set (migration 0014), published to it
# and applied there set-wise, so a credit leaves with the grab's own commit
# instead of waiting for the roll-up. A grabber is another set's when the
# roll-up would say so: no wallet here, and in the directory as homed there;
# and only to a set whose subscription receives credit batches (its marker
# in the directory, storage/sets.py credit_batch_marker): to any other the
# roll-up sends each credit as its own row, as before migration 0014.
_INSERT_BATCH_SETS = (
    "/* anbao_commit_grabs */ WITH b AS (INSERT INTO grab_rollups (batch_id, worker_id, packet_ids, packets, seqs,"
    " users, amounts, user_bits)"
    " VALUES ($1, $2, $3::bigint[], $4::bigint[], $5::int[], $6::bigint[], $7::bigint[], $8::bytea)"
    " RETURNING batch_id, committed_at),"
    " e AS (INSERT INTO event_log (kind, batch_id, at) SELECT 0, batch_id, committed_at FROM b),"
    " x AS (SELECT DISTINCT ON (g.ord) g.ord, d.home_set, g.u, g.amt, g.pkt, g.seq"
    "  FROM unnest($6::bigint[], $7::bigint[], $4::bigint[], $5::int[]) WITH ORDINALITY AS g(u, amt, pkt, seq, ord)"
    "  JOIN user_directory d ON d.user_id = g.u AND d.home_set <> $9::smallint"
    "   AND d.home_set IN (SELECT m.home_set FROM user_directory m WHERE m.user_id = -1 - $9::smallint)"
    "  WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.kind = 1 AND a.owner_id = g.u)"
    "  ORDER BY g.ord, d.home_set)"
    " INSERT INTO credit_batches (src_set, batch_id, dest_set, claimed_at, credit_ids, users, amounts, packets, seqs,"
    " senders) SELECT $9::smallint, b.batch_id, x.home_set, b.committed_at,"
    " array_agg(nextval('credit_seq') ORDER BY x.ord), array_agg(x.u ORDER BY x.ord), array_agg(x.amt ORDER BY x.ord),"
    " array_agg(x.pkt ORDER BY x.ord), array_agg(x.seq ORDER BY x.ord), array_agg(p.sender_id ORDER BY x.ord)"
    " FROM b, x JOIN packets p ON p.packet_id = x.pkt GROUP BY b.batch_id, b.committed_at, x.home_set"
)
_ROLLUP = "SELECT anbao_rollup($1, $2, $3::bigint[], $4::smallint, $5::smallint)"


class GrabCommitter:
    """Commits grab batches on `slots` dedicated connections."""

    def __init__(self, dsn: str, worker_id: int, tuning: CommitTuning):
        slots = tuning.commit_slots
        assert 1 <= slots <= 16 and tuning.commit_resolve_timeout_ms > 0
        self.dsn = dsn
        self.worker_id = worker_id
        self.tuning = tuning
        self._conns: list[asyncpg.Connection | None] = [None] * slots
        self._set_id: int | None = None  # this database's set, read on each new connection
        self._free = list(range(slots))
        # Batch ids in build order (the sequencer places a worker's batches
        # by id): each call takes the next ticket at once, and ticket t is
        # id t % IDS_PER_BLOCK + 1 of the (t // IDS_PER_BLOCK)-th block this
        # committer fetched. Blocks are fetched in order, one at a time.
        self._tickets = 0
        self._blocks: list[int] = []
        self._block_fetch = asyncio.Lock()

    @property
    def application_name(self) -> str:
        return f"{APPLICATION_NAME}-{self.worker_id}"

    async def fence(self) -> int:
        """Ends the commit backends this worker slot's predecessor left and
        waits until they are gone; returns how many there were. kill -9 ends
        a worker, not its backends: one waiting on a lock or a disk with a
        whole batch (Bind, Execute, Sync) still commits it later, and if this
        worker had loaded the packet's claims before that, it would sell the
        same shares again. Called before the worker serves."""
        fence_s = self.tuning.commit_fence_timeout_ms / 1000
        conn = await asyncpg.connect(self.dsn, timeout=fence_s)
        try:
            pids = await conn.fetchval(
                "SELECT coalesce(array_agg(pid), '{}') FROM pg_stat_activity WHERE application_name = $1"
                " AND datname = current_database() AND pid <> pg_backend_pid()",
                self.application_name,
            )
            left = len(pids)
            deadline = time.monotonic() + fence_s
            while pids:
                await conn.execute("SELECT pg_terminate_backend(p) FROM unnest($1::int[]) AS p", pids)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the predecessor's commit backends {pids} are still alive")
                await asyncio.sleep(0.01)
                pids = await conn.fetchval(
                    "SELECT coalesce(array_agg(pid), '{}') FROM pg_stat_activity WHERE pid = ANY($1::int[])", pids
                )
            return left
        finally:
            await conn.close()

    @property
    def slots(self) -> int:
        return len(self._conns)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def acquire(self) -> int:
        assert self._free, "no free slot"
        return self._free.pop()

    def release(self, slot: int) -> None:
        assert slot not in self._free
        self._free.append(slot)

    async def _connection(self, slot: int) -> asyncpg.Connection:
        conn = self._conns[slot]
        if conn is None or conn.is_closed():
            conn = await asyncpg.connect(self.dsn, server_settings={"application_name": self.application_name})
            try:
                # Configured after start (migrate --topology on a serving set):
                # batches committed before carry no credit batch, and the
                # roll-up sends their credits one by one (migration 0014).
                self._set_id = await conn.fetchval("SELECT set_id FROM anbao_set_identity")
            except BaseException:
                conn.terminate()
                raise
            self._conns[slot] = conn
        return conn

    def _discard(self, slot: int) -> None:
        conn, self._conns[slot] = self._conns[slot], None
        if conn is not None:
            conn.terminate()

    async def next_batch_id(self, slot: int) -> int:
        """The next batch id, in call order. Two calls that both found the
        block used up used to fetch a block each, and the one built second
        could get the smaller id: its shares then came out of the event feed
        before the first's (tests/test_events.py, the sequencer's backlog)."""
        ticket = self._tickets
        self._tickets += 1
        index, offset = divmod(ticket, IDS_PER_BLOCK)
        while len(self._blocks) <= index:
            async with self._block_fetch:
                if len(self._blocks) > index:
                    break
                conn = await self._connection(slot)
                try:
                    self._blocks.append(await conn.fetchval("SELECT nextval('grab_batch_block_seq')"))
                except BaseException:
                    self._discard(slot)  # whatever broke it, the next batch gets a fresh connection
                    raise
        return (self._blocks[index] << BATCH_BLOCK_BITS) | (offset + 1)

    async def commit(
        self,
        slot: int,
        batch_id: int,
        packets: list,
        seqs: list,
        users: list,
        amounts: list,
        before: asyncio.Future | None,
    ) -> bool:
        """True when the batch is durable, False when it is known not to be.
        `before` is the outcome of the batch built just before this one:
        this one commits only if that one did. While an outcome is unknown
        this keeps resolving and does not return."""
        assert len(packets) == len(seqs) == len(users) == len(amounts) > 0
        try:
            conn = await self._connection(slot)
        except Exception as exc:
            # Nothing was sent: a backend killed while it starts, a server
            # going down. Known not committed, in build order like any failure.
            self._discard(slot)
            log.warning("batch %d not committed: no connection (%r)", batch_id, exc)
            if before is not None:
                await asyncio.shield(before)
            return False
        backend_pid = conn.get_server_pid()
        bits = _fastpath.user_bits(users, USER_BITS)
        args: tuple = (batch_id, self.worker_id, sorted(set(packets)), packets, seqs, users, amounts, bits)
        insert = _INSERT_BATCH
        if self._set_id is not None:
            insert, args = _INSERT_BATCH_SETS, (*args, self._set_id)
        if before is None or (before.done() and before.result()):
            # Nothing before it is still unsettled: the INSERT commits by
            # itself, one round trip instead of BEGIN, INSERT and COMMIT.
            try:
                await conn.execute(insert, *args)
                return True
            except BaseException as exc:
                refused = self._commit_failed(slot, batch_id, exc)
            return False if refused else await self._resolve(batch_id, packets[0], seqs[0], backend_pid)
        try:
            await conn.execute("BEGIN")
            await conn.execute(insert, *args)
        except BaseException as exc:
            # Nothing was committed: no COMMIT was sent.
            self._discard(slot)
            if not isinstance(exc, Exception):
                raise
            log.warning("batch %d not committed: %r", batch_id, exc)
            await asyncio.shield(before)  # failures are handled in build order
            return False
        if not await asyncio.shield(before):
            await self._rollback(slot)
            return False
        try:
            await conn.execute("COMMIT")
            return True
        except BaseException as exc:
            refused = self._commit_failed(slot, batch_id, exc)
        return False if refused else await self._resolve(batch_id, packets[0], seqs[0], backend_pid)

    def _commit_failed(self, slot: int, batch_id: int, exc: BaseException) -> bool:
        """After a statement that commits failed: True when PostgreSQL refused
        it (rolled back, nothing landed), False when the outcome is unknown
        (the connection broke under it). Cancellation propagates."""
        self._discard(slot)
        if isinstance(exc, asyncio.CancelledError):
            raise exc
        if isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, SERVER_GONE_ERRORS):
            log.warning("batch %d refused: %r", batch_id, exc)
            return True
        log.warning("batch %d: outcome unknown (%r); resolving by read-back", batch_id, exc)
        return False

    async def _rollback(self, slot: int) -> None:
        conn = self._conns[slot]
        if conn is None:
            return  # discarded already: its transaction ended with it
        try:
            await conn.execute("ROLLBACK")
        except Exception:
            self._discard(slot)

    async def settle_then_refund(self, slot: int, packet_ids: list[int]) -> dict[int, tuple[int, bool]]:
        """Rolls up every pending claim of these packets, then refunds their
        remainders (exactly once each, by the database's own check); returns
        {packet_id: (refunded_cents, refunded_now)}. Safe to repeat after any
        failure, so an unknown outcome needs no read-back."""
        conn = await self._connection(slot)
        try:
            await conn.fetchval(_ROLLUP, 2**31 - 1, None, packet_ids, None, None)
            rows = await conn.fetch("SELECT * FROM anbao_refund_packets($1::bigint[])", packet_ids)
        except BaseException as exc:
            if not isinstance(exc, asyncpg.PostgresError) or isinstance(exc, SERVER_GONE_ERRORS):
                self._discard(slot)
            raise
        return {r[0]: (r[1], r[2]) for r in rows}

    async def _resolve(self, batch_id: int, packet_id: int, seq: int, backend_pid: int) -> bool:
        deadline = time.monotonic() + self.tuning.commit_resolve_timeout_ms / 1000
        delay_s = 0.05
        while True:
            try:
                conn = await asyncpg.connect(self.dsn, timeout=self.tuning.commit_connect_timeout_ms / 1000)
                try:
                    # The old backend may still be inside COMMIT: end it and
                    # wait until it is gone, so the read-back is final.
                    await conn.execute("SELECT pg_terminate_backend($1)", backend_pid)
                    for _ in range(200):
                        alive = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", backend_pid)
                        if not alive:
                            break
                        await asyncio.sleep(0.01)
                    else:
                        raise TimeoutError("old backend still alive")
                    # Its row, or (rolled up since) its first claim under its id.
                    landed = await conn.fetchval(
                        "SELECT EXISTS (SELECT 1 FROM grab_rollups WHERE batch_id = $1)"
                        " OR EXISTS (SELECT 1 FROM claims WHERE packet_id = $2 AND seq = $3 AND batch_id = $1)",
                        batch_id,
                        packet_id,
                        seq,
                    )
                    log.warning("batch %d resolved: %s", batch_id, "committed" if landed else "not committed")
                    return landed
                finally:
                    await conn.close()
            except CONNECT_ERRORS as exc:
                if time.monotonic() > deadline:
                    log.error(
                        "batch %d: still unresolved after %d ms (%r); still holding its answers",
                        batch_id,
                        self.tuning.commit_resolve_timeout_ms,
                        exc,
                    )
                    deadline = time.monotonic() + self.tuning.commit_resolve_timeout_ms / 1000
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)

    async def close(self) -> None:
        for slot, conn in enumerate(self._conns):
            if conn is not None and not conn.is_closed():
                try:
                    await asyncio.wait_for(conn.close(), 5)
                except Exception:
                    self._discard(slot)


class Roller:
    """Rolls committed claims up into transfers, balances and packet
    counters, behind the grab path, on its own connection.

    It yields to the grab path: while this worker has batches committing,
    it waits (up to rollup_defer_max_ms at a time) unless its backlog has passed
    rollup_defer_below_grabs. So a burst is acknowledged at the speed of the
    append-only commit, and rolled up right after it. Readers that need a
    wallet's credits rolled up call settle_user, which does not wait.
    """

    def __init__(
        self,
        dsn: str,
        worker_id: int,
        worker_count: int,
        tuning: RollupTuning,
    ):
        t = tuning
        assert t.rollup_batches_per_pass > 0 and t.rollup_idle_poll_ms > 0 and t.rollup_defer_max_ms > 0
        assert 0 <= worker_id < worker_count
        self.dsn = dsn
        self.worker_id = worker_id
        self.worker_count = worker_count
        self.tuning = tuning
        self.rolled_claims = 0
        self.failures = 0
        self.vacuums = 0
        self._vacuumed_at = 0.0
        self._rolled_since_vacuum = False
        # This worker's committed claims not yet rolled up: read from the
        # database after each pass (readers roll some of them up too),
        # counted up as batches commit in between.
        self.backlog_claims = 0
        self.on_progress: Callable[[], None] | None = None  # callback(): the engine may commit again
        self.busy: Callable[[], bool] | None = None  # callable: is the grab path committing?
        self._wake = Wakeup()
        self._conn: asyncpg.Connection | None = None
        self._catching_up = False

    def committed(self, claims: int) -> None:
        self.backlog_claims += claims
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self._yield_to_grabs()
                n = await self.pass_once()
                self._rolled_since_vacuum |= n > 0
                await self._vacuum_if_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: try again later
                self.failures += 1
                if self._conn is not None:
                    self._conn.terminate()
                    self._conn = None
                log.warning("roll-up failed: %r", exc)
                n = 0
            small = self.tuning.rollup_small_pass_grabs
            if 0 < n < small and self.backlog_claims < small:
                # A trickle: each pass has a fixed cost (the lock, the temp
                # table, five statements), so let claims gather first.
                await asyncio.sleep(self.tuning.rollup_small_pass_pause_ms / 1000)
            if n == 0:
                self._catching_up = False
                self._wake.clear()
                await self._wake.wait(self.tuning.rollup_idle_poll_ms / 1000)

    async def _vacuum_if_due(self) -> None:
        """Vacuums grab_rollups (RollupTuning.rollup_vacuum_interval_ms): its
        rows live from a commit to their roll-up. TRUNCATE false: giving the
        file's empty tail back would take a lock the grab commits wait on;
        vacuumed this often, the table reuses its pages instead. SKIP_LOCKED:
        while the other workers' rollers (or autovacuum) vacuum it, this one
        goes back to rolling up instead of waiting to do the same work."""
        due_s = self._vacuumed_at + self.tuning.rollup_vacuum_interval_ms / 1000
        if not self._rolled_since_vacuum or time.monotonic() < due_s or self._conn is None:
            return
        self._rolled_since_vacuum = False
        self._vacuumed_at = time.monotonic()
        try:
            await self._conn.execute("VACUUM (SKIP_LOCKED, TRUNCATE false) grab_rollups")
            self.vacuums += 1
        except asyncpg.PostgresError as exc:  # refused (a permission, say): the next interval tries again
            log.debug("vacuum of grab_rollups: %r", exc)

    async def _yield_to_grabs(self) -> None:
        # Only a burst is deferred: once it has waited rollup_defer_max_ms, or the
        # backlog has reached rollup_defer_below_grabs, the roller runs until it has
        # caught up (a pass that finds nothing), whatever the grabs do. Under
        # sustained load the backlog, and what readers scan, stays bounded.
        if self._catching_up:
            return
        waited_ms = 0
        while (
            self.busy is not None
            and self.busy()
            and self.backlog_claims < self.tuning.rollup_defer_below_grabs
            and waited_ms < self.tuning.rollup_defer_max_ms
        ):
            await asyncio.sleep(0.005)
            waited_ms += 5
        self._catching_up = True

    async def pass_once(self) -> int:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.dsn)
            lower_priority(self._conn, self.dsn, self.tuning.rollup_backend_nice)
        n = await self._conn.fetchval(
            _ROLLUP, self.tuning.rollup_batches_per_pass, None, None, self.worker_id, self.worker_count
        )
        self.rolled_claims += n
        self.backlog_claims = await self._conn.fetchval(
            "SELECT COALESCE(sum(cardinality(packets)), 0) FROM grab_rollups WHERE worker_id = $1", self.worker_id
        )
        if self.on_progress is not None:
            self.on_progress()
        return n

    async def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()


def on_this_machine(dsn: str) -> bool:
    """Whether dsn names a PostgreSQL of this machine: a Unix socket or a
    loopback host (libpq's default, no host, is the Unix socket)."""
    url = urlsplit(dsn)
    hosts = parse_qs(url.query).get("host", []) + ([url.hostname] if url.hostname else [])
    return all(h.startswith("/") or h in ("localhost", "::1") or h.startswith("127.") for h in hosts)


def lower_priority(conn: asyncpg.Connection, dsn: str, nice: int) -> bool:
    """Lowers the CPU priority of conn's PostgreSQL backend to `nice`, when
    that backend is a process of this machine we may renice. The roll-up
    is the largest consumer of PostgreSQL's CPU on a red-packet evening
    (pg_stat_statements), and ran in bursts that took the CPU from the
    requests waiting for their answers: the tail. At a lower priority it
    uses what the request path leaves; nothing waits on it (a SEND batch
    skips a wallet it holds, GRAB commits and reads take none of its locks),
    and past max_rollup_backlog_grabs the grab path stops to let it catch
    up. Returns whether it was done (not for a remote PostgreSQL, or
    without the right to)."""
    if nice <= 0 or not on_this_machine(dsn):
        return False  # a remote backend's pid names a process of another machine
    import psutil

    try:
        backend = psutil.Process(conn.get_server_pid())
        if backend.name() != "postgres":
            return False
        backend.nice(nice)
    except (psutil.Error, OSError) as exc:
        log.debug("roll-up backend left at its priority: %r", exc)
        return False
    return True


async def settle_user(conn, user_id: int) -> int:
    """Rolls up every committed claim that credits this user, waiting for a
    roll-up already under way: what a reader of the wallet must see first
    (read-your-writes). Returns the claims rolled up here. A user with
    nothing pending costs one read and takes no lock."""
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM grab_rollups WHERE $1 = ANY(users))", user_id):
        return 0
    return await conn.fetchval(_ROLLUP, 2**31 - 1, user_id, None, None, None)
