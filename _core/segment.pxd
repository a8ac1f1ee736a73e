# A POSIX shared-memory segment mapped into this process (shm_open + mmap).
# multiprocessing.shared_memory is not used on purpose: on Python 3.11 a
# process that merely attaches registers the segment with its resource
# tracker, which unlinks it when that process exits.


cdef class Segment:
    cdef char *base          # start of the mapping; NULL once closed
    cdef readonly size_t size
    cdef readonly str name   # without the leading "/"; a file segment: its absolute path
    cdef readonly size_t page_size  # the backing's page (st_blksize): 2 MiB on hugetlbfs
    cdef readonly bint owner # created here: unlink() is this process's job
    cdef int exports         # live buffer exports (memoryviews) of the mapping

    cdef void _unmap(self) noexcept

    @staticmethod
    cdef Segment _map(int fd, str name, size_t size, bint owner, bint populate)
