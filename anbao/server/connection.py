"""One client connection: framing, authentication, limits, dispatch.

A plain asyncio.Protocol (no streams) so that a chunk of bytes becomes
decoded requests in one call into the Cython decoder, and GRAB goes straight
to the engine without a coroutine per request.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

from .. import _fastpath as fp
from ..auth import SCOPE_PEER
from ..engine.grabs import Replier

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("anbao.connection")


class Connection(asyncio.Protocol, Replier):
    def __init__(self, worker: "Worker"):
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        self.decoder = fp.FrameDecoder(worker.limits.max_frame_bytes)
        self.scope: int | None = None
        self.inflight = 0
        self.paused = False
        self.max_inflight = worker.limits.max_inflight_per_connection
        self.wid = worker.worker_id
        self.last_seen = self.opened_at = 0.0
        self.peer = None
        self.answered = worker.metrics.answered if worker.metrics is not None else None
        self._out: list[bytes] = []

    # ------------------------------------------------------------ asyncio

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        self.last_seen = self.opened_at = self.worker.loop.time()
        if len(self.worker.connections) >= self.worker.limits.max_connections:
            transport.write(fp.encode_error(fp.OP_HELLO, 0, fp.BUSY, self.wid, "too many connections"))
            transport.close()
            self.transport = None
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.worker.connections.add(self)

    def connection_lost(self, exc) -> None:
        self.worker.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        self.last_seen = self.worker.loop.time()
        try:
            frames = self.decoder.feed(data)
        except fp.FramingError as exc:
            # The stream cannot be resynchronised: say why, then close.
            self.transport.write(fp.encode_error(0, 0, exc.status, self.wid, str(exc)))
            self.close()
            return
        router = self.worker.router
        for opcode, rid, args in frames:
            self.inflight += 1
            if opcode == fp.OP_GRAB and self.scope is not None and type(args) is tuple:
                if self.scope == SCOPE_PEER:
                    router.on_relayed(self, rid, args[0], args[1])
                else:
                    router.on_grab(self, rid, args[0], args[1])
            elif type(args) is not tuple:
                self.answer(fp.encode_error(opcode, rid, args.status, self.wid, str(args)))
            elif self.scope is None:
                if opcode == fp.OP_HELLO:
                    self._hello(rid, args)
                else:
                    self.answer(fp.encode_error(opcode, rid, fp.UNAUTHENTICATED, self.wid, "HELLO first"))
            elif opcode == fp.OP_PING:
                self.answer(fp.encode_ok(fp.OP_PING, rid, self.wid, "", ()))
            else:
                self.worker.dispatch(self, opcode, rid, args)
        if self.inflight >= self.max_inflight and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    # ------------------------------------------------------------ replies

    def answer(self, frame: bytes) -> None:
        self.inflight -= 1
        if self.answered is not None:
            key = (frame[4] & 0x7F) << 8 | frame[9]
            self.answered[key] = self.answered.get(key, 0) + 1
        if self.transport is None:
            return  # the client left; its grab, if any, is committed all the same
        # Answers of one loop turn (a committed batch, a pipelined burst of
        # rejects) leave in one write: one syscall, not one per answer.
        if not self._out:
            self.worker.loop.call_soon(self._flush)
        self._out.append(frame)

    def _flush(self) -> None:
        out, self._out = self._out, []
        t = self.transport
        if t is None or not out:
            return
        t.write(out[0] if len(out) == 1 else b"".join(out))
        if self.paused and self.inflight <= self.max_inflight // 2:
            self.paused = False
            t.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self._flush()  # answers already given leave before the close
            self.transport.close()
            self.transport = None

    # ------------------------------------------------------------ hello

    def _hello(self, rid: int, args: tuple) -> None:
        version, token = args
        if version != fp.PROTOCOL_VERSION:
            self.answer(fp.encode_error(fp.OP_HELLO, rid, fp.UNSUPPORTED_VERSION, self.wid,
                                        f"server speaks version {fp.PROTOCOL_VERSION}"))
            return
        scope = self.worker.tokens.scope_of(token)
        if scope is None:
            self.answer(fp.encode_error(fp.OP_HELLO, rid, fp.UNAUTHENTICATED, self.wid, "unknown token"))
            self.close()
            return
        self.scope = scope
        lim = self.worker.limits
        self.answer(fp.encode_ok(fp.OP_HELLO, rid, self.wid, "HBHII",
                                 (fp.PROTOCOL_VERSION, scope, self.worker.worker_count,
                                  lim.max_frame_bytes, lim.max_inflight_per_connection)))
