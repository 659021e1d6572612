"""Storage's own vocabulary (anbao/storage/domain.py) against the database,
and the upgrade of idempotency keys from wire bytes to domain answers
(migration 0004).

The codes in domain.py are the database's: the tables' CHECKs and the
PL/pgSQL of the migrations (the roll-up writes GRAB transfers, the refund
writes REFUND transfers and status REFUNDED) must agree with them, or the
Python side and the database would mean different things by one number.
"""

import hashlib
import json
import os
import re
import struct
import time

import asyncpg
import pytest
from helpers import Anbao, database_at_version, funded_users

from anbao.config import Limits
from anbao.storage import migrate as migrate_mod
from anbao.storage.audit import audit
from anbao.storage.domain import AccountKind, Audience, Mode, Operation, PacketStatus, Reason, TransferKind
from anbao.storage.idempotency import scoped_key
from anbao_client import IdempotencyConflict, InsufficientFunds, Invalid, UnknownGroup, UnknownUser, protocol, routing


def test_the_wire_passes_storage_codes_through_unchanged():
    """The server puts storage's transfer kinds, packet statuses, modes and
    audiences on the wire as they are (STATEMENT, SENT_LIST, PACKET, SEND),
    and answers a refusal with the wire status of its reason's name: the
    protocol table must agree."""
    assert {k.name: k.value for k in protocol.TransferKind} == {k.name: k.value for k in TransferKind}
    assert {k.name: k.value for k in protocol.PacketStatus} == {k.name: k.value for k in PacketStatus}
    assert {k.name: k.value for k in protocol.Mode} == {k.name: k.value for k in Mode}
    assert {k.name: k.value for k in protocol.Audience} == {k.name: k.value for k in Audience}
    assert {r.name for r in Reason} <= {s.name for s in protocol.Status}


async def check_values(conn, table: str, name: str) -> set[int]:
    """The integers a CHECK constraint allows, from its definition."""
    definition = await conn.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = $1::regclass AND conname = $2",
        table,
        name,
    )
    assert definition is not None, f"no constraint {name} on {table}"
    return {int(v) for v in re.findall(r"\d+", definition)}


async def test_database_codes_agree_with_the_domain(anbao):
    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 10_000)
    grabber, other = await funded_users(admin, 2, 2)
    await admin.withdraw(sender, 100)
    sold_out = await admin.send(sender, 200, 1, mode=protocol.Mode.FIXED)
    await admin.grab(sold_out.packet_id, grabber)
    await anbao.worker.ledger.settle(grabber)  # the roll-up (PL/pgSQL) writes the GRAB transfer
    refunded = await admin.send(sender, 300, 2, members=[grabber, other])
    assert (await anbao.worker.engine.expire(refunded.packet_id))[1]  # anbao_refund_packets, now
    conn = await asyncpg.connect(anbao.dsn)
    try:
        # The CHECKs of the tables allow exactly the domain's codes.
        assert await check_values(conn, "accounts", "accounts_kind_check") == set(AccountKind)
        assert await check_values(conn, "packets", "packets_status_known") == set(PacketStatus)
        assert await check_values(conn, "packets", "packets_audience_check") == set(Audience)
        assert await check_values(conn, "packets", "packets_mode_check") == set(Mode)
        # The account rows: the external one made by migration 0001, a wallet, an escrow.
        first = await conn.fetchrow("SELECT kind, owner_id FROM accounts ORDER BY account_id LIMIT 1")
        assert tuple(first) == (AccountKind.EXTERNAL, 0)
        assert await conn.fetchval("SELECT kind FROM accounts WHERE owner_id = $1", sender) == AccountKind.USER
        assert (
            await conn.fetchval(
                "SELECT a.kind FROM packets p JOIN accounts a ON a.account_id ="
                " p.escrow_account_id WHERE p.packet_id = $1",
                sold_out.packet_id,
            )
            == AccountKind.ESCROW
        )
        # Every transfer kind, whoever wrote it (Python or the database's functions).
        kinds = {r["kind"]: r["n"] for r in await conn.fetch("SELECT kind, count(*) AS n FROM transfers GROUP BY 1")}
        assert kinds == {
            TransferKind.DEPOSIT: 1,
            TransferKind.WITHDRAW: 1,
            TransferKind.SEND: 2,
            TransferKind.GRAB: 1,
            TransferKind.REFUND: 1,
        }
        assert (
            await conn.fetchval("SELECT packet_id FROM transfers WHERE kind = $1", TransferKind.GRAB)
            == sold_out.packet_id
        )
        assert (
            await conn.fetchval("SELECT packet_id FROM transfers WHERE kind = $1", TransferKind.REFUND)
            == refunded.packet_id
        )
        statuses = dict(await conn.fetch("SELECT packet_id, status FROM packets"))
        assert statuses == {sold_out.packet_id: PacketStatus.SOLD_OUT, refunded.packet_id: PacketStatus.REFUNDED}
        assert (
            await conn.fetchval("SELECT audience FROM packets WHERE packet_id = $1", refunded.packet_id)
            == Audience.MEMBERS
        )
        # Idempotency keys hold storage's operation codes.
        ops = sorted(r[0] for r in await conn.fetch("SELECT operation FROM idempotency_keys"))
        assert ops == sorted([Operation.DEPOSIT] + [Operation.WITHDRAW] + [Operation.SEND] * 2)
    finally:
        await conn.close()
    await anbao.assert_audit_clean()


# ------------------------------------------------------------ upgrade from v3

OP_DEPOSIT, OP_WITHDRAW, OP_SEND = 0x11, 0x13, 0x20  # the wire opcodes v3 stored
OK, INSUFFICIENT_FUNDS, UNKNOWN_USER, UNKNOWN_GROUP, INVALID = 0, 5, 12, 17, 6  # the wire statuses v3 stored


def v3_request_hash(opcode: int, fields: tuple) -> bytes:
    """The request hash exactly as the v3 server computed it."""
    return hashlib.sha256(repr((opcode, fields)).encode()).digest()


async def v3_database(pg, name: str) -> str:
    return await database_at_version(pg, name, 3)


async def store_v3_answer(conn, key: bytes, opcode: int, fields: tuple, status: int, response: bytes) -> None:
    """An idempotency row as the v3 server wrote it: the wire status and the wire answer body."""
    await conn.execute(
        "INSERT INTO idempotency_keys (key, opcode, request_hash, status, response) VALUES ($1, $2, $3, $4, $5)",
        key,
        opcode,
        v3_request_hash(opcode, fields),
        status,
        response,
    )


async def v3_move(conn, kind: int, debit: int, credit: int, amount_cents: int, packet_id=None) -> int:
    tid = await conn.fetchval(
        "INSERT INTO transfers (kind, debit_account, credit_account, amount_cents, packet_id)"
        " VALUES ($1, $2, $3, $4, $5) RETURNING transfer_id",
        kind,
        debit,
        credit,
        amount_cents,
        packet_id,
    )
    await conn.execute(
        "UPDATE accounts SET balance_cents = balance_cents - $2 WHERE account_id = $1", debit, amount_cents
    )
    await conn.execute(
        "UPDATE accounts SET balance_cents = balance_cents + $2 WHERE account_id = $1", credit, amount_cents
    )
    return tid


async def test_upgrade_idempotency_rows_in_place(pg, tokens_file):
    """A v3 database whose idempotency keys hold wire bytes (a deposit, a
    withdrawal, a send, and refusals of each) upgrades to v4 in place, and
    retrying each key over the protocol replays exactly its first answer:
    the same balance and transfer id, packet id and expiry, the same refusal
    status and message, even where running the request again would now
    answer otherwise; nothing moves."""
    dsn = await v3_database(pg, f"v3_idem_{os.getpid()}")
    k = {name: os.urandom(16) for name in ("dep", "wd", "send", "poor", "nobody", "nogroup", "toofew", "high")}
    expires_at_ms = time.time_ns() // 1_000_000 + 3_600_000
    greeting = "恭喜发财"
    send_fields = (1, 1_000, 2, int(Mode.FIXED), 3_600, int(Audience.OPEN), (), greeting)
    conn = await asyncpg.connect(dsn)
    try:
        # What a v3 server wrote: wallets 1..3, then user 1 deposits, withdraws and sends.
        await conn.execute("INSERT INTO accounts (kind, owner_id) SELECT 1, u FROM generate_series(1, 3) u")
        ext = await conn.fetchval("SELECT account_id FROM accounts WHERE kind = 0")
        wallet = await conn.fetchval("SELECT account_id FROM accounts WHERE kind = 1 AND owner_id = 1")
        dep_tid = await v3_move(conn, 1, ext, wallet, 5_000)
        await store_v3_answer(conn, k["dep"], OP_DEPOSIT, (1, 5_000), OK, struct.pack(">qQ", 5_000, dep_tid))
        wd_tid = await v3_move(conn, 2, wallet, ext, 700)
        await store_v3_answer(conn, k["wd"], OP_WITHDRAW, (1, 700), OK, struct.pack(">qQ", 4_300, wd_tid))
        packet_id = routing.make_packet_id(0, await conn.fetchval("SELECT nextval('packet_seq')"), 5)
        escrow = await conn.fetchval(
            "INSERT INTO accounts (kind, owner_id) VALUES (2, $1) RETURNING account_id", packet_id
        )
        await conn.execute(
            "INSERT INTO packets (packet_id, sender_id, escrow_account_id, total_cents, share_count,"
            " mode, min_share_cents, audience, greeting, expires_at)"
            " VALUES ($1, 1, $2, 1000, 2, 2, 1, 0, $3, to_timestamp($4::float8 / 1000))",
            packet_id,
            escrow,
            greeting,
            expires_at_ms,
        )
        await v3_move(conn, 3, wallet, escrow, 1_000, packet_id)
        await store_v3_answer(
            conn, k["send"], OP_SEND, send_fields, OK, struct.pack(">Qqq", packet_id, 3_300, expires_at_ms)
        )
        # Refusals, each stored with its message.
        await store_v3_answer(conn, k["poor"], OP_WITHDRAW, (2, 1_000), INSUFFICIENT_FUNDS, b"balance 0 below 1000")
        await store_v3_answer(conn, k["nobody"], OP_DEPOSIT, (99, 500), UNKNOWN_USER, b"unknown user 99")
        await store_v3_answer(
            conn, k["nogroup"], OP_SEND, (1, 300, 1, 1, 3_600, 3, (77,), ""), UNKNOWN_GROUP, b"unknown group 77"
        )
        await store_v3_answer(
            conn,
            k["toofew"],
            OP_SEND,
            (1, 300, 3, 1, 3_600, 3, (78,), "新年"),
            INVALID,
            b"3 shares for 1 group members besides the sender: the packet could never sell out",
        )
        # A u64 with its high bit set reads back unsigned (no real row has one yet).
        await store_v3_answer(conn, k["high"], OP_DEPOSIT, (3, 1), OK, struct.pack(">qQ", 77, 2**63 + 5))
    finally:
        await conn.close()

    assert await migrate_mod.migrate(dsn) == migrate_mod.migrations()[-1][0]  # the newest, whatever its number
    report = await audit(dsn)
    assert report.ok, report.text()
    conn = await asyncpg.connect(dsn)
    try:
        columns = {
            r[0]
            for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'idempotency_keys'"
            )
        }
        assert {"status", "response", "opcode"}.isdisjoint(columns) and {"operation", "answer"} <= columns
        rows = {bytes(r["key"]): r for r in await conn.fetch("SELECT * FROM idempotency_keys")}
    finally:
        await conn.close()
    assert rows[k["send"]]["operation"] == Operation.SEND and rows[k["send"]]["refusal"] is None
    assert rows[k["poor"]]["refusal"] == "INSUFFICIENT_FUNDS" and rows[k["poor"]]["answer"] is None

    server = Anbao(dsn, tokens_file, Limits())
    await server.start()
    try:
        admin = await server.client("admin")
        # What would answer otherwise if run again now: user 2 has money, user 99
        # a wallet, group 77 exists, group 78 has members enough.
        await admin.register([2, 3, 4, 99])
        await admin.deposit(2, 5_000)
        await admin.group_create(77, [2])
        await admin.group_create(78, [2, 3, 4])
        transfers_before = await server.fetchval("SELECT count(*) FROM transfers")

        dep = await admin.deposit(1, 5_000, key=k["dep"])
        assert (dep.balance_cents, dep.transfer_id) == (5_000, dep_tid)
        wd = await admin.withdraw(1, 700, key=k["wd"])
        assert (wd.balance_cents, wd.transfer_id) == (4_300, wd_tid)
        sent = await admin.send(
            1, 1_000, 2, mode=protocol.Mode.FIXED, expiry_seconds=3_600, greeting=greeting, key=k["send"]
        )
        assert (sent.packet_id, sent.sender_balance_cents, sent.expires_at_ms) == (packet_id, 3_300, expires_at_ms)
        high = await admin.deposit(3, 1, key=k["high"])
        assert (high.balance_cents, high.transfer_id) == (77, 2**63 + 5)

        with pytest.raises(InsufficientFunds) as poor:
            await admin.withdraw(2, 1_000, key=k["poor"])
        assert poor.value.message == "balance 0 below 1000"
        with pytest.raises(UnknownUser) as nobody:
            await admin.deposit(99, 500, key=k["nobody"])
        assert nobody.value.message == "unknown user 99"
        with pytest.raises(UnknownGroup) as nogroup:
            await admin.send(1, 300, 1, group=77, expiry_seconds=3_600, key=k["nogroup"])
        assert nogroup.value.message == "unknown group 77"
        with pytest.raises(Invalid) as toofew:
            await admin.send(1, 300, 3, group=78, expiry_seconds=3_600, greeting="新年", key=k["toofew"])
        assert toofew.value.message == (
            "3 shares for 1 group members besides the sender: the packet could never sell out"
        )
        # The old keys still guard their parameters.
        with pytest.raises(IdempotencyConflict):
            await admin.deposit(1, 5_001, key=k["dep"])

        # Nothing moved: replays only.
        assert await server.fetchval("SELECT count(*) FROM transfers") == transfers_before
        assert [await admin.balance(u) for u in (1, 2, 3, 99)] == [3_300, 5_000, 0, 0]
        # The v3 packet is served: it sells out to two grabbers.
        got = [await admin.grab(packet_id, u) for u in (2, 3)]
        assert sorted(g.amount_cents for g in got) == [500, 500]
        # A new key is stored the v4 way and replays too.
        key = os.urandom(16)
        first = await admin.deposit(4, 123, key=key)
        assert await admin.deposit(4, 123, key=key) == first
        stored = await server.fetchval(
            "SELECT answer::text FROM idempotency_keys WHERE key = $1", scoped_key("admin", key)
        )
        assert json.loads(stored) == {"balance_cents": 123, "transfer_id": first.transfer_id}
    finally:
        await server.stop()
    report = await audit(dsn)
    assert report.ok, report.text()


async def test_upgrade_stops_on_an_idempotency_row_it_cannot_read(pg):
    """A stored answer of no known layout stops migration 0004 whole: the
    database stays at v3 with the row as it was, rather than replaying
    something other than what was first answered."""
    dsn = await v3_database(pg, f"v3_bad_{os.getpid()}")
    key = os.urandom(16)
    conn = await asyncpg.connect(dsn)
    try:
        await store_v3_answer(conn, key, OP_DEPOSIT, (1, 1), OK, b"\x00" * 15)
    finally:
        await conn.close()
    with pytest.raises(asyncpg.RaiseError, match="no known answer layout"):
        await migrate_mod.migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == 3
        assert await conn.fetchval("SELECT length(response) FROM idempotency_keys WHERE key = $1", key) == 15
    finally:
        await conn.close()
