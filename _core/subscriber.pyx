"""A ring's reading end: one cursor entry, read through tb_ring.h.

Block rings are read in place (``peek``, zero-copy until ``release``) or by
copy (``recv``, ``recv_into``); overwrite rings by copy under the slot's
seqlock, counting the messages lost to a lap in the cursor's ``drops``.
Waiting spins, yields, then sleeps on the cursor's doorbell (wait.pyx).
See docs/ring.md, "Subscribing" and "Waiting".
"""

import os

cimport cython
from cpython.buffer cimport (
    PyBUF_C_CONTIGUOUS,
    PyBUF_WRITABLE,
    PyBuffer_FillInfo,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport int64_t, uint32_t
from libc.string cimport memcpy

from tensorbus._core.atomic cimport (
    tb_cas32,
    tb_fence_sc,
    tb_fetch_add_u64,
    tb_load_acq32,
    tb_load_acq64,
    tb_load_rlx32,
    tb_load_rlx_u64,
    tb_now_ns,
    tb_realtime_ns,
)
from tensorbus._core.layout cimport (
    TB_CURSOR_ACTIVE,
    TB_CURSOR_EVICTED,
    TB_CURSOR_FREE,
    TB_CURSOR_GROUP,
    TB_CURSOR_LATEST,
    TB_MSG_INLINE,
    TB_POLICY_BLOCK,
    TB_POLICY_OVERWRITE,
    TB_SLOT_HEADER_BYTES,
    tb_bell_t,
    tb_cursor_t,
    tb_slot_header_t,
)
from tensorbus._core.wait cimport timeout_to_ns
from tensorbus._core.ring cimport (
    NOGIL_COPY_BYTES,
    TB_ST_CLOSED,
    TB_ST_EMPTY,
    TB_ST_EVICTED,
    TB_ST_OK,
    Ring,
    nap_ms,
    tb_payload_of,
    tb_record_latency,
    tb_ring_advance,
    tb_ring_data_ready,
    tb_ring_poll,
    tb_ring_t,
    tb_ring_wait_t,
    tb_ring_wake_publishers,
)

from tensorbus._core.errors import (
    ReceiveTimeout,
    RingClosedError,
    SlowConsumer,
    TensorbusError,
    ViewInUseError,
)

__all__ = ["Subscriber"]



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


# no_gc_clear: see _core/ring.pyx (a cycle must not unmap the ring before this is freed).
@cython.no_gc_clear
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
        cdef tb_ring_t *v = self.v
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
        self.r.cur = c
        self.index = i
        self.generation = c.generation
        self.r.latest = (c.flags & TB_CURSOR_LATEST) != 0
        self.r.group = (c.flags & TB_CURSOR_GROUP) != 0
        self.r.claimed = True
        self.r.pos = tb_load_acq64(&c.position)
        self.r.stall_since = 0
        if v.policy == TB_POLICY_OVERWRITE:
            self.scratch = bytearray(TB_SLOT_HEADER_BYTES + v.slot_size)
            self.r.scratch = PyByteArray_AS_STRING(self.scratch)
        self.closed = False
        ring.endpoints += 1

    cdef bytes _take(self, tb_slot_header_t *s):
        """Copy out the message ``_poll`` found, note its metadata, consume it.
        Returns None if the cursor was evicted meanwhile (the copy may be torn)."""
        if s.type != TB_MSG_INLINE:
            raise TypeError(f"message {self.r.pos} of ring {self.ring.name!r} is a tensor: "
                            "receive it through a client subscription")
        data = PyBytes_FromStringAndSize(tb_payload_of(s), s.length)
        if tb_load_acq32(&self.r.cur.state) == TB_CURSOR_EVICTED:
            return None
        self._note(s)
        tb_ring_advance(self.v, &self.r)
        return data

    cdef tb_slot_header_t *_next(self, object timeout) except NULL:
        """Wait for the next message (or raise) and return its slot header."""
        if self.closed:
            raise RingClosedError("subscriber is closed")
        if self.view is not None:
            raise TensorbusError("release() the peeked message before reading the next one")
        cdef tb_slot_header_t *s = NULL
        cdef int st = tb_ring_poll(self.v, &self.r, &s)
        if st == TB_ST_OK:
            return s
        cdef int64_t timeout_ns = timeout_to_ns(timeout)
        cdef int64_t deadline = -1 if timeout_ns < 0 else tb_now_ns() + timeout_ns
        cdef int64_t now, slice_ns
        cdef tb_ring_wait_t ctx
        cdef bint ready
        cdef uint32_t *sleepers = &self.v.h.sleepers
        cdef uint32_t *bell_seq = &self.r.cur.bell.seq
        cdef uint32_t *bell_sleeping = &self.r.cur.bell.sleeping
        cdef tb_bell_t *bell
        if self.r.cur.bell_ref:
            bell = self.ring.bells.bell(self.r.cur.bell_ref - 1)
            bell_seq = &bell.seq
            bell_sleeping = &bell.sleeping
        ctx.v = self.v
        ctx.cur = self.r.cur
        ctx.latest = self.r.latest
        while True:
            if st == TB_ST_OK:
                return s
            if st == TB_ST_CLOSED:
                raise self.ring.closed_error(f"ring {self.ring.name!r} is closed and drained")
            if st == TB_ST_EVICTED:
                self._raise_evicted()
            now = tb_now_ns()
            if deadline >= 0 and now >= deadline:
                raise ReceiveTimeout(f"no message on ring {self.ring.name!r} within "
                                     f"{timeout_ns / 1e9:g} s")
            slice_ns = self.ring.slice_ns
            if deadline >= 0 and deadline - now < slice_ns:
                slice_ns = deadline - now
            ctx.pos = self.r.pos
            with nogil:
                ready = self.ring.waiter.wait(tb_ring_data_ready, &ctx, bell_seq, bell_sleeping,
                                              &sleepers, 1, slice_ns)
                st = tb_ring_poll(self.v, &self.r, &s)
                if st == TB_ST_EMPTY and ready:
                    nap_ms(1)  # closed, but a claimed slot is still unfilled
            if st == TB_ST_EMPTY:
                PyErr_CheckSignals()
                # Off the hot path: only after a whole slice without data.
                if (tb_load_rlx32(&self.r.cur.state) != TB_CURSOR_ACTIVE
                        or self.r.cur.generation != self.generation):
                    st = TB_ST_EVICTED  # the entry was reclaimed (and maybe reused)
                    continue
                self._check_stall()

    cdef _raise_evicted(self):
        # SlowConsumer is a RingClosedError: callers that catch the latter still do.
        if (tb_load_acq32(&self.r.cur.state) == TB_CURSOR_EVICTED
                and self.r.cur.generation == self.generation):
            raise SlowConsumer(f"this subscriber's cursor on ring {self.ring.name!r} was "
                               "evicted: it stayed too far behind")
        raise RingClosedError(f"this subscriber's cursor on ring {self.ring.name!r} was "
                              "evicted or reclaimed")

    cdef _check_stall(self):
        """A sequence was claimed but is not filled after stall_ns: its
        publisher may be dead. Repair; overwrite rings also skip it."""
        cdef int64_t now = tb_now_ns()
        if tb_load_acq64(&self.v.h.head) <= self.r.pos:
            self.r.stall_since = 0
            return
        if self.r.stall_since == 0:
            self.r.stall_since = now
            return
        if now - self.r.stall_since < self.ring.stall_ns:
            return
        self.ring.repair()
        if self.v.policy == TB_POLICY_OVERWRITE:
            tb_fetch_add_u64(&self.r.cur.drops, 1)
            tb_ring_advance(self.v, &self.r)
        self.r.stall_since = now

    cdef void _note(self, tb_slot_header_t *s) noexcept:
        self.last_seq = self.r.pos
        self.last_timestamp_ns = s.timestamp_ns
        self.last_flags = s.flags
        self.last_publisher = s.publisher
        tb_record_latency(self.r.cur, tb_realtime_ns() - s.timestamp_ns)

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
                raise TypeError(f"message {self.r.pos} of ring {self.ring.name!r} is a tensor: "
                                "receive it through a client subscription")
            n = s.length
            if n > buf.len:
                raise ValueError(f"message of {n} bytes does not fit the {buf.len}-byte buffer")
            if n >= NOGIL_COPY_BYTES:
                with nogil:
                    memcpy(buf.buf, tb_payload_of(s), n)
            else:
                memcpy(buf.buf, tb_payload_of(s), n)
            self._note(s)
            tb_ring_advance(self.v, &self.r)
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
        exporter.ptr = tb_payload_of(s)
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
        tb_ring_advance(self.v, &self.r)

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
        return self.r.pos

    @property
    def lag(self) -> int:
        """Messages published but not yet read by this subscriber."""
        return tb_load_acq64(&self.v.h.head) - self.r.pos

    @property
    def group(self) -> bool:
        """A queue group's shared cursor: each message is claimed by one member."""
        return self.r.group

    @property
    def drops(self) -> int:
        """Messages this subscriber lost to overwriting (overwrite rings)."""
        return 0 if self.closed else tb_load_rlx_u64(&self.r.cur.drops)

    def close(self) -> None:
        """Leave the ring: the cursor stops holding back publishers (a queue
        group's cursor stays: the broker frees it with its last member)."""
        if self.closed:
            return
        if self.view is not None:
            self._drop_view()
        self._leave()

    cdef void _leave(self) noexcept:
        """Free the cursor and wake publishers it held back (close, or
        collection while still open)."""
        self.closed = True
        if not self.r.group:
            self._free_cursor()
        tb_fence_sc()
        tb_ring_wake_publishers(self.v)
        self.ring.endpoints -= 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        if not self.closed and self.ring is not None and self.ring.v.h != NULL:
            self._leave()

    cdef void _free_cursor(self) noexcept nogil:
        """Free our entry, unless it was reclaimed and now belongs to another."""
        cdef uint32_t state = tb_load_acq32(&self.r.cur.state)
        if state != TB_CURSOR_FREE and self.r.cur.generation == self.generation:
            tb_cas32(&self.r.cur.state, state, TB_CURSOR_FREE)
