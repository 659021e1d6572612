"""What every handler shares: the context it is given (not the worker),
the refusal it raises, and the small rules several handlers apply."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from anbao_client.protocol import Status

from ...config import Limits
from ...engine.batches import KeyedWrites
from ...engine.feed import EventFeed
from ...engine.grabs import GrabEngine
from ...engine.reads import BalanceReads
from ...storage.ledger import Ledger


class Refused(Exception):
    """The request is refused before storage is asked: answered `status`."""

    def __init__(self, status: Status, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Context:
    """Exactly what the handlers need of their worker."""

    worker_id: int
    worker_count: int
    set_id: int
    limits: Limits
    dsn: str
    ledger: Ledger
    engine: GrabEngine
    writes: KeyedWrites  # SEND, DEPOSIT, WITHDRAW by group commit
    reads: BalanceReads  # BALANCE by group read
    own_shards: list[int]  # the shards this worker creates packets in (it owns them)
    stats: Callable[[], dict[str, Any]]  # the worker's STATS document
    feed: EventFeed | None = None  # the event feed (EVENTS); poked by every money write
    # Several sets: (user, cents applied here from each set) -> (cents the
    # other sets owe the user beyond that, sets not answering); server/sets.py SetPeers.
    in_flight: Callable[[int, dict[int, int]], Awaitable[tuple[int, int]]] | None = None
    _next_shard: int = field(default=0, repr=False)

    def next_shard(self) -> int:
        """A new packet's shard: one of this worker's, in turn."""
        shard = self.own_shards[self._next_shard]
        self._next_shard = (self._next_shard + 1) % len(self.own_shards)
        return shard


def facts_written(ctx: Context) -> None:
    """A money fact committed (its event row with it): number it soon."""
    if ctx.feed is not None:
        ctx.feed.poke()


def page_limit(ctx: Context, limit: int) -> int:
    if not 0 < limit <= ctx.limits.wire.max_page_rows:
        raise Refused(Status.INVALID, f"limit must be 1..{ctx.limits.wire.max_page_rows}")
    return limit


def member_list(ctx: Context, user_ids: list[int], least: int) -> list[int]:
    most = ctx.limits.wire.max_members
    if not least <= len(user_ids) <= most:
        raise Refused(Status.INVALID, f"a member list holds {least}..{most} users")
    if len(set(user_ids)) != len(user_ids):
        raise Refused(Status.INVALID, "member list repeats a user")
    return user_ids
