"""Every operation's happy path and every error code it can give."""

import asyncio
import os

import pytest
from helpers import funded_users

from anbao_client import (
    AlreadyClaimed,
    Audience,
    Client,
    Forbidden,
    IdempotencyConflict,
    InsufficientFunds,
    Invalid,
    Mode,
    NotEligible,
    NotFound,
    PacketStatus,
    Scope,
    SoldOut,
    Unauthenticated,
    UnknownUser,
    UnsupportedVersion,
    wire,
)
from anbao_client.errors import Expired


async def test_hello_announces_scope_and_limits(anbao):
    app = await anbao.client("app")
    admin = await anbao.client("admin")
    assert app.hello.scope == Scope.APP and admin.hello.scope == Scope.ADMIN
    assert app.hello.version == 1 and app.hello.max_frame_bytes == anbao.limits.wire.max_frame_bytes
    assert app.hello.max_inflight == anbao.limits.connection.max_inflight_per_connection
    assert await app.ping() == 0


async def test_wrong_token_is_refused_and_closed(anbao):
    with pytest.raises(Unauthenticated):
        await Client.connect("127.0.0.1", anbao.port, "not-a-token")


async def test_unsupported_version(anbao):
    c = Client(1000, 8)
    loop = asyncio.get_running_loop()
    from anbao_client.client import _Protocol

    c._transport, _ = await loop.create_connection(lambda: _Protocol(c), "127.0.0.1", anbao.port)
    with pytest.raises(UnsupportedVersion):
        await c._call(lambda rid: wire.hello(rid, b"x", version=2))
    await c.close()


async def test_nothing_before_hello(anbao):
    reader, writer = await asyncio.open_connection("127.0.0.1", anbao.port)
    writer.write(wire.balance(5, 1) + wire.grab(6, 1, 1))
    frames = wire.FrameBuffer()
    got = []
    while len(got) < 2:
        got += frames.feed(await asyncio.wait_for(reader.read(4096), 5))
    assert sorted((r.request_id, r.status) for r in got) == [
        (5, wire.Status.UNAUTHENTICATED),
        (6, wire.Status.UNAUTHENTICATED),
    ]
    writer.close()


async def test_app_scope_cannot_deposit(anbao):
    app = await anbao.client("app")
    await app.register([1])
    with pytest.raises(Forbidden):
        await app.deposit(1, 100)
    admin = await anbao.client("admin")
    assert await admin.balance(1) == 0


async def test_register_deposit_balance(anbao):
    admin = await anbao.client("admin")
    assert await admin.register([10, 11, 12]) == 3
    assert await admin.register([10, 13]) == 1
    d1 = await admin.deposit(10, 5_000)
    d2 = await admin.deposit(10, 2_500)
    assert (d1.balance_cents, d2.balance_cents) == (5_000, 7_500) and d2.transfer_id > d1.transfer_id
    assert await admin.balance(10) == 7_500 and await admin.balance(11) == 0
    with pytest.raises(UnknownUser):
        await admin.balance(99)
    with pytest.raises(UnknownUser):
        await admin.deposit(99, 100)
    await anbao.assert_audit_clean()


async def test_deposit_idempotency(anbao):
    admin = await anbao.client("admin")
    await admin.register([1])
    key = os.urandom(16)
    first = await admin.deposit(1, 700, key=key)
    again = await admin.deposit(1, 700, key=key)
    assert again == first and await admin.balance(1) == 700
    with pytest.raises(IdempotencyConflict):
        await admin.deposit(1, 701, key=key)
    assert await admin.balance(1) == 700
    await anbao.assert_audit_clean()


async def test_deposit_limits(anbao):
    admin = await anbao.client("admin")
    await admin.register([1])
    with pytest.raises(Invalid):
        await admin.deposit(1, anbao.limits.rules.max_deposit_cents + 1)
    for bad in (0, -5):
        with pytest.raises(Invalid):
            await admin.deposit(1, bad)
    assert await admin.balance(1) == 0


async def test_send_and_grab_random(anbao):
    admin = await anbao.client("admin")
    sender, *grabbers = await funded_users(admin, 1, 6)
    await admin.deposit(sender, 10_000)
    sent = await admin.send(sender, 1_000, 4, greeting="恭喜发财")
    assert sent.sender_balance_cents == 9_000
    got = [await admin.grab(sent.packet_id, u) for u in grabbers[:4]]
    assert [g.seq for g in got] == [1, 2, 3, 4] and [g.remaining_count for g in got] == [3, 2, 1, 0]
    assert sum(g.amount_cents for g in got) == 1_000
    with pytest.raises(SoldOut):
        await admin.grab(sent.packet_id, grabbers[4])
    with pytest.raises(AlreadyClaimed) as again:
        await admin.grab(sent.packet_id, grabbers[1])
    assert (again.value.grabbed.amount_cents, again.value.grabbed.seq) == (got[1].amount_cents, 2)
    for g, u in zip(got, grabbers[:4], strict=True):
        assert await admin.balance(u) == g.amount_cents
    info = await admin.packet(sent.packet_id)
    assert info.status == PacketStatus.SOLD_OUT and info.greeting == "恭喜发财"
    assert info.claimed_count == 4 and info.claimed_cents == 1_000 and info.remaining_cents == 0
    assert [c.user_id for c in info.claims] == grabbers[:4]
    best = max(got, key=lambda g: (g.amount_cents, -g.seq))
    assert info.luckiest.seq == best.seq and info.luckiest.amount_cents == best.amount_cents
    await anbao.assert_audit_clean()


async def test_fixed_mode_and_paging(anbao):
    admin = await anbao.client("admin")
    sender, *grabbers = await funded_users(admin, 1, 11, 10_000)
    sent = await admin.send(sender, 1_003, 10, mode=Mode.FIXED)
    got = [await admin.grab(sent.packet_id, u) for u in grabbers]
    assert [g.amount_cents for g in got] == [101] * 3 + [100] * 7
    page = await admin.packet(sent.packet_id, claims_offset=8, claims_limit=5)
    assert [c.seq for c in page.claims] == [9, 10]
    open_info = await admin.packet(sent.packet_id, claims_limit=1)
    assert open_info.luckiest_seq == 1  # ties go to the earliest share
    await anbao.assert_audit_clean()


async def test_direct_and_member_packets(anbao):
    admin = await anbao.client("admin")
    a, b, c, d = await funded_users(admin, 1, 4, 1_000)
    direct = await admin.send(a, 500, 1, to_user=b)
    with pytest.raises(NotEligible):
        await admin.grab(direct.packet_id, c)
    g = await admin.grab(direct.packet_id, b)
    assert g.amount_cents == 500
    group = await admin.send(a, 300, 2, members=[b, c])
    with pytest.raises(NotEligible):
        await admin.grab(group.packet_id, d)
    with pytest.raises(NotEligible):
        await admin.grab(group.packet_id, a)
    await admin.grab(group.packet_id, c)
    info = await admin.packet(group.packet_id)
    assert info.audience == Audience.MEMBERS and info.claimed_count == 1
    await anbao.assert_audit_clean()


async def test_send_refusals_change_nothing(anbao):
    admin = await anbao.client("admin")
    a, b, c = await funded_users(admin, 1, 3, 1_000)
    lim = anbao.limits
    cases = [
        (InsufficientFunds, dict(sender_id=a, total_cents=1_001, count=1)),
        (UnknownUser, dict(sender_id=77, total_cents=10, count=1)),
        (UnknownUser, dict(sender_id=a, total_cents=10, count=1, members=[b, 78])),
        (Invalid, dict(sender_id=a, total_cents=10, count=0)),
        (Invalid, dict(sender_id=a, total_cents=10, count=lim.rules.max_share_count + 1)),
        (Invalid, dict(sender_id=a, total_cents=9, count=10)),
        (Invalid, dict(sender_id=a, total_cents=lim.rules.max_total_cents + 1, count=1)),
        (Invalid, dict(sender_id=a, total_cents=10, count=1, mode=3)),
        (Invalid, dict(sender_id=a, total_cents=10, count=2, to_user=b)),
        (Invalid, dict(sender_id=a, total_cents=10, count=3, members=[b, c])),
        (Invalid, dict(sender_id=a, total_cents=10, count=1, members=[b, b])),
        (Invalid, dict(sender_id=a, total_cents=10, count=1, to_user=a)),
        (Invalid, dict(sender_id=a, total_cents=10, count=1, expiry_seconds=lim.rules.max_expiry_s + 1)),
        (Invalid, dict(sender_id=a, total_cents=-10, count=1)),
    ]
    for exc, kwargs in cases:
        with pytest.raises(exc):
            await admin.send(**kwargs)
    assert await admin.balance(a) == 1_000
    assert await anbao.fetchval("SELECT count(*) FROM packets") == 0
    await anbao.assert_audit_clean()


async def test_send_idempotency(anbao):
    admin = await anbao.client("admin")
    a, b = await funded_users(admin, 1, 2, 1_000)
    key = os.urandom(16)
    first = await admin.send(a, 400, 2, key=key)
    again = await admin.send(a, 400, 2, key=key)
    assert again == first and await admin.balance(a) == 600
    with pytest.raises(IdempotencyConflict):
        await admin.send(a, 400, 3, key=key)
    # A refusal is an answer too: replaying its key gives the same refusal.
    key2 = os.urandom(16)
    with pytest.raises(InsufficientFunds):
        await admin.send(a, 5_000, 1, key=key2)
    await admin.deposit(a, 10_000)
    with pytest.raises(InsufficientFunds):
        await admin.send(a, 5_000, 1, key=key2)
    await anbao.assert_audit_clean()


async def test_concurrent_duplicate_sends_move_money_once(anbao):
    admin = await anbao.client("admin")
    (a,) = await funded_users(admin, 1, 1, 10_000)
    key = os.urandom(16)
    clients = [await anbao.client("app") for _ in range(5)]
    answers = await asyncio.gather(*(c.send(a, 1_000, 5, key=key) for c in clients for _ in range(4)))
    assert len({s.packet_id for s in answers}) == 1
    assert await admin.balance(a) == 9_000
    assert await anbao.fetchval("SELECT count(*) FROM packets") == 1
    await anbao.assert_audit_clean()


async def test_grab_errors(anbao):
    admin = await anbao.client("admin")
    a, b = await funded_users(admin, 1, 2, 1_000)
    with pytest.raises(NotFound):
        await admin.grab(12345, b)
    sent = await admin.send(a, 100, 2)
    with pytest.raises(UnknownUser):
        await admin.grab(sent.packet_id, 999)
    with pytest.raises(NotFound):
        await admin.packet(12345)
    with pytest.raises(Invalid):
        await admin.packet(sent.packet_id, claims_limit=0)
    with pytest.raises(NotEligible):
        await admin.grab(sent.packet_id, a)  # the sender
    assert await anbao.fetchval("SELECT count(*) FROM claims_all") == 0


async def test_expired_packet_refuses_grabs(anbao):
    admin = await anbao.client("admin")
    a, b = await funded_users(admin, 1, 2, 1_000)
    sent = await admin.send(a, 100, 2, expiry_seconds=1)
    await asyncio.sleep(1.1)
    with pytest.raises(Expired):
        await admin.grab(sent.packet_id, b)
    assert await anbao.fetchval("SELECT count(*) FROM claims_all") == 0
    await anbao.assert_audit_clean()
