"""One client connection: framing, authentication, limits, dispatch.

A plain asyncio.Protocol (no streams) so that a chunk of bytes becomes
decoded requests in one call into the Cython decoder, and GRAB goes straight
to the engine without a coroutine per request.

Two things stop the connection's reading, each for its own reason, and
reading resumes only when neither holds:
- in flight: `max_inflight_per_connection` requests unanswered (answers
  that wait for a commit);
- write back-pressure: the answers the client has not read yet passed
  `write_buffer_high_bytes` in this process (asyncio's pause_writing). A
  client that sends and never reads is then held by TCP: its own sends
  block. Answers already owed still go out; past `max_write_buffer_bytes`
  the connection is dropped.
Both are checked before each request, not once per socket read (one read
can carry thousands of requests): the rest of the read is held and served
first when reading resumes.
A framing error stops reading for good: the requests before the bad frame
are answered, then the error frame goes out last, and the connection closes.
A connection past a deadline (the HELLO limit, too many requests before
HELLO, the idle limit) is aborted with a RST rather than closed: a close
waits for queued answers to drain, and a client that never reads them
would keep the connection forever.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvloop
import uvloop.loop as uvloop_loop  # its SSLProtocol: what its start_tls uses

from anbao_client import protocol, routing
from anbao_client.protocol import NO_OPCODE, OPCODE_OFFSET, STATUS_OFFSET, Op, Scope, Status

from ..auth import TokenBook
from ..config import Limits
from ..core import codec
from ..engine.grabs import Replier
from . import answers
from .dispatch import Requester
from .ratelimit import RateLimits, TokenBucket
from .router import Router
from .sets import SetGate

log = logging.getLogger("anbao.connection")

# Why reading is paused (bits: reading resumes when none is left).
PAUSED_INFLIGHT = 1
PAUSED_WRITE = 2  # the transport's buffer is past the high-water mark (asyncio's pause_writing)
PAUSED_QUEUED = 8  # answers of this loop turn, not yet handed to the transport, are past it
PAUSED_CLOSING = 4

# Read once per frame on the hot path: plain ints, not enum attribute lookups.
_GRAB = Op.GRAB.value
_SET_SHIFT = routing.SET_SHIFT
_PEER = Scope.PEER.value
_RATE_LIMITED = Status.RATE_LIMITED.value
_OPCODE_MASK = 0xFF & ~protocol.RESPONSE_BIT
_EVENTS = Op.EVENTS.value
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST


@dataclass
class Host:
    """What a connection needs of its worker, and nothing more."""

    worker_id: int
    worker_count: int
    limits: Limits
    tokens: TokenBook
    router: Router
    # Requests off the GRAB path; returns the handler's task, if one runs.
    dispatch: Callable[[Requester, int, int, tuple[Any, ...]], asyncio.Task[None] | None]
    loop: asyncio.AbstractEventLoop
    connections: set[Connection]  # the open ones, which this connection joins and leaves
    answered: dict[int, int] | None = None  # opcode << 8 | status -> count, for the metrics
    gate: SetGate | None = None  # several sets: requests for another set get WRONG_SET
    rate_limits: RateLimits | None = None  # the request-rate ceiling per token (None: no ceiling)
    tls: ssl.SSLContext | None = None  # the server side of TLS, done by each connection from accept
    public: bool = False  # the public port's (clients), not the workers' private Unix sockets (peers)
    # The open connections without a successful HELLO yet, oldest first: evicted first when full.
    before_hello: dict[Connection, None] = field(default_factory=dict)


def close_idle(connections: set[Connection], now_s: float, hello_timeout_ms: int, idle_timeout_ms: int) -> None:
    """Aborts (RST) connections that never said HELLO in time, or went
    quiet with nothing owed to them. Not a close: a close waits for the
    answers queued to drain, and a client that reads nothing would keep the
    connection (its file, its memory) forever."""
    for c in list(connections):
        if c.inflight:
            continue
        if c.scope is None and now_s - c.opened_at > hello_timeout_ms / 1000:
            log.info("aborting %s: no HELLO within %d ms", c.peer, hello_timeout_ms)
            c.abort()
        elif now_s - c.last_seen > idle_timeout_ms / 1000:
            log.info("aborting %s: idle for %d ms", c.peer, idle_timeout_ms)
            c.abort()


def _close_or_abort(t: asyncio.Transport) -> None:
    """The end of a lingering close: a transport whose answers the client
    still has not read is aborted, or closing would wait for them forever
    (a client that reads nothing kept its connection past every limit)."""
    if t.get_write_buffer_size():
        t.abort()
    else:
        t.close()


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Any:
    """The TLS layer of this loop's own start_tls: uvloop's (in C) on
    uvloop, asyncio's otherwise."""
    if isinstance(loop, uvloop.Loop):
        return uvloop_loop.SSLProtocol  # type: ignore[attr-defined]  # not in its type stubs
    return asyncio.sslproto.SSLProtocol


class _Poll:
    """The requester of one EVENTS request: its answer, or its connection
    leaving, gives its place back to the connection's and the token's
    counts of long polls."""

    __slots__ = ("conn", "bucket", "scope", "caller", "task", "waiting")

    def __init__(self, conn: Connection, bucket: TokenBucket | None):
        self.conn = conn
        self.bucket = bucket
        self.scope = conn.scope
        self.caller = conn.caller
        self.task: asyncio.Task[None] | None = None  # its handler, the dispatcher's
        self.waiting = True

    def _give_back(self) -> None:
        self.waiting = False
        self.conn.polls -= 1
        self.conn.polls_waiting.discard(self)
        if self.bucket is not None:
            self.bucket.polls -= 1

    def answer(self, frame: bytes) -> None:
        if self.waiting:
            self._give_back()
            self.conn.answer(frame)

    def cancel(self) -> None:
        """Its connection left: nobody will read the answer, so the poll
        stops waiting now and its places go back at once, not when its
        wait runs out (a client that opened many and left held other
        clients' polls BUSY until then)."""
        if self.waiting:
            self._give_back()
            if self.task is not None:
                self.task.cancel()


class Connection(asyncio.Protocol, Replier):
    def __init__(self, host: Host):
        self.host = host
        lim = host.limits
        self.transport: asyncio.Transport | None = None
        self.decoder = codec.FrameDecoder(lim.wire.max_frame_bytes)
        self.scope: int | None = None
        self.caller = ""  # the token's name once HELLO succeeds: its idempotency keys' namespace
        # The token's request-rate bucket (ratelimit.py), shared by every
        # connection of the token on this worker; None before HELLO and on peer links.
        self.bucket: TokenBucket | None = None
        self.inflight = 0
        self.paused_by = 0
        self.max_inflight = lim.connection.max_inflight_per_connection
        self.max_write_buffer_bytes = lim.connection.max_write_buffer_bytes
        self.wid = host.worker_id
        self.last_seen = self.opened_at = 0.0
        self.peer = None
        self.answered = host.answered
        self._out: list[bytes] = []
        self._out_bytes = 0
        self.write_high_bytes = lim.connection.write_buffer_high_bytes
        self._flush_scheduled = False
        self._fatal: bytes | None = None  # the error frame that ends the connection, sent last
        self._broken: bytes | None = None  # the error frame of a framing error, sent once the frames before it are
        # Frames read but not served yet (a limit stopped them mid-read), from _held_at on.
        self._held: list | None = None
        self._held_at = 0
        self._held_paid = False  # their requests were taken from the token's bucket when read
        self.requests_before_hello = 0
        self.polls = 0  # EVENTS requests unanswered on this connection
        self.polls_waiting: set[_Poll] = set()  # their requesters, cancelled if the connection leaves
        self._handshaking = False  # TLS: the handshake is under way (self.transport is the raw one)
        self._linger: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ asyncio

    def connection_made(self, transport) -> None:
        if self._handshaking:
            # Called again by the TLS layer, with its transport, once the handshake is done.
            self._handshaking = False
            self.transport = transport
            self._limit_writes(transport)
            return
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        self.last_seen = self.opened_at = self.host.loop.time()
        if len(self.host.connections) >= self.host.limits.connection.max_connections and not self._evict_one():
            self.transport = None
            if self.host.tls is not None:
                transport.abort()  # no handshake for a connection that cannot stay, and no plaintext
                return
            transport.write(codec.encode_error(Op.HELLO, 0, Status.BUSY, self.wid, "too many connections"))
            transport.close()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Counted from accept, TLS or not: a connection in its handshake
        # holds a file as much as any other.
        self.host.connections.add(self)
        self.host.before_hello[self] = None
        if self.host.tls is not None:
            self._start_tls(transport, self.host.tls)
            return
        self._limit_writes(transport)

    def _evict_one(self) -> bool:
        """Makes room for this connection by aborting the oldest one that
        has not said HELLO yet, if there is one. Silent connections (or half
        a HELLO) must not fill max_connections and lock authenticated
        clients out for the whole HELLO limit, again and again; a client
        evicted before its HELLO just connects again."""
        oldest = next(iter(self.host.before_hello), None)
        if oldest is None:
            return False
        log.info("evicting %s: no HELLO yet, and %d connections are open", oldest.peer, len(self.host.connections))
        oldest.abort()
        return True

    def _leave(self) -> None:
        self.host.connections.discard(self)
        self.host.before_hello.pop(self, None)
        for poll in list(self.polls_waiting):
            poll.cancel()

    def _start_tls(self, raw: asyncio.Transport, tls: ssl.SSLContext) -> None:
        """The server side of TLS, put between the socket and this
        connection now, before any byte is read (what loop.start_tls does,
        but synchronously: uvloop reads the client's first bytes before a
        task could start it). asyncio's ssl server (create_server(ssl=...))
        hands a connection over only once its handshake is done: until then
        it was outside max_connections and the HELLO limit alike."""
        loop = self.host.loop
        done = loop.create_future()
        done.add_done_callback(self._handshake_done)
        layer = _ssl_protocol_class(loop)(
            loop,
            self,
            tls,
            done,
            server_side=True,
            ssl_handshake_timeout=self.host.limits.connection.hello_timeout_ms / 1000,
        )
        self._handshaking = True
        raw.set_protocol(layer)
        layer.connection_made(raw)

    def _handshake_done(self, done: asyncio.Future) -> None:
        if done.cancelled() or done.exception() is not None:
            log.info("TLS handshake with %s failed: %r", self.peer, None if done.cancelled() else done.exception())
            self.abort()

    def _limit_writes(self, transport) -> None:
        high = self.host.limits.connection.write_buffer_high_bytes
        transport.set_write_buffer_limits(high=high, low=high // 4)

    def connection_lost(self, exc) -> None:
        self._leave()
        self.transport = None
        if self._linger is not None:
            self._linger.cancel()

    def pause_writing(self) -> None:
        self._pause(PAUSED_WRITE)

    def resume_writing(self) -> None:
        self._resume(PAUSED_WRITE)

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self._fatal is not None:
            return  # closed, closing, or lingering after the error frame: dropped
        self.last_seen = now_s = self.host.loop.time()
        if self.bucket is not None:
            self.bucket.refill(now_s)
        try:
            frames = self.decoder.feed(data)
        except codec.FramingError as exc:
            # The stream cannot be resynchronised past this point, but the
            # frames whole before it are requests like any other; the error
            # frame goes out once they are all served.
            frames = exc.frames
            self._broken = codec.encode_error(NO_OPCODE, 0, exc.status, self.wid, str(exc))
        if self._held:
            # Reading was paused with frames of an earlier read still held:
            # these come after them (a read the transport had under way).
            self._held.extend(frames)
            return
        paid = False
        bucket = self.bucket
        if bucket is not None and bucket.tokens >= len(frames):
            # The whole read is within the token's ceiling: one take for
            # all its frames, not one a frame (the common case, and the hot path).
            bucket.tokens -= len(frames)
            paid = True
        self._serve(frames, 0, paid)

    def _serve(self, frames: list, start: int, paid: bool) -> None:
        """Serves frames[start:] in order, request by request, until a
        per-connection limit holds (max_inflight unanswered, or
        write_buffer_high_bytes of answers queued): the rest are held, and
        reading pauses, until answers drain. A read can carry thousands of
        frames, so a check per read let one connection run far past both."""
        router = self.host.router
        gate = self.host.gate
        bucket = None if paid else self.bucket
        max_inflight = self.max_inflight
        high = self.write_high_bytes
        n = len(frames)
        i = start
        while i < n:
            if self._fatal is not None:
                break  # ended by one of these requests (a refused HELLO): nothing after it is read
            if self.inflight >= max_inflight or self._out_bytes > high:
                self._hold(frames, i, paid)
                return
            opcode, rid, args = frames[i]
            i += 1
            self.inflight += 1
            if bucket is not None:
                # The token's ceiling, before anything is dispatched or
                # routed: a limited request (a GRAB too) is not decided at all.
                if bucket.tokens < 1.0:
                    bucket.limited += 1
                    self._rate_limited(opcode, rid)
                    continue
                bucket.tokens -= 1.0
            if opcode == _GRAB and self.scope is not None and type(args) is tuple:
                if gate is not None and args[0] >> _SET_SHIFT != gate.set_id:
                    redirect = gate.redirect(opcode, rid, args)
                    assert redirect is not None, "a packet of another set always has its redirect"
                    self.answer(redirect)
                elif self.scope == _PEER:
                    router.on_relayed(self, rid, args[0], args[1])
                else:
                    router.on_grab(self, rid, args[0], args[1])
            elif self.scope is None:
                self._before_hello(opcode, rid, args)
                if not paid:
                    bucket = self.bucket  # after a HELLO, the rest of this read counts against the token
            elif type(args) is not tuple:
                self._refuse(opcode, rid, args)
            elif opcode == Op.PING:
                self.answer(answers.ok(Op.PING, rid, self.wid))
            elif opcode == _EVENTS:
                self._poll(rid, args)
            else:
                self.host.dispatch(self, opcode, rid, args)
        self._held = None
        if self._broken is not None and self._fatal is None:
            self._end_with(self._broken)

    def _refuse(self, opcode: int, rid: int, bad: Any) -> None:
        """A frame that decoded to its refusal (INVALID, UNKNOWN_OPCODE)."""
        assert isinstance(bad, codec.BadRequest)  # a frame decodes to a tuple or its refusal
        # An opcode with the response bit set is no request: its answer
        # must not carry the same byte back, or it would read as one.
        self.answer(
            codec.encode_error(
                opcode if opcode < protocol.RESPONSE_BIT else NO_OPCODE, rid, bad.status, self.wid, str(bad)
            )
        )

    def _hold(self, frames: list, at: int, paid: bool) -> None:
        """Keeps frames[at:] (at most one read's worth) and pauses reading
        until the limit that stopped them no longer holds."""
        self._held = frames
        self._held_at = at
        self._held_paid = paid
        if self.inflight >= self.max_inflight:
            self._pause(PAUSED_INFLIGHT)
        if self._out_bytes > self.write_high_bytes:
            # The event loop may read this socket many times before the
            # answers are written (libuv reads up to 32 times a turn): stop
            # now, not when the transport's buffer says so.
            self._pause(PAUSED_QUEUED)

    def _poll(self, rid: int, args: tuple) -> None:
        """EVENTS, within its connection's and its token's share of the
        worker's long polls: one client must not hold every one of
        max_event_waiters and leave the others BUSY."""
        lim = self.host.limits
        bucket = self.bucket
        if self.polls >= lim.events.max_event_polls_per_connection:
            why = f"{lim.events.max_event_polls_per_connection} EVENTS already wait on this connection"
        elif bucket is not None and bucket.polls >= lim.events.max_event_polls_per_token:
            why = f"{lim.events.max_event_polls_per_token} EVENTS of this token already wait on this worker"
        else:
            self.polls += 1
            if bucket is not None:
                bucket.polls += 1
            poll = _Poll(self, bucket)
            self.polls_waiting.add(poll)
            poll.task = self.host.dispatch(poll, _EVENTS, rid, args)
            return
        self.answer(codec.encode_error(_EVENTS, rid, Status.BUSY, self.wid, why))

    def _before_hello(self, opcode: int, rid: int, args: Any) -> None:
        """A request on a connection without a scope yet, well-formed or
        not. Only a few are read: a client that pipelines refused requests
        and never reads its answers must not cost the worker memory until
        the HELLO limit. A malformed one is refused as it would be after
        HELLO (INVALID, UNKNOWN_OPCODE); any other but HELLO is
        UNAUTHENTICATED."""
        self.requests_before_hello += 1
        if self.requests_before_hello > self.host.limits.connection.max_requests_before_hello:
            self.inflight -= 1  # not answered: the error frame that ends the connection stands for it
            self._broken = codec.encode_error(
                NO_OPCODE, 0, Status.UNAUTHENTICATED, self.wid, "too many requests before HELLO"
            )
            self._end_with(self._broken)
        elif type(args) is not tuple:
            self._refuse(opcode, rid, args)
        elif opcode == Op.HELLO:
            self._hello(rid, args)
        else:
            self.answer(codec.encode_error(opcode, rid, Status.UNAUTHENTICATED, self.wid, "HELLO first"))

    def _rate_limited(self, opcode: int, rid: int) -> None:
        lim = self.host.limits
        self.answer(
            codec.encode_error(
                opcode if opcode < protocol.RESPONSE_BIT else NO_OPCODE,
                rid,
                _RATE_LIMITED,
                self.wid,
                # Short: a flood is answered once a request, so this is its amplification.
                f"over {lim.rules.rate_limit_requests_per_s}/s; retry later",
            )
        )

    # ------------------------------------------------------------ replies

    def answer(self, frame: bytes) -> None:
        self.inflight -= 1
        assert self.inflight >= 0, "an answer to no request"
        if self.answered is not None:
            key = (frame[OPCODE_OFFSET] & _OPCODE_MASK) << 8 | frame[STATUS_OFFSET]
            self.answered[key] = self.answered.get(key, 0) + 1
        if self.transport is None:
            return  # the client left; its grab, if any, is committed all the same
        # Answers of one loop turn (a committed batch, a pipelined burst of
        # rejects) leave in one write: one syscall, not one per answer.
        self._out.append(frame)
        self._out_bytes += len(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.host.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        self._out_bytes = 0
        t = self.transport
        if t is None:
            return
        if out:
            t.write(out[0] if len(out) == 1 else b"".join(out))
            if t.get_write_buffer_size() > self.max_write_buffer_bytes:
                # Reading stopped long ago (high-water mark) and the client
                # still reads nothing: what it is owed no longer fits.
                log.warning("closing %s: %d bytes of answers unread", self.peer, t.get_write_buffer_size())
                self.abort()
                return
        # Handed over: from here the transport's own marks (pause_writing) hold reading back.
        self._resume(PAUSED_QUEUED)
        if self._fatal is not None:
            if self.inflight == 0:
                self._send_fatal()
            return
        if self.paused_by & PAUSED_INFLIGHT and self.inflight <= self.max_inflight // 2:
            self._resume(PAUSED_INFLIGHT)

    def _pause(self, why: int) -> None:
        if not self.paused_by and self.transport is not None:
            self.transport.pause_reading()
        self.paused_by |= why

    def _resume(self, why: int) -> None:
        if self.paused_by & why:
            self.paused_by &= ~why
            if not self.paused_by and self._held is not None:
                # What was read before the pause goes first; it may pause again.
                self._serve(self._held, self._held_at, self._held_paid)
            if not self.paused_by and self.transport is not None:
                self.transport.resume_reading()

    def _end_with(self, error_frame: bytes) -> None:
        """Ends the connection after every request read so far is answered,
        with error_frame (if any) as the very last bytes."""
        self._fatal = error_frame
        self._held = None  # nothing read after the end is served
        self._pause(PAUSED_CLOSING)
        if self.inflight == 0:
            self._flush()
        else:
            # Answers owed wait for commits; a database outage must not hold
            # the connection forever.
            self._linger = self.host.loop.call_later(
                self.host.limits.connection.framing_error_linger_ms / 1000, self._send_fatal
            )

    def _send_fatal(self) -> None:
        t = self.transport
        if t is None or self._fatal is None:
            return
        if self._linger is not None:
            self._linger.cancel()
        if self._out:
            t.write(b"".join(self._out))
            self._out, self._out_bytes = [], 0
        if self._fatal:
            t.write(self._fatal)
        self._fatal = b""  # sent: nothing may follow it
        self.transport = None
        self._leave()
        if not t.can_write_eof():  # TLS: no half-close
            t.close()
            self.host.loop.call_later(self.host.limits.connection.close_linger_ms / 1000, _close_or_abort, t)
            return
        # A lingering close: FIN after the last answer, then read (and drop)
        # what the client still sends for a moment. Closing with its bytes
        # unread would answer them with a RST, and a RST makes the client's
        # kernel drop answers it has received but not yet read.
        t.write_eof()
        t.resume_reading()
        self.host.loop.call_later(self.host.limits.connection.close_linger_ms / 1000, _close_or_abort, t)

    def eof_received(self):
        return False  # the client is done sending: close (after what we owe it is written)

    def abort(self) -> None:
        """Ends the connection now, with a RST: nothing queued is sent, and
        the client learns at once that it was cut off, not answered."""
        self._held = None
        t = self.transport
        if t is not None:
            self.transport = None
            if not t.is_closing():  # (a failed TLS handshake has closed it already)
                sock = t.get_extra_info("socket")
                if sock is not None:
                    # Without it, a socket with nothing unread closes with a FIN.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            t.abort()
        self._leave()

    def stop_reading(self) -> None:
        """The worker is draining: nothing more is read from this client
        (a grab taken now could be relayed to a sibling that has already
        exited), and nothing read but not yet served is taken. The answers
        it is owed still go out; the drain then closes the connection."""
        self._held = None
        self._pause(PAUSED_CLOSING)

    def close(self) -> None:
        """Ends the connection after the answers given so far are written.
        It leaves the worker's connections at once (STATS counts it no more),
        and is aborted if they are still unwritten after close_linger_ms."""
        self._held = None
        self._leave()
        if self.transport is not None:
            self._flush()  # answers already given leave before the close
            t = self.transport
            if t is not None:
                self.transport = None
                t.close()
                if t.get_write_buffer_size():
                    self.host.loop.call_later(self.host.limits.connection.close_linger_ms / 1000, _close_or_abort, t)

    # ------------------------------------------------------------ hello

    def _hello(self, rid: int, args: tuple) -> None:
        version, token = args
        if version != protocol.PROTOCOL_VERSION:
            # The connection stays open: the client may say HELLO again in a version we speak.
            self.answer(
                codec.encode_error(
                    Op.HELLO,
                    rid,
                    Status.UNSUPPORTED_VERSION,
                    self.wid,
                    f"server speaks version {protocol.PROTOCOL_VERSION}",
                )
            )
            return
        caller = self.host.tokens.caller_of(token)
        if caller is None:
            self.answer(codec.encode_error(Op.HELLO, rid, Status.UNAUTHENTICATED, self.wid, "unknown token"))
            self._end_with(b"")  # this answer is the last: the connection closes
            return
        scope = self.scope = caller.scope
        self.caller = caller.name
        self.host.before_hello.pop(self, None)
        if scope != _PEER and self.host.rate_limits is not None:
            self.bucket = self.host.rate_limits.bucket_for(token, self.host.loop.time())
        lim = self.host.limits
        self.answer(
            answers.ok(
                Op.HELLO,
                rid,
                self.wid,
                protocol.PROTOCOL_VERSION,
                scope,
                self.host.worker_count,
                lim.wire.max_frame_bytes,
                lim.connection.max_inflight_per_connection,
                lim.commit.max_queued_grabs,
                lim.wire.events_max_page,
                lim.events.events_max_wait_ms,
                lim.events.events_retention_ms,
                lim.events.events_retention_max_events,
            )
        )
