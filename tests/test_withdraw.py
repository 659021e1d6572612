"""WITHDRAW: money leaves a wallet for the outside world, admin scope only,
never below zero, exactly once per idempotency key."""

import asyncio
import os

import pytest
from helpers import funded_users

from anbao_client import (
    AlreadyClaimed,
    Forbidden,
    IdempotencyConflict,
    InsufficientFunds,
    Invalid,
    Mode,
    SoldOut,
    TransferKind,
    UnknownUser,
)


async def test_withdraw_moves_money_out(anbao):
    admin = await anbao.client("admin")
    (a,) = await funded_users(admin, 1, 1, 10_000)
    w = await admin.withdraw(a, 2_500)
    assert w.balance_cents == 7_500 and await admin.balance(a) == 7_500
    everything = await admin.withdraw(a, 7_500)
    assert everything.balance_cents == 0 and everything.transfer_id > w.transfer_id
    st = await admin.statement(a)
    assert [(e.kind, e.amount_cents) for e in st.entries] == [
        (TransferKind.WITHDRAW, -7_500),
        (TransferKind.WITHDRAW, -2_500),
        (TransferKind.DEPOSIT, 10_000),
    ]
    report = await anbao.assert_audit_clean()
    assert report.counts["withdrawn_cents"] == 10_000


async def test_withdraw_refusals_change_nothing(anbao):
    admin = await anbao.client("admin")
    app = await anbao.client("app")
    (a,) = await funded_users(admin, 1, 1, 1_000)
    with pytest.raises(InsufficientFunds):
        await admin.withdraw(a, 1_001)
    with pytest.raises(UnknownUser):
        await admin.withdraw(99, 1)
    with pytest.raises(Forbidden):
        await app.withdraw(a, 1)
    with pytest.raises(Invalid):
        await admin.withdraw(a, anbao.limits.rules.max_withdraw_cents + 1)
    for bad in (0, -1):
        with pytest.raises(Invalid):
            await admin.withdraw(a, bad)
    assert await admin.balance(a) == 1_000
    assert await anbao.fetchval("SELECT count(*) FROM transfers WHERE kind = 2") == 0
    await anbao.assert_audit_clean()


async def test_withdraw_idempotency(anbao):
    admin = await anbao.client("admin")
    a, b = await funded_users(admin, 1, 2, 1_000)
    key = os.urandom(16)
    first = await admin.withdraw(a, 300, key=key)
    assert await admin.withdraw(a, 300, key=key) == first
    assert await admin.balance(a) == 700
    for other in (dict(user_id=a, amount_cents=301), dict(user_id=b, amount_cents=300)):
        with pytest.raises(IdempotencyConflict):
            await admin.withdraw(key=key, **other)
    with pytest.raises(IdempotencyConflict):  # the same key on another operation
        await admin.deposit(a, 300, key=key)
    # A refusal is the first answer too: a retry does not withdraw later money.
    key2 = os.urandom(16)
    with pytest.raises(InsufficientFunds):
        await admin.withdraw(b, 5_000, key=key2)
    await admin.deposit(b, 10_000)
    with pytest.raises(InsufficientFunds):
        await admin.withdraw(b, 5_000, key=key2)
    assert await admin.balance(a) == 700 and await admin.balance(b) == 11_000
    await anbao.assert_audit_clean()


async def test_concurrent_duplicate_withdrawals_move_money_once(anbao):
    admin = await anbao.client("admin")
    (a,) = await funded_users(admin, 1, 1, 10_000)
    key = os.urandom(16)
    clients = [await anbao.client("admin") for _ in range(5)]
    answers = await asyncio.gather(*(c.withdraw(a, 4_000, key=key) for c in clients for _ in range(4)))
    assert len(set(answers)) == 1 and answers[0].balance_cents == 6_000
    assert await admin.balance(a) == 6_000
    assert await anbao.fetchval("SELECT count(*) FROM transfers WHERE kind = 2") == 1
    await anbao.assert_audit_clean()


async def test_concurrent_withdrawals_sends_and_grabs_never_overdraw(anbao):
    """One wallet, hammered from several connections at once: withdrawals
    and sends take money out while grabs put money in. Each withdrawal
    either lands whole or is INSUFFICIENT_FUNDS; the balance never goes
    below zero and ends equal to its transfers."""
    admin = await anbao.client("admin")
    hot, sender = await funded_users(admin, 1, 2)
    await admin.deposit(hot, 5_000)
    await admin.deposit(sender, 100_000)
    others = await funded_users(admin, 100, 30)
    # Packets the hot wallet grabs from while it is being drained.
    # Fixed shares, so at most 5,000 + 10 x 1,000 can ever be taken out of 23,000 asked for.
    incoming = [await admin.send(sender, 2_000, 2, mode=Mode.FIXED, members=[hot, others[i]]) for i in range(10)]
    clients = [await anbao.client("admin") for _ in range(6)]
    outcomes = {"withdrawn": 0, "sent": 0, "grabbed": 0, "refused": 0}

    async def withdraw(i):
        try:
            w = await clients[i % 6].withdraw(hot, 700)
            assert w.balance_cents >= 0
            outcomes["withdrawn"] += 700
        except InsufficientFunds:
            outcomes["refused"] += 1

    async def send(i):
        try:
            await clients[i % 6].send(hot, 900, 3, members=others[:5])
            outcomes["sent"] += 900
        except InsufficientFunds:
            outcomes["refused"] += 1

    async def grab(i):
        try:
            g = await clients[i % 6].grab(incoming[i].packet_id, hot)
            outcomes["grabbed"] += g.amount_cents
        except (SoldOut, AlreadyClaimed):
            raise AssertionError("the hot wallet's grab must land") from None

    await asyncio.gather(
        *[withdraw(i) for i in range(20)], *[send(i) for i in range(10)], *[grab(i) for i in range(10)]
    )
    assert outcomes["refused"] >= 8, "23,000 asked of at most 15,000: most of the surplus is refused"
    final = await admin.balance(hot)
    assert final >= 0
    assert final == 5_000 + outcomes["grabbed"] - outcomes["withdrawn"] - outcomes["sent"]
    await anbao.assert_audit_clean()
