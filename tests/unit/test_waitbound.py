"""engine/waitbound.py's rule on its own, with the clock given."""

from __future__ import annotations

from anbao.engine.waitbound import RECHECK_NS, WaitBound

MS = 1_000_000  # ns


def since(ns: int):
    return lambda: ns


def test_a_queue_below_its_least_backlog_is_never_refused():
    b = WaitBound(100, 64)
    assert not b.full(63, 10_000 * MS, since(0))  # waited ten seconds, but only 63 wait
    assert b.refused == 0


def test_a_burst_that_has_not_waited_past_the_bound_is_admitted():
    b = WaitBound(100, 64)
    assert not b.full(10_000, 100 * MS, since(0))  # exactly the bound: not past it
    assert b.full(10_000, 101 * MS, since(0))
    assert b.refused == 1


def test_a_queue_that_drains_within_the_bound_is_admitted():
    """Its oldest waited past the bound (one slow request), but the queue
    finished more than it holds in the last window: a newcomer waits less."""
    b = WaitBound(100, 64)
    b.done(500, 1_000 * MS)
    assert not b.full(400, 1_050 * MS, since(800 * MS))
    assert b.full(600, 1_060 * MS, since(800 * MS))


def test_the_drain_is_the_most_of_the_current_window_and_the_two_before():
    b = WaitBound(100, 64)
    b.done(300, 1_000 * MS)  # opens the window at 1,000 ms
    b.done(50, 1_150 * MS)  # next window: 300 in the one before
    assert not b.full(250, 1_160 * MS, since(0))
    assert b.full(350, 1_170 * MS, since(0))
    b.done(10, 1_260 * MS)  # a third window: 300 is two windows back, still counted
    assert not b.full(250, 1_270 * MS, since(0))
    b.done(10, 1_370 * MS)  # a fourth: the 300 is gone, 50 and 10 remain
    assert b.full(65, 1_380 * MS, since(0))
    # Three windows later with nothing finished: nothing is known to drain.
    assert b.full(65, 1_700 * MS, since(0))


def test_lumps_of_a_batched_queue_do_not_look_like_a_stall():
    """256 finish at once every 250 ms (one batch): a window of 100 ms that
    caught no lump, after one that did, is no stall; the queue of 250
    still drains within a window's wait. (One window only refused here.)"""
    b = WaitBound(100, 64)
    b.done(256, 1_000 * MS)
    assert not b.full(250, 1_105 * MS, since(0))  # the lump is in the window before
    assert not b.full(250, 1_245 * MS, since(0))  # an empty window since, the lump two back
    b.done(256, 1_250 * MS)
    assert not b.full(250, 1_360 * MS, since(0))
    assert b.refused == 0


def test_an_idle_gap_forgets_the_old_rate():
    b = WaitBound(100, 64)
    b.done(10_000, 1_000 * MS)
    assert not b.full(100, 1_050 * MS, since(0))
    assert b.full(100, 5_000 * MS, since(0))


def test_a_decision_stands_for_a_millisecond_and_each_refusal_counts():
    b = WaitBound(100, 64)
    asked = []

    def oldest():
        asked.append(1)
        return 0

    assert b.full(100, 500 * MS, oldest)
    assert b.full(100, 500 * MS + RECHECK_NS - 1, oldest)
    assert len(asked) == 1 and b.refused == 2
    b.done(1_000, 500 * MS + RECHECK_NS)
    assert not b.full(100, 500 * MS + RECHECK_NS, oldest)
    assert len(asked) == 2 and b.refused == 2
