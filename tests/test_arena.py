"""The tensor arena on its own: geometry, the buddy allocator, loans, and
repair after a process dies holding the allocator's lock."""

import ctypes
import os
import random

import numpy as np
import pytest

from tensorbus._core import Arena, Loan, MessageTooLargeError, Ring, parse_size


@pytest.fixture
def make_arena():
    arenas = []

    def make(size="16MiB"):
        arena = Arena.create(size, instance=f"test{os.getpid()}")
        arenas.append(arena)
        return arena

    yield make
    for arena in arenas:
        try:
            arena.unlink()
        except Exception:
            pass


# The arena's metadata segment (docs/arena.md has the layout): the header's
# second 64-byte line is the allocator's mutex; block entry i (64 B, `holds`
# first) sits at 4096 + 64 * i.
MUTEX_OFFSET = 64
BLOCKS_OFFSET = 4096


def holds_of(arena: Arena, block: int) -> int:
    """The hold bitmap of ``block``, read from the shared metadata."""
    return int(np.frombuffer(arena.meta, np.uint64, 1, BLOCKS_OFFSET + 64 * block)[0])


def crash_holding_lock(arena: Arena) -> None:
    """Take the allocator's mutex and exit without releasing it: what a
    crash inside the allocator looks like."""
    header = (ctypes.c_char * BLOCKS_OFFSET).from_buffer(arena.meta)
    libc = ctypes.CDLL(None)
    assert libc.pthread_mutex_lock(ctypes.byref(header, MUTEX_OFFSET)) == 0
    os._exit(0)


def test_parse_size():
    assert parse_size("4GiB") == 4 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("64kib") == 64 << 10
    assert parse_size(12345) == 12345
    assert parse_size("1.5GiB") == 3 << 29
    for bad in ("lots", "-1", "4GiBs", ""):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)


def test_geometry_and_attach(make_arena):
    arena = make_arena("1GiB")
    assert arena.size == 1 << 30
    assert arena.block_size == 16384  # at most 65536 blocks of metadata
    assert arena.max_block == 1 << 30
    other = Arena.attach(*arena.names)
    assert other.size == arena.size and other.block_size == arena.block_size
    loan = arena.loan(100, owner=1)
    assert loan.capacity == 16384 and loan.offset % 4096 == 0
    assert holds_of(other, loan.block) == 1  # the owner bit, seen by another mapping
    other.close()


def test_small_arena_uses_pages(make_arena):
    arena = make_arena("3MiB")  # not a power of two: carved into 2 MiB + 1 MiB
    assert arena.block_size == 4096
    assert arena.max_block == 2 << 20
    a = arena.loan(2 << 20, owner=1)
    b = arena.loan(1 << 20, owner=1)
    assert a is not None and b is not None
    assert arena.loan(1, owner=1) is None  # full
    del a, b
    assert arena.stats()["used"] == 0


def test_buddy_split_merge_and_churn(make_arena):
    arena = make_arena("16MiB")
    rng = random.Random(7)
    live = []
    for _ in range(5000):
        if live and rng.random() < 0.5:
            live.pop(rng.randrange(len(live)))
        else:
            loan = arena.loan(rng.choice([1, 4096, 5000, 70000, 1 << 20, 3 << 20]), owner=1)
            if loan is not None:
                live.append(loan)
        # No two live blocks overlap.
        spans = sorted((x.offset, x.offset + x.capacity) for x in live)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    live.clear()
    st = arena.stats()
    assert st["used"] == 0
    assert st["largest_free"] == arena.size  # every split merged back
    assert st["allocs"] == st["frees"]


def test_lifo_reuse(make_arena):
    arena = make_arena("16MiB")
    a = arena.loan(1 << 20, owner=1)
    block = a.block
    a.cancel()
    assert arena.loan(1 << 20, owner=1).block == block  # the warm block again


def test_oversize_and_exhaustion(make_arena):
    arena = make_arena("4MiB")
    with pytest.raises(MessageTooLargeError, match="can never fit"):
        arena.loan(5 << 20, owner=1)
    whole = arena.loan(4 << 20, owner=1)
    assert arena.loan(4096, owner=1) is None
    assert arena.stats()["failed"] == 1
    del whole
    assert arena.loan(4096, owner=1) is not None


def test_loan_buffer_and_owner_cleanup(make_arena):
    arena = make_arena("4MiB")
    loan = arena.loan(1000, owner=5)
    assert isinstance(loan, Loan) and loan.open
    arr = np.ndarray((250,), dtype=np.float32, buffer=loan)
    arr[:] = 3.0
    assert arena.owned_by(5) == [(loan.block, loan.generation)]
    assert arena.owned_by(6) == []
    # The daemon's view of a dead owner: drop the loan's reference.
    assert arena.drop_owner(loan.block, loan.generation)
    assert not arena.drop_owner(loan.block, loan.generation)  # exactly once
    assert arena.stats()["used"] == 0


def test_release_holder_frees_blocks_held_last(make_arena):
    arena = make_arena("4MiB")
    loan = arena.loan(1000, owner=1)
    holder = arena.holder(3)
    assert repr(holder).startswith("<Holder slot=3")
    # A block whose only reference is holder 3's bit.
    from tensorbus._core.arena import MAX_HOLDERS

    assert MAX_HOLDERS == 63
    with pytest.raises(ValueError):
        arena.holder(0)
    with pytest.raises(ValueError):
        arena.holder(64)
    loan.cancel()
    assert arena.release_holder(3) == 0  # held nothing


def test_a_crash_inside_the_allocator_is_repaired(make_arena):
    arena = make_arena("16MiB")
    keep = [arena.loan(n, owner=1) for n in (4096, 1 << 20, 70000)]
    pid = os.fork()
    if pid == 0:
        child = Arena.attach(*arena.names)
        dying = child.loan(1 << 20, owner=2)  # an allocation of the dying process
        assert dying is not None
        crash_holding_lock(child)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    # The next locker finds the robust mutex's owner dead and rebuilds.
    loan = arena.loan(4096, owner=1)
    assert loan is not None
    st = arena.stats()
    assert st["repairs"] == 1
    spans = sorted((x.offset, x.offset + x.capacity) for x in [*keep, loan])
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    # The dead child's allocation is still owned (the daemon drops it by owner).
    owned = arena.owned_by(2)
    assert len(owned) == 1
    arena.drop_owner(*owned[0])
    keep.clear()
    del loan
    st = arena.stats()
    assert st["used"] == 0 and st["largest_free"] == arena.size


def test_realtime_arena_sends_without_readers_leave_nothing():
    arena = Arena.create("16MiB", instance="rv")
    try:
        holder = arena.holder(1)
        ring = Ring.create(capacity=2, slot_size=4096, policy="overwrite", instance="rv",
                           holder=holder)  # fmt: skip
        try:
            pub = ring.publisher()
            pub.inline_max = 0
            for _ in range(50):
                pub.send(np.ones(1000))
            ring.reclaim()
            # Nothing reads the ring: every block went back (overtaken sends,
            # never written, cancel theirs instead of leaking them).
            assert arena.stats()["used"] == 0
            assert arena.stats()["allocs"] == arena.stats()["frees"]
        finally:
            ring.unlink()
    finally:
        arena.unlink()
