"""Idempotency wherever money moves: a retry returns the first answer and
moves nothing, the same key with other parameters is IDEMPOTENCY_CONFLICT,
and concurrent duplicates from several connections move money once.

DEPOSIT, SEND and WITHDRAW carry a client key, claimed by the primary key of
idempotency_keys. GRAB's key is (packet, user): see PROTOCOL.md."""

import asyncio
import os

import pytest
from helpers import funded_users

from anbao_client import AlreadyClaimed, IdempotencyConflict, InsufficientFunds


async def test_concurrent_duplicate_deposits_from_many_connections(anbao):
    admin = await anbao.client("admin")
    (a,) = await funded_users(admin, 1, 1)
    clients = [await anbao.client("admin") for _ in range(6)]
    keys = [os.urandom(16) for _ in range(5)]
    answers = await asyncio.gather(*(c.deposit(a, 1_000, key=k) for k in keys for c in clients))
    for i in range(5):
        assert len(set(answers[6 * i : 6 * i + 6])) == 1
    assert await admin.balance(a) == 5_000
    assert await anbao.fetchval("SELECT count(*) FROM transfers WHERE kind = 1") == 5
    await anbao.assert_audit_clean()


async def test_concurrent_same_key_different_parameters(anbao):
    """Many connections race one key with different amounts: exactly one
    request is performed; the others replay it (same amount) or are
    refused (other amounts), whichever way the race went."""
    admin = await anbao.client("admin")
    (a,) = await funded_users(admin, 1, 1)
    clients = [await anbao.client("admin") for _ in range(8)]
    key = os.urandom(16)
    results = await asyncio.gather(
        *(c.deposit(a, 100 + (i % 4), key=key) for i, c in enumerate(clients)), return_exceptions=True
    )
    done = [r for r in results if not isinstance(r, Exception)]
    assert all(isinstance(r, IdempotencyConflict) for r in results if isinstance(r, Exception))
    assert len(set(done)) == 1 and len(done) == 2  # the winner and its one same-amount twin
    balance = await admin.balance(a)
    assert balance in (100, 101, 102, 103) and balance == done[0].balance_cents
    await anbao.assert_audit_clean()


async def test_each_money_operation_refuses_a_reused_key(anbao):
    admin = await anbao.client("admin")
    a, b = await funded_users(admin, 1, 2, 10_000)
    k_dep, k_send, k_wd = (os.urandom(16) for _ in range(3))
    await admin.deposit(a, 500, key=k_dep)
    await admin.send(a, 600, 1, to_user=b, key=k_send)
    await admin.withdraw(a, 700, key=k_wd)
    balance = await admin.balance(a)
    conflicts = [
        admin.deposit(b, 500, key=k_dep),  # another user
        admin.send(a, 600, 1, to_user=b, greeting="x", key=k_send),  # another greeting
        admin.send(a, 600, 1, to_user=b, expiry_seconds=60, key=k_send),
        admin.withdraw(a, 701, key=k_wd),
        admin.deposit(a, 700, key=k_wd),  # another operation, same fields
        admin.withdraw(a, 500, key=k_dep),
    ]
    for call in conflicts:
        with pytest.raises(IdempotencyConflict):
            await call
    assert await admin.balance(a) == balance and await admin.balance(b) == 10_000
    await anbao.assert_audit_clean()


async def test_first_answers_survive_a_restart(anbao):
    admin = await anbao.client("admin")
    a, b = await funded_users(admin, 1, 2)
    k1, k2, k3 = (os.urandom(16) for _ in range(3))
    d = await admin.deposit(a, 5_000, key=k1)
    s = await admin.send(a, 1_000, 1, to_user=b, key=k2)
    with pytest.raises(InsufficientFunds):
        await admin.withdraw(a, 9_999, key=k3)
    await anbao.stop()
    await anbao.start()
    admin = await anbao.client("admin")
    assert await admin.deposit(a, 5_000, key=k1) == d
    assert await admin.send(a, 1_000, 1, to_user=b, key=k2) == s
    with pytest.raises(InsufficientFunds):
        await admin.withdraw(a, 9_999, key=k3)
    assert await admin.balance(a) == 4_000
    await anbao.assert_audit_clean()


async def test_concurrent_duplicate_grabs_from_many_connections(anbao):
    """GRAB's idempotency key is (packet, user): the same grab sent from 8
    connections at once lands once; every answer names the same share, one
    OK and the rest ALREADY_CLAIMED with the first answer's body."""
    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 100_000)
    users = await funded_users(admin, 100, 20)
    sent = await admin.send(sender, 10_000, 20)
    clients = [await anbao.client("app") for _ in range(8)]

    async def grab(c, u):
        try:
            return "ok", await c.grab(sent.packet_id, u)
        except AlreadyClaimed as e:
            return "again", e.grabbed

    results = await asyncio.gather(*(grab(c, u) for u in users for c in clients))
    for i, _ in enumerate(users):
        mine = results[8 * i : 8 * i + 8]
        assert [k for k, _ in mine].count("ok") == 1
        assert len({(g.amount_cents, g.seq, g.remaining_count) for _, g in mine}) == 1, (
            "every retry answers with the first answer's body"
        )
    assert await anbao.fetchval("SELECT count(*) FROM claims_all") == 20
    assert sum([await admin.balance(u) for u in users]) == 10_000
    await anbao.assert_audit_clean()
