"""The event feed's storage (migration 0005): numbering, reading, pruning.

The facts write their own event rows (a trigger on transfers, and the grab
batch's INSERT in commit.py). What is here runs off the fact path: the
sequencer that numbers committed rows (one at a time per database), the
reader that expands them into events, and the pruner that keeps retention.
"""

from __future__ import annotations

from .domain import EventPage

EVENTS_CHANNEL = "anbao_events"  # NOTIFY payload: the new head (the last number given)

# Each event with the transfer it records (anbao_events_page): a SENT,
# REFUNDED, DEPOSIT, WITHDRAWAL or CROSS_SET_CREDIT event names one; a
# grab batch's events (SHARE_TAKEN, SOLD_OUT) have none, 0 (a share's
# transfer is written later, by its roll-up).
_READ = (
    "SELECT f.numbered_through, f.pruned_through, e.* FROM event_feed f"
    " LEFT JOIN LATERAL anbao_events_page($1, $2) e ON $1 >= f.pruned_through ORDER BY e.no"
)


async def number_events(conn) -> int:
    """Numbers every committed unnumbered event row and NOTIFYs; returns the
    head. Its own transaction (the caller's connection must be idle)."""
    return int(await conn.fetchval("SELECT anbao_number_events()"))


async def read_events(conn, cursor: int, limit: int) -> EventPage:
    """Events numbered above `cursor`, at most `limit`, with the head and
    the oldest valid cursor, in one snapshot. A cursor below pruned_through
    reads nothing (its caller answers CURSOR_EXPIRED)."""
    rows = await conn.fetch(_READ, cursor, limit)
    head, pruned = rows[0][0], rows[0][1]
    events = [tuple(r)[2:] for r in rows if r[2] is not None]
    return EventPage(events, head, pruned)


async def feed_head(conn) -> tuple[int, int]:
    """(numbered_through, pruned_through)."""
    row = await conn.fetchrow("SELECT numbered_through, pruned_through FROM event_feed")
    return row[0], row[1]


async def prune_events(conn, retention_ms: int, keep_events: int) -> int:
    """Deletes events older than retention_ms, and the oldest beyond
    keep_events; returns pruned_through, the oldest valid cursor."""
    return int(
        await conn.fetchval(
            "SELECT anbao_prune_events(now() - make_interval(secs => $1::float8 / 1000), $2)", retention_ms, keep_events
        )
    )
