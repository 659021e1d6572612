"""Where a GRAB goes: answered from what this worker knows for good, turned
away by admission, handed to the local engine when this worker owns the
packet, or relayed to the owner.

A worker that does not own a packet answers a GRAB itself only with the
answer the owner would give (docs/ARCHITECTURE.md I9): a share it has seen
the owner give, a refusal that cannot change for that user, or, for a
packet whose complete claim list it holds (a FinalSet, read from
PostgreSQL once the packet is sold out and committed), anything. In
particular it never answers SOLD_OUT from "sold out" alone: the user may
hold a share whose first answer was lost.

When the admission counter is spent (every share taken or held by a grab
in flight), the grab is parked while this worker reads the packet's final
claim list; it is then answered from it, or, if the packet turns out not to
be sold out (a share came back) or the database cannot say so in time,
relayed to the owner. The counter still spares the owner the surplus of a
storm; it no longer decides anyone's answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from anbao_client import routing
from anbao_client.protocol import MESSAGES, RESPONSE_HEADER_BYTES, STATUS_OFFSET, Op, Status, field_offset

from .. import _fastpath
from ..admission import FinalSet, FinalStates, Permits
from ..config import AdmissionTuning
from ..core import codec
from ..engine.grabs import GrabEngine, Replier
from .peers import PeerLink

log = logging.getLogger("anbao.router")

# Read once per relayed answer: plain ints, not enum attribute lookups.
_OK = Status.OK.value
_ALREADY_CLAIMED = Status.ALREADY_CLAIMED.value
_SOLD_OUT = Status.SOLD_OUT.value
_EXPIRED = Status.EXPIRED.value
_NOT_ELIGIBLE = Status.NOT_ELIGIBLE.value

# Where a GRAB answer says how many shares are left: read without decoding.
_REMAINING_AT = RESPONSE_HEADER_BYTES + field_offset(MESSAGES[Op.GRAB].answer, "remaining_count")


class _Routed(Replier):
    """Watches the owner's answer to a relayed grab on its way back to the
    client: gives an unused permit back, and learns what is final."""

    __slots__ = ("router", "conn", "packet_id", "user_id", "permit")

    def __init__(self, router: Router, conn: Replier, packet_id: int, user_id: int, permit: bool):
        self.router = router
        self.conn = conn
        self.packet_id = packet_id
        self.user_id = user_id
        self.permit = permit

    def answer(self, frame: bytes) -> None:
        status = frame[STATUS_OFFSET]
        r = self.router
        r.relay_done(self.packet_id)
        if self.permit and status != _OK:
            r.permits.give_back(self.packet_id)
        if status == _OK or status == _ALREADY_CLAIMED:
            r.final.note_claim(self.packet_id, self.user_id, frame[RESPONSE_HEADER_BYTES:])
            remaining = int.from_bytes(frame[_REMAINING_AT : _REMAINING_AT + 4], "big")
            r.note_remaining(self.packet_id, remaining)
            r.permits.observe(self.packet_id, remaining + r.slack)
            if status == _OK:
                r.release_parked(self.packet_id)  # a share was there to take: let the parked ones try
        elif status == _SOLD_OUT:
            r.start_settling(self.packet_id)  # learn the claim list, to answer everyone exactly
        elif status == _EXPIRED or status == _NOT_ELIGIBLE:
            r.final.note_refusal(self.packet_id, self.user_id, status)
        self.conn.answer(frame)


class Router:
    def __init__(
        self,
        worker_id: int,
        worker_count: int,
        engine: GrabEngine,
        permits: Permits,
        final: FinalStates,
        peers: dict[int, PeerLink],
        tuning: AdmissionTuning,
        *,
        load_final_set: Callable[[int], Awaitable[FinalSet | None]] | None = None,
    ):
        t = tuning
        assert 0 <= worker_id < worker_count and t.admission_slack >= 0
        assert t.final_set_wait_ms > 0 and t.max_parked_grabs >= 0
        self.worker_id = worker_id
        self.worker_count = worker_count
        self.engine = engine
        self.permits = permits
        self.final = final
        self.peers = peers
        # Read on every routed grab: plain attributes, in seconds where the
        # loop's clock wants them.
        self.slack = t.admission_slack
        self.load_final_set = load_final_set
        self.final_set_wait_s = t.final_set_wait_ms / 1000
        self.first_poll_s = t.final_set_first_poll_ms / 1000
        self.max_poll_s = t.final_set_max_poll_ms / 1000
        self.probe_interval_s = t.admission_probe_interval_ms / 1000
        self.reseed_interval_s = t.admission_reseed_interval_ms / 1000
        self.max_parked_grabs = t.max_parked_grabs
        self._active: set[int] = set()
        self._last_probe: dict[int, float] = {}
        self._reseeder: asyncio.Task | None = None
        # packet id -> grabs parked until its final set is known; a key is
        # present exactly while a settle task runs for that packet.
        self._settling: dict[int, list[tuple[Replier, int, int]]] = {}
        self._settle_tasks: set[asyncio.Task] = set()
        self._settle_backoff: dict[int, float] = {}  # packet id -> loop time before which no new settle starts
        self.parked = 0
        # What the owner last said a packet has left, and this worker's
        # relays of it still unanswered: while the difference is above
        # relay_unadmitted_above_shares the counter could only say yes, so a relay
        # skips it (a memcached round trip and a task per grab). The owner
        # still decides; the counter, not decremented meanwhile, lags high,
        # which is safe, and the owner reseeds it every second.
        self.relay_unadmitted_above = t.relay_unadmitted_above_shares
        self.max_packets_tracked = t.max_router_packets_tracked
        self._remaining: dict[int, int] = {}
        self._relaying: dict[int, int] = {}
        self.parked = 0
        self.stats = {
            "local": 0,
            "forwarded": 0,
            "relayed_unadmitted": 0,
            "final_cache_hits": 0,
            "admitted": 0,
            "admission_rejects": 0,
            "probes": 0,
            "parked": 0,
            "final_sets_loaded": 0,
            "settle_gave_up": 0,
        }
        engine.on_adopt = self._seed

    def start(self) -> None:
        if self.permits.mode != "none":
            self._reseeder = asyncio.get_running_loop().create_task(self._reseed_loop())

    def stop(self) -> None:
        if self._reseeder is not None:
            self._reseeder.cancel()
        for link in self.peers.values():
            link.drain()  # no replacement owner will come: nothing waits for one (peers.py)
        for t in list(self._settle_tasks):
            t.cancel()  # each relays its parked grabs to the owner on the way out

    async def relays_answered(self, timeout_s: float) -> bool:
        """Waits until every grab this worker relayed has its answer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while any(link.pending for link in self.peers.values()):
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def close_links(self) -> None:
        for link in self.peers.values():
            link.close()

    def link_stats(self) -> dict[str, dict[str, int]]:
        return {
            "relayed_by_peer": {str(w): link.forwarded for w, link in self.peers.items()},
            "relay_retries_by_peer": {str(w): link.resent for w, link in self.peers.items()},
        }

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
        fs = self.final.sets.get(packet_id)
        if fs is not None:  # the rejection path after a sell-out: inline, no call more than needed
            self.stats["final_cache_hits"] += 1
            conn.answer(fs.answer(rid, user_id, self.worker_id))
            return
        if self._answer_known(conn, rid, packet_id, user_id):
            return
        if self.permits.mode == "none":
            self._relay(conn, rid, packet_id, user_id, owner, False)
        elif self._remaining.get(packet_id, 0) - self._relaying.get(packet_id, 0) > self.relay_unadmitted_above:
            self.stats["relayed_unadmitted"] += 1
            self._relay(conn, rid, packet_id, user_id, owner, False)
        else:
            asyncio.get_running_loop().create_task(self._admit(conn, rid, packet_id, user_id, owner))

    def _answer_known(self, conn: Replier, rid: int, packet_id: int, user_id: int) -> bool:
        """Answers from final knowledge; False when there is none for this user."""
        final = self.final
        fs = final.sets.get(packet_id)
        if fs is not None:
            self.stats["final_cache_hits"] += 1
            conn.answer(fs.answer(rid, user_id, self.worker_id))
            return True
        body = final.claims.get((packet_id, user_id))
        if body is not None:
            self.stats["final_cache_hits"] += 1
            conn.answer(codec.encode_raw(Op.GRAB, rid, Status.ALREADY_CLAIMED, self.worker_id, body))
            return True
        refusal = final.refusals.get((packet_id, user_id))
        if refusal is not None:
            self.stats["final_cache_hits"] += 1
            conn.answer(
                codec.encode_error(
                    Op.GRAB,
                    rid,
                    refusal,
                    self.worker_id,
                    _fastpath.GRAB_TEXT[refusal],
                )
            )
            return True
        return False

    def on_relayed(self, conn: Replier, rid: int, packet_id: int, user_id: int) -> None:
        """A GRAB another worker relayed to us, the owner. It was admitted
        there (it holds that worker's permit), so it must not take a second
        one here, and our answer must be the truth: the relaying worker
        learns from it."""
        if not self.owns(packet_id):
            conn.answer(
                codec.encode_error(
                    Op.GRAB, rid, Status.UNAVAILABLE, self.worker_id, "relayed to a worker that does not own the packet"
                )
            )
            return
        self._active.add(packet_id)
        self.engine.on_grab(conn, rid, packet_id, user_id)

    async def _admit(self, conn: Replier, rid: int, packet_id: int, user_id: int, owner: int) -> None:
        if await self.permits.admit(packet_id):
            self.stats["admitted"] += 1
            self._relay(conn, rid, packet_id, user_id, owner, True)
            return
        # The counter is spent: every share is taken or held by a grab in
        # flight. That is no answer for this user (they may hold one).
        if self._answer_known(conn, rid, packet_id, user_id):
            return  # the final set arrived while the counter was asked
        now = asyncio.get_running_loop().time()
        if now - self._last_probe.get(packet_id, -1e9) >= self.probe_interval_s:
            # Let one attempt ask the owner, which may find a share given back.
            if len(self._last_probe) > self.max_packets_tracked:
                self._last_probe.clear()
            self._last_probe[packet_id] = now
            self.stats["probes"] += 1
            self._relay(conn, rid, packet_id, user_id, owner, False)
            return
        if self.parked < self.max_parked_grabs and self.start_settling(packet_id):
            self.stats["admission_rejects"] += 1
            self.stats["parked"] += 1
            self.parked += 1
            self._settling[packet_id].append((conn, rid, user_id))
            return
        self._relay(conn, rid, packet_id, user_id, owner, False)

    def note_remaining(self, packet_id: int, remaining: int) -> None:
        if len(self._remaining) >= self.max_packets_tracked and packet_id not in self._remaining:
            self._remaining.clear()  # forgetting only costs counter round trips
        self._remaining[packet_id] = remaining

    def relay_done(self, packet_id: int) -> None:
        n = self._relaying.get(packet_id, 0) - 1
        assert n >= 0
        if n:
            self._relaying[packet_id] = n
        else:
            del self._relaying[packet_id]

    def _relay(self, conn: Replier, rid: int, packet_id: int, user_id: int, owner: int, permit: bool) -> None:
        self.stats["forwarded"] += 1
        self._relaying[packet_id] = self._relaying.get(packet_id, 0) + 1
        self.peers[owner].forward(_Routed(self, conn, packet_id, user_id, permit), rid, packet_id, user_id)

    # ------------------------------------------------------------ final sets

    def start_settling(self, packet_id: int) -> bool:
        """Starts reading the packet's final claim list unless a read runs
        already; False when none can run (no database, or a recent one gave up)."""
        if packet_id in self._settling:
            return True
        if self.load_final_set is None or packet_id in self.final.sets:
            return False
        loop = asyncio.get_running_loop()
        if loop.time() < self._settle_backoff.get(packet_id, 0.0):
            return False
        self._settling[packet_id] = []
        task = loop.create_task(self._settle(packet_id))
        self._settle_tasks.add(task)
        task.add_done_callback(self._settle_tasks.discard)
        return True

    async def _settle(self, packet_id: int) -> None:
        assert self.load_final_set is not None  # start_settling starts none without it
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.final_set_wait_s
        poll_s = self.first_poll_s
        fs = None
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    fs = await asyncio.wait_for(self.load_final_set(packet_id), left)
                except TimeoutError:
                    break
                except Exception as exc:  # the database is down: the owner still answers from memory
                    log.debug("final claim list of packet %d unreadable: %r", packet_id, exc)
                    break
                if fs is not None:
                    break
                await asyncio.sleep(min(poll_s, max(0.0, deadline - loop.time())))
                poll_s = min(poll_s * 2, self.max_poll_s)
        finally:
            parked = self._settling.pop(packet_id, [])
            self.parked -= len(parked)
            assert self.parked >= 0
            if fs is not None and self.final.install(fs):
                self.stats["final_sets_loaded"] += 1
                wid = self.worker_id
                for conn, rid, user_id in parked:
                    conn.answer(fs.answer(rid, user_id, wid))
            else:
                self.stats["settle_gave_up"] += 1
                if len(self._settle_backoff) > self.max_packets_tracked:
                    self._settle_backoff.clear()
                self._settle_backoff[packet_id] = loop.time() + self.final_set_wait_s
                self._relay_all(packet_id, parked)

    def release_parked(self, packet_id: int) -> None:
        """A share turned out to be free: the parked grabs try for it at the owner."""
        parked = self._settling.get(packet_id)
        if parked:
            self._settling[packet_id] = []
            self.parked -= len(parked)
            self._relay_all(packet_id, parked)

    def _relay_all(self, packet_id: int, parked: list) -> None:
        owner = routing.owner_of(packet_id, self.worker_count)
        for conn, rid, user_id in parked:
            self._relay(conn, rid, packet_id, user_id, owner, False)

    # ------------------------------------------------------------ counters

    def _seed(self, state: _fastpath.PacketState) -> None:
        if not state.sold_out:
            self.permits.seed(state.packet_id, state.remaining_count + self.slack)

    async def _reseed_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reseed_interval_s)
            active, self._active = self._active, set()
            for packet_id in active:
                state = self.engine.states.get(packet_id)
                if state is not None and not state.sold_out:
                    self.permits.reseed(packet_id, state.remaining_count + self.slack)
