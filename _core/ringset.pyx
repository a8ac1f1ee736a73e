"""RingSet: the receiving end of one subscription, every ring its pattern
matches. (Not to be confused with request/reply's ``_inbox/`` reply topics.)

Each member ring has a cursor of this subscription, and every one of those
cursors names the same doorbell in the broker's bell table, so a waiter
sleeps once for all of them: publishers of any member ring ring it. Messages
of one ring arrive in order; members are read round-robin, so no busy topic
starves a quiet one (there is no order across topics).

The bell also carries a *notice* flag the broker raises when it has news for
the subscription (a new matching topic to attach, an eviction, a shutdown):
``recv`` then returns None so the client can read its control socket.
"""

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc

from tensorbus._core.atomic cimport (
    tb_fence_sc,
    tb_fetch_add32,
    tb_fetch_sub32,
    tb_fetch_add_u64,
    tb_load_acq32,
    tb_load_acq64,
    tb_now_ns,
)
from cpython.bytes cimport PyBytes_FromStringAndSize

cdef extern from "<string.h>" nogil:
    size_t strnlen(const char *s, size_t maxlen)

from tensorbus._core.arena cimport Hold, Holder
from tensorbus._core.message cimport Message
from tensorbus._core.bells cimport BellTable
from tensorbus._core.layout cimport (
    TB_CURSOR_EVICTED,
    TB_DESC_BYTES,
    TB_DTYPE_BYTES,
    TB_MAX_NDIM,
    TB_META_BYTES,
    TB_MSG_ARENA,
    TB_MSG_INLINE,
    TB_MSG_TENSOR,
    TB_SLOT_GAP,
    TB_SLOT_HEADER_BYTES,
    tb_slot_header_t,
    tb_tensor_desc_t,
)
from tensorbus._core.ring cimport (
    TB_ST_CLOSED,
    TB_ST_EVICTED,
    TB_ST_OK,
    tb_cursor_ready,
    tb_reclaim_passed,
    tb_ring_advance,
    tb_ring_poll,
    tb_ring_still_there,
)
from tensorbus._core.subscriber cimport Subscriber
from tensorbus._core.wait cimport Waiter, timeout_to_ns


from tensorbus._core.errors import (
    GapError,
    HoldLimitError,
    ReceiveTimeout,
    SlowConsumer,
    TensorbusError,
)

__all__ = ["RingSet", "spin_any"]

_TAGS = {}  # dtype tag bytes -> str, so a steady stream decodes nothing

cdef bint ringset_ready(void *p) noexcept nogil:
    cdef RingSetWait *w = <RingSetWait *>p
    cdef int k
    if tb_load_acq32(&w.bell.notice):
        return True
    for k in range(w.n):
        if tb_cursor_ready(w.members[k].v, w.members[k].cur, w.members[k].pos[0],
                        w.members[k].latest):
            return True
    return False


cdef struct AnyWait:
    RingSetWait *sets
    int n


cdef bint any_ready(void *p) noexcept nogil:
    cdef AnyWait *w = <AnyWait *>p
    cdef int k
    for k in range(w.n):
        if ringset_ready(&w.sets[k]):
            return True
    return False


def spin_any(list ring_sets, Waiter waiter, double spin_us) -> int:
    """Spin up to ``spin_us`` until any of ``ring_sets`` has a message (or a
    notice), without the GIL, under the host's spinner table (a bridge
    before it sleeps). 1: one has; 0: the time passed; -1: no spare core."""
    cdef RingSetWait sets[4]
    cdef AnyWait w
    cdef RingSet rs
    cdef int k, got
    cdef int64_t ns = <int64_t>(spin_us * 1000)
    if len(ring_sets) > 4:
        raise ValueError("spin_any watches at most 4 ring sets")
    w.sets = sets
    w.n = len(ring_sets)
    for k in range(w.n):
        rs = <RingSet>ring_sets[k]
        rs._wait_on(&sets[k])
    with nogil:
        got = waiter.spin(any_ready, &w, ns)
    return got


# no_gc_clear: see _core/ring.pyx (a cycle must not unmap the ring before this is freed).
@cython.no_gc_clear
cdef class RingSet:
    """Subscribers of several rings sharing doorbell ``bell_index``."""

    def __cinit__(self, BellTable bells, uint32_t bell_index, Waiter waiter=None, spin_us=None,
                  bint raise_gaps=True):
        if bell_index >= bells.count:
            raise ValueError(f"bell {bell_index} is outside the table of {bells.count}")
        self.bells = bells
        self.bell_index = bell_index
        self.bell = bells.bell(bell_index)
        self.subs = []
        self.topics = []
        self.live = []
        self.graveyard = []
        self.members = NULL
        self.sleepers = NULL
        self.n = 0
        self.next = 0
        self.armed = 0
        self.waiter = waiter if waiter is not None else Waiter(spin_us)
        self.slice_ns = 50000000  # 50 ms: bounds how late signals and stall repairs are seen
        # False: gap markers come back as messages (a bridge forwards them
        # to light clients) instead of raising GapError.
        self.raise_gaps = raise_gaps
        self.claim_only = -1

    def __dealloc__(self):
        free(self.members)
        free(self.sleepers)
        if self.graveyard:
            self._bury()

    def add(self, str topic, Subscriber sub) -> None:
        """Add ``sub`` (a cursor naming this ring set's bell) under ``topic``."""
        if sub.r.cur.bell_ref != self.bell_index + 1:
            raise ValueError(f"the cursor of {topic!r} does not name bell {self.bell_index}")
        if self.armed:
            raise TensorbusError("cannot add a ring while the ring set is armed")
        self.subs.append(sub)
        self.topics.append(topic)
        self._rebuild()

    def remove(self, str topic) -> Subscriber:
        """Take ``topic``'s subscriber out (the caller closes it)."""
        if self.armed:
            raise TensorbusError("cannot remove a ring while the ring set is armed")
        k = self.topics.index(topic)
        self.topics.pop(k)
        sub = self.subs.pop(k)
        self._rebuild()
        return sub

    @property
    def topic_names(self) -> list:
        return list(self.topics)

    cdef _rebuild(self):
        cdef int n = len(self.subs), k
        cdef Subscriber sub
        cdef Member *members = <Member *>malloc(max(n, 1) * sizeof(Member))
        cdef uint32_t **sleepers = <uint32_t **>malloc(max(n, 1) * sizeof(uint32_t *))
        if members == NULL or sleepers == NULL:
            free(members)
            free(sleepers)
            raise MemoryError()
        for k in range(n):
            sub = self.subs[k]
            members[k].v = sub.v
            members[k].cur = sub.r.cur
            members[k].pos = &sub.r.pos
            members[k].latest = sub.r.latest
            sleepers[k] = &sub.v.h.sleepers
        if self.waiting:
            # Another thread sleeps on the old arrays (a notice attached a
            # topic meanwhile): keep them, and the subscribers they point
            # into, until it wakes.
            self.graveyard.append((<size_t>self.members, <size_t>self.sleepers, self.live))
        else:
            free(self.members)
            free(self.sleepers)
        self.members = members
        self.sleepers = sleepers
        self.live = list(self.subs)
        self.n = n
        self.next = 0

    cdef void _wait_on(self, RingSetWait *w) noexcept:
        """What a nogil waiter reads: the members' arrays and the bell."""
        w.members = self.members
        w.n = self.n
        w.bell = self.bell

    cdef void _bury(self) noexcept:
        """Free the arrays a waiter no longer uses."""
        for members, sleepers, _ in self.graveyard:
            free(<void *><size_t>members)
            free(<void *><size_t>sleepers)
        self.graveyard = []

    cdef Message _poll_one(self):
        """The next message of any member, or None. Drops members whose
        ring closed and drained; raises SlowConsumer for an evicted one."""
        cdef int k, i, st
        cdef Subscriber sub
        cdef tb_slot_header_t *s = NULL
        cdef Message m
        k = 0
        while k < self.n:
            i = (self.next + k) % self.n
            sub = <Subscriber>self.subs[i]
            if sub.r.group:
                sub.r.pos = tb_load_acq64(&sub.r.cur.position)  # shared with the other members
                if self.claim_only >= 0 and sub.r.pos != self.claim_only:
                    k += 1  # taken by another member meanwhile: not ours to claim
                    continue
            st = tb_ring_poll(sub.v, &sub.r, &s)
            if st == TB_ST_OK:
                if s.type != TB_MSG_INLINE:
                    m = self._take_tensor(sub, s, i)
                    if m is not None and sub.r.claimed:
                        self.next = i + 1
                        return m
                    continue  # skipped, or another member claimed it: look again
                payload = sub._take(s)
                if payload is not None and not sub.r.claimed:
                    continue  # another member of the queue group took it
                if payload is not None:
                    self.next = i + 1
                    if sub.last_flags & TB_SLOT_GAP and self.raise_gaps:  # a gap marker, consumed
                        raise GapError.from_marker(payload, <str>self.topics[i])
                    m = Message.__new__(Message)
                    m.payload = payload
                    m.size = len(payload)
                    m.topic = <str>self.topics[i]
                    m.seq = sub.last_seq
                    m.timestamp_ns = sub.last_timestamp_ns
                    m.flags = sub.last_flags
                    m.publisher = sub.last_publisher
                    return m
                st = TB_ST_EVICTED  # evicted while we copied: the copy may be torn
            if st == TB_ST_EVICTED:
                raise self._evicted(i)
            if st == TB_ST_CLOSED:
                self.closed_members += 1
                name = self.topics.pop(i)
                self.subs.pop(i)
                self._rebuild()
                sub.close()
                if sub.ring.close_reason == "restarted":
                    raise sub.ring.closed_error(f"topic {name!r} is closed")
                k = 0
                continue
            k += 1
        return None

    cdef Message _take_tensor(self, Subscriber sub, tb_slot_header_t *s, int i):
        """Take the tensor message ``s`` (a TENSOR copy or an ARENA hold) and
        consume it. None if its arena block is already gone (an overwrite
        ring lapped us): counted as a drop and skipped."""
        cdef tb_tensor_desc_t *d = <tb_tensor_desc_t *>((<char *>s) + TB_SLOT_HEADER_BYTES)
        cdef Holder holder
        cdef Hold hold = None
        cdef bytes payload = None
        cdef Message m
        cdef uint32_t ndim = d.ndim
        cdef uint64_t nbytes = d.nbytes
        cdef int k
        if s.length < TB_DESC_BYTES or ndim > TB_MAX_NDIM:
            return self._skip(sub)  # a malformed tensor descriptor
        tag_raw = PyBytes_FromStringAndSize(d.dtype, strnlen(d.dtype, TB_DTYPE_BYTES))
        tag = _TAGS.get(tag_raw)
        if tag is None:
            tag = _TAGS[tag_raw] = tag_raw.decode("ascii", "replace")
        shape = tuple([d.shape[k] for k in range(ndim)])
        meta = PyBytes_FromStringAndSize(<char *>d.meta, TB_META_BYTES)
        if s.type == TB_MSG_TENSOR:
            if nbytes > s.length - TB_DESC_BYTES:
                return self._skip(sub)  # a tensor longer than its slot
            payload = PyBytes_FromStringAndSize((<char *>d) + TB_DESC_BYTES, nbytes)
        elif s.type == TB_MSG_ARENA:
            holder = sub.ring.holder
            if holder is None:
                # No holder slot (the broker's 63 are taken): copy the tensor
                # out while the ring still references its block.
                if sub.ring.arena is None or d.offset + nbytes > sub.ring.arena.size:
                    return self._skip(sub)  # an arena descriptor outside the arena
                payload = sub.ring.arena.copy_out(d.offset, nbytes)
                if not tb_ring_still_there(sub.v, &sub.r):
                    return self._skip(sub)  # overwritten while we copied
            else:
                if d.offset + nbytes > holder.arena.a.data_size:
                    return self._skip(sub)  # an arena descriptor outside the arena
                if not holder.acquire(d.block, d.generation):
                    return self._skip(sub)  # overwritten and freed before we got it
                hold = Hold._make(holder, d.block, d.offset, nbytes)
        else:
            return self._skip(sub)  # an unknown message type
        if tb_load_acq32(&sub.r.cur.state) == TB_CURSOR_EVICTED:
            raise self._evicted(i)  # evicted while we copied: the copy may be torn
        sub._note(s)
        tb_ring_advance(sub.v, &sub.r)
        if hold is not None:
            tb_reclaim_passed(sub.v)
        m = Message.__new__(Message)
        m.payload = payload
        m.hold = hold
        m.dtype = tag
        m.shape = shape
        m.meta_bytes = meta
        m.size = nbytes
        m.topic = <str>self.topics[i]
        m.seq = sub.last_seq
        m.timestamp_ns = sub.last_timestamp_ns
        m.flags = sub.last_flags
        m.publisher = sub.last_publisher
        return m

    cdef _evicted(self, int i):
        return SlowConsumer(f"this subscription was evicted from topic "
                            f"{self.topics[i]!r}: it stayed too far behind")

    cdef _skip(self, Subscriber sub):
        """Consume a message that cannot be delivered, counting it as a drop
        (a queue-group member only if it won the message)."""
        tb_ring_advance(sub.v, &sub.r)
        if sub.r.claimed:
            tb_fetch_add_u64(&sub.r.cur.drops, 1)
        return None

    def poll(self):
        """The next message, or None if there is none right now."""
        return self._next()

    def group_head(self, bint with_meta=False):
        """A queue group's oldest unclaimed message, looked at, not taken:
        ``(position, slot flags, publisher record index)`` of the first
        member's group cursor, or None if there is none (or the first
        member is no group's). ``with_meta`` adds a fourth item: a tensor's
        32 bytes of metadata (a request's id and inbox), or None."""
        cdef Subscriber sub
        cdef tb_slot_header_t *s = NULL
        cdef tb_tensor_desc_t *d
        if self.n == 0:
            return None
        sub = <Subscriber>self.subs[0]
        if not sub.r.group:
            return None
        sub.r.pos = tb_load_acq64(&sub.r.cur.position)
        if tb_ring_poll(sub.v, &sub.r, &s) != TB_ST_OK:
            return None
        if not with_meta:
            return sub.r.pos, s.flags, s.publisher
        meta = None
        if s.type != TB_MSG_INLINE and s.length >= TB_DESC_BYTES:
            d = <tb_tensor_desc_t *>((<char *>s) + TB_SLOT_HEADER_BYTES)
            meta = PyBytes_FromStringAndSize(<char *>d.meta, TB_META_BYTES)
        return sub.r.pos, s.flags, s.publisher, meta

    def claim_at(self, int64_t position):
        """Claim a queue group's message at ``position`` and nothing after
        it: the message, or None if another member took it first."""
        self.claim_only = position
        try:
            return self._next()
        finally:
            self.claim_only = -1

    cdef Message _next(self):
        """_poll_one, after a gap a batch left to raise."""
        if self.pending_gap is not None:
            exc, self.pending_gap = self.pending_gap, None
            raise exc
        return self._poll_one()

    def notice(self) -> bool:
        """True (and cleared) if the broker flagged news for this subscription."""
        return self.bells.take_notice(self.bell_index)

    def recv(self, timeout=None):
        """Wait up to ``timeout`` seconds (None: no limit) for a message.
        Returns None when the broker raised the notice flag (read the
        control socket, then call again) or a member's ring closed.
        Raises ReceiveTimeout."""
        cdef int closed_before = self.closed_members
        cdef Message m = self._next()
        if m is not None:
            return m
        cdef int64_t timeout_ns = timeout_to_ns(timeout)
        cdef int64_t deadline = -1 if timeout_ns < 0 else tb_now_ns() + timeout_ns
        cdef int64_t now, slice_ns
        cdef RingSetWait w
        cdef bint ready
        while True:
            if (tb_load_acq32(&self.bell.notice) or self.closed_members != closed_before
                    or self.is_closed):
                return None
            now = tb_now_ns()
            if deadline >= 0 and now >= deadline:
                raise ReceiveTimeout(f"no message within {timeout:g} s")
            slice_ns = self.slice_ns
            if deadline >= 0 and deadline - now < slice_ns:
                slice_ns = deadline - now
            self._wait_on(&w)
            self.waiting += 1
            with nogil:
                ready = self.waiter.wait(ringset_ready, &w, &self.bell.seq, &self.bell.sleeping,
                                         self.sleepers, self.n, slice_ns)
            self.waiting -= 1
            if self.graveyard and not self.waiting:
                self._bury()
            if self.close_pending:
                self._finish_close()  # another thread closed us while we slept
                return None
            m = self._poll_one()
            if m is not None:
                return m
            if not ready:
                PyErr_CheckSignals()
                self.check_stalls()  # a dead publisher's claim: repair

    def take(self, int max_n, bint keep_gap=False) -> list:
        """Up to ``max_n`` messages that have already arrived, without
        waiting. An eviction (or a gap marker) found after some messages
        were taken ends the batch instead of raising, so none of them is
        lost: the next call raises SlowConsumer (GapError). ``keep_gap``: a
        gap marker met first is kept for the next call too (the caller
        already holds a message from before it)."""
        cdef list out = []
        cdef Message m
        while len(out) < max_n:
            try:
                m = self._next()
            except GapError as exc:
                if out or keep_gap:  # the marker is consumed: the next call raises it
                    self.pending_gap = exc
                    break
                raise
            except (SlowConsumer, HoldLimitError):
                if out:
                    break  # keep what was taken; the next call raises
                raise
            if m is None:
                break
            out.append(m)
        return out

    # -- asyncio: sleep on a FIFO bell through the event loop ---------------

    def arm(self) -> bool:
        """Announce a sleep (the caller then waits for the FIFO to become
        readable). False, and nothing announced, if there is already
        something to read or a notice: poll again instead."""
        cdef RingSetWait w
        cdef int k
        if self.armed:
            return True
        tb_fetch_add32(&self.bell.sleeping, 1)
        for k in range(self.n):
            tb_fetch_add32(self.sleepers[k], 1)
        self.armed = self.n + 1
        tb_fence_sc()
        self._wait_on(&w)
        if ringset_ready(&w):
            self.disarm()
            return False
        return True

    def disarm(self) -> None:
        """End a sleep announced by ``arm``."""
        cdef int k
        if not self.armed:
            return
        for k in range(self.armed - 1):
            tb_fetch_sub32(self.sleepers[k], 1)
        tb_fetch_sub32(&self.bell.sleeping, 1)
        self.armed = 0

    def check_stalls(self) -> None:
        """Repair rings whose awaited slot stayed claimed but unfilled."""
        for sub in self.subs:
            (<Subscriber>sub)._check_stall()

    def close(self) -> None:
        """Close every member subscriber (their cursors are freed). Called
        from another thread while one waits in ``recv``, the waiting thread
        finishes the close (the members it sleeps on stay valid until then)."""
        if self.waiting:
            self.close_pending = True
            with nogil:
                self.bells.ring(self.bell_index)  # end its sleep now
            return
        self._finish_close()

    def _finish_close(self) -> None:
        self.close_pending = False
        self.is_closed = True
        self.disarm()
        subs = self.subs
        self.subs = []
        self.topics = []
        self._rebuild()
        for sub in subs:
            sub.close()
