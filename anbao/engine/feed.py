"""The event feed's live side, one per worker: the sequencer that numbers
committed events, the pruner, and the long polls waiting for news.

Numbering (storage/events.py, migration 0005) is one transaction at a time
per database; every worker runs a sequencer, poked by its own commits (grab
batches, refunds, deposits, withdrawals, sends), at most once per
`number_interval_ms`, and once per `poll_ms` anyway (facts of a worker
killed before it numbered them, or written by another process). The run
returns the head (the last number given): this worker wakes its own long
polls at once; the others hear it by LISTEN (the run NOTIFYs), or, while
their LISTEN connection is down, at their next poll.

A long poll holds no database connection while it waits: it waits on a
future here, bounded by `max_waiters` (past it: Busy).
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from ..clock import Wakeup
from ..config import EventTuning
from ..storage.events import EVENTS_CHANNEL, number_events, prune_events

log = logging.getLogger("anbao.feed")


class TooManyWaiters(Exception):
    """Every long-poll slot of this worker is taken."""


class EventFeed:
    def __init__(self, dsn: str, tuning: EventTuning):
        t = tuning
        assert t.events_number_interval_ms > 0 and t.events_poll_ms > 0 and t.max_event_waiters > 0
        self.dsn = dsn
        self.number_interval_s = t.events_number_interval_ms / 1000
        self.poll_s = t.events_poll_ms / 1000
        self.prune_interval_s = t.events_prune_interval_ms / 1000
        self.connect_timeout_s = t.events_connect_timeout_ms / 1000
        self.retention_ms = t.events_retention_ms
        self.retention_max_events = t.events_retention_max_events
        self.max_waiters = t.max_event_waiters
        self.head = 0  # the last event number known to be given
        self.pruned_through = 0
        self.runs = 0
        self.failures = 0
        self.notifications = 0
        self.listening = False
        self._poke = Wakeup()
        self._waiters: dict[asyncio.Future[None], int] = {}  # future -> the cursor it waits beyond
        self._conn: asyncpg.Connection | None = None
        self._listen_conn: asyncpg.Connection | None = None
        self._last_prune = 0.0
        self._closed = False
        self._failing = False

    # ------------------------------------------------------------ waking

    def poke(self) -> None:
        """Facts committed here: number them soon."""
        self._poke.set()

    def advance(self, head: int) -> None:
        """The feed's head is at least `head`: wake the polls it answers."""
        if head <= self.head:
            return
        self.head = head
        for fut, cursor in list(self._waiters.items()):
            if cursor < head and not fut.done():
                fut.set_result(None)

    @property
    def waiters(self) -> int:
        return len(self._waiters)

    async def wait_beyond(self, cursor: int, timeout_s: float) -> bool:
        """Waits until an event numbered above `cursor` exists, at most
        timeout_s; True when one does. Raises TooManyWaiters past the bound."""
        if self.head > cursor:
            return True
        if self._closed:
            return False
        if len(self._waiters) >= self.max_waiters:
            raise TooManyWaiters(f"{self.max_waiters} long polls already wait on this worker")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[fut] = cursor
        try:
            await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            return False
        finally:
            self._waiters.pop(fut, None)
        return self.head > cursor

    def release_waiters(self) -> None:
        """Stopping: every long poll answers now with what there is."""
        self._closed = True
        for fut in list(self._waiters):
            if not fut.done():
                fut.set_result(None)

    # ------------------------------------------------------------ the sequencer

    async def run(self) -> None:
        """Numbers what this worker (or anyone) committed; prunes; forever."""
        last_run = 0.0
        while True:
            await self._poke.wait(self.poll_s)
            # Batches commit back to back under load: one run per interval
            # numbers all of them (one more commit per interval, not per
            # batch). A poke after a quiet spell runs at once; the polls do
            # not count as runs for this.
            poked = self._poke.is_set()
            if poked:
                pause = last_run + self.number_interval_s - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                last_run = time.monotonic()
            self._poke.clear()
            now = time.monotonic()
            try:
                await self.number_once()
                if now - self._last_prune >= self.prune_interval_s:
                    self._last_prune = now
                    await self.prune_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: the next run tries again
                self.failures += 1
                if self._conn is not None:
                    self._conn.terminate()
                    self._conn = None
                # Once per outage, not once per poll (the worker's probe reports the outage).
                (log.debug if self._failing else log.warning)("event numbering failed: %r", exc)
                self._failing = True
            else:
                self._failing = False

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout_s)
        return self._conn

    async def number_once(self) -> int:
        head = await number_events(await self._connection())
        self.runs += 1
        self.advance(head)
        return head

    async def prune_once(self) -> int:
        self.pruned_through = await prune_events(await self._connection(), self.retention_ms, self.retention_max_events)
        return self.pruned_through

    # ------------------------------------------------------------ hearing the others

    async def listen(self) -> None:
        """LISTENs for the heads other workers' sequencers NOTIFY; reconnects."""
        pause_s = 0.05
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout_s)
                lost = asyncio.get_running_loop().create_future()
                conn.add_termination_listener(lambda _c, f=lost: f.done() or f.set_result(None))
                await conn.add_listener(EVENTS_CHANNEL, self._notified)
                self._listen_conn = conn
                self.listening = True
                pause_s = 0.05
                # Whatever was numbered while we were not listening.
                self.advance(int(await conn.fetchval("SELECT numbered_through FROM event_feed")))
                while not lost.done():
                    try:
                        await asyncio.wait_for(asyncio.shield(lost), self.poll_s * 10)
                    except TimeoutError:
                        await conn.fetchval("SELECT 1", timeout=self.connect_timeout_s)  # a dead server shows here
            except asyncio.CancelledError:
                if conn is not None:
                    conn.terminate()
                raise
            except Exception as exc:
                log.debug("event listener: %r", exc)
            self.listening = False
            self._listen_conn = None
            if conn is not None:
                conn.terminate()
            await asyncio.sleep(pause_s)
            pause_s = min(pause_s * 2, 2.0)

    def _notified(self, _conn, _pid, _channel, payload: str) -> None:
        self.notifications += 1
        try:
            self.advance(int(payload))
        except ValueError:
            log.warning("event listener: bad payload %r", payload)

    async def close(self) -> None:
        self.release_waiters()
        for conn in (self._conn, self._listen_conn):
            if conn is not None and not conn.is_closed():
                try:
                    await asyncio.wait_for(conn.close(), 5)
                except Exception:
                    conn.terminate()
        self._conn = self._listen_conn = None

    def stats(self) -> dict[str, int | bool]:
        return {
            "events_head": self.head,
            "events_pruned_through": self.pruned_through,
            "events_numbering_runs": self.runs,
            "events_numbering_failures": self.failures,
            "events_notifications": self.notifications,
            "events_listening": self.listening,
            "events_waiters": len(self._waiters),
        }
