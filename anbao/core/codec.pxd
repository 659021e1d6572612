# The wire codec's C-level view of the protocol table (anbao_client/protocol.py).
# tests/test_protocol_table.py checks every value here against the table.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    C_LENGTH_BYTES = 4
    C_HEADER_BYTES = 9
    C_RESPONSE_HEADER_BYTES = 12
    C_RESPONSE_BIT = 0x80
    C_KEY_BYTES = 16
    C_MAX_REGISTER_IDS = 1024
    C_MAX_TOKEN_BYTES = 256
    C_MAX_GREETING_BYTES = 256
    C_MAX_CLAIMS_PAGE = 1000
    C_MAX_GROUP_NAME_BYTES = 128
    C_MAX_ERROR_MESSAGE_BYTES = 1024

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
    C_OP_SENT_LIST = 0x24
    C_OP_RECEIVED_LIST = 0x25
    C_OP_GROUP_CREATE = 0x30
    C_OP_GROUP_ADD = 0x31
    C_OP_GROUP_REMOVE = 0x32
    C_OP_GROUP_INFO = 0x33
    C_OP_TOPOLOGY = 0x50
    C_OP_STATS = 0x51
    C_OP_EVENTS = 0x60

cdef enum:
    S_OK = 0
    S_SOLD_OUT = 1
    S_ALREADY_CLAIMED = 2
    S_EXPIRED = 3
    S_NOT_ELIGIBLE = 4
    S_INVALID = 6
    S_UNKNOWN_OPCODE = 15
    S_FRAME_TOO_LARGE = 16



cdef inline uint16_t rd_u16(const unsigned char* p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]

cdef inline uint32_t rd_u32(const unsigned char* p) noexcept nogil:
    return ((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16)
            | (<uint32_t>p[2] << 8) | p[3])

cdef inline uint64_t rd_u64(const unsigned char* p) noexcept nogil:
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


cpdef bytes encode_error(int opcode, uint32_t rid, int status, uint16_t worker, str message)
cpdef bytes encode_grab(uint32_t rid, int status, uint16_t worker, int64_t amount_cents,
                        uint32_t seq, uint32_t remaining_count)


cdef class Framer:
    """Splits a byte stream into length-prefixed frames; subclasses say
    what a frame becomes (frame())."""
    cdef bytes _carry
    cdef readonly Py_ssize_t max_frame_bytes
    cdef readonly bint broken
    cdef Py_ssize_t _min_length

    cdef object frame(self, bytes buf, const unsigned char* p, Py_ssize_t pos, Py_ssize_t length)
    cdef list split(self, bytes data)
    cdef void _break(self)
