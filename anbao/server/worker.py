"""One worker process: a listening socket, its connections, the grab engine
for the packets it owns, and the handlers for everything off the hot path."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from pathlib import Path

import asyncpg

from .. import _fastpath as fp
from .. import routing
from ..admission import FinalStates, Permits
from ..admission.claims import load_final_set
from ..auth import SCOPE_ADMIN, SCOPE_PEER, TokenBook
from ..clock import now_ms
from ..config import Limits, Settings
from ..engine.expiry import ExpirySweeper
from ..engine.grabs import GrabEngine, packet_state
from ..storage.audit import audit
from ..storage.commit import GrabCommitter, Roller
from ..storage.domain import Operation, Reason, Refused
from ..storage.ledger import Ledger
from ..storage.migrate import migrate
from . import dbhealth
from .connection import PAUSED_WRITE, Connection
from .dbhealth import DbHealth
from .peers import PeerLink
from .router import Router

log = logging.getLogger("anbao.worker")

IDLE_SWEEP_S = 1.0
STEERING_CBPF_SOURCE_PORT = 1  # TOPOLOGY: listener = TCP source port % worker_count
# Storage's refusals, answered with the wire status of the same name.
WIRE_STATUS = {reason: getattr(fp, reason.name) for reason in Reason}


class Worker:
    """In a supervised deployment the supervisor hands each worker its
    listening socket (listen_sock), a directory for the workers' private
    Unix sockets (peer_dir) and the token they use on them (peer_token);
    alone (tests, one worker) it opens its own."""

    def __init__(self, settings: Settings, dsn: str, tokens: TokenBook, *, listen_sock=None,
                 peer_dir: Path | None = None, peer_token: bytes | None = None, permits: Permits | None = None,
                 metrics=None, committing=None):
        assert settings.worker_count == 1 or (peer_dir is not None and peer_token), "peers need a channel"
        self.settings = settings
        self.limits: Limits = settings.limits
        self.committing = committing   # shared, one per worker: when it last had batches committing
        self.worker_id = settings.worker_id
        self.worker_count = settings.worker_count
        self.dsn = dsn
        self.tokens = tokens.with_token(peer_token, SCOPE_PEER) if peer_token else tokens
        self.listen_sock = listen_sock
        self.peer_dir = peer_dir
        self.peer_token = peer_token
        self.permits = permits or Permits()
        self.router: Router | None = None
        self.metrics = metrics                       # WorkerMetrics when a supervisor serves /metrics
        self._peer_server = None
        self._own_shards = routing.shards_of(settings.worker_id, settings.worker_count)
        self._next_shard = 0
        self.connections: set[Connection] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ledger: Ledger | None = None
        self.engine: GrabEngine | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        self.expiry: ExpirySweeper | None = None
        self._expiry_task: asyncio.Task | None = None
        self.roller: Roller | None = None
        self._roller_task: asyncio.Task | None = None
        self.port: int | None = None
        self.db = DbHealth(self.limits.db_down_log_interval_ms)
        self._db_watch: asyncio.Task | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        lim = self.limits
        await migrate(self.dsn)
        self.ledger = await Ledger.open(self.dsn, self.settings.set_id, lim.db_pool_size)
        committer = GrabCommitter(self.dsn, self.worker_id, lim.commit_slots, lim.commit_resolve_timeout_ms)
        self.roller = Roller(self.dsn, self.worker_id, self.worker_count, lim.rollup_batches_per_pass,
                             lim.rollup_idle_poll_ms, lim.rollup_defer_below_grabs, lim.rollup_defer_max_ms,
                             lim.rollup_small_pass_grabs, lim.rollup_small_pass_pause_ms)
        self.engine = GrabEngine(self.ledger, committer, self.worker_id,
                                 batch_max_grabs=lim.batch_max_grabs, max_queued_grabs=lim.max_queued_grabs,
                                 max_packets_in_memory=lim.max_packets_in_memory,
                                 max_known_users=lim.max_known_users_cached, roller=self.roller,
                                 max_rollup_backlog=lim.max_rollup_backlog_grabs,
                                 overlap_min_grabs=lim.batch_overlap_min_grabs, committing=self.committing,
                                 rollup_quiet_ms=lim.rollup_quiet_ms)
        peers = {}
        if self.worker_count > 1:
            peers = {w: PeerLink(self.worker_id, w, self.peer_dir / f"worker-{w}.sock", self.peer_token,
                                 lim.max_relayed_per_peer, lim.relay_retry_deadline_ms)
                     for w in range(self.worker_count) if w != self.worker_id}
        ledger = self.ledger
        self.router = Router(self.worker_id, self.worker_count, self.engine, self.permits,
                             FinalStates(lim.max_final_set_entries, lim.max_final_claims_cached), peers,
                             lim.admission_slack, load_final_set=lambda pid: load_final_set(ledger.pool, pid),
                             final_set_wait_ms=lim.final_set_wait_ms, max_parked_grabs=lim.max_parked_grabs,
                             relay_unadmitted_above=lim.relay_unadmitted_above_shares)
        self.router.start()
        if self.metrics is not None:
            self.engine.on_commit = self.metrics.observe_commit
            self.metrics.start(self)
        tls = None
        if self.settings.tls_cert:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(self.settings.tls_cert, self.settings.tls_key)
        if self.listen_sock is not None:
            self._server = await self.loop.create_server(lambda: Connection(self), sock=self.listen_sock,
                                                         backlog=4096, ssl=tls)
        else:
            self._server = await self.loop.create_server(
                lambda: Connection(self), self.settings.host, self.settings.port,
                reuse_port=True, backlog=4096, ssl=tls)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.peer_dir is not None:
            path = self.peer_dir / f"worker-{self.worker_id}.sock"
            path.unlink(missing_ok=True)
            self._peer_server = await self.loop.create_unix_server(lambda: Connection(self), str(path))
            path.chmod(0o600)
        self._sweeper = self.loop.create_task(self._sweep_idle())
        self._db_watch = self.loop.create_task(self._watch_database())
        self.expiry = ExpirySweeper(self, lim.expiry_sweep_interval_ms, lim.expiry_sweep_batch)
        self._expiry_task = self.loop.create_task(self.expiry.run())
        self._roller_task = self.loop.create_task(self.roller.run())
        log.info("worker %d serving on %s:%d", self.worker_id, self.settings.host, self.port)

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Stops accepting, commits and answers every accepted grab, then closes."""
        if self._server is not None:
            self._server.close()
        if self.router is not None:
            self.router.stop()
        if self.metrics is not None:
            self.metrics.stop()
        if self._expiry_task is not None:
            # No new refunds; one already in the queue is committed by the drain.
            self._expiry_task.cancel()
            await asyncio.gather(self._expiry_task, return_exceptions=True)
        if self.engine is not None:
            try:
                await asyncio.wait_for(self.engine.drain(), drain_timeout_s)
            except asyncio.TimeoutError:
                log.error("drain timed out with %d grabs queued", self.engine.queued_grabs)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=drain_timeout_s)
        # Grabs relayed to their owners (which drain too) get their answers
        # to the clients before the connections close.
        deadline = self.loop.time() + drain_timeout_s
        while self.router is not None and any(link.pending for link in self.router.peers.values()):
            if self.loop.time() > deadline:
                log.error("drain: relayed grabs still unanswered")
                break
            await asyncio.sleep(0.01)
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._db_watch is not None:
            self._db_watch.cancel()
            await asyncio.gather(self._db_watch, return_exceptions=True)
        for c in list(self.connections):
            c.close()
        if self._peer_server is not None:
            self._peer_server.close()
        if self.router is not None:
            for link in self.router.peers.values():
                link.close()
        await self.permits.close()
        if self._roller_task is not None:
            # What it has not rolled up is durable and rolled up by the next start.
            self._roller_task.cancel()
            await asyncio.gather(self._roller_task, return_exceptions=True)
            await self.roller.close()
        if self.engine is not None:
            await self.engine.committer.close()
        if self.ledger is not None:
            await self.ledger.close()

    def owns(self, packet_id: int) -> bool:
        """Whether this worker owns the packet: its grab queue, its refund."""
        return routing.owner_of(packet_id, self.worker_count) == self.worker_id

    async def _sweep_idle(self) -> None:
        lim = self.limits
        while True:
            await asyncio.sleep(IDLE_SWEEP_S)
            now = self.loop.time()
            for c in list(self.connections):
                if c.inflight:
                    continue
                if c.scope is None and now - c.opened_at > lim.hello_timeout_ms / 1000:
                    c.close()
                elif now - c.last_seen > lim.idle_timeout_ms / 1000:
                    c.close()

    async def _watch_database(self) -> None:
        """Probes PostgreSQL on a connection of its own (a hung server must
        not hold one of the pool's), so STATS and the log say it is down
        even when no request is failing."""
        interval_s = self.limits.db_probe_interval_ms / 1000
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

    # ------------------------------------------------------------ dispatch

    def dispatch(self, conn: Connection, opcode: int, rid: int, args: tuple) -> None:
        handler = self._handlers.get(opcode)
        if handler is None:
            if opcode == fp.OP_HELLO:
                conn.answer(fp.encode_error(opcode, rid, fp.INVALID, self.worker_id, "already authenticated"))
                return
            conn.answer(fp.encode_error(opcode, rid, fp.UNKNOWN_OPCODE, self.worker_id, f"opcode 0x{opcode:02x}"))
            return
        needs_admin = opcode in self._admin_ops
        if needs_admin and conn.scope != SCOPE_ADMIN:
            conn.answer(fp.encode_error(opcode, rid, fp.FORBIDDEN, self.worker_id, "needs the admin scope"))
            return
        task = self.loop.create_task(self._run(handler, conn, opcode, rid, args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, handler, conn: Connection, opcode: int, rid: int, args: tuple) -> None:
        wid = self.worker_id
        try:
            frame = await handler(self, rid, *args)
            if opcode not in self._memory_ops:
                self.db.succeeded()
        except Refused as exc:
            frame = fp.encode_error(opcode, rid, WIRE_STATUS[exc.reason], wid, str(exc))
        except Exception as exc:
            frame = self._database_error(opcode, rid, exc)
        conn.answer(frame)

    def _database_error(self, opcode: int, rid: int, exc: Exception) -> bytes:
        """The typed answer to a handler's failure (see dbhealth)."""
        wid = self.worker_id
        kind = dbhealth.classify(exc)
        if kind is None:
            log.exception("opcode 0x%02x failed", opcode, exc_info=exc)
            return fp.encode_error(opcode, rid, fp.INTERNAL, wid, "internal error")
        if kind == dbhealth.BAD_VALUE:
            return fp.encode_error(opcode, rid, fp.INVALID, wid, f"a value does not fit: {exc}")
        if kind == dbhealth.ROLLED_BACK:
            return fp.encode_error(opcode, rid, fp.UNAVAILABLE, wid, f"the database undid it ({type(exc).__name__});"
                                   " nothing changed, retry")
        self.db.failed(exc)   # logs the outage, not each request
        if kind == dbhealth.BROKE and opcode in self._write_ops:
            return fp.encode_error(opcode, rid, fp.IN_DOUBT, wid, "the database connection broke under this"
                                   " request: it may have been applied; retrying it (same key) is safe")
        return fp.encode_error(opcode, rid, fp.UNAVAILABLE, wid, "database unavailable; nothing changed, retry")

    def _reply_stored(self, opcode: int, rid: int, answer, layout: str, names: tuple) -> bytes:
        """An idempotent operation's stored answer (first run or replay):
        its values in this order and layout, or its refusal."""
        if answer.refusal is not None:
            return fp.encode_error(opcode, rid, WIRE_STATUS[answer.refusal], self.worker_id, answer.message)
        return fp.encode_ok(opcode, rid, self.worker_id, layout, tuple(answer.value[n] for n in names))

    # ------------------------------------------------------------ handlers

    async def _register(self, rid: int, user_ids: list) -> bytes:
        created = await self.ledger.register(user_ids)
        self.engine.note_known_users(user_ids)
        return fp.encode_ok(fp.OP_REGISTER, rid, self.worker_id, "H", (created,))

    async def _external_move(self, opcode: int, operation: Operation, rid: int, key: bytes, user_id: int,
                             amount_cents: int, limit_cents: int, move) -> bytes:
        """DEPOSIT and WITHDRAW: one transfer between the outside world and a
        wallet, idempotent by key, answered (balance_cents, transfer_id)."""
        if amount_cents > limit_cents:
            raise Refused(Reason.INVALID, f"amount_cents above the limit {limit_cents}")

        await self.ledger.settle(user_id)

        async def body(conn) -> dict:
            return await move(conn, user_id, amount_cents)

        answer = await self.ledger.idempotent(key, operation, (user_id, amount_cents), body)
        return self._reply_stored(opcode, rid, answer, "qQ", ("balance_cents", "transfer_id"))

    async def _deposit(self, rid: int, key: bytes, user_id: int, amount_cents: int) -> bytes:
        return await self._external_move(fp.OP_DEPOSIT, Operation.DEPOSIT, rid, key, user_id, amount_cents,
                                         self.limits.max_deposit_cents, Ledger.deposit)

    async def _balance(self, rid: int, user_id: int) -> bytes:
        return fp.encode_ok(fp.OP_BALANCE, rid, self.worker_id, "q", (await self.ledger.balance(user_id),))

    async def _withdraw(self, rid: int, key: bytes, user_id: int, amount_cents: int) -> bytes:
        return await self._external_move(fp.OP_WITHDRAW, Operation.WITHDRAW, rid, key, user_id, amount_cents,
                                         self.limits.max_withdraw_cents, Ledger.withdraw)

    def _page_limit(self, limit: int) -> int:
        if not 0 < limit <= self.limits.max_page_rows:
            raise Refused(Reason.INVALID, f"limit must be 1..{self.limits.max_page_rows}")
        return limit

    async def _statement(self, rid: int, user_id: int, before: int, limit: int) -> bytes:
        balance, rows, cursor = await self.ledger.statement(user_id, before, self._page_limit(limit))
        return fp.encode_list(fp.OP_STATEMENT, rid, self.worker_id, "qQ", (balance, cursor), "QBqQq", rows)

    async def _sent_list(self, rid: int, user_id: int, before: int, limit: int) -> bytes:
        rows, cursor = await self.ledger.sent_packets(user_id, before, self._page_limit(limit))
        return fp.encode_list(fp.OP_SENT_LIST, rid, self.worker_id, "Q", (cursor,), "QqIIqqBBqq", rows)

    async def _received_list(self, rid: int, user_id: int, before: int, limit: int) -> bytes:
        rows, cursor = await self.ledger.received_shares(user_id, before, self._page_limit(limit))
        return fp.encode_list(fp.OP_RECEIVED_LIST, rid, self.worker_id, "Q", (cursor,), "QQIqq", rows)

    async def _audit(self, rid: int) -> bytes:
        report = await audit(self.dsn, refund_grace_ms=self.limits.refund_grace_ms)
        rows = [(0, name, int(value)) for name, value in report.counts.items()]
        rows += [(1, name, len(report.violations.get(name, ()))) for name in report.check_names]
        return fp.encode_list(fp.OP_AUDIT, rid, self.worker_id, "B", (int(report.ok),), "Bsq", rows)

    # ------------------------------------------------------------ groups

    def _member_list(self, user_ids: list, least: int) -> list:
        lim = self.limits
        if not least <= len(user_ids) <= lim.max_members:
            raise Refused(Reason.INVALID, f"a member list holds {least}..{lim.max_members} users")
        if len(set(user_ids)) != len(user_ids):
            raise Refused(Reason.INVALID, "member list repeats a user")
        return user_ids

    async def _group_create(self, rid: int, group_id: int, name: str, members: list) -> bytes:
        self._member_list(members, 0)
        created, n = await self.ledger.group_create(group_id, name, members, self.limits.max_group_members)
        return fp.encode_ok(fp.OP_GROUP_CREATE, rid, self.worker_id, "BI", (int(created), n))

    async def _group_add(self, rid: int, group_id: int, user_ids: list) -> bytes:
        self._member_list(user_ids, 1)
        added, n = await self.ledger.group_add(group_id, user_ids, self.limits.max_group_members)
        return fp.encode_ok(fp.OP_GROUP_ADD, rid, self.worker_id, "II", (added, n))

    async def _group_remove(self, rid: int, group_id: int, user_ids: list) -> bytes:
        self._member_list(user_ids, 1)
        removed, n = await self.ledger.group_remove(group_id, user_ids)
        return fp.encode_ok(fp.OP_GROUP_REMOVE, rid, self.worker_id, "II", (removed, n))

    async def _group_info(self, rid: int, group_id: int, after: int, limit: int) -> bytes:
        name, n, members, cursor = await self.ledger.group_info(group_id, after, self._page_limit(limit))
        return fp.encode_list(fp.OP_GROUP_INFO, rid, self.worker_id, "IQs", (n, cursor, name), "Q",
                              [(m,) for m in members])

    def _validate_send(self, sender: int, total: int, count: int, mode: int, expiry_s: int,
                       audience: int, members: list) -> int:
        lim = self.limits
        if mode not in (fp.MODE_RANDOM, fp.MODE_FIXED):
            raise Refused(Reason.INVALID, "mode must be 1 (random) or 2 (fixed)")
        if not 1 <= count <= lim.max_share_count:
            raise Refused(Reason.INVALID, f"count must be 1..{lim.max_share_count}")
        if total > lim.max_total_cents:
            raise Refused(Reason.INVALID, f"total_cents above the limit {lim.max_total_cents}")
        if total < count * lim.min_share_cents:
            raise Refused(Reason.INVALID, f"total_cents below count x {lim.min_share_cents} cent minimum share")
        expiry_s = expiry_s or lim.default_expiry_s
        if not lim.min_expiry_s <= expiry_s <= lim.max_expiry_s:
            raise Refused(Reason.INVALID, f"expiry must be {lim.min_expiry_s}..{lim.max_expiry_s} s")
        if audience == fp.AUDIENCE_OPEN:
            if members:
                raise Refused(Reason.INVALID, "an open packet takes no member list")
        elif audience == fp.AUDIENCE_DIRECT:
            if len(members) != 1 or count != 1:
                raise Refused(Reason.INVALID, "a packet to one person names one user and has one share")
        elif audience == fp.AUDIENCE_MEMBERS:
            if not 1 <= len(members) <= lim.max_members:
                raise Refused(Reason.INVALID, f"member list must hold 1..{lim.max_members} users")
            if len(set(members)) != len(members):
                raise Refused(Reason.INVALID, "member list repeats a user")
            if count > len(members):
                raise Refused(Reason.INVALID, "more shares than members: the packet could never sell out")
        elif audience == fp.AUDIENCE_GROUP:
            # The group's id travels in the member list's place; its members
            # (but the sender) are snapshotted inside the SEND transaction.
            if len(members) != 1:
                raise Refused(Reason.INVALID, "a packet to a group names exactly one group id")
            return expiry_s
        else:
            raise Refused(Reason.INVALID, "audience must be 0 (open), 1 (direct), 2 (members) or 3 (group)")
        if sender in members:
            raise Refused(Reason.INVALID, "a sender cannot open their own packet")
        return expiry_s

    async def _send(self, rid: int, key: bytes, sender: int, total: int, count: int, mode: int, expiry_s: int,
                    audience: int, members: list, greeting: str) -> bytes:
        expiry_s = self._validate_send(sender, total, count, mode, expiry_s, audience, members)
        min_share = self.limits.min_share_cents
        adopted = []

        # The new packet takes one of this worker's shards, so this worker owns it.
        shard = self._own_shards[self._next_shard]
        self._next_shard = (self._next_shard + 1) % len(self._own_shards)

        await self.ledger.settle(sender)

        async def body(conn) -> dict:
            expires_at_ms = now_ms() + expiry_s * 1000
            record, balance = await self.ledger.send(conn, shard, sender, total, count, mode, min_share,
                                                     expires_at_ms, audience, members, greeting)
            adopted.append(record)
            return {"packet_id": record.packet_id, "balance_cents": balance, "expires_at_ms": expires_at_ms}

        fields = (sender, total, count, mode, expiry_s, audience, tuple(members), greeting)
        answer = await self.ledger.idempotent(key, Operation.SEND, fields, body)
        if adopted and not answer.replayed:
            state = packet_state(adopted[0])
            # A grab that guessed the id may already have loaded it from the database.
            assert self.owns(state.packet_id)
            if state.packet_id not in self.engine.states:
                self.engine.adopt(state)
        return self._reply_stored(fp.OP_SEND, rid, answer, "Qqq", ("packet_id", "balance_cents", "expires_at_ms"))

    async def _packet(self, rid: int, packet_id: int, offset: int, limit: int) -> bytes:
        if not 0 < limit <= fp.MAX_CLAIMS_PAGE:
            raise Refused(Reason.INVALID, f"claims_limit must be 1..{fp.MAX_CLAIMS_PAGE}")
        info = await self.ledger.packet_info(packet_id, offset, limit)
        if info is None:
            raise Refused(Reason.NOT_FOUND, f"unknown packet {packet_id}")
        head, greeting, claims = info
        return fp.encode_packet(rid, self.worker_id, head, greeting, claims)

    async def _topology(self, rid: int) -> bytes:
        return fp.encode_ok(fp.OP_TOPOLOGY, rid, self.worker_id, "HHBH",
                            (self.worker_count, routing.SHARD_COUNT, STEERING_CBPF_SOURCE_PORT if
                             self.worker_count > 1 else 0, self.settings.set_id))

    def stats(self) -> dict:
        e = self.engine
        return {"worker_id": self.worker_id, "pid": os.getpid(), "connections": len(self.connections),
                "connections_paused_writing": sum(1 for c in self.connections if c.paused_by & PAUSED_WRITE),
                "unsent_answer_bytes": sum(c.transport.get_write_buffer_size() for c in self.connections
                                           if c.transport is not None),
                "packets_in_memory": len(e.states), "queued_grabs": e.queued_grabs, "commits": e.commits,
                "committed_grabs": e.committed_grabs, "failed_batches": e.failed_batches,
                "rolled_up_claims": self.roller.rolled_claims, "rollup_backlog_claims": self.roller.backlog_claims,
                "rollup_failures": self.roller.failures,
                "admission": self.permits.mode, "admission_errors": getattr(self.permits, "errors", 0),
                "admission_last_error": getattr(self.permits, "last_error", ""),
                **self.router.stats, **self.db.stats(),
                "relayed_by_peer": {str(w): link.forwarded for w, link in self.router.peers.items()},
                "relay_retries_by_peer": {str(w): link.resent for w, link in self.router.peers.items()}}

    async def _stats(self, rid: int) -> bytes:
        doc = json.dumps(self.stats(), sort_keys=True).encode()
        return fp.encode_raw(fp.OP_STATS, rid, fp.OK, self.worker_id, len(doc).to_bytes(4, "big") + doc)

    _handlers = {
        fp.OP_TOPOLOGY: _topology,
        fp.OP_STATS: _stats,
        fp.OP_REGISTER: _register,
        fp.OP_DEPOSIT: _deposit,
        fp.OP_BALANCE: _balance,
        fp.OP_SEND: _send,
        fp.OP_PACKET: _packet,
        fp.OP_WITHDRAW: _withdraw,
        fp.OP_STATEMENT: _statement,
        fp.OP_AUDIT: _audit,
        fp.OP_SENT_LIST: _sent_list,
        fp.OP_RECEIVED_LIST: _received_list,
        fp.OP_GROUP_CREATE: _group_create,
        fp.OP_GROUP_ADD: _group_add,
        fp.OP_GROUP_REMOVE: _group_remove,
        fp.OP_GROUP_INFO: _group_info,
    }
    # Money in and out of the system, and the audit, need the admin scope.
    _admin_ops = frozenset({fp.OP_DEPOSIT, fp.OP_WITHDRAW, fp.OP_AUDIT})
    # Requests that write: a connection broken under one leaves it in doubt.
    _write_ops = frozenset({fp.OP_REGISTER, fp.OP_DEPOSIT, fp.OP_WITHDRAW, fp.OP_SEND, fp.OP_GROUP_CREATE,
                            fp.OP_GROUP_ADD, fp.OP_GROUP_REMOVE})
    # Answered from memory: their success says nothing about the database.
    _memory_ops = frozenset({fp.OP_TOPOLOGY, fp.OP_STATS})

