"""Shared-memory segments and ring headers: naming, permissions, lifecycle,
and the checks attach() makes before trusting a segment."""

import os
import stat
import struct

import pytest

from tensorbus._core import (
    LayoutMismatchError,
    Ring,
    Segment,
    SegmentNameError,
    SegmentNotFoundError,
    segment_name,
)


def test_create_is_0600_and_unlink_removes_it():
    name = segment_name(f"test{os.getpid()}", "seg")
    seg = Segment.create(name, 8192)
    try:
        mode = os.stat(seg.path).st_mode
        assert stat.S_IMODE(mode) == 0o600
        assert os.stat(seg.path).st_size == 8192
    finally:
        seg.unlink()
    assert not os.path.exists(seg.path)
    seg.close()


def test_names_are_unguessable_and_checked():
    a, b = segment_name(), segment_name()
    assert a != b and a.startswith(f"tb-{os.getuid()}-")
    for bad in ["", "x", "/tb-0-a-b", "tb-0-a-b/../c", "tb-x-a-b", "tb-0-a-" + "z" * 300]:
        with pytest.raises(SegmentNameError, match="not a tensorbus segment name"):
            Segment.attach(bad)


def test_attach_missing_segment():
    with pytest.raises(SegmentNotFoundError, match="no shared-memory segment"):
        Segment.attach(segment_name())
    with pytest.raises(SegmentNotFoundError):
        Ring.attach(segment_name())


def test_attach_shares_memory_and_only_creator_unlinks():
    seg = Segment.create(segment_name(f"test{os.getpid()}"), 4096)
    try:
        other = Segment.attach(seg.name)
        memoryview(seg)[10] = 42
        assert memoryview(other)[10] == 42
        with pytest.raises(OSError, match="only its creator unlinks"):
            other.unlink()
        other.close()
    finally:
        seg.unlink()
        seg.close()


def test_close_refused_while_views_live():
    seg = Segment.create(segment_name(f"test{os.getpid()}"), 4096)
    view = memoryview(seg)
    with pytest.raises(BufferError, match="exported"):
        seg.close()
    view.release()
    seg.close()
    assert seg.closed
    seg.unlink()


def test_ring_segment_is_0600_and_gone_after_unlink(make_ring):
    ring = make_ring(capacity=16, slot_size=64)
    path = ring.segment.path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    ring.unlink()
    assert not os.path.exists(path)


def test_attach_rejects_a_segment_that_is_not_a_ring():
    seg = Segment.create(segment_name(f"test{os.getpid()}"), 8192)
    try:
        memoryview(seg)[:8] = b"notaring"
        with pytest.raises(LayoutMismatchError, match="not a tensorbus ring"):
            Ring.attach(seg.name, init_timeout=0.01)
    finally:
        seg.unlink()
        seg.close()


def test_attach_rejects_a_tiny_segment():
    seg = Segment.create(segment_name(f"test{os.getpid()}"), 16)
    try:
        with pytest.raises(LayoutMismatchError, match="too small"):
            Ring.attach(seg.name)
    finally:
        seg.unlink()
        seg.close()


@pytest.mark.parametrize(
    "offset, fmt, value, message",
    [
        (8, "<I", 99, "layout version 99"),
        (12, "<I", 7, "unknown policy"),
        (16, "<I", 12, "not a power of two"),
        (20, "<I", 8, "does not match"),
        (40, "<Q", 1 << 20, "does not match|header says"),
    ],
)
def test_attach_rejects_an_inconsistent_header(make_ring, offset, fmt, value, message):
    ring = make_ring(capacity=16, slot_size=64)
    raw = Segment.attach(ring.name)
    struct.pack_into(fmt, memoryview(raw), offset, value)
    raw.close()
    with pytest.raises(LayoutMismatchError, match=message):
        Ring.attach(ring.name)
