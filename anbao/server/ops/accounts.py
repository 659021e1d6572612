"""Wallets: REGISTER, DEPOSIT, WITHDRAW, BALANCE and STATEMENT."""

from __future__ import annotations

from anbao_client import protocol
from anbao_client.protocol import Op, Status

from ...core import codec
from ...storage.ledger import Ledger
from .. import answers
from .base import Context, Refused, page_limit


def reply_stored(ctx: Context, op: Op, rid: int, stored) -> bytes:
    """The answer an idempotent write stored, under this request's id."""
    if stored.status == Status.OK:
        return codec.encode_raw(op, rid, Status.OK, ctx.worker_id, stored.body)
    return codec.encode_error(op, rid, stored.status, ctx.worker_id, stored.body.decode("utf-8", "replace"))


async def register(ctx: Context, rid: int, user_ids: list[int]) -> bytes:
    created = await ctx.ledger.register(user_ids)
    ctx.engine.note_known_users(user_ids)
    return answers.ok(Op.REGISTER, rid, ctx.worker_id, created)


async def _external_move(ctx: Context, op: Op, rid: int, key: bytes, user_id: int, amount_cents: int,
                         limit_cents: int, move) -> bytes:
    """DEPOSIT and WITHDRAW: one transfer between the outside world and a
    wallet, idempotent by key, answered (balance_cents, transfer_id)."""
    if amount_cents > limit_cents:
        raise Refused(Status.INVALID, f"amount_cents above the limit {limit_cents}")
    await ctx.ledger.settle(user_id)

    async def body(conn) -> bytes:
        balance_cents, transfer_id = await move(conn, user_id, amount_cents)
        return answers.ok(op, 0, 0, balance_cents, transfer_id)[protocol.RESPONSE_HEADER_BYTES:]

    stored = await ctx.ledger.idempotent(key, op, (user_id, amount_cents), body)
    return reply_stored(ctx, op, rid, stored)


async def deposit(ctx: Context, rid: int, key: bytes, user_id: int, amount_cents: int) -> bytes:
    return await _external_move(ctx, Op.DEPOSIT, rid, key, user_id, amount_cents, ctx.limits.max_deposit_cents,
                                Ledger.deposit)


async def withdraw(ctx: Context, rid: int, key: bytes, user_id: int, amount_cents: int) -> bytes:
    return await _external_move(ctx, Op.WITHDRAW, rid, key, user_id, amount_cents, ctx.limits.max_withdraw_cents,
                                Ledger.withdraw)


async def balance(ctx: Context, rid: int, user_id: int) -> bytes:
    return answers.ok(Op.BALANCE, rid, ctx.worker_id, await ctx.ledger.balance(user_id))


async def statement(ctx: Context, rid: int, user_id: int, before: int, limit: int) -> bytes:
    balance_cents, rows, cursor = await ctx.ledger.statement(user_id, before, page_limit(ctx, limit))
    return answers.ok(Op.STATEMENT, rid, ctx.worker_id, balance_cents, cursor, rows)
