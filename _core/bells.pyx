"""The doorbell table shared by a broker and its clients.

A subscription that reads several rings (a wildcard pattern) must sleep on
one word that every one of those rings' publishers rings. Eventfds cannot be
opened by unrelated processes and ZeroMQ cannot pass file descriptors, so the
broker owns a segment of 64-byte bells; each cursor names its subscription's
bell. Two kinds:

* futex bells for sync waiters (shared futex, never FUTEX_PRIVATE_FLAG);
* FIFO bells for asyncio waiters: the broker makes a named pipe
  ``<fifo_dir>/bell.<index>.<generation>`` in its 0700 runtime directory, the
  subscriber watches it with ``loop.add_reader``, and a publisher writes one
  byte (EAGAIN: the pipe is full, so it was rung already);
* both at once, for a queue group's bell while the daemon's bridge serves
  the group for other hosts: members sleep on the futex, the bridge's loop
  watches the FIFO (``set_kind`` switches a bell in use).

Either way the publisher pays a syscall only when the bell's ``sleeping``
word says someone waits.
"""

import os

from libc.errno cimport EINTR, errno
from libc.stdint cimport uint32_t
from libc.stdio cimport snprintf
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from posix.fcntl cimport O_CLOEXEC, O_NONBLOCK, O_WRONLY, open
from posix.unistd cimport close, write

from tensorbus._core.atomic cimport (
    tb_fence_sc,
    tb_fetch_add32,
    tb_futex_wake_all,
    tb_load_acq32,
    tb_load_rlx32,
    tb_store_rel32,
)
from tensorbus._core.layout cimport (
    TB_BELL_BYTES,
    TB_BELL_BOTH,
    TB_BELL_FIFO,
    TB_BELL_FUTEX,
    TB_BELLS_MAGIC,
    TB_BELLS_VERSION,
    tb_bell_t,
    tb_bells_header_t,
)
from tensorbus._core.segment cimport Segment

from tensorbus._core.errors import LayoutMismatchError
from tensorbus._core.segment import segment_name

__all__ = ["BellTable", "BELL_KINDS"]

BELL_KINDS = {"futex": TB_BELL_FUTEX, "fifo": TB_BELL_FIFO, "both": TB_BELL_BOTH}
cdef enum:
    MAX_BELLS = 1 << 16
    HEADER_BYTES = 64


cdef class BellTable:
    """A mapped bell table. The broker ``create``s it; clients ``attach``."""

    def __cinit__(self):
        self.fds = NULL
        self.fd_generation = NULL

    @staticmethod
    def create(int count, str fifo_dir, *, str instance="solo", str name=None) -> BellTable:
        """Create a table of ``count`` bells (mode 0600)."""
        if not 1 <= count <= MAX_BELLS:
            raise ValueError(f"a bell table holds 1 to {MAX_BELLS} bells, not {count}")
        if name is None:
            name = segment_name(instance, "bells")
        cdef Segment seg = Segment.create(name, HEADER_BYTES + count * TB_BELL_BYTES)
        cdef tb_bells_header_t *h = <tb_bells_header_t *>seg.base
        h.version = TB_BELLS_VERSION
        h.count = count
        h.creator_pid = os.getpid()
        tb_fence_sc()
        h.magic = TB_BELLS_MAGIC
        return BellTable._open(seg, fifo_dir)

    @staticmethod
    def attach(str name, str fifo_dir) -> BellTable:
        """Map an existing table, checking its magic, version and size."""
        cdef Segment seg = Segment.attach(name)
        cdef tb_bells_header_t *h = <tb_bells_header_t *>seg.base
        if (seg.size < HEADER_BYTES or h.magic != TB_BELLS_MAGIC
                or h.version != TB_BELLS_VERSION
                or seg.size != HEADER_BYTES + <size_t>h.count * TB_BELL_BYTES):
            seg.close()
            raise LayoutMismatchError(0, f"segment {name!r} is not a tensorbus bell table "
                                      f"of layout version {TB_BELLS_VERSION}")
        return BellTable._open(seg, fifo_dir)

    @staticmethod
    def _open(Segment seg, str fifo_dir) -> BellTable:
        cdef BellTable t = BellTable.__new__(BellTable)
        cdef tb_bells_header_t *h = <tb_bells_header_t *>seg.base
        cdef uint32_t i
        t.segment = seg
        t.count = h.count
        t.bells = <tb_bell_t *>(seg.base + HEADER_BYTES)
        t.fifo_dir = fifo_dir
        prefix = os.fsencode(os.path.join(fifo_dir, "bell."))
        if len(prefix) >= sizeof(t.fifo_prefix):
            raise ValueError(f"FIFO directory path is too long: {fifo_dir!r}")
        memcpy(t.fifo_prefix, <char *>prefix, len(prefix))
        t.fifo_prefix[len(prefix)] = 0
        t.fds = <int *>malloc(t.count * sizeof(int))
        t.fd_generation = <uint32_t *>malloc(t.count * sizeof(uint32_t))
        if t.fds == NULL or t.fd_generation == NULL:
            raise MemoryError()
        for i in range(t.count):
            t.fds[i] = -1
            t.fd_generation[i] = 0
        return t

    def __dealloc__(self):
        cdef uint32_t i
        if self.fds != NULL:
            for i in range(self.count):
                if self.fds[i] >= 0:
                    close(self.fds[i])
            free(self.fds)
        free(self.fd_generation)

    @property
    def name(self) -> str:
        return self.segment.name

    cdef tb_bell_t *bell(self, uint32_t index) noexcept nogil:
        return &self.bells[index] if index < self.count else NULL

    cdef void ring(self, uint32_t index) noexcept nogil:
        """Wake whoever sleeps on bell ``index``. Callers have made their
        news visible and issued a seq_cst fence before calling."""
        cdef tb_bell_t *b = self.bell(index)
        cdef uint32_t kind
        if b == NULL or not tb_load_rlx32(&b.sleeping):
            return
        tb_fetch_add32(&b.seq, 1)
        kind = tb_load_rlx32(&b.kind)
        if kind != TB_BELL_FUTEX:
            self._write_fifo(index, tb_load_acq32(&b.generation))
        if kind != TB_BELL_FIFO:
            tb_futex_wake_all(&b.seq)

    cdef void _write_fifo(self, uint32_t index, uint32_t generation) noexcept nogil:
        cdef char path[4096]
        cdef int fd = self.fds[index]
        cdef char one = 1
        cdef long rc
        if fd >= 0 and self.fd_generation[index] != generation:
            close(fd)  # the bell was reused: that pipe belongs to a gone subscriber
            fd = -1
            self.fds[index] = -1
        if fd < 0:
            snprintf(path, sizeof(path), "%s%u.%u", self.fifo_prefix, index, generation)
            # Fails with ENXIO while no reader has it open: nobody to wake.
            fd = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC)
            if fd < 0:
                return
            self.fds[index] = fd
            self.fd_generation[index] = generation
        while True:
            rc = write(fd, &one, 1)
            if rc >= 0 or errno != EINTR:
                return  # EAGAIN: the pipe is full, so it is rung already

    # -- the broker's side -------------------------------------------------

    def setup(self, uint32_t index, str kind, uint32_t owner_pid) -> int:
        """Hand bell ``index`` to a new subscription; returns its generation."""
        cdef tb_bell_t *b = self.bell(index)
        if b == NULL:
            raise IndexError(f"bell {index} is outside the table of {self.count}")
        if kind not in BELL_KINDS:
            raise ValueError(f"bell kind must be 'futex', 'fifo' or 'both', not {kind!r}")
        b.kind = BELL_KINDS[kind]
        b.sleeping = 0
        b.notice = 0
        b.owner_pid = owner_pid
        tb_fetch_add32(&b.generation, 1)
        tb_fence_sc()
        return b.generation

    def set_kind(self, uint32_t index, str kind) -> None:
        """Change how bell ``index`` wakes, keeping its generation (its
        waiters and its FIFO's name stay)."""
        cdef tb_bell_t *b = self.bell(index)
        if b == NULL:
            raise IndexError(f"bell {index} is outside the table of {self.count}")
        if kind not in BELL_KINDS:
            raise ValueError(f"bell kind must be 'futex', 'fifo' or 'both', not {kind!r}")
        tb_store_rel32(&b.kind, BELL_KINDS[kind])
        tb_fence_sc()

    def notify(self, uint32_t index) -> None:
        """Raise the bell's notice flag and wake its waiter: the broker has
        sent the subscription news (a new ring, an eviction, a shutdown)."""
        cdef tb_bell_t *b = self.bell(index)
        if b == NULL:
            raise IndexError(f"bell {index} is outside the table of {self.count}")
        tb_store_rel32(&b.notice, 1)
        tb_fence_sc()
        with nogil:
            self.ring(index)

    def fifo_path(self, uint32_t index, uint32_t generation) -> str:
        return os.path.join(self.fifo_dir, f"bell.{index}.{generation}")

    # -- the subscriber's side ---------------------------------------------

    def take_notice(self, uint32_t index) -> bool:
        """Clear and return the bell's notice flag."""
        cdef tb_bell_t *b = self.bell(index)
        if b == NULL or not tb_load_acq32(&b.notice):
            return False
        tb_store_rel32(&b.notice, 0)
        return True
