"""The topic ring: a multi-producer, multi-subscriber log in one shared-memory
segment, in the style of the LMAX disruptor and Aeron's log buffer.

Two policies for a full ring:

* ``block``: a publisher claims a sequence by CAS on the head, and only after
  it has confirmed credit (the slowest cursor is less than a ring behind) and
  that the slot's previous occupant was committed. Claim, copy and commit
  happen in one C call, so no Python exception can leave a hole. Subscribers
  read slots in place (``peek``) or by copy (``recv``).
* ``overwrite``: a publisher claims by fetch-add and never waits. Each slot is
  a seqlock; subscribers read by copy and re-check, and a subscriber that was
  lapped counts the loss and jumps to about ``head - capacity/2``.

Each publisher has a record ``{state, seq}`` in the segment, each subscriber
a cursor entry. :meth:`Ring.repair` uses them to pad the claim of a dead
publisher and free the cursor of a dead subscriber, so no process death can
wedge a ring. See docs/ring.md for the whole protocol.
"""

import math
import os

from cpython.buffer cimport (
    PyBUF_C_CONTIGUOUS,
    PyBUF_WRITABLE,
    PyBuffer_FillInfo,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from posix.time cimport nanosleep, timespec

from tensorbus._core.atomic cimport (
    tb_cas32,
    tb_cas64,
    tb_fence_acq,
    tb_fence_rel,
    tb_fence_sc,
    tb_fetch_add32,
    tb_fetch_add64,
    tb_fetch_add_u64,
    tb_futex_wake_all,
    tb_load_acq32,
    tb_load_acq64,
    tb_load_rlx32,
    tb_load_rlx64,
    tb_load_rlx_u64,
    tb_load_sc64,
    tb_now_ns,
    tb_pid_alive,
    tb_realtime_ns,
    tb_store_rel32,
    tb_store_rel64,
    tb_store_rlx64,
    tb_store_sc64,
)
from tensorbus._core.layout cimport (
    TB_CURSOR_ACTIVE,
    TB_CURSOR_BYTES,
    TB_CURSOR_EVICTED,
    TB_CURSOR_FREE,
    TB_CURSOR_JOINING,
    TB_HEADER_BYTES,
    TB_DESC_BYTES,
    TB_MAX_NDIM,
    TB_META_BYTES,
    TB_MSG_ARENA,
    TB_MSG_INLINE,
    TB_MSG_PAD,
    TB_MSG_TENSOR,
    TB_NO_BLOCK,
    TB_RING_KEEP_LAST,
    TB_POLICY_BLOCK,
    TB_POLICY_OVERWRITE,
    TB_PUB_CLAIMED,
    TB_PUB_CLAIMING,
    TB_PUB_FREE,
    TB_PUB_IDLE,
    TB_PUBLISHER_BYTES,
    TB_RING_MAGIC,
    TB_RING_VERSION,
    TB_SLOT_HEADER_BYTES,
    TB_SLOTS_ALIGN,
    TB_WRITING,
    TB_CURSOR_GROUP,
    TB_CURSOR_LATEST,
    TB_LAT_BUCKETS,
    TB_LAT_FIRST,
    tb_bell_t,
    tb_cursor_t,
    tb_publisher_t,
    tb_ring_header_t,
    tb_slot_header_t,
    tb_tensor_desc_t,
)
from tensorbus._core.arena cimport Arena, Holder, Loan, tb_arena_drop_owner
from tensorbus._core.bells cimport BellTable
from tensorbus._core.segment cimport Segment
from tensorbus._core.wait cimport Waiter

import weakref

import numpy as _np

from tensorbus._core import tensors as _tensors

from tensorbus._core.errors import (
    BackpressureError,
    CapacityError,
    ClaimLostError,
    LayoutMismatchError,
    MessageTooLargeError,
    ReceiveTimeout,
    RingClosedError,
    SlowConsumer,
    TensorbusError,
    ViewInUseError,
)
from tensorbus._core.segment import segment_name

cdef extern from *:
    int __builtin_clzll(unsigned long long x) nogil

__all__ = ["Ring", "Publisher", "Subscriber", "POLICIES", "FLAG_BRIDGED", "FLAG_GAP"]

_ndarray = _np.ndarray
_TAG_OF = {}        # numpy dtype -> its tag
_LOAN_DTYPES = {}   # loan()'s dtype argument -> (numpy dtype, tag)

POLICIES = {"block": TB_POLICY_BLOCK, "overwrite": TB_POLICY_OVERWRITE}

# Slot flags tensorbus itself uses (the low byte is the application's).
# FLAG_BRIDGED: published by a bridge from another host; bridges never
# forward it again, so a full mesh of daemons carries each message once.
# FLAG_GAP: a gap marker a bridge publishes where messages were lost with a
# link; subscribers raise GapError with its msgpack body.
FLAG_BRIDGED = 0x8000
FLAG_GAP = 0x4000
_POLICY_NAMES = {v: k for k, v in POLICIES.items()}

cdef enum Status:
    ST_OK = 0
    ST_EMPTY = 1        # subscriber: nothing to read yet; publisher: no credit yet
    ST_CLOSED = 2
    ST_LOST = 3         # our claim was padded by a repair that took us for dead
    ST_DROPPED = 4      # overwrite: our message was overtaken in flight (counted)
    ST_EVICTED = 5

cdef enum Limits:
    MAX_CAPACITY = 1 << 24
    MAX_SLOT_SIZE = 1 << 26
    MAX_ENTRIES = 4096
    BUSY_SLOT_WAIT_NS = 200000  # overwrite: how long to wait for an older writer of our slot
    NOGIL_COPY_BYTES = 16384    # below this, dropping the GIL costs more than the copy

# ---------------------------------------------------------------------------
# nogil helpers on the validated view
# ---------------------------------------------------------------------------

cdef inline char *payload_of(tb_slot_header_t *s) noexcept nogil:
    return (<char *>s) + TB_SLOT_HEADER_BYTES


cdef inline uint32_t cursor_bound(RingView *v) noexcept nogil:
    cdef uint32_t hwm = tb_load_acq32(&v.h.cursor_hwm)
    return hwm if hwm < v.max_cursors else v.max_cursors


cdef inline uint32_t record_bound(RingView *v) noexcept nogil:
    cdef uint32_t hwm = tb_load_acq32(&v.h.publisher_hwm)
    return hwm if hwm < v.max_publishers else v.max_publishers


cdef int64_t slowest_cursor(RingView *v, int64_t head) noexcept nogil:
    """The smallest position of an active cursor, or ``head`` if there is none."""
    cdef int64_t low = head, p
    cdef uint32_t i
    cdef tb_cursor_t *c
    for i in range(cursor_bound(v)):
        c = &v.cursors[i]
        if tb_load_acq32(&c.state) == TB_CURSOR_ACTIVE:
            p = tb_load_sc64(&c.position)
            if p < low:
                low = p
    return low


cdef inline void record_latency(tb_cursor_t *c, int64_t ns) noexcept nogil:
    """Count one delivery latency in the cursor's half-octave histogram."""
    cdef uint64_t x = <uint64_t>ns if ns > 0 else 1
    cdef int e = 63 - __builtin_clzll(x)
    cdef int b = 2 * e + (<int>((x >> (e - 1)) & 1) if e > 0 else 0) - <int>TB_LAT_FIRST
    if b < 0:
        b = 0
    elif b >= <int>TB_LAT_BUCKETS:
        b = TB_LAT_BUCKETS - 1
    c.latency[b] += 1  # single writer: the cursor's owner


cdef inline void bump_max32(uint32_t *word, uint32_t value) noexcept nogil:
    cdef uint32_t seen
    while True:
        seen = tb_load_acq32(word)
        if seen >= value or tb_cas32(word, seen, value):
            return


cdef inline int reclaim_slot(RingView *v, tb_slot_header_t *s, int64_t seq) noexcept nogil:
    """Drop the arena reference of the message ``seq`` in slot ``s``, unless
    someone already did. The block and generation are read before the CAS on
    ``reclaim``: if it still names ``seq``, nobody has begun to reuse the
    slot, so they are that message's."""
    cdef tb_tensor_desc_t *d = <tb_tensor_desc_t *>payload_of(s)
    cdef uint32_t block = d.block, gen = d.generation
    if tb_cas64(&d.reclaim, seq, -1):
        tb_arena_drop_owner(v.arena, block, gen)
        return 1
    return 0


cdef int reclaim_window(RingView *v, int64_t lo, int64_t *upto) noexcept nogil:
    """Drop the arena references of the messages in ``[lo, upto)`` that
    every active cursor has read (all but the newest on "latest" rings;
    ``upto`` is set to that bound). Slots older than a ring's worth were
    reused, and their writers dropped them. Returns how many it dropped."""
    cdef int64_t head = tb_load_acq64(&v.h.head), seq
    cdef tb_slot_header_t *s
    cdef int n = 0
    upto[0] = slowest_cursor(v, head)
    if upto[0] > head - v.keep:
        upto[0] = head - v.keep
    seq = lo if lo > head - v.capacity else head - v.capacity
    if seq < 0:
        seq = 0
    while seq < upto[0]:
        s = slot_at(v, seq)
        if tb_load_acq64(&s.commit) == seq and s.type == TB_MSG_ARENA:
            n += reclaim_slot(v, s, seq)
        seq += 1
    return n


cdef void reclaim_passed(RingView *v) noexcept nogil:
    """Drop the arena references of the messages every active cursor has
    read, from the ring's hint on, and move the hint."""
    if v.arena == NULL:
        return
    cdef int64_t upto, lo
    reclaim_window(v, tb_load_acq64(&v.h.reclaim_hint), &upto)
    while True:  # advance the hint, never backwards
        lo = tb_load_acq64(&v.h.reclaim_hint)
        if lo >= upto or tb_cas64(&v.h.reclaim_hint, lo, upto):
            break


cdef int put_meta(tb_tensor_desc_t *d, bytes meta) except -1:
    """Copy the application's meta into a descriptor, or say why it does not fit."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(meta)
    if n > TB_META_BYTES:
        raise ValueError(f"meta is {n} bytes; at most {TB_META_BYTES} fit")
    memcpy(d.meta, PyBytes_AS_STRING(meta), n)
    return 0


cdef inline void nap_ms(long ms) noexcept nogil:
    cdef timespec ts
    ts.tv_sec = 0
    ts.tv_nsec = ms * 1000000
    nanosleep(&ts, NULL)


cdef struct WaitCtx:
    RingView *v
    tb_cursor_t *cur
    int64_t pos
    bint latest


cdef bint data_ready(void *p) noexcept nogil:
    cdef WaitCtx *ctx = <WaitCtx *>p
    return cursor_ready(ctx.v, ctx.cur, ctx.pos, ctx.latest)


cdef bint credit_ready(void *p) noexcept nogil:
    cdef WaitCtx *ctx = <WaitCtx *>p
    cdef RingView *v = ctx.v
    if tb_load_rlx32(&v.h.closed):
        return True
    cdef int64_t head = tb_load_sc64(&v.h.head)
    if head - slowest_cursor(v, head) >= v.capacity:
        return False
    return tb_load_acq64(&slot_at(v, head).commit) >= head - v.capacity


cdef int64_t timeout_to_ns(object timeout) except -2:
    """None -> -1 (no limit); seconds -> ns; a clear error for anything else.
    Shared with the inbox (declared in ring.pxd)."""
    if timeout is None:
        return -1
    cdef double t
    try:
        t = float(timeout)
    except (TypeError, ValueError):
        raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if math.isnan(t) or t < 0:
        raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
    if math.isinf(t):
        return -1
    return <int64_t>(t * 1e9)


cdef inline int64_t deadline_of(int64_t timeout_ns) noexcept nogil:
    return -1 if timeout_ns < 0 else tb_now_ns() + timeout_ns


# ---------------------------------------------------------------------------
# Ring
# ---------------------------------------------------------------------------

cdef class Ring:
    """A mapped ring segment. Create one with :meth:`create`, open an
    existing one with :meth:`attach`; make endpoints with :meth:`publisher`
    and :meth:`subscriber`.

    A ring and its endpoints are not thread-safe: use one endpoint per
    thread, as with sockets."""

    def __cinit__(self):
        self.endpoints = 0
        memset(&self.v, 0, sizeof(RingView))

    @staticmethod
    def create(str name=None, *, int capacity=1024, int slot_size=4096, str policy="block",
               int max_cursors=64, int max_publishers=64, str instance="solo",
               spin_us=None, BellTable bells=None, Waiter waiter=None,
               Arena arena=None, Holder holder=None, bint keep_last=False) -> Ring:
        """Create a ring segment (mode 0600) and map it.

        ``capacity`` is the number of slots (a power of two), ``slot_size``
        the largest message in bytes, ``policy`` ``"block"`` or
        ``"overwrite"``. ``name`` defaults to a fresh unguessable
        ``tb-<uid>-<instance>-ring.<random>``. ``bells``: the broker's bell
        table, needed to wake subscribers whose cursors name one of its bells.
        ``waiter``: a wait policy to share (one per process is enough); by
        default a new one from ``spin_us``. ``arena``: where messages larger
        than a slot live (``holder``: this client's holds and loans in it,
        needed to publish or receive them). ``keep_last``: the newest
        message's arena block outlives its readers (QoS "latest")."""
        if policy not in POLICIES:
            raise ValueError(f"policy must be 'block' or 'overwrite', not {policy!r}")
        if capacity < 2 or capacity > MAX_CAPACITY or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two between 2 and {MAX_CAPACITY}, "
                             f"got {capacity}")
        if slot_size < 1 or slot_size > MAX_SLOT_SIZE:
            raise ValueError(f"slot_size must be between 1 and {MAX_SLOT_SIZE} bytes, "
                             f"got {slot_size}")
        if not 1 <= max_cursors <= MAX_ENTRIES or not 1 <= max_publishers <= MAX_ENTRIES:
            raise ValueError(f"max_cursors and max_publishers must be between 1 and "
                             f"{MAX_ENTRIES}")
        layout = _layout(capacity, slot_size, max_cursors, max_publishers)
        if name is None:
            name = segment_name(instance, "ring")
        cdef Segment seg = Segment.create(name, layout["segment_size"])
        cdef tb_ring_header_t *h = <tb_ring_header_t *>seg.base
        h.version = TB_RING_VERSION
        h.policy = POLICIES[policy]
        h.capacity = capacity
        h.slot_size = slot_size
        h.slot_stride = layout["stride"]
        h.max_cursors = max_cursors
        h.max_publishers = max_publishers
        h.creator_pid = os.getpid()
        h.segment_size = layout["segment_size"]
        h.cursors_offset = layout["cursors_offset"]
        h.publishers_offset = layout["publishers_offset"]
        h.slots_offset = layout["slots_offset"]
        h.created_ns = tb_realtime_ns()
        h.flags = TB_RING_KEEP_LAST if keep_last else 0
        h.head = 0
        cdef char *slots = seg.base + h.slots_offset
        cdef int64_t i
        for i in range(capacity):
            # -1: "the sequence before any": satisfies the first lap's
            # "previous occupant committed" check and matches no reader.
            (<tb_slot_header_t *>(slots + i * h.slot_stride)).commit = -1
        tb_fence_rel()
        # The magic goes last: an attacher that sees it sees a whole header.
        (<uint64_t *>&h.magic)[0] = TB_RING_MAGIC
        tb_fence_sc()
        return Ring._open(seg, spin_us, bells, waiter, arena, holder)

    @staticmethod
    def attach(str name, *, spin_us=None, double init_timeout=1.0,
               BellTable bells=None, Waiter waiter=None, Arena arena=None,
               Holder holder=None) -> Ring:
        """Map an existing ring, checking its magic, version and geometry."""
        cdef Segment seg = Segment.attach(name)
        if seg.size < TB_HEADER_BYTES:
            seg.close()
            raise LayoutMismatchError(0, f"segment {name!r} ({seg.size} bytes) is too small "
                                      "to be a tensorbus ring")
        cdef tb_ring_header_t *h = <tb_ring_header_t *>seg.base
        cdef int64_t give_up = tb_now_ns() + <int64_t>(init_timeout * 1e9)
        while load_magic(h) == 0 and tb_now_ns() < give_up:
            nap_ms(1)  # its creator is still writing the header
        try:
            _check_header(name, h, seg.size)
        except BaseException:
            seg.close()
            raise
        return Ring._open(seg, spin_us, bells, waiter, arena, holder)

    @staticmethod
    cdef Ring _open(Segment seg, object spin_us, BellTable bells, Waiter waiter, Arena arena,
                    Holder holder):
        cdef Ring r = Ring.__new__(Ring)
        if holder is not None:
            if arena is not None and arena is not holder.arena:
                raise ValueError("holder belongs to another arena")
            arena = holder.arena
        cdef tb_ring_header_t *h = <tb_ring_header_t *>seg.base
        r.segment = seg
        r.v.h = h
        r.v.capacity = h.capacity
        r.v.mask = h.capacity - 1
        r.v.stride = h.slot_stride
        r.v.slot_size = h.slot_size
        r.v.max_cursors = h.max_cursors
        r.v.max_publishers = h.max_publishers
        r.v.policy = h.policy
        r.v.slots = seg.base + h.slots_offset
        r.v.cursors = <tb_cursor_t *>(seg.base + h.cursors_offset)
        r.v.records = <tb_publisher_t *>(seg.base + h.publishers_offset)
        r.waiter = waiter if waiter is not None else Waiter(spin_us)
        r.bells = bells
        r.arena = arena
        r.holder = holder
        r.v.arena = &arena.a if arena is not None else NULL
        r.v.keep = 1 if h.flags & TB_RING_KEEP_LAST else 0
        r.slice_ns = 50000000   # 50 ms
        r.stall_ns = 200000000  # 200 ms
        return r

    cdef void _check_open(self) except *:
        if self.v.h == NULL:
            raise RingClosedError(f"ring is detached from this process")

    # -- endpoints ---------------------------------------------------------

    def publisher(self, *, double timeout=5.0) -> Publisher:
        """A new publisher. ``timeout``: default seconds a ``send`` on a full
        block ring waits for credit before raising BackpressureError."""
        return Publisher(self, timeout)

    def subscriber(self) -> Subscriber:
        """A new subscriber; it receives everything published from now on."""
        return Subscriber(self)

    # -- cursors handed out by a broker ------------------------------------

    def join_cursor(self, uint32_t owner_pid, *, uint32_t bell=0, bint latest=False,
                    bint group=False) -> tuple:
        """Allocate and activate a cursor for process ``owner_pid`` (which
        adopts it with ``Subscriber(ring, cursor=..., generation=...)``).
        ``bell``: 0, or 1 + the index of its doorbell in the bell table.
        ``latest``: the cursor reads only the newest message and starts at
        the last one published. ``group``: a queue group's cursor, adopted
        by every member, each message claimed by exactly one of them.
        Returns ``(index, generation)``."""
        self._check_open()
        if bell and (self.bells is None or bell > self.bells.count):
            raise ValueError(f"bell reference {bell} is not in this ring's bell table")
        cdef uint32_t i = self._join(owner_pid, bell, (TB_CURSOR_LATEST if latest else 0)
                                     | (TB_CURSOR_GROUP if group else 0))
        return i, self.v.cursors[i].generation

    def free_cursor(self, uint32_t index, uint32_t generation) -> bool:
        """Free cursor ``index`` if it still has ``generation`` (a dead or
        departed subscriber's); publishers waiting for credit wake."""
        self._check_open()
        if index >= self.v.max_cursors:
            return False
        cdef tb_cursor_t *c = &self.v.cursors[index]
        cdef uint32_t st = tb_load_acq32(&c.state)
        if st == TB_CURSOR_FREE or c.generation != generation:
            return False
        if not tb_cas32(&c.state, st, TB_CURSOR_FREE):
            return False
        tb_fence_sc()
        with nogil:
            self._wake_publishers()
        return True

    def evict_cursor(self, uint32_t index, uint32_t generation) -> bool:
        """Mark an active cursor EVICTED (a slow consumer): it stops holding
        publishers back and its owner's next read raises."""
        self._check_open()
        if index >= self.v.max_cursors:
            return False
        cdef tb_cursor_t *c = &self.v.cursors[index]
        if c.generation != generation or not tb_cas32(&c.state, TB_CURSOR_ACTIVE,
                                                      TB_CURSOR_EVICTED):
            return False
        tb_fence_sc()
        with nogil:
            self._wake_publishers()
            self._wake_subscribers()
        return True

    cdef uint32_t _join(self, uint32_t owner_pid, uint32_t bell_ref,
                        uint32_t flags) except? 0xFFFFFFFF:
        cdef RingView *v = &self.v
        cdef uint32_t i
        cdef tb_cursor_t *c
        for i in range(v.max_cursors):
            c = &v.cursors[i]
            if tb_cas32(&c.state, TB_CURSOR_FREE, TB_CURSOR_JOINING):
                break
        else:
            raise CapacityError(f"ring {self.name!r} already has {v.max_cursors} "
                                "subscribers (max_cursors)")
        c.owner_pid = owner_pid
        c.generation += 1
        c.drops = 0
        c.received = 0
        c.bell.sleeping = 0
        c.bell_ref = bell_ref
        c.flags = flags
        memset(c.latency, 0, sizeof(c.latency))
        bump_max32(&v.h.cursor_hwm, i + 1)
        # Join without loss: publish a position, become visible, and retry
        # if the head ran a whole ring ahead meanwhile (a publisher that
        # scanned cursors before we were visible may have lapped us).
        cdef int64_t head
        cdef bint first = True
        while True:
            head = tb_load_sc64(&v.h.head)
            if flags & TB_CURSOR_LATEST and head > 0:
                head -= 1  # a new "latest" reader gets the current value at once
            tb_store_sc64(&c.position, head)
            if first:
                tb_cas32(&c.state, TB_CURSOR_JOINING, TB_CURSOR_ACTIVE)
                first = False
            if tb_load_sc64(&v.h.head) - head < v.capacity:
                break
        return i

    # -- properties --------------------------------------------------------

    @property
    def responders(self) -> int:
        """Request topics: members of the queue group reading this ring."""
        self._check_open()
        return tb_load_acq32(&self.v.h.responders)

    def set_responders(self, uint32_t n) -> None:
        """The broker's count of queue-group members (see ``responders``)."""
        self._check_open()
        tb_store_rel32(&self.v.h.responders, n)

    @property
    def name(self) -> str:
        return self.segment.name

    @property
    def policy(self) -> str:
        return _POLICY_NAMES[self.v.policy]

    @property
    def capacity(self) -> int:
        return self.v.capacity

    @property
    def slot_size(self) -> int:
        return self.v.slot_size

    @property
    def head(self) -> int:
        self._check_open()
        return tb_load_acq64(&self.v.h.head)

    @property
    def closed(self) -> bool:
        return self.v.h == NULL or tb_load_acq32(&self.v.h.closed) != 0

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Close the ring for everyone: publishers get RingClosedError at
        once, subscribers once they have read what was committed."""
        self._check_open()
        tb_store_rel32(&self.v.h.closed, 1)
        tb_fence_sc()
        with nogil:
            self._wake_subscribers()
            self._wake_publishers()

    def unlink(self) -> None:
        """Remove the segment's name (creator only); mappings stay valid."""
        self.segment.unlink()

    def detach(self) -> None:
        """Unmap the ring from this process. Its endpoints must be closed."""
        if self.endpoints:
            raise TensorbusError(f"ring {self.name!r} still has {self.endpoints} open "
                                 "endpoint(s); close them before detach()")
        memset(&self.v, 0, sizeof(RingView))
        self.segment.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.v.h != NULL and not self.endpoints:
            self.detach()

    # -- wakes -------------------------------------------------------------

    cdef int _wake_subscribers(self) noexcept nogil:
        """Ring the doorbell of every subscriber that announced a sleep.
        Callers have issued the seq_cst fence after their commit."""
        cdef uint32_t i, ref
        cdef int woken = 0
        cdef tb_cursor_t *c
        for i in range(cursor_bound(&self.v)):
            c = &self.v.cursors[i]
            ref = tb_load_rlx32(&c.bell_ref)
            if ref:
                if self.bells is not None and tb_load_rlx32(&c.state) != TB_CURSOR_FREE:
                    self.bells.ring(ref - 1)
                    woken += 1
            elif tb_load_rlx32(&c.bell.sleeping):
                tb_fetch_add32(&c.bell.seq, 1)
                tb_futex_wake_all(&c.bell.seq)
                woken += 1
        return woken

    cdef void _wake_publishers(self) noexcept nogil:
        if tb_load_rlx32(&self.v.h.space.sleeping):
            tb_fetch_add32(&self.v.h.space.seq, 1)
            tb_futex_wake_all(&self.v.h.space.seq)

    # -- crash recovery ----------------------------------------------------

    def repair(self) -> dict:
        """Undo what dead processes left behind: free the cursors of dead
        subscribers (so publishers get their credit back) and pad the
        claimed-but-uncommitted slot of a dead publisher (so subscribers can
        move past it). Safe to call from any process at any time; the broker
        calls it when it sees a client die, waiters call it when stalled."""
        self._check_open()
        cdef RingView *v = &self.v
        cdef uint32_t i, st
        cdef tb_cursor_t *c
        cdef tb_publisher_t *r
        freed_cursors = padded = freed_records = 0
        for i in range(cursor_bound(v)):
            c = &v.cursors[i]
            st = tb_load_acq32(&c.state)
            if st != TB_CURSOR_FREE and not tb_pid_alive(tb_load_rlx32(&c.owner_pid)):
                if tb_cas32(&c.state, st, TB_CURSOR_FREE):
                    freed_cursors += 1
        for i in range(record_bound(v)):
            r = &v.records[i]
            st = tb_load_acq32(&r.state)
            if st == TB_PUB_FREE or tb_pid_alive(tb_load_rlx32(&r.owner_pid)):
                continue
            if st == TB_PUB_CLAIMING or st == TB_PUB_CLAIMED:
                outcome = self._pad_claim(tb_load_rlx64(&r.seq))
                if outcome < 0:
                    continue  # a live publisher may still own that sequence: later
                padded += outcome
            if tb_cas32(&r.state, st, TB_PUB_FREE):
                freed_records += 1
        tb_fence_sc()
        with nogil:
            if padded:
                self._wake_subscribers()
            if freed_cursors:
                self._wake_publishers()
        return {"cursors_freed": freed_cursors, "claims_padded": padded,
                "records_freed": freed_records}

    cdef int _pad_claim(self, int64_t seq) except -2:
        """Pad ``seq`` if a dead publisher claimed it and nobody committed it.
        1 padded, 0 nothing to do, -1 try again later."""
        cdef RingView *v = &self.v
        cdef tb_slot_header_t *s = slot_at(v, seq)
        cdef int64_t c = tb_load_acq64(&s.commit)
        cdef uint32_t i, st
        if v.policy == TB_POLICY_OVERWRITE:
            if c != (seq | TB_WRITING):
                return 0
        else:
            if c >= seq or tb_load_acq64(&v.h.head) <= seq:
                return 0  # committed, or the claim never happened
            if c < seq - v.capacity:
                return -1  # the slot's previous claim is unresolved: pad that first
            for i in range(record_bound(v)):
                st = tb_load_acq32(&v.records[i].state)
                if ((st == TB_PUB_CLAIMING or st == TB_PUB_CLAIMED)
                        and tb_load_rlx64(&v.records[i].seq) == seq
                        and tb_pid_alive(tb_load_rlx32(&v.records[i].owner_pid))):
                    return -1
        s.length = 0
        s.type = TB_MSG_PAD
        s.flags = 0
        s.timestamp_ns = tb_realtime_ns()
        return 1 if tb_cas64(&s.commit, c, seq) else 0

    def reclaim(self) -> int:
        """Drop the arena references of every message all subscribers have
        read (the broker calls it when it frees cursors). Returns the number
        of references dropped."""
        self._check_open()
        if self.v.arena == NULL:
            return 0
        cdef int64_t upto
        return reclaim_window(&self.v, 0, &upto)  # the whole window, whatever the hint says

    def arena_refs(self) -> set:
        """``(block, generation)`` of every arena block a message in this ring
        still references (the broker checks a dead publisher's loans)."""
        self._check_open()
        cdef RingView *v = &self.v
        cdef int64_t head = tb_load_acq64(&v.h.head), seq
        cdef tb_slot_header_t *s
        cdef tb_tensor_desc_t *d
        out = set()
        seq = max(0, head - v.capacity)
        while seq < head:
            s = slot_at(v, seq)
            if s.type == TB_MSG_ARENA:
                d = <tb_tensor_desc_t *>payload_of(s)
                if tb_load_acq64(&d.reclaim) == seq:
                    out.add((d.block, d.generation))
            seq += 1
        return out

    # -- introspection -----------------------------------------------------

    def stats(self) -> dict:
        """A snapshot of the ring: head, every live cursor and publisher."""
        self._check_open()
        cdef RingView *v = &self.v
        cdef int64_t head = tb_load_acq64(&v.h.head)
        cdef uint32_t i
        cdef tb_cursor_t *c
        cdef tb_publisher_t *r
        cursors = []
        for i in range(cursor_bound(v)):
            c = &v.cursors[i]
            if tb_load_acq32(&c.state) != TB_CURSOR_FREE:
                pos = tb_load_acq64(&c.position)
                cursors.append({"index": i, "pid": c.owner_pid, "position": pos,
                                "lag": head - pos, "drops": tb_load_rlx_u64(&c.drops),
                                "received": tb_load_rlx_u64(&c.received),
                                "generation": c.generation,
                                "latency": [c.latency[k] for k in range(TB_LAT_BUCKETS)],
                                "state": ("joining", "active", "evicted")[c.state - 1]})
        publishers = []
        for i in range(record_bound(v)):
            r = &v.records[i]
            if tb_load_acq32(&r.state) != TB_PUB_FREE:
                publishers.append({"index": i, "pid": r.owner_pid,
                                   "published": tb_load_rlx_u64(&r.published),
                                   "bytes": tb_load_rlx_u64(&r.bytes),
                                   "dropped": tb_load_rlx_u64(&r.dropped)})
        return {"name": self.name, "policy": self.policy, "capacity": v.capacity,
                "slot_size": v.slot_size, "head": head, "closed": bool(v.h.closed),
                "cursors": cursors, "publishers": publishers}

    def totals(self) -> tuple:
        """Every entry's counters, free entries included, for a reader that
        keeps cumulative totals: ``(head, cursors, publishers)``, cursors as
        ``(index, generation, active, lag, received, drops, latency)`` and
        publisher records as ``(index, pid, live, published, bytes, dropped)``.
        A freed entry keeps its last counts until it is taken again (which
        zeroes them), so a subscriber or publisher that left since the last
        read is still counted whole. The ``latency`` counts are u32 and wrap."""
        self._check_open()
        cdef RingView *v = &self.v
        cdef int64_t head = tb_load_acq64(&v.h.head)
        cdef uint32_t i
        cdef tb_cursor_t *c
        cdef tb_publisher_t *r
        cursors = []
        for i in range(cursor_bound(v)):
            c = &v.cursors[i]
            cursors.append((i, c.generation, tb_load_acq32(&c.state) == TB_CURSOR_ACTIVE,
                            head - tb_load_acq64(&c.position),
                            tb_load_rlx_u64(&c.received), tb_load_rlx_u64(&c.drops),
                            tuple([c.latency[k] for k in range(TB_LAT_BUCKETS)])))
        publishers = []
        for i in range(record_bound(v)):
            r = &v.records[i]
            publishers.append((i, r.owner_pid, tb_load_acq32(&r.state) != TB_PUB_FREE,
                               tb_load_rlx_u64(&r.published),
                               tb_load_rlx_u64(&r.bytes), tb_load_rlx_u64(&r.dropped)))
        return head, cursors, publishers

    def cursor_lags(self) -> list:
        """``(index, generation, lag, drops)`` of each active cursor: the
        broker's cheap per-tick view for pressure and slow-consumer checks."""
        self._check_open()
        cdef RingView *v = &self.v
        cdef int64_t head = tb_load_acq64(&v.h.head)
        cdef uint32_t i
        cdef tb_cursor_t *c
        out = []
        for i in range(cursor_bound(v)):
            c = &v.cursors[i]
            if tb_load_acq32(&c.state) == TB_CURSOR_ACTIVE:
                out.append((i, c.generation, head - tb_load_acq64(&c.position),
                            tb_load_rlx_u64(&c.drops)))
        return out

    def __repr__(self):
        if self.v.h == NULL:
            return f"<Ring {self.segment.name!r} detached>"
        return (f"<Ring {self.name!r} {self.policy} capacity={self.capacity} "
                f"slot_size={self.slot_size} head={self.head}>")


cdef inline uint64_t load_magic(tb_ring_header_t *h) noexcept nogil:
    tb_fence_acq()
    return (<volatile uint64_t *>&h.magic)[0]


def _layout(int capacity, int slot_size, int max_cursors, int max_publishers) -> dict:
    stride = (TB_SLOT_HEADER_BYTES + slot_size + 63) // 64 * 64
    cursors_offset = TB_HEADER_BYTES
    publishers_offset = cursors_offset + max_cursors * TB_CURSOR_BYTES
    slots_offset = -(-(publishers_offset + max_publishers * TB_PUBLISHER_BYTES)
                     // TB_SLOTS_ALIGN) * TB_SLOTS_ALIGN
    return {"stride": stride, "cursors_offset": cursors_offset,
            "publishers_offset": publishers_offset, "slots_offset": slots_offset,
            "segment_size": slots_offset + capacity * stride}


cdef _check_header(str name, tb_ring_header_t *h, size_t size):
    if h.magic != TB_RING_MAGIC:
        raise LayoutMismatchError(0, f"segment {name!r} is not a tensorbus ring "
                                  f"(magic {h.magic:#x})")
    if h.version != TB_RING_VERSION:
        raise LayoutMismatchError(0, f"ring {name!r} has layout version {h.version}; "
                                  f"this build reads version {TB_RING_VERSION}")
    problem = None
    if h.policy not in _POLICY_NAMES:
        problem = f"unknown policy {h.policy}"
    elif h.capacity < 2 or h.capacity > MAX_CAPACITY or h.capacity & (h.capacity - 1):
        problem = f"capacity {h.capacity} is not a power of two in range"
    elif h.slot_size < 1 or h.slot_size > MAX_SLOT_SIZE:
        problem = f"slot size {h.slot_size} is out of range"
    elif not (1 <= h.max_cursors <= MAX_ENTRIES and 1 <= h.max_publishers <= MAX_ENTRIES):
        problem = "cursor or publisher count out of range"
    else:
        want = _layout(h.capacity, h.slot_size, h.max_cursors, h.max_publishers)
        got = {"stride": h.slot_stride, "cursors_offset": h.cursors_offset,
               "publishers_offset": h.publishers_offset, "slots_offset": h.slots_offset,
               "segment_size": h.segment_size}
        if got != want:
            problem = f"geometry {got} does not match its parameters ({want})"
        elif h.segment_size != size:
            problem = f"header says {h.segment_size} bytes but the segment has {size}"
    if problem:
        raise LayoutMismatchError(0, f"header of ring {name!r} is inconsistent: {problem}")


# ---------------------------------------------------------------------------
# Publisher
# ---------------------------------------------------------------------------

cdef class Publisher:
    """Publishes messages into a ring. Messages up to the ring's slot size
    are copied into the slot in one nogil call (claim, copy, commit)."""

    def __cinit__(self, Ring ring, double timeout=5.0):
        ring._check_open()
        if timeout < 0 or math.isnan(timeout):
            raise ValueError(f"timeout must be >= 0 seconds, got {timeout}")
        self.ring = ring
        self.v = &ring.v
        self.default_timeout = timeout
        self.closed = True
        cdef uint32_t i
        cdef tb_publisher_t *r
        for i in range(self.v.max_publishers):
            r = &self.v.records[i]
            if tb_cas32(&r.state, TB_PUB_FREE, TB_PUB_IDLE):
                break
        else:
            raise CapacityError(f"ring {ring.name!r} already has {self.v.max_publishers} "
                                "publishers (max_publishers)")
        r.owner_pid = os.getpid()
        r.published = 0
        r.dropped = 0
        r.bytes = 0
        tb_store_rlx64(&r.seq, -1)
        bump_max32(&self.v.h.publisher_hwm, i + 1)
        self.rec = r
        self.index = i
        self.cached_min = -(1 << 62)
        self.stall_since = 0
        self.inline_max = self.v.slot_size
        self.loans = {}
        self.closed = False
        ring.endpoints += 1

    cdef int _publish(self, const char *hdr, uint32_t hn, const char *data, uint32_t n,
                      uint16_t type, uint16_t flags, int64_t *seq) noexcept nogil:
        """Claim, copy (``hdr`` then ``data``) and commit one message. Never
        leaves a claim held."""
        cdef RingView *v = self.v
        cdef tb_publisher_t *rec = self.rec
        cdef tb_slot_header_t *s
        cdef int64_t head, prev, give_up = 0
        cdef bint ok
        if tb_load_acq32(&v.h.closed):
            return ST_CLOSED

        if v.policy == TB_POLICY_BLOCK:
            while True:
                head = tb_load_sc64(&v.h.head)
                if head - self.cached_min >= v.capacity:
                    self.cached_min = slowest_cursor(v, head)
                    if head - self.cached_min >= v.capacity:
                        return ST_EMPTY
                s = slot_at(v, head)
                prev = tb_load_acq64(&s.commit)
                if prev >= head:
                    continue  # our head is stale: someone claimed and committed it
                if prev < head - v.capacity:
                    return ST_EMPTY  # the slot's previous writer has not committed yet
                # Record the intent before the claim so a repair can tell
                # whose sequence this is if we die right after the CAS.
                tb_store_rlx64(&rec.seq, head)
                tb_store_rel32(&rec.state, TB_PUB_CLAIMING)
                if tb_cas64(&v.h.head, head, head + 1):
                    break
            tb_store_rel32(&rec.state, TB_PUB_CLAIMED)
            if s.type == TB_MSG_ARENA and v.arena != NULL:
                reclaim_slot(v, s, head - v.capacity)  # usually done already
        else:
            tb_store_rel32(&rec.state, TB_PUB_CLAIMING)
            head = tb_fetch_add64(&v.h.head, 1)
            tb_store_rlx64(&rec.seq, head)
            tb_store_rel32(&rec.state, TB_PUB_CLAIMED)
            s = slot_at(v, head)
            while True:
                prev = tb_load_acq64(&s.commit)
                if prev >= 0 and prev & TB_WRITING:
                    # Another writer fills this slot: a newer one makes our
                    # message stale; an older one should finish in a moment.
                    if (prev & ~TB_WRITING) > head:
                        return self._overtaken(head, seq)
                    if give_up == 0:
                        give_up = tb_now_ns() + BUSY_SLOT_WAIT_NS
                    elif tb_now_ns() > give_up:
                        return self._overtaken(head, seq)
                    continue
                if prev >= head:
                    return self._overtaken(head, seq)
                if tb_cas64(&s.commit, prev, head | TB_WRITING):
                    if prev >= 0 and s.type == TB_MSG_ARENA and v.arena != NULL:
                        reclaim_slot(v, s, prev)  # we overwrite it: its block goes
                    prev = head | TB_WRITING
                    break
            tb_fence_rel()  # the WRITING mark is visible before any payload byte

        s.length = hn + n
        s.type = type
        s.flags = flags
        s.timestamp_ns = tb_realtime_ns()
        s.publisher = self.index
        if hn:
            memcpy(payload_of(s), hdr, hn)
            if type == TB_MSG_ARENA:
                # The ring's reference to the block, dropped once everyone passed.
                (<tb_tensor_desc_t *>payload_of(s)).reclaim = head
        memcpy(payload_of(s) + hn, data, n)
        ok = tb_cas64(&s.commit, prev, head)  # release: payload before commit
        tb_store_rel32(&rec.state, TB_PUB_IDLE)
        if not ok:
            return ST_LOST
        rec.published += 1  # single writer: the record's owner
        rec.bytes += n if type != TB_MSG_ARENA else (<tb_tensor_desc_t *>hdr).nbytes
        seq[0] = head
        tb_fence_sc()  # commit before reading "sleepers": see docs/ring.md
        if tb_load_rlx32(&v.h.sleepers):
            self.ring._wake_subscribers()
        return ST_OK

    cdef int _overtaken(self, int64_t head, int64_t *seq) noexcept nogil:
        tb_store_rel32(&self.rec.state, TB_PUB_IDLE)
        tb_fetch_add_u64(&self.rec.dropped, 1)
        seq[0] = head
        return ST_DROPPED

    cdef int64_t _send(self, const char *hdr, Py_ssize_t hn, const char *data, Py_ssize_t n,
                       int type, int flags, object timeout) except -1:
        if self.closed:
            raise RingClosedError("publisher is closed")
        if hn + n > self.v.slot_size:
            raise MessageTooLargeError(
                f"message of {n} bytes does not fit the ring's slot size of "
                f"{self.v.slot_size} bytes")
        if flags < 0 or flags > 0xFFFF:
            raise ValueError(f"flags must fit in 16 bits (0..65535), got {flags}")
        cdef int64_t timeout_ns = (<int64_t>(self.default_timeout * 1e9) if timeout is None
                                   else timeout_to_ns(timeout))
        cdef int64_t seq = -1, deadline = -2, now, slice_ns
        cdef int st
        cdef bint ready
        cdef bint big = n >= NOGIL_COPY_BYTES
        cdef WaitCtx ctx
        ctx.v = self.v
        ctx.cur = NULL
        ctx.pos = 0
        ctx.latest = False
        while True:
            if big:
                with nogil:
                    st = self._publish(hdr, <uint32_t>hn, data, <uint32_t>n, <uint16_t>type,
                                       <uint16_t>flags, &seq)
            else:
                st = self._publish(hdr, <uint32_t>hn, data, <uint32_t>n, <uint16_t>type,
                                   <uint16_t>flags, &seq)
            if st == ST_OK or st == ST_DROPPED:
                self.stall_since = 0
                self.last_dropped = st == ST_DROPPED
                return seq
            if st == ST_CLOSED:
                raise RingClosedError(f"ring {self.ring.name!r} is closed")
            if st == ST_LOST:
                raise ClaimLostError(f"the claim of sequence {seq} on ring {self.ring.name!r} "
                                     "was padded by a repair that took this process for dead")
            # No credit: wait for the slowest subscriber.
            now = tb_now_ns()
            if deadline == -2:
                deadline = -1 if timeout_ns < 0 else now + timeout_ns
            if deadline >= 0 and now >= deadline:
                self._raise_backpressure(timeout_ns)
            slice_ns = self.ring.slice_ns
            if deadline >= 0 and deadline - now < slice_ns:
                slice_ns = deadline - now
            with nogil:
                ready = self.ring.waiter.wait(credit_ready, &ctx, &self.v.h.space.seq,
                                              &self.v.h.space.sleeping, NULL, 0, slice_ns)
            if not ready:
                PyErr_CheckSignals()
                now = tb_now_ns()
                if self.stall_since == 0:
                    self.stall_since = now
                elif now - self.stall_since > self.ring.stall_ns:
                    self.ring.repair()  # a dead subscriber or publisher may hold us up

    cdef _raise_backpressure(self, int64_t timeout_ns):
        cdef int64_t head = tb_load_acq64(&self.v.h.head)
        lag = head - slowest_cursor(self.v, head)
        raise BackpressureError(
            f"ring {self.ring.name!r} is full: no credit within {timeout_ns / 1e9:g} s; "
            f"the slowest subscriber is {lag} messages behind (capacity {self.v.capacity})")

    def send(self, data, *, int flags=0, timeout=None, meta=None) -> int:
        """Publish ``data`` and return its sequence number.

        ``data``: bytes or any buffer (received as a memoryview); a numpy
        array, a torch CPU tensor or a ``__dlpack__`` object (received as an
        array of the same dtype and shape). Up to ``inline_max`` bytes go in
        the ring slot; larger ones are copied once into the arena, and an
        array from :meth:`loan` is sent with no copy at all. A non-contiguous
        array is made contiguous by that one copy. ``meta``: up to 32 bytes
        of the application's, carried with tensors.

        On a full reliable ring (or a full arena) wait up to ``timeout``
        seconds (default: the publisher's), then raise BackpressureError."""
        if type(data) is bytes and meta is None:
            if PyBytes_GET_SIZE(data) <= self.inline_max:
                return self._send(NULL, 0, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data),
                                  TB_MSG_INLINE, flags, timeout)
        elif meta is not None and type(meta) is bytes and self.v.arena != NULL and (
                type(data) is bytes or type(data) is memoryview):
            # Small bytes with meta (requests, replies): a "bytes" tensor
            # built right here, no numpy on the way.
            return self._send_small_bytes(data, meta, flags, timeout)
        return self._send_object(data, flags, timeout, meta)

    def send_described(self, arr, str tag, *, meta=None, int flags=0, timeout=None) -> int:
        """Publish ``arr`` (any dtype of the right item size and shape) as a
        tensor described by ``tag``: what a bridge does with a message that
        arrived as bytes plus a description. A loaned ``arr`` goes with no
        copy, as in :meth:`send`."""
        _tensors.numpy_dtype(tag)  # raises for a tag tensorbus does not carry
        return self._send_array(arr, tag, flags, timeout, meta)

    cdef int64_t _send_small_bytes(self, object data, bytes meta, int flags,
                                   object timeout) except -2:
        cdef Py_buffer buf
        cdef tb_tensor_desc_t d
        PyObject_GetBuffer(data, &buf, PyBUF_C_CONTIGUOUS)
        if TB_DESC_BYTES + buf.len > self.inline_max:
            PyBuffer_Release(&buf)
            return self._send_object(data, flags, timeout, meta)
        try:
            memset(&d, 0, sizeof(d))
            memcpy(d.dtype, b"bytes", 5)
            d.block = TB_NO_BLOCK
            d.ndim = 1
            d.shape[0] = buf.len
            d.nbytes = buf.len
            put_meta(&d, meta)
            return self._send(<const char *>&d, TB_DESC_BYTES, <const char *>buf.buf, buf.len,
                              TB_MSG_TENSOR, flags, timeout)
        finally:
            PyBuffer_Release(&buf)

    cdef int64_t _send_object(self, object data, int flags, object timeout, object meta) except -2:
        cdef Py_buffer buf
        cdef type kind = type(data)
        cdef bint arena = self.v.arena != NULL
        if not arena and meta is not None:
            raise ValueError("meta needs a ring with an arena (a broker's topic)")
        # A ring outside a broker (no arena) carries bytes: any buffer, raw.
        # Plain buffers skip the tensor probes: this is the echo's hot path.
        if arena and kind is not memoryview and kind is not bytearray:
            if isinstance(data, _ndarray):
                return self._send_array(data, None, flags, timeout, meta)
            if isinstance(data, _np.generic):  # a numpy scalar: a 0-d array
                return self._send_array(_np.asarray(data), None, flags, timeout, meta)
            arr, tag = _tensors.from_object(data)
            if arr is not None:
                return self._send_array(arr, tag, flags, timeout, meta)
        try:
            PyObject_GetBuffer(data, &buf, PyBUF_C_CONTIGUOUS)
        except (TypeError, ValueError, BufferError) as exc:
            raise TypeError(f"send() takes bytes or a C-contiguous buffer (or, on a broker's "
                            f"topic, a numpy array or a tensor), not {type(data).__name__}: "
                            f"{exc}") from None
        try:
            if meta is None and (buf.len <= self.inline_max or not arena):
                return self._send(NULL, 0, <const char *>buf.buf, buf.len, TB_MSG_INLINE,
                                  flags, timeout)
        finally:
            PyBuffer_Release(&buf)
        # A large buffer (or one with meta): a 1-d byte tensor the receiver sees as bytes.
        return self._send_array(_np.frombuffer(data, dtype=_np.uint8), _tensors.BYTES_TAG,
                                flags, timeout, meta)

    cdef int64_t _send_array(self, object arr, str tag, int flags, object timeout,
                             object meta) except -2:
        cdef tb_tensor_desc_t d
        cdef Py_buffer buf
        cdef Py_ssize_t nbytes, k
        cdef bint have_buf = False
        cdef Loan loan = None
        cdef char *base
        cdef bytes tag_b
        if self.closed:
            raise RingClosedError("publisher is closed")
        if tag is None:
            tag = _TAG_OF.get(arr.dtype)
            if tag is None or arr.ndim > TB_MAX_NDIM:
                tag = _tensors.tag_of(arr)  # raises with a sentence if unsupported
                _TAG_OF[arr.dtype] = tag
        elif arr.ndim > TB_MAX_NDIM:
            raise ValueError(f"cannot send a {arr.ndim}-d array: at most {TB_MAX_NDIM} "
                             "dimensions")
        memset(&d, 0, sizeof(d))
        tag_b = tag.encode()
        memcpy(d.dtype, <const char *>tag_b, len(tag_b))
        shape = arr.shape
        d.ndim = len(shape)
        for k in range(d.ndim):
            d.shape[k] = shape[k]
        if meta is not None:
            put_meta(&d, bytes(meta))
        d.block = TB_NO_BLOCK
        nbytes = arr.nbytes
        d.nbytes = nbytes
        try:
            PyObject_GetBuffer(arr, &buf, PyBUF_C_CONTIGUOUS)
            have_buf = True
        except (ValueError, BufferError):
            pass  # not contiguous: one copy below makes it so
        try:
            if have_buf and self.v.arena != NULL:
                base = self.v.arena.data
                if base <= <char *>buf.buf < base + self.v.arena.data_size:
                    loan = self._own_loan(<size_t>buf.buf, nbytes)
                    if loan is not None:
                        # Zero copy: the array lives in our loaned block.
                        d.block = loan.block
                        d.generation = loan.generation
                        d.offset = <uint64_t>(<char *>buf.buf - base)
                        seq = self._send(<const char *>&d, TB_DESC_BYTES, NULL, 0,
                                         TB_MSG_ARENA, flags, timeout)
                        if self.last_dropped:
                            return seq  # overtaken, never written: the loan stays the caller's
                        loan.mark_sent()
                        self.loans.pop(loan.block, None)
                        reclaim_passed(self.v)
                        return seq
            if TB_DESC_BYTES + nbytes <= self.inline_max:
                if not have_buf:
                    arr = _np.ascontiguousarray(arr)
                    PyObject_GetBuffer(arr, &buf, PyBUF_C_CONTIGUOUS)
                    have_buf = True
                return self._send(<const char *>&d, TB_DESC_BYTES, <const char *>buf.buf,
                                  nbytes, TB_MSG_TENSOR, flags, timeout)
            # One copy into a fresh block, then publish its descriptor.
            try:
                loan = self._loan_block(nbytes, timeout)
            except BackpressureError:
                if self.v.policy == TB_POLICY_BLOCK:
                    raise
                # Realtime: newest wins and nothing waits; a full arena is
                # one more drop, counted like an overtaken message.
                tb_fetch_add_u64(&self.rec.dropped, 1)
                return -1
            if have_buf:
                if nbytes >= NOGIL_COPY_BYTES:
                    with nogil:
                        memcpy(loan.ptr, buf.buf, nbytes)
                else:
                    memcpy(loan.ptr, buf.buf, nbytes)
            else:
                _np.copyto(_np.ndarray(shape, dtype=arr.dtype, buffer=loan), arr)
            d.block = loan.block
            d.generation = loan.generation
            d.offset = loan.offset
            seq = self._send(<const char *>&d, TB_DESC_BYTES, NULL, 0, TB_MSG_ARENA, flags,
                             timeout)
            if self.last_dropped:
                loan.cancel()  # overtaken, never written: nothing references the block
                return seq
            loan.mark_sent()
            reclaim_passed(self.v)
            return seq
        finally:
            if have_buf:
                PyBuffer_Release(&buf)

    cdef object _own_loan(self, size_t address, Py_ssize_t nbytes):
        """The open loan of this publisher that [address, address + nbytes)
        lies in, or None (then the array is copied like any other). Usually
        the array starts its loan's block: a dict lookup; else a scan."""
        cdef Loan loan
        cdef uint32_t block = (address - <size_t>self.v.arena.data) >> self.v.arena.min_shift
        ref = self.loans.get(block)
        candidates = [ref] if ref is not None else list(self.loans.values())
        for ref in candidates:
            loan = ref()
            if (loan is not None and loan.state == 0 and <size_t>loan.ptr <= address
                    and address + nbytes <= <size_t>loan.ptr + loan.nbytes):
                return loan
        return None

    cdef object _loan_block(self, Py_ssize_t nbytes, object timeout):
        """A block of ``nbytes`` from the arena. A full arena: reliable rings
        wait up to ``timeout`` (reclaiming what subscribers have passed),
        realtime ones raise BackpressureError at once (``send`` counts it as
        a drop instead)."""
        if self.v.arena == NULL:
            raise MessageTooLargeError(
                f"a message of {nbytes} bytes needs the arena, and ring {self.ring.name!r} "
                "was attached without one")
        if self.ring.holder is None:
            raise MessageTooLargeError(
                f"a message of {nbytes} bytes needs the arena, and this client has no arena "
                "holder slot (all 63 of the broker's are in use): it can publish up to "
                f"inline_max ({self.inline_max}) bytes only")
        arena = self.ring.arena
        owner = self.ring.holder.slot
        loan = arena.loan(nbytes, owner)
        if loan is not None:
            return loan
        cdef int64_t timeout_ns = (<int64_t>(self.default_timeout * 1e9) if timeout is None
                                   else timeout_to_ns(timeout))
        cdef int64_t start = tb_now_ns(), nap_ns = 20000
        cdef timespec ts
        while True:
            with nogil:
                reclaim_passed(self.v)
            loan = arena.loan(nbytes, owner)
            if loan is not None:
                return loan
            now = tb_now_ns()
            if self.v.policy != TB_POLICY_BLOCK or (0 <= timeout_ns <= now - start):
                st = arena.stats()
                raise BackpressureError(
                    f"the arena has no free block of {arena.block_bytes(nbytes)} bytes "
                    + (f"within {timeout_ns / 1e9:g} s" if self.v.policy == TB_POLICY_BLOCK
                       else "(realtime topics do not wait)")
                    + f": {st['used']} of {st['size']} bytes are in use by unread messages "
                    "and views subscribers still hold")
            ts.tv_sec = 0
            ts.tv_nsec = nap_ns
            with nogil:
                nanosleep(&ts, NULL)
            if nap_ns < 2000000:
                nap_ns *= 2
            PyErr_CheckSignals()

    def loan(self, shape, dtype="float32", *, timeout=None):
        """A writable numpy array of ``shape`` and ``dtype`` (numpy, a string
        or a torch dtype) living in the arena: fill it, then ``send`` it with
        no copy. Once sent it belongs to the subscribers: do not write it
        again. Dropped unsent, its block returns to the arena. Waits for
        space like ``send`` (``timeout``: default the publisher's)."""
        if self.closed:
            raise RingClosedError("publisher is closed")
        try:
            dt, tag = _LOAN_DTYPES[dtype]
        except (KeyError, TypeError):  # TypeError: an unhashable dtype argument
            dt, tag = _tensors.loan_dtype(dtype)
            try:
                _LOAN_DTYPES[dtype] = (dt, tag)
            except TypeError:
                pass
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if len(shape) > TB_MAX_NDIM:
            raise ValueError(f"at most {TB_MAX_NDIM} dimensions, not {len(shape)}")
        nbytes = dt.itemsize
        for n in shape:
            if n < 0:
                raise ValueError(f"negative dimension in shape {shape}")
            nbytes *= n
        loan = self._loan_block(nbytes, timeout)
        self.loans[loan.block] = weakref.ref(loan)
        arr = _np.ndarray(shape, dtype=dt, buffer=loan)
        if tag == _tensors.BF16_TAG:
            return _tensors.to_torch(arr, tag)  # bfloat16 exists only as a torch tensor
        return arr

    def reserve(self, Py_ssize_t nbytes) -> memoryview:
        """A writable buffer of ``nbytes`` to fill, then :meth:`commit`.

        The buffer is private to this publisher: no ring slot is claimed until
        ``commit``, so an exception while filling it can never stall the ring."""
        if self.closed:
            raise RingClosedError("publisher is closed")
        if nbytes < 0:
            raise ValueError(f"cannot reserve {nbytes} bytes")
        if nbytes > self.v.slot_size:
            raise MessageTooLargeError(f"cannot reserve {nbytes} bytes: the ring's slot size "
                                       f"is {self.v.slot_size} bytes")
        if self.staging is None:
            self.staging = bytearray(self.v.slot_size)
        self.reserved = nbytes
        self.reservation = memoryview(self.staging)[:nbytes]
        return self.reservation

    def commit(self, nbytes=None, *, int flags=0, timeout=None) -> int:
        """Publish the first ``nbytes`` (default: all) of the reserved buffer."""
        if self.reservation is None:
            raise TensorbusError("commit() without reserve(): nothing to publish")
        cdef Py_ssize_t n = self.reserved if nbytes is None else nbytes
        if n < 0 or n > self.reserved:
            raise ValueError(f"commit({nbytes}) outside the {self.reserved} reserved bytes")
        seq = self._send(NULL, 0, <const char *>PyByteArray_AS_STRING(self.staging), n,
                         TB_MSG_INLINE, flags, timeout)
        self.reservation = None
        return seq

    @property
    def published(self) -> int:
        return 0 if self.closed else tb_load_rlx_u64(&self.rec.published)

    @property
    def dropped(self) -> int:
        """Overwrite rings: own messages overtaken while being written."""
        return 0 if self.closed else tb_load_rlx_u64(&self.rec.dropped)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.reservation = None
        tb_store_rel32(&self.rec.state, TB_PUB_FREE)
        self.ring.endpoints -= 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        if not self.closed and self.ring is not None and self.ring.v.h != NULL:
            tb_store_rel32(&self.rec.state, TB_PUB_FREE)
            self.ring.endpoints -= 1


# ---------------------------------------------------------------------------
# Subscriber
# ---------------------------------------------------------------------------

cdef class _SlotView:
    """Exports one slot's payload read-only; peek() wraps it in a memoryview.
    Counting exports tells release() whether any view of the slot survives
    (slices of a memoryview share its export, so releasing it is not enough)."""

    def __getbuffer__(self, Py_buffer *view, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("a peeked slot is read-only")
        PyBuffer_FillInfo(view, self, self.ptr, self.length, 1, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *view):
        self.exports -= 1


cdef class Subscriber:
    """Receives every message published after it joined (block rings), or
    the newest it can keep up with (overwrite rings, counting drops)."""

    def __cinit__(self, Ring ring, cursor=None, generation=None):
        ring._check_open()
        self.ring = ring
        self.v = &ring.v
        self.closed = True
        self.last_seq = -1
        self.last_timestamp_ns = 0
        self.last_flags = 0
        cdef RingView *v = self.v
        cdef uint32_t i, state
        cdef tb_cursor_t *c
        if cursor is None:
            i = ring._join(os.getpid(), 0, 0)
        else:
            # Adopt a cursor a broker joined for this process.
            if not 0 <= cursor < v.max_cursors:
                raise ValueError(f"cursor {cursor} is outside ring {ring.name!r}")
            i = cursor
            c = &v.cursors[i]
            # EVICTED is adopted too: the first read then raises SlowConsumer.
            # A queue group's cursor belongs to the broker and all members.
            state = tb_load_acq32(&c.state)
            if ((state != TB_CURSOR_ACTIVE and state != TB_CURSOR_EVICTED)
                    or c.generation != generation
                    or (c.owner_pid != <uint32_t>os.getpid() and not c.flags & TB_CURSOR_GROUP)):
                raise TensorbusError(f"cursor {cursor} of ring {ring.name!r} is not an active "
                                     f"cursor of generation {generation} owned by this process")
            if c.bell_ref and (ring.bells is None or c.bell_ref > ring.bells.count):
                raise ValueError(f"cursor {cursor} of ring {ring.name!r} names a doorbell; "
                                 "attach the ring with the broker's bell table")
        c = &v.cursors[i]
        self.cur = c
        self.index = i
        self.generation = c.generation
        self.latest = (c.flags & TB_CURSOR_LATEST) != 0
        self.group = (c.flags & TB_CURSOR_GROUP) != 0
        self.claimed = True
        self.pos = tb_load_acq64(&c.position)
        self.stall_since = 0
        if v.policy == TB_POLICY_OVERWRITE:
            self.scratch = bytearray(TB_SLOT_HEADER_BYTES + v.slot_size)
            self.scratch_ptr = PyByteArray_AS_STRING(self.scratch)
        self.closed = False
        ring.endpoints += 1

    # -- polling (nogil-safe, no waiting) ----------------------------------

    cdef int _poll(self, tb_slot_header_t **out) noexcept nogil:
        """Locate the next message. Block rings: ``out`` is the slot itself.
        Overwrite rings: the slot was copied to scratch and validated."""
        cdef RingView *v = self.v
        cdef tb_slot_header_t *s
        cdef int64_t c, c2, seqv, head, jump
        cdef uint32_t n
        if self.latest:
            head = tb_load_acq64(&v.h.head)
            if head - 1 > self.pos:
                self.pos = head - 1  # older values are superseded, not lost
                tb_store_rel64(&self.cur.position, self.pos)
        while True:
            # An evicted cursor no longer holds publishers back, so its next
            # slots may be rewritten under it: stop at once.
            if tb_load_rlx32(&self.cur.state) == TB_CURSOR_EVICTED:
                return ST_EVICTED
            s = slot_at(v, self.pos)
            c = tb_load_acq64(&s.commit)
            if v.policy == TB_POLICY_BLOCK:
                if c == self.pos:
                    if s.type == TB_MSG_PAD:
                        self._advance()
                        continue
                    out[0] = s
                    return ST_OK
            elif c == self.pos:
                n = tb_load_rlx32(&s.length)
                if n > v.slot_size:
                    n = v.slot_size  # torn read: the re-check below rejects it
                memcpy(self.scratch_ptr, <char *>s, TB_SLOT_HEADER_BYTES + n)
                tb_fence_acq()
                c2 = tb_load_rlx64(&s.commit)
                if c2 == c:
                    s = <tb_slot_header_t *>self.scratch_ptr
                    if s.type == TB_MSG_PAD or s.length > v.slot_size:
                        tb_fetch_add_u64(&self.cur.drops, 1)
                        self._advance()
                        continue
                    out[0] = s
                    return ST_OK
                c = c2  # overwritten while we copied
            seqv = c & ~TB_WRITING
            if seqv > self.pos and self.group:
                # A queue-group member that slept while the others claimed
                # on: catch up with the shared position (only the claim CAS
                # ever moves it).
                self.pos = tb_load_acq64(&self.cur.position)
                continue
            if seqv > self.pos:
                # Lapped (overwrite rings; on a block ring only if our cursor
                # was wrongly freed): skip to the middle of the live window,
                # not to the oldest slot, which is the next to be overwritten.
                head = tb_load_acq64(&v.h.head)
                jump = head - v.capacity // 2
                if jump <= self.pos:
                    jump = self.pos + 1
                tb_fetch_add_u64(&self.cur.drops, <uint64_t>(jump - self.pos))
                self.pos = jump
                tb_store_rel64(&self.cur.position, jump)
                continue
            if tb_load_rlx32(&self.cur.state) == TB_CURSOR_EVICTED:
                return ST_EVICTED
            if tb_load_acq32(&v.h.closed):
                if tb_load_acq64(&s.commit) == self.pos:
                    continue
                if tb_load_acq64(&v.h.head) <= self.pos:
                    return ST_CLOSED
            return ST_EMPTY

    cdef bytes _take(self, tb_slot_header_t *s):
        """Copy out the message ``_poll`` found, note its metadata, consume it.
        Returns None if the cursor was evicted meanwhile (the copy may be torn)."""
        if s.type != TB_MSG_INLINE:
            raise TypeError(f"message {self.pos} of ring {self.ring.name!r} is a tensor: "
                            "receive it through a client subscription")
        data = PyBytes_FromStringAndSize(payload_of(s), s.length)
        if tb_load_acq32(&self.cur.state) == TB_CURSOR_EVICTED:
            return None
        self._note(s)
        self._advance()
        return data

    cdef bint _still_there(self, tb_slot_header_t *s) noexcept nogil:
        """After copying out what ``_poll`` found: is the message still in its
        slot? Block rings: always (our cursor pins it); overwrite rings: the
        slot was not claimed by a newer writer meanwhile."""
        if self.v.policy == TB_POLICY_BLOCK:
            return True
        tb_fence_acq()  # the copy's loads before the re-check
        return tb_load_acq64(&slot_at(self.v, self.pos).commit) == self.pos

    cdef void _advance(self) noexcept nogil:
        """Consume the current message: publish the new cursor position and,
        on block rings, wake publishers that sleep waiting for credit. A
        queue-group member claims the message by CAS instead; ``claimed``
        says whether it won (else another member has it)."""
        if self.group:
            self.claimed = tb_cas64(&self.cur.position, self.pos, self.pos + 1)
            self.pos += 1
            if not self.claimed:
                return
        else:
            self.pos += 1
            tb_store_rel64(&self.cur.position, self.pos)
        tb_fetch_add_u64(&self.cur.received, 1)
        self.stall_since = 0
        if self.v.policy == TB_POLICY_BLOCK:
            tb_fence_sc()
            if tb_load_rlx32(&self.v.h.space.sleeping):
                self.ring._wake_publishers()

    cdef tb_slot_header_t *_next(self, object timeout) except NULL:
        """Wait for the next message (or raise) and return its slot header."""
        if self.closed:
            raise RingClosedError("subscriber is closed")
        if self.view is not None:
            raise TensorbusError("release() the peeked message before reading the next one")
        cdef tb_slot_header_t *s = NULL
        cdef int st = self._poll(&s)
        if st == ST_OK:
            return s
        cdef int64_t timeout_ns = timeout_to_ns(timeout)
        cdef int64_t deadline = deadline_of(timeout_ns), now, slice_ns
        cdef WaitCtx ctx
        cdef bint ready
        cdef uint32_t *sleepers = &self.v.h.sleepers
        cdef uint32_t *bell_seq = &self.cur.bell.seq
        cdef uint32_t *bell_sleeping = &self.cur.bell.sleeping
        cdef tb_bell_t *bell
        if self.cur.bell_ref:
            bell = self.ring.bells.bell(self.cur.bell_ref - 1)
            bell_seq = &bell.seq
            bell_sleeping = &bell.sleeping
        ctx.v = self.v
        ctx.cur = self.cur
        ctx.latest = self.latest
        while True:
            if st == ST_OK:
                return s
            if st == ST_CLOSED:
                raise RingClosedError(f"ring {self.ring.name!r} is closed and drained")
            if st == ST_EVICTED:
                self._raise_evicted()
            now = tb_now_ns()
            if deadline >= 0 and now >= deadline:
                raise ReceiveTimeout(f"no message on ring {self.ring.name!r} within "
                                     f"{timeout_ns / 1e9:g} s")
            slice_ns = self.ring.slice_ns
            if deadline >= 0 and deadline - now < slice_ns:
                slice_ns = deadline - now
            ctx.pos = self.pos
            with nogil:
                ready = self.ring.waiter.wait(data_ready, &ctx, bell_seq, bell_sleeping,
                                              &sleepers, 1, slice_ns)
                st = self._poll(&s)
                if st == ST_EMPTY and ready:
                    nap_ms(1)  # closed, but a claimed slot is still unfilled
            if st == ST_EMPTY:
                PyErr_CheckSignals()
                # Off the hot path: only after a whole slice without data.
                if (tb_load_rlx32(&self.cur.state) != TB_CURSOR_ACTIVE
                        or self.cur.generation != self.generation):
                    st = ST_EVICTED  # the entry was reclaimed (and maybe reused)
                    continue
                self._check_stall()

    cdef _raise_evicted(self):
        # SlowConsumer is a RingClosedError: callers that catch the latter still do.
        if (tb_load_acq32(&self.cur.state) == TB_CURSOR_EVICTED
                and self.cur.generation == self.generation):
            raise SlowConsumer(f"this subscriber's cursor on ring {self.ring.name!r} was "
                               "evicted: it stayed too far behind")
        raise RingClosedError(f"this subscriber's cursor on ring {self.ring.name!r} was "
                              "evicted or reclaimed")

    cdef _check_stall(self):
        """A sequence was claimed but is not filled after stall_ns: its
        publisher may be dead. Repair; overwrite rings also skip it."""
        cdef int64_t now = tb_now_ns()
        if tb_load_acq64(&self.v.h.head) <= self.pos:
            self.stall_since = 0
            return
        if self.stall_since == 0:
            self.stall_since = now
            return
        if now - self.stall_since < self.ring.stall_ns:
            return
        self.ring.repair()
        if self.v.policy == TB_POLICY_OVERWRITE:
            tb_fetch_add_u64(&self.cur.drops, 1)
            self._advance()
        self.stall_since = now

    cdef void _note(self, tb_slot_header_t *s) noexcept:
        self.last_seq = self.pos
        self.last_timestamp_ns = s.timestamp_ns
        self.last_flags = s.flags
        record_latency(self.cur, tb_realtime_ns() - s.timestamp_ns)

    def recv(self, timeout=None) -> bytes:
        """Return the next message as bytes, waiting up to ``timeout`` seconds
        (None: no limit). Raises ReceiveTimeout, or RingClosedError once the
        ring is closed and drained. Metadata: ``last_seq``,
        ``last_timestamp_ns``, ``last_flags``."""
        data = self._take(self._next(timeout))
        if data is None:
            self._raise_evicted()
        return data

    def recv_into(self, buffer, timeout=None) -> int:
        """Copy the next message into a writable ``buffer``; return its size.
        A buffer too small raises ValueError and the message stays unread."""
        cdef Py_buffer buf
        PyObject_GetBuffer(buffer, &buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS)
        cdef tb_slot_header_t *s
        cdef uint32_t n
        try:
            s = self._next(timeout)
            if s.type != TB_MSG_INLINE:
                raise TypeError(f"message {self.pos} of ring {self.ring.name!r} is a tensor: "
                                "receive it through a client subscription")
            n = s.length
            if n > buf.len:
                raise ValueError(f"message of {n} bytes does not fit the {buf.len}-byte buffer")
            if n >= NOGIL_COPY_BYTES:
                with nogil:
                    memcpy(buf.buf, payload_of(s), n)
            else:
                memcpy(buf.buf, payload_of(s), n)
            self._note(s)
            self._advance()
            return n
        finally:
            PyBuffer_Release(&buf)

    def peek(self, timeout=None) -> memoryview:
        """Zero-copy: a read-only memoryview of the next message in its slot.
        The slot stays reserved (the publisher cannot reuse it) until
        :meth:`release`. Block rings only: an overwrite ring may overwrite a
        slot at any moment, so it is read by copy with :meth:`recv`."""
        if self.v.policy != TB_POLICY_BLOCK:
            raise TypeError("peek() exists on block rings only; overwrite rings can change "
                            "a slot while it is read, so use recv()")
        cdef tb_slot_header_t *s = self._next(timeout)
        cdef _SlotView exporter = _SlotView.__new__(_SlotView)
        exporter.ptr = payload_of(s)
        exporter.length = s.length
        exporter.memview = memoryview(exporter)
        self._note(s)
        self.view = exporter
        return exporter.memview

    def release(self) -> None:
        """End the current peek: the view is invalidated and the slot freed.
        Raises ViewInUseError (and keeps the slot) while objects made from
        the view, e.g. ``numpy.frombuffer(view)`` or a slice, are alive."""
        if self.view is None:
            raise TensorbusError("release() without peek(): nothing is held")
        self._drop_view()
        self._advance()

    cdef _drop_view(self):
        cdef _SlotView exporter = self.view
        if exporter.memview is not None:
            try:
                exporter.memview.release()
            except BufferError:
                raise ViewInUseError("the peeked view is still used by another object "
                                     "(e.g. a numpy array made from it); drop that object "
                                     "before release()") from None
            exporter.memview = None
        if exporter.exports:
            raise ViewInUseError(f"{exporter.exports} slice(s) or copies of the peeked view "
                                 "are still alive; drop them before release()")
        self.view = None

    def try_recv(self):
        """The next message as bytes, or None if there is none right now."""
        try:
            return self.recv(timeout=0)
        except ReceiveTimeout:
            return None

    @property
    def position(self) -> int:
        return self.pos

    @property
    def lag(self) -> int:
        """Messages published but not yet read by this subscriber."""
        return tb_load_acq64(&self.v.h.head) - self.pos

    @property
    def drops(self) -> int:
        """Messages this subscriber lost to overwriting (overwrite rings)."""
        return 0 if self.closed else tb_load_rlx_u64(&self.cur.drops)

    def close(self) -> None:
        """Leave the ring: the cursor stops holding back publishers (a queue
        group's cursor stays: the broker frees it with its last member)."""
        if self.closed:
            return
        if self.view is not None:
            self._drop_view()
        self.closed = True
        if not self.group:
            self._free_cursor()
        tb_fence_sc()
        self.ring._wake_publishers()
        self.ring.endpoints -= 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        if not self.closed and self.ring is not None and self.ring.v.h != NULL:
            if not self.group:
                self._free_cursor()
            self.ring.endpoints -= 1

    cdef void _free_cursor(self) noexcept nogil:
        """Free our entry, unless it was reclaimed and now belongs to another."""
        cdef uint32_t state = tb_load_acq32(&self.cur.state)
        if state != TB_CURSOR_FREE and self.cur.generation == self.generation:
            tb_cas32(&self.cur.state, state, TB_CURSOR_FREE)
