"""Where a GRAB goes: answered from what this worker knows for good, turned
away by admission, handed to the local engine when this worker owns the
packet, or relayed to the owner."""
from __future__ import annotations

import asyncio
import logging

from .. import _fastpath as fp
from .. import routing
from ..admission import FinalStates, Permits
from ..engine.grabs import GrabEngine, Replier
from .peers import PeerLink

log = logging.getLogger("anbao.router")

RESEED_INTERVAL_S = 1.0
PROBE_INTERVAL_S = 0.05   # at most one attempt a packet per interval passes a spent counter to the owner


class _Routed(Replier):
    """Watches the owner's answer to a relayed grab on its way back to the
    client: gives an unused permit back, and remembers final answers."""
    __slots__ = ("router", "conn", "packet_id", "user_id", "permit")

    def __init__(self, router: "Router", conn: Replier, packet_id: int, user_id: int, permit: bool):
        self.router = router
        self.conn = conn
        self.packet_id = packet_id
        self.user_id = user_id
        self.permit = permit

    def answer(self, frame: bytes) -> None:
        status = frame[9]
        r = self.router
        if self.permit and status != fp.OK:
            r.permits.give_back(self.packet_id)
        if status == fp.SOLD_OUT or status == fp.EXPIRED:
            r.final.note_closed(self.packet_id, status)
        elif status == fp.OK or status == fp.ALREADY_CLAIMED:
            body = frame[fp.RESPONSE_HEADER_BYTES:]
            r.final.note_claim(self.packet_id, self.user_id, body)
            r.permits.observe(self.packet_id, int.from_bytes(body[12:16], "big") + r.slack)
        self.conn.answer(frame)


class Router:
    def __init__(self, worker_id: int, worker_count: int, engine: GrabEngine, permits: Permits,
                 final: FinalStates, peers: dict[int, PeerLink], slack: int):
        assert 0 <= worker_id < worker_count and slack >= 0
        self.worker_id = worker_id
        self.worker_count = worker_count
        self.engine = engine
        self.permits = permits
        self.final = final
        self.peers = peers
        self.slack = slack
        self._active: set[int] = set()
        self._last_probe: dict[int, float] = {}
        self._reseeder: asyncio.Task | None = None
        self.stats = {"local": 0, "forwarded": 0, "final_cache_hits": 0, "admitted": 0,
                      "admission_rejects": 0, "probes": 0}
        engine.on_adopt = self._seed

    def start(self) -> None:
        if self.permits.mode != "none":
            self._reseeder = asyncio.get_running_loop().create_task(self._reseed_loop())

    def stop(self) -> None:
        if self._reseeder is not None:
            self._reseeder.cancel()

    def owns(self, packet_id: int) -> bool:
        return routing.owner_of(packet_id, self.worker_count) == self.worker_id

    # ------------------------------------------------------------ the path

    def on_grab(self, conn: Replier, rid: int, packet_id: int, user_id: int) -> None:
        owner = routing.owner_of(packet_id, self.worker_count)
        if owner == self.worker_id:
            # The owner decides in memory, exactly and in about a microsecond:
            # cheaper than any counter, so its own grabs take no permit. Nor
            # do they mark the packet for reseeding: only relayed grabs read
            # its counter, and a counter that lags high is safe (the owner
            # still decides).
            self.stats["local"] += 1
            self.engine.on_grab(conn, rid, packet_id, user_id)
            return
        body = self.final.claims.get((packet_id, user_id))
        if body is not None:
            self.stats["final_cache_hits"] += 1
            conn.answer(fp.encode_raw(fp.OP_GRAB, rid, fp.ALREADY_CLAIMED, self.worker_id, body))
            return
        closed = self.final.closed.get(packet_id)
        if closed is not None:
            self.stats["final_cache_hits"] += 1
            conn.answer(fp.encode_error(fp.OP_GRAB, rid, closed, self.worker_id,
                                        "every share has been taken" if closed == fp.SOLD_OUT
                                        else "the packet has expired"))
            return
        if self.permits.mode == "none":
            self._relay(conn, rid, packet_id, user_id, owner, False)
        else:
            asyncio.get_running_loop().create_task(self._admit(conn, rid, packet_id, user_id, owner))

    def on_relayed(self, conn: Replier, rid: int, packet_id: int, user_id: int) -> None:
        """A GRAB another worker relayed to us, the owner. It was admitted
        there (it holds that worker's permit), so it must not take a second
        one here, and our answer must be the truth: the relaying worker
        caches SOLD_OUT as final."""
        if not self.owns(packet_id):
            conn.answer(fp.encode_error(fp.OP_GRAB, rid, fp.UNAVAILABLE, self.worker_id,
                                        "relayed to a worker that does not own the packet"))
            return
        self._active.add(packet_id)
        self.engine.on_grab(conn, rid, packet_id, user_id)

    async def _admit(self, conn: Replier, rid: int, packet_id: int, user_id: int, owner: int) -> None:
        if await self.permits.admit(packet_id):
            self.stats["admitted"] += 1
            self._relay(conn, rid, packet_id, user_id, owner, True)
            return
        now = asyncio.get_running_loop().time()
        if now - self._last_probe.get(packet_id, -1e9) >= PROBE_INTERVAL_S:
            # The counter only says every share is taken or held by an attempt
            # in flight; let one attempt ask the owner, which learns the final
            # state for this worker's cache, or finds a share given back.
            if len(self._last_probe) > 100_000:
                self._last_probe.clear()
            self._last_probe[packet_id] = now
            self.stats["probes"] += 1
            self._relay(conn, rid, packet_id, user_id, owner, False)
            return
        self.stats["admission_rejects"] += 1
        conn.answer(fp.encode_error(fp.OP_GRAB, rid, fp.SOLD_OUT, self.worker_id,
                                    "every share is taken or held by a grab in flight"))

    def _relay(self, conn: Replier, rid: int, packet_id: int, user_id: int, owner: int, permit: bool) -> None:
        self.stats["forwarded"] += 1
        self.peers[owner].forward(_Routed(self, conn, packet_id, user_id, permit), rid, packet_id, user_id)

    # ------------------------------------------------------------ counters

    def _seed(self, state: fp.PacketState) -> None:
        if not state.sold_out:
            self.permits.seed(state.packet_id, state.remaining_count + self.slack)

    async def _reseed_loop(self) -> None:
        while True:
            await asyncio.sleep(RESEED_INTERVAL_S)
            active, self._active = self._active, set()
            for packet_id in active:
                state = self.engine.states.get(packet_id)
                if state is not None and not state.sold_out:
                    self.permits.reseed(packet_id, state.remaining_count + self.slack)
