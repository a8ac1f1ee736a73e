# Waiting without burning the machine: spin briefly (only while few others
# spin), then yield, then sleep on a shared futex until a waker rings the
# doorbell. See docs/ring.md, "Waiting".
from libc.stdint cimport int64_t, uint32_t

from tensorbus._core.segment cimport Segment

# Returns true once the awaited condition holds; called many times, must be
# cheap and must not block.
ctypedef bint (*ready_fn)(void *ctx) noexcept nogil


cdef struct WaitPolicy:
    int64_t prespin_ns    # spin this long before asking the registry (covers a ping-pong's turn)
    int64_t spin_ns       # registered spin, TENSORBUS_SPIN_US (default 50 us)
    int64_t yield_ns      # sched_yield phase after the spin
    int max_spinners      # host-wide spinners allowed at once: cores - 1, at least 1


cdef class SpinRegistry:
    # Host-wide (per uid) table of spin deadlines in shared memory. A slot
    # holds the CLOCK_MONOTONIC time its spinner promises to stop by, so a
    # process killed mid-spin leaves an entry that simply expires.
    cdef readonly Segment segment
    cdef int64_t *slots
    cdef int nslots

    cdef int enter(self, int64_t now_ns, int64_t until_ns, int max_spinners) noexcept nogil
    cdef void leave(self, int index) noexcept nogil


cdef class Waiter:
    cdef WaitPolicy policy
    cdef readonly SpinRegistry registry

    cdef bint wait(self, ready_fn ready, void *ctx, uint32_t *bell_seq, uint32_t *bell_sleeping,
                   uint32_t **ring_sleepers, int n_rings, int64_t timeout_ns) noexcept nogil
    cdef int spin(self, ready_fn ready, void *ctx, int64_t spin_ns) noexcept nogil


# None -> -1 (no limit); seconds -> ns; TypeError/ValueError with a sentence.
cdef int64_t timeout_to_ns(object timeout) except -2
