"""The event feed (issue 12): every money fact has exactly one event,
written in the fact's own transaction and numbered gap-free; EVENTS reads
it from a cursor and long-polls; retention prunes it and an old cursor is
told where to resume. Faults are real: workers and PostgreSQL are killed
with SIGKILL mid-storm, and the events are compared with the claims."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from helpers import Anbao, funded_users, grab_outcomes

from anbao.config import Limits
from anbao.storage.audit import audit
from anbao_client import Client, CursorExpired, EventKind, Invalid, wire

FAST = Limits.of(expiry_sweep_interval_ms=50)


@pytest.fixture
def limits() -> Limits:
    return FAST


async def all_events(client: Client, after: int = 0) -> list[wire.Event]:
    return [e async for e in client.events(after=after, follow=False)]


async def settle_feed(client: Client, dsn: str, timeout_s: float = 10.0) -> list[wire.Event]:
    """Every event, once the feed has numbered every event row."""
    deadline = time.monotonic() + timeout_s
    conn = await asyncpg.connect(dsn)
    try:
        while await conn.fetchval("SELECT count(*) FROM event_log WHERE last_no IS NULL"):
            assert time.monotonic() < deadline, "events left unnumbered"
            await asyncio.sleep(0.02)
    finally:
        await conn.close()
    return await all_events(client)


def assert_dense(events: list[wire.Event], first: int = 1) -> None:
    assert [e.number for e in events] == list(range(first, first + len(events))), "gap or repeat in the feed"


async def claims_of(dsn: str) -> dict[tuple[int, int], tuple[int, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT packet_id, seq, user_id, amount_cents FROM claims_all")
    finally:
        await conn.close()
    return {(r[0], r[1]): (r[2], r[3]) for r in rows}


def shares(events: list[wire.Event]) -> dict[tuple[int, int], tuple[int, int]]:
    taken = [e for e in events if e.kind == EventKind.SHARE_TAKEN]
    out = {(e.packet_id, e.seq): (e.user_id, e.amount_cents) for e in taken}
    assert len(out) == len(taken), "a share has two events"
    return out


async def test_every_fact_has_its_event_in_order(anbao):
    admin = await anbao.client("admin")
    sender, *users = await funded_users(admin, 1, 4)
    await admin.deposit(sender, 10_000)
    sent = await admin.send(sender, 1_000, 3, members=users)
    grabs = [await admin.grab(sent.packet_id, u) for u in users]
    await admin.withdraw(sender, 500)
    events = await settle_feed(admin, anbao.dsn)
    assert_dense(events)
    kinds = [e.kind for e in events]
    assert kinds == [
        EventKind.DEPOSIT,
        EventKind.SENT,
        EventKind.SHARE_TAKEN,
        EventKind.SHARE_TAKEN,
        EventKind.SHARE_TAKEN,
        EventKind.SOLD_OUT,
        EventKind.WITHDRAWAL,
    ], kinds
    dep, snt, *taken, sold, wd = events
    assert (dep.user_id, dep.amount_cents) == (sender, 10_000)
    assert (snt.packet_id, snt.user_id, snt.amount_cents, snt.count) == (sent.packet_id, sender, 1_000, 3)
    assert [(e.user_id, e.seq, e.amount_cents) for e in taken] == [
        (u, g.seq, g.amount_cents) for u, g in zip(users, grabs, strict=True)
    ]
    assert (sold.packet_id, sold.seq, sold.count, sold.amount_cents) == (sent.packet_id, 3, 3, 1_000)
    assert 0 <= sold.elapsed_ms <= sold.at_ms - snt.at_ms + 1
    assert (wd.user_id, wd.amount_cents) == (sender, 500)
    # Reading from any cursor gives the rest, the same.
    assert await all_events(admin, after=3) == events[3:]
    page = await admin.events_page(0, limit=2)
    assert page.events == events[:2] and page.next_cursor == 2
    await anbao.assert_audit_clean()


async def test_expiry_refund_has_its_event(anbao):
    admin = await anbao.client("admin")
    sender, user = await funded_users(admin, 1, 2, 5_000)
    sent = await admin.send(sender, 1_000, 4, expiry_seconds=1)
    g = await admin.grab(sent.packet_id, user)
    deadline = time.monotonic() + 10
    while True:
        events = await all_events(admin)
        refunds = [e for e in events if e.kind == EventKind.REFUNDED]
        if refunds:
            break
        assert time.monotonic() < deadline, "no refund event"
        await asyncio.sleep(0.05)
    [r] = refunds
    assert (r.packet_id, r.user_id, r.amount_cents, r.seq, r.count) == (
        sent.packet_id,
        sender,
        1_000 - g.amount_cents,
        1,
        4,
    )
    assert events[-1] == r, "the refund comes after the packet's shares"
    await anbao.assert_audit_clean()


async def test_long_poll_wakes_within_milliseconds(anbao):
    admin = await anbao.client("admin")
    sender, user = await funded_users(admin, 1, 2, 5_000)
    head = (await settle_feed(admin, anbao.dsn))[-1].number
    waits = []
    for i in range(5):
        poll = asyncio.ensure_future(admin.events_page(head, wait_ms=10_000))
        await asyncio.sleep(0.2)
        assert not poll.done(), "a long poll with nothing new must wait"
        t0 = time.perf_counter()
        await admin.deposit(user, 100 + i)
        page = await poll
        waits.append((time.perf_counter() - t0) * 1000)
        assert [e.kind for e in page.events] == [EventKind.DEPOSIT]
        head = page.next_cursor
    print(f"long-poll wake after DEPOSIT's answer (in-loop worker): {sorted(waits)} ms")
    assert max(waits) < 500
    # Nothing new: the poll answers empty after its wait, with the cursor unchanged.
    t0 = time.perf_counter()
    page = await admin.events_page(head, wait_ms=300)
    assert page.events == [] and page.next_cursor == head and time.perf_counter() - t0 >= 0.29


async def test_long_polls_are_bounded_and_hold_no_connection(fresh_dsn, tokens_file):
    limits = Limits.of(max_event_waiters=3, db_pool_size=2)
    server = await Anbao(fresh_dsn, tokens_file, limits).start()
    try:
        admin = await server.client("admin")
        [user] = await funded_users(admin, 1, 1, 100)
        head = (await settle_feed(admin, fresh_dsn))[-1].number
        polls = [asyncio.ensure_future(admin.events_page(head, wait_ms=5_000)) for _ in range(3)]
        await asyncio.sleep(0.3)
        # Three waiting polls, a pool of two: other requests still get connections.
        assert await admin.balance(user) == 100
        from anbao_client import Busy

        with pytest.raises(Busy):
            await admin.events_page(head, wait_ms=5_000)
        await admin.deposit(user, 1)
        for p in polls:
            assert [e.kind for e in (await p).events] == [EventKind.DEPOSIT]
    finally:
        await server.stop()


async def test_retention_by_age_prunes_the_old_front_and_never_a_younger_event(fresh_dsn):
    """Rows older than the cut go from the front; the walk stops at the
    first row still young, so an old row behind it (commit-time skew)
    waits for it, and no event younger than the cut is ever pruned."""
    ages_min = [300, 200, 180, 30, 240, 1]  # the fifth is older than the fourth
    conn = await asyncpg.connect(fresh_dsn)
    try:
        await conn.execute(
            "INSERT INTO event_log (kind, at, amount_cents)"
            " SELECT 5, now() - make_interval(mins => a), a FROM unnest($1::int[]) WITH ORDINALITY AS t(a, o)"
            " ORDER BY o",
            ages_min,
        )
        await conn.execute("SELECT anbao_number_events()")
        prune = "SELECT anbao_prune_events(now() - interval '1 hour', $1)"
        assert await conn.fetchval(prune, 1_000) == 3
        kept = await conn.fetch("SELECT last_no, amount_cents FROM event_log ORDER BY last_no")
        assert [(r[0], r[1]) for r in kept] == [(4, 30), (5, 240), (6, 1)]
        assert await conn.fetchval(prune, 1_000) == 3, "a young row holds back the old one behind it"
        assert await conn.fetchval(prune, 1) == 5, "the count bound cuts past it"
        assert await conn.fetchval("SELECT pruned_through FROM event_feed") == 5
    finally:
        await conn.close()


async def test_cursor_expired_names_where_to_resume(fresh_dsn, tokens_file):
    limits = Limits.of(events_retention_max_events=3, events_prune_interval_ms=50)
    server = await Anbao(fresh_dsn, tokens_file, limits).start()
    try:
        admin = await server.client("admin")
        [user] = await funded_users(admin, 1, 1)
        for i in range(10):
            await admin.deposit(user, 100 + i)
        deadline = time.monotonic() + 10
        while True:
            try:
                await admin.events_page(0)
            except CursorExpired as exc:
                resume, message = exc.resume_cursor, str(exc)
                if resume >= 7:
                    break
            assert time.monotonic() < deadline, "nothing pruned"
            await asyncio.sleep(0.05)
        assert f"resume from cursor {resume}" in message
        rest = await all_events(admin, after=resume)
        assert_dense(rest, resume + 1)
        assert rest[-1].number == 10 and [e.amount_cents for e in rest] == list(range(100 + resume, 110))
        with pytest.raises(CursorExpired):
            [e async for e in admin.events(after=0, follow=False)]
        with pytest.raises(Invalid):
            await admin.events_page(11)
        with pytest.raises(Invalid):
            await admin.events_page(0, limit=0)
        assert (await audit(fresh_dsn)).ok
    finally:
        await server.stop()


async def test_consumer_reconnects_and_resumes(fresh_dsn, tokens_file):
    """A consumer follows while deposits commit; the server restarts under it
    twice: it sees every event once, in order."""
    server = await Anbao(fresh_dsn, tokens_file, FAST).start()
    port = server.port
    admin = await Client.connect("127.0.0.1", port, "test-admin-token-0123456789")
    [user] = await funded_users(admin, 1, 1)
    seen: list[wire.Event] = []

    async def consume():
        async for e in admin.events(after=0, wait_ms=1_000):
            seen.append(e)
            if e.kind == EventKind.DEPOSIT and e.amount_cents == 999:
                return

    consumer = asyncio.ensure_future(consume())
    try:
        amounts = []
        for round_ in range(3):
            for i in range(20):
                amounts.append(1 + round_ * 20 + i)
                await admin.deposit(user, amounts[-1])
            await asyncio.sleep(0.1)
            await server.stop()
            server = Anbao(fresh_dsn, tokens_file, FAST)
            server.port = port
            await server.start()
            await admin.close()
            admin = await Client.connect("127.0.0.1", port, "test-admin-token-0123456789")
        await admin.deposit(user, 999)
        await asyncio.wait_for(consumer, 20)
    finally:
        consumer.cancel()
        await admin.close()
        await server.stop()
    assert_dense(seen)
    assert [e.amount_cents for e in seen] == amounts + [999]


async def test_storm_events_match_claims(anbao):
    admin = await anbao.client("admin")
    sender, *users = await funded_users(admin, 1, 401)
    await admin.deposit(sender, 1_000_000)
    packets = [await admin.send(sender, 50_000, 100) for _ in range(3)]
    clients = [await anbao.client() for _ in range(4)]
    for p in packets:
        await grab_outcomes(clients, p.packet_id, users)
    events = await settle_feed(admin, anbao.dsn)
    assert_dense(events)
    assert shares(events) == await claims_of(anbao.dsn)
    sold = [e for e in events if e.kind == EventKind.SOLD_OUT]
    assert sorted(e.packet_id for e in sold) == sorted(p.packet_id for p in packets)
    # Each packet's shares come in seq order, its sell-out right after the last.
    for p in packets:
        mine = [e for e in events if e.packet_id == p.packet_id]
        assert [e.kind for e in mine] == [EventKind.SENT] + [EventKind.SHARE_TAKEN] * 100 + [EventKind.SOLD_OUT]
        assert [e.seq for e in mine[1:-1]] == list(range(1, 101))
    # Rolled up or pending, the events are the same.
    conn = await asyncpg.connect(anbao.dsn)
    try:
        await conn.fetchval("SELECT anbao_rollup(1000000, NULL, NULL, NULL, NULL)")
        assert await conn.fetchval("SELECT count(*) FROM grab_rollups") == 0
    finally:
        await conn.close()
    assert await all_events(admin) == events
    await anbao.assert_audit_clean()


@pytest.mark.parametrize("limits", [Limits.of(batch_max_grabs=4, expiry_sweep_interval_ms=50)])
async def test_a_backlog_of_rolled_up_batches_is_numbered_in_order(anbao):
    """The sequencer held (as a stall would hold it) while a storm commits
    batches of a few grabs and the roll-up posts them all: the catch-up run
    then numbers hundreds of batch rows at once, each counted from its
    claims, and places them by build order. The feed is what it would have
    been: dense, a share per claim, each packet's shares in seq order."""
    holder = await asyncpg.connect(anbao.dsn)
    try:
        admin = await anbao.client("admin")
        sender, *users = await funded_users(admin, 1, 121)
        await admin.deposit(sender, 1_000_000)
        packets = [await admin.send(sender, 30_000, 40) for _ in range(3)]
        await holder.execute("SELECT pg_advisory_lock(7020657039738307955)")  # anbao_number_events' key
        clients = [await anbao.client() for _ in range(6)]
        await asyncio.gather(*(grab_outcomes(clients, p.packet_id, users) for p in packets))
        await holder.fetchval("SELECT anbao_rollup(1000000, NULL, NULL, NULL, NULL)")
        backlog = await holder.fetchval("SELECT count(*) FROM event_log WHERE last_no IS NULL AND batch_id IS NOT NULL")
        assert backlog >= 30, backlog
        assert await holder.fetchval("SELECT count(*) FROM grab_rollups") == 0, "counted from the claims"
    finally:
        await holder.execute("SELECT pg_advisory_unlock_all()")
        await holder.close()
    events = await settle_feed(admin, anbao.dsn)
    assert_dense(events)
    assert shares(events) == await claims_of(anbao.dsn)
    for p in packets:
        mine = [e for e in events if e.packet_id == p.packet_id]
        assert [e.kind for e in mine] == [EventKind.SENT] + [EventKind.SHARE_TAKEN] * 40 + [EventKind.SOLD_OUT]
        assert [e.seq for e in mine[1:-1]] == list(range(1, 41))
    await anbao.assert_audit_clean()


async def test_audit_names_a_fact_without_its_event(anbao):
    admin = await anbao.client("admin")
    [user] = await funded_users(admin, 1, 1, 100)
    await settle_feed(admin, anbao.dsn)
    conn = await asyncpg.connect(anbao.dsn)
    try:
        await conn.execute("DELETE FROM event_log WHERE kind = 5")
    finally:
        await conn.close()
    report = await audit(anbao.dsn)
    assert "every deposit, withdrawal, send, refund and cross-set credit has its event" in report.violations
    assert "events are numbered 1..n without gap or repeat, a batch as many as its events" in report.violations


# ---------------------------------------------------------------- real faults mid-storm


class Follower:
    """A consumer following the feed through the SDK's reconnecting iterator."""

    def __init__(self, port: int):
        self.port = port
        self.seen: list[wire.Event] = []
        self.task: asyncio.Task | None = None

    async def start(self) -> Follower:
        from helpers import ADMIN_TOKEN

        client = await Client.connect("127.0.0.1", self.port, ADMIN_TOKEN, timeout_ms=3_000)

        async def run():
            try:
                async for e in client.events(after=0, wait_ms=500):
                    self.seen.append(e)
            finally:
                await client.close()

        self.task = asyncio.ensure_future(run())
        return self

    async def caught_up(self, head: int, timeout_s: float = 30) -> list[wire.Event]:
        deadline = time.monotonic() + timeout_s
        while not self.seen or self.seen[-1].number < head:
            assert time.monotonic() < deadline, f"follower at {self.seen[-1].number if self.seen else 0} of {head}"
            await asyncio.sleep(0.05)
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        return self.seen


def assert_feed_matches(events: list[wire.Event], claims: dict, won: dict, packet_id: int) -> None:
    """Every acknowledged grab has exactly one share-taken event, and every
    share-taken event is a committed claim (none for a grab that did not
    commit)."""
    assert_dense(events)
    assert shares(events) == claims, "share-taken events and committed claims differ"
    mine = {
        e.user_id: (e.seq, e.amount_cents)
        for e in events
        if e.kind == EventKind.SHARE_TAKEN and e.packet_id == packet_id
    }
    for user, g in won.items():
        assert mine.get(user) == (g.seq, g.amount_cents), f"acknowledged grab of {user} has no event"


async def test_kill_9_worker_mid_storm_events_match_claims(serve, fresh_dsn, slow_link):
    """kill -9 of the packet's owner worker mid-storm, with a consumer
    following: every acknowledged grab has exactly one event, no event
    without its claim, and the consumer (whose connection may die with the
    worker) sees every event once, in order."""
    import os
    import signal

    from helpers import APP_TOKEN
    from served import Grabber, answered, restarted, setup_packet, storm

    from anbao_client.routing import owner_of

    # Small batches one at a time over a slow link: the storm lasts seconds,
    # so a kill timed by this loop's 150th answer lands inside it (over
    # loopback the packet can sell out before this loop reads its answers).
    s = serve(workers=2, dsn=slow_link.dsn, extra=["--limit", "batch_max_grabs=10", "--limit", "commit_slots=1"])
    follower = await Follower(s.port).start()
    admin, users, sent = await setup_packet(s.port, 1200, 200_000, 800)
    victim = s.run_info()["workers"][str(owner_of(sent.packet_id, 2))]
    grabbers = [Grabber(s.port, APP_TOKEN, routed=(i % 2 == 0)) for i in range(20)]
    outcomes: list[str] = []

    async def killer():
        at_kill.append(await answered(outcomes, 150, bound_s=60))
        os.kill(victim, signal.SIGKILL)
        slow_link.delay_ms = 0

    at_kill: list[int] = []
    slow_link.delay_ms = 10
    (won, _), _ = await asyncio.gather(storm(s.port, sent.packet_id, users, grabbers, outcomes=outcomes), killer())
    assert len(won) == 800, "the packet sells out"
    assert at_kill[0] < 800, f"the kill must land mid-storm ({at_kill[0]} answered)"
    assert (await restarted(s))["restarts"] >= 1
    events = await settle_feed(admin.clients[0], fresh_dsn)
    assert_feed_matches(events, await claims_of(fresh_dsn), won, sent.packet_id)
    assert await follower.caught_up(events[-1].number) == events
    for g in grabbers:
        await g.close()
    await admin.close()
    assert s.stop() == 0
    report = await audit(fresh_dsn)
    assert report.ok, report.text()


async def test_kill_9_postgres_mid_storm_events_match_claims(own_pg, tokens_file):
    """kill -9 of PostgreSQL (postmaster and backends) mid-storm, restarted
    after crash recovery, with a consumer following: the same promises."""
    from helpers import APP_TOKEN, kill_postgres
    from served import Grabber, answered, storm

    from anbao.storage import embedded

    data, _, dsn = own_pg
    server = await Anbao(dsn, tokens_file, Limits.of(db_probe_interval_ms=100)).start()
    try:
        admin = await server.client("admin")
        sender, *users = await funded_users(admin, 1, 1201)
        await admin.deposit(sender, 1_000_000)
        sent = await admin.send(sender, 200_000, 800)
        follower = await Follower(server.port).start()
        grabbers = [Grabber(server.port, APP_TOKEN, routed=False) for _ in range(20)]
        outcomes: list[str] = []
        at_kill: list[int] = []

        async def killer():
            at_kill.append(await answered(outcomes, 150))
            kill_postgres(data / "pgdata")
            await asyncio.sleep(0.5)
            await asyncio.get_running_loop().run_in_executor(None, embedded.start, data)

        (won, outs), _ = await asyncio.gather(
            storm(server.port, sent.packet_id, users, grabbers, outcomes=outcomes), killer()
        )
        assert "gave_up" not in outs and len(won) == 800
        assert at_kill[0] < 800, f"the kill must land mid-storm ({at_kill[0]} answered)"
        print(f"PostgreSQL killed after {at_kill[0]} of 1200 answers")
        events = await settle_feed(admin, dsn, timeout_s=30)
        assert_feed_matches(events, await claims_of(dsn), won, sent.packet_id)
        assert await follower.caught_up(events[-1].number) == events
        for g in grabbers:
            await g.close()
    finally:
        await server.stop()
    report = await audit(dsn)
    assert report.ok, report.text()


async def test_long_poll_on_one_worker_wakes_on_a_commit_on_the_other(serve, fresh_dsn):
    """Two workers: the poll waits on worker 0, the deposit commits on worker
    1, whose sequencer numbers it; worker 0 hears the NOTIFY."""
    from helpers import ADMIN_TOKEN
    from served import steered_client

    s = serve(workers=2)
    poller = await steered_client(s.port, ADMIN_TOKEN, 0, 2)
    writer = await steered_client(s.port, ADMIN_TOKEN, 1, 2)
    try:
        assert (await poller.ping(), await writer.ping()) == (0, 1)
        [user] = await funded_users(writer, 1, 1, 100)
        head = (await settle_feed(poller, fresh_dsn))[-1].number
        waits = []
        for i in range(5):
            poll = asyncio.ensure_future(poller.events_page(head, wait_ms=10_000))
            await asyncio.sleep(0.2)
            assert not poll.done()
            t0 = time.perf_counter()
            await writer.deposit(user, 1 + i)
            page = await poll
            waits.append((time.perf_counter() - t0) * 1000)
            assert [e.amount_cents for e in page.events] == [1 + i]
            head = page.next_cursor
        print(f"long-poll wake across workers after DEPOSIT's answer: {sorted(round(w, 1) for w in waits)} ms")
        assert max(waits) < 500
        assert (await poller.stats())["events_notifications"] > 0
    finally:
        await poller.close()
        await writer.close()
    assert s.stop() == 0


async def test_a_cursor_near_the_i64_limit_is_refused_before_the_database(anbao):
    """cursor + limit above 2^63-1 overflowed in PostgreSQL (issue 18 item
    14): it is refused INVALID by the server itself, with its reason."""
    from anbao_client import Invalid

    admin = await anbao.client("admin")
    for cursor in (2**63 - 1, 2**63 - 1000):
        with pytest.raises(Invalid) as exc:
            await admin.events_page(cursor, limit=1000)
        assert "ahead of any feed" in str(exc.value), str(exc.value)


async def test_events_carry_the_transfer_they_record(anbao):
    """Each DEPOSIT, WITHDRAWAL, SENT and REFUNDED event names its transfer:
    the one its request was answered with and its STATEMENT entry shows.
    SHARE_TAKEN and SOLD_OUT name none (their transfers come with the
    roll-up)."""
    admin = await anbao.client("admin")
    sender, grabber, other = await funded_users(admin, 1, 3)
    deposited = await admin.deposit(sender, 5_000)
    withdrawn = await admin.withdraw(sender, 1_000)
    sold = await admin.send(sender, 300, 1)
    await admin.grab(sold.packet_id, grabber)
    refunded = await admin.send(sender, 400, 2, members=[grabber, other], expiry_seconds=1)
    deadline = time.monotonic() + 10
    while (await admin.packet(refunded.packet_id)).status != 3:  # refunded by the sweeper
        assert time.monotonic() < deadline, "the packet was not refunded"
        await asyncio.sleep(0.05)
    events = await settle_feed(admin, anbao.dsn)
    by_kind = {}
    for e in events:
        by_kind.setdefault(e.kind, []).append(e)
    statement = {(s.kind, s.packet_id, s.amount_cents): s.transfer_id for s in (await admin.statement(sender)).entries}
    [dep] = [e for e in by_kind[EventKind.DEPOSIT] if e.user_id == sender]
    assert dep.transfer_id == deposited.transfer_id == statement[(1, 0, 5_000)]
    [wd] = by_kind[EventKind.WITHDRAWAL]
    assert wd.transfer_id == withdrawn.transfer_id == statement[(2, 0, -1_000)]
    sent = {e.packet_id: e.transfer_id for e in by_kind[EventKind.SENT]}
    assert sent[sold.packet_id] == statement[(3, sold.packet_id, -300)]
    assert sent[refunded.packet_id] == statement[(3, refunded.packet_id, -400)]
    [ref] = by_kind[EventKind.REFUNDED]
    assert ref.transfer_id == statement[(5, refunded.packet_id, 400)] != 0
    assert all(e.transfer_id == 0 for k in (EventKind.SHARE_TAKEN, EventKind.SOLD_OUT) for e in by_kind[k])
    assert len({e.transfer_id for e in events if e.transfer_id}) == len([e for e in events if e.transfer_id])


async def test_hello_announces_the_feeds_limits(fresh_dsn, tokens_file):
    """HELLO says how large a page, how long a wait and how much retention
    the feed has: the server's own settings, as EVENTS then holds them."""
    lim = Limits.of(events_max_page=250, events_max_wait_ms=1_500, events_retention_ms=3_600_000,
                 events_retention_max_events=5_000)  # fmt: skip
    server = await Anbao(fresh_dsn, tokens_file, lim).start()
    try:
        app = await server.client("app")
        h = app.hello
        assert (h.events_max_page, h.events_max_wait_ms, h.events_retention_ms, h.events_retention_max_events) == (
            250,
            1_500,
            3_600_000,
            5_000,
        )
        with pytest.raises(Invalid):
            await app.events_page(0, limit=h.events_max_page + 1)
        started = time.monotonic()
        page = await app.events_page(0, limit=h.events_max_page, wait_ms=10_000)
        assert page.events == [] and time.monotonic() - started < 5  # held for the cap, not the 10 s asked
    finally:
        await server.stop()


async def test_a_long_poll_while_the_database_is_down(own_pg, tokens_file):
    """PROTOCOL.md, EVENTS: a poll already waiting when PostgreSQL dies
    needs no database to wait, and ends as any wait does (no row at its
    end); a poll that starts while the database is down is answered
    UNAVAILABLE at once, not after its wait."""
    from helpers import kill_postgres

    from anbao.storage import embedded
    from anbao_client import Unavailable

    data, _, dsn = own_pg
    server = await Anbao(dsn, tokens_file, Limits.of(db_probe_interval_ms=100)).start()
    try:
        app = await server.client("app", timeout_ms=20_000)
        head = (await app.events_page(0, limit=1)).head
        waiting = asyncio.ensure_future(app.events_page(head, limit=10, wait_ms=2_000))
        await asyncio.sleep(0.3)  # it waits
        kill_postgres(data / "pgdata")
        started = time.monotonic()
        page = await waiting
        assert page.events == [] and page.next_cursor == head and page.head == head
        assert time.monotonic() - started < 5
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await app.events_page(head, limit=10, wait_ms=15_000)
        assert time.monotonic() - started < 10, "refused at once, not after its wait"
        await asyncio.get_running_loop().run_in_executor(None, embedded.start, data)
    finally:
        await server.stop()


_SENT_EVENTS = (
    "SELECT e.kind, e.user_id, e.packet_id, e.seq, e.count, e.amount_cents, e.at = t.created_at AS at_transfer"
    " FROM event_log e JOIN transfers t ON t.transfer_id = e.transfer_id WHERE e.transfer_id = $1"
)


async def test_a_send_batch_writes_its_sent_events_and_the_trigger_those_of_any_other_send(anbao):
    """Migration 0018: a SEND batch writes its SENT events itself, one
    statement for the batch, and tells the transfers' trigger to skip them.
    A SEND transfer written without saying so (the batch function's text
    before 0018, during an upgrade) still gets the trigger's event, the same
    event."""
    admin = await anbao.client("admin")
    senders = await funded_users(admin, 1, 3, 100_000)
    members = await funded_users(admin, 100, 5)
    await admin.group_create(77, [senders[0], *members])
    sent = await asyncio.gather(
        admin.send(senders[0], 5_000, 4, group=77),
        admin.send(senders[1], 777, 2),
        admin.send(senders[2], 900, 3, members=members[:3]),
    )
    conn = await asyncpg.connect(anbao.dsn)
    try:
        for s, p in zip(senders, sent, strict=True):
            t = await conn.fetchrow(
                "SELECT transfer_id, debit_account, credit_account, amount_cents FROM transfers"
                " WHERE kind = 3 AND packet_id = $1",
                p.packet_id,
            )
            batch_event = await conn.fetch(_SENT_EVENTS, t["transfer_id"])
            shares = await conn.fetchval("SELECT share_count FROM packets WHERE packet_id = $1", p.packet_id)
            assert [tuple(r) for r in batch_event] == [(1, s, p.packet_id, 0, shares, t["amount_cents"], True)]
            for said, events in ((False, 1), (True, 0)):
                probe = conn.transaction()  # rolled back: the books stay as they were
                await probe.start()
                try:
                    if said:
                        await conn.execute("SELECT set_config('anbao.sent_events', 'batch', true)")
                    again = await conn.fetchval(
                        "INSERT INTO transfers (kind, debit_account, credit_account, amount_cents, packet_id)"
                        " VALUES (3, $1, $2, $3, $4) RETURNING transfer_id",
                        t["debit_account"],
                        t["credit_account"],
                        t["amount_cents"],
                        p.packet_id,
                    )
                    by_trigger = [tuple(r) for r in await conn.fetch(_SENT_EVENTS, again)]
                    assert by_trigger == [tuple(r) for r in batch_event][:events]
                finally:
                    await probe.rollback()
    finally:
        await conn.close()
    await anbao.assert_audit_clean()
