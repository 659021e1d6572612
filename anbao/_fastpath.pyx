# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The hot code of anbao: the wire codec, share splitting and per-packet state.

Everything here runs on the event loop thread of one worker; nothing blocks
and nothing allocates more than the answer it returns. The byte layout is
specified in PROTOCOL.md; the pure-Python SDK codec (client/anbao_client/
wire.py) is a second, independent implementation and the tests hold both to
the same hex vectors.
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t, int32_t
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
import os

# ---------------------------------------------------------------- constants

PROTOCOL_VERSION = 1
HEADER_BYTES = 9            # u32 length, u8 opcode, u32 request id
RESPONSE_HEADER_BYTES = 12  # + u8 status, u16 worker id
IDEMPOTENCY_KEY_BYTES = 16
MAX_REGISTER_IDS = 1024
MAX_TOKEN_BYTES = 256
MAX_GREETING_BYTES = 256
MAX_CLAIMS_PAGE = 1000
MAX_GROUP_NAME_BYTES = 128
MAX_ID = 0x7FFFFFFFFFFFFFFF  # ids live in PostgreSQL BIGINT
cdef uint64_t C_MAX_ID = 0x7FFFFFFFFFFFFFFFULL
cdef enum:
    C_HEADER_BYTES = 9
    C_RESPONSE_HEADER_BYTES = 12
    C_KEY_BYTES = 16
    C_MAX_REGISTER_IDS = 1024
    C_MAX_TOKEN_BYTES = 256
    C_MAX_GREETING_BYTES = 256
    C_MAX_CLAIMS_PAGE = 1000
    C_MAX_GROUP_NAME_BYTES = 128
    C_MODE_RANDOM = 1
    C_MODE_FIXED = 2

cdef enum:
    C_OP_HELLO = 0x01
    C_OP_PING = 0x02
    C_OP_REGISTER = 0x10
    C_OP_DEPOSIT = 0x11
    C_OP_BALANCE = 0x12
    C_OP_WITHDRAW = 0x13
    C_OP_STATEMENT = 0x14
    C_OP_AUDIT = 0x15
    C_OP_SEND = 0x20
    C_OP_GRAB = 0x21
    C_OP_PACKET = 0x22
    C_OP_TOPOLOGY = 0x50
    C_OP_STATS = 0x51
    C_OP_SENT_LIST = 0x24
    C_OP_RECEIVED_LIST = 0x25
    C_OP_GROUP_CREATE = 0x30
    C_OP_GROUP_ADD = 0x31
    C_OP_GROUP_REMOVE = 0x32
    C_OP_GROUP_INFO = 0x33

OP_HELLO = C_OP_HELLO
OP_PING = C_OP_PING
OP_REGISTER = C_OP_REGISTER
OP_DEPOSIT = C_OP_DEPOSIT
OP_BALANCE = C_OP_BALANCE
OP_SEND = C_OP_SEND
OP_GRAB = C_OP_GRAB
OP_PACKET = C_OP_PACKET
OP_TOPOLOGY = C_OP_TOPOLOGY
OP_STATS = C_OP_STATS
OP_WITHDRAW = C_OP_WITHDRAW
OP_STATEMENT = C_OP_STATEMENT
OP_AUDIT = C_OP_AUDIT
OP_SENT_LIST = C_OP_SENT_LIST
OP_RECEIVED_LIST = C_OP_RECEIVED_LIST
OP_GROUP_CREATE = C_OP_GROUP_CREATE
OP_GROUP_ADD = C_OP_GROUP_ADD
OP_GROUP_REMOVE = C_OP_GROUP_REMOVE
OP_GROUP_INFO = C_OP_GROUP_INFO
RESPONSE_BIT = 0x80

cdef enum:
    S_OK = 0
    S_SOLD_OUT = 1
    S_ALREADY_CLAIMED = 2
    S_EXPIRED = 3
    S_NOT_ELIGIBLE = 4
    S_INSUFFICIENT_FUNDS = 5
    S_INVALID = 6
    S_BUSY = 7
    S_UNAVAILABLE = 8
    S_UNAUTHENTICATED = 9
    S_FORBIDDEN = 10
    S_NOT_FOUND = 11
    S_UNKNOWN_USER = 12
    S_IDEMPOTENCY_CONFLICT = 13
    S_UNSUPPORTED_VERSION = 14
    S_UNKNOWN_OPCODE = 15
    S_FRAME_TOO_LARGE = 16
    S_UNKNOWN_GROUP = 17
    S_IN_DOUBT = 18
    S_INTERNAL = 255

OK = S_OK
SOLD_OUT = S_SOLD_OUT
ALREADY_CLAIMED = S_ALREADY_CLAIMED
EXPIRED = S_EXPIRED
NOT_ELIGIBLE = S_NOT_ELIGIBLE
INSUFFICIENT_FUNDS = S_INSUFFICIENT_FUNDS
INVALID = S_INVALID
BUSY = S_BUSY
UNAVAILABLE = S_UNAVAILABLE
UNAUTHENTICATED = S_UNAUTHENTICATED
FORBIDDEN = S_FORBIDDEN
NOT_FOUND = S_NOT_FOUND
UNKNOWN_USER = S_UNKNOWN_USER
IDEMPOTENCY_CONFLICT = S_IDEMPOTENCY_CONFLICT
UNSUPPORTED_VERSION = S_UNSUPPORTED_VERSION
UNKNOWN_OPCODE = S_UNKNOWN_OPCODE
FRAME_TOO_LARGE = S_FRAME_TOO_LARGE
UNKNOWN_GROUP = S_UNKNOWN_GROUP
IN_DOUBT = S_IN_DOUBT      # a relayed GRAB's owner died with it in flight: it may have landed, retry is safe
INTERNAL = S_INTERNAL

MODE_RANDOM = 1
MODE_FIXED = 2
AUDIENCE_OPEN = 0       # any registered user
AUDIENCE_DIRECT = 1     # exactly one named user, one share
AUDIENCE_MEMBERS = 2    # the member list given at send time
AUDIENCE_GROUP = 3      # a group's members, snapshotted at send time

PACKET_OPEN = 0
PACKET_SOLD_OUT = 1
PACKET_EXPIRED = 2      # past expiry, remainder not yet refunded
PACKET_REFUNDED = 3


class FramingError(Exception):
    """The byte stream cannot be split into frames; the connection must close.

    `frames` holds the frames that were complete before the bad one in the
    same feed(), decoded as feed() returns them: they are requests like any
    other and get their answers before the error frame."""

    def __init__(self, int status, str message, list frames=None):
        super().__init__(message)
        self.status = status
        self.frames = frames if frames is not None else []


class BadRequest(Exception):
    """A frame arrived whole but its payload is not a valid request."""

    def __init__(self, int status, str message):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- byte access

cdef inline uint16_t rd_u16(const unsigned char* p) nogil:
    return (<uint16_t>p[0] << 8) | p[1]

cdef inline uint32_t rd_u32(const unsigned char* p) nogil:
    return ((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16)
            | (<uint32_t>p[2] << 8) | p[3])

cdef inline uint64_t rd_u64(const unsigned char* p) nogil:
    return (<uint64_t>rd_u32(p) << 32) | rd_u32(p + 4)

cdef inline void wr_u16(unsigned char* p, uint16_t v) noexcept nogil:
    p[0] = v >> 8
    p[1] = v & 0xFF

cdef inline void wr_u32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF

cdef inline void wr_u64(unsigned char* p, uint64_t v) noexcept nogil:
    wr_u32(p, <uint32_t>(v >> 32))
    wr_u32(p + 4, <uint32_t>(v & <uint64_t>0xFFFFFFFFU))


cdef struct Cursor:
    const unsigned char* p
    Py_ssize_t pos
    Py_ssize_t end


cdef inline int need(Cursor* c, Py_ssize_t n) except -1:
    if c.end - c.pos < n:
        raise BadRequest(S_INVALID, "payload too short")
    return 0

cdef inline int64_t take_id(Cursor* c, str what) except -1:
    need(c, 8)
    cdef uint64_t v = rd_u64(c.p + c.pos)
    c.pos += 8
    if v == 0 or v > C_MAX_ID:
        raise BadRequest(S_INVALID, what + " out of range")
    return <int64_t>v

cdef inline int64_t take_cursor(Cursor* c) except -1:
    # A page cursor: 0 starts from the newest row, anything else is an
    # opaque position the previous answer gave (an id, so within BIGINT).
    need(c, 8)
    cdef uint64_t v = rd_u64(c.p + c.pos)
    c.pos += 8
    if v > C_MAX_ID:
        raise BadRequest(S_INVALID, "cursor out of range")
    return <int64_t>v

cdef inline list take_ids(Cursor* c, uint32_t n, str what):
    # Bounded by the frame itself: each id is 8 bytes of this payload.
    if <Py_ssize_t>n * 8 > c.end - c.pos:
        raise BadRequest(S_INVALID, what + " list longer than the frame")
    cdef list ids = []
    cdef uint32_t i
    for i in range(n):
        ids.append(take_id(c, what))
    return ids

cdef inline int64_t take_amount(Cursor* c) except? -1:
    # Signed on the wire so that a negative amount is visible as such and
    # rejected, rather than wrapping into a huge positive one.
    need(c, 8)
    cdef int64_t v = <int64_t>rd_u64(c.p + c.pos)
    c.pos += 8
    if v <= 0:
        raise BadRequest(S_INVALID, "amount_cents must be positive")
    return v

cdef inline uint32_t take_u32(Cursor* c) except? 0xFFFFFFFF:
    need(c, 4)
    cdef uint32_t v = rd_u32(c.p + c.pos)
    c.pos += 4
    return v

cdef inline uint16_t take_u16(Cursor* c) except? 0xFFFF:
    need(c, 2)
    cdef uint16_t v = rd_u16(c.p + c.pos)
    c.pos += 2
    return v

cdef inline uint8_t take_u8(Cursor* c) except? 0xFF:
    need(c, 1)
    cdef uint8_t v = c.p[c.pos]
    c.pos += 1
    return v

cdef inline bytes take_bytes(Cursor* c, Py_ssize_t n):
    need(c, n)
    cdef bytes b = PyBytes_FromStringAndSize(<const char*>(c.p + c.pos), n)
    c.pos += n
    return b

cdef inline str take_text(Cursor* c, Py_ssize_t max_bytes, str what):
    cdef uint16_t n = take_u16(c)
    if n > max_bytes:
        raise BadRequest(S_INVALID, what + " too long")
    cdef bytes raw = take_bytes(c, n)
    # Every text is stored in PostgreSQL, whose text type cannot hold U+0000:
    # refused here, typed, rather than failing inside a transaction.
    if b"\x00" in raw:
        raise BadRequest(S_INVALID, what + " contains a NUL byte")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(S_INVALID, what + " is not UTF-8")

cdef inline int done(Cursor* c) except -1:
    if c.pos != c.end:
        raise BadRequest(S_INVALID, "trailing bytes after payload")
    return 0


# ---------------------------------------------------------------- requests

cdef tuple decode_payload(int opcode, const unsigned char* p, Py_ssize_t start, Py_ssize_t end):
    cdef Cursor c
    c.p = p
    c.pos = start
    c.end = end
    cdef uint32_t i, n
    cdef list ids
    cdef tuple out
    if opcode == C_OP_GRAB:
        out = (take_id(&c, "packet_id"), take_id(&c, "user_id"))
    elif opcode == C_OP_PING or opcode == C_OP_TOPOLOGY or opcode == C_OP_STATS:
        out = ()
    elif opcode == C_OP_HELLO:
        version = take_u16(&c)
        n = take_u16(&c)
        if n > C_MAX_TOKEN_BYTES:
            raise BadRequest(S_INVALID, "token too long")
        out = (version, take_bytes(&c, n))
    elif opcode == C_OP_REGISTER:
        n = take_u16(&c)
        if n == 0 or n > C_MAX_REGISTER_IDS:
            raise BadRequest(S_INVALID, "register takes 1..1024 user ids")
        ids = []
        for i in range(n):
            ids.append(take_id(&c, "user_id"))
        out = (ids,)
    elif opcode == C_OP_DEPOSIT:
        key = take_bytes(&c, C_KEY_BYTES)
        out = (key, take_id(&c, "user_id"), take_amount(&c))
    elif opcode == C_OP_BALANCE:
        out = (take_id(&c, "user_id"),)
    elif opcode == C_OP_SEND:
        key = take_bytes(&c, C_KEY_BYTES)
        sender = take_id(&c, "sender_id")
        total = take_amount(&c)
        count = take_u32(&c)
        mode = take_u8(&c)
        expiry_s = take_u32(&c)
        audience = take_u8(&c)
        n = take_u32(&c)
        # Bounded by the frame itself: each id is 8 bytes of this payload.
        if <Py_ssize_t>n * 8 > c.end - c.pos:
            raise BadRequest(S_INVALID, "member list longer than the frame")
        ids = []
        for i in range(n):
            ids.append(take_id(&c, "member_id"))
        greeting = take_text(&c, C_MAX_GREETING_BYTES, "greeting")
        out = (key, sender, total, count, mode, expiry_s, audience, ids, greeting)
    elif opcode == C_OP_PACKET:
        out = (take_id(&c, "packet_id"), take_u32(&c), take_u16(&c))
    elif opcode == C_OP_WITHDRAW:
        key = take_bytes(&c, C_KEY_BYTES)
        out = (key, take_id(&c, "user_id"), take_amount(&c))
    elif opcode == C_OP_STATEMENT or opcode == C_OP_SENT_LIST or opcode == C_OP_RECEIVED_LIST:
        out = (take_id(&c, "user_id"), take_cursor(&c), take_u16(&c))
    elif opcode == C_OP_AUDIT:
        out = ()
    elif opcode == C_OP_GROUP_CREATE:
        group = take_id(&c, "group_id")
        name = take_text(&c, C_MAX_GROUP_NAME_BYTES, "group name")
        n = take_u16(&c)
        out = (group, name, take_ids(&c, n, "member_id"))
    elif opcode == C_OP_GROUP_ADD or opcode == C_OP_GROUP_REMOVE:
        group = take_id(&c, "group_id")
        n = take_u16(&c)
        out = (group, take_ids(&c, n, "user_id"))
    elif opcode == C_OP_GROUP_INFO:
        out = (take_id(&c, "group_id"), take_cursor(&c), take_u16(&c))
    else:
        raise BadRequest(S_UNKNOWN_OPCODE, "unknown opcode 0x%02x" % opcode)
    done(&c)
    return out


cdef class FrameDecoder:
    """Splits a byte stream into frames and decodes each payload at once.

    A frame that lies whole inside one received chunk is read in place; only
    a frame cut across chunks is copied, into the small carry-over buffer.
    """
    cdef bytes _carry
    cdef readonly Py_ssize_t max_frame_bytes
    cdef readonly bint broken

    def __cinit__(self, Py_ssize_t max_frame_bytes=65536):
        assert HEADER_BYTES <= max_frame_bytes <= 16 * 1024 * 1024
        self._carry = b""
        self.max_frame_bytes = max_frame_bytes
        self.broken = False

    def feed(self, bytes data):
        """Returns a list of (opcode, request_id, args) where args is a tuple
        of decoded fields or a BadRequest; raises FramingError when the
        stream cannot be framed (the caller closes the connection), carrying
        in its `frames` the frames that were whole before the bad one. Once
        broken, the decoder reads nothing more: bytes after a bad length
        are not frames."""
        if self.broken:
            return []
        cdef bytes buf
        if PyBytes_GET_SIZE(self._carry):
            buf = self._carry + data
        else:
            buf = data
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(buf)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(buf)
        cdef Py_ssize_t pos = 0
        cdef uint32_t length
        cdef int opcode
        cdef uint32_t rid
        cdef list frames = []
        while size - pos >= 4:
            length = rd_u32(p + pos)
            if length < 5:
                self._break()
                raise FramingError(S_INVALID, "frame length below header size", frames)
            if <Py_ssize_t>length + 4 > self.max_frame_bytes:
                self._break()
                raise FramingError(S_FRAME_TOO_LARGE, "frame of %d bytes over limit %d"
                                   % (length + 4, self.max_frame_bytes), frames)
            if size - pos < <Py_ssize_t>length + 4:
                break
            opcode = p[pos + 4]
            rid = rd_u32(p + pos + 5)
            try:
                args = decode_payload(opcode, p, pos + C_HEADER_BYTES, pos + 4 + length)
            except BadRequest as exc:
                args = exc
            frames.append((opcode, rid, args))
            pos += 4 + length
        self._carry = buf[pos:] if pos < size else b""
        return frames

    cdef void _break(self):
        self.broken = True
        self._carry = b""

    @property
    def buffered_bytes(self):
        return PyBytes_GET_SIZE(self._carry)


# ---------------------------------------------------------------- responses

cdef inline bytes new_frame(int opcode, uint32_t rid, int status, uint16_t worker,
                            Py_ssize_t body_bytes, unsigned char** body):
    cdef Py_ssize_t total = C_RESPONSE_HEADER_BYTES + body_bytes
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    wr_u32(p, <uint32_t>(total - 4))
    p[4] = (opcode | RESPONSE_BIT) & 0xFF
    wr_u32(p + 5, rid)
    p[9] = status & 0xFF
    wr_u16(p + 10, worker)
    body[0] = p + C_RESPONSE_HEADER_BYTES
    return out


cpdef bytes encode_error(int opcode, uint32_t rid, int status, uint16_t worker, str message):
    assert status != S_OK
    cdef bytes msg = message.encode("utf-8")[:1024]
    cdef unsigned char* b
    cdef bytes out = new_frame(opcode, rid, status, worker, 2 + len(msg), &b)
    wr_u16(b, len(msg))
    memcpy(b + 2, PyBytes_AS_STRING(msg), len(msg))
    return out


cpdef bytes encode_grab(uint32_t rid, int status, uint16_t worker, int64_t amount_cents,
                        uint32_t seq, uint32_t remaining_count):
    """The answer to GRAB when a share is involved (OK or ALREADY_CLAIMED)."""
    assert status == S_OK or status == S_ALREADY_CLAIMED
    assert amount_cents > 0 and seq > 0
    cdef unsigned char* b
    cdef bytes out = new_frame(C_OP_GRAB, rid, status, worker, 16, &b)
    wr_u64(b, <uint64_t>amount_cents)
    wr_u32(b + 8, seq)
    wr_u32(b + 12, remaining_count)
    return out


cdef Py_ssize_t layout_bytes(str layout, tuple values) except -1:
    """Body bytes of values laid out by letter: B u8, H u16, I u32, Q u64,
    q i64, s text (u16 length + UTF-8)."""
    cdef Py_ssize_t n = 0
    cdef Py_ssize_t i
    cdef str ch
    assert len(layout) == len(values)
    for i in range(len(layout)):
        ch = layout[i]
        if ch == "B": n += 1
        elif ch == "H": n += 2
        elif ch == "I": n += 4
        elif ch == "Q" or ch == "q": n += 8
        elif ch == "s": n += 2 + len((<str>values[i]).encode("utf-8"))
        else: raise ValueError("bad layout letter " + ch)
    return n


cdef unsigned char* write_layout(unsigned char* b, str layout, tuple values) except NULL:
    cdef Py_ssize_t i
    cdef str ch
    cdef bytes raw
    for i in range(len(layout)):
        ch = layout[i]
        v = values[i]
        if ch == "B":
            assert 0 <= v <= 0xFF
            b[0] = v
            b += 1
        elif ch == "H":
            assert 0 <= v <= 0xFFFF
            wr_u16(b, v)
            b += 2
        elif ch == "I":
            assert 0 <= v <= 0xFFFFFFFF
            wr_u32(b, v)
            b += 4
        elif ch == "Q":
            assert 0 <= v <= 0xFFFFFFFFFFFFFFFF
            wr_u64(b, <uint64_t>v)
            b += 8
        elif ch == "q":
            assert -0x8000000000000000 <= v <= 0x7FFFFFFFFFFFFFFF
            wr_u64(b, <uint64_t>(<int64_t>v))
            b += 8
        else:
            raw = (<str>v).encode("utf-8")
            assert len(raw) <= 0xFFFF
            wr_u16(b, len(raw))
            memcpy(b + 2, PyBytes_AS_STRING(raw), len(raw))
            b += 2 + len(raw)
    return b


cpdef bytes encode_ok(int opcode, uint32_t rid, uint16_t worker, str layout, tuple values):
    """Encodes an OK answer whose body is a fixed sequence of fields.

    layout is one letter a field: B u8, H u16, I u32, Q u64, q i64, s text.
    Used for the small answers off the hot path (HELLO, DEPOSIT, SEND...).
    """
    cdef unsigned char* b
    cdef bytes out = new_frame(opcode, rid, S_OK, worker, layout_bytes(layout, values), &b)
    write_layout(b, layout, values)
    return out


cpdef bytes encode_list(int opcode, uint32_t rid, uint16_t worker, str head_layout, tuple head,
                        str row_layout, list rows):
    """An OK answer that is a head, then u16 n, then n rows of one layout:
    the paged queries (statement, sent and received packets, group members)."""
    assert len(rows) <= 0xFFFF
    cdef Py_ssize_t n = layout_bytes(head_layout, head) + 2
    cdef tuple row
    for row in rows:
        n += layout_bytes(row_layout, row)
    cdef unsigned char* b
    cdef bytes out = new_frame(opcode, rid, S_OK, worker, n, &b)
    b = write_layout(b, head_layout, head)
    wr_u16(b, len(rows))
    b += 2
    for row in rows:
        b = write_layout(b, row_layout, row)
    return out


cpdef bytes encode_packet(uint32_t rid, uint16_t worker, tuple head, str greeting, list claims):
    """PACKET's answer: a fixed head, the greeting, then a page of claims
    (each (seq, user_id, amount_cents))."""
    cdef bytes g = greeting.encode("utf-8")
    assert len(g) <= MAX_GREETING_BYTES and len(claims) <= MAX_CLAIMS_PAGE
    # head: sender Q, total q, count I, mode B, state B, audience B,
    # created_at_ms q, expires_at_ms q, claimed_cents q, claimed_count I,
    # refunded_cents q, luckiest_seq I
    cdef str layout = "QqIBBBqqqIqI"
    cdef bytes fixed = encode_ok(C_OP_PACKET, rid, worker, layout, head)
    cdef Py_ssize_t head_bytes = PyBytes_GET_SIZE(fixed) - C_RESPONSE_HEADER_BYTES
    cdef Py_ssize_t body = head_bytes + 2 + len(g) + 2 + 20 * len(claims)
    cdef unsigned char* b
    cdef bytes out = new_frame(C_OP_PACKET, rid, S_OK, worker, body, &b)
    memcpy(b, PyBytes_AS_STRING(fixed) + C_RESPONSE_HEADER_BYTES, head_bytes)
    b += head_bytes
    wr_u16(b, len(g))
    memcpy(b + 2, PyBytes_AS_STRING(g), len(g))
    b += 2 + len(g)
    wr_u16(b, len(claims))
    b += 2
    for seq, user_id, amount in claims:
        wr_u32(b, seq)
        wr_u64(b + 4, <uint64_t>user_id)
        wr_u64(b + 12, <uint64_t>amount)
        b += 20
    return out


# ---------------------------------------------------------------- randomness

cdef inline uint64_t rotl(uint64_t x, int k) nogil:
    return (x << k) | (x >> (64 - k))


cdef class Rng:
    """xoshiro256** seeded from os.urandom: luck, not secrecy, is at stake
    (which share a user gets is already decided by arrival order)."""
    cdef uint64_t s[4]

    def __cinit__(self, seed=None):
        cdef bytes raw = os.urandom(32) if seed is None else int(seed).to_bytes(32, "little")
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(raw)
        cdef int i
        for i in range(4):
            self.s[i] = rd_u64(p + 8 * i) | 1  # never the all-zero state

    cdef inline uint64_t next(self) nogil:
        cdef uint64_t result = rotl(self.s[1] * 5, 7) * 9
        cdef uint64_t t = self.s[1] << 17
        self.s[2] ^= self.s[0]
        self.s[3] ^= self.s[1]
        self.s[1] ^= self.s[2]
        self.s[0] ^= self.s[3]
        self.s[2] ^= t
        self.s[3] = rotl(self.s[3], 45)
        return result

    cdef inline uint64_t below(self, uint64_t n) nogil:
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

cdef inline int64_t draw_share(int mode, int64_t total_cents, int32_t count, int64_t min_cents,
                               int64_t remaining_cents, int32_t remaining_count, Rng rng) except -1:
    """The next share: fixed mode gives total // count, the first
    total % count shares one cent more; random mode is WeChat's double-mean
    rule, a draw in [min, 2 x remaining mean] that leaves every later share at
    least min, the last share taking the rest."""
    assert remaining_count >= 1 and remaining_cents >= min_cents * remaining_count
    cdef int64_t amount, upper, seq
    if remaining_count == 1:
        amount = remaining_cents
    elif mode == C_MODE_FIXED:
        seq = count - remaining_count + 1
        amount = total_cents // count + (1 if seq <= total_cents % count else 0)
    else:
        upper = (remaining_cents * 2) // remaining_count
        if upper > remaining_cents - min_cents * (remaining_count - 1):
            upper = remaining_cents - min_cents * (remaining_count - 1)
        assert upper >= min_cents
        amount = min_cents + <int64_t>rng.below(<uint64_t>(upper - min_cents + 1))
    assert min_cents <= amount <= remaining_cents
    assert remaining_cents - amount >= min_cents * (remaining_count - 1)
    return amount


def split(int mode, int64_t total_cents, int32_t count, int64_t min_cents=1, Rng rng=None):
    """All shares of a packet in grab order, by the same rule GRAB uses."""
    if rng is None:
        rng = Rng()
    validate_split(mode, total_cents, count, min_cents)
    cdef list shares = []
    cdef int64_t remaining = total_cents
    cdef int32_t left = count
    cdef int64_t a
    while left:
        a = draw_share(mode, total_cents, count, min_cents, remaining, left, rng)
        shares.append(a)
        remaining -= a
        left -= 1
    assert remaining == 0
    return shares


def validate_split(int mode, int64_t total_cents, int32_t count, int64_t min_cents):
    if mode != C_MODE_RANDOM and mode != C_MODE_FIXED:
        raise ValueError("mode must be random (1) or fixed (2)")
    if count < 1:
        raise ValueError("count must be at least 1")
    if min_cents < 1:
        raise ValueError("minimum share is at least 1 cent")
    if total_cents < min_cents * count:
        raise ValueError("total below count x minimum share")


# ---------------------------------------------------------------- packet state

cdef class PacketState:
    """One open packet as its owner holds it in memory.

    take() is the serialization point: the event loop runs it for one grab at
    a time, in arrival order, so the packet's FIFO queue needs no lock. A
    share taken here is *pending* until the batch that carries it commits;
    a failed batch makes the owner drop this object and reload it from the
    database, so memory never runs ahead of what is durable for long.
    """
    cdef readonly int64_t packet_id
    cdef readonly int64_t sender_id
    cdef readonly int64_t total_cents
    cdef readonly int32_t count
    cdef readonly int mode
    cdef readonly int64_t min_cents
    cdef readonly int64_t expires_at_ms
    cdef readonly int64_t remaining_cents   # after every taken share, pending included
    cdef readonly int32_t taken_count       # committed + pending shares
    cdef readonly int32_t committed_count
    cdef readonly bint closed               # expired and refunded: nothing more to take
    cdef object _eligible                   # frozenset of user ids, or None for anyone
    cdef dict _claims                       # user_id -> (amount_cents, seq)
    cdef public object loaded_at            # loop time of load, for cache eviction
    # The last take()'s share, read right after it without a tuple allocation.
    cdef readonly int64_t last_amount_cents
    cdef readonly int32_t last_seq

    def __cinit__(self, int64_t packet_id, int64_t sender_id, int64_t total_cents, int32_t count,
                  int mode, int64_t min_cents, int64_t expires_at_ms, eligible=None,
                  claims=(), bint closed=False):
        validate_split(mode, total_cents, count, min_cents)
        self.packet_id = packet_id
        self.sender_id = sender_id
        self.total_cents = total_cents
        self.count = count
        self.mode = mode
        self.min_cents = min_cents
        self.expires_at_ms = expires_at_ms
        self._eligible = frozenset(eligible) if eligible is not None else None
        self._claims = {}
        self.remaining_cents = total_cents
        self.taken_count = 0
        cdef int32_t seq
        cdef int64_t amount
        for seq, user_id, amount in sorted((c[1], c[0], c[2]) for c in claims):
            assert seq == self.taken_count + 1, "claims must be numbered 1..n"
            assert user_id not in self._claims, "a user claims once"
            self._claims[user_id] = (amount, seq)
            self.remaining_cents -= amount
            self.taken_count = seq
        assert self.taken_count <= count and self.remaining_cents >= 0
        assert self.remaining_cents >= min_cents * (count - self.taken_count)
        self.committed_count = self.taken_count
        self.closed = closed
        self.loaded_at = None

    cpdef int take(self, int64_t user_id, int64_t now_ms, Rng rng) except -1:
        """Decides one grab. On OK the share is reserved (pending) and
        last_amount_cents/last_seq name it; on ALREADY_CLAIMED they name the
        user's earlier share."""
        cdef tuple prior = self._claims.get(user_id)
        if prior is not None:
            self.last_amount_cents = prior[0]
            self.last_seq = prior[1]
            return S_ALREADY_CLAIMED
        if user_id == self.sender_id or (self._eligible is not None and user_id not in self._eligible):
            return S_NOT_ELIGIBLE
        if self.taken_count >= self.count:
            return S_SOLD_OUT
        if self.closed or now_ms >= self.expires_at_ms:
            return S_EXPIRED
        cdef int64_t amount = draw_share(self.mode, self.total_cents, self.count, self.min_cents,
                                         self.remaining_cents, self.count - self.taken_count, rng)
        self.taken_count += 1
        self.remaining_cents -= amount
        self._claims[user_id] = (amount, self.taken_count)
        self.last_amount_cents = amount
        self.last_seq = self.taken_count
        assert self.remaining_cents >= 0 and self.taken_count <= self.count
        assert (self.taken_count < self.count) or self.remaining_cents == 0
        return S_OK

    cpdef is_pending(self, int32_t seq):
        return seq > self.committed_count

    cpdef void mark_committed(self, int32_t seq):
        # Batches commit in order, so the highest committed seq is a watermark.
        assert seq <= self.taken_count
        if seq > self.committed_count:
            self.committed_count = seq

    def close(self):
        self.closed = True

    @property
    def open_audience(self):
        return self._eligible is None

    @property
    def remaining_count(self):
        return self.count - self.taken_count

    @property
    def sold_out(self):
        return self.taken_count >= self.count

    def claim_of(self, int64_t user_id):
        return self._claims.get(user_id)


cpdef bytes encode_raw(int opcode, uint32_t rid, int status, uint16_t worker, bytes body):
    """An answer from a stored body: an idempotent replay under a new request id."""
    cdef unsigned char* b
    cdef bytes out = new_frame(opcode, rid, status, worker, len(body), &b)
    memcpy(b, PyBytes_AS_STRING(body), len(body))
    return out


# ---------------------------------------------------------------- forwarding

cpdef bytes encode_grab_request(uint32_t rid, int64_t packet_id, int64_t user_id):
    """A GRAB request frame, for relaying to the owning worker."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, C_HEADER_BYTES + 16)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    wr_u32(p, 5 + 16)
    p[4] = C_OP_GRAB
    wr_u32(p + 5, rid)
    wr_u64(p + 9, <uint64_t>packet_id)
    wr_u64(p + 17, <uint64_t>user_id)
    return out


cpdef bytes with_request_id(bytes frame, uint32_t rid):
    """The same answer under the client's own request id."""
    assert PyBytes_GET_SIZE(frame) >= C_RESPONSE_HEADER_BYTES
    cdef bytes out = PyBytes_FromStringAndSize(PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))
    wr_u32(<unsigned char*>PyBytes_AS_STRING(out) + 5, rid)
    return out


cdef class ResponseSplitter:
    """Splits a peer's answers into (request_id, status, frame) without
    decoding bodies: a forwarded answer goes back to its client as it is."""
    cdef bytes _carry
    cdef Py_ssize_t max_frame_bytes

    def __cinit__(self, Py_ssize_t max_frame_bytes=65536):
        self._carry = b""
        self.max_frame_bytes = max_frame_bytes

    def feed(self, bytes data):
        cdef bytes buf = self._carry + data if PyBytes_GET_SIZE(self._carry) else data
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(buf)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(buf)
        cdef Py_ssize_t pos = 0
        cdef uint32_t length
        cdef list out = []
        while size - pos >= 4:
            length = rd_u32(p + pos)
            if length < C_RESPONSE_HEADER_BYTES - 4 or <Py_ssize_t>length + 4 > self.max_frame_bytes:
                raise FramingError(S_INVALID, "bad response frame length %d" % length)
            if size - pos < <Py_ssize_t>length + 4:
                break
            out.append((rd_u32(p + pos + 5), p[pos + 9], buf[pos:pos + 4 + length]))
            pos += 4 + length
        self._carry = buf[pos:] if pos < size else b""
        return out


# ---------------------------------------------------------------- grab batches

from posix.time cimport clock_gettime, timespec, CLOCK_REALTIME


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
    cdef public list followers     # (replier, rid, state, user_id): a retry of a grab still pending, or a
                                   # grab that found every share taken while some were still pending
    cdef public list refunds       # packet ids to refund once this batch's grabs are settled
    cdef public int slot           # the committer's connection carrying it
    cdef public object before      # outcome of the batch built just before it
    cdef public object outcome     # True once durable, False once known not to be
    cdef public bint doomed        # built on a batch that failed: it rolls back too

    def __cinit__(self):
        self.packets, self.seqs, self.users, self.amounts = [], [], [], []
        self.repliers, self.rids, self.states = [], [], []
        self.followers, self.refunds = [], []
        self.slot = -1
        self.before = self.outcome = None
        self.doomed = False

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
            self.repliers[i].answer(encode_grab(self.rids[i], S_OK, worker, self.amounts[i], seq, state.count - seq))
        for f in self.followers:
            state = <PacketState>f[2]
            claim = state.claim_of(f[3])
            if claim is None:   # waited for the packet's last shares to be durable: sold out for good
                f[0].answer(encode_error(C_OP_GRAB, f[1], S_SOLD_OUT, worker, "every share has been taken"))
            else:
                f[0].answer(encode_grab(f[1], S_ALREADY_CLAIMED, worker, claim[0], claim[1],
                                        state.count - <int32_t>claim[1]))

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
