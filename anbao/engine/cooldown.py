"""The grab cool-down: a user whose grabs keep being refused (NOT_ELIGIBLE,
ALREADY_CLAIMED: the signature of a script trying packets it may not open,
or hammering one it already opened) waits a while before a fresh grab.

Kept in memory by the owner worker, next to its packet states, so it costs
the grab path no round trip: `refused()` counts a refusal the owner gave,
`cooling_for_ms()` says whether a user is cooling down. A grab that would be
decided fresh is then answered COOLING_DOWN; a user who already holds a
share of the packet still gets ALREADY_CLAIMED with it (the engine asks the
packet first), so an acknowledged grab is never refused.

Counting is per owner worker: refusals decided by different workers (for
packets of different owners) are counted apart, and refusals a non-owner
answers from final knowledge (admission/cache.py) are not counted at all.
A window starts at a user's first refusal and lasts `cooldown_window_ms`;
`cooldown_refusals` of them within it start a cool-down of `cooldown_ms`
(config.ProductRules). Memory is bounded: each map holds at most
`cooldown_max_users_tracked` users, and when one is full the entries
that ended are dropped, then, if needed, the oldest quarter (forgetting
only lets someone off early).
"""

from __future__ import annotations

from ..config import ProductRules


class Cooldown:
    __slots__ = ("refusals", "window_ms", "cooldown_ms", "max_users", "until", "_strikes", "cooled")

    def __init__(self, rules: ProductRules):
        # Read on every refused grab: plain slots, not rules.x.
        self.refusals = rules.cooldown_refusals
        self.window_ms = rules.cooldown_window_ms
        self.cooldown_ms = rules.cooldown_ms
        self.max_users = rules.cooldown_max_users_tracked
        assert self.refusals >= 1 and self.window_ms > 0 and self.cooldown_ms > 0 and self.max_users > 0
        # user id -> the end of their cool-down (ms). The engine reads it
        # directly: an empty dict is the whole cost of a grab when nobody cools.
        self.until: dict[int, int] = {}
        self._strikes: dict[int, list[int]] = {}  # user id -> [window start ms, refusals in it]
        self.cooled = 0  # cool-downs started, for STATS

    def cooling_for_ms(self, user_id: int, now_ms: int) -> int:
        """How long this user still cools down (0: not cooling)."""
        end = self.until.get(user_id)
        if end is None:
            return 0
        if now_ms < end:
            return end - now_ms
        del self.until[user_id]
        return 0

    def refused(self, user_id: int, now_ms: int) -> None:
        """The owner refused this user a grab (NOT_ELIGIBLE, ALREADY_CLAIMED)."""
        strikes = self._strikes.get(user_id)
        if strikes is None or now_ms - strikes[0] >= self.window_ms:
            if strikes is None and len(self._strikes) >= self.max_users:
                self._make_room(self._strikes, lambda s: now_ms - s[0] >= self.window_ms)
            self._strikes[user_id] = [now_ms, 1]
            if self.refusals > 1:
                return
        else:
            strikes[1] += 1
            if strikes[1] < self.refusals:
                return
        del self._strikes[user_id]
        if user_id not in self.until and len(self.until) >= self.max_users:
            self._make_room(self.until, lambda end: end <= now_ms)
        self.until[user_id] = now_ms + self.cooldown_ms
        self.cooled += 1

    def _make_room(self, entries: dict, ended) -> None:
        for user_id in [u for u, v in entries.items() if ended(v)]:
            del entries[user_id]
        if len(entries) >= self.max_users:
            for user_id in list(entries)[: max(1, len(entries) // 4)]:  # insertion order: the oldest first
                del entries[user_id]

    @property
    def tracked(self) -> int:
        return len(self._strikes) + len(self.until)
