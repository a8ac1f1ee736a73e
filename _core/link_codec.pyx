"""A bridge's per-message work in C (docs/bridge.md, "Batches").

:class:`BatchReader` reads a ring set's messages straight into a link batch
(the ``D`` frame of broker/peer_wire.py), and :class:`BatchWriter` publishes
a received batch straight into the local rings, each in one call per batch.
Both write and read exactly the bytes of ``peer_wire.encode_batch_entry`` /
``decode_batch``, which remain the normative, pure-Python description (and
what light clients use).

The fast path takes the common case only: inline bytes and inline tensors
of topics with credit (out) or ring space (in). At anything else (a body in
the arena, a topic not yet announced, a realtime topic out of credit, a gap
marker, a full ring, a malformed entry) it stops *before* that message and
says so, and the Python path handles it, so per-topic order is kept.

The wire is little-endian; so are the hosts tensorbus builds on (x86-64,
aarch64), and the entry is copied field by field, never cast in place.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from tensorbus._core.atomic cimport tb_load_acq32, tb_load_acq64, tb_now_ns
from tensorbus._core.layout cimport (
    TB_CURSOR_EVICTED,
    TB_DESC_BYTES,
    TB_MAX_NDIM,
    TB_META_BYTES,
    TB_MSG_INLINE,
    TB_MSG_TENSOR,
    TB_NO_BLOCK,
    TB_SLOT_HEADER_BYTES,
    TB_SLOT_HOPS,
    TB_SLOT_HOPS_SHIFT,
    tb_slot_header_t,
    tb_tensor_desc_t,
)
from tensorbus._core.publisher cimport Publisher
from tensorbus._core.ring cimport (
    TB_ST_DROPPED,
    TB_ST_EMPTY,
    TB_ST_OK,
    tb_payload_of,
    tb_ring_advance,
    tb_ring_poll,
)
from tensorbus._core.ringset cimport RingSet
from tensorbus._core.subscriber cimport Subscriber

from tensorbus._core import tensors as _tensors

__all__ = [
    "BatchReader",
    "BatchWriter",
    "CLAIMED",
    "EMPTY",
    "FULL",
    "InState",
    "LOST",
    "OutState",
    "PARK",
    "SLOW",
]

# BatchReader.take's answers.
EMPTY = 0  # every member ring is drained
FULL = 1   # the batch reached its size: send it, then call again
SLOW = 2   # the next message (of ``stopped``) needs the Python path: take(1) it
PARK = 3   # reliable topic ``stopped`` used its last credit: park its cursor

# BatchReader.claim_into's answers (and SLOW).
LOST = 0     # another member of the queue group claimed it first
CLAIMED = 1  # claimed, and appended to the batch

# Entry kinds (peer_wire.BYTES, TENSOR).
cdef enum:
    KIND_BYTES = 0
    KIND_TENSOR = 1
    ENTRY_BYTES = 24  # <BBHIQQ: kind, ndim, flags, topic, seq, nbytes
    DESC_WIRE = 48    # 16 bytes of dtype tag, 32 of meta
    TAG_BYTES = 16


cdef packed struct wire_entry_t:
    uint8_t kind
    uint8_t ndim
    uint16_t flags
    uint32_t topic
    uint64_t seq
    uint64_t nbytes


cdef class OutState:
    """One topic's outbound state on a link epoch (broker/flow_out.py's
    OutTopic extends it)."""

    def __init__(self, uint32_t tid, bint reliable, int64_t credit_msgs, int64_t credit_bytes,
                 int64_t batch_bytes, int64_t batch_ns):
        self.id = tid
        self.reliable = reliable
        self.credit_msgs = credit_msgs
        self.credit_bytes = credit_bytes
        self.batch_bytes = batch_bytes
        self.batch_ns = batch_ns
        self.echo_publisher = -1


cdef class InState:
    """One topic's inbound state on a link epoch (broker/flow_in.py's InTopic
    extends it)."""

    def __init__(self, int64_t tid=0, pub=None, backlog=None):
        self.id = tid
        self.pub = pub
        self.backlog = backlog


cdef inline char *grow(bytearray batch, Py_ssize_t need) except NULL:
    """Room for ``need`` more bytes at the end of ``batch``."""
    cdef Py_ssize_t at = PyByteArray_GET_SIZE(batch)
    PyByteArray_Resize(batch, at + need)
    return PyByteArray_AS_STRING(batch) + at


cdef class BatchReader:
    """Reads ring sets into link batches."""

    def __init__(self, uint16_t keep_flags, uint16_t skip_flags, Py_ssize_t inline_max):
        self.keep_flags = keep_flags
        self.skip_flags = skip_flags
        self.inline_max = inline_max

    def reset_counts(self) -> None:
        self.msgs = 0
        self.nbytes = 0

    def take(self, RingSet rings, dict topics, bytearray batch, Py_ssize_t max_bytes) -> int:
        """Append the ring set's waiting messages to ``batch`` as entries,
        until every member is drained (EMPTY), the batch is due (FULL: it
        would pass ``max_bytes`` or a topic's ``batch_bytes``, a message in
        it has waited its topic's ``batch_ns``, or it holds a message of a
        topic that goes alone), or a message needs Python (SLOW, PARK; the
        ring set's round-robin then starts at that member, and ``stopped``
        names its topic). ``topics`` maps names to OutStates."""
        cdef int n = rings.n, k, i, st
        cdef Subscriber sub
        cdef OutState t
        cdef tb_slot_header_t *s
        cdef Py_ssize_t at, need, nbytes
        cdef int64_t now, limit
        self.stopped = None
        if PyByteArray_GET_SIZE(batch) == 0:
            self.deadline = 0
        for k in range(n):
            i = (rings.next + k) % n
            sub = <Subscriber>rings.subs[i]
            name = rings.topics[i]
            obj = topics.get(name)
            if obj is None or sub.r.group:
                return self._stop(rings, i, name, SLOW)
            t = <OutState>obj
            while True:
                st = tb_ring_poll(sub.v, &sub.r, &s)
                if st == TB_ST_EMPTY:
                    break
                if st != TB_ST_OK:
                    return self._stop(rings, i, name, SLOW)  # closed, evicted: Python says
                if s.flags & self.skip_flags or <int64_t>s.publisher == t.echo_publisher:
                    if tb_load_acq32(&sub.r.cur.state) == TB_CURSOR_EVICTED:
                        return self._stop(rings, i, name, SLOW)
                    sub._note(s)
                    tb_ring_advance(sub.v, &sub.r)
                    continue
                if not t.announced or t.credit_msgs <= 0 or t.credit_bytes <= 0:
                    return self._stop(rings, i, name, PARK if t.reliable and t.announced
                                      else SLOW)
                need = self._entry_bytes(s)
                if need < 0:
                    return self._stop(rings, i, name, SLOW)  # a body in the arena, or odd
                at = PyByteArray_GET_SIZE(batch)
                limit = max_bytes if t.batch_bytes > max_bytes else t.batch_bytes
                now = tb_now_ns()
                if at and (at + need > limit or now >= self.deadline):
                    rings.next = i
                    return FULL
                if at == 0 or now + t.batch_ns < self.deadline:
                    self.deadline = now + t.batch_ns
                nbytes = self._append(s, t, batch, need)
                if tb_load_acq32(&sub.r.cur.state) == TB_CURSOR_EVICTED:
                    PyByteArray_Resize(batch, at)  # the copy may be torn: Python raises
                    return self._stop(rings, i, name, SLOW)
                sub._note(s)
                tb_ring_advance(sub.v, &sub.r)
                self._count(t, nbytes)
                if t.reliable and (t.credit_msgs <= 0 or t.credit_bytes <= 0):
                    return self._stop(rings, (i + 1) % n, name, PARK)
                if t.batch_bytes == 0:
                    rings.next = i
                    return FULL  # a message that goes alone
        return EMPTY

    cdef int _stop(self, RingSet rings, int i, name, int why):
        rings.next = i
        self.stopped = name
        return why

    def claim_into(self, RingSet rings, int64_t position, OutState t, bytearray batch) -> int:
        """Claim the queue-group message at ``position`` of the ring set's
        first member (its group cursor: see ``RingSet.group_head``) and
        append it to ``batch`` as an entry of ``t``, in one call: CLAIMED;
        LOST if another member took it first (``batch`` is as it was); SLOW
        if it needs Python (a body in the arena, a topic not yet announced,
        an evicted cursor): then nothing is claimed, and ``claim_at`` is the
        way. The caller has checked the link's rules and ``t``'s credit."""
        cdef Subscriber sub
        cdef tb_slot_header_t *s = NULL
        cdef Py_ssize_t at, need, nbytes
        if rings.n == 0 or not t.announced:
            return SLOW
        sub = <Subscriber>rings.subs[0]
        if not sub.r.group:
            return SLOW
        sub.r.pos = tb_load_acq64(&sub.r.cur.position)  # shared with the other members
        if sub.r.pos != position:
            return LOST
        if tb_ring_poll(sub.v, &sub.r, &s) != TB_ST_OK:
            return SLOW
        need = self._entry_bytes(s)
        if need < 0:
            return SLOW
        at = PyByteArray_GET_SIZE(batch)
        nbytes = self._append(s, t, batch, need)
        if tb_load_acq32(&sub.r.cur.state) == TB_CURSOR_EVICTED:
            PyByteArray_Resize(batch, at)
            return SLOW
        tb_ring_advance(sub.v, &sub.r)  # the claim: a CAS on the group's cursor
        if not sub.r.claimed:
            PyByteArray_Resize(batch, at)
            return LOST
        sub._note(s)
        self._count(t, nbytes)
        return CLAIMED

    cdef Py_ssize_t _entry_bytes(self, tb_slot_header_t *s):
        """The size of slot ``s`` as a batch entry; -1 if the fast path
        cannot take it (a body in the arena, a large or malformed tensor)."""
        cdef tb_tensor_desc_t *d
        if s.type == TB_MSG_INLINE:
            return ENTRY_BYTES + s.length
        if s.type != TB_MSG_TENSOR:
            return -1
        d = <tb_tensor_desc_t *>tb_payload_of(s)
        if (s.length < TB_DESC_BYTES or d.ndim > TB_MAX_NDIM
                or d.nbytes > s.length - TB_DESC_BYTES
                or <Py_ssize_t>d.nbytes > self.inline_max):
            return -1
        return ENTRY_BYTES + DESC_WIRE + 8 * d.ndim + <Py_ssize_t>d.nbytes

    cdef Py_ssize_t _append(self, tb_slot_header_t *s, OutState t, bytearray batch,
                            Py_ssize_t need) except -1:
        """Append slot ``s`` (``need`` bytes, from ``_entry_bytes``) to
        ``batch`` as the next entry of ``t``; its payload size."""
        cdef wire_entry_t e
        cdef tb_tensor_desc_t *d = NULL
        cdef const char *src = tb_payload_of(s)
        cdef Py_ssize_t nbytes = s.length
        cdef uint32_t ndim = 0
        cdef char *out
        if s.type == TB_MSG_TENSOR:
            d = <tb_tensor_desc_t *>src
            ndim = d.ndim
            nbytes = <Py_ssize_t>d.nbytes
            src += TB_DESC_BYTES
        e.kind = KIND_BYTES if d == NULL else KIND_TENSOR
        e.ndim = <uint8_t>ndim
        e.flags = s.flags & self.keep_flags
        e.topic = t.id
        e.seq = t.sent
        e.nbytes = <uint64_t>nbytes
        out = grow(batch, need)
        memcpy(out, &e, ENTRY_BYTES)
        out += ENTRY_BYTES
        if d != NULL:
            memcpy(out, d.dtype, TAG_BYTES)
            memcpy(out + TAG_BYTES, d.meta, TB_META_BYTES)
            memcpy(out + DESC_WIRE, d.shape, 8 * ndim)
            out += DESC_WIRE + 8 * ndim
        memcpy(out, src, nbytes)
        return nbytes

    cdef void _count(self, OutState t, Py_ssize_t nbytes) noexcept:
        """One message of ``t`` is in the batch: its sequence and credit."""
        t.sent += 1
        t.credit_msgs -= 1
        t.credit_bytes -= nbytes
        self.msgs += 1
        self.nbytes += nbytes


cdef class BatchWriter:
    """Publishes received link batches into local rings."""

    def __init__(self, uint16_t keep_flags, uint16_t add_flags, int hop_step=0,
                 int max_hops=15):
        self.keep_flags = keep_flags
        self.add_flags = add_flags
        self.hop_step = hop_step
        self.max_hops = max_hops
        self.touched = []
        self.tags = {}

    cdef Py_ssize_t _itemsize(self, const char *tag):
        """The item size of dtype ``tag``; 0 for a tag tensorbus does not carry."""
        cdef Py_ssize_t n = 0
        while n < TAG_BYTES and tag[n]:
            n += 1
        key = tag[:n]
        size = self.tags.get(key)
        if size is None:
            try:
                size = _tensors.numpy_dtype(key.decode("ascii")).itemsize
            except (ValueError, TypeError, UnicodeDecodeError):
                size = 0
            self.tags[key] = size
        return size

    def publish(self, frame, Py_ssize_t at, dict topics) -> int:
        """Publish the entries of batch ``frame`` from byte ``at`` on into
        their topics' rings; return where it stopped (``len(frame)`` when
        all were published). It stops before an entry that needs Python: a
        body, a topic unknown, refused or with a backlog, a full ring, a
        malformed entry (Python raises the WireError). ``topics`` maps ids
        to InStates; each published message counts in its ``fresh_*``, and
        so does one dropped for its hop count (``hops_dropped``: the sender
        gets its credit back)."""
        cdef Py_buffer view
        PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE)
        try:
            return self._publish(<const char *>view.buf, view.len, at, topics)
        finally:
            PyBuffer_Release(&view)

    cdef Py_ssize_t _publish(self, const char *buf, Py_ssize_t end, Py_ssize_t at,
                             dict topics) except -1:
        cdef wire_entry_t e
        cdef tb_tensor_desc_t desc
        cdef InState t
        cdef Publisher pub
        cdef Py_ssize_t start, nbytes, itemsize, count
        cdef int64_t seq, dim
        cdef int st, k
        cdef uint16_t flags
        cdef int hops
        cdef const char *payload
        while at < end:
            start = at
            if end - at < ENTRY_BYTES:
                return start
            memcpy(&e, buf + at, ENTRY_BYTES)
            at += ENTRY_BYTES
            obj = topics.get(e.topic)
            if obj is None:
                return start
            t = <InState>obj
            if t.pub is None or t.backlog:
                return start
            pub = <Publisher>t.pub
            if pub.closed:
                return start
            # The hop count crosses in the entry's high byte; a relayed
            # message past the cluster's diameter is consumed, not published
            # (it would go round): counted, and credited like a drop.
            # (A light client's messages are local publishes: hop_step 0, no hops.)
            hops = 0
            if self.hop_step:
                hops = ((e.flags & TB_SLOT_HOPS) >> TB_SLOT_HOPS_SHIFT) + self.hop_step
            flags = ((e.flags & self.keep_flags & ~TB_SLOT_HOPS) | self.add_flags
                     | ((hops << TB_SLOT_HOPS_SHIFT) & TB_SLOT_HOPS))
            if hops > self.max_hops and e.kind != KIND_BYTES and e.kind != KIND_TENSOR:
                return start  # a body: Python receives it, then drops it
            if hops > self.max_hops:
                nbytes = <Py_ssize_t>e.nbytes if e.nbytes <= <uint64_t>(end - at) else -1
                if e.kind == KIND_TENSOR:
                    if e.ndim > TB_MAX_NDIM or end - at < DESC_WIRE + 8 * e.ndim:
                        return start
                    at += DESC_WIRE + 8 * e.ndim
                    nbytes = <Py_ssize_t>e.nbytes if e.nbytes <= <uint64_t>(end - at) else -1
                if nbytes < 0:
                    return start  # malformed: Python raises the WireError
                at += nbytes
                self.hops_dropped += 1
                if t.fresh_msgs == 0:
                    self.touched.append(t)
                t.fresh_msgs += 1
                t.fresh_bytes += nbytes
                continue
            if e.kind == KIND_BYTES:
                if (e.nbytes > <uint64_t>(end - at) or e.nbytes > <uint64_t>pub.inline_max
                        or e.nbytes > pub.v.slot_size):
                    return start
                nbytes = <Py_ssize_t>e.nbytes
                st = pub._publish(NULL, 0, buf + at, <uint32_t>nbytes, TB_MSG_INLINE, flags,
                                  &seq)
            elif e.kind == KIND_TENSOR:
                if e.ndim > TB_MAX_NDIM or end - at < DESC_WIRE + 8 * e.ndim:
                    return start
                itemsize = self._itemsize(buf + at)
                if itemsize == 0 or e.nbytes == 0:
                    return start
                memset(&desc, 0, sizeof(desc))
                memcpy(desc.dtype, buf + at, TAG_BYTES)
                memcpy(desc.meta, buf + at + TAG_BYTES, TB_META_BYTES)
                count = 1
                for k in range(e.ndim):
                    memcpy(&dim, buf + at + DESC_WIRE + 8 * k, 8)
                    if dim < 0 or dim > <int64_t>e.nbytes:
                        return start
                    desc.shape[k] = dim
                    count *= <Py_ssize_t>dim
                    if count > <Py_ssize_t>e.nbytes:
                        return start  # cannot match nbytes (and would overflow)
                at += DESC_WIRE + 8 * e.ndim
                if (<uint64_t>(count * itemsize) != e.nbytes or e.nbytes > <uint64_t>(end - at)
                        or TB_DESC_BYTES + e.nbytes > <uint64_t>pub.inline_max
                        or TB_DESC_BYTES + e.nbytes > pub.v.slot_size):
                    return start
                nbytes = <Py_ssize_t>e.nbytes
                desc.block = TB_NO_BLOCK
                desc.ndim = e.ndim
                desc.nbytes = e.nbytes
                st = pub._publish(<const char *>&desc, TB_DESC_BYTES, buf + at,
                                  <uint32_t>nbytes, TB_MSG_TENSOR, flags, &seq)
            else:
                return start  # a body (or an unknown kind): Python
            if st != TB_ST_OK and st != TB_ST_DROPPED:
                return start  # no room (or closed): Python queues it, or says why
            at += nbytes
            if t.fresh_msgs == 0:
                self.touched.append(t)
            t.fresh_msgs += 1
            t.fresh_bytes += nbytes
        return at
