"""Accounts: wallets, their balances, and the transfers between a wallet and
the outside world (DEPOSIT, WITHDRAW). Every money movement is a transfer
row that debits one account and credits another, in the same transaction as
the balance changes it causes."""

from __future__ import annotations

import asyncpg

from .commit import MAY_HOLD_ANY_USER, MAY_HOLD_USER, settle_user
from .domain import AccountKind, BatchResult, MoveRequest, Operation, Reason, Refused
from .idempotency import batch_results, put_back_all

_USER = f"kind = {AccountKind.USER:d}"
_EXTERNAL = f"kind = {AccountKind.EXTERNAL:d}"

WALLET = f"SELECT account_id, balance_cents FROM accounts WHERE {_USER} AND owner_id = $1"
# How many of the user ids in $1 have a wallet.
# Known here: a wallet of this set, or (several sets) a user of another set
# in the replicated directory (migration 0007), who may grab and be a member.
COUNT_REGISTERED = (
    f"SELECT count(*) FROM (SELECT owner_id FROM accounts WHERE {_USER} AND owner_id = ANY($1::bigint[])"
    " UNION SELECT user_id FROM user_directory WHERE user_id = ANY($1::bigint[])) k"
)

_REGISTER = (
    f"INSERT INTO accounts (kind, owner_id) SELECT {AccountKind.USER:d}, u FROM unnest($1::bigint[]) AS u"
    " ON CONFLICT DO NOTHING"
)
_KNOWN = (
    f"SELECT owner_id FROM accounts WHERE {_USER} AND owner_id = ANY($1::bigint[])"
    " UNION SELECT user_id FROM user_directory WHERE user_id = ANY($1::bigint[])"
)
# User $1's committed grabs still waiting for their roll-up: a roll-up moves
# a claim from here into a balance (or, for a user of another set, into a
# credit to that set) in one transaction, so one snapshot never counts it
# twice or not at all.
# A row's users array is read only where the user's bit says it may hold
# them (a CASE: the planner would test the array first).
PENDING_GRABS_OF_USER = (
    "COALESCE((SELECT sum(g.amount_cents) FROM grab_rollups r"
    " CROSS JOIN LATERAL unnest(r.users, r.amounts) AS g(user_id, amount_cents)"
    f" WHERE CASE WHEN {MAY_HOLD_USER} THEN r.users @> ARRAY[$1::bigint] ELSE false END"
    " AND g.user_id = $1), 0)::bigint"
)
# User $1's balance: posted plus pending grabs; NULL for no wallet.
BALANCE = f"SELECT a.balance_cents + {PENDING_GRABS_OF_USER} FROM accounts a WHERE a.{_USER} AND a.owner_id = $1"
# The same for each of the users in $1 that has a wallet: (user, balance).
# One scan of the pending grabs for all of them (the scan is most of a
# BALANCE's cost), in one snapshot, as above.
BALANCES = (
    "SELECT a.owner_id, a.balance_cents + COALESCE(p.cents, 0) FROM accounts a LEFT JOIN"
    " (SELECT g.user_id, sum(g.amount_cents)::bigint AS cents FROM grab_rollups r"
    " CROSS JOIN LATERAL unnest(r.users, r.amounts) AS g(user_id, amount_cents)"
    f" WHERE CASE WHEN {MAY_HOLD_ANY_USER} THEN r.users && $1::bigint[] ELSE false END"
    " AND g.user_id = ANY($1::bigint[]) GROUP BY g.user_id) p ON p.user_id = a.owner_id"
    f" WHERE a.{_USER} AND a.owner_id = ANY($1::bigint[])"
)


async def wallet(conn, user_id: int) -> asyncpg.Record:
    """The user's (account_id, balance_cents); UNKNOWN_USER without one."""
    row = await conn.fetchrow(WALLET, user_id)
    if row is None:
        raise Refused(Reason.UNKNOWN_USER, f"unknown user {user_id}")
    return row


class Accounts:
    pool: asyncpg.Pool

    async def register(self, user_ids: list[int]) -> int:
        """Opens a wallet for each id that has none; returns how many it opened."""
        async with self.pool.acquire() as conn:
            result = await conn.execute(_REGISTER, user_ids)
        return int(result.split()[-1])

    async def known_users(self, user_ids: list[int]) -> set[int]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(_KNOWN, user_ids)
        return {r[0] for r in rows}

    async def settle(self, user_id: int) -> None:
        """Rolls up the user's committed grabs, so that what they were told
        OK for is in their balance and statement (read-your-writes), and
        SEND and WITHDRAW can spend it."""
        async with self.pool.acquire() as conn:
            await settle_user(conn, user_id)

    async def balances(self, user_ids: list[int]) -> dict[int, int]:
        """BALANCE of each of the users: the posted balance plus the user's
        committed grabs still waiting for their roll-up, one statement for
        all of them, one snapshot (a roll-up moves a claim from one to the
        other in one transaction), no lock taken. A user without a wallet
        is missing from the answer."""
        assert user_ids and len(set(user_ids)) == len(user_ids)
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(BALANCES, user_ids)
        return {r[0]: r[1] for r in rows}

    async def move_batch(self, operation: Operation, moves: list[MoveRequest]) -> list[BatchResult]:
        """Runs a batch of DEPOSITs or of WITHDRAWs in one statement, one
        transaction, one commit (anbao_move_batch, storage/functions): each
        one transfer between the outside world and a wallet, or its
        refusal, decided in arrival order under the locks of the external
        account and the wallets, with its key's answer. One result per
        request, in order. Raises only for the database's faults, and then
        nothing in the batch happened."""
        assert operation in (Operation.DEPOSIT, Operation.WITHDRAW)
        assert moves and len({m.key for m in moves}) == len(moves), "one request per key in a batch"
        async with self.pool.acquire() as conn:
            try:
                rows = await conn.fetch(
                    "SELECT * FROM anbao_move_batch($1, $2, $3, $4, $5, $6)",
                    int(operation),
                    [m.key for m in moves],
                    [m.request_hash for m in moves],
                    [m.user_id for m in moves],
                    [m.amount_cents for m in moves],
                    [m.settled for m in moves],
                )
            except asyncpg.exceptions.SerializationError:
                return put_back_all(len(moves))  # anbao_store_keys: a key stored meanwhile
        return batch_results(rows, len(moves))
