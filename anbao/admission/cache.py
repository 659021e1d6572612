"""What a worker knows for good about packets it does not own, so that it
can answer a GRAB without a hop and still give exactly the answer the owner
would give (docs/ARCHITECTURE.md I9; and I11: a retry gets the first
answer, on any worker).

Two kinds of knowledge, both final:
- per (packet, user), learnt from the owner's answers: the user's share
  (OK / ALREADY_CLAIMED: the body never changes), or a refusal that cannot
  change for that user (EXPIRED, NOT_ELIGIBLE);
- per packet, a FinalSet: a sold-out packet's complete claim list, read
  from PostgreSQL once every share is committed (claims.py). With it the
  worker answers *every* user: their share, NOT_ELIGIBLE (the sender, a
  non-member), or SOLD_OUT. "Sold out" alone is never enough: a share
  holder whose first answer was lost must get the share, not SOLD_OUT.
"""

from __future__ import annotations

from collections import OrderedDict

from anbao_client.protocol import Op, Status

from .. import _fastpath
from ..core import codec

SOLD_OUT_TEXT = _fastpath.GRAB_TEXT[Status.SOLD_OUT]
NOT_ELIGIBLE_TEXT = _fastpath.GRAB_TEXT[Status.NOT_ELIGIBLE]


class FinalSet:
    """A sold-out packet as its owner decides GRAB on it (PacketState.take's
    order): the user's own share first, then eligibility, then SOLD_OUT."""

    __slots__ = ("packet_id", "count", "sender_id", "eligible", "claims", "_sold_out")

    def __init__(
        self, packet_id: int, count: int, sender_id: int, eligible: frozenset | None, claims: dict[int, bytes]
    ):
        assert len(claims) == count, "a final set holds every share"
        self.packet_id = packet_id
        self.count = count
        self.sender_id = sender_id
        self.eligible = eligible  # None: any registered user
        self.claims = claims  # user id -> the body of their GRAB answer
        self._sold_out: bytes | None = None  # the SOLD_OUT answer, encoded once: the rejection path

    @property
    def entries(self) -> int:
        return len(self.claims) + (len(self.eligible) if self.eligible is not None else 0)

    def answer(self, rid: int, user_id: int, worker_id: int) -> bytes:
        body = self.claims.get(user_id)
        if body is not None:
            return codec.encode_raw(Op.GRAB, rid, Status.ALREADY_CLAIMED, worker_id, body)
        if user_id == self.sender_id or (self.eligible is not None and user_id not in self.eligible):
            return codec.encode_error(Op.GRAB, rid, Status.NOT_ELIGIBLE, worker_id, NOT_ELIGIBLE_TEXT)
        frame = self._sold_out
        if frame is None:
            frame = self._sold_out = codec.encode_error(Op.GRAB, 0, Status.SOLD_OUT, worker_id, SOLD_OUT_TEXT)
        return codec.with_request_id(frame, rid)


def grab_body(amount_cents: int, seq: int, count: int) -> bytes:
    """A GRAB answer's body as the owner encodes it: remaining_count is the
    count left after that share (count - seq), so it is the same body
    whenever and wherever it is given."""
    assert amount_cents > 0 and 1 <= seq <= count
    return amount_cents.to_bytes(8, "big", signed=True) + seq.to_bytes(4, "big") + (count - seq).to_bytes(4, "big")


class FinalStates:
    def __init__(self, max_set_entries: int, max_learnt: int):
        assert max_set_entries > 0 and max_learnt > 0
        self.max_set_entries = max_set_entries
        self.max_learnt = max_learnt
        self.sets: OrderedDict[int, FinalSet] = OrderedDict()  # oldest first, for eviction
        self.set_entries = 0
        self.claims: dict[tuple[int, int], bytes] = {}  # (packet, user) -> the first answer's body
        self.refusals: dict[tuple[int, int], int] = {}  # (packet, user) -> EXPIRED or NOT_ELIGIBLE

    def install(self, fs: FinalSet) -> bool:
        """Keeps fs, evicting the oldest sets past the bound. Forgetting one
        only costs hops to the owner, never a wrong answer."""
        if fs.entries > self.max_set_entries:
            return False
        old = self.sets.pop(fs.packet_id, None)
        if old is not None:
            self.set_entries -= old.entries
        while self.sets and self.set_entries + fs.entries > self.max_set_entries:
            _, evicted = self.sets.popitem(last=False)
            self.set_entries -= evicted.entries
        self.sets[fs.packet_id] = fs
        self.set_entries += fs.entries
        assert self.set_entries <= self.max_set_entries
        return True

    def note_claim(self, packet_id: int, user_id: int, body: bytes) -> None:
        if len(self.claims) >= self.max_learnt:
            self.claims.clear()  # cheap and safe: forgetting only costs a hop
        self.claims[(packet_id, user_id)] = body

    def note_refusal(self, packet_id: int, user_id: int, status: int) -> None:
        assert status in (Status.EXPIRED, Status.NOT_ELIGIBLE), "only refusals that cannot change"
        if len(self.refusals) >= self.max_learnt:
            self.refusals.clear()
        self.refusals[(packet_id, user_id)] = status
