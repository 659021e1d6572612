"""Every limit the server enforces, in one place, with units in the names.

The limits are grouped by who must agree on them (as TigerBeetle splits
its process configuration from its cluster's): the wire limits, which
every SDK must agree with; the product's rules, which a deployment's
business decides and PROTOCOL.md's "Limits" refusals name; and each
component's tuning, which only that component reads and an operator may
change without telling anyone. Each component takes its own group,
unchanged. A limit's name is unique across the groups and is what
`anbao serve --limit NAME=VALUE` takes: Limits.of builds a Limits from
those flat names, finding each one's group from the dataclasses' fields."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anbao_client.protocol import DEFAULT_MAX_FRAME_BYTES, MAX_EVENTS_PAGE, MAX_PAGE_ROWS


@dataclass(frozen=True)
class WireLimits:
    """What every client must agree with: the size of a frame and of the
    lists and pages that travel in one. HELLO tells a client max_frame_bytes
    and events_max_page, but the SDK's frame buffer holds at most
    DEFAULT_MAX_FRAME_BYTES, and its pages default to MAX_EVENTS_PAGE and
    MAX_PAGE_ROWS rows: these defaults are the SDK's protocol constants,
    their one owner."""

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_members: int = 8000  # a member list must fit in one frame
    max_page_rows: int = MAX_PAGE_ROWS  # statement, sent, received, group members per answer
    # EVENTS answers at most events_max_page rows (a page of 57-byte rows,
    # and an 8-byte transfer id each, must fit in a frame).
    events_max_page: int = MAX_EVENTS_PAGE


@dataclass(frozen=True)
class ProductRules:
    """The limits of a payment product (issue 12 item 4; PROTOCOL.md
    "Limits"): what a deployment's business decides. Each refusal has its
    own status, named after its limit."""

    max_total_cents: int = 100_000_000  # 1,000,000.00 per packet
    max_share_count: int = 10_000
    min_share_cents: int = 1
    max_deposit_cents: int = 1_000_000_000_000
    max_withdraw_cents: int = 1_000_000_000_000
    max_group_members: int = 10_000  # a group grows past one frame by GROUP_ADD
    default_expiry_s: int = 86_400
    min_expiry_s: int = 1
    max_expiry_s: int = 7 * 86_400
    # The most one share may hold (WeChat: 200 yuan). SEND refuses a packet
    # whose largest share would be above it (SHARE_ABOVE_MAX: fixed mode's
    # ceil(total / count), random mode's total > count x max), and the random
    # split never draws above it. The packet keeps the value it was sent
    # under (packets.max_share_cents), so a later change or a restart does
    # not change how its remaining shares are drawn.
    max_share_cents: int = 20_000
    # What one sender may send per UTC day, in cents and in packets, decided
    # in the SEND transaction under the sender's wallet row lock
    # (DAILY_SEND_AMOUNT_CAP, DAILY_SEND_COUNT_CAP). Generous defaults: a
    # deployment sets its product's rules.
    daily_send_max_cents: int = 10_000_000_000  # 100,000,000.00
    daily_send_max_packets: int = 100_000
    # Cool-down: cooldown_refusals refused grabs (NOT_ELIGIBLE,
    # ALREADY_CLAIMED) within cooldown_window_ms put the user in cool-down
    # for cooldown_ms: a grab that would be decided fresh answers
    # COOLING_DOWN (a share the user holds is still answered). Counted in
    # memory on the owner worker of each packet, for at most
    # cooldown_max_users_tracked users (past it the oldest are forgotten).
    cooldown_refusals: int = 20
    cooldown_window_ms: int = 10_000
    cooldown_ms: int = 30_000
    cooldown_max_users_tracked: int = 1_000_000
    # Request-rate ceiling per token, per worker process: a token bucket
    # refilled at rate_limit_requests_per_s, holding at most
    # rate_limit_burst_requests, taken from by every request after HELLO
    # (peer links are exempt). Past it: RATE_LIMITED, nothing done.
    rate_limit_requests_per_s: int = 200_000
    rate_limit_burst_requests: int = 200_000


@dataclass(frozen=True)
class ConnectionTuning:
    """A client connection's bounds (server/connection.py) and the
    worker's count of them."""

    max_connections: int = 10_000
    # Files a worker needs besides its clients' connections (database pool
    # and commit connections, peers' sockets, listeners, memcached, logs):
    # `anbao serve` refuses to start unless RLIMIT_NOFILE holds
    # max_connections plus these.
    open_files_reserved_per_worker: int = 256
    max_inflight_per_connection: int = 1024  # reading pauses past this: TCP pushes back
    # Answers a client has not read yet, per connection: past the high-water
    # mark the connection's reading pauses (a client that only sends is then
    # held by TCP); past the hard limit (answers to requests already read)
    # the connection is dropped.
    write_buffer_high_bytes: int = 1 << 20
    max_write_buffer_bytes: int = 16 << 20
    # After a framing error, how long the answers to the requests before the
    # bad frame may take (grabs wait for their commit) before the error
    # frame goes out anyway and the connection closes.
    framing_error_linger_ms: int = 30_000
    # After the error frame: how long the connection drains (and drops) what
    # the client still sends before closing, so that closing does not reset
    # the connection under answers the client has not read yet.
    close_linger_ms: int = 2_000
    # A connection must say HELLO within hello_timeout_ms (a TLS handshake
    # must also end within it), having sent at most
    # max_requests_before_hello requests (HELLO included) before one
    # succeeds; past either, it is ended. A client that never reads its
    # refusals then costs at most a few answers, not megabytes, and not
    # past the deadline.
    hello_timeout_ms: int = 10_000
    max_requests_before_hello: int = 8
    idle_timeout_ms: int = 300_000
    # How often the worker looks for idle and never-authenticated
    # connections: the two timeouts above are enforced this late at most.
    idle_sweep_interval_ms: int = 1000


@dataclass(frozen=True)
class CommitTuning:
    """The grab path's group commit (engine/grabs.py GrabEngine and
    storage/commit.py GrabCommitter) and what the owner keeps in memory."""

    # Group commit: a batch goes as soon as one of commit_slots connections
    # is free, carrying at most batch_max_grabs; batches commit in the order
    # they were built. While one is in flight, another goes only once
    # batch_overlap_min_grabs have gathered: on this 2-core machine two small
    # batches in flight cost more PostgreSQL CPU than they save in waiting
    # (measure it with `python -m bench hot` under each setting).
    # Grabs beyond max_queued_grabs get BUSY.
    batch_max_grabs: int = 4096
    commit_slots: int = 2
    batch_overlap_min_grabs: int = 512
    max_queued_grabs: int = 65_536
    max_packets_in_memory: int = 500_000
    max_known_users_cached: int = 2_000_000
    # A batch whose commit connection failed is read back on a new
    # connection (its backend ended first) for at most this long; each such
    # connection is given commit_connect_timeout_ms.
    commit_resolve_timeout_ms: int = 60_000
    commit_connect_timeout_ms: int = 5_000
    # At start, the commit backends a predecessor of this worker slot left
    # must be gone within this, or the worker does not start.
    commit_fence_timeout_ms: int = 5_000


@dataclass(frozen=True)
class RollupTuning:
    """The roll-up behind the commit (storage/commit.py Roller); the grab
    engine reads the backlog bound and the quiet time from its roller."""

    # Roll-up behind the commit: at most rollup_batches_per_pass batches a
    # transaction; it polls this often when nothing wakes it. While grabs
    # are committing (or did within rollup_quiet_ms) it waits (up to rollup_defer_max_ms at a time) unless
    # rollup_defer_below_grabs are waiting for it. Past
    # max_rollup_backlog_grabs, batches stop going out (and the queue fills
    # to BUSY) until it catches up.
    rollup_batches_per_pass: int = 16
    rollup_idle_poll_ms: int = 1000
    rollup_defer_below_grabs: int = 100_000
    rollup_defer_max_ms: int = 1000
    rollup_quiet_ms: int = 50  # grabs committed this recently count as committing
    # A pass that found fewer than rollup_small_pass_grabs (a trickle) is
    # followed by a pause, so that the next one carries more.
    rollup_small_pass_grabs: int = 1000
    rollup_small_pass_pause_ms: int = 100
    max_rollup_backlog_grabs: int = 2_000_000
    # The roll-up's PostgreSQL backend runs at this nice value (1..19) when
    # it is a process of this machine (storage/commit.py lower_priority).
    rollup_backend_nice: int = 19
    # grab_rollups is a queue: every batch is inserted, then deleted by its
    # roll-up. Autovacuum visits it once a minute at best, and meanwhile
    # every scan of it (BALANCE's pending grabs, the backlog's count) reads
    # the dead rows' pages too: 1,000 pages and 8.8 ms a BALANCE 20 s into
    # an evening. So each roller vacuums it this often, when it rolled
    # something up since.
    rollup_vacuum_interval_ms: int = 1000


@dataclass(frozen=True)
class HandlerTuning:
    """Every operation off the GRAB path (server/dispatch.py), and SEND's
    batches (engine/batches.py)."""

    # Past max_handlers_per_operation requests of one operation being handled on
    # a worker (running, or waiting for a database connection or a batch),
    # the next is answered BUSY at once, and the SDK backs off. So an
    # overload is answered instead of queued, what is served keeps a bounded
    # wait, and a backlog of one operation (SENDs) never holds up another
    # (BALANCE): each has its own bound.
    max_handlers_per_operation: int = 512
    # The same in time (engine/waitbound.py): once at least
    # wait_bound_min_backlog requests of one operation wait on a worker, the
    # oldest has waited over max_wait_ms, and more wait than the worker
    # finished in any of the last three spans of max_wait_ms, the next is
    # answered BUSY at once.
    # It bounds GRAB's uncommitted grabs the same way. 100 ms is five times
    # the evening's closed-loop p99 target, so only a standing queue trips
    # it, never a commit's hiccup; 64 is half the evening's whole pipeline.
    max_wait_ms: int = 100
    wait_bound_min_backlog: int = 64
    # SEND by group commit (engine/batches.py): the SENDs that gather while a
    # batch is out go in the next one, at most send_batch_max, in one
    # statement and one commit; at most send_batches_in_flight batches per
    # worker at once (on two cores a third only adds lock waits). While one
    # is out, another goes only once send_batch_overlap_min_requests wait,
    # or while the one out is patient (it may wait for a wallet's lock): a
    # batch costs PostgreSQL about 1 ms of fixed work whatever it carries,
    # so two small batches in flight cost more CPU than they save in
    # waiting (BENCHMARKS.md, the evening: measure it there).
    send_batch_max: int = 256
    send_batches_in_flight: int = 2
    send_batch_overlap_min_requests: int = 64
    # BALANCE by group read (engine/reads.py): the BALANCEs that gather
    # while one read is out go in the next, at most this many users a read.
    balance_read_max_users: int = 256


@dataclass(frozen=True)
class AdmissionTuning:
    """The router's admission of grabs for packets other workers own
    (server/router.py Router, admission/cache.py FinalStates, the
    memcached counters of admission/permits.py)."""

    admission_slack: int = 16  # permits beyond the unreserved shares
    # A relay skips the admission counter while the owner's last word on the
    # packet, less this worker's relays in flight, is above this many shares.
    relay_unadmitted_above_shares: int = 64
    # What a worker keeps about packets it does not own (admission/cache.py):
    # shares and final refusals learnt from the owner's answers, per (packet,
    # user); and the complete claim lists of sold-out packets (claims plus
    # member ids, about 100 bytes each), oldest dropped first.
    max_final_claims_cached: int = 2_000_000
    max_final_set_entries: int = 2_000_000
    # A grab that finds the admission counter spent waits at most this long
    # for the packet's final claim list (its last batch committing) before
    # it is relayed to the owner; at most max_parked_grabs wait at once.
    final_set_wait_ms: int = 2_000
    max_parked_grabs: int = 65_536
    # While it waits, it reads the list again after final_set_first_poll_ms,
    # doubling up to final_set_max_poll_ms (the last batch is committing).
    final_set_first_poll_ms: int = 5
    final_set_max_poll_ms: int = 100
    # With the counter spent, one grab a packet per admission_probe_interval_ms
    # still goes to the owner, which may have a share given back.
    admission_probe_interval_ms: int = 50
    # The owner puts its packets' counters right this often (they drift high
    # while relays skip them).
    admission_reseed_interval_ms: int = 1000
    # Per-packet notes a router keeps about packets it does not own (last
    # remaining count, last probe, settle back-off), each map cleared past this.
    max_router_packets_tracked: int = 100_000
    # The admission counters' memcached (admission/permits.py): connections
    # per worker, and each command's bound (past it admission fails open).
    memcached_pool_size: int = 8
    memcached_timeout_ms: int = 200


@dataclass(frozen=True)
class RelayTuning:
    """A worker's link to each other worker (server/peers.py PeerLink)."""

    max_relayed_per_peer: int = 65_536  # GRABs in flight to one owner worker
    # A relayed GRAB whose owner died is sent again to the owner's replacement
    # (a restart takes a fraction of a second) for this long; past it, it is
    # answered IN_DOUBT (it may have landed) or UNAVAILABLE (it never left).
    relay_retry_deadline_ms: int = 5_000
    # Between attempts to reach a peer that is not listening (restarting).
    peer_reconnect_pause_ms: int = 50


@dataclass(frozen=True)
class ExpiryTuning:
    """Expiry (engine/expiry.py ExpirySweeper) and the audit's patience."""

    # Expiry: the sweeper asks the database for expired open packets this
    # often (and at start-up), at most expiry_sweep_batch at a time. The
    # audit calls an expired packet unrefunded only after refund_grace_ms:
    # a live server refunds within about one sweep interval plus the commit
    # of the batch in flight, but a database outage holds refunds back too.
    expiry_sweep_interval_ms: int = 1000
    expiry_sweep_batch: int = 1000
    refund_grace_ms: int = 300_000


@dataclass(frozen=True)
class EventTuning:
    """The event feed (issue 12; engine/feed.py EventFeed): EVENTS' long
    polls, its numbering and retention."""

    # EVENTS waits at most events_max_wait_ms for news; past
    # max_event_waiters long polls waiting on one worker, EVENTS is BUSY
    # (a waiting poll holds no database connection).
    events_max_wait_ms: int = 60_000
    max_event_waiters: int = 4096
    # Of those, one connection may hold max_event_polls_per_connection and
    # one token (all its connections) max_event_polls_per_token: EVENTS past
    # either is BUSY, so one client cannot take every slot of a worker.
    max_event_polls_per_connection: int = 16
    max_event_polls_per_token: int = 1024
    # A worker numbers the events it committed at most once per
    # events_number_interval_ms (each run is one synchronous commit), and
    # once per events_poll_ms anyway (another process's facts; its LISTEN
    # connection down).
    events_number_interval_ms: int = 20
    events_poll_ms: int = 200
    # Retention: events older than events_retention_ms, and the oldest beyond
    # events_retention_max_events, are pruned every events_prune_interval_ms.
    events_retention_ms: int = 7 * 86_400_000
    events_retention_max_events: int = 100_000_000
    events_prune_interval_ms: int = 1000
    # The feed's own connections (numbering, LISTEN) connect, and the LISTEN
    # one is probed, within this: a dead server shows as a failure here.
    events_connect_timeout_ms: int = 5_000


@dataclass(frozen=True)
class DbTuning:
    """The worker's database pool and its watch on PostgreSQL."""

    db_pool_size: int = 8
    # Each worker probes PostgreSQL this often; while it is down, the log
    # says so once per db_down_log_interval_ms, not once per request.
    db_probe_interval_ms: int = 1000
    db_down_log_interval_ms: int = 10_000


@dataclass(frozen=True)
class PeerSetTuning:
    """Sets (issue 11; server/sets.py): BALANCE asks the other sets what is
    on its way, and each worker watches its set's replication."""

    # Each worker reads each other set's database over at most
    # peer_set_connections connections, each read bounded by
    # peer_set_read_timeout_ms; a set that failed a read is not asked again
    # for peer_set_retry_ms (BALANCE then counts it in sets_unreached at
    # once, so a set that hangs never holds up another set's answers).
    peer_set_connections: int = 2
    peer_set_read_timeout_ms: int = 500
    # A read's wait for one of those connections is this worker's queue, not
    # the set's time: bounded on its own, and past it the read is given up
    # (counted unreached) without marking the set down.
    peer_set_queue_timeout_ms: int = 5_000
    peer_set_retry_ms: int = 1000
    # How often a worker reads its set's replication (SetWatch), and each
    # reading's bound, per database: a hung peer never holds it up.
    set_watch_interval_ms: int = 1000
    set_watch_timeout_ms: int = 2000


@dataclass(frozen=True)
class ProcessTuning:
    """The supervisor's and each worker process's lifecycle
    (server/supervisor.py, server/worker.py)."""

    # A worker must say it is serving within this after it is forked.
    worker_ready_timeout_ms: int = 60_000
    # On stop, the supervisor waits this long for its workers to exit (each
    # drains within it, less 5 s for its own exit).
    worker_drain_timeout_ms: int = 30_000
    # A worker slot restarted max_worker_restarts_per_window times within
    # worker_restart_window_ms is crash-looping: its restarts slow down.
    worker_restart_window_ms: int = 10_000
    max_worker_restarts_per_window: int = 5
    # How long each cancelled background task of a stopping worker is
    # waited for: a task that swallows its cancellation must not hold the stop forever.
    background_stop_timeout_ms: int = 10_000
    memcached_start_timeout_ms: int = 10_000
    memcached_restart_pause_ms: int = 1000  # between restarts of a memcached that keeps dying


@dataclass(frozen=True)
class Limits:
    """Every group; Limits.of(name=value, ...) builds one from flat names."""

    wire: WireLimits = WireLimits()
    rules: ProductRules = ProductRules()
    connection: ConnectionTuning = ConnectionTuning()
    commit: CommitTuning = CommitTuning()
    rollup: RollupTuning = RollupTuning()
    handlers: HandlerTuning = HandlerTuning()
    admission: AdmissionTuning = AdmissionTuning()
    relay: RelayTuning = RelayTuning()
    expiry: ExpiryTuning = ExpiryTuning()
    events: EventTuning = EventTuning()
    db: DbTuning = DbTuning()
    sets: PeerSetTuning = PeerSetTuning()
    process: ProcessTuning = ProcessTuning()

    @classmethod
    def of(cls, **limits: int) -> Limits:
        """The defaults with these limits changed, each named as
        `--limit NAME=VALUE` names it; an unknown name is a TypeError, as an
        unknown keyword argument is."""
        return cls().changed(**limits)

    def changed(self, **limits: int) -> Limits:
        """This Limits with these limits changed (each found in its group)."""
        per_group: dict[str, dict[str, int]] = {}
        for name, value in limits.items():
            if name not in _GROUP_OF:
                raise TypeError(f"Limits has no limit named {name!r}")
            per_group.setdefault(_GROUP_OF[name], {})[name] = value
        groups = {g: dataclasses.replace(getattr(self, g), **kw) for g, kw in per_group.items()}
        return dataclasses.replace(self, **groups)

    @classmethod
    def names(cls) -> list[str]:
        """Every limit's name, group by group, in the order they are declared."""
        return list(_GROUP_OF)

    def items(self) -> Iterator[tuple[str, int]]:
        """Every limit, flat: (name, value), group by group."""
        for name, group in _GROUP_OF.items():
            yield name, getattr(getattr(self, group), name)

    @classmethod
    def group_of(cls, name: str) -> str:
        """The Limits field of the group that owns the limit `name`."""
        return _GROUP_OF[name]

    def __post_init__(self) -> None:
        # Every check is here, with every group in sight: a group alone (a
        # unit test's) is not checked, a server's Limits always is.
        for name, value in self.items():
            assert value > 0, f"{name} must be positive"
        w, r, c, e = self.wire, self.rules, self.connection, self.events
        assert 64 <= w.max_frame_bytes <= 16 * 1024 * 1024
        assert r.min_expiry_s <= r.default_expiry_s <= r.max_expiry_s
        assert w.max_members * 8 + 128 <= w.max_frame_bytes
        assert w.max_members <= r.max_group_members <= 2**31
        # A page of the widest rows (SENT_LIST's, 58 bytes) must fit in one answer frame.
        assert w.max_page_rows * 58 + 64 <= w.max_frame_bytes
        assert self.expiry.refund_grace_ms >= 2 * self.expiry.expiry_sweep_interval_ms
        # One answer is at most a frame: the hard limit must hold a few.
        assert c.write_buffer_high_bytes < c.max_write_buffer_bytes
        assert c.max_write_buffer_bytes >= 2 * w.max_frame_bytes
        # Limits of a payment product: a packet of one maximum share can be
        # sent, and the daily caps allow at least one packet.
        assert r.min_share_cents <= r.max_share_cents <= r.max_total_cents
        assert r.daily_send_max_cents >= r.min_share_cents
        assert r.cooldown_refusals >= 2, "one refused grab is no pattern"
        assert r.rate_limit_burst_requests >= 1
        assert 1 <= self.rollup.rollup_backend_nice <= 19
        # A page of EVENTS rows (57 bytes each, and its 8-byte transfer id) must fit in one answer frame.
        assert w.events_max_page * (57 + 8) + 64 <= w.max_frame_bytes and w.events_max_page <= 0xFFFF
        assert e.max_event_polls_per_connection <= e.max_event_polls_per_token
        # A stopping worker drains within the supervisor's wait, less its own exit.
        assert self.process.worker_drain_timeout_ms > 5_000


def _groups_of_names() -> dict[str, str]:
    """Each limit's name -> the Limits field of its group, read off the
    dataclasses; a name in two groups would make `--limit` ambiguous."""
    owner: dict[str, str] = {}
    for group in dataclasses.fields(Limits):
        default: Any = group.default
        for f in dataclasses.fields(default):
            assert f.name not in owner, f"{f.name} is in both {owner[f.name]} and {group.name}"
            owner[f.name] = group.name
    return owner


_GROUP_OF = _groups_of_names()


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 7878
    data_dir: Path = Path(".anbao")
    dsn: str | None = None  # external PostgreSQL; None starts the embedded one
    set_id: int = 0  # which set (worker group + database) this node serves
    topology_file: Path | None = None  # several sets: the topology (docs/DEPLOYMENT.md); None: one set
    worker_id: int = 0
    worker_count: int = 1
    tokens_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    limits: Limits = Limits()

    def __post_init__(self) -> None:
        assert 0 <= self.set_id < 2**15
        assert 0 <= self.worker_id < self.worker_count <= 1024
        assert 0 <= self.port < 65536
