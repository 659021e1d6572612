"""SENDs by group commit (ARCHITECTURE.md "SEND by group commit").

A SEND used to be ten statements, each a round trip, in a transaction of
its own: the worker spent most of its time waiting on asyncpg, and
PostgreSQL most of its CPU on the per-statement work and one commit per
SEND. Here the SENDs that arrive while a batch is out gather in a queue,
and the next batch carries all of them (up to send_batch_max) to
anbao_send_batch (migration 0012): one statement, one transaction, one
commit. A SEND is answered only once its batch committed.

Two batches of one worker in flight never share a sender (a sender's
later SEND waits for the next batch, so a sender's SENDs are decided in
arrival order), and a batch never holds one key twice. Past
max_queued_sends waiting, a SEND is refused at once (BUSY): an overload is
answered, not queued.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..clock import now_ms
from ..config import Limits
from ..storage.domain import SendRequest, SendResult
from ..storage.ledger import Ledger

log = logging.getLogger("anbao.sends")


class SendQueueFull(Exception):
    """max_queued_sends SENDs wait already: the caller answers BUSY."""


@dataclass
class _Waiting:
    request: SendRequest  # packet_id 0 until its batch goes out
    packet_id_of: Callable[[int], int]  # a sequence number -> the packet's id (the caller's shard)
    future: asyncio.Future[SendResult]


class SendBatcher:
    def __init__(self, ledger: Ledger, limits: Limits):
        self.ledger = ledger
        self.limits = limits
        self._waiting: deque[_Waiting] = deque()
        self._senders_in_flight: set[int] = set()
        self._batches_in_flight = 0
        self._seqs: range = range(0)
        self._seq_at = 0
        self._kicked = False
        self.batches = 0  # STATS: batches committed
        self.sends = 0  # STATS: SENDs they carried

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def submit(self, request: SendRequest, packet_id_of: Callable[[int], int]) -> asyncio.Future[SendResult]:
        """Queues one SEND; the future gives its result once its batch has
        committed, or the database's exception (nothing in the batch
        happened, or, for a connection broken mid-commit, its outcome is
        unknown). Raises SendQueueFull past max_queued_sends."""
        if len(self._waiting) >= self.limits.max_queued_sends:
            raise SendQueueFull(f"{len(self._waiting)} SENDs wait on this worker")
        fut: asyncio.Future[SendResult] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(request, packet_id_of, fut))
        self._kick()
        return fut

    def _kick(self) -> None:
        # One loop turn after the first SEND: what arrives in the same turn
        # goes in the same batch.
        if not self._kicked:
            self._kicked = True
            asyncio.get_running_loop().call_soon(self._start_batches)

    def _start_batches(self) -> None:
        self._kicked = False
        while self._waiting and self._batches_in_flight < self.limits.send_batches_in_flight:
            batch = self._take_batch()
            if not batch:
                return
            self._batches_in_flight += 1
            self._senders_in_flight.update(w.request.sender_id for w in batch)
            asyncio.get_running_loop().create_task(self._run(batch))

    def _take_batch(self) -> list[_Waiting]:
        """The oldest waiting SENDs whose senders have no batch in flight,
        one per key, up to send_batch_max; the others keep their places."""
        batch: list[_Waiting] = []
        keys: set[bytes] = set()
        blocked: set[int] = set()  # a sender skipped here: their later SENDs wait too
        kept: deque[_Waiting] = deque()
        while self._waiting and len(batch) < self.limits.send_batch_max:
            w = self._waiting.popleft()
            if w.future.done():  # its handler is gone (cancelled at stop)
                continue
            sender = w.request.sender_id
            if sender in self._senders_in_flight or sender in blocked or w.request.key in keys:
                blocked.add(sender)
                kept.append(w)
                continue
            keys.add(w.request.key)
            batch.append(w)
        kept.extend(self._waiting)
        self._waiting = kept
        return batch

    async def _next_seq(self) -> int:
        if self._seq_at >= len(self._seqs):
            self._seqs = await self.ledger.packet_seq_block()
            self._seq_at = 0
        seq = self._seqs[self._seq_at]
        self._seq_at += 1
        return seq

    async def _run(self, batch: list[_Waiting]) -> None:
        lim = self.limits
        try:
            requests = []
            for w in batch:
                packet_id = w.packet_id_of(await self._next_seq())
                requests.append(replace(w.request, packet_id=packet_id))
            results = await self.ledger.send_batch(
                requests,
                min_share_cents=lim.min_share_cents,
                max_share_cents=lim.max_share_cents,
                daily_max_cents=lim.daily_send_max_cents,
                daily_max_packets=lim.daily_send_max_packets,
                at_ms=now_ms(),
            )
        except Exception as exc:  # the database's fault: every SEND of the batch gets it
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(exc)
        else:
            self.batches += 1
            self.sends += len(batch)
            for w, result in zip(batch, results, strict=True):
                if not w.future.done():
                    w.future.set_result(result)
        finally:
            self._batches_in_flight -= 1
            self._senders_in_flight.difference_update(w.request.sender_id for w in batch)
            if self._waiting:
                self._kick()
