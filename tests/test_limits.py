"""The limits of a payment product (issue 12 item 4), on a real worker and
PostgreSQL: each one configurable, each answered with its own status, and
none of them refusing an acknowledged grab.

- maximum per share: checked at SEND (fixed and random mode), remembered by
  the packet, obeyed by grabs decided after a restart under other settings;
- daily sending caps (amount, count): concurrent SENDs of one sender cannot
  both pass, and a replay returns the first answer;
- grab cool-down: a scripted grabber is cooled, an honest one is not, and a
  winner's retry gets its share during the cool-down;
- request-rate ceiling per token: one token is limited while another's
  requests all succeed, a limited GRAB was not decided, and relays between
  workers are exempt.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from helpers import ADMIN_TOKEN, APP_TOKEN, funded_users

from anbao.config import Limits
from anbao.storage.audit import audit
from anbao_client import (
    AlreadyClaimed,
    Client,
    CoolingDown,
    DailySendAmountCap,
    DailySendCountCap,
    Mode,
    NotEligible,
    RateLimited,
    ShareAboveMax,
    wire,
)

APP2_TOKEN = "test-app2-token-0123456789"


@pytest.fixture
def tokens_file(tmp_path):
    """Two app tokens besides the admin's: one to misbehave, one to behave."""
    path = tmp_path / "tokens.json"
    tokens = [("admin", ADMIN_TOKEN), ("app", APP_TOKEN), ("app", APP2_TOKEN)]
    path.write_text(json.dumps({"tokens": [{"scope": s, "token": t} for s, t in tokens]}))
    path.chmod(0o600)
    return path


# ---------------------------------------------------------------- maximum per share


@pytest.mark.parametrize("limits", [Limits.of(max_share_cents=500)])
async def test_share_above_max_is_refused_at_send(anbao):
    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 100_000)
    await funded_users(admin, 10, 5)
    with pytest.raises(ShareAboveMax, match="501"):  # fixed: ceil(1001 / 2) = 501 > 500
        await admin.send(sender, 1001, 2, mode=Mode.FIXED)
    with pytest.raises(ShareAboveMax, match="cannot be split"):  # random: 1001 > 2 x 500
        await admin.send(sender, 1001, 2)
    assert await admin.balance(sender) == 100_000, "a refused SEND moves nothing"
    fixed = await admin.send(sender, 1000, 2, mode=Mode.FIXED)
    tight = await admin.send(sender, 1000, 2)  # exactly count x max: each share must be the max
    got = [await admin.grab(tight.packet_id, u) for u in (10, 11)]
    assert [g.amount_cents for g in got] == [500, 500]
    assert (await admin.grab(fixed.packet_id, 10)).amount_cents == 500
    assert await anbao.fetchval("SELECT max_share_cents FROM packets WHERE packet_id = $1", tight.packet_id) == 500
    await anbao.assert_audit_clean()
    # The audit checks every claim against its packet's cap (past the schema's own check).
    await anbao.fetchval("ALTER TABLE packets DROP CONSTRAINT packets_max_share")
    await anbao.fetchval("UPDATE packets SET max_share_cents = 499 WHERE packet_id = $1", tight.packet_id)
    report = await audit(anbao.dsn)
    assert list(report.violations) == ["no share above its packet's maximum"]
    assert len(report.violations["no share above its packet's maximum"]) == 2


@pytest.mark.parametrize("limits", [Limits.of(max_share_cents=300)])
async def test_a_grab_after_a_restart_obeys_the_packets_own_cap(anbao):
    """The cap travels with the packet: after a restart under a higher
    maximum, the state rebuilt from the database (load_packet ->
    PacketRecord -> packet_state) still draws under the packet's 300."""
    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 100_000)
    users = await funded_users(admin, 10, 8)
    tight = await admin.send(sender, 1200, 4)  # 4 x 300: only 300s fit
    loose = await admin.send(sender, 1000, 4)  # random, each at most 300
    first = [await admin.grab(tight.packet_id, users[0]), await admin.grab(loose.packet_id, users[0])]
    await anbao.stop()
    anbao.limits = Limits()  # the default maximum, 20,000
    await anbao.start()
    admin = await anbao.client("admin")
    later = [await admin.grab(tight.packet_id, u) for u in users[1:4]]
    later_loose = [await admin.grab(loose.packet_id, u) for u in users[1:4]]
    state = anbao.worker.engine.states[loose.packet_id]
    assert state.max_share_cents == 300, "the state rebuilt from the database carries the packet's cap"
    assert first[0].amount_cents == 300 and [g.amount_cents for g in later] == [300, 300, 300]
    loose_amounts = [first[1].amount_cents] + [g.amount_cents for g in later_loose]
    assert sum(loose_amounts) == 1000 and max(loose_amounts) <= 300
    await anbao.assert_audit_clean()


# ---------------------------------------------------------------- daily sending caps


async def _concurrent_sends(admin: Client, sender: int, amount: int, n: int):
    keys = [bytes([i]) * 16 for i in range(1, n + 1)]

    async def one(key):
        try:
            return await admin.send(sender, amount, 1, key=key)
        except (DailySendCountCap, DailySendAmountCap) as exc:
            return exc

    return keys, await asyncio.gather(*(one(k) for k in keys))


@pytest.mark.parametrize("limits", [Limits.of(daily_send_max_packets=3)])
async def test_concurrent_sends_cannot_both_pass_the_daily_count_cap(anbao):
    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 100_000)
    keys, got = await _concurrent_sends(admin, sender, 100, 12)
    sent = [g for g in got if isinstance(g, wire.Sent)]
    refused = [g for g in got if isinstance(g, DailySendCountCap)]
    assert len(sent) == 3 and len(refused) == 9, got
    assert await admin.balance(sender) == 100_000 - 3 * 100
    assert await anbao.fetchval("SELECT count(*) FROM packets WHERE sender_id = $1", sender) == 3

    # A replay is not a second send: each key gets its first answer back.
    ok_key = keys[got.index(sent[0])]
    refused_key = keys[got.index(refused[0])]
    assert (await admin.send(sender, 100, 1, key=ok_key)).packet_id == sent[0].packet_id
    with pytest.raises(DailySendCountCap):
        await admin.send(sender, 100, 1, key=refused_key)

    # The next UTC day (the counter's day moved back by one): new SENDs pass
    # again, and a refused key still replays its refusal.
    await anbao.fetchval("UPDATE daily_sends SET utc_day = utc_day - 1 WHERE user_id = $1", sender)
    await admin.send(sender, 100, 1)
    with pytest.raises(DailySendCountCap):
        await admin.send(sender, 100, 1, key=refused_key)
    assert await anbao.fetchval("SELECT sent_count FROM daily_sends WHERE user_id = $1", sender) == 1
    await anbao.assert_audit_clean()


@pytest.mark.parametrize("limits", [Limits.of(daily_send_max_cents=1_000)])
async def test_concurrent_sends_cannot_both_pass_the_daily_amount_cap(anbao):
    admin = await anbao.client("admin")
    (sender, other) = await funded_users(admin, 1, 2, 100_000)
    _, got = await _concurrent_sends(admin, sender, 300, 10)
    assert sum(isinstance(g, wire.Sent) for g in got) == 3, got  # 900 of 1,000; a fourth would be 1,200
    assert sum(isinstance(g, DailySendAmountCap) for g in got) == 7
    await admin.send(sender, 100, 1)  # exactly to the cap
    with pytest.raises(DailySendAmountCap, match="1000"):
        await admin.send(sender, 1, 1)
    await admin.send(other, 1_000, 1)  # per sender: another sender has their own cap
    assert await admin.balance(sender) == 100_000 - 1_000
    await anbao.assert_audit_clean()


# ---------------------------------------------------------------- grab cool-down


@pytest.mark.parametrize("limits", [Limits.of(cooldown_refusals=3, cooldown_window_ms=10_000, cooldown_ms=2_000)])
async def test_a_scripted_grabber_cools_down_an_honest_one_does_not(anbao):
    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 100_000)
    scripted, honest, member = 20, 21, 22
    await funded_users(admin, 20, 3)
    won = await admin.send(sender, 300, 3)  # open: the scripted user wins a share first
    private = await admin.send(sender, 100, 1, members=[member])  # neither may open it
    fresh = await admin.send(sender, 300, 3)
    share = await admin.grab(won.packet_id, scripted)

    for _ in range(3):  # a script trying a packet it may not open
        with pytest.raises(NotEligible):
            await admin.grab(private.packet_id, scripted)
    with pytest.raises(CoolingDown, match="cooling down for"):
        await admin.grab(fresh.packet_id, scripted)
    # The winner's retry still gets its share, during the cool-down.
    with pytest.raises(AlreadyClaimed) as e:
        await admin.grab(won.packet_id, scripted)
    assert (e.value.grabbed.amount_cents, e.value.grabbed.seq) == (share.amount_cents, share.seq)

    # The honest user: one refusal, then grabs as usual.
    with pytest.raises(NotEligible):
        await admin.grab(private.packet_id, honest)
    assert (await admin.grab(fresh.packet_id, honest)).seq == 1
    assert (await admin.grab(won.packet_id, honest)).seq == 2

    stats = await admin.stats()
    assert stats["cooldowns_started"] == 1 and stats["users_cooling"] == 1

    # The cool-down ends: the same grab is decided as if it were the first.
    await asyncio.sleep(2.1)
    assert (await admin.grab(fresh.packet_id, scripted)).seq == 2
    await anbao.assert_audit_clean()


@pytest.mark.parametrize("limits", [Limits.of(cooldown_refusals=3, cooldown_window_ms=10_000, cooldown_ms=60_000)])
async def test_hammering_a_won_packet_cools_but_never_refuses_the_share(anbao):
    """ALREADY_CLAIMED counts as a refusal (a script hammering a packet it
    opened), but the share holder is answered with the share every time."""
    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 100_000)
    await funded_users(admin, 20, 1)
    won = await admin.send(sender, 300, 3)
    other = await admin.send(sender, 300, 3)
    share = await admin.grab(won.packet_id, 20)
    for _ in range(10):
        with pytest.raises(AlreadyClaimed) as e:
            await admin.grab(won.packet_id, 20)
        assert (e.value.grabbed.amount_cents, e.value.grabbed.seq) == (share.amount_cents, share.seq)
    with pytest.raises(CoolingDown):
        await admin.grab(other.packet_id, 20)


# ---------------------------------------------------------------- request-rate ceiling


@pytest.mark.parametrize("limits", [Limits.of(rate_limit_requests_per_s=2, rate_limit_burst_requests=20)])
async def test_one_token_is_rate_limited_while_another_is_served(anbao):
    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 100_000)
    await funded_users(admin, 10, 2)
    sent = await admin.send(sender, 200, 2)

    flood = await anbao.client("app")
    calm = await Client.connect("127.0.0.1", anbao.port, APP2_TOKEN)
    try:
        # The misbehaving token: 200 requests at once, its grab last.
        answers = await asyncio.gather(*(flood.ping() for _ in range(200)), return_exceptions=True)
        limited = [a for a in answers if isinstance(a, RateLimited)]
        assert all(isinstance(a, int | RateLimited) for a in answers), answers
        assert 170 <= len(limited) <= 180, len(limited)  # a burst of 20, plus what refills meanwhile
        with pytest.raises(RateLimited, match="over 2/s"):
            await flood.grab(sent.packet_id, 10)
        # The other token meanwhile: every request served.
        for _ in range(15):
            await calm.ping()
        assert (await calm.grab(sent.packet_id, 11)).seq == 1
        # The limited GRAB was not decided, and not refused: after a pause it is.
        await asyncio.sleep(0.6)
        assert (await flood.grab(sent.packet_id, 10)).seq == 2
        stats = await calm.stats()
        assert stats["rate_limited"] >= 171
    finally:
        await calm.close()


@pytest.mark.parametrize("limits", [Limits.of(rate_limit_requests_per_s=2, rate_limit_burst_requests=20)])
async def test_requests_in_the_same_read_as_hello_count_against_the_token(anbao):
    """HELLO and 200 PINGs in one write, read at once: the PINGs after the
    HELLO are counted against the token like any others (a read takes its
    tokens in one go only when all of them are there)."""
    from helpers import Raw

    from anbao_client import wire

    raw = await Raw.open(anbao.port, hello=False)
    raw.send(wire.hello(1, APP_TOKEN.encode()) + b"".join(wire.ping(2 + i) for i in range(200)))
    got = await raw.answers(201)
    statuses = [r.status for r in got if r.request_id != 1]
    limited = statuses.count(wire.Status.RATE_LIMITED)
    assert 175 <= limited <= 180 and statuses.count(wire.Status.OK) == 200 - limited, (limited, set(statuses))


async def test_relays_between_workers_are_not_rate_limited(serve):
    """Two tokens each send 30 grabs to the worker that does not own the
    packet, within their own ceiling there (a burst of 40, 1/s after). All
    60 are relayed to the owner on one peer link: were peer links limited
    like a token, the owner would refuse 20 of them."""
    from served import steered_client

    from anbao_client import Cluster
    from anbao_client.routing import owner_of

    server = serve(
        workers=2, extra=["--limit", "rate_limit_requests_per_s=1", "--limit", "rate_limit_burst_requests=40"]
    )
    admin = await Cluster.connect("127.0.0.1", server.port, ADMIN_TOKEN)
    try:
        (sender,) = await funded_users(admin, 1, 1, 1_000_000)
        users = await funded_users(admin, 100, 60)
        sent = await admin.send(sender, 6_000, 60)
    finally:
        await admin.close()
    other = 1 - owner_of(sent.packet_id, 2)
    clients = [await steered_client(server.port, t, other, 2) for t in (APP_TOKEN, APP2_TOKEN)]
    try:
        assert [await c.ping() for c in clients] == [other, other]
        got = await asyncio.gather(
            *(clients[i % 2].grab(sent.packet_id, u) for i, u in enumerate(users)), return_exceptions=True
        )
        assert all(isinstance(g, wire.Grabbed) for g in got), [g for g in got if not isinstance(g, wire.Grabbed)]
        assert sorted(g.seq for g in got) == list(range(1, 61))
        assert all(g.worker_id != other for g in got), "decided by the owner, through the relay"
    finally:
        for c in clients:
            await c.close()
