"""Database failures get typed answers: bad text is INVALID before it
reaches PostgreSQL, an unreachable or stopping PostgreSQL is UNAVAILABLE
(IN_DOUBT for a write whose connection broke under it), never INTERNAL;
the outage is logged once per interval and shown in STATS, and retrying
with the same key afterwards moves the money exactly once."""

import asyncio
import logging
import os

import asyncpg
import pytest
from helpers import Anbao, Raw, funded_users, refuse_batches_of

from anbao.config import Limits
from anbao.server import dbhealth
from anbao.storage import embedded
from anbao_client import wire
from anbao_client.wire import Op, Status


async def test_nul_bytes_in_text_are_invalid_and_reach_nothing(anbao):
    """PostgreSQL's text cannot hold U+0000; it used to fail there: INTERNAL."""
    admin = await anbao.client("admin")
    a, b = await funded_users(admin, 1, 2, 1_000)
    raw = await Raw.open(anbao.port)
    key = os.urandom(16)
    raw.send(wire.send(10, key, a, 100, 2, 1, 0, 0, [], "good\x00bad"))
    raw.send(wire.group_create(11, 500, "fam\x00ily", [a, b]))
    raw.send(wire.send(12, os.urandom(16), a, 100, 2, 1, 0, 0, [], "\x00"))
    got = {r.request_id: r for r in await raw.answers(3)}
    assert {rid: r.status for rid, r in got.items()} == {10: Status.INVALID, 11: Status.INVALID, 12: Status.INVALID}
    assert "NUL" in wire.error_message(got[10].body) and "group name" in wire.error_message(got[11].body)
    assert await admin.balance(a) == 1_000, "no packet was made"
    from anbao_client import UnknownGroup

    with pytest.raises(UnknownGroup):
        await admin.group_info(500)
    # The same key, with a clean greeting, is a new request: it was never stored.
    s = await admin.send(a, 100, 2, greeting="good", key=key)
    assert s.packet_id
    raw.close()
    await anbao.assert_audit_clean()


def test_database_errors_are_classified():
    """Every database failure has its answer; only bugs are INTERNAL."""
    E = asyncpg.exceptions
    assert dbhealth.classify(E.CannotConnectNowError("the database system is shutting down")) == dbhealth.UNREACHABLE
    assert dbhealth.classify(E.TooManyConnectionsError()) == dbhealth.UNREACHABLE
    assert dbhealth.classify(ConnectionRefusedError()) == dbhealth.UNREACHABLE
    assert dbhealth.classify(FileNotFoundError()) == dbhealth.UNREACHABLE
    assert dbhealth.classify(E.AdminShutdownError()) == dbhealth.BROKE
    assert dbhealth.classify(E.CrashShutdownError()) == dbhealth.BROKE
    assert dbhealth.classify(E.ConnectionDoesNotExistError()) == dbhealth.BROKE
    assert dbhealth.classify(ConnectionResetError()) == dbhealth.BROKE
    assert (
        dbhealth.classify(
            asyncpg.exceptions._base.InternalClientError(
                "cannot switch to state 11; another operation (2) is in progress"
            )
        )
        == dbhealth.BROKE
    )
    assert dbhealth.classify(E.SerializationError()) == dbhealth.ROLLED_BACK
    assert dbhealth.classify(E.DeadlockDetectedError()) == dbhealth.ROLLED_BACK
    assert dbhealth.classify(E.QueryCanceledError()) == dbhealth.ROLLED_BACK
    assert dbhealth.classify(E.DiskFullError()) == dbhealth.ROLLED_BACK
    assert dbhealth.classify(E.CharacterNotInRepertoireError()) == dbhealth.BAD_VALUE
    assert dbhealth.classify(E.NumericValueOutOfRangeError()) == dbhealth.BAD_VALUE
    assert dbhealth.classify(E.UndefinedTableError()) is None
    assert dbhealth.classify(KeyError()) is None


async def test_postgres_shutting_down_is_unavailable_never_internal(own_pg, tokens_file, caplog):
    """PostgreSQL in a smart shutdown refuses new connections ("the
    database system is shutting down", CannotConnectNowError): that gave
    INTERNAL on BALANCE and DEPOSIT. A worker whose connections are
    terminated and who must reconnect meets exactly that."""
    data, server, dsn = own_pg
    limits = Limits.of(db_probe_interval_ms=100, db_down_log_interval_ms=60_000)
    anbao = await Anbao(dsn, tokens_file, limits).start()
    caplog.set_level(logging.WARNING, logger="anbao.database")
    holder = await asyncpg.connect(dsn)  # keeps the smart shutdown from finishing
    try:
        admin = await anbao.client("admin")
        (a,) = await funded_users(admin, 1, 1, 1_000)
        raw = await Raw.open(anbao.port)
        await holder.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        embedded.pg_ctl_stop(data, mode="smart", wait=False)
        keys = [os.urandom(16) for _ in range(40)]
        statuses = {Op.BALANCE: [], Op.DEPOSIT: []}
        for i, key in enumerate(keys):  # bounded: 40 rounds
            raw.send(wire.balance(1000 + i, a) + wire.deposit(2000 + i, key, a, 10))
            for r in await raw.answers(2):
                statuses[r.opcode].append(r.status)
                if r.status != Status.OK:
                    assert wire.error_message(r.body)
            await asyncio.sleep(0.02)
        seen = set(statuses[Op.BALANCE]) | set(statuses[Op.DEPOSIT])
        assert Status.INTERNAL not in seen, statuses
        assert set(statuses[Op.BALANCE]) <= {Status.OK, Status.UNAVAILABLE}
        assert set(statuses[Op.DEPOSIT]) <= {Status.OK, Status.UNAVAILABLE, Status.IN_DOUBT}
        assert Status.UNAVAILABLE in seen, "the shutdown should have been met"
        st = await admin.stats()
        assert st["database_up"] is False and st["database_failures"] >= 10 and st["database_down_ms"] > 0
        assert "shutting down" in st["database_last_error"] or "connection" in st["database_last_error"]
        # Logged when it began, not once per failed request.
        down_logs = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(down_logs) == 1, [r.getMessage() for r in down_logs]
    finally:
        await holder.close()
    # Sessions the worker opened before the shutdown began would keep a
    # smart shutdown waiting: finish it as a fast one.
    await asyncio.get_running_loop().run_in_executor(None, lambda: embedded.pg_ctl_stop(data, mode="fast"))
    # Back: PostgreSQL restarts, the worker reconnects, the retried keys move money once.
    embedded.start(data)
    for _ in range(100):  # bounded: 10 s
        st = await admin.stats()
        if st["database_up"]:
            break
        await asyncio.sleep(0.1)
    assert st["database_up"] and st["database_outages"] == 1
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    for i, key in enumerate(keys):
        raw.send(wire.deposit(3000 + i, key, a, 10))
    again = await raw.answers(len(keys))
    assert {r.status for r in again} == {Status.OK}
    assert await admin.balance(a) == 1_000 + 10 * len(keys)
    raw.close()
    await anbao.stop()
    await anbao.assert_audit_clean()


async def test_a_batch_whose_commit_cannot_connect_is_answered(anbao):
    """The committer lost its connection (a refused batch discards it) and
    cannot make a new one (the database refuses connections): the next
    batch is known not committed and its grabs are answered UNAVAILABLE at
    once. It used to raise out of the commit and leave them unanswered."""
    from anbao_client import Unavailable

    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 10_000)
    users = await funded_users(admin, 100, 3)
    sent = await admin.send(sender, 300, 3)
    inside = await asyncpg.connect(anbao.dsn)
    db = await inside.fetchval("SELECT current_database()")
    await refuse_batches_of(inside, users[0], 0)
    with pytest.raises(Unavailable):
        await admin.grab(sent.packet_id, users[0])  # refused at COMMIT: the committer drops its connection
    conn = await asyncpg.connect(anbao.dsn, database="postgres")  # a database may not close itself
    try:
        await conn.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
        with pytest.raises(Unavailable):
            await asyncio.wait_for(admin.grab(sent.packet_id, users[1]), 5)
    finally:
        await conn.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
        await conn.close()
    await inside.execute("CREATE TABLE let_in ()")
    await inside.close()
    got = [await admin.grab(sent.packet_id, u) for u in users]  # the retries land, in order
    assert [g.seq for g in got] == [1, 2, 3]
    await anbao.assert_audit_clean()
