"""Packets: SEND (the sender's money into a new escrow), the durable state
an owner rebuilds a packet from, what PACKET shows, and which packets have
expired. Claims are written by the grab commit and the roll-up
(commit.py), refunds by anbao_refund_packets (migration 0003)."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from ..clock import now_ms
from .accounts import COUNT_REGISTERED, move
from .domain import AccountKind, Audience, PacketRecord, PacketStatus, Reason, Refused, TransferKind

# What a reader is shown as the status: an open packet past its expiry is
# "expired" until its refund commits; $1 is the server's clock in ms, the
# clock GRAB decides expiry by.
SHOWN_STATUS = (
    f"CASE WHEN status = {PacketStatus.OPEN:d} AND expires_at <= to_timestamp($1::float8 / 1000)"
    f" THEN {PacketStatus.EXPIRED:d} ELSE status END"
)

_SENDER = (
    f"SELECT account_id, balance_cents FROM accounts WHERE kind = {AccountKind.USER:d} AND owner_id = $1 FOR UPDATE"
)
_ESCROW = f"INSERT INTO accounts (kind, owner_id) VALUES ({AccountKind.ESCROW:d}, $1) RETURNING account_id"
_PACKET_INFO = (
    "WITH c AS MATERIALIZED (SELECT seq, user_id, amount_cents FROM anbao_claims_of($2))"
    f" SELECT sender_id, total_cents, share_count, mode, {SHOWN_STATUS} AS status, audience,"
    " greeting, (extract(epoch FROM created_at) * 1000)::bigint AS created_ms,"
    " (extract(epoch FROM expires_at) * 1000)::bigint AS expires_ms, refunded_cents,"
    " (SELECT count(*)::int FROM c) AS claimed_count,"
    " (SELECT COALESCE(sum(amount_cents), 0)::bigint FROM c) AS claimed_cents,"
    " (SELECT seq FROM c ORDER BY amount_cents DESC, seq LIMIT 1) AS luckiest,"
    " (SELECT array_agg(ARRAY[pg.seq, pg.user_id, pg.amount_cents] ORDER BY pg.seq)"
    "  FROM (SELECT * FROM c ORDER BY seq OFFSET $3 LIMIT $4) pg) AS page"
    " FROM packets WHERE packet_id = $2"
)
# The sender's counts for the UTC day of $2 (days since the epoch), this
# SEND included; a SEND on a later day than the row's starts them again.
# Runs under the sender's wallet row lock, so concurrent SENDs of one sender
# count one after the other; a refusal rolls it back with its savepoint.
_COUNT_SEND = (
    "INSERT INTO daily_sends AS d (user_id, utc_day, sent_cents, sent_count) VALUES ($1, $2, $3, 1)"
    " ON CONFLICT (user_id) DO UPDATE SET"
    " sent_cents = CASE WHEN d.utc_day >= EXCLUDED.utc_day THEN d.sent_cents + EXCLUDED.sent_cents"
    " ELSE EXCLUDED.sent_cents END,"
    " sent_count = CASE WHEN d.utc_day >= EXCLUDED.utc_day THEN d.sent_count + 1 ELSE 1 END,"
    " utc_day = GREATEST(d.utc_day, EXCLUDED.utc_day)"
    " RETURNING sent_cents, sent_count"
)
MS_PER_DAY = 86_400_000

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

    async def send(
        self,
        conn,
        packet_id_of: Callable[[int], int],
        sender_id: int,
        total_cents: int,
        count: int,
        mode: int,
        min_share_cents: int,
        expires_at_ms: int,
        audience: int,
        members: list[int],
        greeting: str,
        *,
        max_share_cents: int = 0,
        daily_max_cents: int | None = None,
        daily_max_packets: int | None = None,
        at_ms: int | None = None,
    ) -> tuple[PacketRecord, int]:
        """sender -> new escrow, and the packet row, in the caller's
        transaction (see idempotent). The packet's id is packet_id_of(a new
        value of packet_seq): the caller composes it (anbao_client.routing
        owns the layout of an id). Returns the new packet's record (its
        eligible users None for an open packet) and the sender's balance.
        For a group, `members` is [group_id] and the group's members other
        than the sender are snapshotted into packet_members: membership at
        send time counts.

        max_share_cents (0: none) is stored with the packet: its shares are
        drawn under it for its whole life. daily_max_cents and
        daily_max_packets cap what the sender sends per UTC day (of at_ms,
        the server's clock by default), counted under the sender's wallet
        row lock, so two concurrent SENDs cannot both pass a cap."""
        sender = await conn.fetchrow(_SENDER, sender_id)
        if sender is None:
            raise Refused(Reason.UNKNOWN_USER, f"unknown sender {sender_id}")
        if sender["balance_cents"] < total_cents:
            raise Refused(
                Reason.INSUFFICIENT_FUNDS, f"balance {sender['balance_cents']} cents below {total_cents} cents"
            )
        group_id = None
        if audience == Audience.GROUP:
            [group_id] = members
            # FOR SHARE: a membership change (which locks the group row FOR
            # UPDATE) lands wholly before or wholly after this snapshot.
            if await conn.fetchval("SELECT 1 FROM groups WHERE group_id = $1 FOR SHARE", group_id) is None:
                raise Refused(Reason.UNKNOWN_GROUP, f"unknown group {group_id}")
            members = [
                r[0]
                for r in await conn.fetch(
                    "SELECT user_id FROM group_members WHERE group_id = $1 AND user_id <> $2", group_id, sender_id
                )
            ]
            if count > len(members):
                raise Refused(
                    Reason.INVALID,
                    f"{count} shares for {len(members)} group members besides the"
                    " sender: the packet could never sell out",
                )
        elif members:
            found = await conn.fetchval(COUNT_REGISTERED, members)
            if found != len(members):
                raise Refused(Reason.UNKNOWN_USER, f"{len(members) - found} member(s) are not registered")
        if daily_max_cents is not None or daily_max_packets is not None:
            day = (now_ms() if at_ms is None else at_ms) // MS_PER_DAY
            sent_cents, sent_count = await conn.fetchrow(_COUNT_SEND, sender_id, day, total_cents)
            if daily_max_packets is not None and sent_count > daily_max_packets:
                raise Refused(
                    Reason.DAILY_SEND_COUNT_CAP,
                    f"sender {sender_id} has sent {sent_count - 1} packets today (UTC);"
                    f" the daily cap is {daily_max_packets}",
                )
            if daily_max_cents is not None and sent_cents > daily_max_cents:
                raise Refused(
                    Reason.DAILY_SEND_AMOUNT_CAP,
                    f"sender {sender_id} has sent {sent_cents - total_cents} cents today (UTC);"
                    f" {total_cents} cents more would pass the daily cap of {daily_max_cents} cents",
                )
        packet_id = packet_id_of(await conn.fetchval("SELECT nextval('packet_seq')"))
        escrow = await conn.fetchval(_ESCROW, packet_id)
        await conn.execute(
            "INSERT INTO packets (packet_id, sender_id, escrow_account_id, total_cents, share_count, mode,"
            " min_share_cents, audience, greeting, expires_at, group_id, max_share_cents)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, to_timestamp($10::float8 / 1000), $11, $12)",
            packet_id,
            sender_id,
            escrow,
            total_cents,
            count,
            int(mode),
            min_share_cents,
            int(audience),
            greeting,
            expires_at_ms,
            group_id,
            max_share_cents,
        )
        if members:
            await conn.execute(
                "INSERT INTO packet_members (packet_id, user_id) SELECT $1, unnest($2::bigint[])", packet_id, members
            )
        await move(conn, TransferKind.SEND, str(int(sender["account_id"])), escrow, total_cents, packet_id)
        record = PacketRecord(
            packet_id,
            sender_id,
            total_cents,
            count,
            mode,
            min_share_cents,
            expires_at_ms,
            None if audience == Audience.OPEN else members,
            [],
            False,
            max_share_cents,
        )
        return record, sender["balance_cents"] - total_cents

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
                members = [
                    r[0] for r in await conn.fetch("SELECT user_id FROM packet_members WHERE packet_id = $1", packet_id)
                ]
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
        greeting, [(seq, user_id, amount_cents)] from `offset`). Counters
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
        return head, p["greeting"], [(int(r[0]), r[1], r[2]) for r in (p["page"] or [])]

    async def expired_packets(self, at_ms: int, limit: int, shard_mask: int, shards: list[int]) -> list[int]:
        """Packets still open (not sold out, not refunded) whose expiry is at
        or before at_ms and whose shard (packet_id & shard_mask) is one of
        `shards`, oldest expiry first. The caller names its own shards (the
        ownership rule is anbao_client.routing's); they are applied in the
        query, so one worker's backlog never hides another's."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(_EXPIRED, at_ms, limit, shard_mask, shards)
        return [r[0] for r in rows]
