"""The ring's API in one process: delivery, policies, zero-copy views and
every bad input the issue names."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tensorbus._core import (
    BackpressureError,
    CapacityError,
    MessageTooLargeError,
    ReceiveTimeout,
    Ring,
    RingClosedError,
    SlowConsumer,
    TensorbusError,
    ViewInUseError,
)


def test_every_subscriber_gets_every_message_in_order(make_ring):
    ring = make_ring(capacity=8, slot_size=128)
    subs = [ring.subscriber() for _ in range(3)]
    pub = ring.publisher()
    for round_ in range(5):  # 5 x 6 messages wraps the 8-slot ring several times
        sent = [bytes([round_, i]) * (i + 1) for i in range(6)]
        seqs = [pub.send(m) for m in sent]
        for sub in subs:
            assert [sub.recv(timeout=1) for _ in sent] == sent
            assert sub.last_seq == seqs[-1]
    assert pub.published == 30
    assert seqs == list(range(24, 30))


def test_metadata_and_buffer_inputs(make_ring):
    ring = make_ring(capacity=4, slot_size=64)
    sub, pub = ring.subscriber(), ring.publisher()
    pub.send(np.arange(4, dtype=np.int32), flags=7)
    assert sub.recv() == np.arange(4, dtype=np.int32).tobytes()
    assert sub.last_flags == 7 and sub.last_timestamp_ns > 0
    pub.send(bytearray(b"abc"))
    pub.send(memoryview(b"xyz123")[2:5])
    pub.send(b"")
    assert [sub.recv(), sub.recv(), sub.recv()] == [b"abc", b"z12", b""]


def test_recv_into_and_too_small_buffer(make_ring):
    ring = make_ring(capacity=4, slot_size=64)
    sub, pub = ring.subscriber(), ring.publisher()
    pub.send(b"0123456789")
    small = bytearray(4)
    with pytest.raises(ValueError, match="does not fit"):
        sub.recv_into(small)
    big = bytearray(64)
    assert sub.recv_into(big) == 10  # the message was not lost by the failed try
    assert big[:10] == b"0123456789"


def test_message_larger_than_a_slot(make_ring):
    ring = make_ring(capacity=4, slot_size=16)
    sub, pub = ring.subscriber(), ring.publisher()
    with pytest.raises(MessageTooLargeError, match="slot size of 16 bytes"):
        pub.send(b"x" * 17)
    pub.send(b"y" * 16)
    assert sub.recv() == b"y" * 16
    assert ring.head == 1  # the refused message claimed nothing


@pytest.mark.parametrize("bad", [-1, float("nan"), "soon"])
def test_bad_timeouts(make_ring, bad):
    ring = make_ring(capacity=4, slot_size=16)
    sub, pub = ring.subscriber(), ring.publisher()
    with pytest.raises((ValueError, TypeError), match="timeout"):
        sub.recv(timeout=bad)
    for _ in range(4):
        pub.send(b"x")
    with pytest.raises((ValueError, TypeError), match="timeout"):
        pub.send(b"x", timeout=bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="power of two"):
        Ring.create(capacity=6)
    with pytest.raises(ValueError, match="slot_size"):
        Ring.create(slot_size=0)
    with pytest.raises(ValueError, match="policy"):
        Ring.create(policy="lossy")


def test_bad_send_inputs(make_ring):
    ring = make_ring(capacity=4, slot_size=16)
    pub = ring.publisher()
    with pytest.raises(TypeError, match="bytes or a C-contiguous buffer"):
        pub.send("text")
    with pytest.raises(TypeError, match="contiguous"):
        pub.send(np.arange(8, dtype=np.int8)[::2])
    with pytest.raises(ValueError, match="16 bits"):
        pub.send(b"x", flags=1 << 16)
    assert ring.head == 0


def test_block_ring_backpressure_then_credit(make_ring):
    ring = make_ring(capacity=4, slot_size=16)
    sub, pub = ring.subscriber(), ring.publisher(timeout=0.05)
    for i in range(4):
        pub.send(bytes([i]))
    with pytest.raises(BackpressureError, match="4 messages behind"):
        pub.send(b"late")
    assert isinstance(BackpressureError("x"), TimeoutError)
    assert sub.recv() == b"\x00"
    pub.send(b"\x04")
    assert [sub.recv() for _ in range(4)] == [b"\x01", b"\x02", b"\x03", b"\x04"]


def test_block_ring_without_subscribers_never_blocks(make_ring):
    ring = make_ring(capacity=4, slot_size=16)
    pub = ring.publisher(timeout=0)
    for _ in range(20):
        pub.send(b"nobody listens")
    sub = ring.subscriber()
    pub.send(b"first seen")
    assert sub.recv(timeout=1) == b"first seen"


def test_recv_timeout(make_ring):
    ring = make_ring(capacity=4, slot_size=16)
    sub = ring.subscriber()
    with pytest.raises(ReceiveTimeout, match="within 0.01 s"):
        sub.recv(timeout=0.01)
    assert sub.try_recv() is None


def test_overwrite_ring_lapped_subscriber_counts_drops(make_ring):
    ring = make_ring(capacity=8, slot_size=16, policy="overwrite")
    sub, pub = ring.subscriber(), ring.publisher()
    for i in range(20):
        pub.send(bytes([i]))  # never blocks
    # Lapped: jump to head - capacity/2 = 16, counting 16 drops.
    assert sub.recv() == bytes([16])
    assert sub.drops == 16
    assert [sub.recv() for _ in range(3)] == [bytes([17]), bytes([18]), bytes([19])]
    assert sub.try_recv() is None


def test_overwrite_ring_has_no_peek(make_ring):
    ring = make_ring(capacity=8, slot_size=16, policy="overwrite")
    sub = ring.subscriber()
    with pytest.raises(TypeError, match="block rings only"):
        sub.peek(timeout=0)


def test_peek_is_zero_copy_and_holds_the_slot(make_ring):
    ring = make_ring(capacity=2, slot_size=16)
    sub, pub = ring.subscriber(), ring.publisher(timeout=0.02)
    pub.send(b"first")
    pub.send(b"second")
    view = sub.peek()
    assert view.readonly and bytes(view) == b"first"
    with pytest.raises(TypeError):
        view[0] = 1
    with pytest.raises(TensorbusError, match="release"):
        sub.recv(timeout=0)
    with pytest.raises(BackpressureError):
        pub.send(b"third")  # the peeked slot is still held
    array = np.frombuffer(view, dtype=np.uint8)
    with pytest.raises(ViewInUseError, match="still"):
        sub.release()
    assert bytes(array) == b"first"  # refused release left the data intact
    del array
    sub.release()
    with pytest.raises(ValueError):
        view[0]  # the released view can no longer reach the slot
    pub.send(b"third")
    assert sub.recv() == b"second"
    with pytest.raises(TensorbusError, match="without peek"):
        sub.release()


def test_slices_of_a_peek_keep_it_held(make_ring):
    ring = make_ring(capacity=2, slot_size=16)
    sub, pub = ring.subscriber(), ring.publisher()
    pub.send(b"abcdef")
    view = sub.peek()
    part = view[1:3]
    with pytest.raises(ViewInUseError):
        sub.release()
    assert bytes(part) == b"bc"
    del part
    sub.release()


def test_reserve_commit(make_ring):
    ring = make_ring(capacity=4, slot_size=32)
    sub, pub = ring.subscriber(), ring.publisher()
    buf = pub.reserve(10)
    buf[:] = b"0123456789"
    assert ring.head == 0  # nothing is claimed before commit
    pub.commit(4, flags=3)
    assert sub.recv() == b"0123" and sub.last_flags == 3
    with pytest.raises(TensorbusError, match="without reserve"):
        pub.commit()
    with pytest.raises(MessageTooLargeError):
        pub.reserve(33)
    buf = pub.reserve(3)
    buf[:] = b"abc"
    with pytest.raises(ValueError, match="outside"):
        pub.commit(4)
    pub.commit()
    assert sub.recv() == b"abc"


def test_closed_ring_drains_then_raises(make_ring):
    ring = make_ring(capacity=4, slot_size=16)
    sub, pub = ring.subscriber(), ring.publisher()
    pub.send(b"last words")
    ring.close()
    with pytest.raises(RingClosedError, match="closed"):
        pub.send(b"too late")
    assert sub.recv(timeout=1) == b"last words"
    with pytest.raises(RingClosedError, match="drained"):
        sub.recv(timeout=1)
    other = Ring.attach(ring.name)
    assert other.closed


def test_closed_endpoints(make_ring):
    ring = make_ring(capacity=4, slot_size=16)
    sub, pub = ring.subscriber(), ring.publisher()
    sub.close()
    pub.close()
    with pytest.raises(RingClosedError, match="publisher is closed"):
        pub.send(b"x")
    with pytest.raises(RingClosedError, match="subscriber is closed"):
        sub.recv(timeout=0)
    ring.detach()
    with pytest.raises(RingClosedError, match="detached"):
        ring.publisher()


def test_detach_refused_while_endpoints_open(make_ring):
    ring = make_ring(capacity=4, slot_size=16)
    sub = ring.subscriber()
    with pytest.raises(TensorbusError, match="open endpoint"):
        ring.detach()
    sub.close()
    ring.detach()


def test_cursor_and_publisher_limits(make_ring):
    ring = make_ring(capacity=4, slot_size=16, max_cursors=2, max_publishers=1)
    subs = [ring.subscriber(), ring.subscriber()]
    with pytest.raises(CapacityError, match="max_cursors"):
        ring.subscriber()
    pub = ring.publisher()
    with pytest.raises(CapacityError, match="max_publishers"):
        ring.publisher()
    subs[0].close()
    pub.close()
    ring.subscriber()  # freed entries are reused
    ring.publisher()


def test_closed_subscriber_stops_holding_back(make_ring):
    ring = make_ring(capacity=4, slot_size=16)
    slow, fast = ring.subscriber(), ring.subscriber()
    pub = ring.publisher(timeout=0)
    for _ in range(4):
        pub.send(b"x")
        fast.recv()
    with pytest.raises(BackpressureError):
        pub.send(b"x")
    slow.close()
    pub.send(b"x")


def test_stats(make_ring):
    ring = make_ring(capacity=8, slot_size=16, policy="overwrite")
    sub, pub = ring.subscriber(), ring.publisher()
    for _ in range(3):
        pub.send(b"x")
    sub.recv()
    stats = ring.stats()
    assert stats["head"] == 3 and stats["policy"] == "overwrite"
    (cursor,) = stats["cursors"]
    assert cursor["lag"] == 2 and cursor["received"] == 1
    assert stats["publishers"][0]["published"] == 3


def test_totals_keep_the_counts_of_freed_entries_until_reused(make_ring):
    ring = make_ring(capacity=8, slot_size=16)
    sub, pub = ring.subscriber(), ring.publisher()
    for _ in range(3):
        pub.send(b"abcd")
    sub.recv(), sub.recv()
    sub.close(), pub.close()  # both entries free, their counts still there
    head, cursors, records = ring.totals()
    assert head == 3
    (index, generation, active, lag, received, drops, latency) = cursors[0]
    assert (index, active, received, drops, sum(latency)) == (0, False, 2, 0, 2)
    assert records == [(0, os.getpid(), False, 3, 12, 0)]
    again = ring.subscriber()  # the entry is taken again: a new generation, zeroed
    _, (cursor,), _ = ring.totals()
    assert cursor[1] == generation + 1 and cursor[2] and cursor[4] == 0
    again.close()


def test_a_reclaimed_cursor_is_reported_not_silently_reused(make_ring):
    ring = make_ring(capacity=4, slot_size=16)
    sub = ring.subscriber()
    ring.stats()  # the entry is active
    raw = memoryview(ring.segment)
    cursor_state = 512 + 64  # first cursor entry, second line: state
    raw[cursor_state : cursor_state + 4] = (0).to_bytes(4, "little")  # freed under us
    raw.release()
    # Not `pytest.raises(...) as info`: the ExceptionInfo would keep this
    # frame, the ring and its endpoints in a reference cycle, and collecting
    # it at exit can unmap the segment before `newcomer` frees its cursor.
    try:
        sub.recv(timeout=1)
    except RingClosedError as exc:
        assert "evicted or reclaimed" in str(exc)
        assert not isinstance(exc, SlowConsumer)  # freed, not evicted
    else:
        pytest.fail("a read on a freed cursor returned")
    # Its entry was reused by a newcomer: closing the stale handle leaves it alone.
    newcomer = ring.subscriber()
    sub.close()
    assert [c["state"] for c in ring.stats()["cursors"]] == ["active"]
    ring.publisher().send(b"still delivered")
    assert newcomer.recv(timeout=1) == b"still delivered"


def test_an_evicted_cursor_raises_slow_consumer_which_is_a_ring_closed_error(make_ring):
    """ring.md: "its owner's next read raises SlowConsumer"."""
    ring = make_ring(capacity=4, slot_size=16)
    sub = ring.subscriber()
    ring.publisher().send(b"unread")
    (cursor,) = ring.stats()["cursors"]
    assert ring.evict_cursor(cursor["index"], cursor["generation"])
    with pytest.raises(SlowConsumer, match="evicted: it stayed too far behind"):
        sub.recv(timeout=1)
    assert issubclass(SlowConsumer, RingClosedError)  # older `except` clauses still catch it
    sub.close()


def test_a_reference_cycle_holding_a_ring_and_its_endpoints_is_collected_cleanly(make_ring):
    """The cyclic GC must not unmap the ring before its subscriber and
    publisher free their entries: that wrote into unmapped memory."""
    ring = make_ring(capacity=16, slot_size=64)
    code = (
        "import gc, sys\n"
        "from tensorbus._core import Ring\n"
        "ring = Ring.attach(sys.argv[1])\n"  # older than the cycle: the GC clears it first
        "class Holder: pass\n"
        "h = Holder(); h.self = h\n"
        "h.ring, h.sub, h.pub = ring, ring.subscriber(), ring.publisher()\n"
        "del ring, h\n"
        "gc.collect()\n"
        "print('collected')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, ring.name], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "collected", proc.stderr
    stats = ring.stats()
    assert stats["cursors"] == [] and stats["publishers"] == []  # both entries were freed
