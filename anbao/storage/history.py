"""History: a wallet's statement, a sender's packets, a grabber's shares.
Pages go newest first, each with the cursor of the next page (0: no more)."""

from __future__ import annotations

import asyncpg

from ..clock import now_ms
from .accounts import wallet
from .commit import settle_user
from .domain import PacketStatus, TransferKind
from .packets import SHOWN_STATUS

# Paging from the top: below every id.
NEWEST = 2**63 - 1

# A wallet's debits are only withdrawals and sends: the partial index
# transfers_wallet_debits (migration 0002) holds exactly these.
_STATEMENT = (
    "SELECT * FROM ("
    " (SELECT transfer_id, kind, amount_cents AS signed, packet_id, created_at FROM transfers"
    "  WHERE credit_account = $1 AND transfer_id < $2 ORDER BY transfer_id DESC LIMIT $3)"
    " UNION ALL"
    " (SELECT transfer_id, kind, -amount_cents, packet_id, created_at FROM transfers"
    f"  WHERE debit_account = $1 AND kind IN ({TransferKind.WITHDRAW:d}, {TransferKind.SEND:d})"
    "  AND transfer_id < $2 ORDER BY transfer_id DESC LIMIT $3)) t"
    " ORDER BY transfer_id DESC LIMIT $3"
)
_SENT = (
    # Counters from the claims, as PACKET shows them: a claim counts from
    # its acknowledgement, before its roll-up.
    "SELECT packet_id, total_cents, share_count, c.n, c.s, refunded_cents,"
    f" CASE WHEN status <> {PacketStatus.REFUNDED:d} AND c.n = share_count THEN {PacketStatus.SOLD_OUT:d}"
    f" ELSE {SHOWN_STATUS} END, audience,"
    " (extract(epoch FROM created_at) * 1000)::bigint, (extract(epoch FROM expires_at) * 1000)::bigint"
    " FROM packets CROSS JOIN LATERAL (SELECT count(*)::int AS n, COALESCE(sum(amount_cents), 0)::bigint"
    " AS s FROM anbao_claims_of(packets.packet_id)) c"
    " WHERE sender_id = $2 AND packet_id < $3 ORDER BY packet_id DESC LIMIT $4"
)
# A share of this set's packet is a GRAB transfer with its claim; a share
# won in another set's packet is the CROSS_IN transfer that credited it,
# with the credit's copy (per row, and batches applied before migration
# 0019), found by user and transfer, or its place in the credit batch
# applied here (credits_in, 0019): the one whose first transfer is the
# nearest at or below it (applies draw their transfer ids under the
# roll-up's lock, so two batches' ranges never interleave).
_GRAB, _CROSS_IN = TransferKind.GRAB, TransferKind.CROSS_IN
_RECEIVED = (
    "SELECT t.transfer_id, t.packet_id, COALESCE(p.sender_id, x.sender_id, y.sender_id, 0),"
    " COALESCE(c.seq, x.seq, y.seq), t.amount_cents, COALESCE(c.created_at, x.claimed_at, x.created_at, y.claimed_at)"
    " FROM transfers t"
    f" LEFT JOIN claims c ON t.kind = {_GRAB:d} AND c.packet_id = t.packet_id AND c.user_id = $4"
    f" LEFT JOIN packets p ON t.kind = {_GRAB:d} AND p.packet_id = t.packet_id"
    f" LEFT JOIN credits_out x ON t.kind = {_CROSS_IN:d} AND x.user_id = $4 AND x.applied_transfer_id = t.transfer_id"
    " LEFT JOIN LATERAL (SELECT b.senders[k.i] AS sender_id, b.seqs[k.i] AS seq, b.claimed_at"
    "  FROM (SELECT i.* FROM credits_in i"
    f"        WHERE t.kind = {_CROSS_IN:d} AND i.first_transfer_id <= t.transfer_id"
    "        ORDER BY i.first_transfer_id DESC LIMIT 1) i"
    "  CROSS JOIN LATERAL array_position(i.transfer_ids, t.transfer_id) AS k(i)"
    "  JOIN credit_batches b ON b.src_set = i.src_set AND b.batch_id = i.batch_id"
    "   AND b.dest_set = (SELECT s.set_id FROM anbao_set_identity s)"
    "  WHERE k.i IS NOT NULL) y ON x.src_set IS NULL"
    f" WHERE t.credit_account = $1 AND t.kind IN ({_GRAB:d}, {_CROSS_IN:d}) AND t.transfer_id < $2"
    " ORDER BY t.transfer_id DESC LIMIT $3"
)


def _ms(ts) -> int:
    return int(ts.timestamp() * 1000)


class History:
    pool: asyncpg.Pool

    async def statement(self, user_id: int, before: int, limit: int) -> tuple[int, list[tuple], int]:
        """(balance, up to `limit` transfers touching the wallet newest first as
        (transfer_id, kind, signed amount, packet_id or 0, at_ms), next cursor
        or 0). Balance and rows are one snapshot, so the newest page adds up."""
        async with self.pool.acquire() as conn:
            await settle_user(conn, user_id)
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                row = await wallet(conn, user_id)
                rows = await conn.fetch(_STATEMENT, row["account_id"], before or NEWEST, limit + 1)
        page = [(r[0], r[1], r[2], r[3] or 0, _ms(r[4])) for r in rows[:limit]]
        return row["balance_cents"], page, (page[-1][0] if len(rows) > limit else 0)

    async def sent_packets(self, user_id: int, before: int, limit: int) -> tuple[list[tuple], int]:
        """A sender's packets newest first: (packet_id, total_cents, count,
        claimed_count, claimed_cents, refunded_cents, status, audience,
        created_at_ms, expires_at_ms), and the next cursor or 0."""
        async with self.pool.acquire() as conn:
            await wallet(conn, user_id)
            rows = await conn.fetch(_SENT, now_ms(), user_id, before or NEWEST, limit + 1)
        page = [tuple(r) for r in rows[:limit]]
        return page, (page[-1][0] if len(rows) > limit else 0)

    async def received_shares(self, user_id: int, before: int, limit: int) -> tuple[list[tuple], int]:
        """The shares a user grabbed, newest grab first: (packet_id,
        sender_id, seq, amount_cents, claimed_at_ms), and the next cursor (a
        transfer id) or 0."""
        async with self.pool.acquire() as conn:
            await settle_user(conn, user_id)
            row = await wallet(conn, user_id)
            rows = await conn.fetch(_RECEIVED, row["account_id"], before or NEWEST, limit + 1, user_id)
        page = [(r[1], r[2], r[3], r[4], _ms(r[5])) for r in rows[:limit]]
        return page, (rows[limit - 1][0] if len(rows) > limit else 0)
