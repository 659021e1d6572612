"""Idempotency wherever money moves: a retry returns the first answer and
moves nothing, the same key with other parameters is IDEMPOTENCY_CONFLICT,
and concurrent duplicates from several connections move money once.

DEPOSIT, SEND and WITHDRAW carry a client key, claimed by the primary key of
idempotency_keys. GRAB's key is (packet, user): see PROTOCOL.md."""

import asyncio
import json
import os

import pytest
from helpers import Anbao, database_at_version, funded_users

from anbao.auth import Caller, TokenBook
from anbao.config import Limits
from anbao.storage.domain import BatchOutcome, MoveRequest, Operation
from anbao.storage.idempotency import request_hash
from anbao.storage.ledger import Ledger
from anbao.storage.migrate import migrate
from anbao_client import AlreadyClaimed, Client, IdempotencyConflict, InsufficientFunds
from anbao_client.protocol import Scope


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


async def test_keys_are_scoped_to_the_caller(anbao):
    """Issue 18 item 7: an app's SEND refused under key K does not make an
    admin's DEPOSIT under K a conflict; each caller's K replays its own
    first answer, and a caller reusing its own K with other parameters
    still conflicts."""
    admin = await anbao.client("admin")
    app = await anbao.client("app")
    a, b = await funded_users(admin, 1, 2)
    key = os.urandom(16)
    with pytest.raises(InsufficientFunds):
        await app.send(a, 500, 1, to_user=b, key=key)
    deposited = await admin.deposit(a, 700, key=key)
    assert deposited.balance_cents == 700
    # Each replays its own answer under the same key.
    with pytest.raises(InsufficientFunds):
        await app.send(a, 500, 1, to_user=b, key=key)
    assert await admin.deposit(a, 700, key=key) == deposited
    # Within one caller the key still guards its parameters.
    with pytest.raises(IdempotencyConflict):
        await admin.withdraw(a, 700, key=key)
    with pytest.raises(IdempotencyConflict):
        await app.send(a, 400, 1, to_user=b, key=key)
    assert await admin.balance(a) == 700
    assert await anbao.fetchval("SELECT count(*) FROM idempotency_keys") == 2  # one key, two callers
    await anbao.assert_audit_clean()


async def test_tokens_named_alike_share_their_keys(fresh_dsn, tmp_path, limits):
    """A token's keys are its name's (the tokens file's `name`, by default
    its scope): a token rotated under the same name replays the old one's
    answers; a token of the same scope under another name does not see them."""
    tokens = tmp_path / "named.json"
    entries = [("shop", "admin", "tok-shop-old-0123456789"), ("shop", "admin", "tok-shop-new-0123456789")]
    entries.append(("games", "admin", "tok-games-0123456789"))
    tokens.write_text(json.dumps({"tokens": [{"name": n, "scope": s, "token": t} for n, s, t in entries]}))
    tokens.chmod(0o600)
    server = Anbao(fresh_dsn, tokens, limits)
    await server.start()
    try:
        old, new, games = [await Client.connect("127.0.0.1", server.port, t) for _, _, t in entries]
        try:
            (a,) = await funded_users(old, 1, 1)
            key = os.urandom(16)
            first = await old.deposit(a, 100, key=key)
            assert await new.deposit(a, 100, key=key) == first  # rotated: the same caller
            other = await games.deposit(a, 100, key=key)  # another caller: a deposit of its own
            assert other.transfer_id != first.transfer_id and other.balance_cents == 200
        finally:
            for c in (old, new, games):
                await c.close()
    finally:
        await server.stop()


def test_a_token_name_is_checked(tmp_path):
    tokens = tmp_path / "bad.json"
    tokens.write_text(json.dumps({"tokens": [{"name": "a\u0000b", "scope": "app", "token": "t" * 20}]}))
    with pytest.raises(ValueError, match="without NUL"):
        TokenBook.load(tokens)
    tokens.write_text(json.dumps({"tokens": [{"scope": "app", "token": "t" * 20}]}))
    assert TokenBook.load(tokens).caller_of(b"t" * 20) == Caller(Scope.APP, "app")  # unnamed: its scope's name


async def test_a_key_stored_before_keys_were_scoped_still_replays(pg, tokens_file):
    """A DEPOSIT acknowledged by a server of schema 13 (keys unscoped, 16
    bytes) replays after the upgrade to scoped keys (migration 0015), and
    its key still guards its parameters, for every caller."""
    dsn = await database_at_version(pg, f"v13_keys_{os.getpid()}", 13)
    ledger = await Ledger.open(dsn, 1)
    key = os.urandom(16)
    try:
        await ledger.register([1, 2])
        (first,) = await ledger.move_batch(
            Operation.DEPOSIT, [MoveRequest(key, request_hash(Operation.DEPOSIT, (1, 900)), 1, 900)]
        )
    finally:
        await ledger.close()
    assert first.outcome == BatchOutcome.RAN
    await migrate(dsn)
    server = Anbao(dsn, tokens_file, Limits())
    await server.start()
    try:
        admin = await server.client("admin")
        app = await server.client("app")
        again = await admin.deposit(1, 900, key=key)
        assert (again.balance_cents, again.transfer_id) == (900, first.answer["transfer_id"])
        with pytest.raises(IdempotencyConflict):
            await admin.deposit(1, 901, key=key)
        with pytest.raises(IdempotencyConflict):  # unscoped: one key for every caller, as it was
            await app.send(1, 100, 1, to_user=2, key=key)
        assert await admin.balance(1) == 900
        assert await server.fetchval("SELECT count(*) FROM idempotency_keys") == 1  # nothing claimed beside it
        await server.assert_audit_clean()
    finally:
        await server.stop()


async def test_concurrent_duplicate_sends_move_money_once(anbao):
    """The same SEND key from many connections at once: one packet, one
    debit, and every answer the first one."""
    admin = await anbao.client("admin")
    (sender,) = await funded_users(admin, 1, 1, 10_000)
    clients = [await anbao.client() for _ in range(8)]
    key = os.urandom(16)
    sent = await asyncio.gather(*(c.send(sender, 1_000, 4, key=key) for c in clients for _ in range(3)))
    assert len({(s.packet_id, s.sender_balance_cents, s.expires_at_ms) for s in sent}) == 1
    assert await admin.balance(sender) == 9_000
    assert await anbao.fetchval("SELECT count(*) FROM packets WHERE sender_id = $1", sender) == 1
    await anbao.assert_audit_clean()


async def test_a_send_key_stored_by_another_batch_meanwhile_fails_that_batch_whole(anbao):
    """A SEND batch stores its keys with their answers at its end. When
    another batch, still open, holds one of them (the same key reused for
    another sender's SEND: the same sender's would find its wallet held),
    the INSERT waits for it and then finds it: this batch fails whole
    (40001, nothing done), and run again it answers IDEMPOTENCY_CONFLICT."""
    import asyncpg

    from anbao.storage.domain import Audience
    from anbao.storage.packets import _SEND_BATCH

    admin = await anbao.client("admin")
    senders = await funded_users(admin, 1, 2, 10_000)
    key = os.urandom(16)

    def args(sender: int, packet_id: int) -> tuple:
        hash_ = request_hash(Operation.SEND, (sender, 700, 2))
        return (
            int(Operation.SEND),
            [key],
            [hash_],
            [packet_id],
            [sender],
            [700],
            [2],
            [1],
            [2**50],
            [int(Audience.OPEN)],
            [0],
            [],
            [0],
            [""],
            [False],
            1,
            0,
            None,
            None,
            20_000,
            False,
        )

    first, second = await asyncpg.connect(anbao.dsn), await asyncpg.connect(anbao.dsn)
    try:
        tx = first.transaction()
        await tx.start()
        [ran] = await first.fetch(_SEND_BATCH, *args(senders[0], 10**12 + 1))
        assert ran["outcome"] == BatchOutcome.RAN
        racing = asyncio.ensure_future(second.fetch(_SEND_BATCH, *args(senders[1], 10**12 + 2)))
        await asyncio.sleep(0.3)
        assert not racing.done(), "the second batch's INSERT waits for the first's key"
        await tx.commit()
        with pytest.raises(asyncpg.SerializationError):
            await asyncio.wait_for(racing, 10)
        [again] = await second.fetch(_SEND_BATCH, *args(senders[1], 10**12 + 3))
        assert (again["outcome"], again["refusal"]) == (BatchOutcome.CONFLICT, "IDEMPOTENCY_CONFLICT")
    finally:
        await first.close()
        await second.close()
    assert [await admin.balance(s) for s in senders] == [9_300, 10_000]
    await anbao.assert_audit_clean()
