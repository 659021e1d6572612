"""Resynchronising one set's subscription to another, exactly once
(`anbao sets resync`, docs/DEPLOYMENT.md).

Set A's slot for set B (anbao_<A>_to_<B>) keeps the WAL that B has not
confirmed, up to max_slot_wal_keep_size; past it the slot is lost and the
credits written at A since can never stream. The resync, run at B against A:

1. looks: A's slot (missing, lost), B's subscription (missing, disabled,
   on another slot, erroring), and refuses unless one of them needs it or
   it is forced;
2. disables B's subscription, drops A's slot (lost or not) and makes a new
   one at A, then, in one transaction at B, drops the subscription (with
   slot_name = NONE: the slot is A's business here) and creates it again
   on the new slot without copying data, disabled;
3. backfills at B, in batches of B's own transactions, every row of A's
   publication for B that B does not have: credit_batches WHERE dest_set = B
   and credits_out WHERE dest_set = B AND NOT in_batch (B's triggers credit
   the wallets exactly as the apply does) and A's users
   in the directory; it reads A after the new slot exists, so everything
   committed at A before the slot is read, and everything after streams;
4. enables the subscription.

A row committed at A after the new slot was made and read by the backfill
arrives twice: the apply skips a row already present (migration 0010, after
a lock every inserter takes), so it is applied once. Every step is safe to
repeat: a resync that stops midway leaves the subscription disabled, which
the next run finds and resynchronises again. Storage knows sets as integers
and connection strings; the CLI reads the topology.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

import asyncpg

from .sets import SUBSCRIPTION_OF_THIS_DATABASE, create_subscription_sql, publication, slot, subscription

IDEMPOTENT_APPLY_VERSION = 10  # migration 0010: the apply skips a row already present
RESYNC_LOCK_KEY = 7020657039738370414  # the bytes 'anbaosyn': one resync at a time at a destination
CONNECT_TIMEOUT_S = 10.0
STATEMENT_TIMEOUT_S = 60.0  # each statement (a slot's creation waits for the transactions running at A)
SLOT_RELEASE_TIMEOUT_S = 20.0  # for A's walsender to let the old slot go once B's subscription is disabled
RUNNING_TIMEOUT_S = 20.0  # for B's apply worker to start on the new slot
POLL_S = 0.2
BATCH = 2000


class ResyncRefused(RuntimeError):
    """The resync did nothing: not needed (without force), or not possible."""


@dataclass
class LinkState:
    """What the resync found: A's slot for B and B's subscription to A."""

    src: int
    dest: int
    slot_name: str
    subscription_name: str
    slot: dict | None  # at A: wal_status, active, active_pid, invalidation_reason, failover
    subscription: dict | None  # at B: enabled, running, slot_name, apply_error_count, sync_error_count

    @property
    def needs(self) -> list[str]:
        """Why the link cannot deliver by itself (empty: it can)."""
        out = []
        s, sub = self.slot, self.subscription
        if s is None:
            out.append(f"slot {self.slot_name} missing at set {self.src}")
        elif s["wal_status"] == "lost" or s["invalidation_reason"]:
            why = s["invalidation_reason"] or "max_slot_wal_keep_size passed"
            out.append(f"slot {self.slot_name} at set {self.src} is lost ({why})")
        if sub is None:
            out.append(f"subscription {self.subscription_name} missing at set {self.dest}")
        else:
            if not sub["enabled"]:
                out.append(f"subscription {self.subscription_name} at set {self.dest} is disabled")
            if sub["slot_name"] != self.slot_name:
                out.append(
                    f"subscription {self.subscription_name} at set {self.dest} uses slot {sub['slot_name']!r},"
                    f" not {self.slot_name}"
                )
        return out

    @property
    def notes(self) -> list[str]:
        """What else is worth saying, needing no resync by itself."""
        out = []
        s, sub = self.slot, self.subscription
        if s is not None and not self.needs:
            out.append(f"slot {self.slot_name} at set {self.src}: wal_status {s['wal_status']}")
            if s["wal_status"] == "unreserved":
                out.append(
                    "  (past max_slot_wal_keep_size: lost at the next checkpoint unless the subscriber catches up)"
                )
        if sub is not None:
            running = "running" if sub["running"] else "not running"
            out.append(f"subscription {self.subscription_name} at set {self.dest}: {running}")
            if sub["apply_error_count"] or sub["sync_error_count"]:
                out.append(
                    f"  erroring: apply_error_count {sub['apply_error_count']},"
                    f" sync_error_count {sub['sync_error_count']}"
                )
        return out


@dataclass
class ResyncReport:
    src: int
    dest: int
    found: dict = field(default_factory=dict)
    needs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    credits_backfilled: int = 0
    cents_backfilled: int = 0
    credits_present: int = 0  # read at A, already at B
    directory_backfilled: int = 0
    subscription_running: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


Progress = Callable[[str, str], Awaitable[None]]


async def _quiet(stage: str, text: str) -> None:
    return None


async def link_state(src_conn, dest_conn, src: int, dest: int) -> LinkState:
    """A's slot for B (on src_conn) and B's subscription to A (on dest_conn)."""
    slot_row = await src_conn.fetchrow(
        "SELECT s.wal_status, s.active, s.active_pid, to_jsonb(s) ->> 'invalidation_reason' AS invalidation_reason,"
        " COALESCE((to_jsonb(s) ->> 'failover')::boolean, false) AS failover"
        " FROM pg_replication_slots s WHERE s.slot_name = $1",
        slot(src, dest),
        timeout=STATEMENT_TIMEOUT_S,
    )
    sub_row = await dest_conn.fetchrow(
        "SELECT s.subenabled AS enabled, s.subslotname::text AS slot_name,"
        " EXISTS (SELECT 1 FROM pg_stat_subscription w WHERE w.subid = s.oid AND w.relid IS NULL"
        "   AND w.pid IS NOT NULL) AS running,"
        " COALESCE(st.apply_error_count, 0)::bigint AS apply_error_count,"
        " COALESCE(st.sync_error_count, 0)::bigint AS sync_error_count,"
        " COALESCE((to_jsonb(s) ->> 'subfailover')::boolean, false) AS failover"
        " FROM pg_subscription s LEFT JOIN pg_stat_subscription_stats st ON st.subid = s.oid"
        f" WHERE s.subname = $1 AND s.{SUBSCRIPTION_OF_THIS_DATABASE}",
        subscription(src),
        timeout=STATEMENT_TIMEOUT_S,
    )
    return LinkState(
        src,
        dest,
        slot(src, dest),
        subscription(src),
        dict(slot_row) if slot_row else None,
        dict(sub_row) if sub_row else None,
    )


async def _check(src_conn, dest_conn, src: int, dest: int) -> None:
    """Refuses a resync that cannot be right: a database that is another
    set, a destination without the idempotent apply, a source without the
    publication."""
    for conn, want in ((src_conn, src), (dest_conn, dest)):
        me = await conn.fetchval("SELECT set_id FROM anbao_set_identity", timeout=STATEMENT_TIMEOUT_S)
        if me != want:
            raise ResyncRefused(f"the database given for set {want} is set {me} (run anbao migrate --topology there)")
    if not await dest_conn.fetchval("SELECT 1 FROM schema_migrations WHERE version = $1", IDEMPOTENT_APPLY_VERSION):
        raise ResyncRefused(
            f"set {dest} has no migration {IDEMPOTENT_APPLY_VERSION:04d} (the apply that skips a row it has):"
            " run anbao migrate there first"
        )
    if not await src_conn.fetchval("SELECT 1 FROM pg_publication WHERE pubname = $1", publication(dest)):
        raise ResyncRefused(f"set {src} has no publication {publication(dest)} (run anbao migrate --topology there)")


async def _drop_slot(src_conn, name: str) -> bool:
    """Drops A's slot once no walsender holds it. B's subscription is
    disabled by now, so its walsender ends; one that still holds the slot
    after SLOT_RELEASE_TIMEOUT_S (that slot's own active_pid, nothing else)
    is terminated. Returns whether a slot was dropped."""
    deadline = time.monotonic() + SLOT_RELEASE_TIMEOUT_S
    terminated = False
    while True:
        pid = await src_conn.fetchrow(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", name, timeout=STATEMENT_TIMEOUT_S
        )
        if pid is None:
            return False
        if pid["active_pid"] is None:
            try:
                await src_conn.execute("SELECT pg_drop_replication_slot($1)", name, timeout=STATEMENT_TIMEOUT_S)
                return True
            except asyncpg.UndefinedObjectError:
                return False
            except asyncpg.ObjectInUseError:
                pass  # taken again between the look and the drop
        elif time.monotonic() > deadline:
            if terminated:
                raise RuntimeError(f"slot {name} still held by pid {pid['active_pid']} after terminating its walsender")
            await src_conn.execute("SELECT pg_terminate_backend($1)", pid["active_pid"], timeout=STATEMENT_TIMEOUT_S)
            terminated = True
            deadline = time.monotonic() + SLOT_RELEASE_TIMEOUT_S
        await asyncio.sleep(POLL_S)


async def _backfill_directory(src_conn, dest_conn, src: int, batch: int) -> int:
    """A's own users missing from B's directory; returns how many were added."""
    added, cursor = 0, -(2**63)
    while True:
        ids = [
            r[0]
            for r in await src_conn.fetch(
                "SELECT user_id FROM user_directory WHERE home_set = $1 AND user_id > $2 ORDER BY user_id LIMIT $3",
                src,
                cursor,
                batch,
                timeout=STATEMENT_TIMEOUT_S,
            )
        ]
        if not ids:
            return added
        cursor = ids[-1]
        async with dest_conn.transaction():
            got = await dest_conn.fetch(
                "INSERT INTO user_directory (user_id, home_set) SELECT u, $1 FROM unnest($2::bigint[]) AS u"
                " WHERE NOT EXISTS (SELECT 1 FROM user_directory d WHERE d.user_id = u AND d.home_set = $1)"
                " ON CONFLICT DO NOTHING RETURNING user_id",
                src,
                ids,
                timeout=STATEMENT_TIMEOUT_S,
            )
        added += len(got)


APPLIED_COLUMNS = ("applied_transfer_id", "applied_at")  # written by the destination's trigger, never copied
_COLUMNS = (
    "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute"
    " WHERE attrelid = 'public.credits_out'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
)


async def _credit_columns(src_conn, dest_conn, src: int, dest: int) -> list[tuple[str, str]]:
    """The columns of credits_out a backfill copies: every one the
    publication carries (all of them) but the apply's own. B must have each
    of A's, as its subscription must (a column added by a migration that
    only A has run yet: migrate B first)."""
    src_cols = await src_conn.fetch(_COLUMNS, timeout=STATEMENT_TIMEOUT_S)
    dest_names = {r[0] for r in await dest_conn.fetch(_COLUMNS, timeout=STATEMENT_TIMEOUT_S)}
    missing = [r[0] for r in src_cols if r[0] not in dest_names]
    if missing:
        raise ResyncRefused(f"set {dest}'s credits_out lacks {missing}, which set {src} sends: run anbao migrate there")
    return [(r[0], r[1]) for r in src_cols if r[0] not in APPLIED_COLUMNS]


async def _backfill_credits(src_conn, dest_conn, src: int, dest: int, columns, batch: int, progress: Progress):
    """Every credit of A's credits_out WHERE dest_set = B that B lacks,
    inserted at B in batches, each in one transaction of B's, with every
    column the stream would carry: the trigger credits each wallet as the
    apply would (and skips a credit already there). Returns (credits,
    cents, already present)."""
    names = ", ".join(c for c, _ in columns)
    arrays = ", ".join(f"${i}::{t}[]" for i, (_, t) in enumerate(columns, start=2))
    read = (
        f"SELECT {names} FROM credits_out WHERE src_set = $1 AND dest_set = $2 AND credit_id > $3 AND NOT in_batch"
        " ORDER BY credit_id LIMIT $4"
    )
    write = (
        f"INSERT INTO credits_out ({names}) SELECT {names} FROM unnest({arrays}) AS x({names})"
        " WHERE NOT EXISTS (SELECT 1 FROM credits_out c WHERE c.src_set = $1 AND c.credit_id = x.credit_id)"
        " ORDER BY x.credit_id RETURNING amount_cents"
    )
    count = cents = present = 0
    cursor = 0
    while True:
        rows = await src_conn.fetch(read, src, dest, cursor, batch, timeout=STATEMENT_TIMEOUT_S)
        if not rows:
            return count, cents, present
        cursor = rows[-1]["credit_id"]
        async with dest_conn.transaction():
            got = await dest_conn.fetch(
                write, src, *([r[c] for r in rows] for c, _ in columns), timeout=STATEMENT_TIMEOUT_S
            )
        count += len(got)
        cents += sum(r[0] for r in got)
        present += len(rows) - len(got)
        if got:
            await progress("backfill", f"backfilled {count} credits so far (up to credit {cursor})")


BATCH_COLUMNS = (
    "src_set, batch_id, dest_set, claimed_at, credit_ids, users, amounts, packets, seqs, senders, created_at"
)
BATCH_ROWS_PER_BACKFILL_TXN = 50  # each holds up to one grab batch's shares for B


async def _backfill_credit_batches(src_conn, dest_conn, src: int, dest: int, progress: Progress):
    """Every row of A's credit_batches WHERE dest_set = B that B lacks
    (migration 0014), inserted at B in transactions of B's own: B's trigger
    applies each as the stream would, and skips one already there. Returns
    (credits, cents, credits already present)."""
    read = (
        f"SELECT {BATCH_COLUMNS}, cardinality(credit_ids) AS n FROM credit_batches"
        " WHERE src_set = $1 AND dest_set = $2 AND batch_id > $3 ORDER BY batch_id LIMIT $4"
    )
    write = (
        f"INSERT INTO credit_batches ({BATCH_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        " RETURNING (SELECT sum(a) FROM unnest(amounts) a)::bigint"
    )
    count = cents = present = 0
    cursor = -(2**63)
    while True:
        rows = await src_conn.fetch(read, src, dest, cursor, BATCH_ROWS_PER_BACKFILL_TXN, timeout=STATEMENT_TIMEOUT_S)
        if not rows:
            return count, cents, present
        cursor = rows[-1]["batch_id"]
        async with dest_conn.transaction():
            for r in rows:
                got = await dest_conn.fetchval(write, *list(r)[:-1], timeout=STATEMENT_TIMEOUT_S)
                if got is None:
                    present += r["n"]
                else:
                    count, cents = count + r["n"], cents + got
        if count:
            await progress("backfill", f"backfilled {count} batched credits so far (up to batch {cursor})")


async def _wait_running(dest_conn, name: str) -> bool:
    deadline = time.monotonic() + RUNNING_TIMEOUT_S
    while time.monotonic() < deadline:
        if await dest_conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_subscription s JOIN pg_stat_subscription w ON w.subid = s.oid"
            f" WHERE s.subname = $1 AND w.relid IS NULL AND w.pid IS NOT NULL AND s.{SUBSCRIPTION_OF_THIS_DATABASE})",
            name,
            timeout=STATEMENT_TIMEOUT_S,
        ):
            return True
        await asyncio.sleep(POLL_S)
    return False


async def resync(
    src: int,
    src_dsn: str,
    dest: int,
    dest_dsn: str,
    publisher_dsn: str,
    force: bool = False,
    batch: int = BATCH,
    progress: Progress = _quiet,
) -> ResyncReport:
    """Resynchronises set `dest`'s subscription to set `src` (module doc).
    src_dsn/dest_dsn: the two databases; publisher_dsn: what `dest`'s
    subscription connects to `src` with (the topology's publisher_dsn).
    Raises ResyncRefused when nothing was done: not needed (unless force),
    another resync of `dest` running, or the sets not ready for it.
    progress(stage, text) is awaited after each step."""
    assert batch > 0
    report = ResyncReport(src, dest)
    dest_conn = await asyncpg.connect(dest_dsn, timeout=CONNECT_TIMEOUT_S)
    try:
        src_conn = await asyncpg.connect(src_dsn, timeout=CONNECT_TIMEOUT_S)
        try:
            await _check(src_conn, dest_conn, src, dest)
            columns = await _credit_columns(src_conn, dest_conn, src, dest)
            if not await dest_conn.fetchval("SELECT pg_try_advisory_lock($1)", RESYNC_LOCK_KEY):
                raise ResyncRefused(f"another resync is running at set {dest}")
            state = await link_state(src_conn, dest_conn, src, dest)
            report.found = {"slot": state.slot, "subscription": state.subscription}
            report.needs, report.notes = state.needs, state.notes
            if not state.needs and not force:
                raise ResyncRefused(
                    f"nothing to resynchronise from set {src} to set {dest}: "
                    + "; ".join(state.notes or ["slot and subscription healthy"])
                    + " (--force to resynchronise anyway)"
                )
            await progress("found", "found: " + "; ".join(state.needs or ["nothing wrong (forced)"]))
            await _resync(src_conn, dest_conn, state, publisher_dsn, columns, batch, report, progress)
            return report
        finally:
            await src_conn.close()
    finally:
        await dest_conn.close()  # and with it the resync lock


async def _resync(src_conn, dest_conn, state: LinkState, publisher_dsn: str, columns, batch: int, report, progress):
    src, dest, name = state.src, state.dest, state.subscription_name

    async def did(stage: str, text: str) -> None:
        report.actions.append(text)
        await progress(stage, text)

    if state.subscription is not None and state.subscription["enabled"]:
        await dest_conn.execute(f"ALTER SUBSCRIPTION {name} DISABLE", timeout=STATEMENT_TIMEOUT_S)
        await did("disabled", f"disabled subscription {name} at set {dest}")
    failover = bool((state.slot or {}).get("failover") or (state.subscription or {}).get("failover"))
    if await _drop_slot(src_conn, state.slot_name):
        why = (state.slot or {}).get("wal_status") or "?"
        await did("slot_dropped", f"dropped slot {state.slot_name} at set {src} (wal_status {why})")
    lsn = await src_conn.fetchval(
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, $2)"
        if failover
        else "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
        *((state.slot_name, True) if failover else (state.slot_name,)),
        timeout=STATEMENT_TIMEOUT_S,
    )
    await did("slot_created", f"created slot {state.slot_name} at set {src} (from LSN {lsn})")
    version = int(await dest_conn.fetchval("SHOW server_version_num"))
    options = {"create_slot": "false", "copy_data": "false", "enabled": "false"}
    if failover:
        options["failover"] = "true"
    async with dest_conn.transaction():
        if state.subscription is not None:
            # Disabled above (or already): its slot is A's, handled there.
            await dest_conn.execute(f"ALTER SUBSCRIPTION {name} SET (slot_name = NONE)", timeout=STATEMENT_TIMEOUT_S)
            await dest_conn.execute(f"DROP SUBSCRIPTION {name}", timeout=STATEMENT_TIMEOUT_S)
        await dest_conn.execute(
            create_subscription_sql(src, dest, publisher_dsn, version, **options), timeout=STATEMENT_TIMEOUT_S
        )
    await did(
        "subscribed",
        f"{'re-created' if state.subscription is not None else 'created'} subscription {name} at set {dest}"
        f" on the new slot (copy_data = false), disabled until the backfill is done",
    )
    report.directory_backfilled = await _backfill_directory(src_conn, dest_conn, src, batch)
    await did("directory", f"backfilled {report.directory_backfilled} of set {src}'s users into set {dest}'s directory")
    n, cents, present = await _backfill_credits(src_conn, dest_conn, src, dest, columns, batch, progress)
    bn, bcents, bpresent = await _backfill_credit_batches(src_conn, dest_conn, src, dest, progress)
    n, cents, present = n + bn, cents + bcents, present + bpresent
    report.credits_backfilled, report.cents_backfilled, report.credits_present = n, cents, present
    await did(
        "credits",
        f"backfilled {n} credits ({cents} cents) from set {src} to set {dest}; {present} were there already",
    )
    await dest_conn.execute(f"ALTER SUBSCRIPTION {name} ENABLE", timeout=STATEMENT_TIMEOUT_S)
    report.subscription_running = await _wait_running(dest_conn, name)
    await did(
        "enabled",
        f"enabled subscription {name} at set {dest}: "
        + ("running" if report.subscription_running else f"not running after {RUNNING_TIMEOUT_S:.0f} s"),
    )
