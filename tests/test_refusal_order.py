"""The precedence of refusals (PROTOCOL.md "Which refusal comes first"):
a request that breaks several rules is answered for the first of them in
the documented list. Each test starts from a request that breaks many
rules, mends them one at a time, and checks that each answer names the
next rule in the list. Raw frames: the SDK checks some arguments itself."""

from __future__ import annotations

import asyncio
import os

import pytest
from helpers import Anbao, Raw, funded_users

from anbao.config import Limits
from anbao_client import wire
from anbao_client.protocol import Audience, Mode, Status

MAX_SHARE = 20_000


@pytest.fixture
def limits() -> Limits:
    return Limits()


@pytest.fixture
async def server(fresh_dsn, tokens_file, limits):
    s = await Anbao(fresh_dsn, tokens_file, limits).start()
    yield s
    await s.stop()


class Asker:
    """One raw admin connection: a request, its status and message."""

    def __init__(self, raw: Raw):
        self.raw, self.rid = raw, 100

    async def ask(self, frame_of) -> tuple[Status, str]:
        self.rid += 1
        self.raw.send(frame_of(self.rid))
        [r] = await self.raw.answers(1)
        assert r.request_id == self.rid
        return Status(r.status), "" if r.status in (Status.OK, Status.ALREADY_CLAIMED) else wire.error_message(r.body)


@pytest.mark.parametrize(
    "limits", [Limits.of(max_share_cents=MAX_SHARE, daily_send_max_packets=1, daily_send_max_cents=250)]
)
async def test_send_refusals_come_in_the_documented_order(server):
    admin = await server.client("admin")
    lim = server.limits
    s, s2, g = await funded_users(admin, 1, 3)
    x, y, z, nobody = 7, 8, 9, 999  # x, y, z registered late; nobody never
    await admin.deposit(s, 1_000)
    await admin.deposit(s2, 1_000)
    used = os.urandom(16)
    await admin.send(s, 200, 1, key=used)  # s's one packet today (daily_send_max_packets=1), 200 of its 250 cents
    asker = Asker(await Raw.open(server.port))

    async def send(key, sender, total, count, mode, expiry_s, audience, members):
        return await asker.ask(
            lambda rid: wire.send(rid, key, sender, total, count, mode, expiry_s, audience, members, "")
        )

    def fresh():
        return os.urandom(16)

    members = Audience.MEMBERS
    steps = [
        # (request, status, words of its message): each mends the rule the one before broke
        ((used, s, lim.rules.max_total_cents + 1, 0, 9, 10**7, members, []), Status.INVALID, "mode"),
        ((used, s, lim.rules.max_total_cents + 1, 0, 1, 10**7, members, []), Status.INVALID, "count must be"),
        ((used, s, lim.rules.max_total_cents + 1, 3, 1, 10**7, members, []), Status.INVALID, "above the limit"),
        ((used, s, 2, 3, 1, 10**7, members, []), Status.INVALID, "below 3 shares"),
        ((used, s, 3 * MAX_SHARE + 1, 3, 1, 10**7, members, []), Status.SHARE_ABOVE_MAX, "at most"),
        ((used, s, 300, 3, 1, 10**7, members, []), Status.INVALID, "expiry"),
        ((used, s, 300, 3, 1, 0, members, []), Status.INVALID, "member list must hold"),
        ((used, s, 300, 3, 1, 0, members, [s, x, y]), Status.INVALID, "own packet"),
        ((used, nobody, 300, 3, 1, 0, members, [x, y, z]), Status.IDEMPOTENCY_CONFLICT, "different parameters"),
        ((fresh(), nobody, 300, 3, 1, 0, members, [x, y, z]), Status.UNKNOWN_USER, "unknown sender"),
        ((fresh(), g, 300, 3, 1, 0, members, [x, y, z]), Status.INSUFFICIENT_FUNDS, "below 300 cents"),
        ((fresh(), s, 300, 3, 1, 0, members, [x, y, z]), Status.UNKNOWN_USER, "not registered"),
    ]
    for request, status, words in steps:
        got = await send(*request)
        assert got[0] == status and words in got[1], (request, got)
    await admin.register([x, y, z])
    # Past both daily caps (a second packet, 500 cents): the count is named.
    got = await send(fresh(), s, 300, 3, 1, 0, members, [x, y, z])
    assert got[0] == Status.DAILY_SEND_COUNT_CAP, got
    # A sender with no packet today, past the amount cap only.
    got = await send(fresh(), s2, 300, 3, 1, 0, members, [x, y, z])
    assert got[0] == Status.DAILY_SEND_AMOUNT_CAP, got
    assert (await send(fresh(), s2, 240, 3, 1, 0, members, [x, y, z]))[0] == Status.OK

    # A group packet: funds before the group, the group before its size.
    group_steps = [
        ((fresh(), g, 300, 2, 1, 0, Audience.GROUP, [500]), Status.INSUFFICIENT_FUNDS, "below"),
    ]
    for request, status, words in group_steps:
        got = await send(*request)
        assert got[0] == status and words in got[1], (request, got)
    await admin.deposit(g, 1_000)
    assert (await send(fresh(), g, 300, 2, 1, 0, Audience.GROUP, [500]))[0] == Status.UNKNOWN_GROUP
    await admin.group_create(500, [g, x])  # one member besides the sender
    got = await send(fresh(), g, 300, 2, 1, 0, Audience.GROUP, [500])
    assert got[0] == Status.INVALID and "never sell out" in got[1], got
    asker.raw.close()
    await server.assert_audit_clean()


@pytest.mark.parametrize("limits", [Limits.of(cooldown_refusals=2, cooldown_window_ms=60_000, cooldown_ms=60_000)])
async def test_grab_refusals_come_in_the_documented_order(server):
    admin = await server.client("admin")
    sender, a, b, c, outsider = await funded_users(admin, 1, 5)
    await admin.deposit(sender, 10_000)
    asker = Asker(await Raw.open(server.port))

    async def grab(packet_id, user_id):
        return (await asker.ask(lambda rid: wire.grab(rid, packet_id, user_id)))[0]

    open_packet = await admin.send(sender, 100, 2)
    unknown_packet = open_packet.packet_id + (1 << 10)  # the next sequence number: never sent
    assert await grab(0, 999) == Status.INVALID  # malformed before anything is looked up
    assert await grab(unknown_packet, 999) == Status.NOT_FOUND  # the packet before the user
    assert await grab(open_packet.packet_id, 999) == Status.UNKNOWN_USER
    # A sold-out packet that has also expired: its grabber's share, the
    # sender's and an outsider's NOT_ELIGIBLE, then SOLD_OUT, before EXPIRED.
    members = await admin.send(sender, 100, 1, members=[a, b], expiry_seconds=1)
    assert await grab(members.packet_id, a) == Status.OK
    await asyncio.sleep(1.2)
    assert await grab(members.packet_id, a) == Status.ALREADY_CLAIMED
    assert await grab(members.packet_id, sender) == Status.NOT_ELIGIBLE
    assert await grab(members.packet_id, outsider) == Status.NOT_ELIGIBLE
    assert await grab(members.packet_id, b) == Status.SOLD_OUT
    expired = await admin.send(sender, 100, 2, expiry_seconds=1)
    await asyncio.sleep(1.2)
    assert await grab(expired.packet_id, c) == Status.EXPIRED
    # Cool-down (2 refusals here) comes before every decision but a share held.
    held = await admin.send(sender, 100, 2)
    assert await grab(held.packet_id, c) == Status.OK
    assert await grab(members.packet_id, c) == Status.NOT_ELIGIBLE
    assert await grab(members.packet_id, c) == Status.NOT_ELIGIBLE  # c cools down now
    assert await grab(members.packet_id, c) == Status.COOLING_DOWN  # not NOT_ELIGIBLE
    assert await grab(open_packet.packet_id, c) == Status.COOLING_DOWN  # not OK
    assert await grab(held.packet_id, c) == Status.ALREADY_CLAIMED  # a share held is answered, cool-down or not
    asker.raw.close()
    await server.assert_audit_clean()


async def test_rules_the_spec_states(server):
    """The rules PROTOCOL.md now states that a client written from it had to
    guess: count 0, the sender in their own member list, repeats in
    GROUP_CREATE, a DEPOSIT or WITHDRAW of 0, and what claims_offset counts."""
    admin = await server.client("admin")
    s, a, b, c = await funded_users(admin, 1, 4)
    await admin.deposit(s, 1_000)
    asker = Asker(await Raw.open(server.port))
    key = os.urandom(16)

    async def send(*fields):
        return await asker.ask(lambda rid: wire.send(rid, os.urandom(16), *fields, ""))

    assert (await send(s, 100, 0, 1, 0, Audience.OPEN, []))[0] == Status.INVALID
    assert (await send(s, 0, 1, 1, 0, Audience.OPEN, []))[0] == Status.INVALID
    assert "own packet" in (await send(s, 100, 1, 1, 0, Audience.DIRECT, [s]))[1]
    assert "own packet" in (await send(s, 100, 1, 1, 0, Audience.MEMBERS, [a, s]))[1]
    got = await asker.ask(lambda rid: wire.group_create(rid, 70, "g", [a, a]))
    assert got[0] == Status.INVALID and "repeats" in got[1]
    for op in (wire.deposit, wire.withdraw):
        got = await asker.ask(lambda rid, op=op: op(rid, key, a, 0))
        assert got[0] == Status.INVALID and "positive" in got[1], got
    # A group packet's audience is the group but its sender: no refusal for them.
    await admin.group_create(71, [s, a, b])
    assert (await send(s, 100, 2, 1, 0, Audience.GROUP, [71]))[0] == Status.OK
    # claims_offset counts claims, in seq order: offset k starts at seq k + 1.
    sent = await admin.send(s, 300, 3, mode=Mode.FIXED)
    for u in (a, b, c):
        await admin.grab(sent.packet_id, u)
    assert [cl.seq for cl in (await admin.packet(sent.packet_id, claims_offset=1)).claims] == [2, 3]
    assert (await admin.packet(sent.packet_id, claims_offset=3)).claims == []
    assert [cl.seq for cl in (await admin.packet(sent.packet_id, claims_offset=2, claims_limit=5)).claims] == [3]
    asker.raw.close()
    assert await admin.balance(a) == 100  # nothing refused moved money
