# A ring's reading end: one cursor, read through tb_ring.h's poll and
# advance (in place on block rings, by copy under the seqlock on overwrite
# rings).
from libc.stdint cimport int64_t, uint32_t

from tensorbus._core.ring cimport Ring, tb_reader_t, tb_ring_t
from tensorbus._core.layout cimport tb_slot_header_t


cdef class _SlotView:
    # Exports one slot's payload read-only; peek() hands out a memoryview of it.
    cdef char *ptr
    cdef Py_ssize_t length
    cdef int exports          # live buffer exports: the slot is held while > 0
    cdef object memview       # the memoryview given to the user


cdef class Subscriber:
    cdef readonly Ring ring
    cdef tb_ring_t *v
    cdef tb_reader_t r        # cursor, local position, latest/group flags, scratch
    cdef readonly uint32_t index
    cdef uint32_t generation
    cdef bytearray scratch    # overwrite rings read by copy into here (r.scratch)
    cdef _SlotView view       # the slot peek() exported, held until release()
    cdef bint closed
    cdef readonly int64_t last_seq
    cdef readonly int64_t last_timestamp_ns
    cdef readonly int last_flags
    cdef readonly int64_t last_publisher  # the record index of its publisher

    cdef bytes _take(self, tb_slot_header_t *s)
    cdef tb_slot_header_t *_next(self, object timeout) except NULL
    cdef _check_stall(self)
    cdef _raise_evicted(self)
    cdef void _note(self, tb_slot_header_t *s) noexcept
    cdef _drop_view(self)
    cdef void _free_cursor(self) noexcept nogil
    cdef void _leave(self) noexcept
