"""Two sets on this machine: two embedded PostgreSQL servers (wal_level =
logical) and two `anbao serve` groups, with money crossing sets through
PostgreSQL's logical replication (migration 0007, storage/sets.py). Faults
are real: kill -9 of a postmaster and of a worker by pid, a set's
PostgreSQL stopped and started again. Each fault lands at the step it names,
and the test asserts so before it strikes: the test holds a real lock the
product takes (a wallet row the apply updates, the roll-up's advisory
lock), so the stream stops at a known point with part of the credits
applied. After each run the cross-set audit (`anbao audit --topology`) must
find every credit applied exactly once, and every winner's wallet its share."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time

import asyncpg
import pytest
from helpers import ADMIN_TOKEN, APP_TOKEN, ROLLUP_LOCK_KEY, Raw
from served import ANBAO, Grabber, Served, eventually, free_port, storm

from anbao.config import Limits
from anbao.localsets import create_db
from anbao.server.sets import PEER_READER_NAME
from anbao.storage import embedded
from anbao.storage.migrate import migrate
from anbao.storage.sets import audit_when_drained, credit_batch_marker, wait_for_directory
from anbao_client import Client, InsufficientFunds, SetCluster, SetTopology, WrongSet, home_set, set_of, wire

pytestmark = pytest.mark.timeout(120)

DB = "anbao_sets"
DRAIN_TIMEOUT_S = 40


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Two PostgreSQL servers, each migrated as its set, then each set's
    `anbao serve` (one worker each: two cores hold both sets here)."""
    root = tmp_path_factory.mktemp("sets")
    pgs, dsns = [], {}
    pg_dirs = {s: tmp_path_factory.mktemp(f"set{s}pg") for s in (0, 1)}  # each its own (embedded's user)
    for s in (0, 1):
        server, base = embedded.start(pg_dirs[s], logical=True)
        pgs.append(server)
        asyncio.run(create_db(server.get_uri("postgres"), DB))
        dsns[s] = server.get_uri(DB)
    ports = {0: free_port(), 1: free_port()}
    topo_doc = {"sets": [{"id": s, "host": "127.0.0.1", "port": ports[s], "dsn": dsns[s]} for s in (0, 1)]}
    topo_file = root / "topology.json"
    topo_file.write_text(json.dumps(topo_doc))
    tokens = root / "tokens.json"
    tokens.write_text(
        json.dumps({"tokens": [{"scope": "admin", "token": ADMIN_TOKEN}, {"scope": "app", "token": APP_TOKEN}]})
    )
    tokens.chmod(0o600)
    for s in (0, 1):  # publications on both before any subscription
        asyncio.run(migrate(dsns[s]))
        out = subprocess.run(
            [*ANBAO, "migrate", "--topology", str(topo_file), "--set", str(s)], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stdout + out.stderr
    served = {}
    try:
        for s in (0, 1):
            served[s] = Served(
                None,
                root / f"run{s}",
                tokens,
                1,
                ["--topology", str(topo_file), "--set", str(s), "--admission", "in-process"],
                port=ports[s],
                metrics=True,
            ).start()
        yield {
            "topology": SetTopology.load(topo_file),
            "topology_file": topo_file,
            "dsns": dsns,
            "pg_dirs": pg_dirs,
            "served": served,
        }
    finally:
        for s in served.values():
            s.kill_everything()
        for server in pgs:
            embedded.stop_data_dir(server.pgdata.parent)


async def _users(sc: SetCluster, first: int, n: int, amount: int = 0) -> list[int]:
    ids = list(range(first, first + n))
    await sc.register(ids)
    if amount:
        await asyncio.gather(*(sc.deposit(u, amount) for u in ids))
    return ids


async def _balances(topo, users: list[int]) -> dict[int, int]:
    async with await SetCluster.connect(topo, ADMIN_TOKEN) as sc:
        return {u: await sc.balance(u) for u in users}


async def _directory_has(dsn: str, users: list[int], timeout_s: float = 20) -> None:
    """Waits until set `dsn` knows these users of the other set (replicated)."""
    short = await wait_for_directory({0: dsn}, {0: users}, timeout_s)
    assert short is None, f"the directory has {short[1]} of {len(users)} users after {timeout_s} s"


async def _drained_audit(dsns: dict[int, str], timeout_s: float = DRAIN_TIMEOUT_S):
    """The cross-set audit once every credit is applied and every batch
    rolled up; then every set's slots confirm all its WAL written by then:
    no subscription is stuck (say, on a credit sent again and refused as a
    duplicate), which nothing in flight alone would not show."""
    result, drained = await audit_when_drained(dsns, timeout_s, refund_grace_ms=600_000, poll_s=0.3)
    assert drained, "credits did not drain: " + (result.text() if result else "no audit")
    for s, dsn in dsns.items():
        conn = await asyncpg.connect(dsn)
        try:
            written = await conn.fetchval("SELECT pg_current_wal_lsn()")

            async def confirmed(conn=conn, written=written) -> bool:
                return await conn.fetchval(
                    "SELECT count(*) > 0 AND bool_and(confirmed_flush_lsn >= $1) FROM pg_replication_slots"
                    " WHERE slot_name LIKE 'anbao\\_%'",
                    written,
                )

            await eventually(confirmed, timeout_s, f"set {s}'s slots to confirm its WAL up to {written}", 0.2)
        finally:
            await conn.close()
    return result


async def _storm_across(env, sender: int, members: list[int], shares: int, fault=None, waves: int = 1):
    """A packet of `sender`'s set and a storm by `members` (homed in both
    sets) on that set's port; `fault(outcomes)` runs alongside. In `waves`
    > 1 storms one after another (each a slice of the members), so that
    the grabs commit in at least that many batches. Returns (packet id, won)."""
    topo = env["topology"]
    async with await SetCluster.connect(topo, ADMIN_TOKEN) as sc:
        sent = await sc.send(sender, 100 * shares, shares)
    home = set_of(sent.packet_id)
    assert home == home_set(sender, topo)
    port = topo.sets[home].port
    grabbers = [Grabber(port, APP_TOKEN, routed=True, timeout_ms=3000) for _ in range(4)]
    outcomes: list[str] = []
    deadline = time.monotonic() + 60
    wave = -(-len(members) // waves)

    async def in_waves():
        won: dict = {}
        for i in range(0, len(members), wave):
            left = max(1.0, deadline - time.monotonic())
            won.update((await storm(port, sent.packet_id, members[i : i + wave], grabbers, left, outcomes))[0])
        return won

    try:
        jobs = [in_waves()]
        if fault is not None:
            jobs.append(fault(outcomes))
        won = (await asyncio.gather(*jobs))[0]
    finally:
        for g in grabbers:
            await g.close()
    assert sorted(outcomes).count("gave_up") == 0, outcomes
    return sent.packet_id, won


async def test_grab_storm_by_members_of_both_sets_crosses_exactly_once(two_sets):
    env = two_sets
    topo, dsns = env["topology"], env["dsns"]
    async with await SetCluster.connect(topo, ADMIN_TOKEN) as sc:
        senders = await _users(sc, 1, 8, 1_000_000)
        members = await _users(sc, 1000, 400)
        sender0 = next(u for u in senders if home_set(u, topo) == 0)
        sender1 = next(u for u in senders if home_set(u, topo) == 1)
        by_set = {s: [u for u in members if home_set(u, topo) == s] for s in (0, 1)}
        assert len(by_set[0]) > 100 and len(by_set[1]) > 100
        await _directory_has(dsns[0], by_set[1])
        await _directory_has(dsns[1], by_set[0])
        before = {u: await sc.balance(u) for u in members}

    # A packet in each set, each grabbed by members of both sets.
    won_all: dict[int, int] = {}
    for sender in (sender0, sender1):
        packet_id, won = await _storm_across(env, sender, members, 300)
        assert len(won) == 300
        for u, g in won.items():
            won_all[u] = won_all.get(u, 0) + g.amount_cents

    result = await _drained_audit(dsns)
    assert result.ok, result.text()
    assert result.totals["credits_sent"] > 0 and result.totals["credits_in_flight"] == 0
    assert result.totals["suspense_cents"] == 0
    # Each credit delivered is one CROSS_SET_CREDIT event in its home set's
    # feed, written by the apply transaction that credited the wallet.
    credit_events = 0
    for dsn in dsns.values():
        conn = await asyncpg.connect(dsn)
        try:
            events, credits = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM event_log WHERE kind = 7),"
                " (SELECT count(*) FROM transfers WHERE kind = 7)"
            )
        finally:
            await conn.close()
        assert events == credits
        credit_events += events
        # Every credit left in its grab's commit (one credit_batches row per
        # batch and destination, migration 0014), none by the roll-up alone.
        conn = await asyncpg.connect(dsn)
        try:
            batched, alone, batches = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE in_batch), count(*) FILTER (WHERE NOT in_batch),"
                " (SELECT count(*) FROM credit_batches) FROM credits_out"
            )
        finally:
            await conn.close()
        assert batched > 0 and alone == 0 and 0 < batches < batched
    assert credit_events == result.totals["credits_sent"]
    async with await SetCluster.connect(topo, ADMIN_TOKEN) as sc:
        for u in members:
            assert await sc.balance(u) == before[u] + won_all.get(u, 0), u
        # A wallet is spendable once its credit is posted: withdraw a share
        # received from the other set, at the home set.
        cross = next(u for u in by_set[1] if u in won_all)
        await sc.withdraw(cross, 1)

    # A raw client at the wrong set gets the typed redirect, naming the set.
    r = await Raw.open(topo.sets[0].port)
    try:
        r.send(wire.balance(7, by_set[1][0]))
        [resp] = await r.answers(1)
        assert resp.status == wire.Status.WRONG_SET
        message, set_id, host, port = wire.wrong_set(resp.body)
        assert (set_id, port) == (1, topo.sets[1].port) and "set 1" in message
    finally:
        r.close()
    c = await SetCluster.connect(topo, ADMIN_TOKEN)
    try:
        with pytest.raises(WrongSet) as e:
            await c.clusters[0].deposit(by_set[1][0], 5)
        assert e.value.set_id == 1
        assert await c.deposit(by_set[1][0], 5)  # SetCluster routes it home
    finally:
        await c.close()

    # The CLI's cross-set audit agrees.
    out = subprocess.run(
        [*ANBAO, "audit", "--topology", str(env["topology_file"]), "--json"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads(out.stdout)
    assert doc["ok"] and doc["totals"]["credits_in_flight"] == 0


async def _row(dsn: str, sql: str, *args):
    """One row of one query, on a connection of its own."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchrow(sql, *args)
    finally:
        await conn.close()


async def _cross_users(env, first: int, n: int, funds: int = 1_000_000) -> tuple[int, list[int]]:
    """Registers users first.. first+n-1 at their home sets (and a few
    funded senders below them); returns a sender homed in set 0 and the
    users homed in set 1, once set 0's directory knows them."""
    topo = env["topology"]
    async with await SetCluster.connect(topo, ADMIN_TOKEN) as sc:
        senders = await _users(sc, first - 10, 10, funds)
        members = await _users(sc, first, n)
    ones = [u for u in members if home_set(u, topo) == 1]
    await _directory_has(env["dsns"][0], ones)
    return next(u for u in senders if home_set(u, topo) == 0), ones


_CREDITS_SQL = "SELECT count(*) FROM credits_out WHERE src_set = 0 AND dest_set = 1 AND packet_id = ANY($1)"


async def _written(dsns: dict[int, str], packets: list[int]) -> int:
    """How many credits of these packets of set 0 set 0 has written (rolled up)."""
    return (await _row(dsns[0], _CREDITS_SQL, packets))[0]


async def _credits(dsns: dict[int, str], packets: list[int]) -> tuple[int, int]:
    """(credits of these packets of set 0 that set 0 has written, those set 1 has applied)."""
    applied = (await _row(dsns[1], _CREDITS_SQL + " AND applied_transfer_id IS NOT NULL", packets))[0]
    return await _written(dsns, packets), applied


async def _written_all(dsns: dict[int, str], packets: list[int], n: int) -> None:
    async def done() -> bool:
        return await _written(dsns, packets) == n

    await eventually(done, DRAIN_TIMEOUT_S, f"set 0 to write the {n} credits (roll up)")


async def _assert_paid_once(dsns: dict[int, str], won: dict) -> None:
    """Each winner's wallet at set 1 (registered with nothing) holds exactly its share."""
    conn = await asyncpg.connect(dsns[1])
    try:
        rows = await conn.fetch(
            "SELECT owner_id, balance_cents FROM accounts WHERE kind = 1 AND owner_id = ANY($1)", list(won)
        )
    finally:
        await conn.close()
    assert {r[0]: r[1] for r in rows} == {u: g.amount_cents for u, g in won.items()}


def _kill_postmaster(pg_dir) -> None:
    """kill -9 of the postmaster on pg_dir; returns once it is gone."""
    pm = embedded.postmaster(pg_dir.resolve() / "pgdata")
    assert pm is not None
    os.kill(pm.pid, signal.SIGKILL)
    pm.wait(10)


class _ApplyHeld:
    """What _apply_held_mid_stream set up: the packets, their winners (all
    homed in set 1), and the credits set 1 has committed while its apply waits."""

    def __init__(self, holder, packets, won, applied):
        self.holder, self.packets, self.won, self.applied = holder, packets, won, applied

    def release(self) -> None:
        self.holder.terminate()  # its transaction ends with its backend (or its server)


@contextlib.asynccontextmanager
async def _rollup_held(dsn: str):
    """Holds every roll-up of the set at `dsn` back (its lock) until exit."""
    holder = await asyncpg.connect(dsn)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", ROLLUP_LOCK_KEY)
        yield holder
    finally:
        await holder.close()


@contextlib.asynccontextmanager
async def _apply_held_mid_stream(env, first: int, n: int = 1400):
    """Set 0's credits of two packets, grabbed by set 1's users, held in the
    middle of set 1's apply. The test holds one winner's wallet row at set
    1 (SELECT ... FOR UPDATE). Each grab batch's commit at set 0 sends its
    credits for set 1 as one credit batch (migration 0014), applied at set
    1 in one transaction; the one carrying the held winner waits for the
    test, and the batches after it queue behind it. Asserts that this is so
    before yielding: set 1's apply worker is blocked by the test, and set 1
    has committed exactly the credits of set 0's batches before the held
    one (the whole first packet among them), none of the rest."""
    dsns = env["dsns"]
    sender0, ones = await _cross_users(env, first, n)
    first_half, second_half = ones[: len(ones) // 2], ones[len(ones) // 2 :]
    held_user = second_half[len(second_half) // 3]
    holder = await asyncpg.connect(dsns[1])
    try:
        await holder.execute("BEGIN")
        assert await holder.fetchval(
            "SELECT account_id FROM accounts WHERE kind = 1 AND owner_id = $1 FOR UPDATE", held_user
        )
        # every one wins: as many shares as grabbers
        packet1, won = await _storm_across(env, sender0, first_half, len(first_half))
        packet2, won2 = await _storm_across(env, sender0, second_half, len(second_half))
        won.update(won2)
        assert len(won) == len(ones)
        packets = [packet1, packet2]
        await eventually(
            lambda: _row(
                dsns[1],
                "SELECT 1 FROM pg_stat_activity a WHERE a.backend_type = 'logical replication apply worker'"
                " AND $1 = ANY(pg_blocking_pids(a.pid))",
                holder.get_server_pid(),
            ),
            DRAIN_TIMEOUT_S,
            "set 1's apply to wait on the held wallet",
        )
        # Set 0's credits for these packets in the batches before the held one (one worker: commit order).
        (committed_before,) = await _row(
            dsns[0],
            "SELECT count(*) FROM credit_batches b CROSS JOIN LATERAL unnest(b.packets) AS p(packet_id)"
            " WHERE b.src_set = 0 AND b.dest_set = 1 AND p.packet_id = ANY($1) AND b.batch_id <"
            " (SELECT h.batch_id FROM credit_batches h WHERE h.src_set = 0 AND h.dest_set = 1"
            "  AND $2 = ANY(h.packets) AND $3 = ANY(h.users))",
            packets,
            packet2,
            held_user,
        )
        await asyncio.sleep(0.5)  # nothing behind the held batch gets through
        (applied,) = await _row(dsns[1], _CREDITS_SQL + " AND applied_transfer_id IS NOT NULL", packets)
        assert applied == committed_before and len(first_half) <= applied < len(won), (applied, committed_before)
        yield _ApplyHeld(holder, packets, won, applied)
    finally:
        holder.terminate()


async def test_receiving_postmaster_killed_mid_apply(two_sets):
    """kill -9 of set 1's postmaster while its apply worker is inside a
    transaction of credits (part of the stream applied, the rest queued at
    set 0); set 1 restarted: the rest is applied, each credit exactly once."""
    env = two_sets
    async with _apply_held_mid_stream(env, 200_000) as held:
        assert 0 < held.applied < len(held.won)
        _kill_postmaster(env["pg_dirs"][1])
    await asyncio.to_thread(embedded.start, env["pg_dirs"][1], True)
    result = await _drained_audit(env["dsns"])
    assert result.ok, result.text()
    assert await _credits(env["dsns"], held.packets) == (len(held.won), len(held.won))
    await _assert_paid_once(env["dsns"], held.won)


async def test_receiving_postmaster_killed_while_credit_batches_stream(two_sets):
    """kill -9 of set 1's postmaster, unprompted, while a storm at set 0 by
    set 1's users streams credit batches (some applied, more arriving);
    set 1 restarted: every credit applied exactly once, every wallet exact."""
    env = two_sets
    dsns = env["dsns"]
    sender0, ones = await _cross_users(env, 500_000, 1200)
    killed: list[int] = []

    async def kill_mid_stream(outcomes) -> None:
        async def some_applied():
            (n,) = await _row(dsns[1], "SELECT count(*) FROM credit_batches WHERE src_set = 0 AND created_at > $1", t0)
            return n >= 3

        await eventually(some_applied, DRAIN_TIMEOUT_S, "set 1 to apply a few credit batches of the storm")
        (killed_at,) = await _row(dsns[1], "SELECT count(*) FROM credits_out WHERE src_set = 0")
        killed.append(killed_at)
        _kill_postmaster(env["pg_dirs"][1])

    (t0,) = await _row(dsns[0], "SELECT now()")
    packet_id, won = await _storm_across(env, sender0, ones, len(ones), fault=kill_mid_stream, waves=30)
    assert len(won) == len(ones) and killed
    (sent,) = await _row(
        dsns[0], "SELECT count(*) FROM credit_batches b WHERE b.src_set = 0 AND $1 = ANY(b.packets)", packet_id
    )
    assert sent > 3, "the storm's credits must leave in several batches"
    await asyncio.to_thread(embedded.start, env["pg_dirs"][1], True)
    result = await _drained_audit(dsns)
    assert result.ok, result.text()
    assert await _credits(dsns, [packet_id]) == (len(won), len(won))
    await _assert_paid_once(dsns, won)


async def test_without_the_receivers_marker_credits_cross_one_by_one(two_sets):
    """A set sends credit batches only to a set that said its subscription
    receives them (storage/sets.py credit_batch_marker; a subscription made
    before the publisher's migration 0014 does not until refreshed). Without
    the marker, set 0's roll-up sends each credit as its own row, as before,
    and set 1 applies each once."""
    env = two_sets
    dsns = env["dsns"]
    sender0, ones = await _cross_users(env, 600_000, 300)
    marker = credit_batch_marker(0)
    (had,) = await _row(dsns[0], "SELECT count(*) FROM user_directory WHERE user_id = $1 AND home_set = 1", marker)
    assert had == 1, "set 1 told set 0 at start that it receives credit batches"
    await _row(dsns[0], "DELETE FROM user_directory WHERE user_id = $1 RETURNING 1", marker)
    try:
        packet_id, won = await _storm_across(env, sender0, ones, 100)
        await _written_all(dsns, [packet_id], 100)
    finally:
        await _row(dsns[0], "INSERT INTO user_directory (user_id, home_set) VALUES ($1, 1) RETURNING 1", marker)
    result = await _drained_audit(dsns)
    assert result.ok, result.text()
    assert await _credits(dsns, [packet_id]) == (100, 100)
    await _assert_paid_once(dsns, won)
    batched, alone = await _row(
        dsns[0],
        "SELECT count(*) FILTER (WHERE in_batch), count(*) FILTER (WHERE NOT in_batch) FROM credits_out"
        " WHERE packet_id = $1",
        packet_id,
    )
    assert (batched, alone) == (0, 100)


async def test_sending_postmaster_killed_mid_stream(two_sets):
    """kill -9 of set 0's postmaster while its walsender streams credits to
    set 1 (part applied, the rest written and not yet confirmed by the
    slot). Set 0 comes back with its slot behind what set 1 has applied
    (the slot's confirmed position is kept at checkpoints only): only set
    1's progress, committed with each apply, keeps those credits from being
    applied again. Then set 1's apply goes on: each credit exactly once."""
    env = two_sets
    dsns = env["dsns"]
    async with _apply_held_mid_stream(env, 300_000) as held:
        active, backlog = await _row(
            dsns[0],
            "SELECT active, pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint"
            " FROM pg_replication_slots WHERE slot_name = 'anbao_0_to_1'",
        )
        assert active and backlog > 0, (active, backlog)
        _kill_postmaster(env["pg_dirs"][0])
        await asyncio.to_thread(embedded.start, env["pg_dirs"][0], True)
        # (set 1's apply still waits on the held wallet: it cannot have reconnected)
        (confirmed,) = await _row(
            dsns[0], "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'anbao_0_to_1'"
        )
        (applied_to,) = await _row(
            dsns[1],
            "SELECT o.remote_lsn FROM pg_replication_origin_status o JOIN pg_subscription s"
            " ON o.external_id = 'pg_' || s.oid WHERE s.subname = 'anbao_from_set_0'",
        )
        assert confirmed < applied_to, f"set 0's slot came back at {confirmed}, set 1 has applied to {applied_to}"
    result = await _drained_audit(dsns)
    assert result.ok, result.text()
    assert await _credits(dsns, held.packets) == (len(held.won), len(held.won))
    await _assert_paid_once(dsns, held.won)


async def test_sending_worker_killed_mid_rollup(two_sets):
    """kill -9 of set 0's worker while its roll-up is writing a packet's
    credits: the test holds the roll-up lock, lets exactly one pass through
    (its credits written at set 0 and applied at set 1), then holds the
    next pass inside its transaction and kills the worker. Its replacement
    (and the dead worker's statement, still running in PostgreSQL) roll up
    the rest: each credit written and applied exactly once."""
    env = two_sets
    dsns = env["dsns"]
    sender0, ones = await _cross_users(env, 400_000, 1400)
    async with _rollup_held(dsns[0]) as holder:
        packet_id, won = await _storm_across(env, sender0, ones, len(ones), waves=40)
        assert len(won) == len(ones)
        batches = await holder.fetchval("SELECT count(*) FROM grab_rollups WHERE $1 = ANY(packet_ids)", packet_id)
        assert batches > Limits().rollup_batches_per_pass, "the roll-up must take several passes"

        async def roller_waits() -> bool:
            return bool(
                await holder.fetchval(
                    "SELECT count(*) FROM pg_locks l WHERE l.locktype = 'advisory' AND NOT l.granted"
                    " AND $1 = ANY(pg_blocking_pids(l.pid))",
                    holder.get_server_pid(),
                )
            )

        await eventually(roller_waits, 10, "set 0's roll-up to wait for the lock")
        await holder.execute("SELECT pg_advisory_unlock($1)", ROLLUP_LOCK_KEY)  # the roller has it
        await holder.execute("SELECT pg_advisory_lock($1)", ROLLUP_LOCK_KEY)  # once its pass committed
        await eventually(roller_waits, 10, "set 0's next roll-up pass to wait for the lock")

        async def first_pass_written():
            written, applied = await _credits(dsns, [packet_id])
            return (written, applied) if written > 0 and applied == len(won) else None

        # Every credit left with its grab's commit and is applied at set 1,
        # while set 0's roll-up has written only its first pass's.
        written, applied = await eventually(first_pass_written, DRAIN_TIMEOUT_S, "set 1 to apply every credit")
        assert 0 < written < len(won) and applied == len(won)
        served = env["served"][0]
        (victim,) = served.run_info()["workers"].values()
        os.kill(victim, signal.SIGKILL)
        await eventually(
            lambda: asyncio.to_thread(lambda: victim not in served.run_info()["workers"].values()),
            60,
            "set 0's supervisor to restart its worker",
        )
    result = await _drained_audit(dsns)
    assert result.ok, result.text()
    assert await _credits(dsns, [packet_id]) == (len(won), len(won))
    await _assert_paid_once(dsns, won)


async def test_receiver_stopped_for_a_while_its_backlog_drains(two_sets):
    """Set 1's PostgreSQL stopped while a storm goes on at set 0 (its
    credits queue in set 0's slot) and started again: the backlog drains,
    and every credit is applied exactly once."""
    env = two_sets
    dsns = env["dsns"]
    sender0, ones = await _cross_users(env, 5000, 1100)
    pg1 = env["pg_dirs"][1]
    await asyncio.to_thread(embedded.pg_ctl_stop, pg1)
    try:
        packet_id, won = await _storm_across(env, sender0, ones, 400)
        assert len(won) == 400
        await _written_all(dsns, [packet_id], 400)
    finally:
        await asyncio.to_thread(embedded.start, pg1, True)
    result = await _drained_audit(dsns)
    assert result.ok, result.text()
    assert result.totals["credits_applied"] == result.totals["credits_sent"]
    assert await _credits(dsns, [packet_id]) == (400, 400)
    await _assert_paid_once(dsns, won)


def test_demo_on_running_sets_of_a_topology_file(two_sets):
    """`anbao demo --topology FILE`: the demo across sets that already run."""
    out = subprocess.run(
        [
            *ANBAO,
            "demo",
            "--topology",
            str(two_sets["topology_file"]),
            "--token",
            ADMIN_TOKEN,
            "--members",
            "300",
            "--shares",
            "80",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads(out.stdout)
    away = sum(n for s, n in doc["winners_by_set"].items() if int(s) != doc["packet_set"])
    assert doc["shares_won"] == 80 and doc["audit_ok"] is True
    assert doc["cross_set_credits"] == away > 0 and doc["credits_match_winners"] is True
    for s in (0, 1):  # both groups still serve
        assert two_sets["served"][s].proc.poll() is None


async def _set_section(topo, s: int, ready=lambda sec: True, timeout_s: float = 30) -> dict:
    """Set `s`'s STATS "set" section, once `ready(section)` holds."""
    deadline = time.monotonic() + timeout_s
    c = await Client.connect(topo.sets[s].host, topo.sets[s].port, ADMIN_TOKEN)
    try:
        while True:
            section = (await c.stats())["set"]
            if section.get("read_at_ms") and ready(section):
                return section
            assert time.monotonic() < deadline, f"set {s}: STATS never showed it: {section}"
            await asyncio.sleep(0.2)
    finally:
        await c.close()


def _scrape_gauge(port: int, name: str, **labels) -> float | None:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def _backlog(section: dict, slot_name: str) -> int | None:
    return next((x["backlog_bytes"] for x in section["slots"] if x["slot_name"] == slot_name), None)


async def test_stats_and_metrics_show_each_sets_replication_and_the_backlog_moves(two_sets):
    """STATS at each set has a "set" section (its slots' backlog and
    wal_status, its subscription, its credits and those in flight to the
    other set), read in the background; the Prometheus endpoint has the
    same gauges. With set 1 stopped, set 0's slot for it keeps a growing
    backlog and its credits in flight are unknown; when set 1 is back, the
    backlog drains to 0 and nothing is in flight."""
    env = two_sets
    topo = env["topology"]
    for s in (0, 1):
        other = 1 - s
        # (a set whose PostgreSQL an earlier test restarted starts its apply worker again first)
        sec = await _set_section(topo, s, lambda x: bool(x["slots"]) and all(y["running"] for y in x["subscriptions"]))
        assert sec["set_id"] == s and sec["error"] == ""
        assert [x["slot_name"] for x in sec["slots"]] == [f"anbao_{s}_to_{other}"]
        assert sec["slots"][0]["wal_status"] in ("reserved", "extended")
        assert [x["subname"] for x in sec["subscriptions"]] == [f"anbao_from_set_{other}"]
        assert sec["subscriptions"][0]["running"] is True
        assert set(sec["credits"]) >= {"sent", "applied", "sent_cents", "applied_cents"}
        assert isinstance(sec["to_sets"][str(other)]["in_flight"], int)
    metrics_port = env["served"][0].metrics_port
    deadline = time.monotonic() + 10  # the worker flushes its gauges every second
    while _scrape_gauge(metrics_port, "anbao_set_slot_backlog_bytes", slot="anbao_0_to_1") is None:
        assert time.monotonic() < deadline, "no backlog gauge in the metrics"
        await asyncio.sleep(0.3)

    sender0, ones = await _cross_users(env, 91_000, 600)
    sent_before = (await _set_section(topo, 0))["credits"]["sent"]

    pg1 = env["pg_dirs"][1]
    await asyncio.to_thread(embedded.pg_ctl_stop, pg1)
    try:
        _, won = await _storm_across(env, sender0, ones, 200)
        assert len(won) == 200
        sec = await _set_section(
            topo,
            0,
            lambda x: (
                x["credits"]["sent"] >= sent_before + 200
                and (_backlog(x, "anbao_0_to_1") or 0) > 0
                and x["to_sets"]["1"]["in_flight"] is None
            ),
        )
        assert "unreachable" in sec["to_sets"]["1"]["error"]
        deadline = time.monotonic() + 10
        while (_scrape_gauge(metrics_port, "anbao_set_slot_backlog_bytes", slot="anbao_0_to_1") or 0) <= 0:
            assert time.monotonic() < deadline, "the backlog gauge never rose"
            await asyncio.sleep(0.3)
        assert _scrape_gauge(metrics_port, "anbao_set_credits_in_flight", dest_set="1") == -1
    finally:
        await asyncio.to_thread(embedded.start, pg1, True)
    sec = await _set_section(
        topo,
        0,
        lambda x: _backlog(x, "anbao_0_to_1") == 0 and x["to_sets"]["1"]["in_flight"] == 0,
        timeout_s=DRAIN_TIMEOUT_S,
    )
    assert sec["credits"]["sent"] >= sent_before + 200
    deadline = time.monotonic() + 10
    while _scrape_gauge(metrics_port, "anbao_set_credits_in_flight", dest_set="1") != 0:
        assert time.monotonic() < deadline, "the in-flight gauge never came back to 0"
        await asyncio.sleep(0.3)
    result = await _drained_audit(env["dsns"])
    assert result.ok, result.text()


async def test_balance_at_home_shows_what_other_sets_owe_until_it_arrives(two_sets):
    """BALANCE at the home set says what is posted and, apart, what another
    set owes the user and has not credited yet (the share is acknowledged
    there at once); WITHDRAW spends only what is posted; a set that cannot
    be asked is counted, not waited for; once the credits arrive they move
    from in flight into the balance, never counted twice."""
    env = two_sets
    topo, dsns = env["topology"], env["dsns"]
    async with await SetCluster.connect(topo, ADMIN_TOKEN) as sc:
        users = await _users(sc, 70_000, 40, 50_000)
        sender0 = next(u for u in users if home_set(u, topo) == 0)
        ones = [u for u in users if home_set(u, topo) == 1][:3]
        await _directory_has(dsns[0], ones)
        before = {u: await sc.balance_detail(u) for u in ones}
        assert all(b == wire.Balance(50_000, 0, 0) for b in before.values()), before

        conn1 = await asyncpg.connect(dsns[1])
        try:
            await conn1.execute("ALTER SUBSCRIPTION anbao_from_set_0 DISABLE")  # credits from set 0 wait
            sent = await sc.send(sender0, 9_000, 3, mode=wire.Mode.FIXED)
            won = {u: (await sc.grab(sent.packet_id, u)).amount_cents for u in ones}
            assert won == {u: 3_000 for u in ones}
            # At once (the grabs may still wait for set 0's roll-up), and after it wrote the credits.
            for _ in range(2):
                for u in ones:
                    assert await sc.balance_detail(u) == wire.Balance(50_000, 3_000, 0)
                deadline = time.monotonic() + 20
                conn0 = await asyncpg.connect(dsns[0])
                try:
                    while await conn0.fetchval("SELECT count(*) FROM grab_rollups") and time.monotonic() < deadline:
                        await asyncio.sleep(0.1)
                    assert await conn0.fetchval(
                        "SELECT count(*) FROM credits_out WHERE packet_id = $1", sent.packet_id
                    ) == len(ones)
                finally:
                    await conn0.close()
            with pytest.raises(InsufficientFunds):
                await sc.withdraw(ones[0], 50_001)

            # Set 0 hanging (its backends serving set 1 stopped), then down:
            # BALANCE at set 1 still answers, and says set 0 was not reached.
            conn0 = await asyncpg.connect(dsns[0])
            try:
                stopped = [
                    r["pid"]
                    for r in await conn0.fetch(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = $1", PEER_READER_NAME
                    )
                ]
                assert stopped, "set 1 holds no connection to set 0"
                for pid in stopped:
                    os.kill(pid, signal.SIGSTOP)
                try:
                    assert await sc.balance_detail(ones[0]) == wire.Balance(50_000, 0, 1)
                    assert await sc.balance_detail(ones[1]) == wire.Balance(50_000, 0, 1)  # not asked again
                finally:
                    for pid in stopped:
                        os.kill(pid, signal.SIGCONT)
            finally:
                await conn0.close()
            await asyncio.to_thread(embedded.pg_ctl_stop, env["pg_dirs"][0])
            try:
                assert await sc.balance_detail(ones[0]) == wire.Balance(50_000, 0, 1)
            finally:
                await asyncio.to_thread(embedded.start, env["pg_dirs"][0], True)
        finally:
            await conn1.execute("ALTER SUBSCRIPTION anbao_from_set_0 ENABLE")
            await conn1.close()

        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            now = {u: await sc.balance_detail(u) for u in ones}
            assert all(b.balance_cents + b.in_flight_cents in (53_000, 50_000) for b in now.values()), now
            if all(b == wire.Balance(53_000, 0, 0) for b in now.values()):
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"the credits did not arrive: {now}")
        # The home set lists the share won in set 0, with its sender and seq.
        seqs = []
        for u in ones:
            [share] = [x for x in (await sc.received(u)).items if x.packet_id == sent.packet_id]
            assert (share.sender_id, share.amount_cents) == (sender0, 3_000)
            assert share.claimed_at_ms > 0
            seqs.append(share.seq)
        assert sorted(seqs) == [1, 2, 3]
        assert (await sc.withdraw(ones[0], 53_000)).balance_cents == 0
    result = await _drained_audit(dsns)
    assert result.ok, result.text()


# ---------------------------------------------------------------- resync
# A slot lost past max_slot_wal_keep_size, and `anbao sets resync`
# (storage/resync.py): a new slot, the subscription re-created without
# copying data, the credits the receiver lacks backfilled, each applied once.

LOST_SLOT_TIMEOUT_S = 30


async def _until(dsn: str, sql: str, ok, what: str, *args, timeout_s: float = 20):
    """Polls `sql` (with `args`) on `dsn` until ok(value); returns the value."""
    deadline = time.monotonic() + timeout_s
    conn = await asyncpg.connect(dsn)
    try:
        while not ok(value := await conn.fetchval(sql, *args)):
            assert time.monotonic() < deadline, f"{what}: still {value!r} after {timeout_s} s"
            await asyncio.sleep(0.1)
        return value
    finally:
        await conn.close()


async def _value(dsn: str, sql: str, *args):
    """`sql`'s one value on `dsn`, read once."""
    return await _until(dsn, sql, lambda v: True, sql, *args)


async def _lose_slot(dsn: str, slot_name: str) -> None:
    """This server's max_slot_wal_keep_size made tiny (ALTER SYSTEM, reload),
    then WAL written past it (1 MB logical messages, pg_switch_wal,
    CHECKPOINT) until the slot, whose subscriber is down, is lost; the
    embedded setting is put back (a lost slot stays lost)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        await conn.execute("SELECT pg_reload_conf()")
        try:
            deadline = time.monotonic() + LOST_SLOT_TIMEOUT_S
            sql = "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1"
            while (status := await conn.fetchval(sql, slot_name)) != "lost":
                assert time.monotonic() < deadline, f"slot {slot_name} still {status}"
                await conn.execute("SELECT pg_logical_emit_message(false, 'anbao-test-filler', repeat('x', 1000000))")
                await conn.execute("SELECT pg_switch_wal()")
                await conn.execute("CHECKPOINT")
        finally:
            keep = embedded.LOGICAL_SETTINGS["max_slot_wal_keep_size"]
            await conn.execute(f"ALTER SYSTEM SET max_slot_wal_keep_size = '{keep}'")
            await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


async def _subscription_health(dsn: str, name: str) -> tuple:
    """(running, apply_error_count, sync_error_count) of subscription `name`."""
    conn = await asyncpg.connect(dsn)
    try:
        return tuple(
            await conn.fetchrow(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_subscription w WHERE w.subid = s.oid AND w.pid IS NOT NULL),"
                " st.apply_error_count, st.sync_error_count"
                " FROM pg_subscription s JOIN pg_stat_subscription_stats st ON st.subid = s.oid WHERE s.subname = $1",
                name,
            )
        )
    finally:
        await conn.close()


async def _balances_grew(topo, before: dict[int, int], won: dict[int, int]) -> None:
    assert await _balances(topo, list(before)) == {u: was + won.get(u, 0) for u, was in before.items()}


async def test_a_lost_slot_is_resynchronised_and_every_credit_applied_once(two_sets):
    """Set 1 down while set 0 takes grabs by set 1's users and registers
    users of its own; set 0's slot for set 1 is lost (max_slot_wal_keep_size
    made tiny, WAL written past it). With set 1 back, nothing arrives: the
    credits stay in flight. `anbao sets resync` says what it found,
    backfills exactly those credits and users, refuses a second run, and
    the audit across the sets is clean; new credits stream again."""
    env = two_sets
    topo, dsns, topo_file = env["topology"], env["dsns"], env["topology_file"]
    sender0, ones = await _cross_users(two_sets, 701_000, 700)
    before = await _balances(topo, ones)

    pg1 = env["pg_dirs"][1]
    await asyncio.to_thread(embedded.pg_ctl_stop, pg1)
    try:
        packet_id, won = await _storm_across(env, sender0, ones, 300)
        late = [u for u in range(205_000, 205_100) if home_set(u, topo) == 0]
        async with await SetCluster.connect(topo, ADMIN_TOKEN) as sc:
            await sc.register(late)
        await _until(dsns[0], "SELECT count(*) FROM grab_rollups", lambda n: n == 0, "set 0's roll-up")
        await _lose_slot(dsns[0], "anbao_0_to_1")
    finally:
        await asyncio.to_thread(embedded.start, pg1, True)

    # Set 1 is back, but nothing can stream from a lost slot.
    stuck, drained = await audit_when_drained(dsns, 8, refund_grace_ms=600_000, poll_s=0.5)
    assert not drained and stuck is not None
    assert stuck.totals["credits_in_flight"] == 300, stuck.totals
    assert {s["slot_name"]: s["wal_status"] for s in stuck.replication[0]["slots"]} == {"anbao_0_to_1": "lost"}

    out = subprocess.run(
        [*ANBAO, "sets", "resync", "--topology", str(topo_file), "--set", "1", "--from", "0", "--json"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads(out.stdout)
    assert doc["needs"] == ["slot anbao_0_to_1 at set 0 is lost (wal_removed)"], doc
    assert doc["credits_backfilled"] == 300 and doc["cents_backfilled"] == stuck.totals["credits_in_flight_cents"]
    assert doc["directory_backfilled"] == len(late) and doc["subscription_running"] is True

    # Twice: nothing needed, nothing done.
    again = subprocess.run(
        [*ANBAO, "sets", "resync", "--topology", str(topo_file), "--set", "1", "--from", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 3, again.stdout + again.stderr
    assert "nothing to resynchronise" in again.stderr and "running" in again.stderr

    result = await _drained_audit(dsns)
    assert result.ok, result.text()
    assert result.totals["credits_applied"] == result.totals["credits_sent"]
    await _directory_has(dsns[1], late)
    # Backfilled with every column the stream carries (RECEIVED_LIST's sender and claim time).
    described = "SELECT count(*) FROM credits_out WHERE packet_id = $1 AND sender_id = $2 AND claimed_at IS NOT NULL"
    assert await _value(dsns[1], described, packet_id, sender0) == 300
    await _balances_grew(topo, before, {u: g.amount_cents for u, g in won.items()})

    # The new slot streams: a storm's credits arrive by themselves.
    _, won2 = await _storm_across(env, sender0, ones, 100)
    result = await _drained_audit(dsns)
    assert result.ok, result.text()
    assert await _subscription_health(dsns[1], "anbao_from_set_0") == (True, 0, 0)
    audit = subprocess.run([*ANBAO, "audit", "--topology", str(topo_file)], capture_output=True, text=True, timeout=60)
    assert audit.returncode == 0, audit.stdout[-3000:]


async def test_resync_while_credits_are_written_applies_each_once(two_sets):
    """`--force` on a healthy link while set 0 keeps taking grabs by set 1's
    users (storms one after another, their roll-ups writing credits the
    whole time). Credits committed at set 0 after the new slot was made and
    before the backfill read them arrive twice, by the backfill and then by
    the stream: each is applied once (migration 0010), the apply never
    errs, and the audit across the sets is clean. The subscription had
    failover = true (DEPLOYMENT.md, PostgreSQL 17+): the new one and its new
    slot keep it."""
    from anbao.storage.resync import resync

    env = two_sets
    topo, dsns = env["topology"], env["dsns"]
    conn = await asyncpg.connect(dsns[1])
    try:
        for step in ("DISABLE", "SET (failover = true)", "ENABLE"):
            await conn.execute(f"ALTER SUBSCRIPTION anbao_from_set_0 {step}")
    finally:
        await conn.close()
    sender0, ones = await _cross_users(two_sets, 801_000, 300, 10_000_000)
    before = await _balances(topo, ones)

    won: dict[int, int] = {}
    stop = asyncio.Event()

    async def storms() -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            _, got = await _storm_across(env, sender0, ones, 40)
            for u, g in got.items():
                won[u] = won.get(u, 0) + g.amount_cents

    newest = "SELECT COALESCE(max(credit_id), 0) FROM credits_out WHERE src_set = 0 AND dest_set = 1"
    since = "SELECT count(*) FROM credits_out WHERE src_set = 0 AND dest_set = 1 AND credit_id > $1"
    marks: dict[str, int] = {}

    async def progress(stage: str, text: str) -> None:
        if stage == "slot_created":  # from here on, whatever commits at set 0 streams too
            marks["slot"] = await _value(dsns[0], newest)
        if stage == "subscribed":  # and some of it is committed before the backfill reads set 0
            marks["overlap"] = await _until(dsns[0], since, lambda n: n >= 30, "credits after the slot", marks["slot"])
        if stage == "enabled":
            marks["enabled"] = await _value(dsns[0], newest)

    first = await _value(dsns[0], newest)
    storming = asyncio.create_task(storms())
    try:
        await _until(dsns[0], newest, lambda n: n > first, "the storms' first credits")
        report = await resync(
            0, dsns[0], 1, dsns[1], topo.sets[0].subscription_dsn, force=True, batch=50, progress=progress
        )
        # Storms go on after the subscription is enabled: their credits stream.
        await _until(dsns[0], newest, lambda n: n >= marks["enabled"] + 30, "credits after the resync")
    finally:
        stop.set()
        await storming
    assert report.needs == [] and report.subscription_running, report
    assert report.found["subscription"]["failover"] and report.found["slot"]["failover"]
    failover = "SELECT subfailover FROM pg_subscription WHERE subname = 'anbao_from_set_0'"
    assert await _value(dsns[1], failover) is True
    failover = "SELECT failover FROM pg_replication_slots WHERE slot_name = 'anbao_0_to_1'"
    assert await _value(dsns[0], failover) is True
    # Committed after the slot, so streamed, and before the backfill read set
    # 0 (the subscription still disabled), so backfilled: at least 30 both ways.
    assert report.credits_backfilled >= marks["overlap"] >= 30, (marks, report)

    result = await _drained_audit(dsns)
    assert result.ok, result.text()
    assert result.totals["credits_applied"] == result.totals["credits_sent"]
    assert await _subscription_health(dsns[1], "anbao_from_set_0") == (True, 0, 0)
    await _balances_grew(topo, before, won)


async def test_resync_creates_a_dropped_subscription_and_refuses_bad_requests(two_sets):
    """Set 1's subscription dropped (its slot at set 0 with it) while set 0
    takes grabs by set 1's users: nothing holds those credits for set 1.
    `anbao sets resync` finds both missing, creates them and backfills the
    credits (the text report); a request naming one set twice, or a set not
    in the topology, is refused before anything is touched."""
    env = two_sets
    dsns, topo_file = env["dsns"], env["topology_file"]
    sender0, ones = await _cross_users(two_sets, 601_000, 300)
    conn = await asyncpg.connect(dsns[1])
    try:
        await conn.execute("DROP SUBSCRIPTION anbao_from_set_0")
    finally:
        await conn.close()
    _, won = await _storm_across(env, sender0, ones, 120)
    await _until(dsns[0], "SELECT count(*) FROM grab_rollups", lambda n: n == 0, "set 0's roll-up")

    resync = [*ANBAO, "sets", "resync", "--topology", str(topo_file)]
    for bad in (["--set", "1", "--from", "1"], ["--set", "1", "--from", "7"]):
        out = subprocess.run([*resync, *bad], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stdout + out.stderr
    out = subprocess.run([*resync, "--set", "1", "--from", "0"], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "slot anbao_0_to_1 missing at set 0" in out.stdout
    assert "subscription anbao_from_set_0 missing at set 1" in out.stdout
    assert "created subscription anbao_from_set_0" in out.stdout
    assert "resynchronised: 120 credits (120.00) backfilled" in out.stdout, out.stdout
    result = await _drained_audit(dsns)
    assert result.ok, result.text()
    assert result.totals["credits_applied"] == result.totals["credits_sent"]
    assert await _subscription_health(dsns[1], "anbao_from_set_0") == (True, 0, 0)


async def test_set_cluster_offers_every_operation_of_the_sdk(two_sets):
    """SetCluster has the operations every client has (issue 21): ping,
    the first set's event feed, SEND with its named options, and one
    AuditResult combining each set's."""
    topo = two_sets["topology"]
    async with await SetCluster.connect(topo, ADMIN_TOKEN) as sc:
        assert await sc.ping() == 0  # one worker in each set
        first = min(sc.clusters)
        users = await _users(sc, 95_000, 8, 10_000)
        sender = next(u for u in users if home_set(u, topo) == first)
        start = (await sc.events_page(0, limit=1)).head
        members = [u for u in users if u != sender][:4]
        sent = await sc.send(sender, 600, 2, mode=wire.Mode.FIXED, greeting="hi", members=members)
        assert set_of(sent.packet_id) == first

        async def sent_event() -> wire.Event:
            async for e in sc.events(after=start):
                if e.kind == wire.EventKind.SENT and e.packet_id == sent.packet_id:
                    return e
            raise AssertionError("the feed ended")

        event = await asyncio.wait_for(sent_event(), 20)
        assert (event.user_id, event.amount_cents, event.count) == (sender, 600, 2)
        audit = await sc.audit()
        each = [await c.audit() for c in sc.clusters.values()]
        assert isinstance(audit, wire.AuditResult)
        assert set(audit.checks) == {name for a in each for name in a.checks}
        assert set(audit.counts) == {name for a in each for name in a.counts}
