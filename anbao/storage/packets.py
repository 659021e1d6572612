"""Packets: SEND (the sender's money into a new escrow), the durable state
an owner rebuilds a packet from, what PACKET shows, and which packets have
expired. Claims are written by the grab commit and the roll-up
(commit.py), refunds by anbao_refund_packets (storage/functions)."""

from __future__ import annotations

import asyncpg

from ..clock import now_ms
from .domain import (
    Audience,
    BatchResult,
    Operation,
    PacketRecord,
    PacketStatus,
    SendRequest,
)
from .idempotency import batch_results, put_back_all

# What a reader is shown as the status: an open packet past its expiry is
# "expired" until its refund commits; $1 is the server's clock in ms, the
# clock GRAB decides expiry by.
SHOWN_STATUS = (
    f"CASE WHEN status = {PacketStatus.OPEN:d} AND expires_at <= to_timestamp($1::float8 / 1000)"
    f" THEN {PacketStatus.EXPIRED:d} ELSE status END"
)

_PACKET_INFO = (
    "WITH c AS MATERIALIZED (SELECT seq, user_id, amount_cents FROM anbao_claims_of($2))"
    f" SELECT sender_id, total_cents, share_count, mode, {SHOWN_STATUS} AS status, audience,"
    " greeting, COALESCE(group_id, 0) AS group_id, (extract(epoch FROM created_at) * 1000)::bigint AS created_ms,"
    " (extract(epoch FROM expires_at) * 1000)::bigint AS expires_ms, refunded_cents,"
    " (SELECT count(*)::int FROM c) AS claimed_count,"
    " (SELECT COALESCE(sum(amount_cents), 0)::bigint FROM c) AS claimed_cents,"
    " (SELECT seq FROM c ORDER BY amount_cents DESC, seq LIMIT 1) AS luckiest,"
    " (SELECT array_agg(ARRAY[pg.seq, pg.user_id, pg.amount_cents] ORDER BY pg.seq)"
    "  FROM (SELECT * FROM c ORDER BY seq OFFSET $3 LIMIT $4) pg) AS page"
    " FROM packets WHERE packet_id = $2"
)
MS_PER_DAY = 86_400_000
PACKET_SEQ_BLOCK = 1024  # packet sequence numbers per nextval('packet_block_seq'): migration 0012's setval
_SEND_BATCH = "SELECT * FROM anbao_send_batch(" + ", ".join(f"${n}" for n in range(1, 22)) + ")"


# Who may claim a packet that is not open (migration 0012, the rule's one home).
PACKET_MEMBERS = "SELECT anbao_packet_members($1)"

# Open, or expired and not refunded yet: the rows of the partial index
# packets_open_by_expiry (migration 0002), whose predicate this repeats.
_EXPIRED = (
    f"SELECT packet_id FROM packets WHERE status IN ({PacketStatus.OPEN:d}, {PacketStatus.EXPIRED:d})"
    " AND expires_at <= to_timestamp($1::float8 / 1000)"
    " AND (packet_id & $3) = ANY($4::bigint[])"
    " ORDER BY expires_at LIMIT $2"
)


class Packets:
    pool: asyncpg.Pool

    async def packet_seq_block(self) -> range:
        """PACKET_SEQ_BLOCK new packet sequence numbers, for one nextval
        (migration 0012): a SEND costs no round trip for its id."""
        async with self.pool.acquire() as conn:
            block = await conn.fetchval("SELECT nextval('packet_block_seq')")
        return range(block * PACKET_SEQ_BLOCK, (block + 1) * PACKET_SEQ_BLOCK)

    async def send_batch(
        self,
        sends: list[SendRequest],
        *,
        min_share_cents: int,
        max_share_cents: int,
        daily_max_cents: int | None,
        daily_max_packets: int | None,
        at_ms: int,
        patient: bool = False,
    ) -> list[BatchResult]:
        """Runs a batch of SENDs in one statement, one transaction, one
        commit (anbao_send_batch, storage/functions): each SEND's money from
        the sender's wallet to its packet's new escrow, its packet row, its
        daily counts and its key's answer, or its refusal, decided in
        arrival order under the senders' wallet locks. One result per SEND,
        in order. Every packet stores max_share_cents (0: none); the daily
        caps count the UTC day of at_ms. A group packet's audience is the
        group as of its version (nothing is copied). Unless patient, a SEND
        whose sender's wallet another transaction holds is not waited for
        (BatchOutcome.PUT_BACK). Raises only for the database's faults,
        and then nothing in the batch happened."""
        assert sends and len({s.key for s in sends}) == len(sends), "one SEND per key in a batch"
        member_ids: list[int] = []
        member_ends: list[int] = []
        for s in sends:
            member_ids.extend(s.members)
            member_ends.append(len(member_ids))
        async with self.pool.acquire() as conn:
            try:
                rows = await conn.fetch(
                    _SEND_BATCH,
                    int(Operation.SEND),
                    [s.key for s in sends],
                    [s.request_hash for s in sends],
                    [s.packet_id for s in sends],
                    [s.sender_id for s in sends],
                    [s.total_cents for s in sends],
                    [s.count for s in sends],
                    [s.mode for s in sends],
                    [s.expires_at_ms for s in sends],
                    [s.audience for s in sends],
                    [s.group_id for s in sends],
                    member_ids,
                    member_ends,
                    [s.greeting for s in sends],
                    [s.settled for s in sends],
                    min_share_cents,
                    max_share_cents,
                    daily_max_cents,
                    daily_max_packets,
                    at_ms // MS_PER_DAY,
                    patient,
                )
            except asyncpg.exceptions.SerializationError:
                return put_back_all(len(sends))  # anbao_store_keys: a key stored meanwhile
        return batch_results(rows, len(sends))

    async def load_packet(self, packet_id: int) -> PacketRecord | None:
        """The packet's durable state, for rebuilding its in-memory state;
        None for an unknown packet."""
        async with self.pool.acquire() as conn:
            p = await conn.fetchrow(
                "SELECT sender_id, total_cents, share_count, mode, min_share_cents, max_share_cents, audience, status,"
                " (extract(epoch FROM expires_at) * 1000)::bigint AS expires_at_ms FROM packets WHERE packet_id = $1",
                packet_id,
            )
            if p is None:
                return None
            claims = await conn.fetch("SELECT user_id, seq, amount_cents FROM anbao_claims_of($1)", packet_id)
            members = None
            if p["audience"] != Audience.OPEN:
                members = [r[0] for r in await conn.fetch(PACKET_MEMBERS, packet_id)]
        return PacketRecord(
            packet_id,
            p["sender_id"],
            p["total_cents"],
            p["share_count"],
            p["mode"],
            p["min_share_cents"],
            p["expires_at_ms"],
            members,
            [tuple(c) for c in claims],
            p["status"] == PacketStatus.REFUNDED,
            p["max_share_cents"],
        )

    async def packet_info(self, packet_id: int, offset: int, limit: int):
        """The packet as its claims show it, or None: ((sender_id,
        total_cents, count, mode, status, audience, created_ms, expires_ms,
        claimed_cents, claimed_count, refunded_cents, luckiest seq or 0),
        greeting, [(seq, user_id, amount_cents)] from `offset`, its group or
        0). Counters
        and status come from the claims themselves (rolled up or pending),
        so a claim is shown the moment its grab is acknowledged. One
        statement: one snapshot, one round trip, and the claims read once."""
        async with self.pool.acquire() as conn:
            p = await conn.fetchrow(_PACKET_INFO, now_ms(), packet_id, offset, limit)
        if p is None:
            return None
        claimed_count = p["claimed_count"]
        status = p["status"]
        if status != PacketStatus.REFUNDED and claimed_count == p["share_count"]:
            status = PacketStatus.SOLD_OUT
        # The luckiest claim is named once the claim list is final: sold
        # out, or refunded after expiry.
        final = status in (PacketStatus.SOLD_OUT, PacketStatus.REFUNDED)
        luckiest = p["luckiest"] if final and claimed_count else 0
        head = (
            p["sender_id"],
            p["total_cents"],
            p["share_count"],
            p["mode"],
            int(status),
            p["audience"],
            p["created_ms"],
            p["expires_ms"],
            p["claimed_cents"],
            claimed_count,
            p["refunded_cents"],
            luckiest,
        )
        return head, p["greeting"], [(int(r[0]), r[1], r[2]) for r in (p["page"] or [])], p["group_id"]

    async def expired_packets(self, at_ms: int, limit: int, shard_mask: int, shards: list[int]) -> list[int]:
        """Packets still open (not sold out, not refunded) whose expiry is at
        or before at_ms and whose shard (packet_id & shard_mask) is one of
        `shards`, oldest expiry first. The caller names its own shards (the
        ownership rule is anbao_client.routing's); they are applied in the
        query, so one worker's backlog never hides another's."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(_EXPIRED, at_ms, limit, shard_mask, shards)
        return [r[0] for r in rows]
