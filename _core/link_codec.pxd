# A bridge's per-message work in C: reading a ring set straight into a link
# batch, and publishing a received batch straight into the local rings.
# Python (broker/flow_out.py, flow_in.py) runs once per batch; whatever the
# fast path does not take (bodies, gaps, announcements, full rings) it leaves
# where it stopped, for the Python path to handle in order.
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t

from tensorbus._core.layout cimport tb_slot_header_t
from tensorbus._core.ringset cimport RingSet


cdef class OutState:
    # One topic's outbound state on a link epoch.
    cdef public uint32_t id           # the topic's id on links to this peer
    cdef public uint64_t sent         # sequence of the next message on this epoch
    cdef public int64_t credit_msgs   # what the receiver's window still allows
    cdef public int64_t credit_bytes
    cdef public bint reliable         # a reliable topic parks at zero credit
    cdef public bint announced        # its "topic" message went first on this epoch
    cdef public int64_t batch_bytes   # a batch holding one of its messages goes at this size;
                                      # 0: each of its messages goes alone
    cdef public int64_t batch_ns      # the longest one of its messages waits in a filling batch
    cdef public int64_t echo_publisher  # a hub's link to a leaf: the record index of the
                                        # bridge's publisher of what that leaf sent into this
                                        # topic's ring (never sent back to it); -1: none


cdef class InState:
    # One topic's inbound state on a link epoch.
    cdef public int64_t id            # its id on this link; -1: a gap marker's own
    cdef public object pub            # the bridge's Publisher into the local ring; None: refused
    cdef public object backlog        # a deque of what waits for ring space (order: first)
    cdef public int64_t fresh_msgs    # published by the codec since Python last folded them
    cdef public int64_t fresh_bytes


cdef class BatchReader:
    cdef public uint16_t keep_flags   # slot flags that cross the link; the rest are cleared
    cdef public uint16_t skip_flags   # messages with any of these are consumed, never sent
    cdef public Py_ssize_t inline_max # larger inline tensors are sent as bodies (Python)
    cdef readonly object stopped      # the topic name a PARK or SLOW stop was about
    cdef readonly int64_t msgs        # messages encoded since reset_counts()
    cdef readonly int64_t nbytes      # their payload bytes
    cdef int64_t deadline             # when the batch being filled must go (0: it is empty)

    cdef int _stop(self, RingSet rings, int i, name, int why)
    cdef Py_ssize_t _entry_bytes(self, tb_slot_header_t *s)
    cdef Py_ssize_t _append(self, tb_slot_header_t *s, OutState t, bytearray batch,
                            Py_ssize_t need) except -1
    cdef void _count(self, OutState t, Py_ssize_t nbytes) noexcept


cdef class BatchWriter:
    cdef public uint16_t keep_flags   # entry flags taken from the wire
    cdef public uint16_t add_flags    # flags every published message gets (FLAG_BRIDGED)
    cdef public int hop_step          # links add 1 to the hop count; light clients 0
    cdef public int max_hops          # a message arriving with more hops is dropped
    cdef public int64_t hops_dropped  # messages dropped for their hop count, unfolded
    cdef readonly list touched        # InStates with fresh counts to fold
    cdef dict tags                    # dtype tag bytes -> itemsize (0: not carried here)

    cdef Py_ssize_t _itemsize(self, const char *tag)
    cdef Py_ssize_t _publish(self, const char *buf, Py_ssize_t end, Py_ssize_t at,
                             dict topics) except -1
