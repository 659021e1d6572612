"""kill -9 of a packet's owner while grabs relayed through the other worker
are in flight. The kill lands while a batch is blocked inside its commit (a
lock on the claims table, released right after the kill), so the dead
owner's batch commits with nobody left to answer it: exactly the grabs
that were once answered UNAVAILABLE ("nothing moved") though they had
landed. Now the relaying worker sends them again to the owner's
replacement and passes on the definite answer; only if no owner comes back
in time does it answer IN_DOUBT, which the SDK retries by itself."""

import asyncio
import os
import signal
import time

import asyncpg
from helpers import APP_TOKEN
from polling import eventually
from served import audit_clean, claims_of, restarted, setup_packet, steered_client

from anbao_client import SoldOut, Unavailable, wire
from anbao_client.errors import AlreadyClaimed, InDoubt, RequestTimeout
from anbao_client.routing import local_port_for, owner_of
from anbao_client.wire import Status


async def lock_claims(dsn: str, packet_id: int, at_least: int):
    """Waits until `at_least` claims are committed, then locks the tables a
    claim lands in (inserts wait, reads do not). Returns the connection
    holding the lock and its transaction."""
    conn = await asyncpg.connect(dsn)
    for _ in range(1000):  # bounded: 5 s
        if await conn.fetchval("SELECT count(*) FROM claims_all WHERE packet_id = $1", packet_id) >= at_least:
            break
        await asyncio.sleep(0.005)
    tx = conn.transaction()
    await tx.start()
    await conn.execute("LOCK TABLE claims, grab_rollups IN SHARE ROW EXCLUSIVE MODE")
    return conn, tx


async def until_blocked(conn) -> None:
    """Until a grab batch's commit waits on the lock."""
    await eventually(
        lambda: conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE '%anbao_commit_grabs%'"
        ),
        5,
        "a batch blocked on the lock",
        0.005,
    )


async def until_backends_idle(conn, timeout_s: float = 5):
    """Until no backend of the database waits on a lock (the dead owner's
    batch has committed)."""

    async def idle():
        return not await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )

    await eventually(idle, timeout_s, "no backend waiting on a lock")


async def test_relayed_grabs_of_a_killed_owner_get_definite_answers(serve, fresh_dsn):
    s = serve(workers=2)
    admin, users, sent = await setup_packet(s.port, 400, 40_000, 200)
    pid = sent.packet_id
    owner = owner_of(pid, 2)
    other = 1 - owner
    victim = s.run_info()["workers"][str(owner)]
    clients = [await steered_client(s.port, APP_TOKEN, other, 2) for _ in range(8)]
    answers: dict[int, object] = {}

    async def grab_once(i, u):
        try:
            g = await clients[i % len(clients)].grab(pid, u)
            answers[u] = ("share", (g.seq, g.amount_cents))
        except AlreadyClaimed as e:
            answers[u] = ("share", (e.grabbed.seq, e.grabbed.amount_cents))
        except SoldOut:
            answers[u] = ("sold_out",)
        except (Unavailable, InDoubt, RequestTimeout) as e:
            answers[u] = (type(e).__name__,)

    # A first wave commits; the next batch is held by the lock while the
    # rest of the storm queues behind it; then the owner dies.
    await asyncio.gather(*(grab_once(i, u) for i, u in enumerate(users[:20])))
    conn, tx = await lock_claims(fresh_dsn, pid, 20)

    async def killer():
        try:
            await until_blocked(conn)
            await asyncio.sleep(0.1)
            os.kill(victim, signal.SIGKILL)
            await asyncio.sleep(0.02)
        finally:
            await tx.commit()  # the dead owner's blocked batch commits now
        await until_backends_idle(conn)
        await conn.close()

    await asyncio.gather(*(grab_once(i, u) for i, u in enumerate(users[20:])), killer())
    in_db = await claims_of(fresh_dsn, pid)
    assert len(answers) == len(users)
    landed_unanswered = [u for u in in_db if answers[u][0] != "share"]
    assert not landed_unanswered, (
        f"{len(landed_unanswered)} grabs landed but were answered {[answers[u] for u in landed_unanswered[:5]]}"
    )
    for u, a in answers.items():
        if a[0] == "share":
            assert in_db.get(u) == a[1], f"user {u} was told {a} but holds {in_db.get(u)}"
    stats = await clients[0].stats()
    assert stats["worker_id"] == other
    assert stats["relay_retries_by_peer"][str(owner)] > 0, "the kill should have caught relayed grabs in flight"
    info = await restarted(s)
    assert info["restarts"] >= 1
    for c in clients:
        await c.close()
    await admin.close()
    assert s.stop() == 0
    await audit_clean(fresh_dsn)


class RawGrabs:
    """GRABs on a bare connection (no SDK retries), to see the wire answers."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.frames = wire.FrameBuffer()

    @classmethod
    async def open(cls, port: int, worker: int, workers: int) -> "RawGrabs":
        for _ in range(20):
            try:
                r, w = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=("127.0.0.1", local_port_for(worker, workers))
                )
                break
            except OSError:
                continue
        raw = cls(r, w)
        w.write(wire.hello(1, APP_TOKEN.encode()))
        [h] = await raw.read(1)
        assert h.status == Status.OK and h.worker_id == worker
        return raw

    async def read(self, n: int, timeout_s: float = 10) -> list:
        got = []
        while len(got) < n:
            data = await asyncio.wait_for(self.reader.read(65536), timeout_s)
            assert data, "connection closed"
            got += self.frames.feed(data)
        return got


async def test_in_doubt_past_the_deadline_and_the_sdk_retries_it(serve, fresh_dsn):
    """No replacement comes (the supervisor is stopped): past the relay
    deadline, the grabs that reached the dead owner are answered IN_DOUBT
    and those that never left the relaying worker UNAVAILABLE. SDK calls
    retry IN_DOUBT by themselves and end with the definite answer once the
    supervisor brings the owner back."""
    s = serve(workers=2, extra=["--limit", "relay_retry_deadline_ms=500"])
    admin, users, sent = await setup_packet(s.port, 40, 4_000, 40)
    pid = sent.packet_id
    owner = owner_of(pid, 2)
    other = 1 - owner
    victim = s.run_info()["workers"][str(owner)]
    raw_users, sdk_users, late_users = users[:10], users[10:20], users[20:25]
    warmup = users[25:]
    sdk = await steered_client(s.port, APP_TOKEN, other, 2, timeout_ms=15_000)
    raw = await RawGrabs.open(s.port, other, 2)
    # A first batch commits, so the next one is the one we block.
    for u in warmup:
        await sdk.grab(pid, u)
    conn, tx = await lock_claims(fresh_dsn, pid, 0)
    try:
        raw.writer.write(b"".join(wire.grab(100 + i, pid, u) for i, u in enumerate(raw_users)))
        sdk_calls = [asyncio.ensure_future(sdk.grab(pid, u)) for u in sdk_users]
        await until_blocked(conn)
        await asyncio.sleep(0.2)  # every one of them is at the owner, waiting for the blocked commit
        os.kill(s.proc.pid, signal.SIGSTOP)  # no replacement for now
        os.kill(victim, signal.SIGKILL)
        await asyncio.sleep(0.05)
    finally:
        await tx.commit()
    try:
        await until_backends_idle(conn)
        t0 = time.monotonic()
        in_doubt = await raw.read(len(raw_users))
        waited = time.monotonic() - t0
        assert {r.status for r in in_doubt} == {Status.IN_DOUBT}, [
            (r.status, wire.error_message(r.body)) for r in in_doubt
        ]
        assert 0.2 < waited < 5, waited
        assert "may have landed" in wire.error_message(in_doubt[0].body)
        # A grab sent now never reaches an owner: UNAVAILABLE, nothing moved.
        raw.writer.write(b"".join(wire.grab(200 + i, pid, u) for i, u in enumerate(late_users)))
        late = await raw.read(len(late_users))
        assert {r.status for r in late} == {Status.UNAVAILABLE}
        assert not any(sdk_call.done() for sdk_call in sdk_calls), "the SDK keeps retrying IN_DOUBT"
    finally:
        os.kill(s.proc.pid, signal.SIGCONT)
    done = await asyncio.gather(*sdk_calls, return_exceptions=True)
    in_db = await claims_of(fresh_dsn, pid)
    for u, g in zip(sdk_users, done, strict=True):
        if isinstance(g, AlreadyClaimed):
            g = g.grabbed
        assert not isinstance(g, BaseException), f"user {u}: {g!r}"
        assert in_db.get(u) == (g.seq, g.amount_cents)
    assert not any(u in in_db for u in late_users), "UNAVAILABLE means nothing moved"
    # The raw users' grabs were in doubt; a retry gives each its definite answer.
    for u in raw_users:
        try:
            g = await sdk.grab(pid, u)
        except AlreadyClaimed as e:
            g = e.grabbed
        assert in_db.get(u, (g.seq, g.amount_cents)) == (g.seq, g.amount_cents)
    raw.writer.close()
    await sdk.close()
    await conn.close()
    await admin.close()
    assert s.stop() == 0
    await audit_clean(fresh_dsn)
