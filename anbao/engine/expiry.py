"""The expiry sweeper: finds packets past their expiry and has their owner
refund the remainder.

The database, not memory, says what has expired (open packets whose
expires_at has passed by the server's clock, the clock GRAB decides expiry
by). So a packet that expired while no server ran, or whose refund failed or
was never committed, is found again by the next sweep; the first sweep runs
as the worker starts. Each refund goes through the owner's grab queue
(GrabEngine.expire), and the database refunds a packet at most once, so two
sweepers, or a sweep racing a restart, cannot pay anything twice.
"""

from __future__ import annotations

import asyncio
import logging

from anbao_client.routing import SHARD_COUNT, owner_of, shards_of

from ..clock import now_ms
from ..config import ExpiryTuning
from ..storage.ledger import Ledger
from .grabs import GrabEngine

log = logging.getLogger("anbao.expiry")


class ExpirySweeper:
    def __init__(self, ledger: Ledger, engine: GrabEngine, worker_id: int, worker_count: int, tuning: ExpiryTuning):
        interval_ms, batch_limit = tuning.expiry_sweep_interval_ms, tuning.expiry_sweep_batch
        assert interval_ms > 0 and batch_limit > 0 and 0 <= worker_id < worker_count
        self.ledger = ledger
        self.engine = engine
        self.worker_id = worker_id
        self.worker_count = worker_count
        self.interval_ms = interval_ms
        self.batch_limit = batch_limit
        self.sweeps = 0
        self.refunded = 0  # refunds this sweeper's requests committed

    async def run(self) -> None:
        while True:
            try:
                # A full batch settled means there may be more: sweep again at once.
                while await self.sweep_once() >= self.batch_limit:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: the next sweep retries
                log.warning("expiry sweep failed: %r", exc)
            await asyncio.sleep(self.interval_ms / 1000)

    async def sweep_once(self) -> int:
        """One pass: refunds the expired packets this worker owns; returns
        how many it settled (refunded now or found refunded already)."""
        self.sweeps += 1
        expired = await self.ledger.expired_packets(
            now_ms(), self.batch_limit, SHARD_COUNT - 1, shards_of(self.worker_id, self.worker_count)
        )
        mine = [pid for pid in expired if owner_of(pid, self.worker_count) == self.worker_id]
        if not mine:
            return 0
        engine = self.engine
        # Shielded: a sweep cancelled by stop() must not cancel the refunds
        # themselves, which the engine commits (and drain() waits for) anyway.
        results = await asyncio.gather(*(asyncio.shield(engine.expire(pid)) for pid in mine), return_exceptions=True)
        settled = 0
        for pid, r in zip(mine, results, strict=True):
            if isinstance(r, BaseException):
                continue
            settled += 1
            if r[1]:
                self.refunded += 1
                log.info("packet %d expired: %d cents refunded to its sender", pid, r[0])
        if settled < len(mine):
            log.warning("%d of %d refunds failed; the next sweep retries them", len(mine) - settled, len(mine))
        return settled
