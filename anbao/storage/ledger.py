"""The ledger in PostgreSQL: every money movement is a transfer row that
debits one account and credits another, in the same transaction as the
balance changes it causes.

Nothing here keeps state between calls; the server's in-memory packet states
are rebuilt from these tables (load_packet) whenever they are missing.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

import asyncpg

from anbao_client import protocol
from anbao_client.protocol import Audience, PacketStatus, Status
from ..core import packets
from anbao_client import routing
from .commit import settle_user

log = logging.getLogger("anbao.ledger")

ACCOUNT_EXTERNAL, ACCOUNT_USER, ACCOUNT_ESCROW = 0, 1, 2
T_DEPOSIT, T_WITHDRAW, T_SEND, T_GRAB, T_REFUND = 1, 2, 3, 4, 5
PACKET_OPEN, PACKET_SOLD_OUT, PACKET_EXPIRED, PACKET_REFUNDED = 0, 1, 2, 3


class Refused(Exception):
    """A business rule refused the request; nothing was written but the
    idempotency record of this answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def request_hash(opcode: int, fields: tuple) -> bytes:
    """What a retry must repeat exactly to count as the same request."""
    return hashlib.sha256(repr((opcode, fields)).encode()).digest()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class StoredAnswer:
    status: int
    body: bytes
    replayed: bool


class Ledger:
    def __init__(self, pool: asyncpg.Pool, set_id: int):
        self.pool = pool
        self.set_id = set_id

    @classmethod
    async def open(cls, dsn: str, set_id: int, pool_size: int) -> "Ledger":
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=pool_size)
        return cls(pool, set_id)

    async def close(self) -> None:
        await self.pool.close()

    # ------------------------------------------------------------ idempotency

    async def idempotent(self, key: bytes, opcode: int, fields: tuple, body) -> StoredAnswer:
        """Runs body(conn) -> (status, answer_body) at most once per key.

        The key is claimed by INSERT under its primary key: a concurrent
        duplicate waits on the first one's row lock and, once that commits,
        reads its answer. A failed transaction releases the key with it. A
        refusal (Refused) is an answer too: it is stored, and replayed.
        """
        assert len(key) == protocol.IDEMPOTENCY_KEY_BYTES
        digest = request_hash(opcode, fields)
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                claimed = await conn.fetchval(
                    "INSERT INTO idempotency_keys (key, opcode, request_hash) VALUES ($1, $2, $3)"
                    " ON CONFLICT DO NOTHING RETURNING true", key, opcode, digest)
                if not claimed:
                    row = await conn.fetchrow(
                        "SELECT opcode, request_hash, status, response FROM idempotency_keys WHERE key = $1", key)
                    assert row is not None and row["status"] is not None
                    if row["opcode"] != opcode or row["request_hash"] != digest:
                        raise Refused(Status.IDEMPOTENCY_CONFLICT,
                                      "idempotency key reused with different parameters")
                    return StoredAnswer(row["status"], row["response"], True)
                try:
                    # A savepoint around the body: a refusal undoes whatever
                    # the body wrote before it, and only the answer is kept.
                    async with conn.transaction():
                        status, answer = Status.OK, await body(conn)
                except Refused as refusal:
                    status, answer = refusal.status, str(refusal).encode()
                await conn.execute("UPDATE idempotency_keys SET status = $2, response = $3 WHERE key = $1",
                                   key, status, answer)
                return StoredAnswer(status, answer, False)

    # ------------------------------------------------------------ accounts

    async def register(self, user_ids: list[int]) -> int:
        async with self.pool.acquire() as conn:
            result = await conn.execute(
                "INSERT INTO accounts (kind, owner_id) SELECT 1, u FROM unnest($1::bigint[]) AS u"
                " ON CONFLICT DO NOTHING", user_ids)
        return int(result.split()[-1])

    async def known_users(self, user_ids: list[int]) -> set[int]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT owner_id FROM accounts WHERE kind = 1 AND owner_id = ANY($1::bigint[])",
                                    user_ids)
        return {r[0] for r in rows}

    async def settle(self, user_id: int) -> None:
        """Rolls up the user's committed grabs, so that what they were told
        OK for is in their balance and statement (read-your-writes), and
        SEND and WITHDRAW can spend it."""
        async with self.pool.acquire() as conn:
            await settle_user(conn, user_id)

    async def balance(self, user_id: int) -> int:
        """The posted balance plus the user's committed grabs still waiting
        for their roll-up: one statement, one snapshot (a roll-up moves a
        claim from one to the other in one transaction), no lock taken."""
        async with self.pool.acquire() as conn:
            bal = await conn.fetchval(
                "SELECT a.balance_cents + COALESCE((SELECT sum(g.amount_cents) FROM grab_rollups r"
                " CROSS JOIN LATERAL unnest(r.users, r.amounts) AS g(user_id, amount_cents)"
                " WHERE r.users @> ARRAY[$1::bigint] AND g.user_id = $1), 0)::bigint"
                " FROM accounts a WHERE a.kind = 1 AND a.owner_id = $1", user_id)
        if bal is None:
            raise Refused(Status.UNKNOWN_USER, f"unknown user {user_id}")
        return bal

    @staticmethod
    async def deposit(conn, user_id: int, amount_cents: int) -> tuple[int, int]:
        """external -> user. Returns (balance_cents, transfer_id)."""
        assert amount_cents > 0
        row = await conn.fetchrow("SELECT account_id FROM accounts WHERE kind = 1 AND owner_id = $1", user_id)
        if row is None:
            raise Refused(Status.UNKNOWN_USER, f"unknown user {user_id}")
        return await Ledger._move(conn, T_DEPOSIT, "(SELECT account_id FROM accounts WHERE kind = 0)",
                                  row[0], amount_cents, None)

    @staticmethod
    async def withdraw(conn, user_id: int, amount_cents: int) -> tuple[int, int]:
        """user -> external. Returns (balance_cents, transfer_id); a balance
        below the amount is INSUFFICIENT_FUNDS, decided under the wallet's
        row lock, so concurrent withdrawals, sends and grabs can never take
        it below zero (the CHECK accounts_no_overdraft is only the last line)."""
        assert amount_cents > 0
        # The external account first, then the wallet: the order deposits
        # take them in. NO KEY UPDATE, not UPDATE: the transfers' foreign-key
        # checks take KEY SHARE on these rows, and must not deadlock with us.
        external = await conn.fetchval("SELECT account_id FROM accounts WHERE kind = 0 FOR NO KEY UPDATE")
        wallet = await conn.fetchrow("SELECT account_id, balance_cents FROM accounts"
                                     " WHERE kind = 1 AND owner_id = $1 FOR NO KEY UPDATE", user_id)
        if wallet is None:
            raise Refused(Status.UNKNOWN_USER, f"unknown user {user_id}")
        if wallet["balance_cents"] < amount_cents:
            raise Refused(Status.INSUFFICIENT_FUNDS, f"balance {wallet['balance_cents']} below {amount_cents}")
        tid = await conn.fetchval(
            "INSERT INTO transfers (kind, debit_account, credit_account, amount_cents)"
            " VALUES ($1, $2, $3, $4) RETURNING transfer_id", T_WITHDRAW, wallet["account_id"], external, amount_cents)
        await conn.execute("UPDATE accounts SET balance_cents = balance_cents + $2 WHERE account_id = $1",
                           external, amount_cents)
        balance = await conn.fetchval("UPDATE accounts SET balance_cents = balance_cents - $2"
                                      " WHERE account_id = $1 RETURNING balance_cents", wallet["account_id"],
                                      amount_cents)
        assert balance == wallet["balance_cents"] - amount_cents >= 0
        return balance, tid

    @staticmethod
    async def _move(conn, kind: int, debit_sql: str, credit: int, amount_cents: int,
                    packet_id: int | None) -> tuple[int, int]:
        """One transfer and its two balance changes; returns the credited
        balance and the transfer id."""
        tid, debit = await conn.fetchrow(
            f"INSERT INTO transfers (kind, debit_account, credit_account, amount_cents, packet_id)"
            f" VALUES ($1, {debit_sql}, $2, $3, $4) RETURNING transfer_id, debit_account",
            kind, credit, amount_cents, packet_id)
        # In account-id order, like the grab batches, so no two transactions
        # ever wait on each other's rows in opposite orders.
        for account, delta in sorted([(debit, -amount_cents), (credit, amount_cents)]):
            bal = await conn.fetchval("UPDATE accounts SET balance_cents = balance_cents + $2"
                                      " WHERE account_id = $1 RETURNING balance_cents", account, delta)
            if account == credit:
                credited = bal
        return credited, tid

    # ------------------------------------------------------------ packets

    async def send(self, conn, shard: int, sender_id: int, total_cents: int, count: int, mode: int,
                   min_share_cents: int, expires_at_ms: int, audience: int, members: list[int],
                   greeting: str) -> tuple[int, int, list[int] | None]:
        """sender -> new escrow, and the packet row, with an id in `shard`.
        Returns (packet_id, sender balance, the eligible users or None for an
        open packet). For a group, `members` is [group_id] and the group's
        members other than the sender are snapshotted into packet_members:
        membership at send time counts."""
        sender = await conn.fetchrow(
            "SELECT account_id, balance_cents FROM accounts WHERE kind = 1 AND owner_id = $1 FOR UPDATE", sender_id)
        if sender is None:
            raise Refused(Status.UNKNOWN_USER, f"unknown sender {sender_id}")
        if sender["balance_cents"] < total_cents:
            raise Refused(Status.INSUFFICIENT_FUNDS, f"balance {sender['balance_cents']} below {total_cents}")
        group_id = None
        if audience == Audience.GROUP:
            [group_id] = members
            # FOR SHARE: a membership change (which locks the group row FOR
            # UPDATE) lands wholly before or wholly after this snapshot.
            if await conn.fetchval("SELECT 1 FROM groups WHERE group_id = $1 FOR SHARE", group_id) is None:
                raise Refused(Status.UNKNOWN_GROUP, f"unknown group {group_id}")
            members = [r[0] for r in await conn.fetch(
                "SELECT user_id FROM group_members WHERE group_id = $1 AND user_id <> $2", group_id, sender_id)]
            if count > len(members):
                raise Refused(Status.INVALID, f"{count} shares for {len(members)} group members besides the sender:"
                                          " the packet could never sell out")
        elif members:
            found = await conn.fetchval("SELECT count(*) FROM accounts WHERE kind = 1 AND owner_id = ANY($1::bigint[])",
                                        members)
            if found != len(members):
                raise Refused(Status.UNKNOWN_USER, f"{len(members) - found} member(s) are not registered")
        packet_id = routing.make_packet_id(self.set_id, await conn.fetchval("SELECT nextval('packet_seq')"), shard)
        escrow = await conn.fetchval("INSERT INTO accounts (kind, owner_id) VALUES (2, $1) RETURNING account_id",
                                     packet_id)
        await conn.execute(
            "INSERT INTO packets (packet_id, sender_id, escrow_account_id, total_cents, share_count, mode,"
            " min_share_cents, audience, greeting, expires_at, group_id)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, to_timestamp($10::float8 / 1000), $11)",
            packet_id, sender_id, escrow, total_cents, count, mode, min_share_cents, audience, greeting,
            expires_at_ms, group_id)
        if members:
            await conn.execute("INSERT INTO packet_members (packet_id, user_id) SELECT $1, unnest($2::bigint[])",
                               packet_id, members)
        await self._move(conn, T_SEND, str(int(sender["account_id"])), escrow, total_cents, packet_id)
        return packet_id, sender["balance_cents"] - total_cents, (None if audience == Audience.OPEN else members)

    async def load_packet(self, packet_id: int):
        """The packet's durable state, for rebuilding its in-memory state."""
        async with self.pool.acquire() as conn:
            p = await conn.fetchrow(
                "SELECT sender_id, total_cents, share_count, mode, min_share_cents, audience, status,"
                " (extract(epoch FROM expires_at) * 1000)::bigint AS expires_at_ms FROM packets WHERE packet_id = $1",
                packet_id)
            if p is None:
                return None
            claims = await conn.fetch("SELECT user_id, seq, amount_cents FROM anbao_claims_of($1)", packet_id)
            members = None
            if p["audience"] != Audience.OPEN:
                members = [r[0] for r in await conn.fetch(
                    "SELECT user_id FROM packet_members WHERE packet_id = $1", packet_id)]
        return packets.PacketState(packet_id, p["sender_id"], p["total_cents"], p["share_count"], p["mode"],
                              p["min_share_cents"], p["expires_at_ms"], members,
                              [tuple(c) for c in claims], p["status"] == PacketStatus.REFUNDED)

    async def packet_info(self, packet_id: int, offset: int, limit: int):
        """The packet as its claims show it: counters and status come from
        the claims themselves (rolled up or pending), so a claim is shown the
        moment its grab is acknowledged. One statement: one snapshot, one
        round trip, and the claims read once."""
        async with self.pool.acquire() as conn:
            p = await conn.fetchrow(
                "WITH c AS MATERIALIZED (SELECT seq, user_id, amount_cents FROM anbao_claims_of($2))"
                f" SELECT sender_id, total_cents, share_count, mode, {_SHOWN_STATUS} AS status, audience,"
                " greeting, (extract(epoch FROM created_at) * 1000)::bigint AS created_ms,"
                " (extract(epoch FROM expires_at) * 1000)::bigint AS expires_ms, refunded_cents,"
                " (SELECT count(*)::int FROM c) AS claimed_count,"
                " (SELECT COALESCE(sum(amount_cents), 0)::bigint FROM c) AS claimed_cents,"
                " (SELECT seq FROM c ORDER BY amount_cents DESC, seq LIMIT 1) AS luckiest,"
                " (SELECT array_agg(ARRAY[pg.seq, pg.user_id, pg.amount_cents] ORDER BY pg.seq)"
                "  FROM (SELECT * FROM c ORDER BY seq OFFSET $3 LIMIT $4) pg) AS page"
                " FROM packets WHERE packet_id = $2", now_ms(), packet_id, offset, limit)
        if p is None:
            return None
        claimed_count = p["claimed_count"]
        status = p["status"]
        if status != PACKET_REFUNDED and claimed_count == p["share_count"]:
            status = PACKET_SOLD_OUT
        # The luckiest claim is named once the claim list is final: sold
        # out, or refunded after expiry.
        luckiest = p["luckiest"] if status in (PACKET_SOLD_OUT, PACKET_REFUNDED) and claimed_count else 0
        head = (p["sender_id"], p["total_cents"], p["share_count"], p["mode"], status, p["audience"],
                p["created_ms"], p["expires_ms"], p["claimed_cents"], claimed_count, p["refunded_cents"], luckiest)
        return head, p["greeting"], [(int(r[0]), r[1], r[2]) for r in (p["page"] or [])]

    # ------------------------------------------------------------ history

    async def _wallet(self, conn, user_id: int):
        row = await conn.fetchrow("SELECT account_id, balance_cents FROM accounts WHERE kind = 1 AND owner_id = $1",
                                  user_id)
        if row is None:
            raise Refused(Status.UNKNOWN_USER, f"unknown user {user_id}")
        return row

    async def statement(self, user_id: int, before: int, limit: int) -> tuple[int, list[tuple], int]:
        """(balance, up to `limit` transfers touching the wallet newest first as
        (transfer_id, kind, signed amount, packet_id or 0, at_ms), next cursor
        or 0). Balance and rows are one snapshot, so the newest page adds up."""
        async with self.pool.acquire() as conn:
            await settle_user(conn, user_id)
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                wallet = await self._wallet(conn, user_id)
                rows = await conn.fetch(
                    "SELECT * FROM ("
                    " (SELECT transfer_id, kind, amount_cents AS signed, packet_id, created_at FROM transfers"
                    "  WHERE credit_account = $1 AND transfer_id < $2 ORDER BY transfer_id DESC LIMIT $3)"
                    " UNION ALL"
                    " (SELECT transfer_id, kind, -amount_cents, packet_id, created_at FROM transfers"
                    "  WHERE debit_account = $1 AND kind IN (2, 3) AND transfer_id < $2"
                    "  ORDER BY transfer_id DESC LIMIT $3)) t"
                    " ORDER BY transfer_id DESC LIMIT $3",
                    wallet["account_id"], before or _NEWEST, limit + 1)
        page = [(r[0], r[1], r[2], r[3] or 0, _ms(r[4])) for r in rows[:limit]]
        return wallet["balance_cents"], page, (page[-1][0] if len(rows) > limit else 0)

    async def sent_packets(self, user_id: int, before: int, limit: int) -> tuple[list[tuple], int]:
        """A sender's packets newest first: (packet_id, total_cents, count,
        claimed_count, claimed_cents, refunded_cents, status, audience,
        created_at_ms, expires_at_ms), and the next cursor or 0."""
        async with self.pool.acquire() as conn:
            await self._wallet(conn, user_id)
            rows = await conn.fetch(
                # Counters from the claims, as PACKET shows them: a claim
                # counts from its acknowledgement, before its roll-up.
                "SELECT packet_id, total_cents, share_count, c.n, c.s, refunded_cents,"
                f" CASE WHEN status <> 3 AND c.n = share_count THEN 1 ELSE {_SHOWN_STATUS} END, audience,"
                " (extract(epoch FROM created_at) * 1000)::bigint, (extract(epoch FROM expires_at) * 1000)::bigint"
                " FROM packets CROSS JOIN LATERAL (SELECT count(*)::int AS n, COALESCE(sum(amount_cents), 0)::bigint"
                " AS s FROM anbao_claims_of(packets.packet_id)) c"
                " WHERE sender_id = $2 AND packet_id < $3 ORDER BY packet_id DESC LIMIT $4",
                now_ms(), user_id, before or _NEWEST, limit + 1)
        page = [tuple(r) for r in rows[:limit]]
        return page, (page[-1][0] if len(rows) > limit else 0)

    async def received_shares(self, user_id: int, before: int, limit: int) -> tuple[list[tuple], int]:
        """The shares a user grabbed, newest grab first: (packet_id,
        sender_id, seq, amount_cents, claimed_at_ms), and the next cursor (a
        transfer id) or 0."""
        async with self.pool.acquire() as conn:
            await settle_user(conn, user_id)
            wallet = await self._wallet(conn, user_id)
            rows = await conn.fetch(
                "SELECT t.transfer_id, t.packet_id, p.sender_id, c.seq, t.amount_cents, c.created_at"
                " FROM transfers t"
                " JOIN claims c ON c.packet_id = t.packet_id AND c.user_id = $4"
                " JOIN packets p ON p.packet_id = t.packet_id"
                " WHERE t.credit_account = $1 AND t.kind = 4 AND t.transfer_id < $2"
                " ORDER BY t.transfer_id DESC LIMIT $3",
                wallet["account_id"], before or _NEWEST, limit + 1, user_id)
        page = [(r[1], r[2], r[3], r[4], _ms(r[5])) for r in rows[:limit]]
        return page, (rows[limit - 1][0] if len(rows) > limit else 0)

    # ------------------------------------------------------------ groups

    async def _check_registered(self, conn, user_ids: list[int]) -> None:
        found = await conn.fetchval("SELECT count(*) FROM accounts WHERE kind = 1 AND owner_id = ANY($1::bigint[])",
                                    user_ids)
        if found != len(set(user_ids)):
            raise Refused(Status.UNKNOWN_USER, f"{len(set(user_ids)) - found} user(s) are not registered")

    async def _lock_group(self, conn, group_id: int) -> None:
        # Membership changes of one group are serialized on its row, and a
        # SEND snapshots under FOR SHARE of the same row.
        if await conn.fetchval("SELECT 1 FROM groups WHERE group_id = $1 FOR UPDATE", group_id) is None:
            raise Refused(Status.UNKNOWN_GROUP, f"unknown group {group_id}")

    async def group_create(self, group_id: int, name: str, members: list[int],
                           max_members: int) -> tuple[bool, int]:
        """Creates the group with these members; returns (created, member
        count). An id that exists already is left as it is (created False),
        so a retry after a lost answer changes nothing."""
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                if members:
                    await self._check_registered(conn, members)
                created = await conn.fetchval("INSERT INTO groups (group_id, name) VALUES ($1, $2)"
                                              " ON CONFLICT DO NOTHING RETURNING true", group_id, name)
                if created and members:
                    assert len(members) <= max_members
                    await conn.execute("INSERT INTO group_members (group_id, user_id)"
                                       " SELECT $1, u FROM unnest($2::bigint[]) AS u ON CONFLICT DO NOTHING",
                                       group_id, members)
                n = await conn.fetchval("SELECT count(*) FROM group_members WHERE group_id = $1", group_id)
        return bool(created), n

    async def group_add(self, group_id: int, user_ids: list[int], max_members: int) -> tuple[int, int]:
        """Adds members; returns (newly added, member count). Above
        max_members the whole change is refused."""
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await self._lock_group(conn, group_id)
                await self._check_registered(conn, user_ids)
                added = await conn.fetchval(
                    "WITH ins AS (INSERT INTO group_members (group_id, user_id)"
                    " SELECT $1, u FROM unnest($2::bigint[]) AS u ON CONFLICT DO NOTHING RETURNING 1)"
                    " SELECT count(*) FROM ins", group_id, user_ids)
                n = await conn.fetchval("SELECT count(*) FROM group_members WHERE group_id = $1", group_id)
                if n > max_members:
                    raise Refused(Status.INVALID, f"a group holds at most {max_members} members")
        return added, n

    async def group_remove(self, group_id: int, user_ids: list[int]) -> tuple[int, int]:
        """Removes members; returns (removed, member count). Packets sent
        before keep the members they were sent to."""
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await self._lock_group(conn, group_id)
                await self._check_registered(conn, user_ids)
                removed = await conn.fetchval(
                    "WITH del AS (DELETE FROM group_members WHERE group_id = $1 AND user_id = ANY($2::bigint[])"
                    " RETURNING 1) SELECT count(*) FROM del", group_id, user_ids)
                n = await conn.fetchval("SELECT count(*) FROM group_members WHERE group_id = $1", group_id)
        return removed, n

    async def group_info(self, group_id: int, after: int, limit: int) -> tuple[str, int, list[int], int]:
        """(name, member count, up to `limit` member ids above `after` in
        id order, next cursor or 0)."""
        async with self.pool.acquire() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                name = await conn.fetchval("SELECT name FROM groups WHERE group_id = $1", group_id)
                if name is None:
                    raise Refused(Status.UNKNOWN_GROUP, f"unknown group {group_id}")
                n = await conn.fetchval("SELECT count(*) FROM group_members WHERE group_id = $1", group_id)
                ids = [r[0] for r in await conn.fetch(
                    "SELECT user_id FROM group_members WHERE group_id = $1 AND user_id > $2"
                    " ORDER BY user_id LIMIT $3", group_id, after, limit + 1)]
        page = ids[:limit]
        return name, n, page, (page[-1] if len(ids) > limit else 0)

    # ------------------------------------------------------------ expiry

    async def expired_packets(self, at_ms: int, limit: int, worker_id: int = 0, worker_count: int = 1) -> list[int]:
        """Packets still open (not sold out, not refunded) whose expiry is at
        or before at_ms and that worker_id owns, oldest expiry first. The
        ownership rule (anbao/routing.py) is applied in the query, so one
        worker's backlog never hides another's."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT packet_id FROM packets WHERE status IN (0, 2)"
                " AND expires_at <= to_timestamp($1::float8 / 1000)"
                " AND ((packet_id & $4) % $5) = $3"
                " ORDER BY expires_at LIMIT $2", at_ms, limit, worker_id, routing.SHARD_COUNT - 1, worker_count)
        return [r[0] for r in rows]


# Paging from the top: below every id.
_NEWEST = 2**63 - 1
# What a reader is shown as the status: an open packet past its expiry is
# "expired" (2) until its refund commits; $1 is the server's clock in ms,
# the clock GRAB decides expiry by.
_SHOWN_STATUS = "CASE WHEN status = 0 AND expires_at <= to_timestamp($1::float8 / 1000) THEN 2 ELSE status END"


def _ms(ts) -> int:
    return int(ts.timestamp() * 1000)
