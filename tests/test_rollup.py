"""The append-only grab commit and the roll-up behind it (migration 0003).

A grab is durable (and acknowledged) once its claim row and its batch's
roll-up row commit; the roll-up moves the money into balances later,
exactly once. These tests hold the roll-up back, crash around it, fail
batches in the middle of a chain of batches in flight, and upgrade a
database from the schema before it. Every one ends with the audit."""

import asyncio
import os
import signal

import asyncpg
import pytest
from helpers import (
    ADMIN_TOKEN,
    APP_TOKEN,
    ROLLUP_LOCK_KEY,
    Anbao,
    Collector,
    assert_claims_match,
    database_at_version,
    explain_into,
    funded_users,
    grab_outcomes,
    plan_nodes,
    plans_of,
    refuse_batches_of,
)
from polling import eventually

from anbao.config import Limits
from anbao.storage import migrate as migrate_mod
from anbao.storage.audit import audit
from anbao_client import Client, wire


async def pending_claims(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT COALESCE(sum(cardinality(packets)), 0) FROM grab_rollups")
    finally:
        await conn.close()


async def test_a_grab_is_read_back_at_once_before_its_rollup(anbao):
    """Read-your-writes: with the background roll-up stopped, a user told OK
    sees the share in BALANCE, STATEMENT and RECEIVED, the packet shows the
    claim and its counters, and the money can be withdrawn and sent on."""
    await anbao.worker.stop_rollup()
    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 10_000)
    users = await funded_users(admin, 10, 4)
    sent = await admin.send(sender, 1_000, 4)
    won = {u: await admin.grab(sent.packet_id, u) for u in users[:3]}
    assert await pending_claims(anbao.dsn) == 3, "the claims must still wait for their roll-up"
    report = await anbao.assert_audit_clean()
    assert report.counts["claims_awaiting_rollup"] == 3

    info = await admin.packet(sent.packet_id)
    assert (info.claimed_count, info.claimed_cents) == (3, sum(g.amount_cents for g in won.values()))
    assert sorted(c.user_id for c in info.claims) == sorted(won)
    sent_page = await admin.sent(sender)
    assert sent_page.items[0].claimed_count == 3

    u = users[0]
    assert await admin.balance(u) == won[u].amount_cents  # rolls up u's batch first
    page = await admin.statement(u)
    assert page.balance_cents == won[u].amount_cents
    assert [e.amount_cents for e in page.entries] == [won[u].amount_cents]
    received = await admin.received(users[1])
    assert [r.amount_cents for r in received.items] == [won[users[1]].amount_cents]
    # SEND and WITHDRAW spend what the grab brought in.
    await admin.withdraw(users[1], won[users[1]].amount_cents)
    assert await admin.balance(users[1]) == 0
    await admin.send(users[2], won[users[2]].amount_cents, 1, to_user=users[3])
    await anbao.assert_audit_clean()


@pytest.mark.parametrize("limits", [Limits.of(commit_slots=2, batch_max_grabs=8)])
async def test_a_failed_batch_fails_every_batch_built_on_it(anbao):
    """Batch N is refused at COMMIT while batch N+1, built on N's shares, is
    already in PostgreSQL on the other connection: N+1 must roll back too,
    so no share lands on top of one that never did, and nobody is told OK
    for a grab that is not durable. Once the fault is gone the packet sells
    out exactly, and every grab acknowledged before answers the same."""
    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 1_000_000)
    users = await funded_users(admin, 1000, 150)
    sent = await admin.send(sender, 20_000, 100)
    victim = users[3]
    conn = await asyncpg.connect(anbao.dsn)
    try:
        # The INSERT succeeds and the COMMIT fails, slowly, so the next batch
        # is in flight behind it all along.
        await refuse_batches_of(conn, victim, 0.3)
        engine = anbao.worker.engine
        out = Collector()
        for rid, u in enumerate(users[:16], 1):  # two full batches, decided in one tick
            engine.on_grab(out, rid, sent.packet_id, u)
        for _ in range(20):
            if len(engine._in_flight) == 2:
                break
            await asyncio.sleep(0)
        assert [len(b) for b in engine._in_flight] == [8, 8], "both batches must be in flight together"
        for _ in range(200):
            if len(out.frames) == 16:
                break
            await asyncio.sleep(0.01)
        assert {f.status for f in out.frames.values()} == {wire.Status.UNAVAILABLE}
        assert engine.failed_batches == 1 and engine.doomed_batches == 1
        assert await conn.fetchval("SELECT count(*) FROM claims_all WHERE packet_id = $1", sent.packet_id) == 0, (
            "the batch built on the failed one must not land"
        )
        await anbao.assert_audit_clean()

        # Over the network, with the fault still there: the victim's batches
        # keep failing, everything else lands, with no hole in the shares.
        clients = [await anbao.client("app") for _ in range(10)]
        won, other = await grab_outcomes(clients, sent.packet_id, users[:60])
        assert victim not in won and "unavailable" in other
        rows = await conn.fetch(
            "SELECT user_id, seq, amount_cents FROM claims_all WHERE packet_id = $1", sent.packet_id
        )
        assert sorted(r["seq"] for r in rows) == list(range(1, len(rows) + 1)), "a hole in the shares"
        assert {r["user_id"]: (r["seq"], r["amount_cents"]) for r in rows} == {
            u: (g.seq, g.amount_cents) for u, g in won.items()
        }
        await anbao.assert_audit_clean()

        await conn.execute("CREATE TABLE let_in ()")
        won2, other2 = await grab_outcomes(clients, sent.packet_id, users, retry_unavailable=True)
        assert len(won2) == 100 and other2.count("sold_out") == 50
        for user, g in won.items():
            assert (won2[user].seq, won2[user].amount_cents) == (g.seq, g.amount_cents)
        await assert_claims_match(anbao, sent.packet_id, won2, 100, 20_000)
    finally:
        await conn.close()
    await anbao.assert_audit_clean()


async def test_kill9_between_commit_and_rollup_rolls_up_exactly_once(fresh_dsn, tmp_path, tokens_file):
    """The roll-up is held back (its lock held by the test), grabs are
    acknowledged, then every process of the server is killed -9. After a
    restart each acknowledged grab is rolled up exactly once: one transfer
    each, balances equal to what was won, and a second restart adds nothing."""
    from served import Served

    holder = await asyncpg.connect(fresh_dsn)
    served = Served(fresh_dsn, tmp_path / "data", tokens_file, 2, []).start()
    try:
        admin = await Client.connect("127.0.0.1", served.port, ADMIN_TOKEN)
        (sender,) = await funded_users(admin, 1, 1, 1_000_000)
        users = await funded_users(admin, 100, 400)
        sent = await admin.send(sender, 77_777, 300)
        await holder.execute("SELECT pg_advisory_lock($1)", ROLLUP_LOCK_KEY)
        clients = [await Client.connect("127.0.0.1", served.port, APP_TOKEN) for _ in range(10)]
        won, other = await grab_outcomes(clients, sent.packet_id, users)
        assert len(won) == 300 and other.count("sold_out") == 100
        assert await pending_claims(fresh_dsn) == 300
        for c in [admin, *clients]:
            await c.close()
        for pid in [*served.run_info()["workers"].values(), served.proc.pid]:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        served.proc.wait(30)
        # Roll-ups the dead workers left waiting for the lock die with them.
        await holder.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'"
        )
        await holder.execute("SELECT pg_advisory_unlock($1)", ROLLUP_LOCK_KEY)
        assert await pending_claims(fresh_dsn) == 300, "nothing is rolled up while the lock is held"

        for restart in range(2):
            served = Served(fresh_dsn, tmp_path / "data", tokens_file, 2, []).start()
            try:
                for _ in range(200):
                    if await pending_claims(fresh_dsn) == 0:
                        break
                    await asyncio.sleep(0.05)
                assert await pending_claims(fresh_dsn) == 0
                transfers = await holder.fetchval("SELECT count(*) FROM transfers WHERE kind = 4")
                assert transfers == 300, f"restart {restart}: {transfers} grab transfers for 300 grabs"
                for user, g in won.items():
                    bal = await holder.fetchval(
                        "SELECT balance_cents FROM accounts WHERE kind = 1 AND owner_id = $1", user
                    )
                    assert bal == g.amount_cents
                report = await audit(fresh_dsn)
                assert report.ok, report.text()
            finally:
                served.stop()
    finally:
        if served.proc.poll() is None:
            served.stop(signal.SIGKILL)
        await holder.close()


async def test_upgrade_from_schema_v2_in_place(pg, tokens_file):
    """A database at schema v2, with grabs committed the old way (inside the
    batch commit), upgrades to v3 in place; the audit (of v3) holds after it,
    and the same packet then sells out through the new path."""
    dsn = await database_at_version(pg, f"v2_{os.getpid()}", 2)
    conn = await asyncpg.connect(dsn)
    try:
        # What a v2 server wrote: a sender's deposit and send, then one batch of grabs.
        await conn.execute("INSERT INTO accounts (kind, owner_id) SELECT 1, u FROM generate_series(1, 30) u")
        ext, wallet = 1, await conn.fetchval("SELECT account_id FROM accounts WHERE kind = 1 AND owner_id = 1")
        await conn.execute(
            "INSERT INTO transfers (kind, debit_account, credit_account, amount_cents) VALUES (1, $1, $2, 5000)",
            ext,
            wallet,
        )
        await conn.execute("UPDATE accounts SET balance_cents = -5000 WHERE account_id = $1", ext)
        await conn.execute("UPDATE accounts SET balance_cents = 5000 WHERE account_id = $1", wallet)
        packet_id = 1 << 10
        escrow = await conn.fetchval(
            "INSERT INTO accounts (kind, owner_id) VALUES (2, $1) RETURNING account_id", packet_id
        )
        await conn.execute(
            "INSERT INTO packets (packet_id, sender_id, escrow_account_id, total_cents, share_count,"
            " mode, min_share_cents, audience, expires_at) VALUES ($1, 1, $2, 1000, 10, 2, 1, 0,"
            " now() + interval '1 hour')",
            packet_id,
            escrow,
        )
        await conn.execute(
            "INSERT INTO transfers (kind, debit_account, credit_account, amount_cents, packet_id)"
            " VALUES (3, $1, $2, 1000, $3)",
            wallet,
            escrow,
            packet_id,
        )
        await conn.execute("UPDATE accounts SET balance_cents = balance_cents - 1000 WHERE account_id = $1", wallet)
        await conn.execute("UPDATE accounts SET balance_cents = 1000 WHERE account_id = $1", escrow)
        await conn.fetchval(
            "SELECT anbao_commit_grabs(7, $1, $2, $3, $4)", [packet_id] * 4, [1, 2, 3, 4], [2, 3, 4, 5], [100] * 4
        )
    finally:
        await conn.close()
    assert await migrate_mod.migrate(dsn) == migrate_mod.migrations()[-1][0]  # the newest, whatever its number
    after = await audit(dsn)
    assert after.ok, after.text()
    assert after.counts["claims"] == 4 and after.counts["claims_awaiting_rollup"] == 0

    server = Anbao(dsn, tokens_file, Limits())
    await server.start()
    try:
        clients = [await server.client("app") for _ in range(3)]
        won, other = await grab_outcomes(clients, packet_id, list(range(2, 31)))
        assert len(won) == 10 and other.count("sold_out") == 19
        assert [won[u].seq for u in (2, 3, 4, 5)] == [1, 2, 3, 4], "the v2 claims answer as landed"
        await assert_claims_match(server, packet_id, won, 10, 1000)
        await server.assert_audit_clean()
    finally:
        await server.stop()


async def test_sold_out_is_said_only_once_the_last_shares_are_durable(anbao):
    """Every share is taken, but the batch carrying the last ones fails at
    COMMIT: grabs decided meanwhile must not have been told SOLD_OUT (a
    refusal is final), since the shares come free again. They wait for the
    batch and get UNAVAILABLE (nothing moved); retried, they get shares."""
    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 100_000)
    users = await funded_users(admin, 100, 10)
    sent = await admin.send(sender, 5_000, 5)
    victim = users[4]
    conn = await asyncpg.connect(anbao.dsn)
    try:
        await refuse_batches_of(conn, victim, 0.2)
        engine = anbao.worker.engine
        out = Collector()
        for rid, u in enumerate(users[:5], 1):  # every share, in one batch that will fail
            engine.on_grab(out, rid, sent.packet_id, u)
        for _ in range(20):
            if engine._in_flight:
                break
            await asyncio.sleep(0)
        assert engine._in_flight, "the batch must be committing"
        for rid, u in enumerate(users[5:], 6):  # the packet looks sold out in memory now
            engine.on_grab(out, rid, sent.packet_id, u)
        assert not any(rid in out.frames for rid in range(6, 11)), "no refusal while shares are not durable"
        for _ in range(200):
            if len(out.frames) == 10:
                break
            await asyncio.sleep(0.01)
        assert {out.frames[rid].status for rid in range(1, 11)} == {wire.Status.UNAVAILABLE}
        await conn.execute("CREATE TABLE let_in ()")
        clients = [await anbao.client("app") for _ in range(3)]
        won, other = await grab_outcomes(clients, sent.packet_id, users[5:], retry_unavailable=True)
        assert len(won) == 5, "the shares came free again: the users held back get them"
        await assert_claims_match(anbao, sent.packet_id, won, 5, 5_000)
    finally:
        await conn.close()
    await anbao.assert_audit_clean()


async def test_the_rollup_backend_runs_at_a_lower_priority(anbao):
    """The roll-up's PostgreSQL backend (a process of this machine) runs at
    rollup_backend_nice, so its passes take only what the request path
    leaves; a remote PostgreSQL's is left alone."""
    import psutil

    from anbao.storage.commit import on_this_machine

    admin = await anbao.client("admin")
    (sender, user) = await funded_users(admin, 1, 2, 10_000)
    sent = await admin.send(sender, 100, 1)
    await admin.grab(sent.packet_id, user)
    roller = anbao.worker.roller
    for _ in range(100):  # bounded: 5 s
        if roller._conn is not None:
            break
        await asyncio.sleep(0.05)
    assert psutil.Process(roller._conn.get_server_pid()).nice() == anbao.limits.rollup.rollup_backend_nice
    assert on_this_machine(anbao.dsn) and on_this_machine("postgresql://u@127.0.0.1:5432/d")
    assert not on_this_machine("postgresql://u@db.example.com:5432/d")


async def test_balance_reads_a_batch_of_pending_grabs_only_where_its_bit_may_hold_the_user(fresh_dsn):
    """BALANCE adds a user's pending grabs, skipping a batch whose user_bits
    (migration 0017) has the user's bit clear: a user sharing a bit with a
    grabber (5 and 5 + USER_BITS) still gets only their own, a user with no
    grab none, and a batch written without bits (an older worker's) is read
    in full. The bits are those PostgreSQL's get_bit reads."""
    from anbao.config import CommitTuning
    from anbao.storage.accounts import BALANCE
    from anbao.storage.commit import USER_BITS, GrabCommitter

    users = [5, 5 + USER_BITS, 77, 2**40 + 3]
    conn = await asyncpg.connect(fresh_dsn)
    committer = GrabCommitter(fresh_dsn, 0, CommitTuning())
    try:
        await conn.execute("INSERT INTO accounts (kind, owner_id) SELECT 1, u FROM unnest($1::bigint[]) u", [*users, 9])
        assert await committer.commit(0, 1, [1] * 4, [1, 2, 3, 4], users, [100, 200, 300, 400], None)
        await conn.execute(
            "INSERT INTO grab_rollups (batch_id, worker_id, packet_ids, packets, seqs, users, amounts)"
            " VALUES (2, 0, '{2}', '{2}', '{1}', '{9}', '{50}')"
        )
        assert [await conn.fetchval(BALANCE, u) for u in [*users, 9]] == [100, 200, 300, 400, 50]
        assert await conn.execute("UPDATE grab_rollups SET users = '{10}' WHERE batch_id = 2") == "UPDATE 1"
        assert await conn.fetchval(BALANCE, 9) == 0
        held = await conn.fetchval(
            f"SELECT bool_and(get_bit(r.user_bits, (u & {USER_BITS - 1})::int) = 1)"
            " FROM grab_rollups r, unnest(r.users) u WHERE r.batch_id = 1"
        )
        set_bits = await conn.fetchval(
            f"SELECT count(*) FROM grab_rollups r, generate_series(0, {USER_BITS - 1}) k"
            " WHERE r.batch_id = 1 AND get_bit(r.user_bits, k) = 1"
        )
        assert held is True and set_bits == len({u & (USER_BITS - 1) for u in users}) == 3
    finally:
        await committer.close()
        await conn.close()


@pytest.mark.parametrize("limits", [Limits.of(rollup_vacuum_interval_ms=200)])
async def test_the_rollers_vacuum_the_queue_of_batches_they_empty(anbao):
    """grab_rollups is a queue (a row per batch, deleted by its roll-up):
    the rollers vacuum it themselves, since autovacuum comes by once a
    minute at best and every scan of it reads the dead rows meanwhile."""
    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 10_000)
    users = await funded_users(admin, 10, 6)
    for _ in range(3):
        sent = await admin.send(sender, 600, 6)
        for u in users:
            await admin.grab(sent.packet_id, u)
    conn = await asyncpg.connect(anbao.dsn)
    try:

        async def vacuumed() -> bool:
            # The counters are flushed a moment after the vacuum ends.
            return await conn.fetchval(
                "SELECT vacuum_count > 0 FROM pg_stat_user_tables WHERE relname = 'grab_rollups'"
            )

        await eventually(vacuumed, 15, "a roller's vacuum of grab_rollups", 0.2)
        assert anbao.worker.roller.vacuums >= 1
        assert await pending_claims(anbao.dsn) == 0
    finally:
        await conn.close()
    await anbao.assert_audit_clean()


async def test_batch_ids_follow_the_order_the_batches_were_built(fresh_dsn):
    """The sequencer places a worker's batches by id, so ids must follow the
    calls even when the first calls all wait for a block: before, each of
    them fetched a block of its own, and a batch built later could get the
    smaller id (its shares then came first in the event feed)."""
    from anbao.config import CommitTuning
    from anbao.storage.commit import BATCH_BLOCK_BITS, GrabCommitter

    committer = GrabCommitter(fresh_dsn, 0, CommitTuning())
    try:
        ids = await asyncio.gather(*(committer.next_batch_id(i % 2) for i in range(8)))
        ids += [await committer.next_batch_id(0) for _ in range(3)]
        assert ids == sorted(ids) and len(set(ids)) == len(ids), ids
        assert len({i >> BATCH_BLOCK_BITS for i in ids}) == 1, "one block for the first eleven"
    finally:
        await committer.close()


_TABLES = ("packets", "accounts", "claims", "transfers", "grab_rollups", "credit_batches")


async def test_the_rollup_updates_its_accounts_and_packets_in_lock_order(anbao):
    """The roll-up locks its accounts by the UPDATE that moves their money,
    so that UPDATE must reach them in (kind, owner) order, the order every
    writer that waits on accounts locks them in: a nested loop driven by
    the sorted list, never a hash or a merge join. The packets likewise, in
    packet id order. Read from the plans PostgreSQL runs (auto_explain),
    with enough accounts that the plan is the one a busy database gets, and
    few packets, as a new database has when its roll-up first plans; then
    the books."""
    await anbao.worker.stop_rollup()
    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 100_000)
    users = await funded_users(admin, 10, 30)
    sent = [await admin.send(sender, 3_000, 10) for _ in range(3)]
    for i, u in enumerate(users):
        await admin.grab(sent[i % 3].packet_id, u)
    assert await pending_claims(anbao.dsn) == 30
    conn = await asyncpg.connect(anbao.dsn)
    plans: list[str] = []
    try:
        await conn.execute("INSERT INTO accounts (kind, owner_id) SELECT 1, u FROM generate_series(10000, 40000) u")
        await conn.execute("ANALYZE accounts")
        await explain_into(conn, plans)
        assert await conn.fetchval("SELECT anbao_rollup(100, NULL, NULL, NULL, NULL)") == 30
    finally:
        await conn.close()
    # No statement of the roll-up hashes, merges or scans a whole table: its
    # cost follows the pass, not the tables.
    for plan in plans_of(plans, ""):
        for node in plan_nodes(plan["Plan"]):
            assert node.get("Node Type") not in ("Hash Join", "Merge Join"), plan
            assert not (node.get("Node Type") == "Seq Scan" and node.get("Relation Name") in _TABLES), plan
    for marker, table in (("unnest(acc_ids, acc_deltas)", "accounts"), ("unnest(pkt_ids, pkt_counts", "packets")):
        [update] = plans_of(plans, marker)
        [modify] = [n for n in plan_nodes(update["Plan"]) if n.get("Node Type") == "ModifyTable"]
        [join] = modify["Plans"]
        assert join["Node Type"] == "Nested Loop", (table, join["Node Type"])
        outer, inner = join["Plans"]
        assert outer["Node Type"] == "Function Scan", (table, outer)
        # An index scan, even on the three packets here: the plan made on
        # a small table is the one kept while it grows.
        assert inner.get("Relation Name") == table and inner["Node Type"] == "Index Scan", (table, inner)
    assert await pending_claims(anbao.dsn) == 0
    await anbao.assert_audit_clean()
