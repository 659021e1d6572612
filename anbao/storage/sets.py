"""Sets in the database: this database's identity, its publications (one
per other set, row-filtered by destination) and its subscriptions (one per
other set), their health, and the audit across every set.

Storage knows sets only as integers and connection strings: which set is
which, and where each publisher is, come from the caller (the topology is
read by the CLI through the SDK's routing module, the rule's one home).

Names, fixed so that `anbao migrate`/`serve` can check them:
  publication  anbao_to_set_<B>        at A: credit_batches WHERE dest_set = B (and the per-row
                                       credits_out still sent without one), and A's own users
  subscription anbao_from_set_<A>      at B: to A's anbao_to_set_<B>
  slot         anbao_<A>_to_<B>        at A, made by B's CREATE SUBSCRIPTION
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import asyncpg

from .accounts import BALANCE, PENDING_GRABS_OF_USER
from .domain import AccountKind as A
from .domain import TransferKind as T

log = logging.getLogger("anbao.sets")


def publication(dest: int) -> str:
    return f"anbao_to_set_{int(dest)}"


def subscription(src: int) -> str:
    return f"anbao_from_set_{int(src)}"


def slot(src: int, dest: int) -> str:
    return f"anbao_{int(src)}_to_{int(dest)}"


# Subscriptions are in a catalog shared by every database of a PostgreSQL
# cluster: anbao's reads of them keep to its own database's.
SUBSCRIPTION_OF_THIS_DATABASE = "subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())"


PUBLISHED_TABLES = ["credit_batches", "credits_out", "user_directory"]


def publication_tables(dest: int, me: int) -> str:
    """What set `me` publishes to set `dest` (migration 0014 alters the
    publications made before it to the same list)."""
    return (
        f"public.credit_batches WHERE (dest_set = {int(dest)}),"
        f" public.credits_out WHERE (dest_set = {int(dest)} AND NOT in_batch),"
        f" public.user_directory WHERE (home_set = {int(me)})"
    )


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


async def configure(dsn: str, me: int, peers: list[int]) -> list[str]:
    """This database is set `me`; makes the clearing accounts, fills the
    directory with the local users and creates the publications for
    `peers`, each checked if it exists. Returns what it did."""
    done = []
    conn = await asyncpg.connect(dsn)
    try:
        level = await conn.fetchval("SHOW wal_level")
        if level != "logical":
            raise RuntimeError(f"set {me}: wal_level is {level!r}; sets need wal_level = logical (and a restart)")
        await conn.execute("SELECT anbao_configure_set($1::smallint, $2::smallint[])", me, peers)
        for b in peers:
            name = publication(b)
            tables = await conn.fetch(
                "SELECT tablename, rowfilter FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1", name
            )
            if not tables:
                await conn.execute(
                    f"CREATE PUBLICATION {name} FOR TABLE {publication_tables(b, me)} WITH (publish = 'insert')"
                )
                done.append(f"created publication {name}")
            elif [t["tablename"] for t in tables] == ["credits_out", "user_directory"]:
                # Made before migration 0014 by a set configured after it ran.
                await conn.execute(f"ALTER PUBLICATION {name} SET TABLE {publication_tables(b, me)}")
                done.append(f"altered publication {name} to carry credit batches")
            elif [t["tablename"] for t in tables] != PUBLISHED_TABLES:
                raise RuntimeError(f"publication {name} publishes {[t['tablename'] for t in tables]}")
        return done
    finally:
        await conn.close()


def create_subscription_sql(src: int, me: int, pub_dsn: str, server_version: int, **options: str) -> str:
    """CREATE SUBSCRIPTION of set `me` to set `src`'s publication for it, on
    slot anbao_<src>_to_<me>; `options` adds to (or overrides) the WITH list
    (storage/resync.py: create_slot, copy_data, enabled)."""
    opts = {"slot_name": _literal(slot(src, me))}
    if server_version >= 160000:
        opts["origin"] = "none"  # never pass on what another set sent here
    opts.update(options)
    return (
        f"CREATE SUBSCRIPTION {subscription(src)} CONNECTION {_literal(pub_dsn)} PUBLICATION {publication(me)}"
        f" WITH ({', '.join(f'{k} = {v}' for k, v in opts.items())})"
    )


async def ensure_subscriptions(dsn: str, me: int, publishers: dict[int, str]) -> dict[int, str]:
    """One subscription per other set, to its publication for `me`. A
    publisher that cannot be reached, or has no publication for `me` yet,
    is reported and left for the next call. Returns set -> state."""
    states: dict[int, str] = {}
    conn = await asyncpg.connect(dsn)
    try:
        version = int(await conn.fetchval("SHOW server_version_num"))
        for a, pub_dsn in sorted(publishers.items()):
            name = subscription(a)
            row = await conn.fetchrow(
                f"SELECT subenabled FROM pg_subscription WHERE subname = $1 AND {SUBSCRIPTION_OF_THIS_DATABASE}", name
            )
            if row is not None:
                states[a] = "enabled" if row["subenabled"] else "DISABLED"
                try:
                    states[a] += await _receive_credit_batches(conn, name, a, me, row["subenabled"])
                except (OSError, asyncpg.PostgresError) as exc:
                    states[a] += f", not refreshed for credit batches ({type(exc).__name__}: {exc})"
                continue
            try:
                peer = await asyncpg.connect(pub_dsn, timeout=5)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                states[a] = f"waiting: set {a} unreachable ({type(exc).__name__})"
                continue
            try:
                has_pub = await peer.fetchval("SELECT 1 FROM pg_publication WHERE pubname = $1", publication(me))
            finally:
                await peer.close()
            if not has_pub:
                states[a] = f"waiting: set {a} has no publication {publication(me)} (run anbao migrate there)"
                continue
            await conn.execute(create_subscription_sql(a, me, pub_dsn, version))
            states[a] = "created" + await _receive_credit_batches(conn, name, a, me, False)
            log.info("set %s: subscribed to set %s", me, a)
        return states
    finally:
        await conn.close()


def credit_batch_marker(src: int) -> int:
    """The directory row (user_id = this, home_set = B) by which set B tells
    set `src`: my subscription to you receives your credit batches. A set
    sends a credit batch only to a set whose marker it has; to any other it
    sends each credit as its own credits_out row, from the roll-up, as
    before migration 0014. A subscription's tables are fixed when it is
    made or refreshed, and a batch streamed to one that lacks the table
    would be skipped, not applied: the marker is written after. It travels
    in B's publication with B's users (no user id is negative)."""
    return -(int(src) + 1)


async def _receive_credit_batches(conn, name: str, src: int, me: int, refresh: bool) -> str:
    """Makes subscription `name` (to set `src`) receive credit_batches and
    says so to `src` (credit_batch_marker); returns what it did. A
    subscription made before the publisher had migration 0014 receives the
    table only once refreshed, without copying: a batch it missed meanwhile
    was never sent to it (no marker yet). A disabled one is left alone."""
    has = (
        "SELECT EXISTS (SELECT 1 FROM pg_subscription s JOIN pg_subscription_rel r ON r.srsubid = s.oid"
        f" WHERE s.subname = $1 AND s.{SUBSCRIPTION_OF_THIS_DATABASE}"
        " AND r.srrelid = 'public.credit_batches'::regclass)"
    )
    done = ""
    if refresh and not await conn.fetchval(has, name):
        await conn.execute(f"ALTER SUBSCRIPTION {name} REFRESH PUBLICATION WITH (copy_data = false)")
        log.info("subscription %s refreshed for credit batches", name)
        done = ", refreshed for credit batches"
    if await conn.fetchval(has, name) and await conn.fetchval(
        "INSERT INTO user_directory (user_id, home_set) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING true",
        credit_batch_marker(src),
        me,
    ):
        done += f", told set {src} to send credit batches"
    return done


async def replication(dsn: str) -> dict:
    """This set's replication, both ways: as publisher, each slot's backlog
    (WAL the subscriber has not confirmed) and whether its WAL is still
    kept (max_slot_wal_keep_size); as subscriber, each subscription's last
    message and apply times; and its credits in flight and applied."""
    conn = await asyncpg.connect(dsn)
    try:
        return await replication_on(conn)
    finally:
        await conn.close()


async def replication_on(conn, timeout: float | None = None) -> dict:
    """replication() on a connection the caller holds (the workers' STATS
    watcher keeps one open)."""
    me = await conn.fetchval("SELECT set_id FROM anbao_set_identity", timeout=timeout)
    slots = [
        dict(r)
        for r in await conn.fetch(
            "SELECT slot_name, active, wal_status, "
            " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint AS backlog_bytes,"
            " safe_wal_size FROM pg_replication_slots WHERE slot_name LIKE 'anbao\\_%' ORDER BY 1",
            timeout=timeout,
        )
    ]
    subs = [
        dict(r)
        for r in await conn.fetch(
            "SELECT s.subname, s.subenabled, st.pid IS NOT NULL AS running,"
            " extract(epoch FROM now() - st.last_msg_receipt_time)::float8 AS since_last_message_s,"
            " extract(epoch FROM st.last_msg_receipt_time - st.last_msg_send_time)::float8 AS transit_s"
            " FROM pg_subscription s LEFT JOIN pg_stat_subscription st ON st.subid = s.oid"
            f" AND st.relid IS NULL WHERE s.subname LIKE 'anbao\\_%' AND s.{SUBSCRIPTION_OF_THIS_DATABASE} ORDER BY 1",
            timeout=timeout,
        )
    ]
    credits = dict(
        await conn.fetchrow(
            # credit_totals, not credits_out: a count of every credit ever
            # sent grew with the set's history, read once a second (0016).
            "SELECT (c.sent + p.n)::bigint AS sent, (c.sent_cents + p.cents)::bigint AS sent_cents,"
            " c.applied::bigint, c.applied_cents::bigint, c.max_apply_lag_s FROM"
            " (SELECT COALESCE(sum(credits) FILTER (WHERE src_set = $1), 0) AS sent,"
            "  COALESCE(sum(cents) FILTER (WHERE src_set = $1), 0) AS sent_cents,"
            "  COALESCE(sum(credits) FILTER (WHERE dest_set = $1), 0) AS applied,"
            "  COALESCE(sum(cents) FILTER (WHERE dest_set = $1), 0) AS applied_cents,"
            "  (extract(epoch FROM max(max_apply_lag) FILTER (WHERE dest_set = $1)))::float8"
            "    AS max_apply_lag_s FROM credit_totals) c,"
            f" ({_SENT_NOT_ROLLED_UP_TOTAL}) p",
            me,
            timeout=timeout,
        )
    )
    suspense = await conn.fetchval(
        f"SELECT COALESCE(sum(balance_cents), 0)::bigint FROM accounts WHERE kind = {A.SUSPENSE:d}", timeout=timeout
    )
    return {"set_id": me, "slots": slots, "subscriptions": subs, "credits": credits, "suspense_cents": suspense}


_NOT_ROLLED_UP_TO = (
    " + (SELECT COALESCE(sum(cardinality(b.credit_ids)), 0) FROM credit_batches b"
    "    WHERE b.dest_set = $1 AND b.src_set = $2 AND b.src_set = (SELECT set_id FROM anbao_set_identity)"
    "    AND b.batch_id IN (SELECT r.batch_id FROM grab_rollups r))"
)


async def credits_between(conn, src: int, dest: int, timeout: float | None = None) -> int:
    """How many credits from set `src` to set `dest` this database holds: at
    `src` those sent (rolled up, or in a credit batch not rolled up yet), at
    `dest` those applied (copies arrive applied). Read from credit_totals;
    a peer not yet migrated to 0016 (sets are upgraded one at a time) is
    counted from its rows, as before."""
    try:
        return await conn.fetchval(
            "SELECT COALESCE((SELECT credits FROM credit_totals WHERE dest_set = $1 AND src_set = $2), 0)"
            + _NOT_ROLLED_UP_TO,
            dest,
            src,
            timeout=timeout,
        )
    except asyncpg.UndefinedTableError:
        return await conn.fetchval(
            "SELECT (SELECT count(*) FROM credits_out WHERE dest_set = $1 AND src_set = $2)" + _NOT_ROLLED_UP_TO,
            dest,
            src,
            timeout=timeout,
        )


# ---------------------------------------------------------------- a wallet's credits on their way
# BALANCE at a user's home set says what is posted there and what other
# sets owe the user but have not yet credited (PROTOCOL.md BALANCE). Two
# reads, in this order: the home set's (balance_at_home: the balance and,
# per sending set, what it has applied from that set, in one snapshot),
# then each sender's (owed_to: everything it has sent or will send the
# user, in one snapshot). Sent only grows and a copy is applied only after
# its original committed, so owed - applied is never negative, and a credit
# applied between the two reads is counted as on its way, never as both
# posted and on its way.
#
# What a set has applied to the wallet is read from the wallet's CROSS_IN
# transfers, each from the sending set's clearing account: every shape of
# credit has one (per row, in a batch, before and since migration 0019,
# which keeps no copy per credit). A credit applied to suspense (the user
# had no wallet here then) is not in the wallet, and is said on its way.
_BALANCE_AT_HOME = (
    f"SELECT ({BALANCE}), f.srcs, f.cents FROM (SELECT array_agg(src_set) AS srcs, array_agg(s) AS cents FROM"
    " (SELECT c.owner_id AS src_set, sum(t.amount_cents)::bigint AS s FROM accounts w"
    f"  JOIN transfers t ON t.credit_account = w.account_id AND t.kind = {T.CROSS_IN:d}"
    f"  JOIN accounts c ON c.account_id = t.debit_account AND c.kind = {A.CLEARING:d}"
    f"  WHERE w.kind = {A.USER:d} AND w.owner_id = $1 AND c.owner_id <> $2 GROUP BY c.owner_id) x) f"
)
# At the sender $2, to set $3: the credits written (in flight or applied
# there) plus the user's grabs here not yet rolled up (each becomes such a
# credit, unless the user has a wallet here: then it is no credit at all).
_OWED_TO = (
    "SELECT COALESCE((SELECT sum(amount_cents) FROM credits_out"
    "  WHERE user_id = $1 AND dest_set = $3 AND src_set = $2), 0)::bigint"
    f" + CASE WHEN EXISTS (SELECT 1 FROM accounts WHERE kind = {A.USER:d} AND owner_id = $1) THEN 0"
    f"   ELSE {PENDING_GRABS_OF_USER} END"
)


async def balance_at_home(conn, me: int, user_id: int) -> tuple[int | None, dict[int, int]]:
    """At the home set `me`: (the user's balance as BALANCE on one set says
    it, or None for no wallet; {sending set: cents applied here from it})."""
    bal, srcs, cents = await conn.fetchrow(_BALANCE_AT_HOME, user_id, me)
    return bal, dict(zip(srcs or [], cents or [], strict=True))


async def owed_to(conn, me: int, dest: int, user_id: int) -> int:
    """At the sending set `me`: every cent it has credited, or will, to
    `user_id` at set `dest`."""
    return await conn.fetchval(_OWED_TO, user_id, me, dest)


@dataclass
class SetsAudit:
    """The audit of a deployment of several sets (see audit_sets)."""

    per_set: dict = field(default_factory=dict)  # set id -> AuditReport
    totals: dict = field(default_factory=dict)
    violations: dict = field(default_factory=dict)
    replication: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations and all(r.ok for r in self.per_set.values())

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "totals": self.totals,
            "violations": self.violations,
            "sets": {s: r.as_dict() for s, r in self.per_set.items()},
            "replication": self.replication,
        }

    def text(self) -> str:
        lines = [f"anbao audit across {len(self.per_set)} sets: " + ("OK" if self.ok else "VIOLATED")]
        lines += [f"  {k:>26}: {v}" for k, v in self.totals.items()]
        for name, rows in self.violations.items():
            lines.append(f"  [FAIL] {name}")
            lines += [f"         {r}" for r in rows[:20]]
        for s, r in self.per_set.items():
            lines.append(f"--- set {s}")
            lines.append(r.text())
        for s, rep in self.replication.items():
            lines.append(f"--- replication at set {s}: {rep}")
        return "\n".join(lines)


# Credits sent in a grab's commit (migration 0014) whose batch the roll-up
# has not reached: no credits_out row at the sender yet, and no CROSS_OUT
# transfer (the escrow still holds them), but they may be applied already.
_SENT_NOT_ROLLED_UP = (
    "SELECT b.src_set, k.credit_id, b.dest_set, k.amount_cents, k.user_id FROM credit_batches b"
    " CROSS JOIN LATERAL unnest(b.credit_ids, b.amounts, b.users) AS k(credit_id, amount_cents, user_id)"
    " WHERE b.src_set = $1 AND b.batch_id IN (SELECT r.batch_id FROM grab_rollups r)"
)


# The same, counted, for every destination ($1: this set).
_SENT_NOT_ROLLED_UP_TOTAL = (
    "SELECT count(*) AS n, COALESCE(sum(k.amount_cents), 0) AS cents FROM credit_batches b"
    " CROSS JOIN LATERAL unnest(b.amounts) AS k(amount_cents)"
    " WHERE b.src_set = $1 AND b.batch_id IN (SELECT r.batch_id FROM grab_rollups r)"
)


async def _read_flows(dsns: dict[int, str]) -> dict:
    """One reading of every set, each in its own snapshot: the credits it
    sent, the credits it applied, and its money by account kind."""
    sent: dict[tuple[int, int], tuple[int, int, int]] = {}  # (src, id) -> (dest, amount, user)
    applied: dict[tuple[int, int], tuple[int, int]] = {}  # (src, id) -> (amount, copies)
    clearing: dict[int, int] = {}
    pending: dict[int, int] = {}  # set -> cents sent by grab commits, not yet paid to clearing by the roll-up
    identity: dict[int, int | None] = {}
    money = {"deposits": 0, "withdrawals": 0, "wallets": 0, "escrows": 0, "suspense": 0}
    for s, dsn in sorted(dsns.items()):
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                identity[s] = await conn.fetchval("SELECT set_id FROM anbao_set_identity")
                for r in await conn.fetch(
                    "SELECT src_set, credit_id, dest_set, amount_cents, user_id FROM credits_out WHERE src_set = $1",
                    s,
                ):
                    sent[(r[0], r[1])] = (r[2], r[3], r[4])
                for r in await conn.fetch(_SENT_NOT_ROLLED_UP, s):
                    sent[(r[0], r[1])] = (r[2], r[3], r[4])
                    pending[s] = pending.get(s, 0) + r[3]
                for r in await conn.fetch(
                    "SELECT src_set, credit_id, amount_cents, count(*) OVER (PARTITION BY src_set, credit_id)"
                    " FROM credits_held WHERE dest_set = $1 AND applied_transfer_id IS NOT NULL",
                    s,
                ):
                    applied[(r[0], r[1])] = (r[2], r[3])
                row = await conn.fetchrow(
                    f"SELECT COALESCE(sum(balance_cents) FILTER (WHERE kind = {A.USER:d}), 0)::bigint AS wallets,"
                    f" COALESCE(sum(balance_cents) FILTER (WHERE kind = {A.ESCROW:d}), 0)::bigint AS escrows,"
                    f" COALESCE(sum(balance_cents) FILTER (WHERE kind = {A.CLEARING:d}), 0)::bigint AS clearing,"
                    f" COALESCE(sum(balance_cents) FILTER (WHERE kind = {A.SUSPENSE:d}), 0)::bigint AS suspense,"
                    f" (SELECT COALESCE(sum(amount_cents), 0) FROM transfers WHERE kind = {T.DEPOSIT:d})::bigint"
                    "   AS deposits,"
                    f" (SELECT COALESCE(sum(amount_cents), 0) FROM transfers WHERE kind = {T.WITHDRAW:d})::bigint"
                    "   AS withdrawals FROM accounts"
                )
                clearing[s] = row["clearing"]
                for k in money:
                    money[k] += row[k]
        finally:
            await conn.close()
    return {
        "sent": sent,
        "applied": applied,
        "clearing": clearing,
        "pending": pending,
        "money": money,
        "identity": identity,
    }


STABLE_READ_ATTEMPTS = 20
STABLE_READ_PAUSE_S = 0.25


async def _stable_flows(dsns: dict[int, str]) -> tuple[dict, bool]:
    """The sets' flows, read until two readings in a row agree on the
    credits sent and applied; (the last reading, whether two agreed)."""
    first = await _read_flows(dsns)
    for _ in range(STABLE_READ_ATTEMPTS):
        again = await _read_flows(dsns)
        if again["sent"].keys() == first["sent"].keys() and again["applied"].keys() == first["applied"].keys():
            return first, True
        first = again
        await asyncio.sleep(STABLE_READ_PAUSE_S)
    return first, False


async def audit_sets(dsns: dict[int, str], refund_grace_ms: int | None = None) -> SetsAudit:
    """Every set's own audit, then across them: conservation (wallets +
    escrows + clearing in flight + suspense = deposits - withdrawals, over
    all sets), and every outbound credit applied exactly once at its
    destination or still in flight, never both and never neither.

    The sets are separate databases, read one after another, so the
    cross-set checks need a cut in which no credit moved: credits only
    ever get sent and applied (both sets only grow), so two readings in a
    row that agree on them are such a cut. The audit reads until two agree
    (a live storm may need a few tries); if none do, it says so and checks
    only what holds in any reading."""
    from .audit import audit

    out = SetsAudit()
    first, stable = await _stable_flows(dsns)
    sent, applied, clearing, money = first["sent"], first["applied"], first["clearing"], first["money"]
    for s, me in first["identity"].items():
        if me != s:
            out.violations.setdefault("each database is the set the topology says", []).append(
                {"set": s, "database_says": me}
            )
    for s, dsn in sorted(dsns.items()):
        out.per_set[s] = await audit(dsn, refund_grace_ms=refund_grace_ms)
        try:
            out.replication[s] = await replication(dsn)
        except (OSError, asyncpg.PostgresError) as exc:
            out.replication[s] = {"error": repr(exc)}

    in_flight = {k: v for k, v in sent.items() if k not in applied}
    in_flight_cents = sum(v[1] for v in in_flight.values())
    bad = [
        {"credit": k, "sent": sent.get(k), "applied": v}
        for k, v in applied.items()
        if v[1] != 1 or (stable and (k not in sent or sent[k][1] != v[0]))
    ]
    if bad:
        out.violations["every applied credit was sent, once, for its amount"] = bad
    clearing_total = sum(clearing.values())
    not_rolled_up_cents = sum(first["pending"].values())
    if stable and clearing_total != in_flight_cents - not_rolled_up_cents:
        out.violations["clearing accounts over all sets hold the credits in flight, less those not rolled up"] = [
            {
                "clearing_by_set": clearing,
                "in_flight_cents": in_flight_cents,
                "sent_not_rolled_up_cents": not_rolled_up_cents,
            }
        ]
    inside = money["wallets"] + money["escrows"] + clearing_total + money["suspense"]
    expected = money["deposits"] - money["withdrawals"]
    if inside != expected:
        out.violations["wallets + escrows + clearing in flight + suspense = deposits - withdrawals"] = [
            {**money, "clearing_in_flight": clearing_total, "inside": inside, "expected": expected}
        ]
    out.totals = {
        **{f"{k}_cents": v for k, v in money.items()},
        "clearing_in_flight_cents": clearing_total,
        "credits_sent": len(sent),
        "credits_applied": len(applied),
        "credits_in_flight": len(in_flight),
        "credits_in_flight_cents": in_flight_cents,
        "consistent_cut": stable,
    }
    return out


async def audit_when_drained(
    dsns: dict[int, str], timeout_s: float, refund_grace_ms: int | None = None, poll_s: float = 0.2
) -> tuple[SetsAudit | None, bool]:
    """Waits until no batch awaits its roll-up in any set and (with several
    sets) no credit is in flight, then audits across them, a consistent
    cut. Returns (the last audit, None for one set; whether it drained
    within timeout_s). A set that cannot be read yet (restarting) is read
    again at the next poll."""
    deadline = time.monotonic() + timeout_s
    result = None
    while True:
        try:
            pending = 0
            for dsn in dsns.values():
                conn = await asyncpg.connect(dsn)
                try:
                    pending += await conn.fetchval("SELECT count(*) FROM grab_rollups")
                finally:
                    await conn.close()
            result = await audit_sets(dsns, refund_grace_ms) if len(dsns) > 1 else None
            drained = pending == 0 and (
                result is None or (result.totals["credits_in_flight"] == 0 and result.totals["consistent_cut"])
            )
        except (OSError, asyncpg.PostgresError):
            drained = False
        if drained or time.monotonic() > deadline:
            return result, drained
        await asyncio.sleep(poll_s)


async def wait_for_directory(
    dsns: dict[int, str], wanted: dict[int, list[int]], timeout_s: float, poll_s: float = 0.1
) -> tuple[int, int, int] | None:
    """Waits until each set s knows the users wanted[s] (users homed in
    other sets: their directory rows are replicated, and a set refuses a
    grab by a user it does not know yet, exactly as an unregistered one).
    None once every set knows them; else (set, known, wanted) of the first
    set still short when timeout_s ran out."""
    deadline = time.monotonic() + timeout_s
    for s, users in sorted(wanted.items()):
        conn = await asyncpg.connect(dsns[s])
        try:
            while True:
                n = await conn.fetchval(
                    "SELECT count(DISTINCT user_id) FROM user_directory WHERE user_id = ANY($1::bigint[])", users
                )
                if n == len(set(users)):
                    break
                if time.monotonic() > deadline:
                    return s, n, len(set(users))
                await asyncio.sleep(poll_s)
        finally:
            await conn.close()
    return None


@dataclass(frozen=True)
class CreditTimes:
    """One cross-set credit and its clock (seconds since the epoch, every
    set's PostgreSQL on the same clock when they share a machine):
    committed, the claim's grab batch commit (the transaction whose commit
    made the grab durable; its OK follows); created, when the packet's set
    sent it: that same commit for a credit batch (migration 0014), the
    roll-up that wrote it for a credit sent alone; applied, the apply at the
    winner's home set (None while in flight)."""

    src_set: int
    dest_set: int
    credit_id: int
    packet_id: int
    user_id: int
    amount_cents: int
    committed: float | None
    created: float
    applied: float | None


async def credit_times(dsns: dict[int, str], packets: list[int] | None = None) -> list[CreditTimes]:
    """Every credit sent by a set of `dsns` (of `packets`, when given), with
    its times: read where it was sent (the claim's commit, the roll-up) and
    where it was applied."""
    sent: list[dict] = []
    applied: dict[tuple[int, int], float] = {}
    for s, dsn in sorted(dsns.items()):
        conn = await asyncpg.connect(dsn)
        try:
            sent += [
                dict(r)
                for r in await conn.fetch(
                    "SELECT o.src_set, o.dest_set, o.credit_id, o.packet_id, o.user_id, o.amount_cents,"
                    " extract(epoch FROM c.created_at)::float8 AS committed,"
                    " extract(epoch FROM o.created_at)::float8 AS created"
                    " FROM credits_out o LEFT JOIN claims c ON c.packet_id = o.packet_id AND c.seq = o.seq"
                    " WHERE o.src_set = $1 AND NOT o.in_batch"
                    " AND ($2::bigint[] IS NULL OR o.packet_id = ANY($2::bigint[]))"
                    " UNION ALL SELECT b.src_set, b.dest_set, k.credit_id, k.packet_id, k.user_id, k.amount_cents,"
                    " extract(epoch FROM b.claimed_at)::float8, extract(epoch FROM b.created_at)::float8"
                    " FROM credit_batches b CROSS JOIN LATERAL unnest(b.credit_ids, b.packets, b.users, b.amounts)"
                    " AS k(credit_id, packet_id, user_id, amount_cents)"
                    " WHERE b.src_set = $1 AND ($2::bigint[] IS NULL OR k.packet_id = ANY($2::bigint[]))",
                    s,
                    packets,
                )
            ]
            for r in await conn.fetch(
                "SELECT src_set, credit_id, extract(epoch FROM applied_at)::float8 FROM credits_held"
                " WHERE dest_set = $1 AND applied_transfer_id IS NOT NULL"
                " AND ($2::bigint[] IS NULL OR packet_id = ANY($2::bigint[]))",
                s,
                packets,
            ):
                applied[(r[0], r[1])] = r[2]
        finally:
            await conn.close()
    return [CreditTimes(**r, applied=applied.get((r["src_set"], r["credit_id"]))) for r in sent]
