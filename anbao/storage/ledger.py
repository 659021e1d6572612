"""The ledger in PostgreSQL: every money movement is a transfer row that
debits one account and credits another, in the same transaction as the
balance changes it causes.

Nothing here keeps state between calls; the server's in-memory packet states
are rebuilt from these tables (load_packet) whenever they are missing.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass

import asyncpg

from .. import _fastpath as fp
from .. import routing

log = logging.getLogger("anbao.ledger")

ACCOUNT_EXTERNAL, ACCOUNT_USER, ACCOUNT_ESCROW = 0, 1, 2
T_DEPOSIT, T_WITHDRAW, T_SEND, T_GRAB, T_REFUND = 1, 2, 3, 4, 5
BATCH_BLOCK_BITS = 20

# Server errors that mean the backend is going away, not that it refused
# the statement: a COMMIT under them may or may not have happened.
SERVER_GONE_ERRORS = (asyncpg.exceptions.AdminShutdownError, asyncpg.exceptions.CrashShutdownError,
                      asyncpg.exceptions.CannotConnectNowError, asyncpg.exceptions.PostgresConnectionError)
# Errors that reaching the database again may cure.
CONNECT_ERRORS = (asyncpg.exceptions.InterfaceError, asyncpg.PostgresError, ConnectionError, OSError,
                  asyncio.TimeoutError, TimeoutError)


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
        reads its answer. A failed transaction releases the key with it.
        """
        assert len(key) == fp.IDEMPOTENCY_KEY_BYTES
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
                        raise Refused(fp.IDEMPOTENCY_CONFLICT,
                                      "idempotency key reused with different parameters")
                    return StoredAnswer(row["status"], row["response"], True)
                try:
                    status, answer = fp.OK, await body(conn)
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

    async def balance(self, user_id: int) -> int:
        async with self.pool.acquire() as conn:
            bal = await conn.fetchval("SELECT balance_cents FROM accounts WHERE kind = 1 AND owner_id = $1", user_id)
        if bal is None:
            raise Refused(fp.UNKNOWN_USER, f"unknown user {user_id}")
        return bal

    @staticmethod
    async def deposit(conn, user_id: int, amount_cents: int) -> tuple[int, int]:
        """external -> user. Returns (balance_cents, transfer_id)."""
        assert amount_cents > 0
        row = await conn.fetchrow("SELECT account_id FROM accounts WHERE kind = 1 AND owner_id = $1", user_id)
        if row is None:
            raise Refused(fp.UNKNOWN_USER, f"unknown user {user_id}")
        return await Ledger._move(conn, T_DEPOSIT, "(SELECT account_id FROM accounts WHERE kind = 0)",
                                  row[0], amount_cents, None)

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
                   greeting: str) -> tuple[int, int]:
        """sender -> new escrow, and the packet row, with an id in `shard`.
        Returns (packet_id, sender balance)."""
        sender = await conn.fetchrow(
            "SELECT account_id, balance_cents FROM accounts WHERE kind = 1 AND owner_id = $1 FOR UPDATE", sender_id)
        if sender is None:
            raise Refused(fp.UNKNOWN_USER, f"unknown sender {sender_id}")
        if sender["balance_cents"] < total_cents:
            raise Refused(fp.INSUFFICIENT_FUNDS, f"balance {sender['balance_cents']} below {total_cents}")
        if members:
            found = await conn.fetchval("SELECT count(*) FROM accounts WHERE kind = 1 AND owner_id = ANY($1::bigint[])",
                                        members)
            if found != len(members):
                raise Refused(fp.UNKNOWN_USER, f"{len(members) - found} member(s) are not registered")
        packet_id = routing.make_packet_id(self.set_id, await conn.fetchval("SELECT nextval('packet_seq')"), shard)
        escrow = await conn.fetchval("INSERT INTO accounts (kind, owner_id) VALUES (2, $1) RETURNING account_id",
                                     packet_id)
        await conn.execute(
            "INSERT INTO packets (packet_id, sender_id, escrow_account_id, total_cents, share_count, mode,"
            " min_share_cents, audience, greeting, expires_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, to_timestamp($10::float8 / 1000))",
            packet_id, sender_id, escrow, total_cents, count, mode, min_share_cents, audience, greeting,
            expires_at_ms)
        if members:
            await conn.execute("INSERT INTO packet_members (packet_id, user_id) SELECT $1, unnest($2::bigint[])",
                               packet_id, members)
        await self._move(conn, T_SEND, str(int(sender["account_id"])), escrow, total_cents, packet_id)
        return packet_id, sender["balance_cents"] - total_cents

    async def load_packet(self, packet_id: int):
        """The packet's durable state, for rebuilding its in-memory state."""
        async with self.pool.acquire() as conn:
            p = await conn.fetchrow(
                "SELECT sender_id, total_cents, share_count, mode, min_share_cents, audience, status,"
                " (extract(epoch FROM expires_at) * 1000)::bigint AS expires_at_ms FROM packets WHERE packet_id = $1",
                packet_id)
            if p is None:
                return None
            claims = await conn.fetch("SELECT user_id, seq, amount_cents FROM claims WHERE packet_id = $1", packet_id)
            members = None
            if p["audience"] != fp.AUDIENCE_OPEN:
                members = [r[0] for r in await conn.fetch(
                    "SELECT user_id FROM packet_members WHERE packet_id = $1", packet_id)]
        return fp.PacketState(packet_id, p["sender_id"], p["total_cents"], p["share_count"], p["mode"],
                              p["min_share_cents"], p["expires_at_ms"], members,
                              [tuple(c) for c in claims], p["status"] == fp.PACKET_REFUNDED)

    async def packet_info(self, packet_id: int, offset: int, limit: int):
        async with self.pool.acquire() as conn:
            p = await conn.fetchrow(
                "SELECT sender_id, total_cents, share_count, mode, status, audience, greeting,"
                " (extract(epoch FROM created_at) * 1000)::bigint AS created_ms,"
                " (extract(epoch FROM expires_at) * 1000)::bigint AS expires_ms,"
                " claimed_cents, claimed_count, refunded_cents FROM packets WHERE packet_id = $1", packet_id)
            if p is None:
                return None
            claims = await conn.fetch("SELECT seq, user_id, amount_cents FROM claims WHERE packet_id = $1"
                                      " ORDER BY seq OFFSET $2 LIMIT $3", packet_id, offset, limit)
            luckiest = 0
            if p["claimed_count"] == p["share_count"]:
                luckiest = await conn.fetchval("SELECT seq FROM claims WHERE packet_id = $1"
                                               " ORDER BY amount_cents DESC, seq LIMIT 1", packet_id)
        head = (p["sender_id"], p["total_cents"], p["share_count"], p["mode"], p["status"], p["audience"],
                p["created_ms"], p["expires_ms"], p["claimed_cents"], p["claimed_count"], p["refunded_cents"],
                luckiest)
        return head, p["greeting"], [tuple(c) for c in claims]


class GrabCommitter:
    """Commits grab batches on one dedicated connection, one at a time.

    A batch whose COMMIT outcome is unknown (the connection died under it)
    is resolved by reading back its grab_batches row after making sure the
    old backend is gone; it is never run again.
    """

    def __init__(self, dsn: str, resolve_timeout_ms: int):
        self.dsn = dsn
        self.resolve_timeout_ms = resolve_timeout_ms
        self._conn: asyncpg.Connection | None = None
        self._block = 0
        self._next_in_block = 1 << BATCH_BLOCK_BITS  # forces a block on first use

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.dsn)
        return self._conn

    async def next_batch_id(self) -> int:
        if self._next_in_block >= (1 << BATCH_BLOCK_BITS):
            conn = await self._connection()
            self._block = await conn.fetchval("SELECT nextval('grab_batch_block_seq')")
            self._next_in_block = 0
        self._next_in_block += 1
        return (self._block << BATCH_BLOCK_BITS) | self._next_in_block

    async def commit(self, batch_id: int, packets, seqs, users, amounts) -> bool:
        """True when the batch is durable, False when it is known not to be.
        Raises when PostgreSQL refused the statement (nothing was written);
        while the outcome is unknown it keeps resolving and does not return."""
        conn = await self._connection()
        backend_pid = conn.get_server_pid()
        try:
            await conn.fetchval("SELECT anbao_commit_grabs($1, $2, $3, $4, $5)",
                                batch_id, packets, seqs, users, amounts)
            return True
        except BaseException as exc:
            self._discard()
            if isinstance(exc, asyncio.CancelledError):
                raise
            if isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, SERVER_GONE_ERRORS):
                raise  # the server refused the statement: its transaction rolled back
            # The connection broke somewhere between sending the statement
            # and reading its answer: the COMMIT may or may not have happened.
            log.warning("batch %d: outcome unknown (%r); resolving by read-back", batch_id, exc)
        return await self._resolve(batch_id, backend_pid)

    def _discard(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def _resolve(self, batch_id: int, backend_pid: int) -> bool:
        deadline = time.monotonic() + self.resolve_timeout_ms / 1000
        delay_s = 0.05
        while True:
            try:
                conn = await asyncpg.connect(self.dsn, timeout=5)
                try:
                    # The old backend may still be inside COMMIT: end it and
                    # wait until it is gone, so the read-back is final.
                    await conn.execute("SELECT pg_terminate_backend($1)", backend_pid)
                    for _ in range(200):
                        alive = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                                                    backend_pid)
                        if not alive:
                            break
                        await asyncio.sleep(0.01)
                    else:
                        raise TimeoutError("old backend still alive")
                    found = await conn.fetchval("SELECT count(*) FROM grab_batches WHERE batch_id = $1", batch_id)
                    log.warning("batch %d resolved: %s", batch_id, "committed" if found else "not committed")
                    return bool(found)
                finally:
                    await conn.close()
            except CONNECT_ERRORS as exc:
                if time.monotonic() > deadline:
                    log.error("batch %d: still unresolved after %d ms (%r); still holding its answers",
                              batch_id, self.resolve_timeout_ms, exc)
                    deadline = time.monotonic() + self.resolve_timeout_ms / 1000
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)

    async def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()
