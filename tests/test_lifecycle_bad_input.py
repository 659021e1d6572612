"""Bad input to the lifecycle operations: each gets its typed error and
changes nothing. The whole database is compared before and after (but the
idempotency records, where a refusal is stored as the key's first answer)."""

import os
import struct

import asyncpg
import pytest
from helpers import Raw, funded_users

from anbao_client import (
    Expired,
    Forbidden,
    IdempotencyConflict,
    InsufficientFunds,
    Invalid,
    NotEligible,
    UnknownGroup,
    UnknownUser,
    wire,
)
from anbao_client.wire import Op, Status

TABLES = ["accounts", "transfers", "packets", "packet_members", "claims", "groups", "group_members", "grab_rollups"]


async def snapshot(dsn: str) -> dict:
    conn = await asyncpg.connect(dsn)
    try:
        return {t: sorted(map(tuple, await conn.fetch(f"SELECT * FROM {t}"))) for t in TABLES}
    finally:
        await conn.close()


async def test_lifecycle_refusals_are_typed_and_change_nothing(anbao):
    admin = await anbao.client("admin")
    app = await anbao.client("app")
    sender, member, outsider = await funded_users(admin, 1, 3, 10_000)
    await admin.group_create(10, [sender, member])
    group_packet = await admin.send(sender, 500, 1, group=10)
    k_dep, k_send, k_wd = (os.urandom(16) for _ in range(3))
    await admin.deposit(member, 100, key=k_dep)
    await admin.send(sender, 300, 1, to_user=member, key=k_send)
    await admin.withdraw(sender, 100, key=k_wd)
    lim = anbao.limits
    before = await snapshot(anbao.dsn)

    cases = [
        (UnknownGroup, admin.send(sender, 100, 1, group=11)),
        (UnknownGroup, admin.group_add(11, [member])),
        (UnknownGroup, admin.group_remove(11, [member])),
        (UnknownGroup, admin.group_info(11)),
        (UnknownUser, admin.group_add(10, [999])),
        (UnknownUser, admin.group_create(12, [member, 999])),
        (UnknownUser, admin.withdraw(999, 1)),
        (UnknownUser, admin.statement(999)),
        (UnknownUser, admin.sent(999)),
        (UnknownUser, admin.received(999)),
        (UnknownUser, admin.send(999, 100, 1, group=10)),
        (NotEligible, admin.grab(group_packet.packet_id, outsider)),
        (NotEligible, admin.grab(group_packet.packet_id, sender)),
        (Invalid, admin.send(sender, 100, 1, group=10, expiry_seconds=lim.rules.max_expiry_s + 1)),
        (Invalid, admin.send(sender, 100, 2, group=10)),  # more shares than members
        (Invalid, admin.group_add(10, [])),
        (Invalid, admin.statement(sender, limit=0)),
        (InsufficientFunds, admin.withdraw(member, 1_000_000)),
        (Forbidden, app.withdraw(member, 1)),
        (Forbidden, app.audit()),
        (IdempotencyConflict, admin.deposit(member, 101, key=k_dep)),
        (IdempotencyConflict, admin.send(sender, 300, 1, to_user=outsider, key=k_send)),
        (IdempotencyConflict, admin.withdraw(sender, 99, key=k_wd)),
        (IdempotencyConflict, admin.withdraw(member, 100, key=k_dep)),
    ]
    for exc, call in cases:
        with pytest.raises(exc):
            await call
    assert await snapshot(anbao.dsn) == before
    await anbao.assert_audit_clean()


async def test_malformed_lifecycle_frames(anbao):
    admin = await anbao.client("admin")
    (a,) = await funded_users(admin, 1, 1, 1_000)
    await admin.group_create(3, [a])
    before = await snapshot(anbao.dsn)
    raw = await Raw.open(anbao.port)
    key = os.urandom(16)
    raw.send(wire.frame(Op.WITHDRAW, 10, key + struct.pack(">Qq", a, -5)))  # negative
    raw.send(wire.frame(Op.WITHDRAW, 11, key + struct.pack(">Q", a)))  # short
    raw.send(wire.frame(Op.STATEMENT, 12, struct.pack(">QQH", a, 2**63, 10)))  # cursor range
    raw.send(wire.frame(Op.SENT_LIST, 13, struct.pack(">QQH", 0, 0, 10)))  # user 0
    raw.send(wire.frame(Op.GROUP_ADD, 14, struct.pack(">QH", 3, 5000) + struct.pack(">Q", a)))  # list lies
    raw.send(wire.frame(Op.GROUP_CREATE, 15, struct.pack(">QH", 4, 200) + b"n" * 200 + struct.pack(">H", 0)))
    raw.send(wire.frame(Op.GROUP_INFO, 16, struct.pack(">QQH", 3, 0, 10) + b"\x00"))  # trailing
    raw.send(wire.frame(Op.AUDIT, 17, b"\x01"))  # trailing
    raw.send(wire.frame(Op.RECEIVED_LIST, 18, struct.pack(">QQH", a, 0, 5000)))  # page too big
    raw.send(wire.frame(Op.GROUP_REMOVE, 19, struct.pack(">QH", 3, 2) + struct.pack(">QQ", a, a)))  # repeats
    raw.send(wire.frame(Op.STATEMENT, 20, struct.pack(">QQH", a, 0, 10)))  # and a good one
    got = {r.request_id: r.status for r in await raw.answers(11)}
    assert got == {**{rid: Status.INVALID for rid in range(10, 20)}, 20: Status.OK}
    raw.close()
    assert await snapshot(anbao.dsn) == before


async def test_grab_after_expiry_moves_nothing(anbao):
    admin = await anbao.client("admin")
    a, b = await funded_users(admin, 1, 2, 1_000)
    sent = await admin.send(a, 100, 1, to_user=b, expiry_seconds=1)
    conn = await asyncpg.connect(anbao.dsn)
    try:
        # Expire it without waiting: the owner's state still holds the old
        # expiry, so this is the sweeper's close() that refuses the grab.
        await conn.execute(
            "UPDATE packets SET expires_at = now() - interval '1 second' WHERE packet_id = $1", sent.packet_id
        )
    finally:
        await conn.close()
    await anbao.worker.expiry.sweep_once()
    with pytest.raises(Expired):
        await admin.grab(sent.packet_id, b)
    assert await admin.balance(b) == 1_000 and await admin.balance(a) == 1_000
    await anbao.assert_audit_clean()
