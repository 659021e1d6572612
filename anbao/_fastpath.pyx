# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The fast path of a grab (DESIGN.md's `anbao/_fastpath.pyx`): how a
packet's total becomes its shares, one draw per grab, and the packet as its
owner holds it in memory (its queue: take() decides grabs one at a time in
arrival order), with the batches of grabs one commit carries.

The modes are the protocol's (protocol.Mode); tests/test_protocol_table.py
checks C_MODE_* against it. Everything here runs on the event loop thread
of the owning worker: take() is the serialization point of a packet, and
nothing blocks. The wire codec is a module of its own (anbao/core/codec)."""

from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t
from cpython.bytes cimport PyBytes_AS_STRING
from posix.time cimport clock_gettime, timespec, CLOCK_REALTIME
import os

from anbao.core.codec cimport C_OP_GRAB, S_ALREADY_CLAIMED, S_EXPIRED, S_NOT_ELIGIBLE, S_OK, S_SOLD_OUT
from anbao.core.codec cimport encode_error, encode_grab, rd_u64

from anbao_client.protocol import Status

C_MODES = {"RANDOM": C_MODE_RANDOM, "FIXED": C_MODE_FIXED}


# ---------------------------------------------------------------- randomness

cdef inline uint64_t rotl(uint64_t x, int k) noexcept nogil:
    return (x << k) | (x >> (64 - k))


cdef class Rng:
    """xoshiro256** seeded from os.urandom: luck, not secrecy, is at stake
    (which share a user gets is already decided by arrival order)."""

    def __cinit__(self, seed=None):
        cdef bytes raw = os.urandom(32) if seed is None else int(seed).to_bytes(32, "little")
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(raw)
        cdef int i
        for i in range(4):
            self.s[i] = rd_u64(p + 8 * i) | 1  # never the all-zero state

    cdef uint64_t next(self) noexcept nogil:
        cdef uint64_t result = rotl(self.s[1] * 5, 7) * 9
        cdef uint64_t t = self.s[1] << 17
        self.s[2] ^= self.s[0]
        self.s[3] ^= self.s[1]
        self.s[1] ^= self.s[2]
        self.s[0] ^= self.s[3]
        self.s[2] ^= t
        self.s[3] = rotl(self.s[3], 45)
        return result

    cdef uint64_t below(self, uint64_t n) noexcept nogil:
        # Rejection keeps the draw unbiased for every n.
        cdef uint64_t threshold = (0 - n) % n
        cdef uint64_t r = self.next()
        while r < threshold:
            r = self.next()
        return r % n

    def randbelow(self, uint64_t n):
        assert n > 0
        return self.below(n)


# ---------------------------------------------------------------- splitting

cdef int64_t draw_share(int mode, int64_t total_cents, int32_t count, int64_t min_share_cents,
                        int64_t remaining_cents, int32_t remaining_count, Rng rng,
                        int64_t max_share_cents=0) except -1:
    """The next share: fixed mode gives total // count, the first
    total % count shares one cent more; random mode is WeChat's double-mean
    rule, a draw in [min, 2 x remaining mean] that leaves every later share at
    least min, the last share taking the rest.

    max_share_cents > 0 caps every share (ProductRules.max_share_cents, remembered by the
    packet): the draw is then in [max(min, remaining - max x (left - 1)),
    min(2 x mean, remaining - min x (left - 1), max)], so what is left can
    always be split into shares of at most max, the last one included. The
    interval is never empty while remaining <= max x left, which SEND
    guarantees (total <= count x max) and every draw keeps. In fixed mode
    the largest share is ceil(total / count) <= max by the same check.
    max_share_cents = 0 (packets from before the cap) draws exactly as before."""
    assert remaining_count >= 1 and remaining_cents >= min_share_cents * remaining_count
    assert max_share_cents == 0 or (max_share_cents >= min_share_cents and remaining_cents <= max_share_cents * remaining_count)
    cdef int64_t amount, upper, lower, seq
    if remaining_count == 1:
        amount = remaining_cents
    elif mode == C_MODE_FIXED:
        seq = count - remaining_count + 1
        amount = total_cents // count + (1 if seq <= total_cents % count else 0)
    else:
        upper = (remaining_cents * 2) // remaining_count
        if upper > remaining_cents - min_share_cents * (remaining_count - 1):
            upper = remaining_cents - min_share_cents * (remaining_count - 1)
        lower = min_share_cents
        if max_share_cents:
            if upper > max_share_cents:
                upper = max_share_cents
            if lower < remaining_cents - max_share_cents * (remaining_count - 1):
                lower = remaining_cents - max_share_cents * (remaining_count - 1)
        assert min_share_cents <= lower <= upper
        amount = lower + <int64_t>rng.below(<uint64_t>(upper - lower + 1))
    assert min_share_cents <= amount <= remaining_cents
    assert remaining_cents - amount >= min_share_cents * (remaining_count - 1)
    assert max_share_cents == 0 or (amount <= max_share_cents and remaining_cents - amount <= max_share_cents * (remaining_count - 1))
    return amount


def split(int mode, int64_t total_cents, int32_t count, int64_t min_share_cents=1, Rng rng=None, int64_t max_share_cents=0):
    """All shares of a packet in grab order, by the same rule GRAB uses
    (max_share_cents > 0: no share above it)."""
    if rng is None:
        rng = Rng()
    validate_split(mode, total_cents, count, min_share_cents, max_share_cents)
    cdef list shares = []
    cdef int64_t remaining = total_cents
    cdef int32_t left = count
    cdef int64_t a
    while left:
        a = draw_share(mode, total_cents, count, min_share_cents, remaining, left, rng, max_share_cents)
        shares.append(a)
        remaining -= a
        left -= 1
    assert remaining == 0
    return shares


def validate_split(int mode, int64_t total_cents, int32_t count, int64_t min_share_cents, int64_t max_share_cents=0):
    if mode != C_MODE_RANDOM and mode != C_MODE_FIXED:
        raise ValueError("mode must be random (1) or fixed (2)")
    if count < 1:
        raise ValueError("count must be at least 1")
    if min_share_cents < 1:
        raise ValueError("minimum share is at least 1 cent")
    if total_cents < min_share_cents * count:
        raise ValueError("total below count x minimum share")
    if max_share_cents < 0 or (max_share_cents and max_share_cents < min_share_cents):
        raise ValueError("maximum share is 0 (none) or at least the minimum share")
    if max_share_cents and total_cents > max_share_cents * count:
        raise ValueError("total above count x maximum share")


# ================================================================ the packet and its batches


# ---------------------------------------------------------------- where a grab is decided
#
# A GRAB's outcome, in the order it is decided (as TigerBeetle lists its
# result codes in order): the first row that applies is the answer. Each
# row is (status, where it is checked, the outcomes of take() that still
# win over it although it is checked before take(), why it ranks there).
# The checks before take() ask PacketState.yields(); take() keeps its own
# rows' order in code, and tests/unit/test_grab_precedence.py holds both
# to this table. A worker that does not own the packet answers only what
# the owner answered (the router's final knowledge, ARCHITECTURE.md I9), or
# relays the grab: it adds no row.
GRAB_PRECEDENCE = (
    (Status.UNAUTHENTICATED, "connection", (), "nothing but HELLO is served before it"),
    (Status.RATE_LIMITED, "connection: the token's bucket", (), "a limited request is not even routed"),
    (Status.WRONG_SET, "connection: the set gate", (), "another set's packet: its set decides"),
    (Status.NOT_FOUND, "owner: loading the packet", (), "there is nothing to decide on"),
    (Status.UNKNOWN_USER, "owner: GrabEngine.on_grab", (Status.ALREADY_CLAIMED, Status.SOLD_OUT),
     "an open packet's grabber needs a wallet, but a final answer needs none"),
    (Status.BUSY, "owner: GrabEngine._decide", (), "the grab queue is full: nothing is decided"),
    (Status.COOLING_DOWN, "owner: GrabEngine._decide", (Status.ALREADY_CLAIMED,),
     "a fresh decision waits; a share the user holds is still theirs"),
    (Status.ALREADY_CLAIMED, "owner: PacketState.take", (), "a retry gets the first answer"),
    (Status.NOT_ELIGIBLE, "owner: PacketState.take", (), "not this user's packet, whatever is left"),
    (Status.SOLD_OUT, "owner: PacketState.take", (), "every share is taken"),
    (Status.EXPIRED, "owner: PacketState.take", (), "shares are left, but too late"),
    (Status.OK, "owner: PacketState.take", (), "a share, reserved until its batch commits"),
)
# The final refusals' texts, wherever they are answered (the owner, the
# router's final knowledge, admission's final sets).
GRAB_TEXT = {
    S_SOLD_OUT: "every share has been taken",
    S_EXPIRED: "the packet has expired",
    S_NOT_ELIGIBLE: "this user may not open this packet",
}
cdef dict _YIELDS_TO = {int(row[0]): tuple(int(s) for s in row[2]) for row in GRAB_PRECEDENCE}


cdef class PacketState:
    """One open packet as its owner holds it in memory.

    take() is the serialization point: the event loop runs it for one grab at
    a time, in arrival order, so the packet's FIFO queue needs no lock. A
    share taken here is *reserved* until the batch that carries it commits;
    a failed batch makes the owner drop this object and reload it from the
    database, so memory never runs ahead of what is durable for long.
    """
    # The last take()'s share, read right after it without a tuple allocation.

    def __cinit__(self, int64_t packet_id, int64_t sender_id, int64_t total_cents, int32_t share_count,
                  int mode, int64_t min_share_cents, int64_t expires_at_ms, eligible=None,
                  claims=(), bint closed=False, int64_t max_share_cents=0):
        validate_split(mode, total_cents, share_count, min_share_cents, max_share_cents)
        self.packet_id = packet_id
        self.sender_id = sender_id
        self.total_cents = total_cents
        self.share_count = share_count
        self.mode = mode
        self.min_share_cents = min_share_cents
        self.max_share_cents = max_share_cents
        self.expires_at_ms = expires_at_ms
        self._eligible = frozenset(eligible) if eligible is not None else None
        self._claims = {}
        self._by_seq = []
        self._luckiest = 0
        self.facts = None
        self.remaining_cents = total_cents
        self.taken_count = 0
        cdef int32_t seq
        cdef int64_t amount
        for seq, user_id, amount in sorted((c[1], c[0], c[2]) for c in claims):
            assert seq == self.taken_count + 1, "claims must be numbered 1..n"
            assert user_id not in self._claims, "a user claims once"
            self._claims[user_id] = (amount, seq)
            self._by_seq.append((user_id, amount))
            self.remaining_cents -= amount
            self.taken_count = seq
        assert self.taken_count <= share_count and self.remaining_cents >= 0
        assert self.remaining_cents >= min_share_cents * (share_count - self.taken_count)
        assert max_share_cents == 0 or self.remaining_cents <= max_share_cents * (share_count - self.taken_count)
        self.committed_count = self.taken_count
        self.closed = closed

    cpdef int take(self, int64_t user_id, int64_t now_ms, Rng rng) except -1:
        """Decides one grab. On OK the share is reserved and
        last_amount_cents/last_seq name it; on ALREADY_CLAIMED they name the
        user's earlier share."""
        cdef tuple prior = self._claims.get(user_id)
        if prior is not None:
            self.last_amount_cents = prior[0]
            self.last_seq = prior[1]
            return S_ALREADY_CLAIMED
        if user_id == self.sender_id or (self._eligible is not None and user_id not in self._eligible):
            return S_NOT_ELIGIBLE
        if self.taken_count >= self.share_count:
            return S_SOLD_OUT
        if self.closed or now_ms >= self.expires_at_ms:
            return S_EXPIRED
        cdef int64_t amount = draw_share(self.mode, self.total_cents, self.share_count, self.min_share_cents,
                                         self.remaining_cents, self.share_count - self.taken_count, rng, self.max_share_cents)
        self.taken_count += 1
        self.remaining_cents -= amount
        self._claims[user_id] = (amount, self.taken_count)
        self._by_seq.append((user_id, amount))
        self.last_amount_cents = amount
        self.last_seq = self.taken_count
        assert self.remaining_cents >= 0 and self.taken_count <= self.share_count
        assert (self.taken_count < self.share_count) or self.remaining_cents == 0
        return S_OK

    cpdef bint yields(self, int status, int64_t user_id):
        """Whether a check for `status`, made before take(), gives way to an
        outcome of take() that ranks above it (GRAB_PRECEDENCE)."""
        cdef int first
        for first in _YIELDS_TO[status]:
            if first == S_ALREADY_CLAIMED and user_id in self._claims:
                return True
            if first == S_SOLD_OUT and self.taken_count >= self.share_count:
                return True
        return False

    cpdef is_reserved(self, int32_t seq):
        return seq > self.committed_count

    cpdef void mark_committed(self, int32_t seq):
        # Batches commit in order, so the highest committed seq is a watermark.
        assert seq <= self.taken_count
        if seq > self.committed_count:
            self.committed_count = seq

    def close(self):
        self.closed = True

    def committed_claims(self, Py_ssize_t offset, Py_ssize_t limit):
        """What the database holds durable for this packet, as PACKET shows
        it: (claimed_count, claimed_cents, luckiest seq, [(seq, user_id,
        amount_cents)] from `offset`, at most `limit`). Only committed
        shares (seq 1..committed_count) count; the luckiest (the largest
        share, the lowest seq among equals) is named once every share is
        committed, 0 before."""
        cdef int32_t n = self.committed_count
        cdef int64_t reserved_cents = 0
        cdef Py_ssize_t i
        for i in range(n, self.taken_count):
            reserved_cents += self._by_seq[i][1]
        claimed_cents = self.total_cents - self.remaining_cents - reserved_cents
        if n == self.share_count and self._luckiest == 0:
            self._luckiest = 1 + max(range(n), key=lambda j: (self._by_seq[j][1], -j))
        page = [(j + 1, self._by_seq[j][0], self._by_seq[j][1]) for j in range(offset, min(n, offset + limit))]
        return n, claimed_cents, (self._luckiest if n == self.share_count else 0), page

    @property
    def open_audience(self):
        return self._eligible is None

    @property
    def remaining_count(self):
        return self.share_count - self.taken_count

    @property
    def sold_out(self):
        return self.taken_count >= self.share_count

    def claim_of(self, int64_t user_id):
        return self._claims.get(user_id)


def user_bits(users, int nbits):
    """A batch's users as a bitmap of nbits bits (a power of two, a whole
    number of bytes): bit (user_id & (nbits - 1)) set for each, bit k in
    byte k >> 3 at 1 << (k & 7), as PostgreSQL's get_bit numbers them. Two's
    complement, as `&` is on a bigint there: any user id has its bit."""
    assert nbits >= 8 and nbits & (nbits - 1) == 0
    cdef bytearray out = bytearray(nbits >> 3)
    cdef unsigned char[:] view = out
    cdef uint64_t mask = <uint64_t>(nbits - 1)
    cdef uint64_t k
    cdef int64_t u
    for u in users:
        k = (<uint64_t>u) & mask
        view[k >> 3] |= <unsigned char>(1 << (k & 7))
    return bytes(out)


cpdef int64_t now_ms() noexcept:
    """Wall-clock milliseconds, the clock expiry is decided by."""
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cdef class GrabBatch:
    """The grabs one commit carries, in the order they were decided.

    take() decides a grab on its packet's state and, when it is accepted,
    appends it: one call per grab from the event loop, no tuple per grab.
    The columns (packets, seqs, users, amounts) are what the committer sends
    as arrays; repliers/rids/states say whom to answer. answer_committed()
    answers every grab once the batch is durable."""
    cdef public list packets
    cdef public list seqs
    cdef public list users
    cdef public list amounts
    cdef public list repliers
    cdef public list rids
    cdef public list states
    cdef public list followers     # (replier, rid, state, user_id): a retry of a grab still reserved, or a
                                   # grab that found every share taken while some were still reserved
    cdef public list refunds       # packet ids to refund once this batch's grabs are settled
    cdef public int slot           # the committer's connection carrying it
    cdef public object before      # outcome of the batch built just before it
    cdef public object outcome     # True once durable, False once known not to be
    cdef public bint doomed        # built on a batch that failed: it rolls back too
    cdef public int64_t opened_ns  # monotonic time its first grab joined (engine/waitbound.py)

    def __cinit__(self):
        self.packets, self.seqs, self.users, self.amounts = [], [], [], []
        self.repliers, self.rids, self.states = [], [], []
        self.followers, self.refunds = [], []
        self.slot = -1
        self.before = self.outcome = None
        self.doomed = False
        self.opened_ns = 0

    def __len__(self):
        return len(self.packets)

    cpdef int take(self, PacketState state, object replier, uint32_t rid, int64_t user_id, Rng rng) except -1:
        """Decides the grab (PacketState.take); on OK it joins this batch."""
        cdef int status = state.take(user_id, now_ms(), rng)
        if status == S_OK:
            self.packets.append(state.packet_id)
            self.seqs.append(state.last_seq)
            self.users.append(user_id)
            self.amounts.append(state.last_amount_cents)
            self.repliers.append(replier)
            self.rids.append(rid)
            self.states.append(state)
        return status

    def answer_committed(self, uint16_t worker):
        """The batch is durable: each grab is answered OK with its share,
        each follower ALREADY_CLAIMED with the first grab's share, or
        SOLD_OUT if it waited, holding none, for the last shares to commit."""
        cdef Py_ssize_t i, n = len(self.packets)
        cdef PacketState state
        cdef int32_t seq
        cdef tuple claim
        for i in range(n):
            state = <PacketState>self.states[i]
            seq = self.seqs[i]
            state.mark_committed(seq)
            self.repliers[i].answer(encode_grab(self.rids[i], S_OK, worker, self.amounts[i], seq, state.share_count - seq))
        for f in self.followers:
            state = <PacketState>f[2]
            claim = state.claim_of(f[3])
            if claim is None:   # waited for the packet's last shares to be durable: sold out for good
                f[0].answer(encode_error(C_OP_GRAB, f[1], S_SOLD_OUT, worker, "every share has been taken"))
            else:
                f[0].answer(encode_grab(f[1], S_ALREADY_CLAIMED, worker, claim[0], claim[1],
                                        state.share_count - <int32_t>claim[1]))

    def replies(self):
        """(replier, rid, state) of every grab and follower: whom a failure answers."""
        out = list(zip(self.repliers, self.rids, self.states))
        out += [f[:3] for f in self.followers]
        return out

    def packet_ids(self):
        return set(self.packets) | {(<PacketState>f[2]).packet_id for f in self.followers}

    def drop_packets(self, packet_ids):
        """Removes the grabs and followers of these packets; returns their
        (replier, rid, state), to be answered."""
        cdef Py_ssize_t i, n = len(self.packets)
        dropped = []
        keep = []
        for i in range(n):
            if self.packets[i] in packet_ids:
                dropped.append((self.repliers[i], self.rids[i], self.states[i]))
            else:
                keep.append(i)
        if dropped:
            for name in ("packets", "seqs", "users", "amounts", "repliers", "rids", "states"):
                col = getattr(self, name)
                setattr(self, name, [col[i] for i in keep])
        dropped += [f[:3] for f in self.followers if (<PacketState>f[2]).packet_id in packet_ids]
        self.followers = [f for f in self.followers if (<PacketState>f[2]).packet_id not in packet_ids]
        return dropped
