# One subscription's receiving end: the subscribers of every ring its
# pattern matches, sharing one doorbell, read round-robin.
from libc.stdint cimport int64_t, uint32_t

from tensorbus._core.message cimport Message
from tensorbus._core.bells cimport BellTable
from tensorbus._core.layout cimport tb_bell_t, tb_cursor_t, tb_slot_header_t
from tensorbus._core.ring cimport tb_ring_t
from tensorbus._core.subscriber cimport Subscriber
from tensorbus._core.wait cimport Waiter


# What a nogil waiter needs of one member, pointing into the Subscriber.
cdef struct Member:
    tb_ring_t *v
    tb_cursor_t *cur
    int64_t *pos
    bint latest


cdef struct RingSetWait:
    Member *members
    int n
    tb_bell_t *bell


cdef class RingSet:
    cdef readonly BellTable bells
    cdef readonly uint32_t bell_index
    cdef tb_bell_t *bell
    cdef list subs          # Subscriber per member, in round-robin order
    cdef list topics        # the topic name of each member
    cdef Member *members    # rebuilt on every add/remove
    cdef uint32_t **sleepers
    cdef int n
    cdef int next           # round-robin start
    cdef int armed          # asyncio: sleepers counted in by arm()
    cdef readonly int closed_members  # members dropped because their ring closed
    cdef Waiter waiter
    cdef int64_t slice_ns
    cdef int waiting        # threads inside recv's nogil wait: close() then defers to them
    cdef bint close_pending
    cdef bint is_closed
    cdef list live          # the subscribers the current arrays point into
    cdef list graveyard     # (members, sleepers, subscribers) a waiter may still read
    cdef object pending_gap # a GapError a batch found after some messages: raised next
    cdef bint raise_gaps    # gap markers raise GapError (else: returned as messages)
    cdef int64_t claim_only # queue groups, >= 0: claim the message at this position only

    cdef _rebuild(self)
    cdef void _wait_on(self, RingSetWait *w) noexcept
    cdef void _bury(self) noexcept
    cdef Message _poll_one(self)
    cdef Message _next(self)
    cdef Message _take_tensor(self, Subscriber sub, tb_slot_header_t *s, int i)
    cdef _evicted(self, int i)
    cdef _skip(self, Subscriber sub)
