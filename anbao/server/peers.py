"""Links to the other workers of this set, over Unix sockets, for relaying
GRABs to a packet's owner. A link speaks the public protocol, authenticated
with the supervisor's peer token; the owner's answer goes back to the client
byte for byte, under the client's request id."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from .. import _fastpath as fp
from ..engine.grabs import Replier

log = logging.getLogger("anbao.peers")

HELLO_RID = 0
RECONNECT_PAUSE_S = 0.1


class PeerLink(asyncio.Protocol):
    def __init__(self, own_id: int, peer_id: int, path: Path, token: bytes, max_pending: int):
        assert max_pending > 0
        self.own_id = own_id
        self.peer_id = peer_id
        self.path = path
        self.token = token
        self.max_pending = max_pending
        self._transport: asyncio.Transport | None = None
        self._ready = False
        self._connecting = False
        self._failed_at = -1e9
        self._splitter = fp.ResponseSplitter()
        self._pending: dict[int, tuple[Replier, int]] = {}
        self._queued: list[bytes] = []
        self._next_rid = 1
        self.forwarded = 0

    def forward(self, replier: Replier, rid: int, packet_id: int, user_id: int) -> None:
        if len(self._pending) >= self.max_pending:
            replier.answer(fp.encode_error(fp.OP_GRAB, rid, fp.BUSY, self.own_id, "relay queue full"))
            return
        loop = asyncio.get_running_loop()
        if not self._ready and not self._connecting:
            if loop.time() - self._failed_at < RECONNECT_PAUSE_S:
                replier.answer(fp.encode_error(fp.OP_GRAB, rid, fp.UNAVAILABLE, self.own_id,
                                               f"owner worker {self.peer_id} unreachable; retry"))
                return
            self._connecting = True
            loop.create_task(self._connect())
        link_rid = self._next_rid
        self._next_rid = link_rid % 0xFFFFFFFF + 1
        assert link_rid not in self._pending
        self._pending[link_rid] = (replier, rid)
        frame = fp.encode_grab_request(link_rid, packet_id, user_id)
        self.forwarded += 1
        if self._ready:
            self._transport.write(frame)
        else:
            self._queued.append(frame)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_unix_connection(lambda: self, str(self.path))
        except OSError as exc:
            log.warning("worker %d -> %d: cannot connect (%r)", self.own_id, self.peer_id, exc)
            self._connecting = False
            self._fail_all("owner worker unreachable; retry")

    def connection_made(self, transport) -> None:
        self._transport = transport
        body = fp.PROTOCOL_VERSION.to_bytes(2, "big") + len(self.token).to_bytes(2, "big") + self.token
        transport.write((5 + len(body)).to_bytes(4, "big") + bytes([fp.OP_HELLO]) + HELLO_RID.to_bytes(4, "big")
                        + body)

    def data_received(self, data: bytes) -> None:
        try:
            answers = self._splitter.feed(data)
        except fp.FramingError:
            self._transport.close()
            return
        for rid, status, frame in answers:
            if rid == HELLO_RID and not self._ready:
                if status != fp.OK:
                    log.error("worker %d -> %d: peer HELLO refused", self.own_id, self.peer_id)
                    self._transport.close()
                    return
                self._ready = True
                self._connecting = False
                queued, self._queued = self._queued, []
                self._transport.write(b"".join(queued))
                continue
            entry = self._pending.pop(rid, None)
            if entry is not None:
                replier, client_rid = entry
                replier.answer(fp.with_request_id(frame, client_rid))

    def connection_lost(self, exc) -> None:
        self._transport = None
        self._ready = False
        self._connecting = False
        self._fail_all("link to the owner worker broke; the grab may have landed: retry (safe)")

    def _fail_all(self, why: str) -> None:
        self._failed_at = asyncio.get_event_loop().time()
        pending, self._pending = self._pending, {}
        self._queued = []
        for replier, rid in pending.values():
            replier.answer(fp.encode_error(fp.OP_GRAB, rid, fp.UNAVAILABLE, self.own_id, why))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
