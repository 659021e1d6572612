"""clock.Wakeup: the background tasks' timed sleep never loses a
cancellation (asyncio.wait_for on Event.wait() can, on Python 3.11, when
the event is set in the same turn: the event feed's sequencer then never
stopped, and Worker.stop hung in CI)."""

import asyncio

import pytest

from anbao.clock import Wakeup

pytestmark = pytest.mark.fast


async def _sleeper(w: Wakeup, rounds: list[int]) -> None:
    while True:  # the shape of the feed's and the roller's loops
        await w.wait(10.0)
        w.clear()
        rounds.append(1)


async def test_set_and_cancel_in_one_turn_still_cancels():
    for _ in range(200):
        w = Wakeup()
        rounds: list[int] = []
        task = asyncio.get_running_loop().create_task(_sleeper(w, rounds))
        await asyncio.sleep(0)  # asleep in w.wait
        w.set()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1)
        assert done and task.cancelled(), "the cancellation was lost"


async def test_it_wakes_when_set_and_times_out_when_not():
    w = Wakeup()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await w.wait(0.05) is False and loop.time() - t0 >= 0.04
    loop.call_later(0.01, w.set)
    t0 = loop.time()
    assert await w.wait(5.0) is True and loop.time() - t0 < 1.0
    assert await w.wait(5.0) is True, "still set until cleared"
