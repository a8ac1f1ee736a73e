# The topic ring: one shared-memory segment holding a header, the cursor
# entries of its subscribers, the records of its publishers and the slots.
# docs/ring.md describes the protocol; tb_layout.h the bytes.
from libc.stdint cimport int64_t, uint16_t, uint32_t

from tensorbus._core.arena cimport Arena, Holder, tb_arena_t
from tensorbus._core.atomic cimport tb_load_acq64, tb_load_rlx32, tb_load_rlx64
from tensorbus._core.bells cimport BellTable
from tensorbus._core.layout cimport (
    TB_CURSOR_ACTIVE,
    TB_WRITING,
    tb_cursor_t,
    tb_publisher_t,
    tb_ring_header_t,
    tb_slot_header_t,
)
from tensorbus._core.segment cimport Segment
from tensorbus._core.wait cimport Waiter


# Validated geometry, copied out of the header at attach time: indexing uses
# these and never a value another process could change under us.
cdef struct RingView:
    tb_ring_header_t *h
    char *slots
    tb_cursor_t *cursors
    tb_publisher_t *records
    int64_t capacity
    int64_t mask
    uint32_t stride
    uint32_t slot_size
    uint32_t max_cursors
    uint32_t max_publishers
    uint32_t policy
    tb_arena_t *arena     # the broker's tensor arena; NULL for a ring without one
    int64_t keep          # 1: the newest message's block outlives its readers ("latest")


cdef inline tb_slot_header_t *slot_at(RingView *v, int64_t seq) noexcept nogil:
    return <tb_slot_header_t *>(v.slots + (seq & v.mask) * v.stride)


cdef inline bint cursor_ready(RingView *v, tb_cursor_t *cur, int64_t pos,
                              bint latest) noexcept nogil:
    """Cheap check for a waiter: is there something at ``pos`` (a message, a
    lap, a newer value for a "latest" reader), or was the ring closed or the
    cursor evicted? The subscriber's ``_poll`` then tells which."""
    cdef int64_t c = tb_load_acq64(&slot_at(v, pos).commit)
    if c == pos or (c & ~TB_WRITING) > pos:
        return True
    if latest and tb_load_rlx64(&v.h.head) - 1 > pos:
        return True
    return (tb_load_rlx32(&v.h.closed) != 0
            or tb_load_rlx32(&cur.state) != TB_CURSOR_ACTIVE)


# None -> -1 (no limit); seconds -> ns; TypeError/ValueError with a sentence.
cdef int64_t timeout_to_ns(object timeout) except -2

# Drop the arena references of messages every subscriber has passed.
cdef void reclaim_passed(RingView *v) noexcept nogil


cdef class Ring:
    cdef readonly Segment segment
    cdef RingView v
    cdef readonly Waiter waiter
    cdef readonly BellTable bells  # the broker's doorbells that cursors may name; None standalone
    cdef readonly Arena arena      # where large messages live; None for a ring without one
    cdef readonly Holder holder    # this client's holds and loans; None where it only reclaims
    cdef int64_t slice_ns     # longest single sleep: bounds signal and repair latency
    cdef int64_t stall_ns     # a claimed-but-uncommitted slot older than this triggers repair

    cdef readonly int endpoints   # open publishers and subscribers: detach() waits for 0

    cdef int _wake_subscribers(self) noexcept nogil
    cdef void _wake_publishers(self) noexcept nogil
    cdef void _check_open(self) except *
    cdef int _pad_claim(self, int64_t seq) except -2
    cdef uint32_t _join(self, uint32_t owner_pid, uint32_t bell_ref, uint32_t flags) except? 0xFFFFFFFF

    @staticmethod
    cdef Ring _open(Segment seg, object spin_us, BellTable bells, Waiter waiter, Arena arena,
                    Holder holder)


cdef class Publisher:
    cdef readonly Ring ring
    cdef RingView *v
    cdef tb_publisher_t *rec
    cdef readonly uint32_t index
    cdef int64_t cached_min   # lower bound of the slowest cursor; rescanned only when short
    cdef int64_t stall_since  # when this publisher started waiting for credit
    cdef double default_timeout
    cdef bytearray staging    # reserve()'s private buffer
    cdef object reservation   # the memoryview reserve() handed out
    cdef Py_ssize_t reserved
    cdef bint closed
    cdef public Py_ssize_t inline_max  # larger messages go to the arena (if there is one)
    cdef bint last_dropped    # the last send was overtaken on an overwrite ring (counted)
    cdef object loans         # block -> open Loan of this publisher (weak values)

    cdef int _publish(self, const char *hdr, uint32_t hn, const char *data, uint32_t n,
                      uint16_t type, uint16_t flags, int64_t *seq) noexcept nogil
    cdef int _overtaken(self, int64_t head, int64_t *seq) noexcept nogil
    cdef int64_t _send(self, const char *hdr, Py_ssize_t hn, const char *data, Py_ssize_t n,
                       int type, int flags, object timeout) except -1
    cdef _raise_backpressure(self, int64_t timeout_ns)
    cdef int64_t _send_object(self, object data, int flags, object timeout, object meta) except -2
    cdef int64_t _send_small_bytes(self, object data, bytes meta, int flags,
                                   object timeout) except -2
    cdef int64_t _send_array(self, object arr, str tag, int flags, object timeout,
                             object meta) except -2
    cdef object _loan_block(self, Py_ssize_t nbytes, object timeout)
    cdef object _own_loan(self, size_t address, Py_ssize_t nbytes)


cdef class _SlotView:
    # Exports one slot's payload read-only; peek() hands out a memoryview of it.
    cdef char *ptr
    cdef Py_ssize_t length
    cdef int exports          # live buffer exports: the slot is held while > 0
    cdef object memview       # the memoryview given to the user


cdef class Subscriber:
    cdef readonly Ring ring
    cdef RingView *v
    cdef tb_cursor_t *cur
    cdef readonly uint32_t index
    cdef uint32_t generation
    cdef int64_t pos          # local copy of the cursor; the shared one is published on release
    cdef bytearray scratch    # overwrite rings read by copy into here
    cdef char *scratch_ptr
    cdef int64_t stall_since  # when the awaited slot was first seen claimed but unfilled
    cdef _SlotView view       # the slot peek() exported, held until release()
    cdef bint closed
    cdef bint latest          # QoS "latest": always read the newest message
    cdef readonly bint group  # a queue group's shared cursor: messages are claimed by CAS
    cdef bint claimed         # group: whether the last _advance won its message
    cdef readonly int64_t last_seq
    cdef readonly int64_t last_timestamp_ns
    cdef readonly int last_flags

    cdef int _poll(self, tb_slot_header_t **out) noexcept nogil
    cdef bytes _take(self, tb_slot_header_t *s)
    cdef bint _still_there(self, tb_slot_header_t *s) noexcept nogil
    cdef void _advance(self) noexcept nogil
    cdef tb_slot_header_t *_next(self, object timeout) except NULL
    cdef _check_stall(self)
    cdef _raise_evicted(self)
    cdef void _note(self, tb_slot_header_t *s) noexcept
    cdef _drop_view(self)
    cdef void _free_cursor(self) noexcept nogil

