"""BALANCE by group read (ARCHITECTURE.md "Reads without waiting").

A BALANCE is one statement, and most of its cost is the scan of the grabs
still rolling up (accounts.PENDING_GRABS_OF_USER), whatever the user: on an
evening that scan read ~150 pending batch rows, ~80 of a BALANCE's ~100 µs.
Here the BALANCEs that arrive while one read is out gather, and the next
read answers all of them with one statement and one scan
(accounts.BALANCES), in one snapshot. One read is out at a time: a read
takes a fraction of a millisecond, and a second in flight would only split
the next one. How many BALANCEs may wait is bounded by the dispatcher
(HandlerTuning.max_handlers_per_operation); a read carries at most
balance_read_max_users users.
"""

from __future__ import annotations

import asyncio

from ..config import HandlerTuning
from ..storage.ledger import Ledger


class BalanceReads:
    def __init__(self, ledger: Ledger, tuning: HandlerTuning):
        self.ledger = ledger
        self.max_users = tuning.balance_read_max_users
        # user -> the BALANCEs of that user waiting, in arrival order (a dict keeps it)
        self._waiting: dict[int, list[asyncio.Future[int | None]]] = {}
        self._reading = False
        self._kicked = False
        self.reads = 0  # STATS: reads done
        self.read_users = 0  # STATS: users they answered

    def balance(self, user_id: int) -> asyncio.Future[int | None]:
        """The user's BALANCE (posted plus grabs still rolling up), None
        without a wallet; or the database's exception."""
        fut: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(user_id, []).append(fut)
        self._kick()
        return fut

    def _kick(self) -> None:
        # One loop turn after the first: what arrives in the same turn goes in the same read.
        if not self._kicked and not self._reading:
            self._kicked = True
            asyncio.get_running_loop().call_soon(self._start)

    def _start(self) -> None:
        self._kicked = False
        if self._reading or not self._waiting:
            return
        users = list(self._waiting)[: self.max_users]
        batch = {u: self._waiting.pop(u) for u in users}
        self._reading = True
        asyncio.get_running_loop().create_task(self._read(batch))

    async def _read(self, batch: dict[int, list[asyncio.Future[int | None]]]) -> None:
        try:
            found = await self.ledger.balances(list(batch))
        except Exception as exc:  # the database's fault: every BALANCE of the read gets it
            for futs in batch.values():
                for f in futs:
                    if not f.done():
                        f.set_exception(exc)
        else:
            self.reads += 1
            self.read_users += len(batch)
            for user_id, futs in batch.items():
                for f in futs:
                    if not f.done():  # its handler is gone (cancelled at stop)
                        f.set_result(found.get(user_id))
        finally:
            self._reading = False
            if self._waiting:
                self._kick()

    def stats(self) -> dict[str, int]:
        return {"balance_reads": self.reads, "balance_read_users": self.read_users}
