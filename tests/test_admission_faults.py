"""Admission under faults, on real processes: a memcached that closes its
connections mid-reply (aio-libs/aiomcache#502) must cost the workers
nothing but the filter, and no worker may ever tell a share holder
SOLD_OUT, whichever worker a retry reaches."""
import asyncio
import os
import signal
import time

import asyncpg
import pytest

from anbao.admission import MemcachedPermits
from anbao_client import Client, Cluster, SoldOut
from anbao_client.errors import AlreadyClaimed, NotEligible, RequestTimeout
from anbao_client.routing import local_port_for, owner_of
from conftest import ADMIN_TOKEN, APP_TOKEN, funded_users
from served import (Grabber, audit_clean, claims_of, postgres_backends, setup_packet, steered_client, storm)


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
        except (asyncio.TimeoutError, ConnectionError):
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
    permits = MemcachedPermits("127.0.0.1", fake.port, set_id=0, pool_size=2, timeout_ms=200)
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
        grabbers = [Grabber(s.port, APP_TOKEN, routed=False, local_port_for=lambda: local_port_for(other, 2))
                    for _ in range(6)]
        storm_task = asyncio.ensure_future(storm(s.port, sent.packet_id, users, grabbers, timeout_s=60))
        await asyncio.sleep(1.2)   # past the owner's first reseed (every second)
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
