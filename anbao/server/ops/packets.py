"""Packets: SEND, PACKET, SENT_LIST and RECEIVED_LIST. GRAB is not here:
it never leaves the event loop's fast path (router -> engine)."""

from __future__ import annotations

from typing import NamedTuple

from anbao_client import protocol
from anbao_client.protocol import Audience, Mode, Op, Status
from anbao_client.routing import make_packet_id, owner_of

from ...clock import now_ms
from ...engine.grabs import packet_state
from ...storage.domain import BatchOutcome, BatchResult, Operation, PacketRecord, PacketStatus, SendRequest
from ...storage.idempotency import request_hash
from .. import answers
from .accounts import reply_batch, run_keyed
from .base import Context, Refused, page_limit


def validate_send(
    ctx: Context, sender: int, total: int, count: int, mode: int, expiry_s: int, audience: int, members: list[int]
) -> int:
    """Refuses what SEND may never do; returns the expiry in seconds."""
    rules, wire = ctx.limits.rules, ctx.limits.wire
    if mode not in (Mode.RANDOM, Mode.FIXED):
        raise Refused(Status.INVALID, "mode must be 1 (random) or 2 (fixed)")
    if not 1 <= count <= rules.max_share_count:
        raise Refused(Status.INVALID, f"count must be 1..{rules.max_share_count}")
    if total > rules.max_total_cents:
        raise Refused(Status.INVALID, f"total {total} cents above the limit of {rules.max_total_cents} cents")
    if total < count * rules.min_share_cents:
        raise Refused(
            Status.INVALID, f"total {total} cents below {count} shares of at least {rules.min_share_cents} cents"
        )
    if total > count * rules.max_share_cents:
        # Fixed mode's largest share is ceil(total / count); random mode
        # could not split the total into shares of at most the maximum.
        # Either way the condition is total > count x max.
        if mode == Mode.FIXED:
            raise Refused(
                Status.SHARE_ABOVE_MAX,
                f"a share of {-(-total // count)} cents is above the maximum share of {rules.max_share_cents} cents",
            )
        raise Refused(
            Status.SHARE_ABOVE_MAX,
            f"{total} cents cannot be split into {count} shares of at most {rules.max_share_cents} cents",
        )
    expiry_s = expiry_s or rules.default_expiry_s
    if not rules.min_expiry_s <= expiry_s <= rules.max_expiry_s:
        raise Refused(Status.INVALID, f"expiry must be {rules.min_expiry_s}..{rules.max_expiry_s} s")
    if audience == Audience.OPEN:
        if members:
            raise Refused(Status.INVALID, "an open packet takes no member list")
    elif audience == Audience.DIRECT:
        if len(members) != 1 or count != 1:
            raise Refused(Status.INVALID, "a packet to one person names one user and has one share")
    elif audience == Audience.MEMBERS:
        if not 1 <= len(members) <= wire.max_members:
            raise Refused(Status.INVALID, f"member list must hold 1..{wire.max_members} users")
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
    """SEND, by group commit (engine/batches.py): answered once its batch has
    committed; at most once per key (the batch claims the key)."""
    expiry_s = validate_send(ctx, sender, total, count, mode, expiry_s, audience, members)
    # The new packet takes one of this worker's shards, so this worker owns it.
    shard = ctx.next_shard()
    fields = (sender, total, count, mode, expiry_s, audience, tuple(members), greeting)
    group_id = members[0] if audience == Audience.GROUP else 0
    request = SendRequest(
        key,
        request_hash(Operation.SEND, fields),
        0,
        sender,
        total,
        count,
        mode,
        now_ms() + expiry_s * 1000,
        audience,
        group_id,
        () if group_id else tuple(members),
        greeting,
    )
    result = await run_keyed(
        ctx, lambda r: ctx.writes.sends.submit(r, lambda seq: make_packet_id(ctx.set_id, seq, shard)), request
    )
    if result.outcome == BatchOutcome.RAN and result.answer is not None:
        _adopt(ctx, request, result)
    return reply_batch(ctx, Op.SEND, rid, result, "packet_id", "balance_cents", "expires_at_ms")


def _adopt(ctx: Context, request: SendRequest, result: BatchResult) -> None:
    """The new packet's state, owned here from the start: its first grab
    loads nothing."""
    assert result.answer is not None
    if request.audience == Audience.OPEN:
        eligible = None
    elif request.audience == Audience.GROUP:
        eligible = result.members
        assert eligible is not None
    else:
        eligible = list(request.members)
    packet_id = result.answer["packet_id"]
    record = PacketRecord(
        packet_id,
        request.sender_id,
        request.total_cents,
        request.count,
        request.mode,
        ctx.limits.rules.min_share_cents,
        request.expires_at_ms,
        eligible,
        [],
        False,
        ctx.limits.rules.max_share_cents,
    )
    assert owner_of(packet_id, ctx.worker_count) == ctx.worker_id
    # A grab that guessed the id may already have loaded it from the database.
    if packet_id not in ctx.engine.states:
        state = packet_state(record)
        state.facts = PacketFacts(request.audience, request.greeting, result.created_ms, request.group_id)
        ctx.engine.adopt(state)


async def packet(ctx: Context, rid: int, packet_id: int, offset: int, limit: int) -> bytes:
    if not 0 < limit <= protocol.MAX_CLAIMS_PAGE:
        raise Refused(Status.INVALID, f"claims_limit must be 1..{protocol.MAX_CLAIMS_PAGE}")
    state = ctx.engine.states.get(packet_id)
    if state is not None and state.facts is not None and not state.closed and now_ms() < state.expires_at_ms:
        return _packet_from_memory(ctx, rid, state, offset, limit)
    info = await ctx.ledger.packet_info(packet_id, offset, limit)
    if info is None:
        raise Refused(Status.NOT_FOUND, f"unknown packet {packet_id}")
    head, greeting, claims, group_id = info
    return answers.ok(Op.PACKET, rid, ctx.worker_id, *head, greeting, claims, group_id)


class PacketFacts(NamedTuple):
    """What PACKET shows of a packet beyond its split, kept on the owner's
    state of a packet it adopted from its SEND (PacketState.facts)."""

    audience: int
    greeting: str
    created_ms: int
    group_id: int  # 0 unless sent to a group


def _packet_from_memory(ctx: Context, rid: int, state, offset: int, limit: int) -> bytes:
    """PACKET answered by the packet's owner from its state, with committed
    claims only: what the database holds durable, without a query. Only
    for an open packet before its expiry (its refund is the database's)."""
    facts: PacketFacts = state.facts
    claimed_count, claimed_cents, luckiest, page = state.committed_claims(offset, limit)
    status = PacketStatus.SOLD_OUT if claimed_count == state.share_count else PacketStatus.OPEN
    ctx.engine.packets_from_memory += 1
    return answers.ok(
        Op.PACKET,
        rid,
        ctx.worker_id,
        state.sender_id,
        state.total_cents,
        state.share_count,
        state.mode,
        int(status),
        facts.audience,
        facts.created_ms,
        state.expires_at_ms,
        claimed_cents,
        claimed_count,
        0,
        luckiest,
        facts.greeting,
        page,
        facts.group_id,
    )


async def sent_list(ctx: Context, rid: int, user_id: int, before: int, limit: int) -> bytes:
    rows, cursor = await ctx.ledger.sent_packets(user_id, before, page_limit(ctx, limit))
    return answers.ok(Op.SENT_LIST, rid, ctx.worker_id, cursor, rows)


async def received_list(ctx: Context, rid: int, user_id: int, before: int, limit: int) -> bytes:
    rows, cursor = await ctx.ledger.received_shares(user_id, before, page_limit(ctx, limit))
    return answers.ok(Op.RECEIVED_LIST, rid, ctx.worker_id, cursor, rows)
