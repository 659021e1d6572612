"""Groups: GROUP_CREATE, GROUP_ADD, GROUP_REMOVE and GROUP_INFO."""

from __future__ import annotations

from anbao_client.protocol import Op

from .. import answers
from .base import Context, member_list, page_limit


async def group_create(ctx: Context, rid: int, group_id: int, name: str, members: list[int]) -> bytes:
    member_list(ctx, members, 0)
    created, n = await ctx.ledger.group_create(group_id, name, members, ctx.limits.rules.max_group_members)
    return answers.ok(Op.GROUP_CREATE, rid, ctx.worker_id, int(created), n)


async def group_add(ctx: Context, rid: int, group_id: int, user_ids: list[int]) -> bytes:
    member_list(ctx, user_ids, 1)
    added, n = await ctx.ledger.group_add(group_id, user_ids, ctx.limits.rules.max_group_members)
    return answers.ok(Op.GROUP_ADD, rid, ctx.worker_id, added, n)


async def group_remove(ctx: Context, rid: int, group_id: int, user_ids: list[int]) -> bytes:
    member_list(ctx, user_ids, 1)
    removed, n = await ctx.ledger.group_remove(group_id, user_ids)
    return answers.ok(Op.GROUP_REMOVE, rid, ctx.worker_id, removed, n)


async def group_info(ctx: Context, rid: int, group_id: int, after: int, limit: int) -> bytes:
    name, n, members, cursor = await ctx.ledger.group_info(group_id, after, page_limit(ctx, limit))
    return answers.ok(Op.GROUP_INFO, rid, ctx.worker_id, n, cursor, name, members)
