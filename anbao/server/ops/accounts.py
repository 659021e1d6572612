"""Wallets: REGISTER, DEPOSIT, WITHDRAW, BALANCE and STATEMENT."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from anbao_client.protocol import Op, Status

from ...core import codec
from ...engine.batches import MoveBatcher
from ...storage.domain import BatchOutcome, BatchResult, MoveRequest, SendRequest
from ...storage.idempotency import request_hash
from .. import answers
from .base import Context, Refused, facts_written, page_limit


def reply_batch(ctx: Context, op: Op, rid: int, result: BatchResult, *names: str) -> bytes:
    """The answer a keyed write's batch gave (storage's values, named in
    the table's order, whether run now or replayed), or its refusal, under
    this request's id."""
    if result.outcome == BatchOutcome.CONFLICT or result.refusal is not None:
        assert result.refusal is not None
        return codec.encode_error(op, rid, Status[result.refusal.name], ctx.worker_id, result.message)
    assert result.answer is not None
    return answers.ok(op, rid, ctx.worker_id, *(result.answer[n] for n in names))


async def run_keyed(ctx: Context, submit: Callable[[Any], Awaitable[BatchResult]], request: Any) -> BatchResult:
    """Runs a keyed write through its batcher. A SEND or WITHDRAW short of
    posted money that the user's acknowledged grabs would cover is run once
    more after those grabs are posted (then a short balance is refused)."""
    result = await submit(request)
    if result.outcome == BatchOutcome.SETTLE_FIRST:
        await ctx.ledger.settle(request.sender_id if isinstance(request, SendRequest) else request.user_id)
        result = await submit(replace(request, settled=True))
        assert result.outcome != BatchOutcome.SETTLE_FIRST
    if result.outcome in (BatchOutcome.RAN, BatchOutcome.REPLAYED):
        facts_written(ctx)
    return result


async def register(ctx: Context, rid: int, user_ids: list[int]) -> bytes:
    created = await ctx.ledger.register(user_ids)
    ctx.engine.note_known_users(user_ids)
    return answers.ok(Op.REGISTER, rid, ctx.worker_id, created)


async def _external_move(
    ctx: Context, op: Op, batcher: MoveBatcher, rid: int, key: bytes, user_id: int, amount_cents: int, limit_cents: int
) -> bytes:
    """DEPOSIT and WITHDRAW: one transfer between the outside world and a
    wallet, by group commit, idempotent by key, answered (balance_cents,
    transfer_id)."""
    if amount_cents > limit_cents:
        raise Refused(Status.INVALID, f"amount {amount_cents} cents above the limit of {limit_cents} cents")
    request = MoveRequest(key, request_hash(batcher.operation, (user_id, amount_cents)), user_id, amount_cents)
    result = await run_keyed(ctx, batcher.submit, request)
    return reply_batch(ctx, op, rid, result, "balance_cents", "transfer_id")


async def deposit(ctx: Context, rid: int, key: bytes, user_id: int, amount_cents: int) -> bytes:
    return await _external_move(
        ctx, Op.DEPOSIT, ctx.writes.deposits, rid, key, user_id, amount_cents, ctx.limits.rules.max_deposit_cents
    )


async def withdraw(ctx: Context, rid: int, key: bytes, user_id: int, amount_cents: int) -> bytes:
    return await _external_move(
        ctx, Op.WITHDRAW, ctx.writes.withdrawals, rid, key, user_id, amount_cents, ctx.limits.rules.max_withdraw_cents
    )


async def balance(ctx: Context, rid: int, user_id: int) -> bytes:
    """The balance (posted, plus this set's grabs still rolling up: what
    WITHDRAW and SEND can spend once they settle), and with several sets
    the cents other sets owe the user that have not reached it yet (not
    spendable until they do), read here first, then there."""
    if ctx.in_flight is None:
        balance_cents = await ctx.reads.balance(user_id)
        if balance_cents is None:
            raise Refused(Status.UNKNOWN_USER, f"unknown user {user_id}")
        return answers.ok(Op.BALANCE, rid, ctx.worker_id, balance_cents, 0, 0)
    balance_cents, applied = await ctx.ledger.balance_at_home(ctx.set_id, user_id)
    in_flight_cents, sets_unreached = await ctx.in_flight(user_id, applied)
    return answers.ok(Op.BALANCE, rid, ctx.worker_id, balance_cents, in_flight_cents, sets_unreached)


async def statement(ctx: Context, rid: int, user_id: int, before: int, limit: int) -> bytes:
    balance_cents, rows, cursor = await ctx.ledger.statement(user_id, before, page_limit(ctx, limit))
    return answers.ok(Op.STATEMENT, rid, ctx.worker_id, balance_cents, cursor, rows)
