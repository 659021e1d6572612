"""BALANCE by group read (engine/reads.py): the BALANCEs that gather while
one read is out are answered by one statement, each with its own user's
posted balance and grabs still rolling up, a user without a wallet refused
UNKNOWN_USER, and a database fault given to every BALANCE of the read."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from helpers import ROLLUP_LOCK_KEY, funded_users, grab_outcomes
from polling import eventually

from anbao.config import Limits
from anbao_client import UnknownUser
from anbao_client.errors import Unavailable


@pytest.mark.parametrize("limits", [Limits.of(balance_read_max_users=16)])
async def test_balances_read_together_are_each_users_own(anbao, fresh_dsn):
    admin = await anbao.client("admin")
    app = await anbao.client("app")
    (sender,) = await funded_users(admin, 1, 1, 1_000_000)
    grabbers = await funded_users(admin, 100, 30, 500)
    idle = await funded_users(admin, 200, 10, 700)
    holder = await asyncpg.connect(fresh_dsn)
    try:
        # No roll-up while it is held: every grab below stays pending.
        await holder.execute("SELECT pg_advisory_lock($1)", ROLLUP_LOCK_KEY)
        sent = await admin.send(sender, 30_000, 30, members=grabbers)
        won, other = await grab_outcomes([app], sent.packet_id, grabbers)
        assert len(won) == 30 and not other
        assert await holder.fetchval("SELECT count(*) FROM claims") == 0, "the grabs are still rolling up"
        before = await admin.stats()
        asks = [*grabbers, *idle, *grabbers[:5], 999_001, 999_002]
        got = await asyncio.gather(*(app.balance(u) for u in asks), return_exceptions=True)
        expected = [500 + won[u].amount_cents for u in grabbers] + [700] * 10
        expected += [500 + won[u].amount_cents for u in grabbers[:5]]
        assert got[:-2] == expected
        assert all(isinstance(g, UnknownUser) for g in got[-2:]), got[-2:]
        after = await admin.stats()
        reads = after["balance_reads"] - before["balance_reads"]
        users = after["balance_read_users"] - before["balance_read_users"]
        assert 42 <= users <= 47, "each user once a read (the 5 asked twice: once or twice)"
        assert 3 <= reads < 42, f"{reads} reads for 47 BALANCEs: at most 16 users a read, and gathered"
    finally:
        await holder.execute("SELECT pg_advisory_unlock($1)", ROLLUP_LOCK_KEY)
        await holder.close()
    await anbao.assert_audit_clean()


@pytest.mark.parametrize("limits", [Limits()])
async def test_a_read_that_fails_fails_each_of_its_balances(anbao, fresh_dsn):
    """The read's statement cancelled inside PostgreSQL: every BALANCE it
    carried is answered UNAVAILABLE, and the next read answers again."""
    admin = await anbao.client("admin")
    app = await anbao.client("app")
    users = await funded_users(admin, 1, 8, 300)
    holder = await asyncpg.connect(fresh_dsn)
    try:
        # A read takes no row lock: it is held up by a table lock, then cancelled.
        await holder.execute("BEGIN")
        await holder.execute("LOCK TABLE grab_rollups IN ACCESS EXCLUSIVE MODE")
        asked = [asyncio.ensure_future(app.balance(u)) for u in users]

        async def cancel_reads() -> bool:
            # Reads wait on the lock: cancel each (a read that started
            # later, with the BALANCEs that missed the first, waits too).
            await holder.execute("SELECT pg_stat_clear_snapshot()")  # a fresh reading inside this transaction
            await holder.execute(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND query LIKE '%grab_rollups%' AND pid <> pg_backend_pid()"
            )
            return all(a.done() for a in asked)

        await eventually(cancel_reads, what="every BALANCE of the cancelled reads answered")
        got = [a.exception() or a.result() for a in asked]
        assert all(isinstance(g, Unavailable) for g in got), got
        await holder.execute("ROLLBACK")
        assert await asyncio.wait_for(asyncio.gather(*(app.balance(u) for u in users)), 10) == [300] * 8
    finally:
        await holder.close()
    await anbao.assert_audit_clean()


async def test_one_users_balance_through_the_sdk(anbao):
    """A lone BALANCE (nothing to gather with) and an unknown user's."""
    admin = await anbao.client("admin")
    (u,) = await funded_users(admin, 1, 1, 1_234)
    assert await admin.balance(u) == 1_234
    with pytest.raises(UnknownUser):
        await admin.balance(424_242)
    assert (await admin.stats())["balance_reads"] >= 1
