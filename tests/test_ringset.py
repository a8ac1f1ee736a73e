"""The bell table and the ring set (one subscription over several rings),
without a broker: the core pieces the broker hands out."""

import os
import select
import threading
import time

import pytest

from tensorbus._core import BellTable, ReceiveTimeout, RingSet, SlowConsumer, Subscriber

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def bells(tmp_path):
    table = BellTable.create(8, str(tmp_path), instance=f"test{os.getpid()}")
    yield table
    table.segment.unlink()


@pytest.fixture
def rings(make_ring, bells):
    def make(policy="block", capacity=8):
        return make_ring(capacity=capacity, slot_size=64, policy=policy, bells=bells)

    return make


def member(ring, bell, latest=False):
    cursor, generation = ring.join_cursor(os.getpid(), bell=bell + 1, latest=latest)
    return Subscriber(ring, cursor=cursor, generation=generation)


def test_one_bell_wakes_a_waiter_for_every_ring(bells, rings):
    a, b = rings(), rings()
    rs = RingSet(bells, 3)
    rs.add("a", member(a, 3))
    rs.add("b", member(b, 3))
    pub = b.publisher()

    def later():
        time.sleep(0.2)  # long enough for the ring set to be asleep on the futex
        pub.send(b"from b")

    t = threading.Thread(target=later)
    t.start()
    msg = rs.recv(timeout=5)
    t.join()
    assert (msg.topic, bytes(msg.data), msg.seq) == ("b", b"from b", 0)
    with pytest.raises(ReceiveTimeout):
        rs.recv(timeout=0.05)
    rs.close()


def test_members_are_read_round_robin_and_in_order(bells, rings):
    a, b = rings(), rings()
    rs = RingSet(bells, 0)
    rs.add("a", member(a, 0))
    rs.add("b", member(b, 0))
    for i in range(3):
        a.publisher().send(b"a%d" % i)
        b.publisher().send(b"b%d" % i)
    got = [bytes(m.data) for m in rs.take(10)]
    assert got == [b"a0", b"b0", b"a1", b"b1", b"a2", b"b2"]
    rs.close()


def test_a_notice_interrupts_the_wait(bells, rings):
    rs = RingSet(bells, 1)
    rs.add("a", member(rings(), 1))
    threading.Timer(0.1, bells.notify, args=(1,)).start()
    assert rs.recv(timeout=5) is None
    assert rs.notice() is True and rs.notice() is False
    rs.close()


def test_an_eviction_after_some_messages_keeps_them(bells, rings):
    a, b = rings(), rings()
    rs = RingSet(bells, 2)
    rs.add("a", member(a, 2))
    rs.add("b", member(b, 2))
    a.publisher().send(b"kept")
    cursor = a.cursor_lags()[0][:2]
    b_cursor = b.cursor_lags()[0][:2]
    assert b.evict_cursor(*b_cursor)
    assert [bytes(m.data) for m in rs.take(10)] == [b"kept"]
    with pytest.raises(SlowConsumer):
        rs.take(10)
    assert a.free_cursor(*cursor)


def test_latest_reader_gets_the_current_value_then_only_newer(bells, rings):
    ring = rings("overwrite", capacity=4)
    pub = ring.publisher()
    for i in range(3):
        pub.send(bytes([i]))
    rs = RingSet(bells, 4)
    rs.add("p", member(ring, 4, latest=True))
    assert rs.recv(timeout=1).data[0] == 2
    for i in range(3, 10):
        pub.send(bytes([i]))
    assert [m.data[0] for m in rs.take(10)] == [9]
    rs.close()


def test_fifo_bell_is_written_only_while_armed(bells, rings, tmp_path):
    generation = bells.setup(5, "fifo", os.getpid())
    path = bells.fifo_path(5, generation)
    os.mkfifo(path, 0o600)
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    try:
        ring = rings()
        rs = RingSet(bells, 5)
        rs.add("a", member(ring, 5))
        pub = ring.publisher()
        pub.send(b"unarmed")  # nobody announced a sleep: no byte written
        assert select.select([fd], [], [], 0.05)[0] == []
        assert rs.arm() is False  # something is there already: poll, do not sleep
        assert bytes(rs.poll().data) == b"unarmed"
        assert rs.arm() is True
        pub.send(b"armed")
        assert select.select([fd], [], [], 2)[0] == [fd]
        rs.disarm()
        assert os.read(fd, 16) == b"\x01"
        assert bytes(rs.poll().data) == b"armed"
        rs.close()
    finally:
        os.close(fd)


def test_a_group_head_is_looked_at_and_claimed_at_one_position_only(bells, rings, tmp_path):
    ring = rings()
    cursor, generation = ring.join_cursor(os.getpid(), bell=8, group=True)
    generation_bell = bells.setup(7, "both", os.getpid())
    path = bells.fifo_path(7, generation_bell)
    os.mkfifo(path, 0o600)
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    try:
        bridge = RingSet(bells, 7)  # the bridge's membership
        bridge.add("svc", Subscriber(ring, cursor=cursor, generation=generation))
        other = Subscriber(ring, cursor=cursor, generation=generation)  # a local member
        assert bridge.group_head() is None
        assert bridge.arm() is True
        pub = ring.publisher()
        pub.send(b"one", flags=1)
        assert select.select([fd], [], [], 2)[0] == [fd]  # a both-ways bell rings the FIFO
        bridge.disarm()
        pub.send(b"two")
        position, flags, publisher = bridge.group_head()
        assert flags & 0xFF == 1 and publisher == pub.index
        assert bridge.group_head() == (position, flags, publisher)  # looked at, not taken
        assert other.recv(timeout=1) == b"one"  # a member claims it first...
        assert bridge.claim_at(position) is None  # ...so it is not the bridge's, nor is "two"
        assert bridge.group_head()[0] == position + 1
        assert bytes(bridge.claim_at(position + 1).data) == b"two"
        assert bridge.group_head() is None
        bridge.close()
        other.close()
    finally:
        os.close(fd)


def test_a_cursor_of_another_bell_is_refused(bells, rings):
    rs = RingSet(bells, 6)
    with pytest.raises(ValueError, match="does not name bell 6"):
        rs.add("a", member(rings(), 7))


def test_spin_any_sees_a_message_or_gives_up(bells, rings):
    from tensorbus._core import Waiter
    from tensorbus._core.ringset import spin_any

    ring = rings()
    rs = RingSet(bells, 7)
    rs.add("t", member(ring, 7))
    other = RingSet(bells, 6)
    waiter = Waiter(1000, max_spinners=8)
    assert spin_any([rs, other], waiter, 200) == 0  # nothing came within 200 us
    ring.publisher().send(b"x")
    assert spin_any([other, rs], waiter, 200) == 1  # a message in any of them
    assert spin_any([rs], Waiter(1000, max_spinners=0), 200) == 1  # ready: no spin needed
    rs.take(1)
    assert spin_any([rs], Waiter(1000, max_spinners=0), 200) == -1  # no spare core: no spin
    with pytest.raises(ValueError, match="at most 4"):
        spin_any([rs] * 5, waiter, 1)
