"""POSIX shared-memory segments: create (0600, or 0660 for a shared group;
space reserved up front),
attach, map, unlink, and the naming scheme that lets a daemon sweep the
segments of instances that died.

A segment is named POSIX shm (``tb-...``, in /dev/shm), or a file given by
its absolute path whose last part is such a name: the arena's data on a
hugetlbfs mount (``--arena-hugepages``), which clients and a successor
open by that path instead of with shm_open."""

import os
import re
import secrets

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_FillInfo
from libc.errno cimport errno
from libc.string cimport strerror
from posix.fcntl cimport O_CREAT, O_EXCL, O_RDONLY, O_RDWR, open as c_open
from posix.mman cimport (
    MAP_FAILED,
    MAP_SHARED,
    PROT_READ,
    PROT_WRITE,
    mmap,
    munmap,
    shm_open,
    shm_unlink,
)
from posix.stat cimport fchmod, fstat, struct_stat
from posix.types cimport gid_t, off_t, uid_t
from posix.unistd cimport close, unlink as c_unlink

cdef extern from "<unistd.h>" nogil:
    int fchown(int fd, uid_t owner, gid_t group)

from tensorbus._core.errors import SegmentError, SegmentNameError, SegmentNotFoundError

cdef extern from "<sys/mman.h>" nogil:
    int MAP_POPULATE

cdef extern from "<fcntl.h>" nogil:
    int posix_fallocate(int fd, off_t offset, off_t length)
    int O_CLOEXEC

__all__ = ["Segment", "segment_name", "check_segment_name", "share_segments_with_group", "SHM_DIR"]

# The group new segments are shared with (a daemon's --ipc-group); -1: none.
cdef long _share_gid = -1


def share_segments_with_group(long gid) -> None:
    """Create every later segment of this process with group ``gid`` and
    mode 0660 (-1: back to private, 0600), so that clients of another uid
    in that group can map them."""
    global _share_gid
    _share_gid = gid

SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"^tb-[0-9]+-[A-Za-z0-9_.]{1,64}-[A-Za-z0-9_.-]{1,128}$")


def segment_name(str instance="solo", str kind="ring") -> str:
    """A fresh, unguessable segment name: ``tb-<uid>-<instance>-<kind>.<random>``.

    The uid and instance let a daemon find (and sweep) the segments of a dead
    instance of itself; 128 random bits make the name unguessable."""
    return f"tb-{os.getuid()}-{instance}-{kind}.{secrets.token_hex(16)}"


cdef inline bint _is_file(str name):
    return name[0] == "/"


def check_segment_name(str name) -> str:
    """Return ``name`` if tensorbus could have made it, else raise
    SegmentNameError. An absolute path is a file segment: its last part
    must be such a name, in a folder other than ``/`` (``/tb-...`` is the
    shm_open spelling of a name, refused here)."""
    cdef bint is_file = bool(name) and _is_file(name)
    folder, _, base = name.rpartition("/") if is_file else ("", "", name)
    if (not isinstance(name, str) or not _NAME_RE.match(base) or "/../" in name
            or (is_file and not folder)):
        raise SegmentNameError(
            f"{name!r} is not a tensorbus segment name "
            "(expected tb-<uid>-<instance>-<name>, letters, digits, '.', '_', '-', "
            "or an absolute path ending in one)"
        )
    return name


cdef int _open(str name, int flags, int mode):
    """shm_open for a POSIX shm name, open(2) for a file segment's path."""
    if _is_file(name):
        return c_open(name.encode(), flags | O_CLOEXEC, mode)
    return shm_open(("/" + name).encode(), flags, mode)


cdef int _unlink(str name):
    if _is_file(name):
        return c_unlink(name.encode())
    return shm_unlink(("/" + name).encode())


cdef str _oserror_text(int err):
    return (<bytes>strerror(err)).decode()


cdef size_t _block_size(int fd):
    """The file's block size: the huge page size on hugetlbfs, else a page."""
    cdef struct_stat st
    return <size_t>st.st_blksize if fstat(fd, &st) == 0 else 4096


cdef class Segment:
    """A shared-memory segment mapped read-write into this process.

    Use :meth:`create` or :meth:`attach`; the mapping lives until
    :meth:`close` (or garbage collection). Only the creator may
    :meth:`unlink`, and unlinking does not unmap: processes that still map
    the segment keep working until they close it."""

    def __cinit__(self):
        self.base = NULL
        self.size = 0
        self.owner = False
        self.exports = 0
        self.page_size = 4096

    @staticmethod
    def create(str name, size_t size) -> Segment:
        """Create a new segment of ``size`` bytes, mode 0600, zero-filled.

        The space is reserved with posix_fallocate, so a full /dev/shm fails
        here with ENOSPC instead of killing a later writer with SIGBUS, and
        the pages are pre-faulted (MAP_POPULATE) so first writes run at full
        speed. ``name`` may be an absolute path (a file on hugetlbfs, whose
        size must then be a multiple of its huge page size): fallocate
        there takes the huge pages, so too few fail here with ENOSPC."""
        check_segment_name(name)
        if size == 0:
            raise ValueError("a segment needs at least one byte")
        cdef int fd = _open(name, O_CREAT | O_EXCL | O_RDWR, 0o600)
        if fd < 0:
            err = errno
            raise SegmentError(err, f"cannot create shared-memory segment {name!r}: "
                               f"{_oserror_text(err)}")
        cdef int rc
        try:
            if _share_gid >= 0:
                if fchown(fd, <uid_t>-1, <gid_t>_share_gid) != 0:
                    err = errno
                    raise SegmentError(err, f"cannot give segment {name!r} to group "
                                       f"{_share_gid}: {_oserror_text(err)}")
                fchmod(fd, 0o660)
            else:
                fchmod(fd, 0o600)  # the umask may only have narrowed it; make it exact
            rc = posix_fallocate(fd, 0, <off_t>size)
            if rc != 0:
                where = name.rpartition("/")[0] if _is_file(name) else SHM_DIR
                raise SegmentError(rc, f"cannot reserve {size} bytes for segment {name!r} "
                                   f"in {where}: {_oserror_text(rc)}")
            seg = Segment._map(fd, name, size, True, True)
            seg.page_size = _block_size(fd)
        except BaseException:
            close(fd)
            _unlink(name)
            raise
        close(fd)
        return seg

    @staticmethod
    def attach(str name, *, bint populate=True) -> Segment:
        """Map an existing segment read-write; its size comes from the file.
        ``populate=False``: map its pages lazily (a daemon taking over a
        large arena touches only headers, and must serve within ~100 ms)."""
        check_segment_name(name)
        cdef int fd = _open(name, O_RDWR, 0)
        if fd < 0:
            err = errno
            if err == 2:
                raise SegmentNotFoundError(err, f"no shared-memory segment named {name!r}")
            raise SegmentError(err, f"cannot open segment {name!r}: {_oserror_text(err)}")
        cdef struct_stat st
        try:
            if fstat(fd, &st) != 0:
                err = errno
                raise SegmentError(err, f"cannot stat segment {name!r}: {_oserror_text(err)}")
            if st.st_size <= 0:
                raise SegmentError(0, f"segment {name!r} is empty (still being created?)")
            seg = Segment._map(fd, name, <size_t>st.st_size, False, populate)
            seg.page_size = st.st_blksize
        finally:
            close(fd)
        return seg

    @staticmethod
    cdef Segment _map(int fd, str name, size_t size, bint owner, bint populate):
        cdef int flags = MAP_SHARED | (MAP_POPULATE if populate else 0)
        cdef void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, flags, fd, 0)
        if p == MAP_FAILED:
            err = errno
            raise SegmentError(err, f"cannot map segment {name!r} ({size} bytes): "
                               f"{_oserror_text(err)}")
        cdef Segment seg = Segment.__new__(Segment)
        seg.base = <char *>p
        seg.size = size
        seg.name = name
        seg.owner = owner
        return seg

    @property
    def closed(self) -> bool:
        return self.base == NULL

    @property
    def path(self) -> str:
        """Where the segment shows up in the file system."""
        return self.name if _is_file(self.name) else f"{SHM_DIR}/{self.name}"

    def own(self) -> None:
        """Make unlinking this attached segment this process's job: a
        successor daemon takes over the segments of the one that died."""
        self.owner = True

    def unlink(self) -> None:
        """Remove the segment's name; existing mappings stay valid."""
        if not self.owner:
            raise SegmentError(1, f"segment {self.name!r} was attached, not created, "
                               "here: only its creator unlinks it")
        if _unlink(self.name) != 0:
            err = errno
            if err != 2:  # already gone is fine: unlink is idempotent
                raise SegmentError(err, f"cannot unlink segment {self.name!r}: "
                                   f"{_oserror_text(err)}")

    def close(self) -> None:
        """Unmap the segment. Refused while memoryviews of it are alive."""
        if self.exports:
            raise BufferError(f"segment {self.name!r} still has {self.exports} exported "
                              "view(s); release them before closing")
        self._unmap()

    cdef void _unmap(self) noexcept:
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL

    def __dealloc__(self):
        self._unmap()

    def __getbuffer__(self, Py_buffer *view, int flags):
        if self.base == NULL:
            raise ValueError("segment is closed")
        PyBuffer_FillInfo(view, self, self.base, self.size, 0, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *view):
        self.exports -= 1

    def __repr__(self):
        state = "closed" if self.base == NULL else f"{self.size} bytes"
        return f"<Segment {self.name!r} {state}{' owner' if self.owner else ''}>"
