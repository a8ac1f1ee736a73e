# A ring's publishing end: tb_ring.h's claim, copy and commit in one nogil
# call, and the encoding of arrays and loans into tensor descriptors.
from libc.stdint cimport int64_t, uint16_t, uint32_t

from tensorbus._core.arena cimport Loan
from tensorbus._core.layout cimport tb_publisher_t
from tensorbus._core.ring cimport Ring, tb_ring_t


cdef class Loans:
    # A publisher's arena blocks: borrowed (waiting for space if it must) and
    # tracked while open, so an array inside one is sent with no copy.
    cdef Ring ring
    cdef tb_ring_t *v
    cdef object open          # block -> weakref of an open Loan
    cdef double default_timeout

    cdef object array(self, shape, dtype, timeout, Py_ssize_t inline_max)
    cdef void sent(self, Loan loan)
    cdef object find(self, size_t address, Py_ssize_t nbytes)
    cdef object block(self, Py_ssize_t nbytes, object timeout, Py_ssize_t inline_max)


cdef class Publisher:
    cdef readonly Ring ring
    cdef tb_ring_t *v
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
    # How the layer above turns an object that is neither a buffer nor a
    # numpy array (a torch tensor, a __dlpack__ object) into (array, tag),
    # or (None, None); None: such objects are refused.
    cdef public object encoder
    cdef bint last_dropped    # the last send was overtaken on an overwrite ring (counted)
    cdef Loans loans          # the arena blocks it borrows and its open loans

    cdef int _publish(self, const char *hdr, uint32_t hn, const char *data, uint32_t n,
                      uint16_t type, uint16_t flags, int64_t *seq) noexcept nogil
    cdef int64_t _send(self, const char *hdr, Py_ssize_t hn, const char *data, Py_ssize_t n,
                       int type, int flags, object timeout) except -1
    cdef _raise_backpressure(self, int64_t timeout_ns)
    cdef void _leave(self) noexcept
    cdef int64_t _send_object(self, object data, int flags, object timeout, object meta) except -2
    cdef int64_t _send_small_bytes(self, object data, bytes meta, int flags,
                                   object timeout) except -2
    cdef int64_t _send_array(self, object arr, str tag, int flags, object timeout,
                             object meta) except -2
