from libc.stdint cimport int32_t, int64_t, uint64_t

cdef enum:
    C_MODE_RANDOM = 1
    C_MODE_FIXED = 2


cdef class Rng:
    cdef uint64_t s[4]
    cdef uint64_t next(self) noexcept nogil
    cdef uint64_t below(self, uint64_t n) noexcept nogil


cdef int64_t draw_share(int mode, int64_t total_cents, int32_t count, int64_t min_cents,
                        int64_t remaining_cents, int32_t remaining_count, Rng rng,
                        int64_t max_cents=*) except -1
