"""The apply of another set's rows is idempotent (migration 0010), on two
real connections to one database: a backfill's insert of a credit holds the
apply's lock uncommitted while the stream's apply of the same credit waits
for it; when the backfill commits, the apply's check after the lock sees
that row (READ COMMITTED: a fresh snapshot per statement in PL/pgSQL) and
skips it, where the schema before 0010 hit a primary-key violation, which
would stop a subscription and retry it forever. The directory's copies of
another set's users likewise."""

from __future__ import annotations

import asyncio
import os
import time

import asyncpg
import pytest
from helpers import database_at_version, explain_into, plan_nodes, plans_of

from anbao.storage.audit import audit
from anbao.storage.events import number_events, read_events

pytestmark = pytest.mark.timeout(60)

ME, PEER, USER = 1, 0, 42
CREDIT = (
    "INSERT INTO credits_out (src_set, credit_id, dest_set, user_id, amount_cents, packet_id, seq, batch_id)"
    f" VALUES ({PEER}, 1, {ME}, {USER}, 250, 7, 1, 1)"
)
DIRECTORY = f"INSERT INTO user_directory (user_id, home_set) VALUES (5, {PEER})"
WAIT_S = 10


async def _as_set(dsn: str) -> None:
    """This database is set ME (the peer PEER), with USER's wallet."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"SELECT anbao_configure_set({ME}::smallint, ARRAY[{PEER}, {ME}]::smallint[])")
        await conn.execute(f"INSERT INTO accounts (kind, owner_id) VALUES (1, {USER})")
    finally:
        await conn.close()


async def _race(dsn: str, sql: str) -> tuple[str, str]:
    """`sql` by a backfill (a transaction of its own, left open) and then by
    an apply (session_replication_role = replica, as the subscription's
    worker runs); once the apply waits on a lock, the backfill commits.
    Returns the apply's command status and the lock it waited on (raises
    what the apply raised)."""
    backfill = await asyncpg.connect(dsn)
    apply = await asyncpg.connect(dsn)
    try:
        await apply.execute("SET session_replication_role = replica")
        apply_pid = await apply.fetchval("SELECT pg_backend_pid()")
        tx = backfill.transaction()
        await tx.start()
        await backfill.execute(sql)
        applying = asyncio.create_task(apply.execute(sql))
        deadline = time.monotonic() + WAIT_S
        while True:
            waiting = await backfill.fetchrow(
                "SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE pid = $1", apply_pid
            )
            if waiting["wait_event_type"] == "Lock":
                break
            assert time.monotonic() < deadline and not applying.done(), "the apply never waited for the backfill"
            await asyncio.sleep(0.02)
        await tx.commit()
        return await asyncio.wait_for(applying, WAIT_S), waiting["wait_event"]
    finally:
        await backfill.close()
        await apply.close()


async def _money(dsn: str) -> tuple:
    conn = await asyncpg.connect(dsn)
    try:
        return tuple(
            await conn.fetchrow(
                f"SELECT (SELECT balance_cents FROM accounts WHERE kind = 1 AND owner_id = {USER}),"
                f" (SELECT balance_cents FROM accounts WHERE kind = 3 AND owner_id = {PEER}),"
                " (SELECT count(*) FROM transfers WHERE kind = 7),"
                " (SELECT count(*) FROM credits_out),"
                " (SELECT count(*) FROM user_directory WHERE home_set = $1)",
                PEER,
            )
        )
    finally:
        await conn.close()


async def test_apply_skips_a_credit_committed_by_a_concurrent_backfill(fresh_dsn):
    await _as_set(fresh_dsn)
    # Each waits on the advisory lock (not on the row), then skips the row.
    assert await _race(fresh_dsn, CREDIT) == ("INSERT 0 0", "advisory")
    assert await _race(fresh_dsn, DIRECTORY) == ("INSERT 0 0", "advisory")
    # credited once: wallet +250, clearing -250, one CROSS_IN transfer, one row
    assert await _money(fresh_dsn) == (250, -250, 1, 1, 1)
    conn = await asyncpg.connect(fresh_dsn)
    try:
        # Sequential repeats, by either path, are skipped too.
        assert await conn.execute(CREDIT) == "INSERT 0 0"
        await conn.execute("SET session_replication_role = replica")
        assert await conn.execute(CREDIT) == "INSERT 0 0"
        assert await conn.execute(DIRECTORY) == "INSERT 0 0"
        assert await conn.fetchval("SELECT count(*) FROM event_log WHERE kind = 7") == 1
    finally:
        await conn.close()
    assert await _money(fresh_dsn) == (250, -250, 1, 1, 1)


async def test_before_0010_the_same_race_stops_the_apply(pg):
    """The schema as it was (0008): the second arrival is a primary-key
    violation, which in a subscription's apply worker is an error retried
    forever."""
    dsn = await database_at_version(pg, "apply_v8", 8)
    await _as_set(dsn)
    with pytest.raises(asyncpg.UniqueViolationError):
        await _race(dsn, CREDIT)
    with pytest.raises(asyncpg.UniqueViolationError):
        await _race(dsn, DIRECTORY)
    assert await _money(dsn) == (250, -250, 1, 1, 1)


# A credit batch (migration 0014) as the stream delivers it: USER twice (its
# two credits must both arrive: UPDATE ... FROM would apply one), and a user
# this set does not know (to suspense).
STRANGER = 999
BATCH = (
    "INSERT INTO credit_batches (src_set, batch_id, dest_set, claimed_at, credit_ids, users, amounts, packets,"
    f" seqs, senders) VALUES ({PEER}, 77, {ME}, now(), '{{11,12,13}}', '{{{USER},{STRANGER},{USER}}}',"
    " '{100,30,5}', '{7,7,8}', '{1,2,1}', '{3,3,4}')"
)


async def test_a_credit_batch_is_applied_set_wise_and_once(fresh_dsn):
    await _as_set(fresh_dsn)
    # Each waits on the advisory lock (not on the row), then skips the row.
    assert await _race(fresh_dsn, BATCH) == ("INSERT 0 0", "advisory")
    conn = await asyncpg.connect(fresh_dsn)
    try:
        await conn.execute("SET session_replication_role = replica")
        assert await conn.execute(BATCH) == "INSERT 0 0"
        rows = await conn.fetch(
            "SELECT o.credit_id, o.user_id, o.amount_cents, o.sender_id, t.kind, t.amount_cents,"
            " a.kind AS wallet_kind FROM credits_held o"
            " JOIN transfers t ON t.transfer_id = o.applied_transfer_id"
            " JOIN accounts a ON a.account_id = t.credit_account ORDER BY o.credit_id"
        )
        assert [tuple(r) for r in rows] == [
            (11, USER, 100, 3, 7, 100, 1),
            (12, STRANGER, 30, 3, 7, 30, 4),
            (13, USER, 5, 4, 7, 5, 1),
        ]
        suspense = await conn.fetchval("SELECT balance_cents FROM accounts WHERE kind = 4")
        assert suspense == 30
        assert await conn.fetchval("SELECT applied_at IS NOT NULL FROM credit_batches") is True
        # One row for the batch, not one per credit (0019): its credits_in
        # row and its event row, counted as three events.
        transfers = [r[0] for r in await conn.fetch("SELECT transfer_id FROM transfers WHERE kind = 7 ORDER BY 1")]
        assert tuple(await conn.fetchrow("SELECT first_transfer_id, transfer_ids, owners FROM credits_in")) == (
            transfers[0],
            transfers,
            [USER, 0, USER],
        )
        assert [tuple(r) for r in await conn.fetch("SELECT kind, transfer_id, count FROM event_log")] == [
            (8, transfers[0], 3)
        ]
        await conn.execute("RESET session_replication_role")
        assert await number_events(conn) == 3
        page = await read_events(conn, 0, 10)
        # (no, kind, at_ms, packet, user, seq, count, amount, elapsed_ms, transfer)
        assert [(e[0], e[1], e[3], e[4], e[7], e[9]) for e in page.events] == [
            (1, 7, 7, USER, 100, transfers[0]),
            (2, 7, 7, 0, 30, transfers[1]),
            (3, 7, 8, USER, 5, transfers[2]),
        ]
        assert [e[0] for e in (await read_events(conn, 1, 1)).events] == [2]
    finally:
        await conn.close()
    report = await audit(fresh_dsn)
    assert report.ok, report.violations
    conn = await asyncpg.connect(fresh_dsn)
    try:  # without the batch's event row, the audit names its three credits
        await conn.execute("DELETE FROM event_log WHERE kind = 8")
    finally:
        await conn.close()
    violations = (await audit(fresh_dsn)).violations
    assert len(violations["every deposit, withdrawal, send, refund and cross-set credit has its event"]) == 3
    # wallet 105, clearing -135, three CROSS_IN transfers, no copy
    assert await _money(fresh_dsn) == (105, -135, 3, 0, 0)


@pytest.mark.parametrize(
    "column, value",
    [("users", f"'{{{USER},NULL}}'"), ("amounts", "'{5,NULL}'"), ("senders", "'{3,NULL}'"), ("amounts", "'{5,0}'")],
)
async def test_a_credit_batch_with_a_null_or_empty_share_is_refused_at_the_sender(fresh_dsn, column, value):
    """A NULL element passes `0 < ALL(amounts)` and would fail the apply at
    the destination, stopping its subscription: the sender refuses it."""
    values = {
        "credit_ids": "'{1,2}'",
        "users": f"'{{{USER},{USER}}}'",
        "amounts": "'{5,6}'",
        "packets": "'{7,7}'",
        "seqs": "'{1,2}'",
        "senders": "'{3,3}'",
        column: value,
    }
    conn = await asyncpg.connect(fresh_dsn)
    try:
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                f"INSERT INTO credit_batches (src_set, batch_id, dest_set, claimed_at, {', '.join(values)})"
                f" VALUES ({ME}, 1, {PEER}, now(), {', '.join(values.values())})"
            )
    finally:
        await conn.close()


# The sender's own copy of a credit, as its roll-up writes it (0014: in a batch, never published).
OUTBOUND = (
    "INSERT INTO credits_out (src_set, credit_id, dest_set, user_id, amount_cents, packet_id, seq, batch_id,"
    f" in_batch) VALUES ({ME}, $1::bigint, {PEER}, 5, 40, 9, $1::int, 3, true)"
)


async def _totals(conn) -> dict:
    """credit_totals, checked against credits_out by the audit's own check."""
    from anbao.storage.audit import CHECKS

    [check] = [sql for name, sql in CHECKS if name.startswith("credit_totals match")]
    assert [dict(r) for r in await conn.fetch(check)] == []
    rows = await conn.fetch("SELECT src_set, dest_set, credits, cents FROM credit_totals")
    return {(r[0], r[1]): (r[2], r[3]) for r in rows}


async def test_credit_totals_follow_every_writer_through_the_upgrade(pg):
    """What STATS reads (credit_totals, 0016) equals credits_out: counted
    from the rows by the upgrade, then kept by each writer: the per-row
    apply, the batch apply (in the apply worker's role), and the sender's
    roll-up copies."""
    from anbao.storage.migrate import migrate
    from anbao.storage.sets import credits_between

    dsn = await database_at_version(pg, f"totals_v15_{os.getpid()}", 15)
    await _as_set(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(CREDIT)  # applied here, one row at a time
        await conn.execute(OUTBOUND, 1)
        # A set upgraded first asks this one, still at 15, as before.
        assert (await credits_between(conn, PEER, ME), await credits_between(conn, ME, PEER)) == (1, 1)
        await migrate(dsn)
        assert await _totals(conn) == {(PEER, ME): (1, 250), (ME, PEER): (1, 40)}
        assert (await credits_between(conn, PEER, ME), await credits_between(conn, ME, PEER)) == (1, 1)
        await conn.execute(OUTBOUND, 2)
        await conn.execute(CREDIT.replace(f"VALUES ({PEER}, 1,", f"VALUES ({PEER}, 2,"))
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(BATCH)
        assert await _totals(conn) == {(PEER, ME): (5, 635), (ME, PEER): (2, 80)}
        lag = await conn.fetchval(f"SELECT max_apply_lag FROM credit_totals WHERE dest_set = {ME}")
        assert lag is not None and lag.total_seconds() >= 0
    finally:
        await conn.close()


async def test_credits_applied_before_and_after_0019_read_alike(pg):
    """A batch applied at schema 18 (a copy and an event row per credit) and
    one applied since 0019 (one credits_in row and one event row): the
    readers of either shape (RECEIVED_LIST, BALANCE at home, the feed, the
    audit) see the same credits."""
    from anbao.storage.history import _RECEIVED, NEWEST
    from anbao.storage.migrate import migrate
    from anbao.storage.sets import balance_at_home

    dsn = await database_at_version(pg, f"credits_in_v18_{os.getpid()}", 18)
    await _as_set(dsn)
    later = BATCH.replace(f"({PEER}, 77,", f"({PEER}, 78,").replace("'{11,12,13}'", "'{21,22,23}'")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(BATCH)
        assert await conn.fetchval("SELECT count(*) FROM credits_out") == 3
        await migrate(dsn)
        await conn.execute(later)
        await conn.execute("RESET session_replication_role")
        assert (
            await conn.fetchval("SELECT count(*) FROM credits_out"),
            await conn.fetchval("SELECT count(*) FROM credits_held"),
        ) == (3, 6)
        wallet = await conn.fetchval(f"SELECT account_id FROM accounts WHERE kind = 1 AND owner_id = {USER}")
        received = await conn.fetch(_RECEIVED, wallet, NEWEST, 10, USER)
        # (packet, sender, seq, amount), newest first: the later batch's, then the first's.
        assert [(r[1], r[2], r[3], r[4]) for r in received] == [(8, 4, 1, 5), (7, 3, 1, 100)] * 2
        assert all(r[5] is not None for r in received)
        assert await balance_at_home(conn, ME, USER) == (210, {PEER: 210})
        assert await number_events(conn) == 6
        events = (await read_events(conn, 0, 10)).events
        transfers = [r[0] for r in await conn.fetch("SELECT transfer_id FROM transfers WHERE kind = 7 ORDER BY 1")]
        # (kind, packet, user, amount, transfer): the same for both shapes.
        credits = [(7, USER, 100), (7, 0, 30), (8, USER, 5)] * 2
        assert [(e[1], e[3], e[4], e[7], e[9]) for e in events] == [
            (7, p, u, a, t) for (p, u, a), t in zip(credits, transfers, strict=True)
        ]
    finally:
        await conn.close()
    report = await audit(dsn)
    assert report.ok, report.violations


async def test_a_credit_batch_locks_its_wallets_in_user_order(fresh_dsn):
    """The apply locks each wallet by the UPDATE that credits it, and every
    writer that waits on accounts locks them in (kind, owner) order, so
    the UPDATE must take them by user: a nested loop driven by the batch's
    users, sorted, never a hash of the accounts (whose order is the
    table's). That is the planner's choice, not the SQL's promise, so it is
    read here from the plan PostgreSQL runs (auto_explain), with enough
    wallets that the plan is the one a set's database gets."""
    await _as_set(fresh_dsn)
    users = list(range(50_000, 50_200))
    conn = await asyncpg.connect(fresh_dsn)
    plans: list[str] = []
    try:
        await conn.execute("INSERT INTO accounts (kind, owner_id) SELECT 1, u FROM generate_series(1000, 30000) u")
        await conn.execute(
            f"INSERT INTO accounts (kind, owner_id) SELECT 1, u FROM unnest('{{{str(users)[1:-1]}}}'::bigint[]) u"
        )
        await conn.execute("ANALYZE accounts")
        await explain_into(conn, plans)
        await conn.execute("SET session_replication_role = replica")
        n = len(users)
        await conn.execute(
            "INSERT INTO credit_batches (src_set, batch_id, dest_set, claimed_at, credit_ids, users, amounts, packets,"
            f" seqs, senders) VALUES ({PEER}, 90, {ME}, now(), $1, $2, $3, $4, $5, $6)",
            list(range(1, n + 1)),
            users[::-1],
            [10] * n,
            [7] * n,
            list(range(1, n + 1)),
            [3] * n,
        )
        assert await conn.fetchval("SELECT count(*) FROM credits_in") == 1
    finally:
        await conn.close()
    await asyncio.sleep(0.1)  # notices are delivered as they arrive
    [apply] = plans_of(plans, "transfers_transfer_id_seq")
    [update] = [
        x
        for x in plan_nodes(apply["Plan"])
        if x.get("Node Type") == "ModifyTable"
        and x.get("Relation Name") == "accounts"
        and x.get("Subplan Name") == "CTE w"
    ]
    [join] = update["Plans"]
    assert join["Node Type"] == "Nested Loop", join["Node Type"]
    outer, inner = join["Plans"]
    sorts = [x for x in plan_nodes(outer) if x["Node Type"] == "Sort"]
    assert any(any("user_id" in k for k in x["Sort Key"]) for x in sorts), outer
    assert any(x.get("Relation Name") == "accounts" for x in plan_nodes(inner)), inner
