"""Groups: a chat app's group id and its members. Membership is versioned
(migration 0012): every change moves the group to its next version, a
member's row says since which version they belong, and a removed member's
row moves to group_members_left with the version it ended at. A packet to
a group records the version it was sent at and belongs to the members of
that version (anbao_packet_members): membership at send time counts, and a
SEND copies nothing."""

from __future__ import annotations

import asyncpg

from .accounts import COUNT_REGISTERED
from .domain import Reason, Refused

_MEMBER_COUNT = "SELECT count(*) FROM group_members WHERE group_id = $1"


async def _check_registered(conn, user_ids: list[int]) -> None:
    found = await conn.fetchval(COUNT_REGISTERED, user_ids)
    if found != len(set(user_ids)):
        raise Refused(Reason.UNKNOWN_USER, f"{len(set(user_ids)) - found} user(s) are not registered")


async def _next_version(conn, group_id: int) -> int:
    # The group row's lock serializes its membership changes; a SEND reads
    # the version and the members in one snapshot and takes no lock.
    version = await conn.fetchval(
        "UPDATE groups SET version = version + 1 WHERE group_id = $1 RETURNING version", group_id
    )
    if version is None:
        raise Refused(Reason.UNKNOWN_GROUP, f"unknown group {group_id}")
    return version


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
                version = await _next_version(conn, group_id)
                await _check_registered(conn, user_ids)
                added = await conn.fetchval(
                    "WITH ins AS (INSERT INTO group_members (group_id, user_id, since_version)"
                    " SELECT $1, u, $3 FROM unnest($2::bigint[]) AS u ON CONFLICT DO NOTHING RETURNING 1)"
                    " SELECT count(*) FROM ins",
                    group_id,
                    user_ids,
                    version,
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
                version = await _next_version(conn, group_id)
                await _check_registered(conn, user_ids)
                removed = await conn.fetchval(
                    "WITH del AS (DELETE FROM group_members WHERE group_id = $1 AND user_id = ANY($2::bigint[])"
                    " RETURNING user_id, since_version),"
                    " gone AS (INSERT INTO group_members_left (group_id, user_id, since_version, left_version)"
                    " SELECT $1, user_id, since_version, $3 FROM del RETURNING 1)"
                    " SELECT count(*) FROM gone",
                    group_id,
                    user_ids,
                    version,
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
