# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The server's wire codec: frames in, decoded requests out; answers out.

The byte layout is the protocol table's (anbao_client/protocol.py, the
prose in PROTOCOL.md). Requests are decoded by hand-written readers, and
checked field by field (ids in range, amounts positive, texts bounded and
UTF-8), because this is the hot path; tests/test_protocol_table.py holds
them to the table by round-tripping every message through the SDK's
table-driven codec. Answers are laid out by the table's layout letters.

A frame that lies whole inside one received chunk is read in place; only a
frame cut across chunks is copied, into a small carry-over buffer.
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize

cdef uint64_t C_MAX_ID = 0x7FFFFFFFFFFFFFFFULL  # ids live in PostgreSQL BIGINT

# The C-level constants, by the protocol table's names, for the table test.
C_CONSTANTS = {
    "LENGTH_BYTES": C_LENGTH_BYTES, "HEADER_BYTES": C_HEADER_BYTES,
    "RESPONSE_HEADER_BYTES": C_RESPONSE_HEADER_BYTES, "RESPONSE_BIT": C_RESPONSE_BIT,
    "IDEMPOTENCY_KEY_BYTES": C_KEY_BYTES, "MAX_REGISTER_IDS": C_MAX_REGISTER_IDS,
    "MAX_TOKEN_BYTES": C_MAX_TOKEN_BYTES, "MAX_GREETING_BYTES": C_MAX_GREETING_BYTES,
    "MAX_CLAIMS_PAGE": C_MAX_CLAIMS_PAGE, "MAX_GROUP_NAME_BYTES": C_MAX_GROUP_NAME_BYTES,
    "MAX_ERROR_MESSAGE_BYTES": C_MAX_ERROR_MESSAGE_BYTES, "MAX_ID": C_MAX_ID,
}
C_OPS = {
    "HELLO": C_OP_HELLO, "PING": C_OP_PING, "REGISTER": C_OP_REGISTER, "DEPOSIT": C_OP_DEPOSIT,
    "BALANCE": C_OP_BALANCE, "WITHDRAW": C_OP_WITHDRAW, "STATEMENT": C_OP_STATEMENT, "AUDIT": C_OP_AUDIT,
    "SEND": C_OP_SEND, "GRAB": C_OP_GRAB, "PACKET": C_OP_PACKET, "SENT_LIST": C_OP_SENT_LIST,
    "RECEIVED_LIST": C_OP_RECEIVED_LIST, "GROUP_CREATE": C_OP_GROUP_CREATE, "GROUP_ADD": C_OP_GROUP_ADD,
    "GROUP_REMOVE": C_OP_GROUP_REMOVE, "GROUP_INFO": C_OP_GROUP_INFO, "TOPOLOGY": C_OP_TOPOLOGY,
    "STATS": C_OP_STATS, "EVENTS": C_OP_EVENTS,
}
C_STATUSES = {
    "OK": S_OK, "SOLD_OUT": S_SOLD_OUT, "ALREADY_CLAIMED": S_ALREADY_CLAIMED, "EXPIRED": S_EXPIRED,
    "NOT_ELIGIBLE": S_NOT_ELIGIBLE, "INVALID": S_INVALID, "UNKNOWN_OPCODE": S_UNKNOWN_OPCODE,
    "FRAME_TOO_LARGE": S_FRAME_TOO_LARGE,
}


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


# ---------------------------------------------------------------- requests

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
    elif opcode == C_OP_EVENTS:
        out = (take_cursor(&c), take_u16(&c), take_u32(&c))
    else:
        raise BadRequest(S_UNKNOWN_OPCODE, "unknown opcode 0x%02x" % opcode)
    done(&c)
    return out




# ---------------------------------------------------------------- framing

cdef class Framer:

    def __cinit__(self, Py_ssize_t max_frame_bytes=65536):
        assert C_HEADER_BYTES <= max_frame_bytes <= 16 * 1024 * 1024
        self._carry = b""
        self.max_frame_bytes = max_frame_bytes
        self.broken = False
        self._min_length = C_HEADER_BYTES - C_LENGTH_BYTES

    cdef object frame(self, bytes buf, const unsigned char* p, Py_ssize_t pos, Py_ssize_t length):
        raise NotImplementedError

    cdef list split(self, bytes data):
        """The frames whole in carry + data, each through frame(); raises
        FramingError (carrying them) at a length no frame can have. Once
        broken it reads nothing more: bytes after a bad length are not frames."""
        if self.broken:
            return []
        cdef bytes buf = self._carry + data if PyBytes_GET_SIZE(self._carry) else data
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(buf)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(buf)
        cdef Py_ssize_t pos = 0
        cdef uint32_t length
        cdef list frames = []
        while size - pos >= C_LENGTH_BYTES:
            length = rd_u32(p + pos)
            if length < self._min_length:
                self._break()
                raise FramingError(S_INVALID, "frame length below header size", frames)
            if <Py_ssize_t>length + C_LENGTH_BYTES > self.max_frame_bytes:
                self._break()
                raise FramingError(S_FRAME_TOO_LARGE, "frame of %d bytes over limit %d"
                                   % (length + C_LENGTH_BYTES, self.max_frame_bytes), frames)
            if size - pos < <Py_ssize_t>length + C_LENGTH_BYTES:
                break
            frames.append(self.frame(buf, p, pos, length))
            pos += C_LENGTH_BYTES + length
        self._carry = buf[pos:] if pos < size else b""
        return frames

    cdef void _break(self):
        self.broken = True
        self._carry = b""


cdef class FrameDecoder(Framer):
    """Splits a client's byte stream into requests, each decoded at once."""

    def feed(self, bytes data):
        """Returns a list of (opcode, request_id, args) where args is a tuple
        of decoded fields or a BadRequest; raises FramingError when the
        stream cannot be framed (the caller closes the connection)."""
        return self.split(data)

    cdef object frame(self, bytes buf, const unsigned char* p, Py_ssize_t pos, Py_ssize_t length):
        cdef int opcode = p[pos + 4]
        cdef uint32_t rid = rd_u32(p + pos + 5)
        try:
            args = decode_payload(opcode, p, pos + C_HEADER_BYTES, pos + C_LENGTH_BYTES + length)
        except BadRequest as exc:
            args = exc
        return (opcode, rid, args)


cdef class ResponseSplitter(Framer):
    """Splits a peer's answers into (request_id, status, frame) without
    decoding bodies: a forwarded answer goes back to its client as it is."""

    def __cinit__(self, Py_ssize_t max_frame_bytes=65536):
        self._min_length = C_RESPONSE_HEADER_BYTES - C_LENGTH_BYTES

    def feed(self, bytes data):
        return self.split(data)

    cdef object frame(self, bytes buf, const unsigned char* p, Py_ssize_t pos, Py_ssize_t length):
        return (rd_u32(p + pos + 5), p[pos + 9], buf[pos:pos + C_LENGTH_BYTES + length])


# ---------------------------------------------------------------- answers

cdef inline bytes new_frame(int opcode, uint32_t rid, int status, uint16_t worker,
                            Py_ssize_t body_bytes, unsigned char** body):
    cdef Py_ssize_t total = C_RESPONSE_HEADER_BYTES + body_bytes
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    wr_u32(p, <uint32_t>(total - 4))
    p[4] = (opcode | C_RESPONSE_BIT) & 0xFF
    wr_u32(p + 5, rid)
    p[9] = status & 0xFF
    wr_u16(p + 10, worker)
    body[0] = p + C_RESPONSE_HEADER_BYTES
    return out


cpdef bytes encode_error(int opcode, uint32_t rid, int status, uint16_t worker, str message):
    assert status != S_OK
    cdef bytes msg = message.encode("utf-8")[:C_MAX_ERROR_MESSAGE_BYTES]
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
    """Body bytes of values laid out by the table's letters (protocol.py):
    B u8, H u16, I u32, Q u64, q i64, t text, b bytes (u16 length), j blob
    (u32 length)."""
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
        elif ch == "t": n += 2 + len((<str>values[i]).encode("utf-8"))
        elif ch == "b": n += 2 + len(<bytes>values[i])
        elif ch == "j": n += 4 + len(<bytes>values[i])
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
        elif ch == "j":
            raw = <bytes>v
            assert len(raw) <= 0xFFFFFFFF
            wr_u32(b, len(raw))
            memcpy(b + 4, PyBytes_AS_STRING(raw), len(raw))
            b += 4 + len(raw)
        else:
            assert ch == "t" or ch == "b"
            raw = (<str>v).encode("utf-8") if ch == "t" else <bytes>v
            assert len(raw) <= 0xFFFF
            wr_u16(b, len(raw))
            memcpy(b + 2, PyBytes_AS_STRING(raw), len(raw))
            b += 2 + len(raw)
    return b


cpdef bytes encode_ok(int opcode, uint32_t rid, uint16_t worker, str layout, tuple values):
    """An OK answer whose body is a sequence of fields: `layout` is the
    message's answer layout letters from the protocol table. For the
    answers off the hot path (HELLO, DEPOSIT, SEND...)."""
    cdef unsigned char* b
    cdef bytes out = new_frame(opcode, rid, S_OK, worker, layout_bytes(layout, values), &b)
    write_layout(b, layout, values)
    return out


cpdef bytes encode_list(int opcode, uint32_t rid, uint16_t worker, str head_layout, tuple head,
                        str row_layout, list rows):
    """An OK answer that is a head, then u16 n, then n rows of one layout
    (the table's Layout.head and Rows letters): the paged answers."""
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


