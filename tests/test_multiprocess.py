"""Several processes on one ring: stress with checksums, wake-ups across
processes, idle cost, and recovery from processes killed with SIGKILL."""

import os
import signal
import struct
import time

import pytest

from tensorbus._core import Ring
from tensorbus._core.ring import _layout

import workers
from conftest import SPAWN

PUBLISHERS = 2
SUBSCRIBERS = 2
PER_PUBLISHER = 500_000  # 1 M messages in all, each seen by both subscribers


def run_stress(make_ring, procs, policy, idle_timeout):
    ring = make_ring(capacity=1024, slot_size=256, policy=policy)
    ready, go, out = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
    for i in range(SUBSCRIBERS):
        procs(
            workers.stress_subscriber,
            ring.name,
            i,
            PUBLISHERS * PER_PUBLISHER,
            ready,
            out,
            idle_timeout,
        )
    for i in range(PUBLISHERS):
        procs(workers.stress_publisher, ring.name, i, PER_PUBLISHER, 200, ready, go, out)
    for _ in range(PUBLISHERS + SUBSCRIBERS):
        ready.get(timeout=60)
    go.set()
    results = [out.get(timeout=240) for _ in range(PUBLISHERS + SUBSCRIBERS)]
    pubs = [r for r in results if r[0] == "pub"]
    subs = [r for r in results if r[0] == "sub"]
    return ring, pubs, subs


@pytest.mark.timeout(300)
def test_block_stress_every_message_in_order_gap_free(make_ring, procs):
    ring, pubs, subs = run_stress(make_ring, procs, "block", idle_timeout=30)
    assert sorted(p[2] for p in pubs) == [PER_PUBLISHER] * PUBLISHERS
    for _, sub_id, received, corrupt, gaps, reorders, drops, last in subs:
        assert (received, corrupt, gaps, reorders, drops) == (
            PUBLISHERS * PER_PUBLISHER,
            0,
            0,
            0,
            0,
        ), f"subscriber {sub_id}"
        assert last == {i: PER_PUBLISHER - 1 for i in range(PUBLISHERS)}
    assert ring.head == PUBLISHERS * PER_PUBLISHER


@pytest.mark.timeout(300)
def test_overwrite_stress_never_returns_a_torn_message(make_ring, procs):
    ring, pubs, subs = run_stress(make_ring, procs, "overwrite", idle_timeout=2)
    published = sum(p[2] + p[3] for p in pubs)
    assert published == PUBLISHERS * PER_PUBLISHER == ring.head
    for _, sub_id, received, corrupt, _gaps, reorders, drops, _ in subs:
        assert corrupt == 0, f"subscriber {sub_id} got {corrupt} torn messages"
        assert reorders == 0
        assert received > 0
        # Every sequence was either delivered or counted as dropped.
        assert received + drops == ring.head, f"subscriber {sub_id}"


def test_sleeping_subscriber_is_woken_by_another_process(make_ring, procs):
    ring = make_ring(capacity=16, slot_size=64)
    ready, out = SPAWN.Queue(), SPAWN.Queue()
    procs(workers.sleepy_subscriber, ring.name, ready, out, 30.0)
    ready.get(timeout=30)
    time.sleep(0.3)  # long past the spin: the subscriber sleeps in the futex
    assert ring.stats()["cursors"][0]["state"] == "active"
    ring.publisher().send(b"wake up")
    kind, msg, _ = out.get(timeout=10)
    assert (kind, msg) == ("msg", b"wake up")


def test_close_wakes_a_sleeping_subscriber(make_ring, procs):
    ring = make_ring(capacity=16, slot_size=64)
    ready, out = SPAWN.Queue(), SPAWN.Queue()
    procs(workers.sleepy_subscriber, ring.name, ready, out, 30.0)
    ready.get(timeout=30)
    time.sleep(0.3)
    ring.close()
    kind, _, waited = out.get(timeout=10)
    assert kind == "closed" and waited < 10


def test_idle_subscriber_sleeps_instead_of_spinning(make_ring, procs):
    ring = make_ring(capacity=16, slot_size=64)
    out = SPAWN.Queue()
    procs(workers.idle_cpu, ring.name, 1.0, out)
    cpu = out.get(timeout=30)
    # A busy-wait would burn ~1 CPU second; spin-then-sleep burns a few ms.
    assert cpu < 0.25, f"an idle subscriber used {cpu:.3f} CPU seconds in 1 s"


def test_killed_subscriber_releases_its_credit(make_ring, procs):
    ring = make_ring(capacity=8, slot_size=16)
    ready = SPAWN.Queue()
    child = procs(workers.joined_subscriber_then_sleep, ring.name, ready)
    ready.get(timeout=30)
    pub = ring.publisher(timeout=0)
    for _ in range(8):
        pub.send(b"x")
    child.kill()
    child.join(5)
    # The full ring now waits on a dead cursor; the publisher's stalled wait
    # repairs it instead of waiting forever.
    pub.send(b"after the death", timeout=10)
    assert ring.stats()["cursors"] == []


def dead_pid():
    p = SPAWN.Process(target=os.getpid)
    p.start()
    p.join(10)
    return p.pid


def fake_dead_claim(ring, policy):
    """Leave the segment exactly as a publisher killed between claim and
    commit leaves it: a CLAIMED record of a dead pid, the head past it and,
    on an overwrite ring, the slot marked as being written."""
    layout = _layout(ring.capacity, ring.slot_size, 64, 64)
    raw = memoryview(ring.segment)
    seq = ring.head
    record = layout["publishers_offset"] + 5 * 64
    struct.pack_into("<IIq", raw, record, 3, dead_pid(), seq)  # TB_PUB_CLAIMED
    struct.pack_into("<I", raw, 200, 6)  # publisher_hwm covers record 5
    struct.pack_into("<q", raw, 128, seq + 1)  # the head moved past the claim
    if policy == "overwrite":
        slot = layout["slots_offset"] + (seq % ring.capacity) * layout["stride"]
        struct.pack_into("<q", raw, slot, seq | (1 << 62))
    raw.release()
    return seq


@pytest.mark.parametrize("policy", ["block", "overwrite"])
def test_dead_publishers_claim_is_padded(make_ring, policy):
    ring = make_ring(capacity=8, slot_size=16, policy=policy)
    sub, pub = ring.subscriber(), ring.publisher()
    pub.send(b"before")
    fake_dead_claim(ring, policy)
    pub.send(b"after")
    assert sub.recv(timeout=5) == b"before"
    assert sub.recv(timeout=5) == b"after"  # the hole was padded, not waited on forever
    if policy == "overwrite":
        for i in range(20):  # the repaired slot is writable again on the next laps
            pub.send(bytes([i]))
        assert pub.dropped == 0
    assert ring.stats()["publishers"] == [
        s for s in ring.stats()["publishers"] if s["pid"] == os.getpid()
    ]


def looping_publisher(name, ready):
    ring = Ring.attach(name)
    pub = ring.publisher(timeout=60)
    ready.put(os.getpid())
    i = 0
    while True:
        pub.send(i.to_bytes(8, "little") * 4)
        i += 1


@pytest.mark.timeout(120)
def test_publisher_killed_mid_stream_never_wedges_the_ring(make_ring, procs):
    ring = make_ring(capacity=64, slot_size=64)
    sub = ring.subscriber()
    for attempt in range(4):
        ready = SPAWN.Queue()
        child = procs(looping_publisher, ring.name, ready)
        ready.get(timeout=30)
        deadline = time.monotonic() + 0.05 + 0.05 * attempt
        while time.monotonic() < deadline:  # drain while it publishes
            sub.try_recv()
        child.kill()
        child.join(5)
        # Whatever the kill interrupted, everything claimed is readable
        # (a dead claim is padded after a stall) and nothing is torn.
        while sub.lag:
            msg = sub.recv(timeout=10)
            assert len(msg) == 32 and msg[:8] * 4 == msg
        sentinel = b"sentinel %d" % attempt
        ring.publisher(timeout=10).send(sentinel)
        assert sub.recv(timeout=10) == sentinel


def test_ctrl_c_interrupts_a_blocked_recv(make_ring, procs):
    ring = make_ring(capacity=16, slot_size=64)
    ready, out = SPAWN.Queue(), SPAWN.Queue()
    procs(workers.interruptible_subscriber, ring.name, ready, out)
    pid = ready.get(timeout=30)
    time.sleep(0.3)
    os.kill(pid, signal.SIGINT)
    kind, _ = out.get(timeout=10)
    assert kind == "interrupted"
