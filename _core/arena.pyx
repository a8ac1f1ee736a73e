"""The tensor arena: where messages too big for a ring slot live.

The daemon creates two segments: the allocator's metadata (a header and one
64-byte entry per minimum block) and the data. Clients map both and allocate
directly (tb_arena.h: a buddy allocator under a robust process-shared
mutex). A ring slot then carries only a descriptor (block, generation,
offset, dtype, shape); subscribers view the block in place.

Who keeps a block alive is a bitmap in its entry: bit 0 for its owner (a
publisher's loan, which becomes the ring's reference once published and is
dropped when every subscriber has passed the slot), bit i for the client in
holder slot i (a subscriber holding views). Each process counts its own
views per block, so the shared bit flips only when its count goes 0 <-> 1.
The daemon assigns holder slots and clears the bit of a client that dies.
"""

import os

cimport cython
from cpython.buffer cimport PyBuffer_FillInfo
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memcpy, memset

from tensorbus._core.atomic cimport tb_fence_sc, tb_load_acq_u64
from tensorbus._core.layout cimport (
    TB_ARENA_BLOCK_BYTES,
    TB_ARENA_HEADER_BYTES,
    TB_ARENA_MAGIC,
    TB_ARENA_MAX_BLOCKS,
    TB_ARENA_VERSION,
    TB_BLOCK_USED,
    TB_HOLD_OWNER,
    TB_MAX_HOLDERS,
    tb_arena_header_t,
    tb_block_t,
)
from tensorbus._core.segment cimport Segment

from tensorbus._core.errors import HoldLimitError, LayoutMismatchError, TensorbusError
from tensorbus._core.segment import segment_name

__all__ = ["Arena", "Holder", "Hold", "Loan", "MAX_HOLDERS", "parse_size"]

MAX_HOLDERS = TB_MAX_HOLDERS
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

cdef enum:
    MIN_SHIFT = 12          # blocks are at least a page
    LOAN_OPEN = 0
    LOAN_SENT = 1
    LOAN_CANCELLED = 2

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
          "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
          "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(value) -> int:
    """``4GiB``, ``512M``, ``65536`` -> bytes (binary units). ValueError with
    a sentence otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a size cannot be negative: {value}")
        return value
    text = str(value).strip().lower().replace("_", "")
    num = text.rstrip("kmgtib")
    unit = text[len(num):]
    try:
        n = float(num)
    except ValueError:
        n = -1.0
    if n < 0 or unit not in _UNITS:
        raise ValueError(f"not a size: {value!r} (examples: 4GiB, 512MiB, 65536)")
    return int(n * _UNITS[unit])


cdef int ceil_log2(uint64_t x) noexcept:
    cdef int k = 0
    while (<uint64_t>1 << k) < x:
        k += 1
    return k


# no_gc_clear: see _core/ring.pyx (a cycle must not unmap the ring before this is freed).
@cython.no_gc_clear
cdef class Arena:
    """A mapped arena. The daemon :meth:`create`\\ s it, clients :meth:`attach`."""

    @staticmethod
    def create(size, str instance="solo", str data_dir=None) -> Arena:
        """Create an arena of about ``size`` bytes (an int or ``"4GiB"``).

        The minimum block is a page, or larger for big arenas so the
        metadata stays at most 65536 entries (4 MiB); the size is rounded
        down to whole minimum blocks. ``data_dir``: put the data in a file
        there (a directory on hugetlbfs) instead of POSIX shm; the size is
        first rounded up to whole pages of that file system."""
        cdef uint64_t want = parse_size(size)
        cdef uint64_t page
        if data_dir is not None:
            page = os.statvfs(data_dir).f_bsize
            want = (want + page - 1) // page * page
        cdef int shift = MIN_SHIFT
        while (want >> shift) > TB_ARENA_MAX_BLOCKS:
            shift += 1
        cdef uint64_t nblocks = want >> shift
        if nblocks < 1:
            raise ValueError(f"an arena needs at least {1 << MIN_SHIFT} bytes, not {want}")
        cdef uint64_t data_size = nblocks << shift
        meta_size = TB_ARENA_HEADER_BYTES + nblocks * TB_ARENA_BLOCK_BYTES
        cdef Segment meta = Segment.create(segment_name(instance, "arena"), meta_size)
        cdef Segment data
        try:
            data_name = segment_name(instance, "arenadata")
            if data_dir is not None:
                data_name = os.path.join(os.path.abspath(data_dir), data_name)
            data = Segment.create(data_name, data_size)
        except BaseException:
            meta.unlink()
            meta.close()
            raise
        cdef tb_arena_header_t *h = <tb_arena_header_t *>meta.base
        h.version = TB_ARENA_VERSION
        h.nblocks = <uint32_t>nblocks
        h.min_shift = shift
        h.max_order = ceil_log2(nblocks + 1) - 1  # the largest k with 2^k <= nblocks
        h.creator_pid = os.getpid()
        h.data_size = data_size
        cdef Arena arena = Arena._open(meta, data)
        rc = tb_arena_init(&arena.a)
        if rc:
            meta.unlink()
            data.unlink()
            raise OSError(rc, f"cannot initialise the arena's mutex: {os.strerror(rc)}")
        tb_fence_sc()
        h.magic = TB_ARENA_MAGIC  # last: an attacher that sees it sees a whole header
        return arena

    @staticmethod
    def attach(str meta_name, str data_name, *, bint populate=True) -> Arena:
        """Map an existing arena, checking its magic, version and geometry.
        ``populate=False``: fault the data in lazily (a daemon taking over
        a 1 GiB arena would otherwise spend ~100 ms mapping it)."""
        cdef Segment meta = Segment.attach(meta_name)
        cdef Segment data
        cdef tb_arena_header_t *h
        try:
            data = Segment.attach(data_name, populate=populate)
        except BaseException:
            meta.close()
            raise
        h = <tb_arena_header_t *>meta.base
        problem = None
        if meta.size < TB_ARENA_HEADER_BYTES or h.magic != TB_ARENA_MAGIC:
            problem = "it is not a tensorbus arena"
        elif h.version != TB_ARENA_VERSION:
            problem = f"it has layout version {h.version}, this build reads {TB_ARENA_VERSION}"
        elif not (1 <= h.nblocks <= TB_ARENA_MAX_BLOCKS and 12 <= h.min_shift < 40
                  and (1 << h.max_order) <= h.nblocks < (2 << h.max_order)):
            problem = "its geometry is out of range"
        elif (meta.size < TB_ARENA_HEADER_BYTES + h.nblocks * TB_ARENA_BLOCK_BYTES
              or data.size < h.data_size or h.data_size != (<uint64_t>h.nblocks << h.min_shift)):
            problem = "its segments are smaller than its header says"
        if problem:
            meta.close()
            data.close()
            raise LayoutMismatchError(0, f"cannot attach arena {meta_name!r}: {problem}")
        return Arena._open(meta, data)

    @staticmethod
    cdef Arena _open(Segment meta, Segment data):
        cdef Arena arena = Arena.__new__(Arena)
        cdef tb_arena_header_t *h = <tb_arena_header_t *>meta.base
        arena.meta = meta
        arena.data = data
        arena.a.h = h
        arena.a.blocks = <tb_block_t *>(meta.base + TB_ARENA_HEADER_BYTES)
        arena.a.data = data.base
        arena.a.data_size = h.data_size
        arena.a.nblocks = h.nblocks
        arena.a.min_shift = h.min_shift
        arena.a.max_order = h.max_order
        return arena

    # -- geometry ----------------------------------------------------------

    @property
    def names(self) -> tuple:
        """(metadata segment, data segment): what a client attaches."""
        return self.meta.name, self.data.name

    @property
    def size(self) -> int:
        return self.a.data_size

    @property
    def block_size(self) -> int:
        """The smallest block: every allocation is a power-of-two multiple."""
        return 1 << self.a.min_shift

    @property
    def max_block(self) -> int:
        """The largest single allocation."""
        return 1 << (self.a.max_order + self.a.min_shift)

    def block_bytes(self, uint64_t nbytes) -> int:
        """What an allocation of ``nbytes`` takes from the arena."""
        cdef int k = ceil_log2(max(1, (nbytes + (1 << self.a.min_shift) - 1) >> self.a.min_shift))
        return 1 << (k + self.a.min_shift)

    # -- allocation (what publishers use goes through Loan) ---------------

    def loan(self, uint64_t nbytes, uint32_t owner) -> Loan:
        """A block of at least ``nbytes`` owned by holder slot ``owner``, or
        None if there is no space right now. MessageTooLargeError (a
        ValueError) if it could never fit."""
        cdef uint32_t gen = 0
        cdef int64_t i
        self._check()
        with nogil:
            i = tb_arena_alloc(&self.a, nbytes, owner, &gen)
        if i == -1:
            return None
        if i == -2:
            from tensorbus._core.errors import MessageTooLargeError
            raise MessageTooLargeError(
                f"a tensor of {nbytes} bytes can never fit this host's arena: its largest "
                f"block is {self.max_block} bytes (of {self.size}); start the broker with "
                "a larger --arena-size")
        if i < 0:
            raise OSError(f"the arena's mutex failed ({i})")
        return Loan._make(self, <uint32_t>i, gen, nbytes)

    def copy_out(self, uint64_t offset, uint64_t nbytes) -> bytes:
        """A copy of ``nbytes`` at ``offset`` (for a client without a holder slot)."""
        self._check()
        if offset + nbytes > self.a.data_size:
            raise ValueError(f"[{offset}, {offset + nbytes}) is outside the arena")
        cdef bytes out = PyBytes_FromStringAndSize(NULL, nbytes)
        cdef char *dst = PyBytes_AS_STRING(out)
        with nogil:
            memcpy(dst, self.a.data + offset, nbytes)
        return out

    def holder(self, uint32_t slot, int max_holds=1024) -> Holder:
        """The hold state of the client in holder slot ``slot`` (1..63)."""
        return Holder(self, slot, max_holds)

    # -- the daemon's cleanup ----------------------------------------------

    def release_holder(self, uint32_t slot) -> int:
        """Clear holder ``slot``'s bit on every block (its client is gone),
        freeing blocks it held last. Returns how many blocks it held."""
        self._check()
        if not 1 <= slot <= TB_MAX_HOLDERS:
            raise ValueError(f"holder slot must be 1..{TB_MAX_HOLDERS}, not {slot}")
        cdef uint64_t bit = (<uint64_t>1) << slot
        cdef uint32_t i, gen
        cdef int n = 0
        with nogil:
            for i in range(self.a.nblocks):
                if tb_load_acq_u64(&self.a.blocks[i].holds) & bit:
                    gen = self.a.blocks[i].generation
                    tb_arena_drop(&self.a, i, gen, bit)
                    n += 1
        return n

    def owned_by(self, uint32_t slot) -> list:
        """``(block, generation)`` of the used blocks allocated by holder
        ``slot`` whose owner reference (a loan, or a ring's) is still set."""
        self._check()
        out = []
        cdef uint32_t i = 0
        cdef tb_block_t *e
        while i < self.a.nblocks:
            e = &self.a.blocks[i]
            if ((e.state_order & 0xff) == TB_BLOCK_USED and e.owner == slot
                    and tb_load_acq_u64(&e.holds) & TB_HOLD_OWNER):
                out.append((i, e.generation))
            i += 1 << (e.state_order >> 8)
        return out

    def drop_owner(self, uint32_t block, uint32_t generation) -> bool:
        """Drop the owner reference of allocation ``generation`` of ``block``."""
        self._check()
        return tb_arena_drop_owner(&self.a, block, generation) == 1

    def stats(self) -> dict:
        """Size, bytes in use, the largest free block, counters."""
        self._check()
        cdef tb_arena_header_t *h = self.a.h
        cdef int k
        largest = 0
        if tb_arena_lock(&self.a) == 0:
            for k in range(self.a.max_order, -1, -1):
                if h.free_head[k] != 0xFFFFFFFF:
                    largest = 1 << (k + self.a.min_shift)
                    break
            used = h.used_bytes
            tb_arena_unlock(&self.a)
        else:
            used = h.used_bytes
        return {"size": self.a.data_size, "used": used, "free": self.a.data_size - used,
                "largest_free": largest, "block_size": self.block_size,
                "path": self.data.path, "page_size": self.data.page_size,
                "hugepages": self.data.page_size > PAGE_SIZE,
                "allocs": h.allocs, "frees": h.frees, "failed": h.failed,
                "repairs": h.repairs}

    # -- lifetime ----------------------------------------------------------

    cdef _check(self):
        if self.meta is None or self.meta.closed:
            raise TensorbusError("the arena is detached from this process")

    def close(self) -> None:
        """Unmap both segments (views of them must be gone)."""
        if self.meta is not None:
            self.data.close()
            self.meta.close()

    def own(self) -> None:
        """Make unlinking this attached arena this process's job (a daemon
        that took over its predecessor's arena)."""
        self.meta.own()
        self.data.own()

    def unlink(self) -> None:
        """Remove both segments' names (the daemon's job at shutdown)."""
        self.meta.unlink()
        self.data.unlink()

    def __repr__(self):
        return (f"<Arena {self.meta.name!r} {self.a.data_size} bytes, "
                f"blocks of {1 << self.a.min_shift}..{self.max_block}>")


@cython.no_gc_clear
cdef class Holder:
    """A client's holds on arena blocks (see the module docstring)."""

    def __cinit__(self, Arena arena, uint32_t slot, int max_holds=1024):
        if not 1 <= slot <= TB_MAX_HOLDERS:
            raise ValueError(f"holder slot must be 1..{TB_MAX_HOLDERS}, not {slot}")
        if max_holds < 1:
            raise ValueError(f"max_holds must be at least 1, not {max_holds}")
        self.arena = arena
        self.a = &arena.a
        self.slot = slot
        self.bit = (<uint64_t>1) << slot
        self.counts = <uint32_t *>calloc(arena.a.nblocks, sizeof(uint32_t))
        self.gens = <uint32_t *>calloc(arena.a.nblocks, sizeof(uint32_t))
        if self.counts == NULL or self.gens == NULL:
            raise MemoryError()
        self.held = 0
        self.max_holds = max_holds
        self.pid = os.getpid()

    def __dealloc__(self):
        free(self.counts)
        free(self.gens)

    cdef int acquire(self, uint32_t block, uint32_t generation) except -1:
        """Hold ``block`` of ``generation``: 1, or 0 if that allocation is gone.
        HoldLimitError (nothing taken) at ``max_holds`` blocks."""
        if block >= self.a.nblocks:
            return 0
        if self.counts[block]:
            if self.gens[block] != generation:
                return 0  # we hold a newer allocation: this descriptor is stale
            self.counts[block] += 1
            return 1
        if self.held >= self.max_holds:
            raise HoldLimitError(
                f"this client already holds {self.held} arena blocks (max_holds); "
                "release() received tensors or drop their views")
        if not tb_arena_hold(self.a, block, generation, self.bit):
            return 0
        self.counts[block] = 1
        self.gens[block] = generation
        self.held += 1
        return 1

    cdef void release(self, uint32_t block) noexcept:
        if self.counts[block] == 0:
            return
        self.counts[block] -= 1
        if self.counts[block] == 0:
            self.held -= 1
            if self.pid == os.getpid():  # a forked child releases nothing of the parent's
                tb_arena_drop(self.a, block, self.gens[block], self.bit)

    def forget(self) -> None:
        """After a fork: this process must not release the parent's holds."""
        self.pid = -1

    def __repr__(self):
        return f"<Holder slot={self.slot} held={self.held}/{self.max_holds}>"


@cython.no_gc_clear
cdef class Hold:
    """Keeps one arena block alive for a subscriber while any view of it
    lives; numpy arrays of a received tensor have it as their base."""

    @staticmethod
    cdef Hold _make(Holder holder, uint32_t block, uint64_t offset, uint64_t nbytes):
        cdef Hold h = Hold.__new__(Hold)
        h.holder = holder
        h.block = block
        h.ptr = holder.a.data + offset
        h.nbytes = nbytes
        h.live = True
        return h

    def __getbuffer__(self, Py_buffer *view, int flags):
        # Exported writable only so torch can wrap it; numpy views handed to
        # users are flagged read-only.
        PyBuffer_FillInfo(view, self, self.ptr, self.nbytes, 0, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass

    def __dealloc__(self):
        if self.live and self.holder is not None:
            self.live = False
            self.holder.release(self.block)

    def __repr__(self):
        return f"<Hold block={self.block} nbytes={self.nbytes}>"


@cython.no_gc_clear
cdef class Loan:
    """A writable arena block a publisher fills and then sends with no copy.
    Dropped unsent, the block goes back to the arena."""

    @staticmethod
    def _make(Arena arena, uint32_t block, uint32_t generation, uint64_t nbytes) -> Loan:
        cdef Loan loan = Loan.__new__(Loan)
        cdef tb_block_t *e = &arena.a.blocks[block]
        loan.arena = arena
        loan.block = block
        loan.generation = generation
        loan.offset = (<uint64_t>block) << arena.a.min_shift
        loan.ptr = arena.a.data + loan.offset
        loan.nbytes = nbytes
        loan.capacity = (<Py_ssize_t>1) << ((e.state_order >> 8) + arena.a.min_shift)
        loan.state = LOAN_OPEN
        loan.pid = os.getpid()
        return loan

    @property
    def open(self) -> bool:
        """Not sent and not cancelled."""
        return self.state == LOAN_OPEN

    @property
    def sent(self) -> bool:
        return self.state == LOAN_SENT

    def address(self) -> int:
        """Where the block starts in this process."""
        return <size_t>self.ptr

    def mark_sent(self) -> None:
        """The ring now owns the block (its descriptor was committed)."""
        self.state = LOAN_SENT

    def cancel(self) -> None:
        """Give the block back unsent. Views of it must not be used after."""
        self._cancel()

    cdef void _cancel(self) noexcept:
        if self.state == LOAN_OPEN:
            self.state = LOAN_CANCELLED
            if self.pid == os.getpid():
                tb_arena_drop_owner(&self.arena.a, self.block, self.generation)

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, self.ptr, self.nbytes, 0, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass

    def __dealloc__(self):
        if self.arena is not None:
            self._cancel()

    def __repr__(self):
        state = ("open", "sent", "cancelled")[self.state]
        return f"<Loan block={self.block} nbytes={self.nbytes} {state}>"
