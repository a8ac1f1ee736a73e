# One received message: what a RingSet (ringset.pyx) hands out.
from libc.stdint cimport int64_t

from tensorbus._core.arena cimport Hold


cdef class Message:
    cdef readonly str topic
    cdef readonly int64_t seq           # the message's sequence in its topic's ring
    cdef readonly int64_t timestamp_ns  # CLOCK_REALTIME at publish
    cdef readonly int flags
    cdef readonly int64_t publisher     # the publisher record index that wrote it
    cdef bytes payload                  # inline messages are copied out of the slot
    cdef object view                    # what .data handed out (memoryview or ndarray)
    cdef Hold hold                      # arena messages: keeps the block alive
    cdef readonly str dtype             # tensors: the dtype tag; None for plain bytes
    cdef readonly tuple shape           # tensors: the shape
    cdef bytes meta_bytes               # tensors: the application's 32 bytes
    cdef Py_ssize_t size                # bytes of data
