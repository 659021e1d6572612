"""Groups: members in and out, packets to a group grabbed by the members it
was sent to (membership at send time), and one-person packets."""

import asyncio

import pytest
from helpers import funded_users

from anbao_client import (
    AlreadyClaimed,
    Audience,
    Invalid,
    NotEligible,
    PacketStatus,
    SoldOut,
    UnknownGroup,
    UnknownUser,
    wire,
)


async def test_create_add_remove_and_page_members(anbao):
    app = await anbao.client("app")
    users = await funded_users(app, 1, 10)
    made = await app.group_create(500, users[:4], name="家人")
    assert made.created and made.member_count == 4
    again = await app.group_create(500, users[5:], name="other")  # a retry, or a clash: nothing changes
    assert not again.created and again.member_count == 4
    added = await app.group_add(500, users[3:7])
    assert (added.changed, added.member_count) == (3, 7)
    removed = await app.group_remove(500, [users[0], users[9]])
    assert (removed.changed, removed.member_count) == (1, 6)
    info = await app.group_info(500, limit=4)
    assert info.name == "家人" and info.member_count == 6
    assert info.members == users[1:5] and info.next_cursor == users[4]
    rest = await app.group_info(500, cursor=info.next_cursor, limit=4)
    assert rest.members == users[5:7] and rest.next_cursor == 0
    empty = await app.group_create(501)
    assert empty.created and empty.member_count == 0


async def test_group_refusals_change_nothing(anbao):
    app = await anbao.client("app")
    users = await funded_users(app, 1, 5)
    await app.group_create(7, users[:2])
    with pytest.raises(UnknownGroup):
        await app.group_add(8, users)
    with pytest.raises(UnknownGroup):
        await app.group_remove(8, users)
    with pytest.raises(UnknownGroup):
        await app.group_info(8)
    with pytest.raises(UnknownUser):
        await app.group_add(7, [users[3], 999])
    with pytest.raises(UnknownUser):
        await app.group_create(9, [users[0], 999])
    with pytest.raises(Invalid):
        await app.group_add(7, [users[3], users[3]])
    with pytest.raises(Invalid):
        await app.group_add(7, [])
    with pytest.raises(Invalid):
        await app.group_info(7, limit=0)
    assert (await app.group_info(7)).members == users[:2]
    assert await anbao.fetchval("SELECT count(*) FROM groups") == 1


async def test_group_size_limit(fresh_dsn, tokens_file):
    from helpers import Anbao

    from anbao.config import Limits

    server = await Anbao(fresh_dsn, tokens_file, Limits.of(max_members=4, max_group_members=6)).start()
    try:
        app = await server.client("app")
        users = await funded_users(app, 1, 10)
        await app.group_create(1, users[:4])
        await app.group_add(1, users[4:6])
        with pytest.raises(Invalid):
            await app.group_add(1, users[6:7])  # the seventh member: all or nothing
        with pytest.raises(Invalid):
            await app.group_create(2, users[:5])  # above one request's list
        assert (await app.group_info(1)).member_count == 6
    finally:
        await server.stop()


async def test_group_packet_for_members_at_send_time(anbao):
    """The packet belongs to the members of the group when it was sent:
    someone who joins later may not grab it, someone who left since may."""
    admin = await anbao.client("admin")
    sender, a, b, c, late, stranger = await funded_users(admin, 1, 6)
    await admin.deposit(sender, 10_000)
    await admin.group_create(42, [sender, a, b, c], name="team")
    sent = await admin.send(sender, 900, 3, group=42, greeting="大吉")
    await admin.group_add(42, [late])
    await admin.group_remove(42, [c])
    with pytest.raises(NotEligible):
        await admin.grab(sent.packet_id, late)
    with pytest.raises(NotEligible):
        await admin.grab(sent.packet_id, stranger)
    with pytest.raises(NotEligible):
        await admin.grab(sent.packet_id, sender)  # a member, but the sender
    got = [await admin.grab(sent.packet_id, u) for u in (c, a, b)]
    assert sum(g.amount_cents for g in got) == 900
    info = await admin.packet(sent.packet_id)
    assert info.audience == Audience.GROUP and info.status == PacketStatus.SOLD_OUT
    assert await anbao.fetchval("SELECT group_id FROM packets WHERE packet_id = $1", sent.packet_id) == 42
    # A new worker rebuilds the snapshot from the database, not from the group.
    await anbao.stop()
    await anbao.start()
    admin = await anbao.client("admin")
    second = await admin.send(sender, 300, 1, group=42)
    with pytest.raises(NotEligible):
        await admin.grab(second.packet_id, c)
    await admin.grab(second.packet_id, late)
    await anbao.assert_audit_clean()


async def test_group_send_refusals(anbao):
    admin = await anbao.client("admin")
    sender, a, b = await funded_users(admin, 1, 3, 10_000)
    await admin.group_create(5, [sender, a, b])
    with pytest.raises(UnknownGroup):
        await admin.send(sender, 100, 1, group=6)
    with pytest.raises(Invalid):  # three shares, two members besides the sender
        await admin.send(sender, 100, 3, group=5)
    raw = await admin._call(
        lambda rid: wire.send(rid, b"k" * 16, sender, 100, 1, 1, 0, wire.Audience.GROUP, [5, 6], ""),
        ok=(wire.Status.INVALID,),
    )
    assert "one group id" in wire.error_message(raw.body)
    assert await admin.balance(sender) == 10_000
    assert await anbao.fetchval("SELECT count(*) FROM packets") == 0
    await anbao.assert_audit_clean()


async def test_direct_packet_is_for_that_person_only_and_whole(anbao):
    admin = await anbao.client("admin")
    a, b, c = await funded_users(admin, 1, 3, 1_000)
    sent = await admin.send(a, 777, 1, to_user=b)
    for other in (a, c):
        with pytest.raises(NotEligible):
            await admin.grab(sent.packet_id, other)
    g = await admin.grab(sent.packet_id, b)
    assert (g.amount_cents, g.seq, g.remaining_count) == (777, 1, 0)
    with pytest.raises(AlreadyClaimed):
        await admin.grab(sent.packet_id, b)
    assert await admin.balance(b) == 1_777
    await anbao.assert_audit_clean()


async def test_group_storm_members_only(anbao):
    """A group of 600, 100 shares, everyone (and 200 outsiders) grabbing at
    once over several connections: shares go to members only, exactly 100."""
    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 1_000_000)
    members = await funded_users(admin, 1000, 600)
    outsiders = await funded_users(admin, 5000, 200)
    await admin.group_create(77, members[:500])
    await admin.group_add(77, members[500:])
    sent = await admin.send(sender, 100_000, 100, group=77)
    clients = [await anbao.client("app") for _ in range(10)]
    won, refused = {}, {"sold_out": 0, "not_eligible": 0}

    async def grab(i, u):
        try:
            won[u] = await clients[i % 10].grab(sent.packet_id, u)
        except SoldOut:
            refused["sold_out"] += 1
        except NotEligible:
            refused["not_eligible"] += 1

    everyone = members + outsiders
    await asyncio.gather(*(grab(i, u) for i, u in enumerate(everyone)))
    assert len(won) == 100 and set(won) <= set(members)
    assert refused == {"sold_out": 500, "not_eligible": 200}
    assert sum(g.amount_cents for g in won.values()) == 100_000
    await anbao.assert_audit_clean()
