"""The one rule for how long a request may wait in a queue before a new one
is answered BUSY instead of joining it.

A count alone (max_handlers_per_operation, max_queued_grabs) bounds a
queue's length, not its wait: 512 SENDs wait 40 ms on a quiet machine and
seconds on a loaded one, and past the machine's capacity the queue simply
stays full while every request in it waits its whole length. This bounds
the wait. A new request is refused when all three hold:

- the queue holds at least `min_backlog` (a few slow requests, a held lock,
  an AUDIT, are not an overload);
- its oldest request has waited longer than `max_wait_ms` (evidence, not a
  forecast: a burst that has not waited yet is served, so a storm's first
  thousand grabs are never refused for arriving together);
- it holds more than it finished in any of the last three windows of
  `max_wait_ms` (so the newcomer, behind all of them, would wait longer
  than that too). Three, not one: batches finish in lumps (256 SENDs every
  40-80 ms), and one window that caught a single lump made a queue served
  at capacity look stalled: SEND alone with 512 in flight got 1,015 and
  6,865 of 20,000 SENDs BUSY, the second run at 4,151 SENDs/s instead of
  6,000-6,700.

What is admitted then waits about `max_wait_ms` at most, whatever the
offered load: twice the peak gets half its requests BUSY fast, and the
other half served in bounded time (CoDel's idea, a standing queue as the
signal, in the form Little's law gives a queue whose length is known).
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import HandlerTuning

# A decision stands this long: a queue's owner asks on every arrival past
# min_backlog (every grab, under load), and finding the oldest and reading
# the window costs a microsecond, a tenth of a grab. A bound of 100 ms
# decided a millisecond late is the same bound.
RECHECK_NS = 1_000_000


class WaitBound:
    """One queue's wait bound. The queue's owner reports what it finished
    (done) and asks before it admits (full); times are monotonic ns."""

    __slots__ = (
        "window_ns",
        "min_backlog",
        "_window_start_ns",
        "_done_now",
        "_done_before",
        "_done_before2",
        "_decided_until_ns",
        "_refusing",
        "refused",
    )

    def __init__(self, max_wait_ms: int, min_backlog: int):
        assert max_wait_ms > 0 and min_backlog > 0
        self.window_ns = max_wait_ms * 1_000_000
        self.min_backlog = min_backlog
        self._window_start_ns = 0
        self._done_now = 0  # finished since _window_start_ns
        self._done_before = 0  # finished in the window before it (0 if that was idle or long ago)
        self._done_before2 = 0  # and in the one before that
        self._decided_until_ns = 0  # the last decision stands until then (RECHECK_NS)
        self._refusing = False
        self.refused = 0  # STATS: requests answered BUSY by this bound

    @classmethod
    def of(cls, tuning: HandlerTuning) -> WaitBound:
        return cls(tuning.max_wait_ms, tuning.wait_bound_min_backlog)

    def _roll(self, now_ns: int) -> None:
        elapsed_ns = now_ns - self._window_start_ns
        if elapsed_ns >= self.window_ns:
            if elapsed_ns < 2 * self.window_ns:
                self._done_before2, self._done_before = self._done_before, self._done_now
            elif elapsed_ns < 3 * self.window_ns:  # one idle window between
                self._done_before2, self._done_before = self._done_now, 0
            else:
                self._done_before2 = self._done_before = 0
            self._done_now = 0
            self._window_start_ns = now_ns

    def done(self, count: int, now_ns: int) -> None:
        """`count` requests left the queue (answered, whatever the answer)."""
        self._roll(now_ns)
        self._done_now += count

    def full(self, backlog: int, now_ns: int, oldest_ns: Callable[[], int]) -> bool:
        """Whether a request arriving now must be refused, `backlog` waiting;
        oldest_ns() says since when the oldest of them waits. Counts the
        refusal."""
        if backlog < self.min_backlog:
            return False
        if now_ns >= self._decided_until_ns:
            self._decided_until_ns = now_ns + RECHECK_NS
            self._refusing = now_ns - oldest_ns() > self.window_ns and self._outruns(backlog, now_ns)
        if self._refusing:
            self.refused += 1
        return self._refusing

    def _outruns(self, backlog: int, now_ns: int) -> bool:
        self._roll(now_ns)
        return backlog > max(self._done_now, self._done_before, self._done_before2)
