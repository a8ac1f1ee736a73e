# The topic ring: one shared-memory segment holding a header, the cursor
# entries of its subscribers, the records of its publishers and the slots.
# docs/ring.md describes the protocol, tb_layout.h the bytes and tb_ring.h
# the protocol's C; Ring (here), Publisher (publisher.pyx) and Subscriber
# (subscriber.pyx) are the thin Python classes over them.
from libc.stdint cimport int64_t, uint16_t, uint32_t
from posix.time cimport nanosleep, timespec

from tensorbus._core.arena cimport Arena, Holder, tb_arena_t
from tensorbus._core.bells cimport BellTable
from tensorbus._core.layout cimport tb_cursor_t, tb_publisher_t, tb_ring_header_t, tb_slot_header_t
from tensorbus._core.segment cimport Segment
from tensorbus._core.wait cimport Waiter


cdef extern from "tb_ring.h" nogil:
    enum:
        TB_MAX_CAPACITY
        TB_MAX_SLOT_SIZE
        TB_MAX_ENTRIES
        TB_ST_OK
        TB_ST_EMPTY
        TB_ST_CLOSED
        TB_ST_LOST
        TB_ST_DROPPED
        TB_ST_EVICTED

    ctypedef struct tb_ring_t:
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
        tb_arena_t *arena
        int64_t keep

    ctypedef struct tb_reader_t:
        tb_cursor_t *cur
        int64_t pos
        int64_t stall_since
        char *scratch
        bint latest
        bint group
        bint claimed

    ctypedef struct tb_ring_wait_t:
        tb_ring_t *v
        tb_cursor_t *cur
        int64_t pos
        bint latest

    tb_slot_header_t *tb_slot_at(const tb_ring_t *v, int64_t seq)
    char *tb_payload_of(tb_slot_header_t *s)
    uint32_t tb_cursor_bound(const tb_ring_t *v)
    uint32_t tb_record_bound(const tb_ring_t *v)
    void tb_bump_max32(uint32_t *word, uint32_t value)
    int64_t tb_slowest_cursor(const tb_ring_t *v, int64_t head)
    void tb_record_latency(tb_cursor_t *c, int64_t ns)
    bint tb_cursor_ready(const tb_ring_t *v, tb_cursor_t *cur, int64_t pos, bint latest)
    bint tb_ring_data_ready(void *p)
    bint tb_ring_credit_ready(void *p)
    int tb_reclaim_window(tb_ring_t *v, int64_t lo, int64_t *upto)
    void tb_reclaim_passed(tb_ring_t *v)
    void tb_ring_wake_publishers(tb_ring_t *v)
    uint32_t tb_ring_join(tb_ring_t *v, uint32_t owner_pid, uint32_t bell_ref, uint32_t flags)
    int tb_ring_publish(tb_ring_t *v, tb_publisher_t *rec, uint32_t index, int64_t *cached_min,
                        const char *hdr, uint32_t hn, const char *data, uint32_t n,
                        uint16_t type, uint16_t flags, int64_t *seq)
    void tb_ring_advance(tb_ring_t *v, tb_reader_t *r)
    int tb_ring_poll(tb_ring_t *v, tb_reader_t *r, tb_slot_header_t **out)
    bint tb_ring_still_there(const tb_ring_t *v, const tb_reader_t *r)
    int tb_ring_pad_claim(tb_ring_t *v, int64_t seq)


cdef enum:
    NOGIL_COPY_BYTES = 16384  # below this, dropping the GIL costs more than the copy



cdef inline void nap_ms(long ms) noexcept nogil:
    cdef timespec ts
    ts.tv_sec = 0
    ts.tv_nsec = ms * 1000000
    nanosleep(&ts, NULL)


cdef class Ring:
    cdef readonly Segment segment
    cdef tb_ring_t v
    cdef readonly Waiter waiter
    cdef readonly BellTable bells  # the broker's doorbells that cursors may name; None standalone
    cdef readonly Arena arena      # where large messages live; None for a ring without one
    cdef readonly Holder holder    # this client's holds and loans; None where it only reclaims
    cdef int64_t slice_ns     # longest single sleep: bounds signal and repair latency
    cdef int64_t stall_ns     # a claimed-but-uncommitted slot older than this triggers repair

    cdef readonly int endpoints   # open publishers and subscribers: detach() waits for 0

    cdef int _wake_subscribers(self) noexcept nogil
    cdef void _check_open(self) except *
    cdef uint32_t _join(self, uint32_t owner_pid, uint32_t bell_ref, uint32_t flags) except? 0xFFFFFFFF

    @staticmethod
    cdef Ring _open(Segment seg, object spin_us, BellTable bells, Waiter waiter, Arena arena,
                    Holder holder)
