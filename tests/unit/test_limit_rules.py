"""The limits of a payment product (issue 12 item 4) without a database: the
capped split (hypothesis), a packet state rebuilt mid-way under the same
cap, the cool-down's counting and its memory bound, the token bucket, and
the engine's cool-down answers (a holder is never refused, even while its
share is still committing)."""

import asyncio

import pytest
from fakes import Answers, FakeCommitter, FakeLedger, ticks
from hypothesis import given, settings
from hypothesis import strategies as st
from polling import eventually

from anbao import _fastpath
from anbao.config import CommitTuning, ProductRules
from anbao.engine.cooldown import Cooldown
from anbao.engine.grabs import GrabEngine
from anbao.server.ratelimit import RateLimits, TokenBucket
from anbao_client.protocol import Mode, Status

pytestmark = pytest.mark.fast


@st.composite
def capped_packets(draw):
    count = draw(st.integers(min_value=1, max_value=400))
    min_share_cents = draw(st.integers(min_value=1, max_value=20))
    max_share_cents = draw(
        st.integers(min_value=min_share_cents, max_value=min_share_cents + draw(st.sampled_from([0, 3, 100, 10**6])))
    )
    # From the least a packet may hold to the most the cap allows, the tight ends included.
    total = draw(
        st.one_of(
            st.just(count * min_share_cents),
            st.just(count * max_share_cents),
            st.integers(min_value=count * min_share_cents, max_value=count * max_share_cents),
        )
    )
    return total, count, min_share_cents, max_share_cents, draw(st.integers(min_value=0, max_value=2**64 - 1))


@settings(max_examples=500, deadline=None)
@given(capped_packets())
def test_random_split_never_exceeds_the_cap_and_sums_to_the_total(p):
    total, count, min_share_cents, max_share_cents, seed = p
    shares = _fastpath.split(Mode.RANDOM, total, count, min_share_cents, _fastpath.Rng(seed), max_share_cents)
    assert len(shares) == count and sum(shares) == total
    assert all(min_share_cents <= s <= max_share_cents for s in shares), "a share outside [min, max]"
    remaining = total
    for i, s in enumerate(shares):
        left = count - i
        if left > 1:
            assert s <= 2 * remaining // left, "the double-mean bound still holds"
        remaining -= s


@settings(max_examples=200, deadline=None)
@given(capped_packets())
def test_fixed_split_never_exceeds_the_cap(p):
    total, count, min_share_cents, max_share_cents, _ = p
    shares = _fastpath.split(Mode.FIXED, total, count, min_share_cents, None, max_share_cents)
    assert sum(shares) == total and max(shares) == -(-total // count) <= max_share_cents


def test_a_total_the_cap_cannot_split_is_refused():
    with pytest.raises(ValueError, match="maximum share"):
        _fastpath.validate_split(Mode.RANDOM, 1001, 2, 1, 500)
    with pytest.raises(ValueError, match="maximum share"):
        _fastpath.PacketState(1, 9, 1001, 2, Mode.FIXED, 1, 2**62, max_share_cents=500)
    _fastpath.validate_split(Mode.RANDOM, 1000, 2, 1, 500)  # exactly count x max: every share is the max
    assert _fastpath.split(Mode.RANDOM, 1000, 2, 1, None, 500) == [500, 500]


def test_no_cap_draws_exactly_as_before():
    """max_share_cents 0 (packets sent before the cap) takes the same draws from the same seed."""
    for seed in range(50):
        capped = _fastpath.split(Mode.RANDOM, 10_000, 37, 1, _fastpath.Rng(seed), 0)
        plain = _fastpath.split(Mode.RANDOM, 10_000, 37, 1, _fastpath.Rng(seed))
        assert capped == plain


@settings(max_examples=200, deadline=None)
@given(capped_packets(), st.integers(min_value=0, max_value=400))
def test_a_state_rebuilt_mid_way_draws_under_the_same_cap(p, cut):
    """As after a restart: the state is rebuilt from the claims so far (what
    load_packet reads) with the packet's own cap, and the rest obey it."""
    total, count, min_share_cents, max_share_cents, seed = p
    rng = _fastpath.Rng(seed)
    state = _fastpath.PacketState(
        1, 999, total, count, Mode.RANDOM, min_share_cents, 2**62, max_share_cents=max_share_cents
    )
    claims = []
    for user in range(1, min(cut, count) + 1):
        assert state.take(user, 0, rng) == Status.OK
        claims.append((user, state.last_seq, state.last_amount_cents))
    state = _fastpath.PacketState(
        1, 999, total, count, Mode.RANDOM, min_share_cents, 2**62, claims=claims, max_share_cents=max_share_cents
    )
    assert state.max_share_cents == max_share_cents
    for user in range(len(claims) + 1, count + 1):
        assert state.take(user, 0, rng) == Status.OK
        claims.append((user, state.last_seq, state.last_amount_cents))
    amounts = [a for _, _, a in claims]
    assert sum(amounts) == total and max(amounts) <= max_share_cents and state.remaining_cents == 0


# ---------------------------------------------------------------- cool-down


def cooldown_of(refusals: int, window_ms: int, cooldown_ms: int, max_users: int) -> Cooldown:
    return Cooldown(
        ProductRules(
            cooldown_refusals=refusals,
            cooldown_window_ms=window_ms,
            cooldown_ms=cooldown_ms,
            cooldown_max_users_tracked=max_users,
        )
    )


def test_cooldown_starts_after_n_refusals_within_the_window_and_ends():
    cd = cooldown_of(3, 1_000, 5_000, 100)
    cd.refused(7, 0)
    cd.refused(7, 400)
    assert cd.cooling_for_ms(7, 500) == 0, "two refusals are not three"
    cd.refused(7, 900)
    assert cd.cooling_for_ms(7, 1_000) == 4_900 and cd.cooled == 1
    assert cd.cooling_for_ms(8, 1_000) == 0, "another user is not cooling"
    assert cd.cooling_for_ms(7, 5_900) == 0 and 7 not in cd.until, "the cool-down ended and was forgotten"


def test_refusals_spread_past_the_window_do_not_cool():
    cd = cooldown_of(3, 1_000, 5_000, 100)
    for t in (0, 600, 1_200, 1_800, 2_400, 3_000):  # never three within one window from its first
        cd.refused(7, t)
    assert cd.cooling_for_ms(7, 3_000) == 0 and cd.cooled == 0


def test_cooldown_memory_is_bounded():
    cd = cooldown_of(2, 60_000, 60_000, 1_000)
    for user in range(50_000):
        cd.refused(user, 10)
        cd.refused(user, 20)  # every user cools
    assert len(cd.until) <= 1_000 and len(cd._strikes) <= 1_000
    assert cd.cooling_for_ms(49_999, 30) > 0, "the newest are kept"


# ---------------------------------------------------------------- token bucket


def test_token_bucket_allows_the_burst_then_the_rate():
    b = TokenBucket(rate_per_s=10, burst=5, now_s=100.0)
    assert [b.take(100.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert b.limited == 2
    assert b.take(100.15) and not b.take(100.15), "0.15 s refills one and a half"
    assert sum(b.take(200.0) for _ in range(10)) == 5, "an idle bucket holds at most its burst"


def test_one_bucket_per_token():
    limits = RateLimits(ProductRules(rate_limit_requests_per_s=10, rate_limit_burst_requests=2))
    a, b = limits.bucket_for(b"a", 0.0), limits.bucket_for(b"b", 0.0)
    assert limits.bucket_for(b"a", 1.0) is a and a is not b
    assert [a.take(0.0) for _ in range(3)] == [True, True, False]
    assert b.take(0.0), "another token's bucket is its own"
    assert limits.limited == 1


# ---------------------------------------------------------------- the engine's cool-down

MEMBERS_ONLY, OPEN = 7, 8  # packets: one the scripted user may not open, one anyone may
SENDER = 999


def engine_with_cooldown(committer: FakeCommitter):
    ledger = FakeLedger(
        committer,
        {
            MEMBERS_ONLY: dict(total_cents=1_000, count=5, sender_id=SENDER),
            OPEN: dict(total_cents=1_000, count=5, sender_id=SENDER),
        },
        range(1, 100),
    )
    engine = GrabEngine(
        ledger,
        committer,
        3,
        CommitTuning(
            batch_max_grabs=4,
            max_queued_grabs=1_000,
            max_packets_in_memory=100,
            max_known_users_cached=10_000,
            batch_overlap_min_grabs=1,
        ),
        cooldown=cooldown_of(3, 60_000, 60_000, 100),
    )
    engine.note_known_users(range(1, 100))
    now = _fastpath.now_ms()
    engine.adopt(_fastpath.PacketState(MEMBERS_ONLY, SENDER, 1_000, 5, Mode.RANDOM, 1, now + 3_600_000, [1, 2]))
    engine.adopt(_fastpath.PacketState(OPEN, SENDER, 1_000, 5, Mode.RANDOM, 1, now + 3_600_000))
    return engine


async def test_a_cooling_user_still_gets_a_share_that_is_still_committing():
    committer = FakeCommitter(1)
    engine = engine_with_cooldown(committer)
    out = Answers()
    committer.gate.clear()  # the scripted user's winning grab stays pending
    engine.on_grab(out, 1, OPEN, 50)
    await eventually(lambda: committer.started, what="the winning batch to start committing")
    for rid in (2, 3, 4):  # three refusals: cool-down
        engine.on_grab(out, rid, MEMBERS_ONLY, 50)
    assert [out.status(r) for r in (2, 3, 4)] == [Status.NOT_ELIGIBLE] * 3
    assert engine.cooldown.cooling_for_ms(50, _fastpath.now_ms()) > 0
    engine.on_grab(out, 5, OPEN, 50)  # the retry of the pending share: a follower, never refused
    engine.on_grab(out, 6, MEMBERS_ONLY, 51)  # an honest user's single refusal
    engine.on_grab(out, 7, OPEN, 51)
    await ticks()
    assert out.status(5) is None, "answered before its share was durable"
    committer.gate.set()
    await eventually(lambda: out.status(1) is not None and out.status(5) is not None and out.status(7) is not None)
    first = out.grabbed(1)
    assert out.status(5) == Status.ALREADY_CLAIMED and out.grabbed(5).amount_cents == first.amount_cents
    assert out.status(6) == Status.NOT_ELIGIBLE and out.status(7) == Status.OK, "the honest user is not cooled"
    await asyncio.wait_for(engine.drain(), 1.0)


async def test_a_cooling_user_fresh_grab_is_answered_cooling_down_and_not_decided():
    committer = FakeCommitter(1)
    engine = engine_with_cooldown(committer)
    out = Answers()
    for rid in (1, 2, 3):
        engine.on_grab(out, rid, MEMBERS_ONLY, 50)
    engine.on_grab(out, 4, OPEN, 50)
    assert out.status(4) == Status.COOLING_DOWN and "cooling down for" in out.by_rid[4].body.decode("utf-8", "replace")
    assert engine.states[OPEN].taken_count == 0, "nothing was taken for it"
    engine.cooldown.until[50] = _fastpath.now_ms() - 1  # the cool-down is over
    engine.on_grab(out, 5, OPEN, 50)
    await eventually(lambda: out.status(5) is not None)
    assert out.status(5) == Status.OK
    await asyncio.wait_for(engine.drain(), 1.0)
