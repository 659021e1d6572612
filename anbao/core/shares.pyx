# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""How a packet's total becomes its shares, one draw per grab, and the
randomness the draws use. The modes are the protocol's (protocol.Mode);
tests/test_protocol_table.py checks C_MODE_* against it."""

from libc.stdint cimport int32_t, int64_t, uint64_t
from cpython.bytes cimport PyBytes_AS_STRING
import os

from anbao.core.codec cimport rd_u64

C_MODES = {"RANDOM": C_MODE_RANDOM, "FIXED": C_MODE_FIXED}


# ---------------------------------------------------------------- randomness

cdef inline uint64_t rotl(uint64_t x, int k) noexcept nogil:
    return (x << k) | (x >> (64 - k))


cdef class Rng:
    """xoshiro256** seeded from os.urandom: luck, not secrecy, is at stake
    (which share a user gets is already decided by arrival order)."""

    def __cinit__(self, seed=None):
        cdef bytes raw = os.urandom(32) if seed is None else int(seed).to_bytes(32, "little")
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(raw)
        cdef int i
        for i in range(4):
            self.s[i] = rd_u64(p + 8 * i) | 1  # never the all-zero state

    cdef uint64_t next(self) noexcept nogil:
        cdef uint64_t result = rotl(self.s[1] * 5, 7) * 9
        cdef uint64_t t = self.s[1] << 17
        self.s[2] ^= self.s[0]
        self.s[3] ^= self.s[1]
        self.s[1] ^= self.s[2]
        self.s[0] ^= self.s[3]
        self.s[2] ^= t
        self.s[3] = rotl(self.s[3], 45)
        return result

    cdef uint64_t below(self, uint64_t n) noexcept nogil:
        # Rejection keeps the draw unbiased for every n.
        cdef uint64_t threshold = (0 - n) % n
        cdef uint64_t r = self.next()
        while r < threshold:
            r = self.next()
        return r % n

    def randbelow(self, uint64_t n):
        assert n > 0
        return self.below(n)


# ---------------------------------------------------------------- splitting

cdef int64_t draw_share(int mode, int64_t total_cents, int32_t count, int64_t min_cents,
                        int64_t remaining_cents, int32_t remaining_count, Rng rng,
                        int64_t max_cents=0) except -1:
    """The next share: fixed mode gives total // count, the first
    total % count shares one cent more; random mode is WeChat's double-mean
    rule, a draw in [min, 2 x remaining mean] that leaves every later share at
    least min, the last share taking the rest.

    max_cents > 0 caps every share (Limits.max_share_cents, remembered by the
    packet): the draw is then in [max(min, remaining - max x (left - 1)),
    min(2 x mean, remaining - min x (left - 1), max)], so what is left can
    always be split into shares of at most max, the last one included. The
    interval is never empty while remaining <= max x left, which SEND
    guarantees (total <= count x max) and every draw keeps. In fixed mode
    the largest share is ceil(total / count) <= max by the same check.
    max_cents = 0 (packets from before the cap) draws exactly as before."""
    assert remaining_count >= 1 and remaining_cents >= min_cents * remaining_count
    assert max_cents == 0 or (max_cents >= min_cents and remaining_cents <= max_cents * remaining_count)
    cdef int64_t amount, upper, lower, seq
    if remaining_count == 1:
        amount = remaining_cents
    elif mode == C_MODE_FIXED:
        seq = count - remaining_count + 1
        amount = total_cents // count + (1 if seq <= total_cents % count else 0)
    else:
        upper = (remaining_cents * 2) // remaining_count
        if upper > remaining_cents - min_cents * (remaining_count - 1):
            upper = remaining_cents - min_cents * (remaining_count - 1)
        lower = min_cents
        if max_cents:
            if upper > max_cents:
                upper = max_cents
            if lower < remaining_cents - max_cents * (remaining_count - 1):
                lower = remaining_cents - max_cents * (remaining_count - 1)
        assert min_cents <= lower <= upper
        amount = lower + <int64_t>rng.below(<uint64_t>(upper - lower + 1))
    assert min_cents <= amount <= remaining_cents
    assert remaining_cents - amount >= min_cents * (remaining_count - 1)
    assert max_cents == 0 or (amount <= max_cents and remaining_cents - amount <= max_cents * (remaining_count - 1))
    return amount


def split(int mode, int64_t total_cents, int32_t count, int64_t min_cents=1, Rng rng=None, int64_t max_cents=0):
    """All shares of a packet in grab order, by the same rule GRAB uses
    (max_cents > 0: no share above it)."""
    if rng is None:
        rng = Rng()
    validate_split(mode, total_cents, count, min_cents, max_cents)
    cdef list shares = []
    cdef int64_t remaining = total_cents
    cdef int32_t left = count
    cdef int64_t a
    while left:
        a = draw_share(mode, total_cents, count, min_cents, remaining, left, rng, max_cents)
        shares.append(a)
        remaining -= a
        left -= 1
    assert remaining == 0
    return shares


def validate_split(int mode, int64_t total_cents, int32_t count, int64_t min_cents, int64_t max_cents=0):
    if mode != C_MODE_RANDOM and mode != C_MODE_FIXED:
        raise ValueError("mode must be random (1) or fixed (2)")
    if count < 1:
        raise ValueError("count must be at least 1")
    if min_cents < 1:
        raise ValueError("minimum share is at least 1 cent")
    if total_cents < min_cents * count:
        raise ValueError("total below count x minimum share")
    if max_cents < 0 or (max_cents and max_cents < min_cents):
        raise ValueError("maximum share is 0 (none) or at least the minimum share")
    if max_cents and total_cents > max_cents * count:
        raise ValueError("total above count x maximum share")


