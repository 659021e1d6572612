"""SEND, DEPOSIT and WITHDRAW by group commit (engine/batches.py,
migrations 0012 and 0013): one wallet raced by every kind of write, a SEND
that spends a grab still waiting for its roll-up, kill -9 of the workers
and of PostgreSQL with batches in flight (nothing acknowledged lost,
nothing doubled, nothing overdrawn, a retry with the same key answered the
first answer), and an overload answered BUSY without one operation's
backlog holding up another's."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import asyncpg
import pytest
from helpers import ADMIN_TOKEN, ROLLUP_LOCK_KEY, Anbao, Raw, funded_users, kill_postgres
from polling import eventually
from served import RETRYABLE, audit_clean, restarted

from anbao.config import Limits
from anbao.storage import embedded
from anbao_client import Client, InsufficientFunds, wire
from anbao_client.errors import ConnectionLost
from anbao_client.wire import Op, Status

MAX_WAIT_S = 60.0


async def _one_wallet_race(anbao: Anbao, start_cents: int, grab_cents: int):
    admin = await anbao.client("admin")
    app = await anbao.client("app")
    (a, b) = await funded_users(admin, 1, 2)
    await admin.deposit(a, start_cents)
    await admin.deposit(b, grab_cents)
    gift = await admin.send(b, grab_cents, 1, to_user=a)

    async def spend(i: int):
        try:
            if i % 2:
                await admin.withdraw(a, 500)
            else:
                await app.send(a, 500, 1)
            return 500
        except InsufficientFunds:
            return 0

    spent = await asyncio.gather(app.grab(gift.packet_id, a), *(spend(i) for i in range(60)))
    return admin, a, sum(spent[1:])


@pytest.mark.parametrize("limits", [Limits()])
async def test_one_wallet_raced_by_sends_withdrawals_and_a_grab_credit(anbao):
    """60 SENDs and WITHDRAWs of 500 on one wallet of 10,000, racing a grab
    that credits it 3,000: never overdrawn, every cent accounted for."""
    admin, a, spent = await _one_wallet_race(anbao, 10_000, 3_000)
    assert 10_000 <= spent <= 13_000
    assert await admin.balance(a) == 13_000 - spent >= 0
    await anbao.assert_audit_clean()


@pytest.mark.parametrize("limits", [Limits()])
async def test_send_spends_a_grab_still_waiting_for_its_rollup(anbao, fresh_dsn):
    """The roll-up held back: a wallet's only money is a grab committed but
    not posted. A SEND of it is decided once that grab is posted (settled
    first), not refused; a WITHDRAW of more than all is refused."""
    admin = await anbao.client("admin")
    (a, b) = await funded_users(admin, 1, 2)
    await admin.deposit(b, 3_000)
    gift = await admin.send(b, 3_000, 1, to_user=a)
    holder = await asyncpg.connect(fresh_dsn)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", ROLLUP_LOCK_KEY)
        await admin.grab(gift.packet_id, a)
        assert await admin.balance(a) == 3_000  # posted 0 + pending 3,000
        assert await holder.fetchval("SELECT balance_cents FROM accounts WHERE kind = 1 AND owner_id = $1", a) == 0
        send = asyncio.ensure_future(admin.send(a, 2_000, 2))
        await asyncio.sleep(0.3)
        assert not send.done(), "it waits for the grab to be posted"
        await holder.execute("SELECT pg_advisory_unlock($1)", ROLLUP_LOCK_KEY)
        sent = await asyncio.wait_for(send, 10)
        assert sent.sender_balance_cents == 1_000
        with pytest.raises(InsufficientFunds):
            await admin.withdraw(a, 1_001)
        assert (await admin.withdraw(a, 1_000)).balance_cents == 0
    finally:
        await holder.close()
    await anbao.assert_audit_clean()


class KeyedWriter:
    """Sends keyed DEPOSITs and SENDs, reconnecting and retrying each with
    its own key until it has a definite answer; keeps the first one."""

    def __init__(self, port: int, token: str):
        self.port, self.token = port, token
        self.client: Client | None = None
        self.answers: dict[bytes, object] = {}

    async def _client(self) -> Client:
        if self.client is None:
            self.client = await Client.connect("127.0.0.1", self.port, self.token, timeout_ms=3_000)
        return self.client

    async def call(self, key: bytes, op: str, *args, deadline: float):
        while time.monotonic() < deadline:
            try:
                c = await self._client()
                if op == "deposit":
                    answer = await c.deposit(*args, key=key)
                else:
                    answer = await c.send(*args, key=key)
                self.answers.setdefault(key, answer)
                return answer
            except RETRYABLE as e:
                if self.client is not None and isinstance(e, ConnectionLost | OSError):
                    await self.client.close()
                    self.client = None
                await asyncio.sleep(0.05)
        raise AssertionError(f"{op} {args} unanswered past the deadline")

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


async def _writes_through_a_fault(port: int, users: list[int], fault, per_user: int = 8):
    """Each user gets per_user DEPOSITs of 1,000..1,999 and makes per_user
    SENDs of 500..999, all keyed, from 8 writers at once; fault() runs once
    a third are answered. Then every key is sent again: the same answer."""
    rng = random.Random(7)
    plan = []
    for u in users:
        for _ in range(per_user):
            plan.append((os.urandom(16), "deposit", (u, rng.randint(1_000, 1_999))))
            plan.append((os.urandom(16), "send", (u, rng.randint(500, 999), 2)))
    rng.shuffle(plan)
    writers = [KeyedWriter(port, ADMIN_TOKEN) for _ in range(8)]
    deadline = time.monotonic() + MAX_WAIT_S
    answered: list[int] = []

    async def run(i: int) -> None:
        for key, op, args in plan[i :: len(writers)]:
            await writers[i].call(key, op, *args, deadline=deadline)
            answered.append(1)

    async def trigger():
        while len(answered) < len(plan) // 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        await fault()

    await asyncio.gather(*(run(i) for i in range(len(writers))), trigger())
    first = {k: v for w in writers for k, v in w.answers.items()}
    assert len(first) == len(plan)
    for i in range(len(writers)):  # the same key again, through any writer
        for key, op, args in plan[i :: len(writers)]:
            assert await writers[(i + 1) % len(writers)].call(key, op, *args, deadline=deadline) == first[key]
    for w in writers:
        await w.close()
    return plan, first


async def _assert_books(dsn: str, users: list[int], start_cents: int, plan, first) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        deposits = await conn.fetchval("SELECT count(*) FROM transfers WHERE kind = 1 AND amount_cents < 2000")
        packets = await conn.fetchval("SELECT count(*) FROM packets")
        assert deposits == sum(op == "deposit" for _, op, _ in plan), "a deposit lost or doubled"
        assert packets == sum(op == "send" for _, op, _ in plan), "a send lost or doubled"
        sent_ids = {first[k].packet_id for k, op, _ in plan if op == "send"}
        assert len(sent_ids) == packets
        for u in users:
            want = start_cents + sum(a[1] for _, op, a in plan if op == "deposit" and a[0] == u)
            want -= sum(a[1] for _, op, a in plan if op == "send" and a[0] == u)
            got = await conn.fetchval("SELECT balance_cents FROM accounts WHERE kind = 1 AND owner_id = $1", u)
            assert got == want >= 0, (u, got, want)
    finally:
        await conn.close()
    await audit_clean(dsn)


async def _hold_wallets(conn: asyncpg.Connection, users: list[int]) -> None:
    """Holds the wallets' rows, so the batches that reach them wait inside
    PostgreSQL: the fault lands with batches in flight."""
    await conn.execute("BEGIN")
    await conn.execute("SELECT 1 FROM accounts WHERE kind = 1 AND owner_id = ANY($1) FOR NO KEY UPDATE", users)


async def _batches_waiting(conn: asyncpg.Connection) -> bool:
    # Inside a transaction pg_stat_activity is read once and then cached:
    # a poll from the holder's transaction must ask for a fresh reading.
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%_batch(%'"
        )
    )


async def test_kill_9_workers_mid_batches_of_sends_and_deposits(serve, fresh_dsn):
    s = serve(workers=2)
    admin = await Client.connect("127.0.0.1", s.port, ADMIN_TOKEN)
    users = await funded_users(admin, 1, 24, 5_000)
    await admin.close()
    holder = await asyncpg.connect(fresh_dsn)
    victims = list(s.run_info()["workers"].values())

    async def fault():
        await _hold_wallets(holder, users)
        await eventually(lambda: _batches_waiting(holder), what="a batch in flight at the kill")
        for pid in victims:
            os.kill(int(pid), signal.SIGKILL)
        await asyncio.sleep(0.2)
        await holder.execute("ROLLBACK")

    try:
        plan, first = await _writes_through_a_fault(s.port, users, fault)
    finally:
        await holder.close()
    assert (await restarted(s, 2))["restarts"] >= 2
    assert s.stop() == 0
    await _assert_books(fresh_dsn, users, 5_000, plan, first)


async def test_kill_9_postgres_mid_batches_of_sends_and_deposits(own_pg, tokens_file):
    data, _, dsn = own_pg
    server = await Anbao(dsn, tokens_file, Limits.of(db_probe_interval_ms=100)).start()
    try:
        admin = await server.client("admin")
        users = await funded_users(admin, 1, 24, 5_000)
        holder = await asyncpg.connect(dsn)

        async def fault():
            await _hold_wallets(holder, users)
            await asyncio.sleep(0.3)
            kill_postgres(data / "pgdata")
            await asyncio.sleep(0.5)
            await asyncio.get_running_loop().run_in_executor(None, embedded.start, data)

        plan, first = await _writes_through_a_fault(server.port, users, fault)
    finally:
        await server.stop()
    await _assert_books(dsn, users, 5_000, plan, first)


@pytest.mark.parametrize("limits", [Limits.of(max_handlers_per_operation=8)])
async def test_overload_is_answered_busy_and_never_holds_up_another_operation(anbao, fresh_dsn):
    """SENDs stuck behind a held wallet: past 8 handled at once, a SEND is
    answered BUSY at once, and BALANCE is still answered meanwhile."""
    admin = await anbao.client("admin")
    (a,) = await funded_users(admin, 1, 1, 100_000)
    holder = await asyncpg.connect(fresh_dsn)
    raw = await Raw.open(anbao.port)
    try:
        await _hold_wallets(holder, [a])
        raw.send(b"".join(wire.send(rid, os.urandom(16), a, 100, 1, 1, 0, 0, [], "") for rid in range(10, 40)))
        busy = await raw.answers(22, timeout_s=5)
        assert [r.status for r in busy] == [Status.BUSY] * 22 and all(r.opcode == Op.SEND for r in busy)
        t0 = time.monotonic()
        assert await asyncio.wait_for(admin.balance(a), 2) == 100_000
        print(f"BALANCE behind 8 held SENDs: {(time.monotonic() - t0) * 1000:.1f} ms")
        await holder.execute("ROLLBACK")
        sent = await raw.answers(8, timeout_s=10)
        assert [r.status for r in sent] == [Status.OK] * 8
        assert (await admin.stats())["busy_answers"] == 22
    finally:
        raw.close()
        await holder.close()
    assert await admin.balance(a) == 100_000 - 8 * 100
    await anbao.assert_audit_clean()


@pytest.mark.parametrize("limits", [Limits()])
async def test_a_send_never_waits_for_another_senders_locked_wallet(anbao, fresh_dsn):
    """One sender's wallet held by another transaction (as a roll-up holds
    the wallets it credits): a SEND by another sender in the same batch is
    answered at once; the held one is put back until patient, and then its
    batch, waiting for the wallet, lets another batch go at once, however
    few SENDs wait; it is decided once the wallet is free."""
    admin = await anbao.client("admin")
    (a, b) = await funded_users(admin, 1, 2, 10_000)
    holder = await asyncpg.connect(fresh_dsn)
    try:
        await _hold_wallets(holder, [a])
        held = asyncio.ensure_future(admin.send(a, 100, 1))
        free = asyncio.ensure_future(admin.send(b, 100, 1))
        assert (await asyncio.wait_for(free, 5)).sender_balance_cents == 9_900
        await eventually(lambda: _batches_waiting(holder), what="the patient batch waiting inside PostgreSQL")
        assert not held.done()
        assert (await admin.stats())["send_put_back"] >= 1
        assert (await asyncio.wait_for(admin.send(b, 100, 1), 5)).sender_balance_cents == 9_800
        await holder.execute("ROLLBACK")
        assert (await asyncio.wait_for(held, 5)).sender_balance_cents == 9_900
    finally:
        await holder.close()
    await anbao.assert_audit_clean()


async def _hold_daily_row(conn: asyncpg.Connection, user_id: int) -> None:
    """Holds the sender's daily_sends row: a batch carrying that sender's
    SEND waits inside PostgreSQL (a non-patient batch skips only locked
    wallets), so one batch stays in flight as long as the test wants."""
    await conn.execute("BEGIN")
    assert await conn.fetchval("SELECT 1 FROM daily_sends WHERE user_id = $1 FOR UPDATE", user_id) == 1


@pytest.mark.parametrize("limits", [Limits.of(send_batch_overlap_min_requests=5)])
async def test_a_second_batch_goes_only_once_enough_requests_wait(anbao, fresh_dsn):
    """While one SEND batch is out, the SENDs that gather wait for it until
    send_batch_overlap_min_requests of them do: then a second batch carries
    them at once, the first still out."""
    admin = await anbao.client("admin")
    (a, *others) = await funded_users(admin, 1, 6, 10_000)
    await admin.send(a, 100, 1)  # a's daily_sends row
    holder = await asyncpg.connect(fresh_dsn)
    try:
        await _hold_daily_row(holder, a)
        stuck = asyncio.ensure_future(admin.send(a, 100, 1))
        await eventually(lambda: _batches_waiting(holder), what="the first batch waiting inside PostgreSQL")
        few = [asyncio.ensure_future(admin.send(u, 100, 1)) for u in others[:4]]
        await asyncio.sleep(0.5)
        assert not stuck.done() and not any(f.done() for f in few), "4 waiting: below the overlap bound"
        enough = asyncio.ensure_future(admin.send(others[4], 100, 1))
        answers = await asyncio.wait_for(asyncio.gather(*few, enough), 5)
        assert [x.sender_balance_cents for x in answers] == [9_900] * 5
        assert not stuck.done()
        await holder.execute("ROLLBACK")
        assert (await asyncio.wait_for(stuck, 5)).sender_balance_cents == 9_800
    finally:
        await holder.close()
    await anbao.assert_audit_clean()
