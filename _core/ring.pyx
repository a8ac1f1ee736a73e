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
wedge a ring. See docs/ring.md for the whole protocol; tb_ring.h has its C,
which this module, publisher.pyx and subscriber.pyx wrap.
"""

import os

cimport cython
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memset

from tensorbus._core.atomic cimport (
    tb_cas32,
    tb_fence_acq,
    tb_fence_rel,
    tb_fence_sc,
    tb_fetch_add32,
    tb_futex_wake_all,
    tb_load_acq32,
    tb_load_acq64,
    tb_load_rlx32,
    tb_load_rlx64,
    tb_now_ns,
    tb_pid_alive,
    tb_realtime_ns,
    tb_store_rel32,
)
from tensorbus._core.layout cimport (
    TB_CLOSED,
    TB_CLOSED_RESTARTED,
    TB_CURSOR_ACTIVE,
    TB_CURSOR_BYTES,
    TB_CURSOR_EVICTED,
    TB_CURSOR_FREE,
    TB_CURSOR_GROUP,
    TB_CURSOR_LATEST,
    TB_HEADER_BYTES,
    TB_POLICY_BLOCK,
    TB_POLICY_OVERWRITE,
    TB_PUB_CLAIMED,
    TB_PUB_CLAIMING,
    TB_PUB_FREE,
    TB_PUBLISHER_BYTES,
    TB_RING_KEEP_LAST,
    TB_RING_MAGIC,
    TB_RING_VERSION,
    TB_SLOT_HEADER_BYTES,
    TB_SLOTS_ALIGN,
    tb_cursor_t,
    tb_publisher_t,
    tb_ring_header_t,
    tb_slot_header_t,
)
from tensorbus._core.arena cimport Arena, Holder
from tensorbus._core.bells cimport BellTable
from tensorbus._core.segment cimport Segment
from tensorbus._core.wait cimport Waiter

from tensorbus._core.errors import (
    BrokerRestarted,
    CapacityError,
    LayoutMismatchError,
    RingClosedError,
    SegmentError,
    TensorbusError,
)
from tensorbus._core.segment import segment_name

__all__ = ["Ring", "POLICIES", "MAX_CAPACITY", "MAX_SLOT_SIZE"]

POLICIES = {"block": TB_POLICY_BLOCK, "overwrite": TB_POLICY_OVERWRITE}
_POLICY_NAMES = {v: k for k, v in POLICIES.items()}

# The geometry a ring may have (tb_ring.h), for the broker's option checks.
MAX_CAPACITY = TB_MAX_CAPACITY
MAX_SLOT_SIZE = TB_MAX_SLOT_SIZE



# ---------------------------------------------------------------------------
# Ring
# ---------------------------------------------------------------------------

# Objects whose __dealloc__ touches another object (a ring's mapping, an
# arena's holds) keep their references until then: if the cyclic GC
# cleared them first, a subscriber's cursor would be freed in memory
# already unmapped (a segfault in any reference cycle holding a ring).
@cython.no_gc_clear
cdef class Ring:
    """A mapped ring segment. Create one with :meth:`create`, open an
    existing one with :meth:`attach`; make endpoints with :meth:`publisher`
    and :meth:`subscriber`.

    A ring and its endpoints are not thread-safe: use one endpoint per
    thread, as with sockets."""

    def __cinit__(self):
        self.endpoints = 0
        memset(&self.v, 0, sizeof(tb_ring_t))

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
        if capacity < 2 or capacity > TB_MAX_CAPACITY or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two between 2 and {MAX_CAPACITY}, "
                             f"got {capacity}")
        if slot_size < 1 or slot_size > TB_MAX_SLOT_SIZE:
            raise ValueError(f"slot_size must be between 1 and {MAX_SLOT_SIZE} bytes, "
                             f"got {slot_size}")
        if not 1 <= max_cursors <= TB_MAX_ENTRIES or not 1 <= max_publishers <= TB_MAX_ENTRIES:
            raise ValueError(f"max_cursors and max_publishers must be between 1 and "
                             f"{TB_MAX_ENTRIES}")
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
               Holder holder=None, bint populate=True) -> Ring:
        """Map an existing ring, checking its magic, version and geometry.
        ``populate=False``: fault its pages in lazily (a daemon taking over)."""
        cdef Segment seg = Segment.attach(name, populate=populate)
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

    def publisher(self, *, double timeout=5.0):
        """A new publisher. ``timeout``: default seconds a ``send`` on a full
        block ring waits for credit before raising BackpressureError."""
        from tensorbus._core.publisher import Publisher  # it cimports this module

        return Publisher(self, timeout)

    def subscriber(self):
        """A new subscriber; it receives everything published from now on."""
        from tensorbus._core.subscriber import Subscriber  # it cimports this module

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
            tb_ring_wake_publishers(&self.v)
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
            tb_ring_wake_publishers(&self.v)
            self._wake_subscribers()
        return True

    cdef uint32_t _join(self, uint32_t owner_pid, uint32_t bell_ref,
                        uint32_t flags) except? 0xFFFFFFFF:
        cdef uint32_t i = tb_ring_join(&self.v, owner_pid, bell_ref, flags)
        if i == 0xFFFFFFFF:
            raise CapacityError(f"ring {self.name!r} already has {self.v.max_cursors} "
                                "subscribers (max_cursors)")
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

    @property
    def close_reason(self) -> str | None:
        """None while open; "closed" (the broker closed it) or "restarted"
        (a restarted broker could not take it over: see :meth:`condemn`)."""
        if self.v.h == NULL:
            return "closed"
        cdef uint32_t why = tb_load_acq32(&self.v.h.closed)
        return None if why == 0 else "restarted" if why == TB_CLOSED_RESTARTED else "closed"

    def close(self, *, bint restarted=False) -> None:
        """Close the ring for everyone: publishers get RingClosedError at
        once, subscribers once they have read what was committed.
        ``restarted``: they get BrokerRestarted instead (the broker that
        owned the ring died and its successor could not take it over)."""
        self._check_open()
        tb_store_rel32(&self.v.h.closed, TB_CLOSED_RESTARTED if restarted else TB_CLOSED)
        tb_fence_sc()
        with nogil:
            self._wake_subscribers()
            tb_ring_wake_publishers(&self.v)

    def closed_error(self, str what):
        """The exception for ``what`` ("ring 'x' is closed") on this closed
        ring: BrokerRestarted where a restarted broker condemned it."""
        if self.v.h != NULL and tb_load_acq32(&self.v.h.closed) == TB_CLOSED_RESTARTED:
            return BrokerRestarted(
                f"{what}: the broker died and its successor could not take this ring "
                "over, so it was closed; reconnect to go on")
        return RingClosedError(what)

    @staticmethod
    def condemn(str name, BellTable bells=None) -> bool:
        """Close ring segment ``name`` as "restarted" before it is swept,
        whatever its layout version: the magic, the version and the closed
        word keep their offsets in every release (tb_layout.h), so even a
        ring this build cannot read tells its users to stop rather than
        write into a segment nobody will read. False if ``name`` is no ring."""
        cdef Segment seg
        try:
            seg = Segment.attach(name, populate=False)
        except SegmentError:
            return False
        cdef tb_ring_header_t *h = <tb_ring_header_t *>seg.base
        if seg.size < TB_HEADER_BYTES or load_magic(h) != TB_RING_MAGIC:
            seg.close()
            return False
        try:
            _check_header(name, h, seg.size)  # another version included
        except LayoutMismatchError:
            tb_store_rel32(&h.closed, TB_CLOSED_RESTARTED)  # sleepers see it at their next slice
            seg.close()
            return True
        ring = Ring._open(seg, 0, bells, None, None, None)
        ring.close(restarted=True)
        ring.detach()
        return True

    def own(self) -> None:
        """Make unlinking this attached ring this process's job (a daemon
        that took over its predecessor's rings)."""
        self.segment.own()

    def unlink(self) -> None:
        """Remove the segment's name (creator only); mappings stay valid."""
        self.segment.unlink()

    def detach(self) -> None:
        """Unmap the ring from this process. Its endpoints must be closed."""
        if self.endpoints:
            raise TensorbusError(f"ring {self.name!r} still has {self.endpoints} open "
                                 "endpoint(s); close them before detach()")
        memset(&self.v, 0, sizeof(tb_ring_t))
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
        for i in range(tb_cursor_bound(&self.v)):
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

    # -- crash recovery ----------------------------------------------------

    def repair(self) -> dict:
        """Undo what dead processes left behind: free the cursors of dead
        subscribers (so publishers get their credit back) and pad the
        claimed-but-uncommitted slot of a dead publisher (so subscribers can
        move past it). Safe to call from any process at any time; the broker
        calls it when it sees a client die, waiters call it when stalled."""
        self._check_open()
        cdef tb_ring_t *v = &self.v
        cdef uint32_t i, st
        cdef tb_cursor_t *c
        cdef tb_publisher_t *r
        freed_cursors = padded = freed_records = 0
        for i in range(tb_cursor_bound(v)):
            c = &v.cursors[i]
            st = tb_load_acq32(&c.state)
            if c.flags & TB_CURSOR_GROUP:
                continue  # a queue group's cursor is the broker's state, not a process's
            if st != TB_CURSOR_FREE and not tb_pid_alive(tb_load_rlx32(&c.owner_pid)):
                if tb_cas32(&c.state, st, TB_CURSOR_FREE):
                    freed_cursors += 1
        for i in range(tb_record_bound(v)):
            r = &v.records[i]
            st = tb_load_acq32(&r.state)
            if st == TB_PUB_FREE or tb_pid_alive(tb_load_rlx32(&r.owner_pid)):
                continue
            if st == TB_PUB_CLAIMING or st == TB_PUB_CLAIMED:
                outcome = tb_ring_pad_claim(v, tb_load_rlx64(&r.seq))
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
                tb_ring_wake_publishers(&self.v)
        return {"cursors_freed": freed_cursors, "claims_padded": padded,
                "records_freed": freed_records}

    def reclaim(self) -> int:
        """Drop the arena references of every message all subscribers have
        read (the broker calls it when it frees cursors). Returns the number
        of references dropped."""
        self._check_open()
        if self.v.arena == NULL:
            return 0
        cdef int64_t upto
        return tb_reclaim_window(&self.v, 0, &upto)  # the whole window, whatever the hint says

    def arena_refs(self) -> set:
        """``(block, generation)`` of every arena block a message in this ring
        still references (the broker checks a dead publisher's loans)."""
        self._check_open()
        from tensorbus._core.ring_stats import arena_refs  # introspection lives there
        return arena_refs(self)

    # -- introspection (_core/ring_stats.pyx) -------------------------------

    def stats(self) -> dict:
        """A snapshot of the ring: head, every live cursor and publisher."""
        self._check_open()
        from tensorbus._core.ring_stats import ring_stats
        return ring_stats(self)

    def totals(self) -> tuple:
        """Every entry's counters, free entries included (``ring_stats.totals``)."""
        self._check_open()
        from tensorbus._core.ring_stats import totals
        return totals(self)

    def cursor_lags(self) -> list:
        """``(index, generation, lag, drops)`` of each active cursor: the
        broker's cheap per-tick view for pressure and slow-consumer checks."""
        self._check_open()
        from tensorbus._core.ring_stats import cursor_lags
        return cursor_lags(self)

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
    elif h.capacity < 2 or h.capacity > TB_MAX_CAPACITY or h.capacity & (h.capacity - 1):
        problem = f"capacity {h.capacity} is not a power of two in range"
    elif h.slot_size < 1 or h.slot_size > TB_MAX_SLOT_SIZE:
        problem = f"slot size {h.slot_size} is out of range"
    elif not (1 <= h.max_cursors <= TB_MAX_ENTRIES and 1 <= h.max_publishers <= TB_MAX_ENTRIES):
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


