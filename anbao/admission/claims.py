"""Reading a sold-out packet's final claim list from PostgreSQL.

The database is the one place where a packet's claims are complete and
final: once it holds `share_count` durable claims (anbao_claims_of: rolled
up, or committed in a batch still waiting for its roll-up), no claim can be
added (the owner never takes a share past the count), none can change, and
no refund touches a sold-out packet. Before that, a non-owner cannot know
who holds a pending share, so it asks the owner instead. One read per
packet per worker, in one snapshot.
"""

from __future__ import annotations

import logging

import asyncpg

from anbao_client.protocol import Audience

from .cache import FinalSet, grab_body

log = logging.getLogger("anbao.admission")


async def load_final_set(pool: asyncpg.Pool, packet_id: int) -> FinalSet | None:
    """The packet's FinalSet, or None while it is not sold out in the
    database (shares still open, or the last batch not committed yet)."""
    async with pool.acquire() as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            p = await conn.fetchrow(
                "SELECT sender_id, share_count, audience FROM packets WHERE packet_id = $1", packet_id
            )
            if p is None:
                return None
            count = p["share_count"]
            claims = await conn.fetch("SELECT user_id, seq, amount_cents FROM anbao_claims_of($1)", packet_id)
            if len(claims) < count:
                return None
            eligible = None
            if p["audience"] != Audience.OPEN:
                eligible = frozenset(r[0] for r in await conn.fetch("SELECT anbao_packet_members($1)", packet_id))
    answers = {r["user_id"]: grab_body(r["amount_cents"], r["seq"], count) for r in claims}
    if len(claims) != count or len(answers) != count or {r["seq"] for r in claims} != set(range(1, count + 1)):
        # More claims than shares, or a user twice: the database breaks an
        # invariant (the audit names it). Answer nothing from it; the owner decides.
        log.critical(
            "packet %d: %d durable claims, %d users, for %d shares", packet_id, len(claims), len(answers), count
        )
        return None
    return FinalSet(packet_id, count, p["sender_id"], eligible, answers)
