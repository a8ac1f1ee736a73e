"""A ring's publishing end.

``send`` copies a message into a slot with tb_ring.h's claim, copy and
commit, one nogil C call that never leaves a claim held. Bytes and buffers
go in as they are; numpy arrays travel as tensors (a 160-byte descriptor,
then the data inline, or the descriptor alone naming an arena block, copied
in once or loaned and filled in place). Any other object is handed to the
publisher's ``encoder``, which the layer above sets (the client uses
``tensors.from_object`` for torch tensors and ``__dlpack__`` objects): the
core keeps no serialisation policy of its own. See docs/ring.md and
docs/arena.md.
"""

import math
import os
import weakref

cimport cython
from cpython.buffer cimport PyBUF_C_CONTIGUOUS, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from posix.time cimport nanosleep, timespec

from tensorbus._core.atomic cimport (
    tb_cas32,
    tb_fetch_add_u64,
    tb_load_acq64,
    tb_load_rlx32,
    tb_load_rlx_u64,
    tb_now_ns,
    tb_store_rel32,
    tb_store_rlx64,
)
from tensorbus._core.layout cimport (
    TB_DESC_BYTES,
    TB_MAX_NDIM,
    TB_META_BYTES,
    TB_MSG_ARENA,
    TB_MSG_INLINE,
    TB_MSG_TENSOR,
    TB_NO_BLOCK,
    TB_POLICY_BLOCK,
    TB_PUB_FREE,
    TB_PUB_IDLE,
    tb_publisher_t,
    tb_tensor_desc_t,
)
from tensorbus._core.arena cimport Loan
from tensorbus._core.wait cimport timeout_to_ns
from tensorbus._core.ring cimport (
    NOGIL_COPY_BYTES,
    TB_ST_CLOSED,
    TB_ST_DROPPED,
    TB_ST_LOST,
    TB_ST_OK,
    Ring,
    tb_bump_max32,
    tb_reclaim_passed,
    tb_ring_credit_ready,
    tb_ring_publish,
    tb_ring_t,
    tb_ring_wait_t,
    tb_slowest_cursor,
)

import numpy as _np

from tensorbus._core import tensors as _tensors

from tensorbus._core.errors import (
    BackpressureError,
    CapacityError,
    ClaimLostError,
    MessageTooLargeError,
    RingClosedError,
    TensorbusError,
)

__all__ = ["Publisher"]

_ndarray = _np.ndarray
_TAG_OF = {}        # numpy dtype -> its tag
_LOAN_DTYPES = {}   # loan()'s dtype argument -> (numpy dtype, tag)



cdef int put_meta(tb_tensor_desc_t *d, bytes meta) except -1:
    """Copy the application's meta into a descriptor, or say why it does not fit."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(meta)
    if n > TB_META_BYTES:
        raise ValueError(f"meta is {n} bytes; at most {TB_META_BYTES} fit")
    memcpy(d.meta, PyBytes_AS_STRING(meta), n)
    return 0



@cython.no_gc_clear
cdef class Loans:
    """A publisher's side of the arena: the blocks it borrows (waiting for
    space on reliable rings) and the loans it has handed out and not sent,
    so that an array inside one of them is sent without a copy."""

    def __cinit__(self, Ring ring, double default_timeout):
        self.ring = ring
        self.v = &ring.v
        self.open = {}
        self.default_timeout = default_timeout

    cdef object array(self, shape, dtype, timeout, Py_ssize_t inline_max):
        """``Publisher.loan``: a writable array of ``shape`` and ``dtype`` in
        a fresh block, tracked until it is sent or dropped."""
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
        loan = self.block(nbytes, timeout, inline_max)
        self.open[loan.block] = weakref.ref(loan)
        arr = _np.ndarray(shape, dtype=dt, buffer=loan)
        if tag == _tensors.BF16_TAG:
            return _tensors.to_torch(arr, tag)  # bfloat16 exists only as a torch tensor
        return arr

    cdef void sent(self, Loan loan):
        """``loan`` was published: the subscribers own it now."""
        self.open.pop(loan.block, None)

    cdef object find(self, size_t address, Py_ssize_t nbytes):
        """The open loan of the publisher that [address, address + nbytes)
        lies in, or None (then the array is copied like any other). Usually
        the array starts its loan's block: a dict lookup; else a scan."""
        cdef Loan loan
        cdef uint32_t block = (address - <size_t>self.v.arena.data) >> self.v.arena.min_shift
        ref = self.open.get(block)
        candidates = [ref] if ref is not None else list(self.open.values())
        for ref in candidates:
            loan = ref()
            if (loan is not None and loan.state == 0 and <size_t>loan.ptr <= address
                    and address + nbytes <= <size_t>loan.ptr + loan.nbytes):
                return loan
        return None

    cdef object block(self, Py_ssize_t nbytes, object timeout, Py_ssize_t inline_max):
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
                f"inline_max ({inline_max}) bytes only")
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
                tb_reclaim_passed(self.v)
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


# no_gc_clear: see _core/ring.pyx (a cycle must not unmap the ring before this is freed).
@cython.no_gc_clear
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
        tb_bump_max32(&self.v.h.publisher_hwm, i + 1)
        self.rec = r
        self.index = i
        self.cached_min = -(1 << 62)
        self.stall_since = 0
        self.inline_max = self.v.slot_size
        self.loans = Loans(ring, timeout)
        self.closed = False
        ring.endpoints += 1

    cdef int _publish(self, const char *hdr, uint32_t hn, const char *data, uint32_t n,
                      uint16_t type, uint16_t flags, int64_t *seq) noexcept nogil:
        """Claim, copy (``hdr`` then ``data``) and commit one message
        (tb_ring_publish), then wake subscribers if any sleep."""
        cdef int st = tb_ring_publish(self.v, self.rec, self.index, &self.cached_min, hdr, hn,
                                      data, n, type, flags, seq)
        if st == TB_ST_OK and tb_load_rlx32(&self.v.h.sleepers):
            self.ring._wake_subscribers()
        return st

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
        cdef int64_t timeout_ns = 0  # worked out only once there is no credit
        cdef int64_t seq = -1, deadline = -2, now, slice_ns
        cdef int st
        cdef bint ready
        cdef bint big = n >= NOGIL_COPY_BYTES
        cdef tb_ring_wait_t ctx
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
            if st == TB_ST_OK or st == TB_ST_DROPPED:
                self.stall_since = 0
                self.last_dropped = st == TB_ST_DROPPED
                return seq
            if st == TB_ST_CLOSED:
                raise self.ring.closed_error(f"ring {self.ring.name!r} is closed")
            if st == TB_ST_LOST:
                raise ClaimLostError(f"the claim of sequence {seq} on ring {self.ring.name!r} "
                                     "was padded by a repair that took this process for dead")
            # No credit: wait for the slowest subscriber.
            now = tb_now_ns()
            if deadline == -2:
                timeout_ns = (<int64_t>(self.default_timeout * 1e9) if timeout is None
                              else timeout_to_ns(timeout))
                deadline = -1 if timeout_ns < 0 else now + timeout_ns
            if deadline >= 0 and now >= deadline:
                self._raise_backpressure(timeout_ns)
            slice_ns = self.ring.slice_ns
            if deadline >= 0 and deadline - now < slice_ns:
                slice_ns = deadline - now
            with nogil:
                ready = self.ring.waiter.wait(tb_ring_credit_ready, &ctx, &self.v.h.space.seq,
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
        lag = head - tb_slowest_cursor(self.v, head)
        raise BackpressureError(
            f"ring {self.ring.name!r} is full: no credit within {timeout_ns / 1e9:g} s; "
            f"the slowest subscriber is {lag} messages behind (capacity {self.v.capacity})")

    def send(self, data, *, int flags=0, timeout=None, meta=None) -> int:
        """Publish ``data`` and return its sequence number.

        ``data``: bytes or any buffer (received as a memoryview); a numpy
        array (received as an array of the same dtype and shape), or, on a
        ring with an arena, any object the publisher's ``encoder`` turns into
        one (the client's: torch CPU tensors and ``__dlpack__`` objects). Up
        to ``inline_max`` bytes go in the ring slot; larger ones are copied
        once into the arena, and an array from :meth:`loan` is sent with no
        copy at all. A non-contiguous
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
        if arena and kind is not bytes and kind is not memoryview and kind is not bytearray:
            if isinstance(data, _ndarray):
                return self._send_array(data, None, flags, timeout, meta)
            if isinstance(data, _np.generic):  # a numpy scalar: a 0-d array
                return self._send_array(_np.asarray(data), None, flags, timeout, meta)
            if self.encoder is not None:  # torch, DLPack...: the layer above's policy
                arr, tag = self.encoder(data)
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
                    loan = self.loans.find(<size_t>buf.buf, nbytes)
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
                        self.loans.sent(loan)
                        tb_reclaim_passed(self.v)
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
                loan = self.loans.block(nbytes, timeout, self.inline_max)
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
            tb_reclaim_passed(self.v)
            return seq
        finally:
            if have_buf:
                PyBuffer_Release(&buf)

    def loan(self, shape, dtype="float32", *, timeout=None):
        """A writable numpy array of ``shape`` and ``dtype`` (numpy, a string
        or a torch dtype) living in the arena: fill it, then ``send`` it with
        no copy. Once sent it belongs to the subscribers: do not write it
        again. Dropped unsent, its block returns to the arena. Waits for
        space like ``send`` (``timeout``: default the publisher's)."""
        if self.closed:
            raise RingClosedError("publisher is closed")
        return self.loans.array(shape, dtype, timeout, self.inline_max)

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
        self.reservation = None
        self._leave()

    cdef void _leave(self) noexcept:
        """Give the record back (close, or collection while still open)."""
        self.closed = True
        tb_store_rel32(&self.rec.state, TB_PUB_FREE)
        self.ring.endpoints -= 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        if not self.closed and self.ring is not None and self.ring.v.h != NULL:
            self._leave()
