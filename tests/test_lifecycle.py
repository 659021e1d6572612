"""Expiry and refund: the unclaimed remainder goes back to the sender
exactly once, through the packet's queue, so no grab lands after the refund
and no accepted grab is left out of it; a restart or a second sweeper finds
what is owed and pays it once. Every test ends with the audit, with no
refund grace once the refunds are known to be done."""

import asyncio
import time

import asyncpg
import pytest
from helpers import Anbao, Collector, funded_users
from polling import eventually

from anbao.config import Limits
from anbao.storage.audit import audit
from anbao_client import AlreadyClaimed, Expired, Invalid, Mode, PacketStatus, TransferKind, wire

FAST_SWEEP = Limits.of(expiry_sweep_interval_ms=50)
NO_SWEEP = Limits.of(expiry_sweep_interval_ms=3_600_000, refund_grace_ms=7_200_000)  # only the sweep at start-up


@pytest.fixture
def limits() -> Limits:
    return FAST_SWEEP


async def audit_strict(dsn: str):
    report = await audit(dsn, refund_grace_ms=0)
    assert report.ok, report.text()
    return report


async def refund_rows(dsn: str, packet_id: int) -> list:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(
            "SELECT amount_cents, credit_account FROM transfers WHERE kind = 5 AND packet_id = $1", packet_id
        )
    finally:
        await conn.close()


async def wait_refunded(anbao_or_dsn, packet_id: int, timeout_s: float = 10.0):
    dsn = anbao_or_dsn if isinstance(anbao_or_dsn, str) else anbao_or_dsn.dsn

    async def done():
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval("SELECT status FROM packets WHERE packet_id = $1", packet_id) == 3
        finally:
            await conn.close()

    await eventually(done, timeout_s, f"the refund of packet {packet_id}")


async def sleep_until_ms(at_ms: int):
    await asyncio.sleep(max(0.0, at_ms / 1000 - time.time()))


async def test_expired_packet_refunds_the_remainder_once(anbao):
    admin = await anbao.client("admin")
    sender, a, b, c = await funded_users(admin, 1, 4)
    await admin.deposit(sender, 10_000)
    sent = await admin.send(sender, 1_000, 5, expiry_seconds=1)
    got = [await admin.grab(sent.packet_id, u) for u in (a, b)]
    claimed = sum(g.amount_cents for g in got)
    await wait_refunded(anbao, sent.packet_id)
    with pytest.raises(Expired):
        await admin.grab(sent.packet_id, c)
    assert await admin.balance(sender) == 9_000 + (1_000 - claimed)
    info = await admin.packet(sent.packet_id)
    assert info.status == PacketStatus.REFUNDED and info.refunded_cents == 1_000 - claimed
    assert info.remaining_cents == 0 and info.luckiest.amount_cents == max(g.amount_cents for g in got)
    st = await admin.statement(sender)
    assert (st.entries[0].kind, st.entries[0].amount_cents, st.entries[0].packet_id) == (
        TransferKind.REFUND,
        1_000 - claimed,
        sent.packet_id,
    )
    [mine] = (await admin.sent(sender)).items
    assert mine.status == PacketStatus.REFUNDED and mine.refunded_cents == 1_000 - claimed
    # Asking again, by the sweeper or by hand, pays nothing more.
    worker = anbao.worker
    assert await worker.expiry.sweep_once() == 0
    assert await worker.engine.expire(sent.packet_id) == (1_000 - claimed, False)
    assert len(await refund_rows(anbao.dsn, sent.packet_id)) == 1
    assert worker.engine.refunds_committed == 1
    report = await audit_strict(anbao.dsn)
    assert report.counts["refunded_packets"] == 1


async def test_grabs_in_the_same_tick_as_the_expiry(anbao):
    """The owner's queue decides: grabs taken before expire() (committed,
    in the batch in flight, or in the open batch) all land and are left out
    of the refund; grabs after it, in the very same loop tick, are EXPIRED."""
    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 100_000)
    users = await funded_users(admin, 100, 12)
    sent = await admin.send(sender, 10_000, 10, members=users)
    engine = anbao.worker.engine
    early = await admin.grab(sent.packet_id, users[0])  # committed long before
    out = Collector()
    for rid, u in enumerate(users[1:4], 1):  # these go into a batch...
        engine.on_grab(out, rid, sent.packet_id, u)
    for _ in range(10):  # ...that the committer takes in flight
        if engine._in_flight:
            break
        await asyncio.sleep(0)
    assert [len(b) for b in engine._in_flight] == [3]
    for rid, u in enumerate(users[4:7], 4):  # these wait in the open batch (or the next slot)
        engine.on_grab(out, rid, sent.packet_id, u)
    refund = engine.expire(sent.packet_id)  # the packet expires here, same tick
    for rid, u in enumerate(users[7:10], 7):  # and these arrive just after
        engine.on_grab(out, rid, sent.packet_id, u)
    assert {rid: out.frames[rid].status for rid in (7, 8, 9)} == {r: wire.Status.EXPIRED for r in (7, 8, 9)}
    assert not any(rid in out.frames for rid in range(1, 7)), "accepted grabs wait for their commit"
    refunded, now = await refund
    assert now and all(out.frames[rid].status == wire.Status.OK for rid in range(1, 7))
    taken = early.amount_cents + sum(wire.decode_grab(out.frames[rid]).amount_cents for rid in range(1, 7))
    assert refunded == 10_000 - taken
    assert await anbao.fetchval("SELECT count(*) FROM claims_all WHERE packet_id = $1", sent.packet_id) == 7
    info = await admin.packet(sent.packet_id)
    assert (info.status, info.claimed_cents, info.refunded_cents) == (PacketStatus.REFUNDED, taken, refunded)
    # A retry of a landed grab still answers with its share; a newcomer is EXPIRED.
    with pytest.raises(AlreadyClaimed) as again:
        await admin.grab(sent.packet_id, users[5])
    assert again.value.grabbed.amount_cents == wire.decode_grab(out.frames[5]).amount_cents
    with pytest.raises(Expired):
        await admin.grab(sent.packet_id, users[10])
    await audit_strict(anbao.dsn)


async def test_grabs_racing_the_clock(anbao):
    """Waves of grabs over TCP from before the expiry to after it, while the
    sweeper runs every 50 ms: every acknowledged grab is durable, nothing
    lands after the refund, and the refund is exactly what the grabs left."""
    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 1_000_000)
    users = await funded_users(admin, 1000, 800)
    sent = await admin.send(sender, 500_000, 800, expiry_seconds=1)
    clients = [await anbao.client("app") for _ in range(8)]
    ok, expired, tasks = {}, [], []

    async def grab(i, u):
        try:
            ok[u] = await clients[i % 8].grab(sent.packet_id, u)
        except Expired:
            expired.append(u)

    await sleep_until_ms(sent.expires_at_ms - 150)
    for i, u in enumerate(users):
        tasks.append(asyncio.ensure_future(grab(i, u)))
        if i % 4 == 3:
            await asyncio.sleep(0.001)  # a few grabs per tick, spread across the expiry
    await asyncio.gather(*tasks)
    assert len(ok) + len(expired) == len(users)
    assert ok and expired, "the grabs must straddle the expiry"
    await wait_refunded(anbao, sent.packet_id)
    conn = await asyncpg.connect(anbao.dsn)
    try:
        rows = await conn.fetch(
            "SELECT user_id, seq, amount_cents FROM claims_all WHERE packet_id = $1", sent.packet_id
        )
        refunded = await conn.fetchval("SELECT refunded_cents FROM packets WHERE packet_id = $1", sent.packet_id)
    finally:
        await conn.close()
    assert {r["user_id"]: (r["seq"], r["amount_cents"]) for r in rows} == {
        u: (g.seq, g.amount_cents) for u, g in ok.items()
    }
    assert refunded == 500_000 - sum(g.amount_cents for g in ok.values())
    assert len(await refund_rows(anbao.dsn, sent.packet_id)) == 1
    await audit_strict(anbao.dsn)


async def test_restart_between_expiry_and_refund(fresh_dsn, tokens_file):
    """The packet expires while its worker's sweeper is not due; the worker
    stops before any refund. The audit names the debt; a new worker's first
    sweep pays it, once."""
    first = await Anbao(fresh_dsn, tokens_file, NO_SWEEP).start()
    try:
        admin = await first.client("admin")
        sender, a, b = await funded_users(admin, 1, 3)
        await admin.deposit(sender, 5_000)
        sent = await admin.send(sender, 2_000, 4, expiry_seconds=1)
        g = await admin.grab(sent.packet_id, a)
        await sleep_until_ms(sent.expires_at_ms + 20)
        with pytest.raises(Expired):  # the clock alone refuses it
            await admin.grab(sent.packet_id, b)
        assert (await admin.packet(sent.packet_id)).status == PacketStatus.EXPIRED
    finally:
        await first.stop()
    assert await first.fetchval("SELECT status FROM packets WHERE packet_id = $1", sent.packet_id) == 0
    owed = await audit(fresh_dsn, refund_grace_ms=0)
    assert not owed.ok and list(owed.violations) == ["every expired packet refunded (after the grace)"]
    assert (
        owed.violations["every expired packet refunded (after the grace)"][0]["unrefunded_cents"]
        == 2_000 - g.amount_cents
    )
    assert (await audit(fresh_dsn)).ok, "within the default grace it is not yet a violation"

    second = await Anbao(fresh_dsn, tokens_file, FAST_SWEEP).start()
    try:
        await wait_refunded(fresh_dsn, sent.packet_id)
        admin = await second.client("admin")
        assert await admin.balance(sender) == 3_000 + 2_000 - g.amount_cents
        with pytest.raises(Expired):
            await admin.grab(sent.packet_id, b)
        await asyncio.sleep(0.2)  # a few more sweeps: nothing more is paid
        assert len(await refund_rows(fresh_dsn, sent.packet_id)) == 1
        await audit_strict(fresh_dsn)
    finally:
        await second.stop()


async def test_refund_not_committed_then_restart(fresh_dsn, tokens_file):
    """The refund's commit fails (the database refuses it): the packet stays
    closed, nothing is paid, the debt stays visible. After a restart, with
    the database willing again, the new worker refunds exactly once."""
    first = await Anbao(fresh_dsn, tokens_file, FAST_SWEEP).start()
    conn = await asyncpg.connect(fresh_dsn)
    try:
        await conn.execute("""
            CREATE FUNCTION refuse_refunds() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.kind = 5 THEN RAISE EXCEPTION 'refunds refused for the test'; END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_refunds BEFORE INSERT ON transfers FOR EACH ROW EXECUTE FUNCTION refuse_refunds();""")
        admin = await first.client("admin")
        sender, a, b = await funded_users(admin, 1, 3)
        await admin.deposit(sender, 5_000)
        sent = await admin.send(sender, 2_000, 4, mode=Mode.FIXED, expiry_seconds=1)
        await admin.grab(sent.packet_id, a)
        engine = first.worker.engine

        async def tried_twice():
            return engine.refunds_failed >= 2

        await eventually(tried_twice, what="two failed refunds")
        assert engine.states[sent.packet_id].closed
        with pytest.raises(Expired):
            await admin.grab(sent.packet_id, b)
        assert await conn.fetchval("SELECT status FROM packets WHERE packet_id = $1", sent.packet_id) == 0
        await first.stop()
        await conn.execute("DROP TRIGGER refuse_refunds ON transfers")
    finally:
        await first.stop()
        await conn.close()
    second = await Anbao(fresh_dsn, tokens_file, FAST_SWEEP).start()
    try:
        await wait_refunded(fresh_dsn, sent.packet_id)
        admin = await second.client("admin")
        assert await admin.balance(sender) == 3_000 + 1_500
        assert [r["amount_cents"] for r in await refund_rows(fresh_dsn, sent.packet_id)] == [1_500]
        assert second.worker.engine.refunds_committed == 1
        await audit_strict(fresh_dsn)
    finally:
        await second.stop()


async def test_two_owners_racing_to_refund_pay_once(fresh_dsn, tokens_file):
    """Two workers on one database both believe they own the packet (as
    during a hand-over) and expire it at the same moment: one refund."""
    one = await Anbao(fresh_dsn, tokens_file, NO_SWEEP).start()
    two = await Anbao(fresh_dsn, tokens_file, NO_SWEEP).start()
    try:
        admin = await one.client("admin")
        sender, a = await funded_users(admin, 1, 2)
        await admin.deposit(sender, 5_000)
        packets = [await admin.send(sender, 500, 5, expiry_seconds=1) for _ in range(3)]
        left = [500 - (await admin.grab(p.packet_id, a)).amount_cents for p in packets]
        await sleep_until_ms(packets[-1].expires_at_ms + 10)
        for round_ in range(3):
            results = await asyncio.gather(*(w.worker.engine.expire(p.packet_id) for p in packets for w in (one, two)))
            for i, remainder in enumerate(left):
                (cents1, now1), (cents2, now2) = results[2 * i], results[2 * i + 1]
                assert cents1 == cents2 == remainder
                assert now1 + now2 == (1 if round_ == 0 else 0), "one of them pays, once"
        assert one.worker.engine.refunds_committed + two.worker.engine.refunds_committed == 3
        for p in packets:
            assert len(await refund_rows(fresh_dsn, p.packet_id)) == 1
        assert await one.fetchval("SELECT count(*) FROM transfers WHERE kind = 5") == 3
        await audit_strict(fresh_dsn)
    finally:
        await two.stop()
        await one.stop()


async def test_sold_out_packet_is_not_refunded(anbao):
    admin = await anbao.client("admin")
    sender, a, b = await funded_users(admin, 1, 3)
    await admin.deposit(sender, 1_000)
    sent = await admin.send(sender, 600, 2, expiry_seconds=1)
    await admin.grab(sent.packet_id, a)
    await admin.grab(sent.packet_id, b)
    await sleep_until_ms(sent.expires_at_ms + 20)
    assert await anbao.worker.expiry.sweep_once() == 0, "a sold-out packet is not in the sweep"
    assert await anbao.worker.engine.expire(sent.packet_id) == (0, False)
    info = await admin.packet(sent.packet_id)
    assert info.status == PacketStatus.SOLD_OUT and info.refunded_cents == 0
    assert await anbao.fetchval("SELECT count(*) FROM transfers WHERE kind = 5") == 0
    await audit_strict(anbao.dsn)


async def test_expiry_limits(anbao):
    admin = await anbao.client("admin")
    sender, a = await funded_users(admin, 1, 2, 10_000)
    lim = anbao.limits
    before = int(time.time() * 1000)
    default = await admin.send(sender, 100, 1, to_user=a)
    assert abs(default.expires_at_ms - before - lim.rules.default_expiry_s * 1000) < 5_000
    longest = await admin.send(sender, 100, 1, to_user=a, expiry_seconds=lim.rules.max_expiry_s)
    assert abs(longest.expires_at_ms - before - lim.rules.max_expiry_s * 1000) < 5_000
    with pytest.raises(Invalid):
        await admin.send(sender, 100, 1, to_user=a, expiry_seconds=lim.rules.max_expiry_s + 1)
    assert await admin.balance(sender) == 9_800
    assert await anbao.fetchval("SELECT count(*) FROM packets") == 2


async def test_expiry_below_the_minimum_is_refused(fresh_dsn, tokens_file):
    server = await Anbao(fresh_dsn, tokens_file, Limits.of(min_expiry_s=60)).start()
    try:
        admin = await server.client("admin")
        sender, a = await funded_users(admin, 1, 2, 1_000)
        with pytest.raises(Invalid):
            await admin.send(sender, 100, 1, to_user=a, expiry_seconds=59)
        assert await admin.balance(sender) == 1_000
        assert await server.fetchval("SELECT count(*) FROM packets") == 0
    finally:
        await server.stop()
