"""GrabEngine, the owner's grab path, without a database: a FakeCommitter
stands in for storage.commit.GrabCommitter and a FakeLedger for the ledger;
the PacketState, the batches and the wire answers are the real ones."""

import asyncio

import pytest
from fakes import Answers, FakeCommitter, FakeLedger, packet, ticks
from polling import eventually

from anbao.config import CommitTuning
from anbao.engine.grabs import GrabEngine
from anbao_client.protocol import Status

pytestmark = pytest.mark.fast

PID = 7
SENDER = 999


_started: list[tuple[FakeCommitter, GrabEngine]] = []


def engine_for(committer, ledger, **limits) -> GrabEngine:
    # A batch goes as soon as a slot is free (batch_overlap_min_grabs=1): the
    # tests hold commits to see batches form.
    kw = dict(
        batch_max_grabs=4,
        max_queued_grabs=1_000,
        max_packets_in_memory=100,
        max_known_users_cached=10_000,
        batch_overlap_min_grabs=1,
    )
    kw.update(limits)
    engine = GrabEngine(ledger, committer, 3, CommitTuning(**kw))
    _started.append((committer, engine))
    return engine


@pytest.fixture(autouse=True)
async def settle_engines():
    """A test that fails with commits held leaves no task behind for the next one."""
    yield
    while _started:
        committer, engine = _started.pop()
        committer.gate.set()
        for held in committer.held.values():
            held.set()
        committer.outcomes.clear()
        await asyncio.wait_for(engine.drain(), 1.0)


def setup(count=5, total_cents=1_000, slots=1, users=range(1, 200), **limits):
    committer = FakeCommitter(slots)
    ledger = FakeLedger(committer, {PID: dict(total_cents=total_cents, count=count, sender_id=SENDER)}, users)
    engine = engine_for(committer, ledger, **limits)
    engine.note_known_users(users)
    engine.adopt(packet(PID, total_cents=total_cents, count=count, sender_id=SENDER))
    return committer, ledger, engine


async def test_a_grab_is_answered_only_after_its_batch_commits():
    committer, _, engine = setup()
    committer.gate.clear()  # every commit hangs until the gate opens
    out = Answers(probe=lambda: committer.returned)
    for rid, user in enumerate((11, 12, 13), 1):
        engine.on_grab(out, rid, PID, user)
    await eventually(lambda: committer.started, what="the batch to reach the committer")
    await ticks()
    assert out.by_rid == {}, "answered before the commit returned"
    committer.gate.set()
    await engine.drain()
    assert [out.status(r) for r in (1, 2, 3)] == [Status.OK] * 3
    assert all(out.seen_at_answer[r] >= 1 for r in (1, 2, 3)), "an answer went out before its commit returned"
    # What was answered is what was committed, share for share.
    answered = {(PID, out.grabbed(r).seq, u, out.grabbed(r).amount_cents) for r, u in ((1, 11), (2, 12), (3, 13))}
    assert answered == set(committer.durable)
    assert sorted(out.grabbed(r).seq for r in (1, 2, 3)) == [1, 2, 3]


async def test_shares_never_exceed_count_and_each_user_gets_one():
    count, total = 10, 1_000
    committer, _, engine = setup(count=count, total_cents=total, slots=2)
    out = Answers()
    users = list(range(100, 130))
    rid_of = {}
    for _attempt in range(2):  # every user grabs twice, all in one tick
        for u in users:
            rid = len(rid_of) + 1
            rid_of[rid] = u
            engine.on_grab(out, rid, PID, u)
    await engine.drain()
    await eventually(lambda: len(out.by_rid) == len(rid_of), what="every grab answered")
    ok = {rid: out.grabbed(rid) for rid in rid_of if out.status(rid) == Status.OK}
    winners = [rid_of[rid] for rid in ok]
    assert len(ok) == count and len(set(winners)) == count, "more shares than count, or a user twice"
    assert sum(g.amount_cents for g in ok.values()) == total
    assert sorted(g.seq for g in ok.values()) == list(range(1, count + 1))
    assert sorted(u for _, _, u, _ in committer.durable) == sorted(winners)
    first_share = {rid_of[rid]: (g.seq, g.amount_cents) for rid, g in ok.items()}
    for rid, u in rid_of.items():
        status = out.status(rid)
        if u in first_share and status != Status.OK:
            # A winner's second grab gets the first share back, nothing new.
            assert status == Status.ALREADY_CLAIMED
            g = out.grabbed(rid)
            assert (g.seq, g.amount_cents) == first_share[u]
        elif u not in first_share:
            assert status == Status.SOLD_OUT


async def test_sold_out_waits_until_the_last_shares_are_durable():
    committer, _, engine = setup(count=2)
    committer.gate.clear()
    out = Answers(probe=lambda: committer.returned)
    for rid, user in enumerate((21, 22, 23), 1):  # the third finds both shares taken, not yet durable
        engine.on_grab(out, rid, PID, user)
    await eventually(lambda: committer.started, what="the commit to start")
    await ticks()
    assert out.status(3) is None, "SOLD_OUT before the shares taken were durable"
    committer.gate.set()
    await engine.drain()
    assert [out.status(r) for r in (1, 2, 3)] == [Status.OK, Status.OK, Status.SOLD_OUT]
    assert out.seen_at_answer[3] >= 1


async def test_a_failed_commit_fails_its_grabs_and_reloads_the_packet():
    committer, ledger, engine = setup(count=2)
    committer.outcomes = [False]
    out = Answers()
    for rid, user in enumerate((31, 32, 33), 1):  # two take the shares, the third waits to hear SOLD_OUT
        engine.on_grab(out, rid, PID, user)
    await engine.drain()
    # Nothing landed: nobody is told they have a share, nor that none is left.
    assert [out.status(r) for r in (1, 2, 3)] == [Status.UNAVAILABLE] * 3
    assert committer.durable == [] and engine.failed_batches == 1
    assert PID not in engine.states, "memory ran ahead of the database and was kept"
    # The next grab reloads the packet from storage, where both shares are still free.
    engine.on_grab(out, 4, PID, 33)
    await eventually(lambda: out.status(4) is not None, what="the grab after the failure")
    await engine.drain()
    assert ledger.loads == [PID]
    assert out.status(4) == Status.OK and out.grabbed(4).seq == 1 and out.grabbed(4).remaining_count == 1
    assert committer.durable == [(PID, 1, 33, out.grabbed(4).amount_cents)]


async def test_a_failure_fails_the_batches_built_on_it_and_reloads_their_packets():
    committer, ledger, engine = setup(count=10, slots=2, batch_max_grabs=2)
    other = PID + 1
    ledger.packets[other] = dict(count=10, sender_id=SENDER)
    engine.adopt(packet(other, count=10, sender_id=SENDER))
    committer.held[2] = asyncio.Event()  # the second batch waits until the first has failed
    committer.outcomes = [False, True]  # the first batch fails; the second was built on it
    out = Answers()
    for rid, (pid, user) in enumerate(((PID, 41), (PID, 42), (other, 43), (other, 44)), 1):
        engine.on_grab(out, rid, pid, user)  # two full batches, one per packet
    await eventually(lambda: out.status(1) is not None, what="the first batch to fail")
    assert [out.status(r) for r in (1, 2)] == [Status.UNAVAILABLE] * 2
    # The second batch will roll back with it: its packet ran ahead of the
    # database too, and is forgotten before that batch even returns.
    assert PID not in engine.states and other not in engine.states
    engine.on_grab(out, 5, other, 45)  # decided on the reloaded truth, not on top of batch 2
    await eventually(lambda: out.status(5) is not None, what="a grab in the meantime")
    assert ledger.loads == [other] and out.status(5) == Status.OK and out.grabbed(5).seq == 1
    committer.held[2].set()
    await engine.drain()
    assert [out.status(r) for r in (3, 4)] == [Status.UNAVAILABLE] * 2
    assert committer.durable == [(other, 1, 45, out.grabbed(5).amount_cents)]
    assert engine.failed_batches == 1 and engine.doomed_batches == 1


async def test_busy_past_max_queued_grabs_and_nothing_taken_for_it():
    committer, _, engine = setup(count=10, batch_max_grabs=1, max_queued_grabs=3)
    committer.gate.clear()
    out = Answers()
    for rid, user in enumerate((51, 52, 53, 54, 55), 1):
        engine.on_grab(out, rid, PID, user)
    # The queue holds three accepted grabs; the fourth and fifth are turned away at once.
    assert [out.status(r) for r in (1, 2, 3)] == [None] * 3
    assert [out.status(r) for r in (4, 5)] == [Status.BUSY, Status.BUSY]
    assert engine.queued_grabs == 3 and engine.states[PID].taken_count == 3
    committer.gate.set()
    await engine.drain()
    assert [out.status(r) for r in (1, 2, 3)] == [Status.OK] * 3 and engine.queued_grabs == 0
    engine.on_grab(out, 6, PID, 54)  # BUSY took nothing: a retry gets a share
    await eventually(lambda: out.status(6) is not None)
    assert out.status(6) == Status.OK and out.grabbed(6).seq == 4


async def test_refusals_that_need_no_commit_are_answered_at_once():
    committer = FakeCommitter()
    ledger = FakeLedger(committer, {PID: dict(count=3, sender_id=SENDER, eligible=[61, 62])}, users=[61, 62, 63])
    engine = engine_for(committer, ledger)
    out = Answers()
    engine.on_grab(out, 1, PID, 63)  # not a member
    engine.on_grab(out, 2, PID, SENDER)  # the sender
    engine.on_grab(out, 3, 404, 61)  # no such packet
    await eventually(lambda: len(out.by_rid) == 3)
    assert [out.status(r) for r in (1, 2, 3)] == [Status.NOT_ELIGIBLE, Status.NOT_ELIGIBLE, Status.NOT_FOUND]
    assert committer.started == []
