"""In-process fakes of anbao's own interfaces, for the unit tests: the
committer and the ledger GrabEngine talks to, a peer link the Router relays
through, and an engine the Router hands local grabs to. Nothing here stands
in for PostgreSQL, memcached or a socket: each fake keeps just enough state
to say what the code under test asked of it."""

from __future__ import annotations

import asyncio
import itertools

from anbao import _fastpath
from anbao.storage.domain import PacketRecord
from anbao_client import wire
from anbao_client.protocol import Mode

HOUR_MS = 3_600_000


def packet(
    packet_id: int = 1,
    *,
    total_cents: int = 1_000,
    count: int = 5,
    sender_id: int = 999,
    mode: int = Mode.RANDOM,
    eligible=None,
    claims=(),
) -> _fastpath.PacketState:
    """An open packet expiring in an hour."""
    return _fastpath.PacketState(
        packet_id,
        sender_id,
        total_cents,
        count,
        mode,
        1,
        _fastpath.now_ms() + HOUR_MS,
        eligible=eligible,
        claims=claims,
    )


class Answers:
    """A Replier that decodes each answer, keeping them by request id in
    arrival order, and notes what `probe()` said at the moment of each."""

    def __init__(self, probe=None):
        self.by_rid: dict[int, wire.Response] = {}
        self.order: list[int] = []
        self.seen_at_answer: dict[int, object] = {}
        self._probe = probe

    def answer(self, frame: bytes) -> None:
        [r] = wire.FrameBuffer().feed(frame)
        assert r.request_id not in self.by_rid, f"request {r.request_id} answered twice"
        self.by_rid[r.request_id] = r
        self.order.append(r.request_id)
        if self._probe is not None:
            self.seen_at_answer[r.request_id] = self._probe()

    def status(self, rid: int) -> int | None:
        r = self.by_rid.get(rid)
        return None if r is None else r.status

    def grabbed(self, rid: int) -> wire.Grabbed:
        return wire.decode_grab(self.by_rid[rid])


class FakeCommitter:
    """GrabEngine's committer (storage.commit.GrabCommitter's interface):
    slots, batch ids, and commit(). A batch is durable when commit() returns
    True; like the real one, a batch commits only if the one built before
    it did. `gate` holds every commit until it is set, `held[batch_id]` one
    batch until it is set; `outcomes` lists the results of the next commits
    (True when empty)."""

    def __init__(self, slots: int = 1):
        self._free = list(range(slots))
        self._ids = itertools.count(1)
        self.gate = asyncio.Event()
        self.gate.set()
        self.outcomes: list[bool] = []
        self.held: dict[int, asyncio.Event] = {}
        self.started: list[int] = []  # batch ids whose commit was entered
        self.returned = 0  # commits that have returned, either way
        self.durable: list[tuple[int, int, int, int]] = []  # (packet, seq, user, amount) of landed grabs
        self.refunded: list[int] = []

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def acquire(self) -> int:
        assert self._free, "no free slot"
        return self._free.pop()

    def release(self, slot: int) -> None:
        assert slot not in self._free
        self._free.append(slot)

    async def next_batch_id(self, slot: int) -> int:
        return next(self._ids)

    async def commit(self, slot, batch_id, packets, seqs, users, amounts, before) -> bool:
        assert len(packets) == len(seqs) == len(users) == len(amounts) > 0
        self.started.append(batch_id)
        await self.gate.wait()
        if batch_id in self.held:
            await self.held[batch_id].wait()
        ok = self.outcomes.pop(0) if self.outcomes else True
        if before is not None and not await asyncio.shield(before):
            ok = False
        if ok:
            self.durable += zip(packets, seqs, users, amounts, strict=True)
        self.returned += 1
        return ok

    async def settle_then_refund(self, slot, packet_ids):
        self.refunded += packet_ids
        return {pid: (0, False) for pid in packet_ids}

    def claims_of(self, packet_id: int) -> list[tuple[int, int, int]]:
        """(user, seq, amount) of the packet's durable grabs, as PacketState takes them."""
        return [(u, s, a) for p, s, u, a in self.durable if p == packet_id]


class FakeLedger:
    """What GrabEngine reads from storage: a packet's durable state (rebuilt
    from the committer's durable grabs, as the database would) and which
    users are registered."""

    def __init__(self, committer: FakeCommitter, packets: dict[int, dict], users=()):
        self.committer = committer
        self.packets = packets  # packet id -> packet() keyword arguments
        self.users = set(users)
        self.loads: list[int] = []

    async def load_packet(self, packet_id: int):
        self.loads.append(packet_id)
        spec = self.packets.get(packet_id)
        if spec is None:
            return None
        state = packet(packet_id, claims=self.committer.claims_of(packet_id), **spec)
        # What storage hands back: the record the engine builds the state from.
        return PacketRecord(
            packet_id,
            state.sender_id,
            state.total_cents,
            state.share_count,
            state.mode,
            state.min_share_cents,
            state.expires_at_ms,
            spec.get("eligible"),
            self.committer.claims_of(packet_id),
            False,
        )

    async def known_users(self, user_ids):
        return self.users & set(user_ids)


class FakePeer:
    """A PeerLink to the owner: records what is relayed; the test answers
    as the owner would, through the replier it was given."""

    def __init__(self):
        self.relayed: list[tuple[object, int, int, int]] = []  # (replier, rid, packet, user)

    def forward(self, replier, rid: int, packet_id: int, user_id: int) -> None:
        self.relayed.append((replier, rid, packet_id, user_id))


class FakeEngine:
    """The owner's engine as the Router sees it: on_grab, states, on_adopt."""

    def __init__(self):
        self.grabs: list[tuple[object, int, int, int]] = []
        self.states: dict[int, _fastpath.PacketState] = {}
        self.on_adopt = None

    def on_grab(self, replier, rid: int, packet_id: int, user_id: int) -> None:
        self.grabs.append((replier, rid, packet_id, user_id))


async def ticks(n: int = 20) -> None:
    """Lets the loop run n turns: enough for every call_soon and task step
    already scheduled to run."""
    for _ in range(n):
        await asyncio.sleep(0)
