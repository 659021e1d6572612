"""Admission's in-memory parts: the in-process permit counter, the final
knowledge a non-owner answers from (FinalStates, FinalSet), and the
memcached counter failing open when memcached is not there."""

import socket

import pytest
from fakes import Answers

from anbao.admission import FinalSet, FinalStates, InProcessPermits, MemcachedPermits, Permits
from anbao.admission.cache import grab_body
from anbao.config import AdmissionTuning
from anbao.core import codec
from anbao_client import protocol
from anbao_client.protocol import Status

pytestmark = pytest.mark.fast


async def admitted(permits, pid: int, tries: int) -> int:
    return sum([await permits.admit(pid) for _ in range(tries)])


async def test_without_a_counter_everything_is_admitted():
    assert await admitted(Permits(), 1, 50) == 50
    assert await admitted(InProcessPermits(max_packets=10), 1, 50) == 50, "no counter yet: fail open"


async def test_a_seeded_counter_admits_exactly_its_permits_and_takes_them_back():
    p = InProcessPermits(max_packets=10)
    p.seed(1, 3)
    assert await admitted(p, 1, 10) == 3
    p.give_back(1)
    assert await admitted(p, 1, 10) == 1
    p.seed(1, 100)  # seed never overwrites a live counter
    assert await admitted(p, 1, 10) == 0
    p.reseed(1, 2)  # reseed (and observe) do
    assert await admitted(p, 1, 10) == 2
    p.observe(1, 1)
    assert await admitted(p, 1, 10) == 1
    p.give_back(2)  # nothing to give back to: no counter appears
    assert await admitted(p, 2, 10) == 10


async def test_past_max_packets_new_counters_are_not_kept_so_they_admit():
    p = InProcessPermits(max_packets=2)
    for pid in (1, 2, 3):
        p.seed(pid, 0)
    assert [await p.admit(pid) for pid in (1, 2, 3)] == [False, False, True]


def test_grab_body_is_the_owners_answer_body():
    for amount, seq, count in ((1, 1, 1), (888, 3, 10), (2**40, 7, 7)):
        owner = codec.encode_grab(5, Status.OK, 2, amount, seq, count - seq)[protocol.RESPONSE_HEADER_BYTES :]
        assert grab_body(amount, seq, count) == owner


def test_a_final_set_answers_in_the_owners_order():
    count = 2
    fs = FinalSet(9, count, 999, frozenset({10, 11, 12}), {10: grab_body(600, 1, count), 11: grab_body(400, 2, count)})
    out = Answers()
    for rid, user in ((1, 10), (2, 12), (3, 13), (4, 999), (5, 12)):
        out.answer(fs.answer(rid, user, 4))
    assert [out.status(r) for r in range(1, 6)] == [
        Status.ALREADY_CLAIMED,
        Status.SOLD_OUT,
        Status.NOT_ELIGIBLE,
        Status.NOT_ELIGIBLE,
        Status.SOLD_OUT,
    ]
    assert (out.grabbed(1).amount_cents, out.grabbed(1).seq, out.grabbed(1).remaining_count) == (600, 1, 1)
    assert [out.by_rid[r].request_id for r in range(1, 6)] == [1, 2, 3, 4, 5], "the cached SOLD_OUT keeps each rid"
    open_fs = FinalSet(9, 1, 999, None, {10: grab_body(5, 1, 1)})
    out.answer(open_fs.answer(6, 77, 4))  # open audience: anyone but the sender is told sold out
    assert out.status(6) == Status.SOLD_OUT


def test_a_final_set_must_hold_every_share():
    with pytest.raises(AssertionError):
        FinalSet(9, 3, 999, None, {10: grab_body(5, 1, 3)})


def test_final_states_keep_sets_within_their_bound_oldest_out_first():
    fs = FinalStates(max_set_entries=5, max_learnt=10)

    def one(pid, n):
        return FinalSet(pid, n, 999, None, {u: grab_body(1, u, n) for u in range(1, n + 1)})

    assert fs.install(one(1, 2)) and fs.install(one(2, 2))
    assert fs.install(one(3, 2))  # 6 > 5: the oldest goes
    assert list(fs.sets) == [2, 3] and fs.set_entries == 4
    assert not fs.install(one(4, 6)), "a set larger than the bound is not kept"
    assert list(fs.sets) == [2, 3]
    assert fs.install(one(2, 1)) and fs.set_entries == 3, "a reinstalled set replaces its old entries"


def test_learnt_answers_are_bounded_and_only_final_refusals_are_kept():
    fs = FinalStates(max_set_entries=5, max_learnt=3)
    for u in range(3):
        fs.note_claim(1, u, b"x")
    fs.note_claim(1, 99, b"y")  # past the bound: forgotten wholesale, then kept
    assert fs.claims == {(1, 99): b"y"}
    fs.note_refusal(1, 5, Status.EXPIRED)
    fs.note_refusal(1, 6, Status.NOT_ELIGIBLE)
    assert fs.refusals == {(1, 5): Status.EXPIRED, (1, 6): Status.NOT_ELIGIBLE}
    for status in (Status.SOLD_OUT, Status.BUSY, Status.UNAVAILABLE):
        with pytest.raises(AssertionError):
            fs.note_refusal(1, 7, status)  # these can change: never remembered as final


async def test_memcached_counter_fails_open_when_memcached_is_not_there():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = MemcachedPermits("127.0.0.1", port, 1, AdmissionTuning(memcached_timeout_ms=200))
    try:
        p.seed(1, 0)
        assert await admitted(p, 1, 3) == 3, "an unreachable counter must admit, never refuse"
        assert p.errors >= 3 and p.last_error
    finally:
        await p.close()
