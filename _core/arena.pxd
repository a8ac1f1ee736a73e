# The tensor arena: a daemon-owned pair of segments (allocator metadata,
# tensor data) that publishers allocate from directly and subscribers view
# in place. tb_arena.h has the allocator and the hold protocol; docs/arena.md
# the whole story.
from libc.stdint cimport int64_t, uint32_t, uint64_t

from tensorbus._core.layout cimport tb_arena_header_t, tb_block_t
from tensorbus._core.segment cimport Segment


cdef extern from "tb_arena.h" nogil:
    ctypedef struct tb_arena_t:
        tb_arena_header_t *h
        tb_block_t *blocks
        char *data
        uint64_t data_size
        uint32_t nblocks
        uint32_t min_shift
        uint32_t max_order

    int tb_arena_init(tb_arena_t *a)
    int tb_arena_lock(tb_arena_t *a)
    void tb_arena_unlock(tb_arena_t *a)
    int64_t tb_arena_alloc(tb_arena_t *a, uint64_t nbytes, uint32_t owner, uint32_t *gen)
    int tb_arena_drop(tb_arena_t *a, uint32_t i, uint32_t gen, uint64_t bits)
    int tb_arena_drop_owner(tb_arena_t *a, uint32_t i, uint32_t gen)
    int tb_arena_hold(tb_arena_t *a, uint32_t i, uint32_t gen, uint64_t bit)


cdef class Arena:
    cdef readonly Segment meta   # header + one 64 B entry per minimum block
    cdef readonly Segment data   # the tensors; blocks are page aligned
    cdef tb_arena_t a

    cdef _check(self)

    @staticmethod
    cdef Arena _open(Segment meta, Segment data)


cdef class Holder:
    # One client's holds: one bit in every block's bitmap, and a count per
    # block in this process, so the shared bit flips only on 0 <-> 1.
    cdef readonly Arena arena
    cdef tb_arena_t *a
    cdef readonly uint32_t slot   # 1..63: this client's bit; it also owns its loans
    cdef uint64_t bit
    cdef uint32_t *counts         # per block: live Hold objects in this process
    cdef uint32_t *gens           # per block: the generation those holds are of
    cdef readonly int held        # blocks with a count > 0
    cdef public int max_holds     # HoldLimitError beyond this many blocks
    cdef int pid                  # holds die with a fork: the child releases nothing

    cdef int acquire(self, uint32_t block, uint32_t generation) except -1
    cdef void release(self, uint32_t block) noexcept


cdef class Hold:
    # A subscriber's hold on one block: the base object of the numpy views
    # handed out, exporting the tensor's bytes. The last reference releases.
    cdef Holder holder
    cdef readonly uint32_t block
    cdef char *ptr
    cdef readonly Py_ssize_t nbytes
    cdef bint live

    @staticmethod
    cdef Hold _make(Holder holder, uint32_t block, uint64_t offset, uint64_t nbytes)


cdef class Loan:
    # A publisher's block before it is sent: writable, owned through bit 0.
    cdef readonly Arena arena
    cdef readonly uint32_t block
    cdef readonly uint32_t generation
    cdef readonly uint64_t offset
    cdef char *ptr
    cdef readonly Py_ssize_t nbytes    # what was asked for
    cdef readonly Py_ssize_t capacity  # the block's size
    cdef int state                     # LOAN_OPEN, LOAN_SENT or LOAN_CANCELLED
    cdef int pid
    cdef object __weakref__            # a publisher tracks its open loans weakly

    cdef void _cancel(self) noexcept
