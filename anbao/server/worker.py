"""One worker process: its lifecycle. It builds the parts (storage, the
grab engine, the router, the handlers' dispatcher, the listeners), starts
their background tasks, and stops them in the order that answers every
accepted request. It handles no request itself."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import ssl
from pathlib import Path
from typing import Any

import asyncpg

from anbao_client import routing
from anbao_client.protocol import Scope

from ..admission import FinalStates, Permits
from ..admission.claims import load_final_set
from ..auth import TokenBook
from ..config import Limits, Settings
from ..engine.batches import KeyedWrites
from ..engine.cooldown import Cooldown
from ..engine.expiry import ExpirySweeper
from ..engine.feed import EventFeed
from ..engine.grabs import GrabEngine
from ..engine.reads import BalanceReads
from ..engine.waitbound import WaitBound
from ..metrics import Sample
from ..storage.commit import GrabCommitter, Roller
from ..storage.ledger import Ledger
from ..storage.migrate import migrate
from ..topology import load as load_topology
from . import dbhealth
from .connection import PAUSED_WRITE, Connection, Host, close_idle
from .dbhealth import DbHealth
from .dispatch import Dispatcher
from .ops import Context
from .peers import PeerLink
from .ratelimit import RateLimits
from .router import Router
from .sets import SetGate, SetPeers, SetWatch

log = logging.getLogger("anbao.worker")

RATE_LIMITED_LOGGER = "anbao.grabs"  # the engine's: it warns per request on a database failure


class Worker:
    """In a supervised deployment the supervisor hands each worker its
    listening socket (listen_sock), a directory for the workers' private
    Unix sockets (peer_dir) and the token they use on them (peer_token);
    alone (tests, one worker) it opens its own."""

    def __init__(
        self,
        settings: Settings,
        dsn: str,
        tokens: TokenBook,
        *,
        listen_sock=None,
        peer_dir: Path | None = None,
        peer_token: bytes | None = None,
        permits: Permits | None = None,
        metrics=None,
        committing=None,
    ):
        assert settings.worker_count == 1 or (peer_dir is not None and peer_token), "peers need a channel"
        self.settings = settings
        self.limits: Limits = settings.limits
        self.committing = committing  # shared, one per worker: when it last had batches committing
        self.worker_id = settings.worker_id
        self.worker_count = settings.worker_count
        self.dsn = dsn
        # The peer token is good on the workers' private Unix sockets only:
        # on the public port it is just an unknown token.
        self.public_tokens = tokens
        self.tokens = tokens.with_token(peer_token, Scope.PEER) if peer_token else tokens
        self.listen_sock = listen_sock
        self.peer_dir = peer_dir
        self.peer_token = peer_token
        self.permits = permits or Permits()
        self.metrics = metrics  # WorkerMetrics when a supervisor serves /metrics
        self.connections: set[Connection] = set()
        self.db = DbHealth(self.limits.db.db_down_log_interval_ms)
        # The engine logs a failed packet load per grab; during an outage,
        # once per interval is all the log needs (DbHealth logs the outage).
        self._log_rate = dbhealth.OncePerInterval(self.limits.db.db_down_log_interval_ms)
        self.router: Router | None = None
        self.ledger: Ledger | None = None
        self.writes: KeyedWrites | None = None
        self.reads: BalanceReads | None = None
        self.engine: GrabEngine | None = None
        self.roller: Roller | None = None
        self.expiry: ExpirySweeper | None = None
        self.feed: EventFeed | None = None
        self.dispatcher: Dispatcher | None = None
        self.rate_limits = RateLimits(self.limits.rules)
        self.port: int | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._background: dict[str, asyncio.Task[Any]] = {}
        self.set_watch: SetWatch | None = None  # with a topology: the set's replication, read in the background
        self.set_peers: SetPeers | None = None  # with a topology: the other sets, asked by BALANCE

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        lim = self.limits
        logging.getLogger(RATE_LIMITED_LOGGER).addFilter(self._log_rate)
        await migrate(self.dsn)
        self.ledger = await Ledger.open(self.dsn, lim.db.db_pool_size)
        committer = GrabCommitter(self.dsn, self.worker_id, lim.commit)
        if ended := await committer.fence():
            log.warning("ended %d commit backend(s) a predecessor of worker %d left", ended, self.worker_id)
        self.roller = Roller(self.dsn, self.worker_id, self.worker_count, lim.rollup)
        cooldown = Cooldown(lim.rules)
        self.engine = GrabEngine(
            self.ledger,
            committer,
            self.worker_id,
            lim.commit,
            roller=self.roller,
            committing=self.committing,
            cooldown=cooldown,
            wait_bound=WaitBound.of(lim.handlers),
        )
        self.feed = EventFeed(self.dsn, lim.events)
        self.engine.on_facts = self.feed.poke
        self.router = self._router()
        self.router.start()
        self.writes = KeyedWrites.open(self.ledger, lim.handlers, lim.rules)
        self.reads = BalanceReads(self.ledger, lim.handlers)
        ctx = Context(
            self.worker_id,
            self.worker_count,
            self.settings.set_id,
            lim,
            self.dsn,
            self.ledger,
            self.engine,
            self.writes,
            self.reads,
            routing.shards_of(self.worker_id, self.worker_count),
            self.stats,
            self.feed,
        )
        gate = self._set_parts(ctx)
        self.dispatcher = Dispatcher(ctx, self.db, gate)
        if self.metrics is not None:
            self.engine.on_commit = self.metrics.observe_commit
            self.metrics.start(self._metrics_sample)
        host = Host(
            self.worker_id,
            self.worker_count,
            lim,
            self.tokens,
            self.router,
            self.dispatcher.dispatch,
            loop,
            self.connections,
            self.metrics.answered if self.metrics is not None else None,
            gate,
            self.rate_limits,
        )
        await self._listen(loop, host)
        self._start_background(loop)
        log.info("worker %d serving on %s:%d", self.worker_id, self.settings.host, self.port)

    def _peers(self) -> dict[int, PeerLink]:
        if self.worker_count == 1:
            return {}
        assert self.peer_dir is not None and self.peer_token is not None
        return {
            w: PeerLink(self.worker_id, w, self.peer_dir / f"worker-{w}.sock", self.peer_token, self.limits.relay)
            for w in range(self.worker_count)
            if w != self.worker_id
        }

    def _router(self) -> Router:
        adm = self.limits.admission
        assert self.ledger is not None and self.engine is not None
        pool = self.ledger.pool
        return Router(
            self.worker_id,
            self.worker_count,
            self.engine,
            self.permits,
            FinalStates(adm.max_final_set_entries, adm.max_final_claims_cached),
            self._peers(),
            adm,
            load_final_set=lambda pid: load_final_set(pool, pid),
        )

    def _set_parts(self, ctx: Context) -> SetGate | None:
        """With a topology: the gate that refuses other sets' users, the
        other sets (asked by BALANCE), and the set's replication watch."""
        if self.settings.topology_file is None:
            return None
        topology = load_topology(self.settings.topology_file)  # each set's dsn, data_dir ones resolved
        self.set_peers = SetPeers(topology, self.settings.set_id, self.limits.sets)
        self.set_watch = SetWatch(self.settings.set_id, self.dsn, self.set_peers, self.limits.sets)
        ctx.in_flight = self.set_peers.in_flight
        return SetGate(topology, self.settings.set_id, self.worker_id)

    def _start_background(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.ledger is not None and self.engine is not None and self.roller is not None
        assert self.feed is not None
        self.expiry = ExpirySweeper(self.ledger, self.engine, self.worker_id, self.worker_count, self.limits.expiry)
        self._background = {
            "idle": loop.create_task(self._sweep_idle()),
            "db_watch": loop.create_task(self._watch_database()),
            "expiry": loop.create_task(self.expiry.run()),
            "roller": loop.create_task(self.roller.run()),
            "feed": loop.create_task(self.feed.run()),
            "feed_listen": loop.create_task(self.feed.listen()),
        }
        if self.set_watch is not None:
            self._background["set_watch"] = loop.create_task(self.set_watch.run())

    async def _listen(self, loop: asyncio.AbstractEventLoop, host: Host) -> None:
        tls = None
        if self.settings.tls_cert:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(self.settings.tls_cert, self.settings.tls_key)
        # Each connection runs its own handshake (Connection._start_tls), so
        # that it is counted and timed from accept; the peers' Unix sockets
        # stay plain.
        public = dataclasses.replace(host, tls=tls, tokens=self.public_tokens, public=True)
        if self.listen_sock is not None:
            server = await loop.create_server(lambda: Connection(public), sock=self.listen_sock, backlog=4096)
        else:
            server = await loop.create_server(
                lambda: Connection(public), self.settings.host, self.settings.port, reuse_port=True, backlog=4096
            )
        self._servers.append(server)
        self.port = server.sockets[0].getsockname()[1]
        if self.peer_dir is not None:
            path = self.peer_dir / f"worker-{self.worker_id}.sock"
            path.unlink(missing_ok=True)
            self._servers.append(await loop.create_unix_server(lambda: Connection(host), str(path)))
            path.chmod(0o600)

    async def stop_rollup(self) -> None:
        """Stops the background roll-up: committed grabs stay pending, and
        every reader still sees them (the read-your-writes tests use this)."""
        await self._cancel("roller")

    async def _cancel(self, name: str) -> None:
        """Cancels a background task and waits for it, for a bounded time: a
        task that swallows its cancellation must not hold the stop forever."""
        task = self._background.pop(name, None)
        if task is not None:
            task.cancel()
            timeout_s = self.limits.process.background_stop_timeout_ms / 1000
            done, _ = await asyncio.wait({task}, timeout=timeout_s)
            if not done:
                log.error("background task %s did not stop within %.0f s; left behind", name, timeout_s)

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Stops accepting, commits and answers every accepted grab, then closes."""
        if self._servers:
            self._servers[0].close()  # the public listener; peers may still relay to us while we drain
        for c in list(self.connections):
            if c.host.public:
                c.stop_reading()  # clients' new requests would be relayed to siblings that may be gone
        if self.router is not None:
            self.router.stop()
        if self.metrics is not None:
            self.metrics.stop()
        # No new refunds; one already in the queue is committed by the drain.
        await self._cancel("expiry")
        if self.engine is not None:
            try:
                await asyncio.wait_for(self.engine.drain(), drain_timeout_s)
            except TimeoutError:
                log.error("drain timed out with %d grabs queued", self.engine.queued_grabs)
        if self.feed is not None:
            self.feed.release_waiters()  # long polls answer now, with what there is
        if self.dispatcher is not None:
            await self.dispatcher.drain(drain_timeout_s)
        if self.router is not None and not await self.router.relays_answered(drain_timeout_s):
            # Grabs relayed to their owners (which drain too) get their answers
            # to the clients before the connections close.
            log.error("drain: relayed grabs still unanswered")
        await self._cancel("idle")
        await self._cancel("db_watch")
        await self._cancel("set_watch")
        if self.set_peers is not None:
            await self.set_peers.close()
        for c in list(self.connections):
            c.close()
        for server in self._servers[1:]:
            server.close()
        if self.router is not None:
            self.router.close_links()
        await self.permits.close()
        # What the roller has not rolled up is durable and rolled up by the next start.
        await self._cancel("roller")
        if self.roller is not None:
            await self.roller.close()
        # Events committed and not numbered yet are numbered by the next run, anywhere.
        await self._cancel("feed")
        await self._cancel("feed_listen")
        if self.feed is not None:
            await self.feed.close()
        if self.engine is not None:
            await self.engine.committer.close()
        if self.ledger is not None:
            await self.ledger.close()
        logging.getLogger(RATE_LIMITED_LOGGER).removeFilter(self._log_rate)

    async def _sweep_idle(self) -> None:
        loop = asyncio.get_running_loop()
        c = self.limits.connection
        while True:
            await asyncio.sleep(c.idle_sweep_interval_ms / 1000)
            close_idle(self.connections, loop.time(), c.hello_timeout_ms, c.idle_timeout_ms)

    async def _watch_database(self) -> None:
        """Probes PostgreSQL on a connection of its own (a hung server must
        not hold one of the pool's), so STATS and the log say it is down
        even when no request is failing."""
        interval_s = self.limits.db.db_probe_interval_ms / 1000
        conn = None
        while True:
            await asyncio.sleep(interval_s)
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(self.dsn, timeout=interval_s)
                await conn.fetchval("SELECT 1", timeout=interval_s)
                self.db.succeeded()
            except asyncio.CancelledError:
                if conn is not None:
                    conn.terminate()
                raise
            except Exception as exc:
                if dbhealth.classify(exc) is None:
                    log.exception("database probe failed")
                self.db.failed(exc)
                if conn is not None:
                    conn.terminate()
                    conn = None

    def _metrics_sample(self) -> Sample:
        assert self.engine is not None and self.router is not None
        return Sample(
            self.engine.queued_grabs,
            self.client_connections(),
            dict(self.router.stats),
            self.set_watch.latest if self.set_watch is not None else None,
        )

    def client_connections(self) -> int:
        """Open connections of clients: the other workers' relay connections
        (PEER scope) excepted, so an idle server reads 0."""
        return sum(1 for c in self.connections if c.scope != Scope.PEER)

    def stats(self) -> dict[str, Any]:
        """The STATS document: this worker's counters and gauges."""
        e, r, roller = self.engine, self.router, self.roller
        assert e is not None and r is not None and roller is not None
        return {
            "worker_id": self.worker_id,
            "pid": os.getpid(),
            "connections": self.client_connections(),
            "relay_connections": len(self.connections) - self.client_connections(),
            "connections_paused_writing": sum(1 for c in self.connections if c.paused_by & PAUSED_WRITE),
            "unsent_answer_bytes": sum(
                c.transport.get_write_buffer_size() for c in self.connections if c.transport is not None
            ),
            "packets_in_memory": len(e.states),
            "queued_grabs": e.queued_grabs,
            "packets_from_memory": e.packets_from_memory,
            "commits": e.commits,
            "committed_grabs": e.committed_grabs,
            "failed_batches": e.failed_batches,
            "cooldowns_started": e.cooldown.cooled if e.cooldown is not None else 0,
            "users_cooling": len(e.cooldown.until) if e.cooldown is not None else 0,
            "rate_limited": self.rate_limits.limited,
            "busy_answers": self.dispatcher.busy_answers if self.dispatcher is not None else 0,
            "busy_over_wait": (self.dispatcher.busy_over_wait if self.dispatcher is not None else 0)
            + (e.wait_bound.refused if e.wait_bound is not None else 0),
            # A full collection stops the loop: how many, and what it no longer walks.
            "gc_full_collections": gc.get_stats()[2]["collections"],
            "gc_frozen_objects": gc.get_freeze_count(),
            **(self.writes.stats() if self.writes is not None else {}),
            **(self.reads.stats() if self.reads is not None else {}),
            "rolled_up_claims": roller.rolled_claims,
            "rollup_backlog_claims": roller.backlog_claims,
            "rollup_failures": roller.failures,
            "admission": self.permits.mode,
            "admission_errors": getattr(self.permits, "errors", 0),
            "admission_last_error": getattr(self.permits, "last_error", ""),
            **r.stats,
            **(self.feed.stats() if self.feed is not None else {}),
            **self.db.stats(),
            **r.link_stats(),
            **({"set": self.set_watch.latest} if self.set_watch is not None else {}),
        }
