"""The server's wall clock in milliseconds: the one clock expiry is decided
by, read by storage (what is expired, what a reader is shown) and by the
engine (when a packet's expiry falls). It imports nothing of anbao, so any
layer may use it."""

from __future__ import annotations

import time


def now_ms() -> int:
    return time.time_ns() // 1_000_000
