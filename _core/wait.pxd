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
    int64_t yield_max_ns  # the yield phase may stretch to this while waits stay short (TENSORBUS_YIELD_US)
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
    # Moving average of how long recent waits took. While it stays under
    # yield_max_ns the next message is likely that close, so the yield phase
    # stretches to cover it: the core stays awake and the waker's wake-up is
    # cheap (a halted vCPU costs tens of us to wake).
    cdef int64_t recent_ns
    cdef readonly SpinRegistry registry

    cdef bint wait(self, ready_fn ready, void *ctx, uint32_t *bell_seq, uint32_t *bell_sleeping,
                   uint32_t **ring_sleepers, int n_rings, int64_t timeout_ns) noexcept nogil
    cdef int spin(self, ready_fn ready, void *ctx, int64_t spin_ns) noexcept nogil
    cdef int64_t _yield_ns(self) noexcept nogil
    cdef void _note(self, int64_t waited_ns) noexcept nogil


# None -> -1 (no limit); seconds -> ns; TypeError/ValueError with a sentence.
cdef int64_t timeout_to_ns(object timeout) except -2
