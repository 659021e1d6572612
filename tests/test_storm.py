"""Many grabbers, one packet: exactly `count` shares go out, nobody twice,
every acknowledged grab is in the database, and the ledger balances.
Every test here ends with the audit."""

import asyncio
import random

import asyncpg
from helpers import assert_claims_match, funded_users, grab_outcomes

from anbao_client import SoldOut, Unavailable
from anbao_client.errors import ConnectionLost, RequestTimeout


async def test_storm_1000_grabbers_100_shares(anbao):
    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 1_000_000)
    users = await funded_users(admin, 1000, 1000)
    sent = await admin.send(sender, 88_888, 100)
    clients = [await anbao.client("app") for _ in range(50)]
    random.shuffle(users)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    won, other = await grab_outcomes(clients, sent.packet_id, users)
    elapsed = loop.time() - t0
    print(
        f"storm: 1000 grabs in {elapsed * 1000:.0f} ms ({1000 / elapsed:.0f} grabs/s), "
        f"{anbao.worker.engine.commits} batch commits"
    )
    assert len(won) == 100 and other.count("sold_out") == 900
    assert sum(g.amount_cents for g in won.values()) == 88_888
    assert sorted(g.seq for g in won.values()) == list(range(1, 101))
    await assert_claims_match(anbao, sent.packet_id, won, 100, 88_888)
    for user in list(won)[:20]:
        assert await admin.balance(user) == won[user].amount_cents
    await anbao.assert_audit_clean()


async def test_storm_many_packets_at_once(anbao):
    """Grabs for 20 packets interleave in the same batches."""
    admin = await anbao.client("admin")
    senders = await funded_users(admin, 1, 20, 10_000)
    users = await funded_users(admin, 1000, 300)
    packets = [await admin.send(s, 1_000 + i, 10) for i, s in enumerate(senders)]
    clients = [await anbao.client("app") for _ in range(10)]
    results = await asyncio.gather(*(grab_outcomes(clients, p.packet_id, random.sample(users, 30)) for p in packets))
    for p, (won, other), i in zip(packets, results, range(20), strict=True):
        assert len(won) == 10 and other.count("sold_out") == 20
        await assert_claims_match(anbao, p.packet_id, won, 10, 1_000 + i)
    await anbao.assert_audit_clean()


async def test_restart_mid_storm_loses_nothing(anbao):
    """Stop the worker while grabs are in flight, start a new one on the same
    database, finish the packet: every acknowledged grab survives, and the
    new worker rebuilds the packet's state from the database."""
    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 1_000_000)
    users = await funded_users(admin, 1000, 600)
    sent = await admin.send(sender, 50_000, 300)
    clients = [await anbao.client("app") for _ in range(20)]
    first_wave = users[:400]
    won = {}

    async def grab(i, user):
        try:
            won[user] = await clients[i % 20].grab(sent.packet_id, user)
        except (SoldOut, ConnectionLost, RequestTimeout, Unavailable):
            pass

    tasks = [asyncio.ensure_future(grab(i, u)) for i, u in enumerate(first_wave)]
    while anbao.worker.engine.committed_grabs < 100:
        await asyncio.sleep(0.001)
    await anbao.stop()  # graceful: drains what it accepted, then closes
    await asyncio.gather(*tasks)
    acknowledged_before = dict(won)
    assert 100 <= len(acknowledged_before) <= 300
    await anbao.start()
    clients = [await anbao.client("app") for _ in range(20)]
    # Everyone retries (first wave included): a landed grab answers ALREADY_CLAIMED with the same share.
    won2, other = await grab_outcomes(clients, sent.packet_id, users)
    for user, g in acknowledged_before.items():
        assert (won2[user].seq, won2[user].amount_cents) == (g.seq, g.amount_cents)
    assert len(won2) == 300 and other.count("sold_out") == 300
    await assert_claims_match(anbao, sent.packet_id, won2, 300, 50_000)
    await anbao.assert_audit_clean()


async def test_failed_commit_answers_unavailable_and_recovers(anbao):
    """A batch that PostgreSQL refuses fails whole: its grabs are answered
    UNAVAILABLE, the owner reloads the packet, and retries then succeed."""
    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 100_000)
    users = await funded_users(admin, 1000, 200)
    sent = await admin.send(sender, 10_000, 100)
    conn = await asyncpg.connect(anbao.dsn)
    try:
        await conn.execute("""
            CREATE FUNCTION refuse_user_1050() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF 1050 = ANY(NEW.users) AND NOT EXISTS (SELECT 1 FROM pg_class WHERE relname = 'let_1050_in') THEN
                    RAISE EXCEPTION 'refused for the test';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse BEFORE INSERT ON grab_rollups FOR EACH ROW EXECUTE FUNCTION refuse_user_1050();""")
        clients = [await anbao.client("app") for _ in range(10)]
        won, other = await grab_outcomes(clients, sent.packet_id, users[:100])
        assert "unavailable" in other, "the refused batch must be answered UNAVAILABLE"
        assert anbao.worker.engine.failed_batches >= 1
        assert 1050 not in won
        await assert_db_agrees(anbao, sent.packet_id, won)
        await conn.execute("CREATE TABLE let_1050_in ()")
        won2, other2 = await grab_outcomes(clients, sent.packet_id, users, retry_unavailable=True)
        assert len(won2) == 100 and 1050 in won2 or len(won2) == 100
        for user, g in won.items():
            assert (won2[user].seq, won2[user].amount_cents) == (g.seq, g.amount_cents)
        await assert_claims_match(anbao, sent.packet_id, won2, 100, 10_000)
    finally:
        await conn.close()
    await anbao.assert_audit_clean()


async def assert_db_agrees(anbao, packet_id, won):
    conn = await asyncpg.connect(anbao.dsn)
    try:
        rows = await conn.fetch("SELECT user_id, seq, amount_cents FROM claims_all WHERE packet_id = $1", packet_id)
    finally:
        await conn.close()
    assert {r["user_id"]: (r["seq"], r["amount_cents"]) for r in rows} == {
        u: (g.seq, g.amount_cents) for u, g in won.items()
    }


async def test_commit_connection_killed_outcome_resolved_by_read_back(anbao):
    """The committer's backend is terminated again and again during a storm:
    some batches die before COMMIT, some maybe during it. Each is resolved
    by reading back its batch row, never by running it twice; every grab
    acknowledged is durable and nothing is given out twice."""
    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 1_000_000)
    users = await funded_users(admin, 1000, 4500)  # a storm long enough for several kills
    sent = await admin.send(sender, 345_678, 3000)
    clients = [await anbao.client("app") for _ in range(30)]
    killer_conn = await asyncpg.connect(anbao.dsn)
    stop = asyncio.Event()
    kills = 0

    async def killer():
        # Bounded: at most 25 kills, spaced so that batches also get through.
        nonlocal kills
        for _ in range(3000):
            if stop.is_set() or kills >= 25:
                return
            kills += await killer_conn.fetchval(
                # Any of the grab committers' backends, whatever it is doing:
                # inside its INSERT or COMMIT, idle in its transaction waiting
                # for the batch before it, or idle between batches.
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name LIKE 'anbao-grab-commit-%' AND pid <> pg_backend_pid()"
            )
            await asyncio.sleep(0.001 if kills == 0 else 0.005)

    k = asyncio.ensure_future(killer())
    try:
        won, other = await asyncio.wait_for(grab_outcomes(clients, sent.packet_id, users, retry_unavailable=True), 120)
    finally:
        stop.set()
        await k
        await killer_conn.close()
    print(f"killed the committer's backend {kills} times")
    assert kills >= 3, "the test must actually kill commits"
    assert len(won) == 3000 and other.count("sold_out") == 1500 and "gave_up" not in other
    await assert_claims_match(anbao, sent.packet_id, won, 3000, 345_678)
    await anbao.assert_audit_clean()
