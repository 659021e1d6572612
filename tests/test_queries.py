"""History: a user's sent and received packets and statement, newest first
with cursor pagination; a packet's claims, paged, and its luckiest claim."""

import pytest
from helpers import funded_users

from anbao_client import Audience, Invalid, Mode, PacketStatus, TransferKind, UnknownUser, wire


async def walk(fetch, limit):
    """Every page of a cursor-paged query; asserts the pages are full but the last."""
    items, cursor, pages = [], 0, 0
    while True:
        page = await fetch(cursor=cursor, limit=limit)
        got = page.entries if hasattr(page, "entries") else page.items
        pages += 1
        items += got
        if not page.next_cursor:
            return items, pages
        assert len(got) == limit
        cursor = page.next_cursor


async def test_sent_packets_newest_first_paged(anbao):
    admin = await anbao.client("admin")
    sender, a, b = await funded_users(admin, 1, 3, 100_000)
    sent = [await admin.send(sender, 100 * (i + 1), 2, members=[a, b]) for i in range(7)]
    await admin.grab(sent[0].packet_id, a)
    await admin.grab(sent[0].packet_id, b)
    await admin.grab(sent[3].packet_id, b)
    items, pages = await walk(lambda **kw: admin.sent(sender, **kw), 3)
    assert pages == 3
    assert [p.packet_id for p in items] == [s.packet_id for s in reversed(sent)]
    by_id = {p.packet_id: p for p in items}
    first, fourth = by_id[sent[0].packet_id], by_id[sent[3].packet_id]
    assert (first.status, first.claimed_count, first.claimed_cents, first.total_cents) == (
        PacketStatus.SOLD_OUT,
        2,
        100,
        100,
    )
    assert (fourth.status, fourth.claimed_count, fourth.count, fourth.audience) == (
        PacketStatus.OPEN,
        1,
        2,
        Audience.MEMBERS,
    )
    assert fourth.expires_at_ms == sent[3].expires_at_ms and fourth.created_at_ms < fourth.expires_at_ms
    assert (await admin.sent(a)).items == [] and (await admin.sent(a)).next_cursor == 0
    await anbao.assert_audit_clean()


async def test_received_shares_newest_grab_first(anbao):
    admin = await anbao.client("admin")
    s1, s2, me = await funded_users(admin, 1, 3)
    await admin.deposit(s1, 10_000)
    await admin.deposit(s2, 10_000)
    packets = [await admin.send(s, 500, 1, to_user=me) for s in (s1, s2, s1, s2, s1)]
    order = [3, 0, 4, 1, 2]  # grab out of sending order
    grabbed = [await admin.grab(packets[i].packet_id, me) for i in order]
    items, pages = await walk(lambda **kw: admin.received(me, **kw), 2)
    assert pages == 3
    assert [r.packet_id for r in items] == [packets[i].packet_id for i in reversed(order)]
    assert [r.sender_id for r in items] == [(s1, s2, s1, s2, s1)[i] for i in reversed(order)]
    assert all(r.seq == 1 and r.amount_cents == 500 and r.claimed_at_ms > 0 for r in items)
    assert sum(g.amount_cents for g in grabbed) == await admin.balance(me)
    await anbao.assert_audit_clean()


async def test_statement_signed_newest_first_and_adds_up(anbao):
    admin = await anbao.client("admin")
    me, other, friend = await funded_users(admin, 1, 3)
    await admin.deposit(other, 100_000)
    for i in range(12):
        await admin.deposit(me, 1_000 + i)
    out = await admin.send(me, 3_000, 2, members=[other, friend])
    incoming = await admin.send(other, 700, 1, to_user=me)
    g = await admin.grab(incoming.packet_id, me)
    await admin.withdraw(me, 500)
    entries, pages = await walk(lambda **kw: admin.statement(me, **kw), 5)
    assert pages == 3 and len(entries) == 15
    ids = [e.transfer_id for e in entries]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 15
    # Newest first in the order they were posted: the grab is posted by its
    # roll-up, which a WITHDRAW that has the money does not wait for, so it
    # may come before or after the withdrawal.
    assert sorted((e.kind, e.amount_cents, e.packet_id) for e in entries[:2]) == [
        (TransferKind.WITHDRAW, -500, 0),
        (TransferKind.GRAB, g.amount_cents, incoming.packet_id),
    ]
    assert (entries[2].kind, entries[2].amount_cents, entries[2].packet_id) == (
        TransferKind.SEND,
        -3_000,
        out.packet_id,
    )
    assert [e.kind for e in entries[3:]] == [TransferKind.DEPOSIT] * 12
    head = await admin.statement(me, limit=1)
    assert head.balance_cents == sum(e.amount_cents for e in entries) == await admin.balance(me)
    assert len(head.entries) == 1 and head.next_cursor == head.entries[0].transfer_id
    await anbao.assert_audit_clean()


async def test_claims_paged_and_luckiest(anbao):
    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 1_000_000)
    users = await funded_users(admin, 100, 250)
    sent = await admin.send(sender, 250_000, 250)
    grabs = {u: await admin.grab(sent.packet_id, u) for u in users}
    claims = []
    for offset in range(0, 300, 100):
        claims += (await admin.packet(sent.packet_id, claims_offset=offset, claims_limit=100)).claims
    assert [c.seq for c in claims] == list(range(1, 251))
    assert {c.user_id: (c.seq, c.amount_cents) for c in claims} == {
        u: (g.seq, g.amount_cents) for u, g in grabs.items()
    }
    info = await admin.packet(sent.packet_id, claims_limit=1)
    best = max(claims, key=lambda c: (c.amount_cents, -c.seq))
    assert info.luckiest_seq == best.seq
    # The luckiest claim is named only once the list is final.
    open_one = await admin.send(sender, 1_000, 3, mode=Mode.FIXED)
    await admin.grab(open_one.packet_id, users[0])
    assert (await admin.packet(open_one.packet_id)).luckiest_seq == 0
    await anbao.assert_audit_clean()


async def test_query_refusals(anbao):
    admin = await anbao.client("admin")
    (a,) = await funded_users(admin, 1, 1)
    for q in (admin.statement, admin.sent, admin.received):
        with pytest.raises(UnknownUser):
            await q(99)
        with pytest.raises(Invalid):
            await q(a, limit=0)
        with pytest.raises(Invalid):
            await q(a, limit=anbao.limits.wire.max_page_rows + 1)
    st = await admin.statement(a)
    assert (st.balance_cents, st.entries, st.next_cursor) == (0, [], 0)


async def test_packet_from_the_owners_memory_is_what_the_database_shows(anbao):
    """The owner answers PACKET from its state of a packet it adopted from
    the SEND: byte for byte what the database shows (committed claims
    only), open, part grabbed and sold out, on every page."""
    from anbao.server import answers
    from anbao.server.ops import packets

    admin = await anbao.client("admin")
    sender, *members = await funded_users(admin, 1, 12)
    await admin.deposit(sender, 10_000)
    await admin.group_create(5, [sender, *members])
    sent = await admin.send(sender, 1_000, 10, group=5, greeting="恭喜发财")
    ctx = anbao.worker.dispatcher.ctx
    for grabbers in ([], members[:3], members[3:10]):
        for u in grabbers:
            await admin.grab(sent.packet_id, u)
        for offset, limit in [(0, 100), (2, 3), (9, 5), (10, 1)]:
            memory = await packets.packet(ctx, 7, sent.packet_id, offset, limit)
            head, greeting, claims, group_id = await ctx.ledger.packet_info(sent.packet_id, offset, limit)
            assert memory == answers.ok(wire.Op.PACKET, 7, ctx.worker_id, *head, greeting, claims, group_id)
    info = await admin.packet(sent.packet_id)
    assert info.claimed_count == 10 and info.luckiest_seq > 0 and info.group_id == 5
    assert (await admin.stats())["packets_from_memory"] >= 13
    await anbao.assert_audit_clean()
