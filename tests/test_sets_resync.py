"""`anbao sets resync`: a lost replication slot, a resync while credits are
written, a dropped subscription; every credit applied once after each."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import asyncpg
import pytest
from helpers import ADMIN_TOKEN
from served import ANBAO
from sets_env import (
    _balances,
    _balances_grew,
    _cross_users,
    _directory_has,
    _drained_audit,
    _lose_slot,
    _storm_across,
    _subscription_health,
    _until,
    _value,
    two_sets_env,
)

from anbao.storage import embedded
from anbao.storage.sets import audit_when_drained
from anbao_client import SetCluster, home_set

pytestmark = pytest.mark.timeout(120)

two_sets = pytest.fixture(scope="module")(two_sets_env)


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
    described = "SELECT count(*) FROM credits_held WHERE packet_id = $1 AND sender_id = $2 AND claimed_at IS NOT NULL"
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

    # Credits as the grab commits send them (credit_batches, migration 0014),
    # not as the roll-up later copies them into credits_out: a credit rolled
    # up after the slot may have streamed, and been applied, long before it.
    newest = (
        "SELECT COALESCE(max(c), 0) FROM credit_batches b, unnest(b.credit_ids) c"
        " WHERE b.src_set = 0 AND b.dest_set = 1"
    )
    since = (
        "SELECT count(*) FROM credit_batches b, unnest(b.credit_ids) c"
        " WHERE b.src_set = 0 AND b.dest_set = 1 AND c > $1"
    )
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
