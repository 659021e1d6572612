from libc.stdint cimport int32_t, int64_t, uint64_t

cdef enum:
    C_MODE_RANDOM = 1
    C_MODE_FIXED = 2


cdef class Rng:
    cdef uint64_t s[4]
    cdef uint64_t next(self) noexcept nogil
    cdef uint64_t below(self, uint64_t n) noexcept nogil


cdef int64_t draw_share(int mode, int64_t total_cents, int32_t count, int64_t min_share_cents,
                        int64_t remaining_cents, int32_t remaining_count, Rng rng,
                        int64_t max_share_cents=*) except -1



cdef class PacketState:
    cdef readonly int64_t packet_id
    cdef readonly int64_t sender_id
    cdef readonly int64_t total_cents
    cdef readonly int32_t share_count
    cdef readonly int mode
    cdef readonly int64_t min_share_cents
    cdef readonly int64_t max_share_cents         # no share above it; 0: no cap (packets sent before the cap)
    cdef readonly int64_t expires_at_ms
    cdef readonly int64_t remaining_cents   # after every taken share, reserved included
    cdef readonly int32_t taken_count       # committed + reserved shares
    cdef readonly int32_t committed_count
    cdef readonly bint closed               # expired and refunded: nothing more to take
    cdef object _eligible                   # frozenset of user ids, or None for anyone
    cdef dict _claims                       # user_id -> (amount_cents, seq)
    cdef list _by_seq                       # (user_id, amount_cents) of seq 1.. in order
    cdef int32_t _luckiest                  # the luckiest seq once every share is committed; 0 before
    # What PACKET shows beyond the split (server/ops/packets.py), for a
    # packet adopted from its SEND; None for one loaded from the database.
    cdef public object facts
    # The last take()'s share, read right after it without a tuple allocation.
    cdef readonly int64_t last_amount_cents
    cdef readonly int32_t last_seq

    cpdef int take(self, int64_t user_id, int64_t now_ms, Rng rng) except -1
    cpdef bint yields(self, int status, int64_t user_id)
    cpdef is_reserved(self, int32_t seq)
    cpdef void mark_committed(self, int32_t seq)


cpdef int64_t now_ms() noexcept
