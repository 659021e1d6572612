"""The tests' one way to wait for something: `await eventually(probe, ...)`.

probe is a plain function or a coroutine function; it is called every
poll_s until it returns something true, which eventually returns. Past
timeout_s the test fails, naming what it waited for. Bounded always: a
test never waits on a condition without a deadline."""

from __future__ import annotations

import asyncio
import inspect
import time


async def eventually(probe, timeout_s: float = 10.0, what: str = "condition", poll_s: float = 0.01):
    assert timeout_s > 0 and poll_s > 0
    deadline = time.monotonic() + timeout_s
    while True:
        got = probe()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(poll_s)
