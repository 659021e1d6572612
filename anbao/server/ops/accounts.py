"""Wallets: REGISTER, DEPOSIT, WITHDRAW, BALANCE and STATEMENT."""

from __future__ import annotations

from anbao_client.protocol import Op, Status

from ...core import codec
from ...storage.domain import Operation
from ...storage.idempotency import StoredAnswer
from ...storage.ledger import Ledger
from .. import answers
from .base import Context, Refused, facts_written, page_limit


def reply_stored(ctx: Context, op: Op, rid: int, stored: StoredAnswer, *names: str) -> bytes:
    """The answer an idempotent write stored (storage's values, named in the
    table's order), or its refusal, under this request's id."""
    if stored.refusal is not None:
        return codec.encode_error(op, rid, Status[stored.refusal.name], ctx.worker_id, stored.message)
    assert stored.value is not None
    return answers.ok(op, rid, ctx.worker_id, *(stored.value[n] for n in names))


async def register(ctx: Context, rid: int, user_ids: list[int]) -> bytes:
    created = await ctx.ledger.register(user_ids)
    ctx.engine.note_known_users(user_ids)
    return answers.ok(Op.REGISTER, rid, ctx.worker_id, created)


async def _external_move(
    ctx: Context,
    op: Op,
    operation: Operation,
    rid: int,
    key: bytes,
    user_id: int,
    amount_cents: int,
    limit_cents: int,
    move,
) -> bytes:
    """DEPOSIT and WITHDRAW: one transfer between the outside world and a
    wallet, idempotent by key, answered (balance_cents, transfer_id)."""
    if amount_cents > limit_cents:
        raise Refused(Status.INVALID, f"amount {amount_cents} cents above the limit of {limit_cents} cents")
    await ctx.ledger.settle(user_id)

    async def body(conn) -> dict[str, int]:
        return await move(conn, user_id, amount_cents)

    stored = await ctx.ledger.idempotent(key, operation, (user_id, amount_cents), body)
    facts_written(ctx)
    return reply_stored(ctx, op, rid, stored, "balance_cents", "transfer_id")


async def deposit(ctx: Context, rid: int, key: bytes, user_id: int, amount_cents: int) -> bytes:
    return await _external_move(
        ctx,
        Op.DEPOSIT,
        Operation.DEPOSIT,
        rid,
        key,
        user_id,
        amount_cents,
        ctx.limits.max_deposit_cents,
        Ledger.deposit,
    )


async def withdraw(ctx: Context, rid: int, key: bytes, user_id: int, amount_cents: int) -> bytes:
    return await _external_move(
        ctx,
        Op.WITHDRAW,
        Operation.WITHDRAW,
        rid,
        key,
        user_id,
        amount_cents,
        ctx.limits.max_withdraw_cents,
        Ledger.withdraw,
    )


async def balance(ctx: Context, rid: int, user_id: int) -> bytes:
    """The balance (posted, plus this set's grabs still rolling up: what
    WITHDRAW and SEND can spend once they settle), and with several sets
    the cents other sets owe the user that have not reached it yet (not
    spendable until they do), read here first, then there."""
    if ctx.in_flight is None:
        return answers.ok(Op.BALANCE, rid, ctx.worker_id, await ctx.ledger.balance(user_id), 0, 0)
    balance_cents, applied = await ctx.ledger.balance_at_home(ctx.set_id, user_id)
    in_flight_cents, sets_unreached = await ctx.in_flight(user_id, applied)
    return answers.ok(Op.BALANCE, rid, ctx.worker_id, balance_cents, in_flight_cents, sets_unreached)


async def statement(ctx: Context, rid: int, user_id: int, before: int, limit: int) -> bytes:
    balance_cents, rows, cursor = await ctx.ledger.statement(user_id, before, page_limit(ctx, limit))
    return answers.ok(Op.STATEMENT, rid, ctx.worker_id, balance_cents, cursor, rows)
