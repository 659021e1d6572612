"""The owner's grab path: in-memory packet states, a FIFO per packet, and
group commit.

Every grab for a packet this worker owns passes through on_grab() on the
event loop thread. PacketState.take() decides it synchronously, in arrival
order (that is the packet's queue; it needs no lock), and an accepted share
joins the open batch (_fastpath.GrabBatch). A batch goes out on a free commit
slot (storage/commit.py); while batches commit, the next one fills. Batches
commit in the order they were built, and one that fails fails every batch
built on it. A grab is answered only after the batch that carries it has
committed, and SOLD_OUT only once every share taken is durable.

Expiry goes through the same queue: expire() closes the packet's state at
once (every grab decided after it answers EXPIRED) and puts the refund in
the open batch, behind every grab accepted before it, so the refund is
committed after them and returns exactly what they left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from anbao_client.protocol import Op, Status

from .. import _fastpath
from ..config import CommitTuning
from ..core import codec
from ..storage.commit import GrabCommitter, Roller
from ..storage.domain import PacketRecord
from ..storage.ledger import Ledger
from .cooldown import Cooldown
from .waitbound import WaitBound

log = logging.getLogger("anbao.grabs")

_ERROR_TEXT = _fastpath.GRAB_TEXT  # keyed by the plain int PacketState.take() returns


# Compared once per grab: plain ints, not enum attribute lookups.
_OK = Status.OK.value
_ALREADY_CLAIMED = Status.ALREADY_CLAIMED.value
_SOLD_OUT = Status.SOLD_OUT.value
_NOT_ELIGIBLE = Status.NOT_ELIGIBLE.value
_UNKNOWN_USER = Status.UNKNOWN_USER.value
_COOLING_DOWN = Status.COOLING_DOWN.value


class Replier:
    """What the engine needs of a connection: somewhere to put an answer."""

    def answer(self, frame: bytes) -> None:  # pragma: no cover - interface
        raise NotImplementedError


Batch = _fastpath.GrabBatch


def packet_state(record: PacketRecord) -> _fastpath.PacketState:
    """The in-memory state of a packet, from its durable record."""
    return _fastpath.PacketState(
        record.packet_id,
        record.sender_id,
        record.total_cents,
        record.share_count,
        record.mode,
        record.min_share_cents,
        record.expires_at_ms,
        record.eligible,
        record.claims,
        record.closed,
        record.max_share_cents,
    )


class GrabEngine:
    def __init__(
        self,
        ledger: Ledger,
        committer: GrabCommitter,
        worker_id: int,
        tuning: CommitTuning,
        *,
        roller: Roller | None = None,
        committing=None,
        cooldown: Cooldown | None = None,
        wait_bound: WaitBound | None = None,
    ):
        assert 0 < tuning.batch_max_grabs <= tuning.max_queued_grabs
        self.ledger = ledger
        self.committer = committer
        self.roller = roller
        # The roll-up's backlog bound and quiet time are the roller's tuning:
        # without a roller (unit tests) nothing is rolled up, nothing bounds.
        self.max_rollup_backlog = roller.tuning.max_rollup_backlog_grabs if roller is not None else 1 << 62
        # committing[worker_id] is the monotonic time this engine last had
        # batches in flight (now, while it has); a roll-up waits while any
        # worker's is within rollup_quiet_ms (see Roller): a steady stream of
        # grabs has gaps between its commits, and a roll-up in one of them
        # takes the CPU the next commit needs.
        self._committing = committing if committing is not None else [0.0]
        self._slot_index = worker_id if committing is not None else 0
        self._quiet_s = roller.tuning.rollup_quiet_ms / 1000 if roller is not None else 0.0
        if roller is not None:
            roller.on_progress = self._kick_if_waiting
            roller.busy = self._grabs_active
        self.worker_id = worker_id
        # Read on every grab or batch: plain attributes, not tuning.x.
        self.overlap_min_grabs = tuning.batch_overlap_min_grabs
        self.batch_max_grabs = tuning.batch_max_grabs
        self.max_queued_grabs = tuning.max_queued_grabs
        # Uncommitted grabs past which a new one may be refused BUSY: the
        # queue's length bound, or the wait bound's least backlog.
        self.wait_bound = wait_bound
        self._busy_from = min(self.max_queued_grabs, wait_bound.min_backlog if wait_bound else 1 << 62)
        self.max_packets_in_memory = tuning.max_packets_in_memory
        self.max_known_users = tuning.max_known_users_cached
        self.rng = _fastpath.Rng()
        # Refused grabs put a user in cool-down (cooldown.py); _cooling is
        # its map of users cooling down, empty (one falsy test a grab) when nobody is.
        self.cooldown = cooldown
        self._cooling: dict[int, int] = cooldown.until if cooldown is not None else {}
        self.states: dict[int, _fastpath.PacketState] = {}
        self._loading: dict[int, list] = {}  # packet id -> grabs waiting for its load, in order
        self._known_users: set[int] = set()
        self._user_checks: dict[int, list] = {}  # user id -> grabs waiting for the check
        self._user_check_scheduled = False
        self._open = Batch()
        self._queued: list[Batch] = []  # full batches waiting behind the open one
        self._in_flight: list[Batch] = []  # batches committing, in the order they were built
        self._chain_tail: asyncio.Future | None = None  # outcome of the newest batch in flight
        self._pump_scheduled = False
        self._queued_grabs = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.packets_from_memory = 0  # STATS: PACKETs its owner answered from this state (server/ops/packets.py)
        self.on_adopt: Callable[[_fastpath.PacketState], None] | None = None  # admission seeds its counter
        self.on_commit: Callable[[int, float], None] | None = None  # (grabs, seconds): metrics
        self.on_facts: Callable[[], None] | None = None  # grabs or refunds committed: their events need numbers
        self._expiring: dict[int, asyncio.Future] = {}  # packet id -> its refund, until committed
        self.refunds_committed = 0
        self.refunds_failed = 0
        self.commits = 0
        self.committed_grabs = 0
        self.failed_batches = 0
        self.doomed_batches = 0  # failed because a batch before them did

    # ------------------------------------------------------------ entry

    def on_grab(self, replier: Replier, rid: int, packet_id: int, user_id: int) -> None:
        state = self.states.get(packet_id)
        if state is None:
            waiting = self._loading.get(packet_id)
            if waiting is None:
                self._loading[packet_id] = [(replier, rid, user_id)]
                asyncio.get_running_loop().create_task(self._load(packet_id))
            else:
                waiting.append((replier, rid, user_id))
            return
        # Where each check stands, and what it gives way to: _fastpath.GRAB_PRECEDENCE.
        if state.open_audience and user_id not in self._known_users and not state.yields(_UNKNOWN_USER, user_id):
            self._check_user(replier, rid, packet_id, user_id)
            return
        self._decide(state, replier, rid, user_id)

    def _decide(self, state: _fastpath.PacketState, replier: Replier, rid: int, user_id: int) -> None:
        queued = self._queued_grabs
        if queued >= self._busy_from:
            # Past the wait bound only a grab that could take a share is refused: one that can
            # only be SOLD_OUT or ALREADY_CLAIMED costs the queue nothing. Inline: every grab.
            bound = self.wait_bound
            if queued >= self.max_queued_grabs or (
                bound is not None
                and state.taken_count < state.share_count
                and bound.full(queued, time.monotonic_ns(), self._oldest_ns)
            ):
                replier.answer(codec.encode_error(Op.GRAB, rid, Status.BUSY, self.worker_id, self._busy_text()))
                return
        cooling = self._cooling
        if cooling and user_id in cooling and not state.yields(_COOLING_DOWN, user_id):
            # A fresh decision waits out the cool-down; a share this user
            # holds (even one still committing) is answered below, as ever.
            if self._answered_cooling(replier, rid, user_id):
                return
        b = self._open
        status = b.take(state, replier, rid, user_id, self.rng)
        if status == _OK:
            self._queued_grabs += 1
            n = len(b)
            if n == 1:
                b.opened_ns = time.monotonic_ns()
            if n >= self.batch_max_grabs:
                self._queued.append(b)
                self._open = Batch()
            self._kick()
        elif status == _ALREADY_CLAIMED:
            if self.cooldown is not None:
                self.cooldown.refused(user_id, _fastpath.now_ms())
            if state.is_reserved(state.last_seq):
                # The first grab is not durable yet: this retry is answered
                # with it, after the batch that carries it commits.
                self._open.followers.append((replier, rid, state, user_id))
                self._kick()
            else:
                # The first answer's body, byte for byte: remaining_count as it was after that share.
                replier.answer(
                    codec.encode_grab(
                        rid,
                        Status.ALREADY_CLAIMED,
                        self.worker_id,
                        state.last_amount_cents,
                        state.last_seq,
                        state.share_count - state.last_seq,
                    )
                )
        elif status == _SOLD_OUT and state.committed_count < state.taken_count:
            # Every share is taken, but some are not durable yet: if their
            # batch failed they would be free again, and a refusal is final.
            # Answered SOLD_OUT once they have committed (as a follower with
            # no share), UNAVAILABLE if they did not.
            self._open.followers.append((replier, rid, state, user_id))
            self._kick()
        else:
            if status == _NOT_ELIGIBLE and self.cooldown is not None:
                self.cooldown.refused(user_id, _fastpath.now_ms())
            replier.answer(codec.encode_error(Op.GRAB, rid, status, self.worker_id, _ERROR_TEXT[status]))

    def _answered_cooling(self, replier: Replier, rid: int, user_id: int) -> bool:
        """Answers COOLING_DOWN if the user's cool-down still runs."""
        assert self.cooldown is not None
        left_ms = self.cooldown.cooling_for_ms(user_id, _fastpath.now_ms())
        if left_ms:
            why = f"cooling down for {left_ms} ms after repeated refused grabs; nothing was decided"
            replier.answer(codec.encode_error(Op.GRAB, rid, Status.COOLING_DOWN, self.worker_id, why))
        return bool(left_ms)

    def _busy_text(self) -> str:
        """What a grab refused BUSY is told: which bound refused it."""
        queued = self._queued_grabs
        if queued >= self.max_queued_grabs:
            return "grab queue full"
        assert self.wait_bound is not None
        ms = self.wait_bound.window_ns // 1_000_000
        return f"{queued} grabs waiting for their commit here, past {ms} ms; retry later"

    def _oldest_ns(self) -> int:
        """When the oldest uncommitted grab joined its batch (batches commit in build order)."""
        for b in (*self._in_flight, *self._queued, self._open):
            if len(b):
                return b.opened_ns
        return time.monotonic_ns()

    def _left_queue(self, count: int) -> None:
        self._queued_grabs -= count
        assert self._queued_grabs >= 0
        if self.wait_bound is not None and count:
            self.wait_bound.done(count, time.monotonic_ns())

    # ------------------------------------------------------------ loading

    async def _load(self, packet_id: int) -> None:
        try:
            record = await self.ledger.load_packet(packet_id)
            state = None if record is None else packet_state(record)
        except Exception as exc:  # the database is the truth; without it, nobody is served
            log.warning("loading packet %d failed: %r", packet_id, exc)
            for replier, rid, _ in self._loading.pop(packet_id, []):
                replier.answer(
                    codec.encode_error(
                        Op.GRAB, rid, Status.UNAVAILABLE, self.worker_id, "packet state unavailable; retry"
                    )
                )
            return
        waiting = self._loading.pop(packet_id, [])
        if state is None:
            for replier, rid, _ in waiting:
                replier.answer(
                    codec.encode_error(Op.GRAB, rid, Status.NOT_FOUND, self.worker_id, f"unknown packet {packet_id}")
                )
            return
        self.adopt(state)
        for replier, rid, user_id in waiting:
            self.on_grab(replier, rid, packet_id, user_id)

    def adopt(self, state: _fastpath.PacketState) -> None:
        """Takes ownership of a packet's state (new from SEND, or loaded)."""
        assert state.packet_id not in self.states
        if len(self.states) >= self.max_packets_in_memory:
            self._evict_settled()
        if state.packet_id in self._expiring:
            state.close()  # reloaded while its refund is on the way: it stays closed
        self.states[state.packet_id] = state
        if self.on_adopt is not None:
            self.on_adopt(state)

    def _evict_settled(self) -> None:
        # Only states with nothing pending may go: a pending share lives
        # nowhere else until its batch commits.
        settled = [pid for pid, s in self.states.items() if s.committed_count == s.taken_count]
        for pid in settled[: max(1, len(self.states) // 4)]:
            del self.states[pid]

    # ------------------------------------------------------------ user checks

    def _check_user(self, replier: Replier, rid: int, packet_id: int, user_id: int) -> None:
        # An unregistered grabber would make the whole batch fail its join;
        # check once per user per worker, many users in one query.
        self._user_checks.setdefault(user_id, []).append((replier, rid, packet_id))
        if not self._user_check_scheduled:
            self._user_check_scheduled = True
            asyncio.get_running_loop().create_task(self._run_user_checks())

    async def _run_user_checks(self) -> None:
        await asyncio.sleep(0)
        pending, self._user_checks = self._user_checks, {}
        self._user_check_scheduled = False
        try:
            known = await self.ledger.known_users(list(pending))
        except Exception as exc:
            log.warning("user check failed: %r", exc)
            for waits in pending.values():
                for replier, rid, _ in waits:
                    replier.answer(codec.encode_error(Op.GRAB, rid, Status.UNAVAILABLE, self.worker_id, "retry"))
            return
        if len(self._known_users) + len(known) > self.max_known_users:
            self._known_users.clear()
        self._known_users |= known
        for user_id, waits in pending.items():
            for replier, rid, packet_id in waits:
                if user_id in known:
                    self.on_grab(replier, rid, packet_id, user_id)
                else:
                    replier.answer(
                        codec.encode_error(Op.GRAB, rid, Status.UNKNOWN_USER, self.worker_id, f"unknown user {user_id}")
                    )

    def note_known_users(self, user_ids) -> None:
        if len(self._known_users) < self.max_known_users:
            self._known_users.update(user_ids)

    # ------------------------------------------------------------ expiry

    def expire(self, packet_id: int) -> asyncio.Future:
        """Closes the packet and refunds its remainder to the sender, in the
        packet's queue order. Synchronously, the state is closed: any grab
        decided after this call answers EXPIRED. The refund joins the open
        batch, which commits after every batch holding a grab accepted
        before this call, so the remainder it returns is what those grabs
        left. The future gives (refunded_cents, refunded_now) once committed;
        the database refunds at most once whoever asks, so calling this again
        (another sweep, another process, after a restart) is safe."""
        fut = self._expiring.get(packet_id)
        if fut is None:
            state = self.states.get(packet_id)
            if state is not None:
                state.close()
            fut = asyncio.get_running_loop().create_future()
            # Whoever asked may be gone (a sweep cancelled by stop()): a failure
            # is logged in _commit_refunds, not again as "never retrieved".
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._expiring[packet_id] = fut
            self._open.refunds.append(packet_id)
            self._kick()
        return fut

    def _refunds_failed(self, packet_ids: list[int], exc: BaseException) -> None:
        # Nothing was refunded: the packets stay closed here, and the next
        # sweep finds them still open in the database and asks again.
        if packet_ids:
            log.warning("refund of %d packet(s) failed: %r", len(packet_ids), exc)
        self.refunds_failed += len(packet_ids)
        for pid in packet_ids:
            fut = self._expiring.pop(pid)
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))

    async def _commit_refunds(self, slot: int, packet_ids: list[int]) -> None:
        try:
            done = await self.committer.settle_then_refund(slot, packet_ids)
        except BaseException as exc:
            self._refunds_failed(packet_ids, exc)
            if not isinstance(exc, Exception):
                raise
            return
        if self.on_facts is not None and any(now for _, now in done.values()):
            self.on_facts()
        for pid in packet_ids:
            refunded, refunded_now = done[pid]
            self.refunds_committed += refunded_now
            state = self.states.get(pid)
            if state is not None:
                state.close()
                # With every accepted grab committed, memory and database
                # must agree on what was left; if not, the database is the truth.
                if state.committed_count == state.taken_count and refunded != state.remaining_cents:
                    log.critical(
                        "packet %d: refunded %d but memory holds %d; reloading it", pid, refunded, state.remaining_cents
                    )
                    del self.states[pid]
            fut = self._expiring.pop(pid)
            if not fut.done():
                fut.set_result((refunded, refunded_now))

    # ------------------------------------------------------------ group commit

    def _kick(self) -> None:
        if not self._pump_scheduled:
            self._pump_scheduled = True
            self._idle.clear()
            # One turn of the loop lets the grabs already read off sockets
            # join the batch before it goes.
            asyncio.get_running_loop().call_soon(self._pump)

    def _grabs_active(self) -> bool:
        if self._in_flight:
            return True
        return time.monotonic() - max(self._committing) < self._quiet_s

    def _kick_if_waiting(self) -> None:
        if self._has_work():
            self._kick()

    def _has_work(self) -> bool:
        return bool(self._queued or len(self._open) or self._open.followers or self._open.refunds)

    def _take_next(self) -> Batch:
        if self._queued:
            return self._queued.pop(0)
        b, self._open = self._open, Batch()
        return b

    def _pump(self) -> None:
        """Starts a batch on every free slot while there is work. The batch
        size follows the load: when quiet, a grab goes alone at once; under
        load, grabs gather while every slot is busy."""
        self._pump_scheduled = False
        loop = asyncio.get_running_loop()
        while (
            self._has_work()
            and self.committer.free_slots
            and self._rollup_backlog_ok()
            and (not self._in_flight or self._queued or len(self._open) >= self.overlap_min_grabs)
        ):
            batch = self._take_next()
            batch.slot = self.committer.acquire()
            batch.before = self._chain_tail
            batch.outcome = loop.create_future()
            self._chain_tail = batch.outcome
            self._in_flight.append(batch)
            loop.create_task(self._run(batch))
        if self._in_flight:
            self._committing[self._slot_index] = time.monotonic()
        if not self._in_flight and not self._has_work():
            self._idle.set()

    def _rollup_backlog_ok(self) -> bool:
        # Committed grabs not yet rolled up are bounded: past the limit the
        # queue stops draining, and once it is full, grabs get BUSY.
        return self.roller is None or self.roller.backlog_claims < self.max_rollup_backlog

    async def _run(self, batch: Batch) -> None:
        try:
            await self._commit(batch)
        finally:
            self._committing[self._slot_index] = time.monotonic()
            self._in_flight.remove(batch)
            self.committer.release(batch.slot)
            if self._chain_tail is batch.outcome:
                self._chain_tail = None
            if not batch.outcome.done():  # cancelled: what follows must not commit on it
                batch.outcome.set_result(False)
            self._pump()

    async def _commit(self, batch: Batch) -> None:
        try:
            await self._commit_grabs(batch)
        except BaseException as exc:  # cancelled: the refunds were not even tried
            self._refunds_failed(batch.refunds, exc)
            raise
        if batch.refunds:
            # After the grabs, whether they committed or failed: either way
            # the database now holds every claim these packets will ever get.
            await self._commit_refunds(batch.slot, batch.refunds)

    async def _commit_grabs(self, batch: Batch) -> bool:
        """Commits the batch in its turn; answers its grabs; returns whether it landed."""
        ok = True
        if len(batch):
            started = time.perf_counter()
            try:
                batch_id = await self.committer.next_batch_id(batch.slot)
            except Exception as exc:
                log.warning("no batch id: %r", exc)
                ok = False
                if batch.before is not None:
                    await asyncio.shield(batch.before)  # failures are handled in build order
            else:
                ok = await self.committer.commit(
                    batch.slot, batch_id, batch.packets, batch.seqs, batch.users, batch.amounts, batch.before
                )
            if ok and self.on_commit is not None:
                self.on_commit(len(batch), time.perf_counter() - started)
        elif batch.before is not None:
            ok = await asyncio.shield(batch.before)  # followers only: answered in their turn
        batch.outcome.set_result(ok)
        self._left_queue(len(batch))
        wid = self.worker_id
        if ok:
            self.commits += len(batch) > 0
            self.committed_grabs += len(batch)
            if self.roller is not None and len(batch):
                self.roller.committed(len(batch))
            if self.on_facts is not None and len(batch):
                self.on_facts()
            batch.answer_committed(wid)
            return True
        failed = batch.replies()
        if not batch.doomed:
            # The first failure in a chain. Every batch built after this one
            # is in flight on top of it and will roll back (it commits only
            # if this one did): memory ran ahead of the database for all
            # their packets. Forget those states, so the next grab reloads
            # the truth, and fail what waits to be built on them. Batches
            # built from now on do not wait for the doomed ones.
            self.failed_batches += 1
            touched = batch.packet_ids()
            for later in self._in_flight:
                if later is not batch and later.outcome is not None and not later.outcome.done():
                    later.doomed = True
                    self.doomed_batches += 1
                    touched |= later.packet_ids()
            for later in [self._open, *self._queued]:
                n_before = len(later)
                failed += later.drop_packets(touched)
                self._left_queue(n_before - len(later))
            for pid in touched:
                self.states.pop(pid, None)
            self._chain_tail = None
        for replier, rid, _ in failed:
            replier.answer(
                codec.encode_error(Op.GRAB, rid, Status.UNAVAILABLE, wid, "commit failed; nothing was taken, retry")
            )
        return False

    async def drain(self) -> None:
        """Waits until every accepted grab is committed and answered."""
        while self._in_flight or self._has_work():
            self._kick()
            await self._idle.wait()

    @property
    def queued_grabs(self) -> int:
        return self._queued_grabs
