"""Groups: a chat app's group id and its members. A SEND to a group
snapshots its members at send time (packets.py), so a later change touches
no packet already sent."""

from __future__ import annotations

import asyncpg

from .accounts import COUNT_REGISTERED
from .domain import Reason, Refused

_MEMBER_COUNT = "SELECT count(*) FROM group_members WHERE group_id = $1"


async def _check_registered(conn, user_ids: list[int]) -> None:
    found = await conn.fetchval(COUNT_REGISTERED, user_ids)
    if found != len(set(user_ids)):
        raise Refused(Reason.UNKNOWN_USER, f"{len(set(user_ids)) - found} user(s) are not registered")


async def _lock_group(conn, group_id: int) -> None:
    # Membership changes of one group are serialized on its row, and a
    # SEND snapshots under FOR SHARE of the same row.
    if await conn.fetchval("SELECT 1 FROM groups WHERE group_id = $1 FOR UPDATE", group_id) is None:
        raise Refused(Reason.UNKNOWN_GROUP, f"unknown group {group_id}")


class Groups:
    pool: asyncpg.Pool

    async def group_create(self, group_id: int, name: str, members: list[int], max_members: int) -> tuple[bool, int]:
        """Creates the group with these members; returns (created, member
        count). An id that exists already is left as it is (created False),
        so a retry after a lost answer changes nothing."""
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                if members:
                    await _check_registered(conn, members)
                created = await conn.fetchval(
                    "INSERT INTO groups (group_id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING true",
                    group_id,
                    name,
                )
                if created and members:
                    assert len(members) <= max_members
                    await conn.execute(
                        "INSERT INTO group_members (group_id, user_id)"
                        " SELECT $1, u FROM unnest($2::bigint[]) AS u ON CONFLICT DO NOTHING",
                        group_id,
                        members,
                    )
                n = await conn.fetchval(_MEMBER_COUNT, group_id)
        return bool(created), n

    async def group_add(self, group_id: int, user_ids: list[int], max_members: int) -> tuple[int, int]:
        """Adds members; returns (newly added, member count). Above
        max_members the whole change is refused."""
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await _lock_group(conn, group_id)
                await _check_registered(conn, user_ids)
                added = await conn.fetchval(
                    "WITH ins AS (INSERT INTO group_members (group_id, user_id)"
                    " SELECT $1, u FROM unnest($2::bigint[]) AS u ON CONFLICT DO NOTHING RETURNING 1)"
                    " SELECT count(*) FROM ins",
                    group_id,
                    user_ids,
                )
                n = await conn.fetchval(_MEMBER_COUNT, group_id)
                if n > max_members:
                    raise Refused(Reason.INVALID, f"a group holds at most {max_members} members")
        return added, n

    async def group_remove(self, group_id: int, user_ids: list[int]) -> tuple[int, int]:
        """Removes members; returns (removed, member count). Packets sent
        before keep the members they were sent to."""
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await _lock_group(conn, group_id)
                await _check_registered(conn, user_ids)
                removed = await conn.fetchval(
                    "WITH del AS (DELETE FROM group_members WHERE group_id = $1 AND user_id = ANY($2::bigint[])"
                    " RETURNING 1) SELECT count(*) FROM del",
                    group_id,
                    user_ids,
                )
                n = await conn.fetchval(_MEMBER_COUNT, group_id)
        return removed, n

    async def group_info(self, group_id: int, after: int, limit: int) -> tuple[str, int, list[int], int]:
        """(name, member count, up to `limit` member ids above `after` in
        id order, next cursor or 0)."""
        async with self.pool.acquire() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                name = await conn.fetchval("SELECT name FROM groups WHERE group_id = $1", group_id)
                if name is None:
                    raise Refused(Reason.UNKNOWN_GROUP, f"unknown group {group_id}")
                n = await conn.fetchval(_MEMBER_COUNT, group_id)
                ids = [
                    r[0]
                    for r in await conn.fetch(
                        "SELECT user_id FROM group_members WHERE group_id = $1 AND user_id > $2"
                        " ORDER BY user_id LIMIT $3",
                        group_id,
                        after,
                        limit + 1,
                    )
                ]
        page = ids[:limit]
        return name, n, page, (page[-1] if len(ids) > limit else 0)
