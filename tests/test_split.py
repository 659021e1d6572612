"""Share splitting: the sum is exact, every share at least the minimum, and
random mode keeps WeChat's double-mean bound — for any total and count."""

from hypothesis import given, settings
from hypothesis import strategies as st

from anbao import _fastpath
from anbao_client.protocol import Mode, Status

counts = st.integers(min_value=1, max_value=500)


@st.composite
def packets(draw):
    count = draw(counts)
    min_share_cents = draw(st.integers(min_value=1, max_value=50))
    total = draw(st.integers(min_value=count * min_share_cents, max_value=count * min_share_cents + 10**9))
    return total, count, min_share_cents, draw(st.integers(min_value=0, max_value=2**64 - 1))


@settings(max_examples=400, deadline=None)
@given(packets())
def test_random_mode_double_mean(p):
    total, count, min_share_cents, seed = p
    shares = _fastpath.split(Mode.RANDOM, total, count, min_share_cents, _fastpath.Rng(seed))
    assert len(shares) == count and sum(shares) == total
    remaining = total
    for i, s in enumerate(shares):
        left = count - i
        assert s >= min_share_cents
        if left > 1:
            assert s <= 2 * remaining // left, "share above twice the remaining mean"
            assert remaining - s >= min_share_cents * (left - 1), "a later share could not get the minimum"
        else:
            assert s == remaining, "the last share takes the rest"
        remaining -= s


@settings(max_examples=300, deadline=None)
@given(packets())
def test_fixed_mode_equal_shares_odd_cents_first(p):
    total, count, min_share_cents, _ = p
    shares = _fastpath.split(Mode.FIXED, total, count, min_share_cents)
    assert sum(shares) == total and len(shares) == count
    base, extra = divmod(total, count)
    assert shares == [base + 1] * extra + [base] * (count - extra)


@settings(max_examples=200, deadline=None)
@given(packets(), st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=200))
def test_packet_state_takes_each_share_once(p, users):
    """Whatever the order and repeats of grabbers, no user gets two shares,
    no more than count shares go out, and a sold-out packet gave its total."""
    total, count, min_share_cents, seed = p
    state = _fastpath.PacketState(1, 999, total, count, Mode.RANDOM, min_share_cents, 2**62)
    rng = _fastpath.Rng(seed)
    got = {}
    for u in users:
        status = state.take(u, 0, rng)
        if status == Status.OK:
            assert u not in got
            got[u] = state.last_amount_cents
        elif status == Status.ALREADY_CLAIMED:
            assert got[u] == state.last_amount_cents
        else:
            assert status == Status.SOLD_OUT and len(got) == count
    assert len(got) <= count
    assert sum(got.values()) == total - state.remaining_cents
    if len(got) == count:
        assert state.remaining_cents == 0


def test_rng_is_uniform_enough():
    rng = _fastpath.Rng(12345)
    n, buckets = 60_000, [0] * 6
    for _ in range(n):
        buckets[rng.randbelow(6)] += 1
    assert all(abs(b - n / 6) < 0.05 * n / 6 for b in buckets), buckets


def test_invalid_splits_rejected():
    import pytest

    for args in [(3, 100, 1, 1), (Mode.RANDOM, 9, 10, 1), (Mode.FIXED, 100, 0, 1), (Mode.FIXED, 100, 1, 0)]:
        with pytest.raises(ValueError):
            _fastpath.split(*args)
