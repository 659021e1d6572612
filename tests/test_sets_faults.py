"""Two sets under real faults: kill -9 of a postmaster and of a worker by
pid, a set's PostgreSQL stopped and started again, while credits cross.
Each fault lands at the step it names, and the test asserts so before it
strikes: the test holds a real lock the product takes (a wallet row the
apply updates, the roll-up's advisory lock), so the stream stops at a known
point with part of the credits applied. After each run every credit is
applied exactly once and every winner's wallet holds its share."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from helpers import ROLLUP_LOCK_KEY
from polling import eventually
from sets_env import (
    DRAIN_TIMEOUT_S,
    _apply_held_mid_stream,
    _assert_paid_once,
    _credits,
    _cross_users,
    _drained_audit,
    _kill_postmaster,
    _rollup_held,
    _row,
    _storm_across,
    _written_all,
    two_sets_env,
)

from anbao.config import Limits
from anbao.storage import embedded
from anbao.storage.sets import credit_batch_marker

pytestmark = pytest.mark.timeout(120)

two_sets = pytest.fixture(scope="module")(two_sets_env)


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
        (killed_at,) = await _row(dsns[1], "SELECT count(*) FROM credits_held WHERE src_set = 0")
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
        assert batches > Limits().rollup.rollup_batches_per_pass, "the roll-up must take several passes"

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
