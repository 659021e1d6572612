"""Links to the other workers of this set, over Unix sockets, for relaying
GRABs to a packet's owner. A link speaks the public protocol, authenticated
with the supervisor's peer token; the owner's answer goes back to the client
byte for byte, under the client's request id.

When a link breaks (the owner worker died), the grabs relayed on it may or
may not have landed: the owner may have committed them and died before
answering. GRAB is idempotent per (packet, user), so the link keeps each of
them and sends it again to the owner's replacement (the supervisor brings
one up in a fraction of a second) and passes on its definite answer: the
share (ALREADY_CLAIMED with the same body, if the first attempt landed),
or a refusal. Only if no owner answers within `relay_retry_deadline_ms`
does a grab get an answer that is not definite: IN_DOUBT if it was ever
written to an owner ("may have landed, retry is safe"), UNAVAILABLE if it
never left this worker ("nothing moved").

A draining worker (its supervisor stopping, or dead: the kernel's SIGTERM)
waits for no replacement: none will come, since the supervisor brings none
up once it stops, and its siblings drain and exit too. It relays only over
a link that is up, answers the rest UNAVAILABLE at once, and a link that
breaks then answers its grabs at once (IN_DOUBT or UNAVAILABLE as above)
instead of retrying for the deadline: before, a worker whose sibling had
exited held its grabs, its clients and its own exit (and with them the
next start) for the whole deadline.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from anbao_client import wire
from anbao_client.protocol import Op, Status

from ..config import RelayTuning
from ..core import codec
from ..engine.grabs import Replier

log = logging.getLogger("anbao.peers")

HELLO_RID = 0


class _Relayed:
    """One relayed grab until the owner answers it."""

    __slots__ = ("replier", "rid", "packet_id", "user_id", "sent", "deadline")

    def __init__(self, replier: Replier, rid: int, packet_id: int, user_id: int):
        self.replier = replier
        self.rid = rid
        self.packet_id = packet_id
        self.user_id = user_id
        self.sent = False  # written to an owner at least once: it may have landed
        self.deadline = 0.0  # loop time; set when it starts waiting for a link


class PeerLink(asyncio.Protocol):
    def __init__(self, own_id: int, peer_id: int, path: Path, token: bytes, tuning: RelayTuning):
        assert tuning.max_relayed_per_peer > 0 and tuning.relay_retry_deadline_ms > 0
        self.own_id = own_id
        self.peer_id = peer_id
        self.path = path
        self.token = token
        self.max_pending = tuning.max_relayed_per_peer
        self.retry_deadline_s = tuning.relay_retry_deadline_ms / 1000
        self.reconnect_pause_s = tuning.peer_reconnect_pause_ms / 1000
        self._transport: asyncio.Transport | None = None
        self._ready = False
        self._connector: asyncio.Task | None = None
        self._closed = False
        self._splitter = codec.ResponseSplitter()
        self._pending: dict[int, _Relayed] = {}
        self._next_rid = 1
        self.forwarded = 0
        self.resent = 0  # grabs sent again to a replacement owner
        self.in_doubt = 0  # grabs answered IN_DOUBT: past the deadline, or while stopping
        self._draining = False  # this worker is stopping: no replacement owner will come

    def forward(self, replier: Replier, rid: int, packet_id: int, user_id: int) -> None:
        if len(self._pending) >= self.max_pending:
            replier.answer(codec.encode_error(Op.GRAB, rid, Status.BUSY, self.own_id, "relay queue full"))
            return
        if self._closed or (self._draining and not self._ready):
            replier.answer(
                codec.encode_error(
                    Op.GRAB, rid, Status.UNAVAILABLE, self.own_id, "this worker is stopping; nothing moved, retry"
                )
            )
            return
        link_rid = self._next_rid
        self._next_rid = link_rid % 0xFFFFFFFF + 1
        assert link_rid not in self._pending and link_rid != HELLO_RID
        entry = _Relayed(replier, rid, packet_id, user_id)
        self._pending[link_rid] = entry
        self.forwarded += 1
        if self._ready:
            self._send(link_rid, entry)
        else:
            entry.deadline = asyncio.get_running_loop().time() + self.retry_deadline_s
            self._ensure_connecting()

    def _send(self, link_rid: int, entry: _Relayed) -> None:
        assert self._transport is not None  # ready: connected and HELLO answered
        entry.sent = True
        self._transport.write(codec.encode_grab_request(link_rid, entry.packet_id, entry.user_id))

    # ------------------------------------------------------------ connecting

    def _ensure_connecting(self) -> None:
        if self._connector is None and not self._closed and not self._draining:
            self._connector = asyncio.get_running_loop().create_task(self._connect_loop())

    async def _connect_loop(self) -> None:
        """Connects until the link is ready, or until nothing waits for it."""
        loop = asyncio.get_running_loop()
        try:
            while not self._ready and not self._closed:
                self._expire(loop.time())
                if not self._pending:
                    return  # nobody waits: the next forward() connects again
                if self._transport is None:
                    try:
                        await loop.create_unix_connection(lambda: self, str(self.path))
                    except OSError as exc:
                        log.debug("worker %d -> %d: cannot connect (%r)", self.own_id, self.peer_id, exc)
                await asyncio.sleep(self.reconnect_pause_s)
        finally:
            self._connector = None

    def _expire(self, now: float) -> None:
        """Answers the grabs whose deadline passed while no owner could be reached."""
        expired = [k for k, e in self._pending.items() if e.deadline and e.deadline <= now]
        for k in expired:
            self._give_up(
                self._pending.pop(k), f"owner worker {self.peer_id} died with this grab in flight and is not back"
            )
        if expired:
            log.warning(
                "worker %d -> %d: %d relayed grab(s) unanswered past %.1f s",
                self.own_id,
                self.peer_id,
                len(expired),
                self.retry_deadline_s,
            )

    # ------------------------------------------------------------ asyncio

    def connection_made(self, transport) -> None:
        self._transport = transport
        transport.write(wire.hello(HELLO_RID, self.token))

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None  # connection_made came first
        try:
            answers = self._splitter.feed(data)
        except codec.FramingError:
            self._transport.close()
            return
        for rid, status, frame in answers:
            if rid == HELLO_RID and not self._ready:
                if status != Status.OK:
                    log.error("worker %d -> %d: peer HELLO refused", self.own_id, self.peer_id)
                    self._transport.close()
                    return
                self._ready = True
                # Everything waiting goes now: grabs never sent, and grabs the
                # previous owner may or may not have decided (idempotent).
                again = 0
                for link_rid, entry in self._pending.items():
                    again += entry.sent
                    entry.deadline = 0.0
                    self._send(link_rid, entry)
                if again:
                    self.resent += again
                    log.warning(
                        "worker %d -> %d: link back; %d relayed grab(s) sent again", self.own_id, self.peer_id, again
                    )
                continue
            relayed = self._pending.pop(rid, None)
            if relayed is not None:
                relayed.replier.answer(codec.with_request_id(frame, relayed.rid))

    def connection_lost(self, exc) -> None:
        self._transport = None
        was_ready, self._ready = self._ready, False
        self._splitter = codec.ResponseSplitter()
        if self._closed or self._draining:
            self._fail_all()
            return
        if self._pending:
            deadline = asyncio.get_event_loop().time() + self.retry_deadline_s
            for entry in self._pending.values():
                if not entry.deadline:
                    entry.deadline = deadline
            if was_ready:
                log.warning(
                    "worker %d -> %d: link broke with %d relayed grab(s) in flight; retrying them for up to %.1f s",
                    self.own_id,
                    self.peer_id,
                    len(self._pending),
                    self.retry_deadline_s,
                )
            self._ensure_connecting()

    def _fail_all(self) -> None:
        """This worker is stopping: answer what is left, truthfully."""
        pending, self._pending = self._pending, {}
        for e in pending.values():
            self._give_up(e, "relaying worker stopping")

    def _give_up(self, e: _Relayed, why: str) -> None:
        """Answers a relayed grab that no owner will answer: IN_DOUBT if it
        was ever written to an owner (it may have landed), UNAVAILABLE if it
        never left this worker (nothing moved)."""
        if e.sent:
            self.in_doubt += 1
            status, text = (
                Status.IN_DOUBT,
                f"{why}: it may have landed; retry (safe: a retry returns the share if it did)",
            )
        else:
            status, text = Status.UNAVAILABLE, f"{why}; nothing moved, retry"
        e.replier.answer(codec.encode_error(Op.GRAB, e.rid, status, self.own_id, text))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def drain(self) -> None:
        """This worker is stopping: what waits for an owner that is not
        connected now is answered at once; what an owner holds is still
        answered by it, or at once if the link breaks."""
        self._draining = True
        if not self._ready:
            if self._connector is not None:
                self._connector.cancel()
            self._fail_all()

    def close(self) -> None:
        self._closed = True
        if self._connector is not None:
            self._connector.cancel()
        if self._transport is not None:
            self._transport.close()
        else:
            self._fail_all()
