"""Admission under faults, on real processes: a memcached that closes its
connections mid-reply (aio-libs/aiomcache#502) must cost the workers
nothing but the filter, and no worker may ever tell a share holder
SOLD_OUT, whichever worker a retry reaches."""

import asyncio
import time

from helpers import APP_TOKEN
from served import Grabber, Hung, audit_clean, claims_of, setup_packet, steered_client, storm

from anbao.admission import MemcachedPermits
from anbao.config import AdmissionTuning
from anbao_client import Client, SoldOut, Unavailable
from anbao_client.errors import AlreadyClaimed, Busy, InDoubt, NotEligible, RequestTimeout
from anbao_client.routing import local_port_for, owner_of


class HalfReplyMemcached:
    """A memcached that reads one command (and its data block, for storage
    commands), writes the first byte of a reply without its CRLF, and closes
    the connection: the fault that made aiomcache spin forever."""

    STORAGE = (b"set", b"add", b"replace", b"append", b"prepend", b"cas")

    def __init__(self):
        self.commands: list[bytes] = []
        self.server = None
        self.port = 0

    async def start(self) -> "HalfReplyMemcached":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader, writer):
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            if line.split(b" ", 1)[0] in self.STORAGE:
                await asyncio.wait_for(reader.readline(), 5)
            self.commands.append(line.split(b" ", 1)[0])
            writer.write(b"1")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()


async def test_memcached_closing_mid_reply_fails_open_in_process():
    """The permits object alone: every command fails fast and admits, and
    the event loop keeps turning meanwhile (before the fix, the first decr
    never returned and froze the loop)."""
    fake = await HalfReplyMemcached().start()
    permits = MemcachedPermits(
        "127.0.0.1", fake.port, 0, AdmissionTuning(memcached_pool_size=2, memcached_timeout_ms=200)
    )
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    t = asyncio.ensure_future(ticker())
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(20):
            assert await permits.admit(1000 + i) is True
        permits.seed(7, 10)
        permits.reseed(7, 10)
        permits.give_back(7)
        await asyncio.sleep(0.1)
        elapsed = loop.time() - t0
        assert elapsed < 5, "each failing command is bounded by its timeout"
        assert ticks > 10, "the event loop kept running"
        assert permits.errors >= 20
        assert fake.commands.count(b"decr") >= 20
    finally:
        t.cancel()
        await permits.close()
        await fake.stop()


async def test_memcached_closing_mid_reply_never_freezes_a_worker(serve, fresh_dsn):
    """`anbao serve` pointed at the half-reply memcached: the owner's seed and
    reseed and the relaying worker's decr all hit it; both workers keep
    answering PING, and a storm relayed through the non-owner sells the
    packet out exactly, admission failing open."""
    fake = await HalfReplyMemcached().start()
    try:
        s = serve(workers=2, extra=["--memcached", f"127.0.0.1:{fake.port}"])
        admin, users, sent = await setup_packet(s.port, 120, 6_000, 60)
        owner = owner_of(sent.packet_id, 2)
        other = 1 - owner
        # Unaware clients steered to the non-owner: every grab is admitted
        # (decr) there, then relayed.
        grabbers = [
            Grabber(s.port, APP_TOKEN, routed=False, local_port_for=lambda: local_port_for(other, 2)) for _ in range(6)
        ]
        storm_task = asyncio.ensure_future(storm(s.port, sent.packet_id, users, grabbers, timeout_s=60))
        await asyncio.sleep(1.2)  # past the owner's first reseed (every second)
        for w in (0, 1):
            c = await steered_client(s.port, APP_TOKEN, w, 2, timeout_ms=3_000)
            assert await c.ping() == w, f"worker {w} stopped answering"
            await c.close()
        won, outcomes = await storm_task
        assert len(won) == 60 and outcomes.count("sold_out") == 60 and "gave_up" not in outcomes
        assert await claims_of(fresh_dsn, sent.packet_id) == {u: (g.seq, g.amount_cents) for u, g in won.items()}
        stats = [await c.stats() for c in admin.clients]
        assert stats[other]["admission_errors"] > 0 and stats[other]["forwarded"] > 0
        assert {b"decr", b"add"} <= set(fake.commands)
        for g in grabbers:
            await g.close()
        await admin.close()
        assert s.stop() == 0
        await audit_clean(fresh_dsn)
    finally:
        await fake.stop()


class Answers:
    """Every answer each user got, in order, as ("share", (seq, amount)),
    ("sold_out",), ("not_eligible",) or ("no answer", kind)."""

    def __init__(self):
        self.by_user: dict[int, list] = {}

    async def grab(self, client: Client, packet_id: int, user_id: int):
        try:
            g = await client.grab(packet_id, user_id)
            a = ("share", (g.seq, g.amount_cents))
        except AlreadyClaimed as e:
            a = ("share", (e.grabbed.seq, e.grabbed.amount_cents))
        except SoldOut:
            a = ("sold_out",)
        except NotEligible:
            a = ("not_eligible",)
        except (RequestTimeout, Unavailable, InDoubt, Busy) as e:
            a = ("no answer", type(e).__name__)
        self.by_user.setdefault(user_id, []).append(a)
        return a

    def final(self, user_id):
        got = [a for a in self.by_user.get(user_id, []) if a[0] != "no answer"]
        return got[-1] if got else None


async def settle_holders(answers: Answers, client: Client, packet_id: int, holders: list[int], timeout_s: float):
    """Retries every holder through `client` until each has a final answer."""
    deadline = time.monotonic() + timeout_s
    left = list(holders)
    while left and time.monotonic() < deadline:
        await asyncio.gather(*(answers.grab(client, packet_id, u) for u in left))
        left = [u for u in left if answers.by_user[u][-1][0] == "no answer"]
        if left:
            await asyncio.sleep(0.1)
    assert not left, f"{len(left)} holders never got an answer"


async def committed_claims(dsn: str, packet_id: int, count: int, timeout_s: float = 20) -> dict:
    """The packet's claims once all `count` are committed (bounded wait)."""
    deadline = time.monotonic() + timeout_s
    while True:
        in_db = await claims_of(dsn, packet_id)
        if len(in_db) >= count or time.monotonic() > deadline:
            return in_db
        await asyncio.sleep(0.05)


def assert_holders_exact(answers: Answers, in_db: dict, holders: list[int]):
    for u in holders:
        assert u in in_db, f"holder {u} has no claim"
        told = [a for a in answers.by_user[u] if a[0] != "no answer"]
        assert ("sold_out",) not in told, f"user {u} holds share {in_db[u]} and was told SOLD_OUT: {told}"
        assert all(a == ("share", in_db[u]) for a in told), (u, told, in_db[u])


async def test_a_share_holder_retrying_through_a_non_owner_gets_the_share(serve, fresh_dsn):
    """The database stalls with every share taken but not committed. The
    holders' first grabs (through the owner) time out; so do other users'
    grabs relayed by the non-owner: the owner says SOLD_OUT only once the
    last shares are durable (a refusal is final, and a failed batch would
    free them). The holders retry through the non-owner: each must get
    their share, never SOLD_OUT (before, 385-550 a run did)."""
    s = serve(workers=2)
    admin, users, sent = await setup_packet(s.port, 60, 3_000, 30)
    pid = sent.packet_id
    owner = owner_of(pid, 2)
    other = 1 - owner
    holders, others = users[:30], users[30:]
    via_owner = await steered_client(s.port, APP_TOKEN, owner, 2, timeout_ms=1_000)
    via_other = await steered_client(s.port, APP_TOKEN, other, 2, timeout_ms=1_000)
    answers = Answers()
    async with Hung(fresh_dsn) as hung:
        first = asyncio.ensure_future(asyncio.gather(*(answers.grab(via_owner, pid, u) for u in holders)))
        await asyncio.sleep(0.3)  # the owner has taken every share; none is committed
        await asyncio.gather(*(answers.grab(via_other, pid, u) for u in others))
        assert all(answers.by_user[u] == [("no answer", "RequestTimeout")] for u in others), answers.by_user
        await first
        assert all(answers.by_user[u] == [("no answer", "RequestTimeout")] for u in holders), answers.by_user
        # Retries through the non-owner while the database still hangs.
        await asyncio.gather(*(answers.grab(via_other, pid, u) for u in holders))
        await hung.resume()
    await settle_holders(answers, via_other, pid, holders, timeout_s=30)
    in_db = await committed_claims(fresh_dsn, pid, 30)
    assert len(in_db) == 30 and set(in_db) == set(holders)
    assert_holders_exact(answers, in_db, holders)
    # Once the non-owner holds the final claim list, it answers everyone
    # exactly, the sender included, without a hop.
    for _ in range(40):  # bounded: 2 s
        st = await via_other.stats()
        if st["final_sets_loaded"]:
            break
        await answers.grab(via_other, pid, others[0])
        await asyncio.sleep(0.05)
    assert st["final_sets_loaded"] >= 1
    hits = st["final_cache_hits"]
    assert await answers.grab(via_other, pid, holders[0]) == ("share", in_db[holders[0]])
    assert await answers.grab(via_other, pid, others[1]) == ("sold_out",)
    assert await answers.grab(via_other, pid, 1) == ("not_eligible",), "the sender may not grab their own packet"
    assert (await via_other.stats())["final_cache_hits"] == hits + 3
    for c in (via_owner, via_other):
        await c.close()
    await admin.close()
    assert s.stop() == 0
    await audit_clean(fresh_dsn)


async def test_a_spent_admission_counter_never_tells_a_holder_sold_out(serve, fresh_dsn):
    """Admission alone: every share taken by grabs relayed through the
    non-owner (each holding a permit) while the database stalls; the
    holders' retries, each holding a permit while it waits for the commit,
    spend the counter. The retries that find no permit were told SOLD_OUT
    ("every share is taken or held by a grab in flight"). Now they wait for
    the final claim list or ask the owner, and get their share."""
    s = serve(workers=2)  # the counter: 20 shares + 16 slack
    admin, users, sent = await setup_packet(s.port, 20, 2_000, 20)
    pid = sent.packet_id
    other = 1 - owner_of(pid, 2)
    holders = users
    via_other = await steered_client(s.port, APP_TOKEN, other, 2, timeout_ms=1_000)
    answers = Answers()
    async with Hung(fresh_dsn) as hung:
        await asyncio.gather(*(answers.grab(via_other, pid, u) for u in holders))
        assert all(answers.by_user[u] == [("no answer", "RequestTimeout")] for u in holders)
        # Each retry that finds a permit holds it until the owner answers
        # (after the commit): two rounds spend the counter.
        for _ in range(2):
            await asyncio.gather(*(answers.grab(via_other, pid, u) for u in holders))
        await hung.resume()
    await settle_holders(answers, via_other, pid, holders, timeout_s=30)
    in_db = await committed_claims(fresh_dsn, pid, 20)
    assert len(in_db) == 20
    assert_holders_exact(answers, in_db, holders)
    st = await via_other.stats()
    assert st["admission_rejects"] > 0, "the counter was spent: the retries met it"
    await via_other.close()
    await admin.close()
    assert s.stop() == 0
    await audit_clean(fresh_dsn)
