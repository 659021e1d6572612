"""SEND, DEPOSIT and WITHDRAW by group commit (ARCHITECTURE.md "Keyed
writes by group commit").

Each of them used to be several statements, each a round trip, in a
transaction of its own: the worker spent most of its time waiting on
asyncpg, PostgreSQL most of its CPU on per-statement work and one commit
per request, and every DEPOSIT and WITHDRAW queued on the external
account's row lock for a whole commit. Here the requests that arrive while
a batch is out gather in a queue, and the next batch carries all of them
(up to send_batch_max) to one batch function: one statement, one
transaction, one commit. A request is answered only once its batch
committed.

Two batches of one batcher in flight never share a wallet (a user's later
request waits for the next batch, so one user's requests are decided in
arrival order), and a batch never holds one key twice. How many requests
may wait is bounded by the dispatcher (HandlerTuning.max_handlers_per_operation).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from ..clock import now_ms
from ..config import HandlerTuning, ProductRules
from ..storage.domain import BatchOutcome, BatchResult, MoveRequest, Operation, SendRequest
from ..storage.ledger import Ledger

# Times a request is put back (its wallet locked elsewhere, a roll-up
# holding it a few ms, or its batch failed on a key stored meanwhile)
# before a batch waits for the wallet instead.
PATIENT_AFTER_PUT_BACKS = 3


@dataclass
class _Waiting:
    request: Any  # SendRequest (packet_id 0 until its batch goes out) or MoveRequest
    wallet: int  # the user whose wallet it locks
    future: asyncio.Future[BatchResult]
    packet_id_of: Callable[[int], int] | None = None  # SEND: a sequence number -> the packet's id
    put_back: int = 0  # times it came back PUT_BACK and waited for the next batch


class KeyedBatcher:
    """The queue and the batches in flight; `_commit` runs one batch."""

    def __init__(self, tuning: HandlerTuning):
        self.tuning = tuning
        self._waiting: deque[_Waiting] = deque()
        self._wallets_in_flight: set[int] = set()
        self._batches_in_flight = 0
        self._patient_in_flight = 0
        self._kicked = False
        self.batches = 0  # STATS: batches committed
        self.requests = 0  # STATS: requests they carried
        self.put_back = 0  # STATS: requests put back (BatchOutcome.PUT_BACK)

    async def _commit(self, batch: list[_Waiting], patient: bool) -> list[BatchResult]:
        """Runs one batch; unless patient, a request whose wallet is locked
        elsewhere may come back PUT_BACK instead of being waited for."""
        raise NotImplementedError

    def _submit(self, waiting: _Waiting) -> Awaitable[BatchResult]:
        assert len(self._waiting) < self.tuning.max_handlers_per_operation, "the dispatcher bounds the queue"
        self._waiting.append(waiting)
        self._kick()
        return waiting.future

    def _kick(self) -> None:
        # One loop turn after the first request: what arrives in the same
        # turn goes in the same batch.
        if not self._kicked:
            self._kicked = True
            asyncio.get_running_loop().call_soon(self._start_batches)

    def _start_batches(self) -> None:
        self._kicked = False
        while self._waiting and self._may_overlap():
            # A request put back PATIENT_AFTER_PUT_BACKS times goes in a
            # batch of such requests only, which waits for the wallets:
            # every request is decided in the end, and no other waits
            # behind a wallet someone else holds.
            patient = self._waiting[0].put_back >= PATIENT_AFTER_PUT_BACKS
            batch = self._take_batch(patient)
            if not batch:
                return
            self._batches_in_flight += 1
            self._patient_in_flight += patient
            self._wallets_in_flight.update(w.wallet for w in batch)
            asyncio.get_running_loop().create_task(self._run(batch, patient))

    def _may_overlap(self) -> bool:
        """Whether another batch may go now (HandlerTuning: a second batch
        in flight waits for enough requests to be worth its fixed cost,
        unless the one out may be held up by a lock)."""
        if self._batches_in_flight == 0:
            return True
        if self._batches_in_flight >= self.tuning.send_batches_in_flight:
            return False
        return self._patient_in_flight > 0 or len(self._waiting) >= self.tuning.send_batch_overlap_min_requests

    def _take_batch(self, patient: bool) -> list[_Waiting]:
        """The oldest waiting requests of this patience whose wallets have
        no batch in flight, one per key, up to send_batch_max; the others
        keep their places."""
        batch: list[_Waiting] = []
        keys: set[bytes] = set()
        blocked: set[int] = set()  # a wallet skipped here: its later requests wait too
        kept: deque[_Waiting] = deque()
        while self._waiting and len(batch) < self.tuning.send_batch_max:
            w = self._waiting.popleft()
            if w.future.done():  # its handler is gone (cancelled at stop)
                continue
            if (
                w.wallet in self._wallets_in_flight
                or w.wallet in blocked
                or w.request.key in keys
                or (w.put_back >= PATIENT_AFTER_PUT_BACKS) != patient
            ):
                blocked.add(w.wallet)
                kept.append(w)
                continue
            keys.add(w.request.key)
            batch.append(w)
        kept.extend(self._waiting)
        self._waiting = kept
        return batch

    async def _run(self, batch: list[_Waiting], patient: bool) -> None:
        try:
            results = await self._commit(batch, patient)
        except Exception as exc:  # the database's fault: every request of the batch gets it
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(exc)
        else:
            self.batches += 1
            self.requests += len(batch)
            busy = []
            for w, result in zip(batch, results, strict=True):
                if result.outcome == BatchOutcome.PUT_BACK:
                    w.put_back += 1
                    busy.append(w)
                elif not w.future.done():
                    w.future.set_result(result)
            # First in the queue: the next batches carry them.
            self.put_back += len(busy)
            self._waiting.extendleft(reversed(busy))
        finally:
            self._batches_in_flight -= 1
            self._patient_in_flight -= patient
            self._wallets_in_flight.difference_update(w.wallet for w in batch)
            if self._waiting:
                self._kick()


class SendBatcher(KeyedBatcher):
    """SENDs, into anbao_send_batch (storage/functions)."""

    def __init__(self, ledger: Ledger, tuning: HandlerTuning, rules: ProductRules):
        super().__init__(tuning)
        self.ledger = ledger
        self.rules = rules
        self._seqs: range = range(0)
        self._seq_at = 0

    def submit(self, request: SendRequest, packet_id_of: Callable[[int], int]) -> Awaitable[BatchResult]:
        """Queues one SEND; its result once its batch has committed, or the
        database's exception (nothing in the batch happened, or, for a
        connection broken mid-commit, its outcome is unknown)."""
        fut: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        return self._submit(_Waiting(request, request.sender_id, fut, packet_id_of))

    async def _next_seq(self) -> int:
        if self._seq_at >= len(self._seqs):
            self._seqs = await self.ledger.packet_seq_block()
            self._seq_at = 0
        seq = self._seqs[self._seq_at]
        self._seq_at += 1
        return seq

    async def _commit(self, batch: list[_Waiting], patient: bool) -> list[BatchResult]:
        rules = self.rules
        requests = []
        for w in batch:
            assert w.packet_id_of is not None
            requests.append(replace(w.request, packet_id=w.packet_id_of(await self._next_seq())))
        return await self.ledger.send_batch(
            requests,
            min_share_cents=rules.min_share_cents,
            max_share_cents=rules.max_share_cents,
            daily_max_cents=rules.daily_send_max_cents,
            daily_max_packets=rules.daily_send_max_packets,
            at_ms=now_ms(),
            patient=patient,
        )


class MoveBatcher(KeyedBatcher):
    """DEPOSITs or WITHDRAWs (one batcher each), into anbao_move_batch
    (migration 0013)."""

    def __init__(self, ledger: Ledger, tuning: HandlerTuning, operation: Operation):
        assert operation in (Operation.DEPOSIT, Operation.WITHDRAW)
        super().__init__(tuning)
        self.ledger = ledger
        self.operation = operation

    def submit(self, request: MoveRequest) -> Awaitable[BatchResult]:
        fut: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        return self._submit(_Waiting(request, request.user_id, fut))

    async def _commit(self, batch: list[_Waiting], patient: bool) -> list[BatchResult]:
        # anbao_move_batch always waits: DEPOSIT and WITHDRAW are rare on an
        # evening, and the external account's lock orders them anyway.
        return await self.ledger.move_batch(self.operation, [w.request for w in batch])


@dataclass
class KeyedWrites:
    """A worker's batchers of keyed writes, one per operation."""

    sends: SendBatcher
    deposits: MoveBatcher
    withdrawals: MoveBatcher

    @classmethod
    def open(cls, ledger: Ledger, tuning: HandlerTuning, rules: ProductRules) -> KeyedWrites:
        return cls(
            SendBatcher(ledger, tuning, rules),
            MoveBatcher(ledger, tuning, Operation.DEPOSIT),
            MoveBatcher(ledger, tuning, Operation.WITHDRAW),
        )

    def stats(self) -> dict[str, int]:
        out = {}
        for name, b in (("send", self.sends), ("deposit", self.deposits), ("withdraw", self.withdrawals)):
            out[f"{name}_batches"] = b.batches
            out[f"{name}_batched_requests"] = b.requests
            out[f"{name}_put_back"] = b.put_back
        return out
