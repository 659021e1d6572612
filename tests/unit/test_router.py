"""Router without a database or peers: a FakeEngine for the owner's path,
FakePeers for relays (the test answers as the owner would), the in-process
permit counter, and FinalSets built in memory."""

import asyncio

import pytest
from fakes import Answers, FakeEngine, FakePeer
from polling import eventually

from anbao.admission import FinalSet, FinalStates, InProcessPermits, Permits
from anbao.admission.cache import grab_body
from anbao.config import AdmissionTuning
from anbao.core import codec
from anbao.server.router import Router
from anbao_client import routing
from anbao_client.protocol import Op, Status

pytestmark = pytest.mark.fast

ME, OTHER = 0, 1
SENDER = 999


def owned_by(worker: int, n: int = 1, start: int = 1) -> list[int]:
    """The first n packet ids from start that worker owns, of two workers."""
    return [p for p in range(start, start + 10_000) if routing.owner_of(p, 2) == worker][:n]


def router_for(permits=None, load_final_set=None, **kw):
    engine, peer = FakeEngine(), FakePeer()
    r = Router(
        ME,
        2,
        engine,
        permits or Permits(),
        FinalStates(100_000, 100_000),
        {OTHER: peer},
        AdmissionTuning(admission_slack=0, **kw),
        load_final_set=load_final_set,
    )
    return r, engine, peer


def owner_answers(peer: FakePeer, i: int, frame_for) -> None:
    """The owner answers the i-th relayed grab: frame_for(rid) is its answer."""
    replier, rid, _, _ = peer.relayed[i]
    replier.answer(frame_for(rid))


def final_set(pid: int, holders: dict[int, tuple[int, int]], count: int, eligible=None) -> FinalSet:
    return FinalSet(
        pid, count, SENDER, eligible, {u: grab_body(amount, seq, count) for u, (seq, amount) in holders.items()}
    )


async def test_the_owner_decides_locally_and_others_relay():
    r, engine, peer = router_for()
    [mine], [theirs] = owned_by(ME), owned_by(OTHER)
    out = Answers()
    r.on_grab(out, 1, mine, 10)
    r.on_grab(out, 2, theirs, 10)
    assert [(rid, pid, u) for _, rid, pid, u in engine.grabs] == [(1, mine, 10)]
    assert [(rid, pid, u) for _, rid, pid, u in peer.relayed] == [(2, theirs, 10)]
    assert out.by_rid == {}, "the router itself answered neither"
    assert r.stats["local"] == 1 and r.stats["forwarded"] == 1


async def test_a_relayed_share_is_answered_again_without_a_hop():
    r, _, peer = router_for()
    [pid] = owned_by(OTHER)
    out = Answers()
    r.on_grab(out, 1, pid, 10)
    owner_answers(peer, 0, lambda rid: codec.encode_grab(rid, Status.OK, OTHER, 321, 4, 6))
    assert out.status(1) == Status.OK and out.grabbed(1).amount_cents == 321
    r.on_grab(out, 2, pid, 10)  # a retry: the first answer, from here
    assert len(peer.relayed) == 1
    g = out.grabbed(2)
    assert out.status(2) == Status.ALREADY_CLAIMED and (g.amount_cents, g.seq, g.remaining_count) == (321, 4, 6)
    r.on_grab(out, 3, pid, 11)  # someone else: still the owner's to decide
    assert len(peer.relayed) == 2 and out.status(3) is None


async def test_final_refusals_are_learnt_per_user_only():
    r, _, peer = router_for()
    [pid] = owned_by(OTHER)
    out = Answers()
    r.on_grab(out, 1, pid, 10)
    owner_answers(peer, 0, lambda rid: codec.encode_error(Op.GRAB, rid, Status.NOT_ELIGIBLE, OTHER, "no"))
    r.on_grab(out, 2, pid, 10)
    assert out.status(2) == Status.NOT_ELIGIBLE and len(peer.relayed) == 1
    r.on_grab(out, 3, pid, 11)
    assert out.status(3) is None and len(peer.relayed) == 2


async def test_a_final_set_answers_everyone_exactly():
    r, _, peer = router_for()
    [pid] = owned_by(OTHER)
    r.final.install(final_set(pid, {10: (1, 600), 11: (2, 400)}, count=2, eligible=frozenset({10, 11, 12})))
    out = Answers()
    for rid, user in enumerate((10, 11, 12, 13, SENDER), 1):
        r.on_grab(out, rid, pid, user)
    assert peer.relayed == []
    assert [out.status(rid) for rid in range(1, 6)] == [
        Status.ALREADY_CLAIMED,
        Status.ALREADY_CLAIMED,
        Status.SOLD_OUT,
        Status.NOT_ELIGIBLE,
        Status.NOT_ELIGIBLE,
    ]
    assert (out.grabbed(1).seq, out.grabbed(1).amount_cents, out.grabbed(1).remaining_count) == (1, 600, 1)
    assert (out.grabbed(2).seq, out.grabbed(2).amount_cents, out.grabbed(2).remaining_count) == (2, 400, 0)
    assert all(out.by_rid[rid].request_id == rid for rid in range(1, 6))


async def test_a_spent_counter_alone_never_answers_sold_out():
    reads = []

    async def not_final_yet(pid):  # the database: not every share durable yet
        reads.append(pid)
        return None

    permits = InProcessPermits(max_packets=100)
    r, _, peer = router_for(permits, load_final_set=not_final_yet, final_set_wait_ms=30)
    [pid] = owned_by(OTHER)
    permits.seed(pid, 0)  # every share taken or held by a grab in flight
    out = Answers()
    r.on_grab(out, 1, pid, 10)  # the first one probes the owner
    await eventually(lambda: len(peer.relayed) == 1, what="the probe")
    r.on_grab(out, 2, pid, 11)  # the next waits for the final claim list...
    await eventually(lambda: reads, what="the final claim list to be read")
    assert out.status(2) is None and len(peer.relayed) == 1 and r.parked == 1
    await eventually(lambda: len(peer.relayed) == 2, what="the parked grab to go to the owner")
    assert out.by_rid == {} and r.parked == 0  # ...and, with none, goes to the owner: no SOLD_OUT from here
    assert peer.relayed[1][1:] == (2, pid, 11)


async def test_a_parked_grab_gets_its_share_from_the_final_set():
    [pid] = owned_by(OTHER)
    loaded = asyncio.Event()

    async def sold_out_and_final(p):
        await loaded.wait()
        return final_set(p, {10: (1, 700), 12: (2, 300)}, count=2)

    permits = InProcessPermits(max_packets=100)
    r, _, peer = router_for(permits, load_final_set=sold_out_and_final, final_set_wait_ms=1_000)
    permits.seed(pid, 0)
    out = Answers()
    r.on_grab(out, 1, pid, 11)  # the probe
    await eventually(lambda: len(peer.relayed) == 1)
    r.on_grab(out, 2, pid, 10)  # holds a share whose first answer it lost
    r.on_grab(out, 3, pid, 13)  # holds none
    await eventually(lambda: r.parked == 2, what="both parked")
    loaded.set()
    await eventually(lambda: len(out.by_rid) == 2, what="the parked grabs answered")
    assert out.status(2) == Status.ALREADY_CLAIMED and out.grabbed(2).amount_cents == 700
    assert out.status(3) == Status.SOLD_OUT and len(peer.relayed) == 1


async def test_a_permit_is_given_back_when_the_owner_gives_no_share():
    permits = InProcessPermits(max_packets=100)
    r, _, peer = router_for(permits)
    [pid] = owned_by(OTHER)
    permits.seed(pid, 1)
    out = Answers()
    r.on_grab(out, 1, pid, 10)
    await eventually(lambda: len(peer.relayed) == 1)
    assert not await permits.admit(pid), "the relayed grab holds the only permit"
    owner_answers(peer, 0, lambda rid: codec.encode_error(Op.GRAB, rid, Status.EXPIRED, OTHER, "expired"))
    assert out.status(1) == Status.EXPIRED
    assert await permits.admit(pid), "the permit came back"


async def test_a_grab_relayed_to_a_non_owner_is_refused():
    r, engine, _ = router_for()
    [theirs] = owned_by(OTHER)
    out = Answers()
    r.on_relayed(out, 1, theirs, 10)
    assert out.status(1) == Status.UNAVAILABLE and engine.grabs == []
