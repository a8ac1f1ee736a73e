"""The bridge's batch codec in the core (_core/link_codec.pyx) against the
link protocol's pure-Python description (broker/peer_wire.py): the same
bytes out, the same messages in, and a stop before anything it leaves to
Python."""

import collections
import os

import numpy as np
import pytest

from tensorbus._core import BellTable, RingSet, Subscriber
from tensorbus._core.link_codec import (
    CLAIMED,
    EMPTY,
    FULL,
    LOST,
    PARK,
    SLOW,
    BatchReader,
    BatchWriter,
    InState,
    OutState,
)
from tensorbus.broker import peer_wire as W
from tensorbus.broker.batching import DEFAULT

pytestmark = pytest.mark.timeout(30)

KEEP = 0x00FF
BRIDGED, GAP = 0x0100, 0x0200


@pytest.fixture
def bells(tmp_path):
    table = BellTable.create(4, str(tmp_path), instance=f"test{os.getpid()}")
    yield table
    table.segment.unlink()


def member(ring, bell=0):
    cursor, generation = ring.join_cursor(os.getpid(), bell=bell + 1)
    return Subscriber(ring, cursor=cursor, generation=generation)


def out_state(tid, reliable=True, msgs=100, nbytes=1 << 20):
    t = OutState(tid, reliable, msgs, nbytes, DEFAULT.nbytes, DEFAULT.ns)
    t.announced = True
    return t


def reader_over(make_ring, bells, names, capacity=16):
    rs = RingSet(bells, 0, raise_gaps=False)
    rings = {}
    for name in names:
        ring = make_ring(capacity=capacity, slot_size=512, bells=bells)
        rings[name] = ring
        rs.add(name, member(ring))
    return rs, rings


def test_a_batch_is_the_bytes_peer_wire_describes(make_ring, bells):
    rs, rings = reader_over(make_ring, bells, ["a", "b"])
    pa, pb = rings["a"].publisher(), rings["b"].publisher()
    pa.send(b"hello", flags=3)
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    pb.send_described(arr, "<f4", meta=b"m" * 32, flags=BRIDGED | 1)
    pa.send(b"", flags=0)
    topics = {"a": out_state(7), "b": out_state(9)}
    reader = BatchReader(KEEP, 0, 64 << 10)
    batch = bytearray()
    assert reader.take(rs, topics, batch, 1 << 16) == EMPTY
    entries = W.decode_batch(bytes(batch))
    by_topic = collections.defaultdict(list)
    for e in entries:
        by_topic[e.topic].append(e)
    a0, a1 = by_topic[7]
    assert (a0.kind, a0.flags, a0.seq, bytes(a0.payload)) == (W.BYTES, 3, 0, b"hello")
    assert (a1.seq, bytes(a1.payload)) == (1, b"")
    (b0,) = by_topic[9]
    assert (b0.kind, b0.flags, b0.dtype, b0.shape, b0.meta) == (
        W.TENSOR,
        1,
        "<f4",
        (2, 3),
        b"m" * 32,
    )
    assert np.array_equal(np.frombuffer(b0.payload, np.float32).reshape(2, 3), arr)
    head = W.encode_batch_entry(W.TENSOR, 1, 9, 0, arr.nbytes, "<f4", b"m" * 32, (2, 3))
    assert head + arr.tobytes() in bytes(batch)
    assert (topics["a"].sent, topics["a"].credit_msgs, topics["a"].credit_bytes) == (
        2,
        98,
        (1 << 20) - 5,
    )
    assert (reader.msgs, reader.nbytes) == (3, 5 + arr.nbytes)
    assert rs.take(8) == []  # all consumed


def test_stops_before_what_python_handles(make_ring, bells):
    rs, rings = reader_over(make_ring, bells, ["a"])
    pub = rings["a"].publisher()
    for k in range(4):
        pub.send(bytes([k]) * 10)
    t = out_state(1, msgs=2)
    reader = BatchReader(KEEP, 0, 64 << 10)
    batch = bytearray()
    # The last credit: the topic parks, and nothing past it was read.
    assert reader.take(rs, {"a": t}, batch, 1 << 16) == PARK
    assert reader.stopped == "a" and len(W.decode_batch(bytes(batch))) == 2
    # Not announced on this epoch: Python announces first.
    t.credit_msgs, t.announced = 10, False
    assert reader.take(rs, {"a": t}, batch, 1 << 16) == SLOW
    t.announced = True
    # A realtime topic out of credit: Python keeps the newest.
    t.reliable, t.credit_msgs = False, 0
    assert reader.take(rs, {"a": t}, batch, 1 << 16) == SLOW
    t.credit_msgs = 10
    # The batch is full: nothing more is read until it is sent.
    assert reader.take(rs, {"a": t}, batch, len(batch) + 20) == FULL
    assert len(W.decode_batch(bytes(batch))) == 2
    batch = bytearray()
    assert reader.take(rs, {"a": t}, batch, 1 << 16) == EMPTY
    assert [bytes(e.payload) for e in W.decode_batch(bytes(batch))] == [b"\2" * 10, b"\3" * 10]


def test_a_group_request_is_claimed_into_a_batch_at_its_position_only(make_ring, bells):
    ring = make_ring(capacity=8, slot_size=512, bells=bells)
    cursor, generation = ring.join_cursor(os.getpid(), bell=1, group=True)
    bridge = RingSet(bells, 0, raise_gaps=False)  # the bridge's membership
    bridge.add("svc", Subscriber(ring, cursor=cursor, generation=generation))
    local = Subscriber(ring, cursor=cursor, generation=generation)  # a member here
    pub = ring.publisher()
    meta = (7).to_bytes(8, "little") + (99).to_bytes(8, "little") + bytes(16)
    pub.send(b"req-1", flags=1)
    pub.send_described(np.frombuffer(b"req-2", np.uint8), "|u1", meta=meta, flags=1)
    position, flags, _, seen = bridge.group_head(True)
    assert seen is None and flags & KEEP == 1  # bytes carry no meta
    t, reader = out_state(5), BatchReader(KEEP, 0, 64 << 10)
    batch = bytearray(b"before")
    # The member here takes req-1 first: the bridge's claim of it is lost,
    # the batch is as it was, and req-2 (one further) is not taken with it.
    assert local.recv(timeout=1) == b"req-1"
    assert reader.claim_into(bridge, position, t, batch) == LOST
    assert bytes(batch) == b"before" and t.sent == 0
    assert bridge.group_head(True) == (position + 1, 1, pub.index, meta)  # the route's key
    # Its topic not yet announced on this link: Python's way (claim_at).
    t.announced = False
    assert reader.claim_into(bridge, position + 1, t, batch) == SLOW
    t.announced = True
    assert reader.claim_into(bridge, position + 1, t, batch) == CLAIMED
    (entry,) = W.decode_batch(bytes(batch[len(b"before") :]))
    assert (entry.topic, entry.seq, entry.kind, entry.flags) == (5, 0, W.TENSOR, 1)
    assert (entry.meta, bytes(entry.payload)) == (meta, b"req-2")
    assert (t.sent, t.credit_msgs, reader.msgs) == (1, 99, 1)
    assert bridge.group_head(True) is None
    bridge.close()
    local.close()


def test_messages_from_another_host_are_consumed_not_sent(make_ring, bells):
    rs, rings = reader_over(make_ring, bells, ["a"])
    pub = rings["a"].publisher()
    pub.send(b"x", flags=BRIDGED)
    pub.send(b"y", flags=GAP)
    pub.send(b"z")
    reader = BatchReader(KEEP, BRIDGED | GAP, 64 << 10)
    batch = bytearray()
    t = out_state(1)
    assert reader.take(rs, {"a": t}, batch, 1 << 16) == EMPTY
    assert [bytes(e.payload) for e in W.decode_batch(bytes(batch))] == [b"z"]
    assert t.sent == 1


def batch_of(*entries) -> bytes:
    out = b""
    for head, payload in entries:
        out += head + payload
    return out


def test_a_batch_is_published_as_the_python_path_would(make_ring, bells):
    ring = make_ring(capacity=8, slot_size=512, bells=bells)
    sub = member(ring)
    pub = ring.publisher(timeout=0)
    pub.inline_max = 512
    t = InState(4, pub, collections.deque())
    arr = np.arange(5, dtype="<i8")
    frame = batch_of(
        (W.encode_batch_entry(W.BYTES, 0x1FF, 4, 0, 3), b"abc"),
        (
            W.encode_batch_entry(W.TENSOR, 2, 4, 1, arr.nbytes, "<i8", b"q" * 32, (5,)),
            arr.tobytes(),
        ),
    )
    writer = BatchWriter(KEEP, BRIDGED)
    assert writer.publish(frame, 0, {4: t}) == len(frame)
    assert (t.fresh_msgs, t.fresh_bytes) == (2, 3 + arr.nbytes)
    assert writer.touched == [t]
    rs = RingSet(bells, 0)
    rs.add("t", sub)
    m1, m2 = rs.take(4)
    assert (bytes(m1.data), m1.flags) == (b"abc", 0xFF | BRIDGED)
    assert np.array_equal(m2.data, arr) and m2.meta == b"q" * 32 and m2.flags == 2 | BRIDGED


def test_publishing_stops_before_what_python_handles(make_ring, bells):
    ring = make_ring(capacity=2, slot_size=512, bells=bells)
    idle = member(ring)  # a reader that never reads: the ring fills
    pub = ring.publisher(timeout=0)
    pub.inline_max = 512
    t = InState(1, pub, collections.deque())
    one = W.encode_batch_entry(W.BYTES, 0, 1, 0, 1) + b"x"
    body = W.encode_batch_entry(W.BODY, 0, 1, 0, 1 << 20, "|u1", b"", (1 << 20,))
    writer = BatchWriter(KEEP, 0)
    # Full ring: stops before the third.
    assert writer.publish(one * 3, 0, {1: t}) == 2 * len(one)
    ring2 = make_ring(capacity=8, slot_size=512, bells=bells)
    reader2 = member(ring2)
    t2 = InState(2, ring2.publisher(timeout=0), collections.deque())
    t2.pub.inline_max = 512
    two = W.encode_batch_entry(W.BYTES, 0, 2, 0, 1) + b"y"
    assert writer.publish(two + body, 0, {2: t2}) == len(two)  # a body
    assert writer.publish(two, 0, {}) == 0  # a topic never announced
    t2.backlog.append("waiting")
    assert writer.publish(two, 0, {2: t2}) == 0  # behind its backlog
    t2.backlog.clear()
    assert writer.publish(two[:-1], 0, {2: t2}) == 0  # truncated: Python raises
    bad = W.encode_batch_entry(W.TENSOR, 0, 2, 0, 12, "<f4", b"", (2,)) + bytes(12)
    assert writer.publish(bad, 0, {2: t2}) == 0  # the shape does not match nbytes
    assert writer.publish(two, len(two), {2: t2}) == len(two)  # from an offset: nothing left
    assert idle.ring is ring and reader2.ring is ring2


def test_per_topic_batching_bounds(make_ring, bells):
    rs, rings = reader_over(make_ring, bells, ["alone", "small"])
    for k in range(3):
        rings["alone"].publisher().send(b"a%d" % k)
        rings["small"].publisher().send(b"s%d" % k)
    alone = OutState(1, True, 100, 1 << 20, 0, 100_000)  # batching off
    small = OutState(2, True, 100, 1 << 20, 2 * (24 + 2), 10**9)  # two entries per batch
    reader = BatchReader(KEEP, 0, 64 << 10)
    topics = {"alone": alone, "small": small}
    for t in topics.values():
        t.announced = True
    sizes = []
    while True:
        batch = bytearray()
        why = reader.take(rs, topics, batch, 1 << 16)
        if batch:
            sizes.append(sorted(e.topic for e in W.decode_batch(bytes(batch))))
        if why == EMPTY:
            break
        assert why == FULL
    assert sizes.count([1]) == 3  # each message of "alone" went by itself
    small_batches = [s for s in sizes if 1 not in s]
    assert sorted(map(len, small_batches)) == [1, 2]  # "small" two at most
    # The time bound: a topic whose messages may not wait at all.
    for k in range(3):
        rings["small"].publisher().send(b"t%d" % k)
    small.batch_bytes, small.batch_ns = 1 << 16, 0
    batch = bytearray()
    assert reader.take(rs, topics, batch, 1 << 16) == FULL
    assert len(W.decode_batch(bytes(batch))) == 1
