"""The server's wall clock in milliseconds: the one clock expiry is decided
by, read by storage (what is expired, what a reader is shown) and by the
engine (when a packet's expiry falls). It imports nothing of anbao, so any
layer may use it."""

from __future__ import annotations

import asyncio
import time


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Wakeup:
    """A flag a background task sleeps on, with a timeout.

    `asyncio.wait_for(event.wait(), t)` can lose a cancellation on Python
    3.11 when the event is set in the same turn as the task is cancelled
    (the cancel is swallowed and wait_for returns normally): a loop around
    it then never ends, and whoever awaits the cancelled task hangs. Here
    the sleeper awaits a plain future, whose cancellation always raises."""

    def __init__(self) -> None:
        self._set = False
        self._sleeper: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._set = True
        if self._sleeper is not None and not self._sleeper.done():
            self._sleeper.set_result(None)

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    async def wait(self, timeout_s: float) -> bool:
        """Until set or timeout_s passed; True when set."""
        if self._set:
            return True
        loop = asyncio.get_running_loop()
        sleeper: asyncio.Future[None] = loop.create_future()
        self._sleeper = sleeper

        def ring() -> None:
            if not sleeper.done():
                sleeper.set_result(None)

        timer = loop.call_later(timeout_s, ring)
        try:
            await sleeper
        finally:
            timer.cancel()
            self._sleeper = None
        return self._set
