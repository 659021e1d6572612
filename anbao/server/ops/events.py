"""EVENTS: the event feed, read from a cursor, long-polled when there is
nothing newer. The server keeps no consumer state: the cursor is the
consumer's. A waiting poll holds no database connection (engine/feed.py)."""

from __future__ import annotations

from anbao_client.protocol import Op, Status

from ...engine.feed import TooManyWaiters
from ...storage.domain import EventPage
from .. import answers
from .base import Context, Refused

MAX_EVENT_NUMBER = 2**63 - 1  # event numbers are PostgreSQL BIGINTs


async def _read(ctx: Context, rid: int, cursor: int, limit: int) -> EventPage | bytes:
    page = await ctx.ledger.events(cursor, limit)
    if cursor < page.pruned_through:
        return answers.error(
            Op.EVENTS,
            rid,
            ctx.worker_id,
            Status.CURSOR_EXPIRED,
            f"cursor {cursor} is older than the feed's retention: resume from cursor {page.pruned_through}",
            page.pruned_through,
        )
    if cursor > page.head:
        raise Refused(Status.INVALID, f"cursor {cursor} is ahead of the feed (last event {page.head})")
    if ctx.feed is not None:
        ctx.feed.advance(page.head)
    return page


async def events(ctx: Context, rid: int, cursor: int, limit: int, wait_ms: int) -> bytes:
    lim = ctx.limits
    if not 0 < limit <= lim.wire.events_max_page:
        raise Refused(Status.INVALID, f"limit must be 1..{lim.wire.events_max_page}")
    if cursor > MAX_EVENT_NUMBER - limit:
        # The page's last number, cursor + limit, is a BIGINT in PostgreSQL:
        # refused here rather than overflowing there. No feed numbers that high.
        raise Refused(Status.INVALID, f"cursor {cursor} is ahead of any feed (cursor + limit must fit in i64)")
    page = await _read(ctx, rid, cursor, limit)
    if isinstance(page, bytes):
        return page
    if not page.events and wait_ms and ctx.feed is not None:
        try:
            news = await ctx.feed.wait_beyond(cursor, min(wait_ms, lim.events.events_max_wait_ms) / 1000)
        except TooManyWaiters as exc:
            raise Refused(Status.BUSY, str(exc)) from None
        if news:
            page = await _read(ctx, rid, cursor, limit)
            if isinstance(page, bytes):
                return page
    rows = [e[:-1] for e in page.events]
    transfer_ids = [e[-1] for e in page.events]
    return answers.ok(Op.EVENTS, rid, ctx.worker_id, rows[-1][0] if rows else cursor, page.head, rows, transfer_ids)
