"""What the two-set tests share (tests/test_sets*.py): the two sets on this
machine, two embedded PostgreSQL servers (wal_level = logical) and two
`anbao serve` groups, with money crossing sets through PostgreSQL's logical
replication (migration 0007, storage/sets.py), and the helpers that drive
and check them. Each test file makes its own pair, as a module fixture:
`two_sets = pytest.fixture(scope="module")(two_sets_env)`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time

import asyncpg
from helpers import ADMIN_TOKEN, APP_TOKEN, ROLLUP_LOCK_KEY
from polling import eventually
from served import ANBAO, Grabber, Served, free_port, storm

from anbao.localsets import create_db
from anbao.storage import embedded
from anbao.storage.migrate import migrate
from anbao.storage.sets import audit_when_drained, wait_for_directory
from anbao_client import SetCluster, SetTopology, home_set, set_of

DB = "anbao_sets"
DRAIN_TIMEOUT_S = 40


def two_sets_env(tmp_path_factory):
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


_CREDITS_SQL = "SELECT count(*) FROM credits_held WHERE src_set = 0 AND dest_set = 1 AND packet_id = ANY($1)"


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


LOST_SLOT_TIMEOUT_S = 30


async def _until(dsn: str, sql: str, ok, what: str, *args, timeout_s: float = 20):
    """Polls `sql` (with `args`) on `dsn` until ok(value); returns the value."""
    conn = await asyncpg.connect(dsn)

    async def probe():
        value = await conn.fetchval(sql, *args)
        return (value,) if ok(value) else None  # a tuple: a value of 0 or None may be the one awaited

    try:
        return (await eventually(probe, timeout_s, what, 0.1))[0]
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
