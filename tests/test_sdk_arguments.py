"""The SDK refuses a wrong argument itself, before anything is sent or
stored: TypeError for a wrong type, ValueError for a value the wire cannot
carry, each naming the argument; the connection stays usable, and nothing
is left pending to fail unseen at exit (issue 19, item 4)."""

import asyncio
import re
import sys

import pytest
from helpers import ADMIN_TOKEN, funded_users

from anbao_client import Client, Cluster, Invalid

# (call, the exception, the argument it names)
WRONG = [
    (lambda c: c.deposit(1, 1.5), TypeError, "amount_cents"),
    (lambda c: c.deposit(1, "100"), TypeError, "amount_cents"),
    (lambda c: c.deposit(1, True), TypeError, "amount_cents"),
    (lambda c: c.deposit(1, 2**63), ValueError, "amount_cents"),
    (lambda c: c.deposit(-1, 100), ValueError, "user_id"),
    (lambda c: c.deposit(1, 100, key=b"short"), ValueError, "key"),
    (lambda c: c.deposit(1, 100, key="0" * 16), TypeError, "key"),
    (lambda c: c.withdraw(1.0, 100), TypeError, "user_id"),
    (lambda c: c.balance([1]), TypeError, "user_id"),
    (lambda c: c.balance_detail(None), TypeError, "user_id"),
    (lambda c: c.register(5), TypeError, "user_ids"),
    (lambda c: c.register("1,2"), TypeError, "user_ids"),
    (lambda c: c.register({1: 2}), TypeError, "user_ids"),
    (lambda c: c.balance(list(range(10_000))), TypeError, "user_id must be an int, not list [0, 1, 2"),
    (lambda c: c.register([1, "2"]), TypeError, "user_ids[1]"),
    (lambda c: c.register([1, -2]), ValueError, "user_ids[1]"),
    (lambda c: c.send(1, 100, 2**32), ValueError, "count"),
    (lambda c: c.send(1, 1.5, 2), TypeError, "total_cents"),
    (lambda c: c.send(1, 100, 2, greeting=7), TypeError, "greeting"),
    (lambda c: c.send(1, 100, 2, members=[2, 3.0]), TypeError, "members[1]"),
    (lambda c: c.send(1, 100, 1, to_user="2"), TypeError, "to_user"),
    (lambda c: c.send(1, 100, 1, group=-7), ValueError, "group"),
    (lambda c: c.send(1, 100, 1, to_user=2, group=7), ValueError, "one audience"),
    (lambda c: c.send(1, 100, 1, expiry_seconds=-1), ValueError, "expiry_seconds"),
    (lambda c: c.grab("1024", 2), TypeError, "packet_id"),
    (lambda c: c.grab(1024, 2.5), TypeError, "user_id"),
    (lambda c: c.packet(1024, claims_limit=70_000), ValueError, "claims_limit"),
    (lambda c: c.statement(1, limit=-1), ValueError, "limit"),
    (lambda c: c.sent(1, cursor="x"), TypeError, "cursor"),
    (lambda c: c.received(1, cursor=-1), ValueError, "cursor"),
    (lambda c: c.group_create(7, [1], name=b"x"), TypeError, "name"),
    (lambda c: c.group_add(7, 3), TypeError, "user_ids"),
    (lambda c: c.group_remove("7", [3]), TypeError, "group_id"),
    (lambda c: c.group_info(7, limit=1.0), TypeError, "limit"),
    (lambda c: c.events_page(-1), ValueError, "after"),
]


async def test_wrong_arguments_raise_naming_the_argument(anbao):
    admin = await anbao.client("admin")
    (user,) = await funded_users(admin, 1, 1, 1_000)
    for call, exc, name in WRONG:
        with pytest.raises(exc, match=re.escape(name)):
            await call(admin)
        assert not admin._pending, "nothing stored for a request that was never sent"
    # The connection is as good as before, and the server was never asked.
    assert await admin.balance(user) == 1_000
    assert await admin.register({7, 8}) == 2 and await admin.register(range(9, 11)) == 2  # any collection of ids
    # What the wire carries but the server refuses stays the server's call.
    with pytest.raises(Invalid):
        await admin.deposit(user, 0)


async def test_connect_checks_its_arguments(anbao):
    for kwargs, exc, name in [
        ({"token": None}, TypeError, "token"),
        ({"port": str(anbao.port)}, TypeError, "port"),
        ({"timeout_ms": 0}, ValueError, "timeout_ms"),
        ({"timeout_ms": 1.5}, TypeError, "timeout_ms"),
        ({"max_inflight": -1}, ValueError, "max_inflight"),
        ({"busy_retry_ms": -1}, ValueError, "busy_retry_ms"),
    ]:
        args = {"host": "127.0.0.1", "port": anbao.port, "token": ADMIN_TOKEN, **kwargs}
        with pytest.raises(exc, match=name):
            await Client.connect(**args)


async def test_cluster_checks_before_routing(anbao):
    cluster = await Cluster.connect("127.0.0.1", anbao.port, ADMIN_TOKEN)
    try:
        with pytest.raises(TypeError, match="packet_id"):
            await cluster.grab(1.5, 2)
        with pytest.raises(TypeError, match="packet_id"):
            await cluster.packet(None)
    finally:
        await cluster.close()


SCRIPT = """
import asyncio, sys
from anbao_client import Client

async def main():
    c = await Client.connect("127.0.0.1", int(sys.argv[1]), sys.argv[2])
    try:
        await c.deposit(1, 1.5)
    except TypeError as exc:
        print("refused:", exc)
    await c.close()

asyncio.run(main())
"""


async def test_a_refused_call_leaves_nothing_to_fail_at_exit(anbao):
    """The user's script of the issue: a wrong type, then exit. Nothing is
    printed at exit ('Future exception was never retrieved')."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SCRIPT,
        str(anbao.port),
        ADMIN_TOKEN,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().startswith("refused: amount_cents must be an int, not float 1.5")
    assert err.decode() == ""
