"""Packets: SEND, PACKET, SENT_LIST and RECEIVED_LIST. GRAB is not here:
it never leaves the event loop's fast path (router -> engine)."""

from __future__ import annotations

from anbao_client import protocol
from anbao_client.protocol import Audience, Mode, Op, Status
from anbao_client.routing import make_packet_id, owner_of

from ...clock import now_ms
from ...engine.grabs import packet_state
from ...storage.domain import Operation
from .. import answers
from .accounts import reply_stored
from .base import Context, Refused, facts_written, page_limit


def validate_send(
    ctx: Context, sender: int, total: int, count: int, mode: int, expiry_s: int, audience: int, members: list[int]
) -> int:
    """Refuses what SEND may never do; returns the expiry in seconds."""
    lim = ctx.limits
    if mode not in (Mode.RANDOM, Mode.FIXED):
        raise Refused(Status.INVALID, "mode must be 1 (random) or 2 (fixed)")
    if not 1 <= count <= lim.max_share_count:
        raise Refused(Status.INVALID, f"count must be 1..{lim.max_share_count}")
    if total > lim.max_total_cents:
        raise Refused(Status.INVALID, f"total {total} cents above the limit of {lim.max_total_cents} cents")
    if total < count * lim.min_share_cents:
        raise Refused(
            Status.INVALID, f"total {total} cents below {count} shares of at least {lim.min_share_cents} cents"
        )
    if total > count * lim.max_share_cents:
        # Fixed mode's largest share is ceil(total / count); random mode
        # could not split the total into shares of at most the maximum.
        # Either way the condition is total > count x max.
        if mode == Mode.FIXED:
            raise Refused(
                Status.SHARE_ABOVE_MAX,
                f"a share of {-(-total // count)} cents is above the maximum share of {lim.max_share_cents} cents",
            )
        raise Refused(
            Status.SHARE_ABOVE_MAX,
            f"{total} cents cannot be split into {count} shares of at most {lim.max_share_cents} cents",
        )
    expiry_s = expiry_s or lim.default_expiry_s
    if not lim.min_expiry_s <= expiry_s <= lim.max_expiry_s:
        raise Refused(Status.INVALID, f"expiry must be {lim.min_expiry_s}..{lim.max_expiry_s} s")
    if audience == Audience.OPEN:
        if members:
            raise Refused(Status.INVALID, "an open packet takes no member list")
    elif audience == Audience.DIRECT:
        if len(members) != 1 or count != 1:
            raise Refused(Status.INVALID, "a packet to one person names one user and has one share")
    elif audience == Audience.MEMBERS:
        if not 1 <= len(members) <= lim.max_members:
            raise Refused(Status.INVALID, f"member list must hold 1..{lim.max_members} users")
        if len(set(members)) != len(members):
            raise Refused(Status.INVALID, "member list repeats a user")
        if count > len(members):
            raise Refused(Status.INVALID, "more shares than members: the packet could never sell out")
    elif audience == Audience.GROUP:
        # The group's id travels in the member list's place; its members
        # (but the sender) are snapshotted inside the SEND transaction.
        if len(members) != 1:
            raise Refused(Status.INVALID, "a packet to a group names exactly one group id")
        return expiry_s
    else:
        raise Refused(Status.INVALID, "audience must be 0 (open), 1 (direct), 2 (members) or 3 (group)")
    if sender in members:
        raise Refused(Status.INVALID, "a sender cannot open their own packet")
    return expiry_s


async def send(
    ctx: Context,
    rid: int,
    key: bytes,
    sender: int,
    total: int,
    count: int,
    mode: int,
    expiry_s: int,
    audience: int,
    members: list[int],
    greeting: str,
) -> bytes:
    expiry_s = validate_send(ctx, sender, total, count, mode, expiry_s, audience, members)
    lim = ctx.limits
    min_share = lim.min_share_cents
    adopted = []
    # The new packet takes one of this worker's shards, so this worker owns it.
    shard = ctx.next_shard()
    await ctx.ledger.settle(sender)

    async def body(conn) -> dict[str, int]:
        expires_at_ms = now_ms() + expiry_s * 1000
        record, balance = await ctx.ledger.send(
            conn,
            lambda seq: make_packet_id(ctx.set_id, seq, shard),
            sender,
            total,
            count,
            mode,
            min_share,
            expires_at_ms,
            audience,
            members,
            greeting,
            max_share_cents=lim.max_share_cents,
            daily_max_cents=lim.daily_send_max_cents,
            daily_max_packets=lim.daily_send_max_packets,
        )
        adopted.append(record)
        return {"packet_id": record.packet_id, "balance_cents": balance, "expires_at_ms": expires_at_ms}

    fields = (sender, total, count, mode, expiry_s, audience, tuple(members), greeting)
    stored = await ctx.ledger.idempotent(key, Operation.SEND, fields, body)
    facts_written(ctx)
    if adopted and not stored.replayed:
        state = packet_state(adopted[0])
        assert owner_of(state.packet_id, ctx.worker_count) == ctx.worker_id
        # A grab that guessed the id may already have loaded it from the database.
        if state.packet_id not in ctx.engine.states:
            ctx.engine.adopt(state)
    return reply_stored(ctx, Op.SEND, rid, stored, "packet_id", "balance_cents", "expires_at_ms")


async def packet(ctx: Context, rid: int, packet_id: int, offset: int, limit: int) -> bytes:
    if not 0 < limit <= protocol.MAX_CLAIMS_PAGE:
        raise Refused(Status.INVALID, f"claims_limit must be 1..{protocol.MAX_CLAIMS_PAGE}")
    info = await ctx.ledger.packet_info(packet_id, offset, limit)
    if info is None:
        raise Refused(Status.NOT_FOUND, f"unknown packet {packet_id}")
    head, greeting, claims = info
    return answers.ok(Op.PACKET, rid, ctx.worker_id, *head, greeting, claims)


async def sent_list(ctx: Context, rid: int, user_id: int, before: int, limit: int) -> bytes:
    rows, cursor = await ctx.ledger.sent_packets(user_id, before, page_limit(ctx, limit))
    return answers.ok(Op.SENT_LIST, rid, ctx.worker_id, cursor, rows)


async def received_list(ctx: Context, rid: int, user_id: int, before: int, limit: int) -> bytes:
    rows, cursor = await ctx.ledger.received_shares(user_id, before, page_limit(ctx, limit))
    return answers.ok(Op.RECEIVED_LIST, rid, ctx.worker_id, cursor, rows)
