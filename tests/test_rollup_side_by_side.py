"""Roll-ups side by side (storage/functions/anbao_rollup.sql).

Roll-ups used to run one at a time per database, under one advisory lock:
each waited for the whole pass of any other, and so did STATEMENT and
RECEIVED_LIST, which roll a user's batches up first. Now a roll-up locks
only what it takes (its batch rows, then accounts and packets in id order),
and the advisory key is taken shared, so only a credit apply excludes it.

Each test builds its pending batches through a real server while the test
holds the roll-up key (nothing rolls up), stops the server, and then rolls
up by hand from several connections. Every test ends with the audit."""

import asyncio
import random

import asyncpg
import pytest
from helpers import ROLLUP_LOCK_KEY, Anbao, funded_users, grab_outcomes

from anbao.config import Limits
from anbao.storage.audit import audit
from anbao.storage.commit import _ROLLUP


async def _pending_batches(anbao: Anbao, holder: asyncpg.Connection, groups: list[tuple[int, list[int]]], clients_n=4):
    """Per (first user id, n) group: a packet of n shares, grabbed by the n
    users of that group while the roll-up key is held. Returns the packet
    ids, with every batch still pending; the server is stopped after, and
    its roller's wait for the key ended."""
    admin = await anbao.client("admin")
    senders = await funded_users(admin, 1, len(groups), 10_000_000)
    packets, grabbers = [], []
    for sender, (first, n) in zip(senders, groups, strict=True):
        grabbers.append(await funded_users(admin, first, n))
        packets.append((await admin.send(sender, 1_000 * n, n)).packet_id)
    await holder.execute("SELECT pg_advisory_lock($1)", ROLLUP_LOCK_KEY)
    clients = [await anbao.client() for _ in range(clients_n)]
    won = 0
    for packet_id, users in zip(packets, grabbers, strict=True):
        got, _ = await grab_outcomes(clients, packet_id, users)
        won += len(got)
    assert won == sum(n for _, n in groups)
    await anbao.stop()
    # The server's roller may still wait for the key in a backend of its own.
    await holder.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND wait_event = 'advisory' AND pid <> pg_backend_pid()"
    )
    await holder.execute("SELECT pg_advisory_unlock($1)", ROLLUP_LOCK_KEY)
    return packets, grabbers


async def _books(dsn: str, claims: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM grab_rollups") == 0
        assert await conn.fetchval("SELECT count(*) FROM claims") == claims
        assert await conn.fetchval("SELECT count(*) FROM transfers WHERE kind = 4") == claims
    finally:
        await conn.close()
    report = await audit(dsn)
    assert report.ok, report.text()


async def test_two_workers_roll_up_at_once(anbao):
    """Worker 1's roll-up runs to its end while worker 0's is still open, on
    other packets and wallets: no lock of the whole database between them
    (before, the second waited for the first's commit)."""
    holder = await asyncpg.connect(anbao.dsn)
    a = await asyncpg.connect(anbao.dsn)
    b = await asyncpg.connect(anbao.dsn)
    try:
        (p0, p1), _ = await _pending_batches(anbao, holder, [(100, 20), (200, 20)])
        await holder.execute("UPDATE grab_rollups SET worker_id = 1 WHERE $1 = ANY(packet_ids)", p1)
        tr = a.transaction()
        await tr.start()
        assert await a.fetchval(_ROLLUP, 1000, None, None, 0, 2) == 20
        assert await asyncio.wait_for(b.fetchval(_ROLLUP, 1000, None, None, 1, 2), 10) == 20
        await tr.commit()
        await _books(anbao.dsn, 40)
    finally:
        for c in (a, b, holder):
            await c.close()


async def test_a_users_rollup_waits_for_the_batch_another_rollup_holds(anbao):
    """A user's roll-up (STATEMENT's settle) that meets a batch another
    roll-up holds waits for it, then finds it gone: never rolled up twice."""
    holder = await asyncpg.connect(anbao.dsn)
    a = await asyncpg.connect(anbao.dsn)
    c = await asyncpg.connect(anbao.dsn)
    try:
        _, (users,) = await _pending_batches(anbao, holder, [(100, 12)])
        tr = a.transaction()
        await tr.start()
        assert await a.fetchval(_ROLLUP, 1000, None, None, 0, 1) == 12
        settle = asyncio.ensure_future(c.fetchval(_ROLLUP, 1000, users[0], None, None, None))
        await asyncio.sleep(0.5)
        assert not settle.done(), "the user's batch is held by the open roll-up"
        await tr.commit()
        assert await asyncio.wait_for(settle, 10) == 0
        await _books(anbao.dsn, 12)
    finally:
        for conn in (a, c, holder):
            await conn.close()


@pytest.mark.parametrize("limits", [Limits.of(batch_max_grabs=4)])
async def test_rollups_side_by_side_on_shared_wallets_and_packets_never_deadlock(anbao):
    """Batches mixing three packets and the same grabbers, spread over three
    workers, rolled up two batches a pass by three workers' passes and by
    users' roll-ups at once: every claim rolled up once, no deadlock (it
    would raise), and the books add up."""
    holder = await asyncpg.connect(anbao.dsn)
    conns = [await asyncpg.connect(anbao.dsn) for _ in range(5)]
    try:
        admin = await anbao.client("admin")
        senders = await funded_users(admin, 1, 3, 10_000_000)
        users = await funded_users(admin, 100, 60)
        packets = [(await admin.send(s, 60_000, 60)).packet_id for s in senders]
        await holder.execute("SELECT pg_advisory_lock($1)", ROLLUP_LOCK_KEY)
        clients = [await anbao.client() for _ in range(6)]
        results = await asyncio.gather(*(grab_outcomes(clients, p, users) for p in packets))
        claims = sum(len(won) for won, _ in results)
        assert claims > 100
        await anbao.stop()
        await holder.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND wait_event = 'advisory' AND pid <> pg_backend_pid()"
        )
        await holder.execute("UPDATE grab_rollups SET worker_id = batch_id % 3")
        batches = await holder.fetchval("SELECT count(*) FROM grab_rollups")
        assert batches > 10, "enough batches for the passes to overlap"
        await holder.execute("SELECT pg_advisory_unlock($1)", ROLLUP_LOCK_KEY)
        rng = random.Random(7)

        async def worker_passes(conn, worker):
            while await conn.fetchval(_ROLLUP, 2, None, None, worker, 3):
                pass

        async def user_passes(conn):
            for _ in range(40):
                await conn.fetchval(_ROLLUP, 2, rng.choice(users), None, None, None)

        await asyncio.wait_for(
            asyncio.gather(
                *(worker_passes(conns[w], w) for w in range(3)), user_passes(conns[3]), user_passes(conns[4])
            ),
            60,
        )
        await _books(anbao.dsn, claims)
    finally:
        for conn in (*conns, holder):
            await conn.close()
