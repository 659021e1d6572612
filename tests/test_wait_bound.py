"""The wait bound (engine/waitbound.py, HandlerTuning.max_wait_ms): with
PostgreSQL stopped (SIGSTOP), the requests already waiting stay and are
served once it is back, and past max_wait_ms the next GRAB or BALANCE is
answered BUSY at once instead of joining them, while the count bounds
(max_queued_grabs, max_handlers_per_operation) are nowhere near; a burst
that has not waited is served whole; long polls are no backlog."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from helpers import Raw, funded_users
from polling import eventually
from served import Hung

from anbao.config import Limits
from anbao_client import wire
from anbao_client.wire import Op, Status

MAX_WAIT_MS = 100
MIN_BACKLOG = 8
WAITING = 12  # of each operation, stuck behind the stopped database
LATE = 5  # of each operation, sent once those have waited past the bound
BOUND = Limits.of(max_wait_ms=MAX_WAIT_MS, wait_bound_min_backlog=MIN_BACKLOG)


@pytest.mark.parametrize("limits", [BOUND])
async def test_a_stalled_database_gets_the_next_requests_busy_past_the_wait_bound(anbao, fresh_dsn):
    admin = await anbao.client("admin")
    users = await funded_users(admin, 1, 2 * WAITING + 2 * LATE + 1, 10_000)
    grabbers, readers = users[1 : 1 + WAITING + LATE], users[1 + WAITING + LATE :]
    sent = await admin.send(users[0], 100 * len(grabbers), len(grabbers), members=grabbers)
    raw = await Raw.open(anbao.port)
    try:
        async with Hung(fresh_dsn):
            raw.send(b"".join(wire.grab(100 + i, sent.packet_id, u) for i, u in enumerate(grabbers[:WAITING])))
            raw.send(b"".join(wire.balance(200 + i, u) for i, u in enumerate(readers[:WAITING])))

            async def all_waiting() -> bool:
                d = anbao.worker.dispatcher
                return anbao.worker.engine.queued_grabs == WAITING and d.in_progress(Op.BALANCE) == WAITING

            await eventually(all_waiting, what="the first requests waiting on the stopped database")
            await asyncio.sleep(2 * MAX_WAIT_MS / 1000)
            t0 = time.monotonic()
            raw.send(b"".join(wire.grab(300 + i, sent.packet_id, u) for i, u in enumerate(grabbers[WAITING:])))
            raw.send(b"".join(wire.balance(400 + i, u) for i, u in enumerate(readers[WAITING:])))
            late = await raw.answers(2 * LATE, timeout_s=5)
            answered_ms = (time.monotonic() - t0) * 1000
            assert sorted(r.request_id for r in late) == [*range(300, 300 + LATE), *range(400, 400 + LATE)], [
                (r.request_id, r.status, r.body) for r in late
            ]
            assert {r.status for r in late} == {Status.BUSY}, [(r.request_id, r.status) for r in late]
            print(f"{2 * LATE} late requests answered BUSY in {answered_ms:.1f} ms with the database stopped")
            stats = anbao.worker.stats()
            assert stats["busy_over_wait"] == 2 * LATE
            assert stats["queued_grabs"] == WAITING  # the waiting ones are kept, not refused
        served = await raw.answers(2 * WAITING, timeout_s=30)
    finally:
        raw.close()
    assert sorted(r.request_id for r in served) == [*range(100, 100 + WAITING), *range(200, 200 + WAITING)]
    assert {r.status for r in served} == {Status.OK}
    assert (await admin.packet(sent.packet_id)).claimed_count == WAITING
    await anbao.assert_audit_clean()


@pytest.mark.parametrize("limits", [BOUND])
async def test_a_burst_that_has_not_waited_is_served_whole(anbao):
    """200 grabs of one packet and 200 BALANCEs in one write each, far past
    the least backlog: nothing has waited past the bound when they arrive,
    so none is refused."""
    admin = await anbao.client("admin")
    users = await funded_users(admin, 1, 201, 100_000)
    sent = await admin.send(users[0], 100 * 200, 200, members=users[1:])
    raw = await Raw.open(anbao.port)
    try:
        raw.send(b"".join(wire.grab(1000 + i, sent.packet_id, u) for i, u in enumerate(users[1:])))
        raw.send(b"".join(wire.balance(2000 + i, u) for i, u in enumerate(users[1:])))
        got = await raw.answers(400, timeout_s=30)
    finally:
        raw.close()
    assert [r.status for r in got] == [Status.OK] * 400
    assert anbao.worker.stats()["busy_over_wait"] == 0
    await anbao.assert_audit_clean()


@pytest.mark.parametrize("limits", [Limits.of(max_wait_ms=50, wait_bound_min_backlog=2)])
async def test_long_polls_that_wait_by_design_are_no_backlog(anbao, fresh_dsn):
    """Four EVENTS polls held open well past max_wait_ms, nothing happening:
    a fifth poll and a BALANCE are still served (the polls have their own
    bounds, max_event_waiters), and a DEPOSIT wakes every poll."""
    admin = await anbao.client("admin")
    [user] = await funded_users(admin, 1, 1, 100)
    conn = await asyncpg.connect(fresh_dsn)
    try:
        unnumbered = "SELECT count(*) = 0 FROM event_log WHERE last_no IS NULL"
        await eventually(lambda: conn.fetchval(unnumbered), what="the set-up's events numbered")
    finally:
        await conn.close()
    head = (await admin.events_page(0, limit=1)).head
    polls = [asyncio.ensure_future(admin.events_page(head, wait_ms=10_000)) for _ in range(4)]
    try:
        await asyncio.sleep(4 * MAX_WAIT_MS / 1000)
        assert not any(p.done() for p in polls)
        fifth = asyncio.ensure_future(admin.events_page(head, wait_ms=10_000))
        assert await asyncio.wait_for(admin.balance(user), 5) == 100
        await admin.deposit(user, 1)
        for p in [*polls, fifth]:
            assert [e.user_id for e in (await asyncio.wait_for(p, 10)).events] == [user]
    finally:
        for p in polls:
            p.cancel()
    assert anbao.worker.stats()["busy_over_wait"] == 0
