# The broker's doorbell table: one shared segment of 64-byte bells, one per
# subscription. Cursors name a bell (tb_cursor_t.bell_ref), so a publisher
# wakes the subscription however many rings it reads.
from libc.stdint cimport uint32_t

from tensorbus._core.layout cimport tb_bell_t
from tensorbus._core.segment cimport Segment


cdef class BellTable:
    cdef readonly Segment segment
    cdef tb_bell_t *bells
    cdef readonly uint32_t count
    cdef readonly str fifo_dir   # where FIFO bells live: <fifo_dir>/bell.<index>.<generation>
    cdef char fifo_prefix[3968]  # fifo_dir + "/bell.", NUL-terminated, for the nogil path
    cdef int *fds                # per bell: a cached O_WRONLY|O_NONBLOCK fd of its FIFO, or -1
    cdef uint32_t *fd_generation # the bell generation each cached fd belongs to

    cdef tb_bell_t *bell(self, uint32_t index) noexcept nogil
    cdef void ring(self, uint32_t index) noexcept nogil
    cdef void _write_fifo(self, uint32_t index, uint32_t generation) noexcept nogil
