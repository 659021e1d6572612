"""Reading another set's database under load (issue 18 item 13): the
bound on a read is the peer's time, not the wait for one of this worker's
few connections to it. Before, one bound covered both: at 64 BALANCEs in
flight, 309 of 1,806 said sets_unreached=1 with both sets up, and each
such timeout marked the set down for peer_set_retry_ms, so the next
BALANCEs said so too."""

import asyncio

import pytest

from anbao.config import Limits
from anbao.server.sets import SetPeers
from anbao_client.routing import SetTopology

pytestmark = pytest.mark.timeout(60)


def peers_of(dsn: str, limits: Limits) -> SetPeers:
    topology = SetTopology.from_dict(
        {"sets": [{"id": 0, "port": 1, "dsn": dsn}, {"id": 1, "port": 2, "dsn": dsn}]}  # set 1: a real database
    )
    return SetPeers(topology, 0, limits.sets)


async def test_queued_reads_of_a_healthy_set_are_not_failures(fresh_dsn):
    """20 reads of 100 ms each at once over 2 connections: the last waits
    about 900 ms for a connection, far past the 500 ms read bound, and is
    answered all the same; the set is never marked down."""
    peers = peers_of(fresh_dsn, Limits.of(peer_set_connections=2, peer_set_read_timeout_ms=500))

    async def slow(conn):
        return await conn.fetchval("SELECT 1 FROM pg_sleep(0.1)")

    try:
        got = await asyncio.gather(*(peers.ask(1, slow) for _ in range(20)))
        assert got == [1] * 20, f"{got.count(None)} of 20 reads of a healthy set failed"
        assert 1 not in peers.last_error
    finally:
        await peers.close()


async def test_a_read_that_hangs_is_still_a_failure(fresh_dsn):
    """The peer's own time is still bounded: a read that outlasts it fails,
    and the set is left alone for peer_set_retry_ms."""
    peers = peers_of(fresh_dsn, Limits.of(peer_set_connections=2, peer_set_read_timeout_ms=300))

    async def hangs(conn):
        return await conn.fetchval("SELECT 1 FROM pg_sleep(5)")

    try:
        assert await peers.ask(1, hangs) is None
        assert "unreachable" in peers.last_error[1]

        async def quick(conn):
            return await conn.fetchval("SELECT 1")

        assert await peers.ask(1, quick) is None, "asked again within peer_set_retry_ms"
    finally:
        await peers.close()
