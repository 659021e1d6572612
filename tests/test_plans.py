"""The keyed batches and the sequencer reach their rows by key, whatever
size the tables had when a connection first planned them. PL/pgSQL keeps
the plans a connection makes, and one made on a new database's few rows
hashed or scanned a whole table on every call after (BENCHMARKS.md, item
18: the roll-up's, which tests/test_rollup.py reads). Each test plans on
this test's new database, as generic plans (plan_cache_mode: the plans a
connection keeps after its first five calls), and reads the plans
PostgreSQL runs (auto_explain, as NOTICEs). Each failed on the functions
before: a hash join over a seq scan of accounts or event_log."""

from __future__ import annotations

import asyncio
import os

import asyncpg
import pytest
from helpers import explain_into, funded_users, plan_nodes, plans_of

from anbao.storage.accounts import Accounts
from anbao.storage.domain import Audience, BatchOutcome, Mode, MoveRequest, Operation, SendRequest
from anbao.storage.idempotency import scoped_key
from anbao.storage.packets import Packets

pytestmark = pytest.mark.filterwarnings("ignore:.*active log listener:asyncpg.InterfaceWarning")


def _assert_by_key(plans: list[str], marker: str, table: str) -> None:
    """The statement holding marker reached table by its index only: no
    hash or merge join, no seq scan of it."""
    found = plans_of(plans, marker)
    assert found, f"no plan for {marker!r}"
    for plan in found:
        nodes = list(plan_nodes(plan["Plan"]))
        assert not [n for n in nodes if n.get("Node Type") in ("Hash Join", "Merge Join")], plan
        scans = [n for n in nodes if n.get("Relation Name") == table and n.get("Node Type") != "ModifyTable"]
        assert scans and all(n["Node Type"] in ("Index Scan", "Index Only Scan") for n in scans), plan


def _key() -> bytes:
    return scoped_key("admin", os.urandom(16))


async def _pool(dsn: str, plans: list[str]) -> asyncpg.Pool:
    """A pool whose connection explains every statement it runs. Set up on
    every acquire: a release resets the settings and drops the listener
    (asyncpg warns that it had one: expected here)."""
    return await asyncpg.create_pool(dsn, min_size=1, max_size=1, setup=lambda c: explain_into(c, plans, generic=True))


async def test_a_deposit_batch_updates_its_wallets_by_key(anbao):
    admin = await anbao.client("admin")
    users = await funded_users(admin, 10, 3)
    plans: list[str] = []
    pool = await _pool(anbao.dsn, plans)
    try:
        accounts = Accounts()
        accounts.pool = pool
        moves = [MoveRequest(_key(), os.urandom(32), u, 500) for u in users]
        results = await accounts.move_batch(Operation.DEPOSIT, moves)
    finally:
        await pool.close()
    assert [r.outcome for r in results] == [BatchOutcome.RAN] * 3
    _assert_by_key(plans, "unnest(w_account, w_balance)", "accounts")
    await anbao.assert_audit_clean()


async def test_a_send_batch_updates_its_senders_by_key(anbao):
    admin = await anbao.client("admin")
    senders = await funded_users(admin, 10, 2, 10_000)
    await funded_users(admin, 20, 3)
    plans: list[str] = []
    pool = await _pool(anbao.dsn, plans)
    try:
        packets = Packets()
        packets.pool = pool
        ids = await packets.packet_seq_block()
        expires_ms = 4_102_444_800_000  # 2100-01-01
        sends = [
            SendRequest(
                _key(),
                os.urandom(32),
                ids[i],
                s,
                1_000,
                2,
                int(Mode.RANDOM),
                expires_ms,
                int(Audience.OPEN),
                0,
                (),
                "",
            )
            for i, s in enumerate(senders)
        ]
        results = await packets.send_batch(
            sends, min_share_cents=1, max_share_cents=0, daily_max_cents=None, daily_max_packets=None, at_ms=0
        )
    finally:
        await pool.close()
    assert [r.outcome for r in results] == [BatchOutcome.RAN] * 2
    _assert_by_key(plans, "unnest(w_account, w_balance)", "accounts")


async def test_the_sequencer_numbers_its_rows_by_key(anbao):
    admin = await anbao.client("admin")
    await funded_users(admin, 10, 3, 500)
    conn = await asyncpg.connect(anbao.dsn)
    plans: list[str] = []
    try:
        for _ in range(100):  # bounded: 5 s for the worker's sequencer to number the deposits
            if await conn.fetchval("SELECT NOT EXISTS (SELECT 1 FROM event_log WHERE last_no IS NULL)"):
                break
            await asyncio.sleep(0.05)
        await explain_into(conn, plans, generic=True)
        # The newest rows again unnumbered, numbered again in one
        # transaction, and put back as they were by its rollback.
        await conn.execute("BEGIN")
        await conn.execute(
            "UPDATE event_log SET first_no = NULL, last_no = NULL"
            " WHERE id IN (SELECT id FROM event_log ORDER BY id DESC LIMIT 2)"
        )
        await conn.execute("UPDATE event_feed SET numbered_through = (SELECT max(last_no) FROM event_log)")
        before = await conn.fetchval("SELECT numbered_through FROM event_feed")
        assert await conn.fetchval("SELECT anbao_number_events()") > before
        await conn.execute("ROLLBACK")
    finally:
        await conn.close()
    _assert_by_key(plans, "UPDATE event_log e SET first_no", "event_log")
