"""The request-rate ceiling per token: one token bucket per token per worker
process, in memory, taken from by the connection layer before a request is
dispatched or routed (so a limited GRAB is never decided: RATE_LIMITED says
nothing happened, retry after a pause).

A bucket holds at most `rate_limit_burst_requests` requests and refills at
`rate_limit_requests_per_s` (config.ProductRules); every
connection authenticated with the same token shares it, so one caller
cannot get past its ceiling by opening more connections on a worker. Peer
links (Scope.PEER, relays between workers) take no bucket: the request was
counted on the worker the client reached.
"""

from __future__ import annotations

from ..config import ProductRules


class TokenBucket:
    """`tokens` is read and taken from by the connection, one per request,
    after one refill() per read of the socket."""

    __slots__ = ("rate_per_s", "burst", "tokens", "at_s", "limited", "polls")

    def __init__(self, rate_per_s: float, burst: int, now_s: float):
        assert rate_per_s > 0 and burst >= 1
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self.tokens = float(burst)
        self.at_s = now_s
        self.limited = 0  # requests answered RATE_LIMITED
        self.polls = 0  # the token's EVENTS requests unanswered on this worker (long polls)

    def refill(self, now_s: float) -> None:
        if now_s > self.at_s:
            t = self.tokens + (now_s - self.at_s) * self.rate_per_s
            self.tokens = t if t < self.burst else self.burst
            self.at_s = now_s

    def take(self, now_s: float) -> bool:
        """One request, now: True if it may go on."""
        self.refill(now_s)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.limited += 1
        return False


class RateLimits:
    """The buckets of one worker process, one per token (tokens come from the
    token file, so their number is bounded by it)."""

    def __init__(self, rules: ProductRules):
        self.rate_per_s = rules.rate_limit_requests_per_s
        self.burst = rules.rate_limit_burst_requests
        self._buckets: dict[bytes, TokenBucket] = {}

    def bucket_for(self, token: bytes, now_s: float) -> TokenBucket:
        bucket = self._buckets.get(token)
        if bucket is None:
            bucket = self._buckets[token] = TokenBucket(self.rate_per_s, self.burst, now_s)
        return bucket

    @property
    def limited(self) -> int:
        return sum(b.limited for b in self._buckets.values())
