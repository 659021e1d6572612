"""The ledger in PostgreSQL: the one object the server holds for everything
off the grab path. Each job lives in its own module and is mixed in here:

    idempotency.py  the request hash a key stores, and a batch's results
    accounts.py     wallets, balances, deposits and withdrawals
    packets.py      SEND, a packet's durable state, PACKET, expiry
    history.py      statements, sent packets, received shares
    groups.py       groups and their members
    events.py       the event feed: reading it (numbering and pruning run in engine/feed.py)

(The grab path's own writes, the batch commit and the roll-up, are in
commit.py.) Nothing here keeps state between calls; the server's in-memory
packet states are rebuilt from these tables (load_packet) whenever they are
missing. Storage speaks its own types (domain.py), never the wire's.
"""

from __future__ import annotations

import asyncpg

from .accounts import Accounts
from .domain import EventPage, Reason, Refused
from .events import read_events
from .groups import Groups
from .history import History
from .packets import Packets
from .sets import balance_at_home

__all__ = ["Ledger", "Refused"]


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What a pooled connection is reset with when released: nothing beyond
    asyncpg's own rollback of an open transaction. Its default runs
    `pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL` at every
    release, a round trip and a tenth of a worker's samples under a storm of
    first grabs (py-spy), for state the ledger never leaves: its locks are
    transaction-scoped (pg_advisory_xact_lock), it changes no setting, its
    cursors inside transactions, and LISTEN and session locks are taken on
    connections of their own (engine/feed.py, storage/migrate.py,
    storage/resync.py). Keep it so: a session-level lock taken on a pooled
    connection would outlive its user."""


class Ledger(Accounts, Packets, History, Groups):
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    @classmethod
    async def open(cls, dsn: str, pool_size: int) -> Ledger:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=pool_size, reset=_keep_session)
        return cls(pool)

    async def events(self, cursor: int, limit: int) -> EventPage:
        async with self.pool.acquire() as conn:
            return await read_events(conn, cursor, limit)

    async def balance_at_home(self, me: int, user_id: int) -> tuple[int, dict[int, int]]:
        """BALANCE at the user's home set of several: the balance and what
        each other set has credited here (storage.sets.balance_at_home)."""
        async with self.pool.acquire() as conn:
            bal, applied = await balance_at_home(conn, me, user_id)
        if bal is None:
            raise Refused(Reason.UNKNOWN_USER, f"unknown user {user_id}")
        return bal, applied

    async def close(self) -> None:
        await self.pool.close()
