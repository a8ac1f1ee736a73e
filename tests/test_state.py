"""The state a successor takes over (broker/state.py), without a daemon:
a registry's snapshot, loaded back and restored into a second registry on
the same segments, and what happens to a state that cannot be taken over."""

import contextlib
import os

import msgpack
import pytest

import tensorbus
from tensorbus._core import Arena, BellTable, Ring
from tensorbus.broker.config import BrokerConfig
from tensorbus.broker.registry import Registry
from tensorbus.broker.state import (
    StateError,
    condemn,
    load,
    open_segments,
    restore,
    save,
    snapshot,
)


@pytest.fixture
def first(tmp_path):
    instance = f"st{os.getpid()}"
    config = BrokerConfig(max_subscriptions=8, max_subscribers=4)
    bells = BellTable.create(config.max_subscriptions, str(tmp_path), instance=instance)
    arena = Arena.create(1 << 22, instance=instance)
    registry = Registry(config, instance, bells, arena, str(tmp_path))
    yield registry
    registry.close_all()
    with contextlib.suppress(Exception):
        arena.unlink()
    with contextlib.suppress(Exception):
        bells.segment.unlink()


def populated(reg):
    """A session with a publisher, a pattern subscription, a queue-group
    member and a private inbox."""
    s = reg.open_session(("sock", b"c1"), "ipc", "trainer", os.getpid(), 0.0)
    reg.open_publisher(s, {"topic": "grad/0"})
    sub = reg.subscribe(s, {"pattern": "grad/>"})
    member = reg.subscribe(s, {"pattern": "svc/ps", "group": "g"})
    reg.create_topic(s, {"topic": "_INBOX/x", "private": True})
    return s, sub, member


def test_a_snapshot_restores_every_record(first, tmp_path):
    s, sub, member = populated(first)
    path = str(tmp_path / "broker.sock.state")
    save(path, snapshot(first, str(tmp_path), [], {"takeovers": 0}))
    snap = load(path)
    bells, arena, fifo_dir = open_segments(snap)
    second = Registry(first.config, "st-next", bells, arena, fifo_dir)
    summary = restore(second, snap)
    assert summary["topics"] == 3 and summary["sessions"] == 1 and summary["lost_topics"] == []
    (orphan,) = second.sessions.values()
    assert orphan.key == ("adopted", s.id) and orphan.orphan and orphan.holder == s.holder
    assert orphan.publishing == {"grad/0": 1}
    back = orphan.subscriptions[sub["sub"]]
    assert back.pattern == "grad/>" and back.bell == sub["bell"]["index"]
    assert back.members == first.sessions[s.key].subscriptions[sub["sub"]].members
    g = second.groups[("svc/ps", "g")]
    assert orphan.subscriptions[member["sub"]] in g.members
    assert second.topics["_INBOX/x"].owner == s.id
    used = {sub["bell"]["index"], member["bell"]["index"]}
    assert not used & set(second.free_bells) and len(second.free_bells) == 8 - len(used)
    assert s.holder not in second.free_holders
    assert second.next_id == first.next_id
    # Resumed by its client on a new connection: the same records.
    second.resume(orphan, ("sock", b"new"))
    assert second.sessions[("sock", b"new")] is orphan and not orphan.orphan


def test_cursors_no_record_owns_are_freed(first, tmp_path):
    s, sub, _ = populated(first)
    topic = first.topics["grad/0"]
    stray = topic.ring.join_cursor(os.getpid())  # a reply the dead daemon never sent
    snap = snapshot(first, str(tmp_path), [], {})
    second = Registry(first.config, "st-next", first.bells, first.arena, str(tmp_path))
    summary = restore(second, snap)
    assert summary["cursors_freed"] == 1
    live = {(c["index"], c["generation"]) for c in topic.ring.stats()["cursors"]}
    assert stray not in live and set(second.topics["grad/0"].cursors) <= live


def test_a_state_of_another_release_or_corrupt_is_refused(tmp_path, first):
    path = str(tmp_path / "s")
    assert load(path) is None
    with open(path, "wb") as f:
        f.write(b"\x00not msgpack")
    with pytest.raises(StateError, match="corrupt"):
        load(path)
    snap = snapshot(first, str(tmp_path), [], {})
    save(path, {**snap, "version": 99})
    with pytest.raises(StateError, match="another release"):
        load(path)
    save(path, {**snap, "magic": "other"})
    with pytest.raises(StateError, match="not a tensorbus state"):
        load(path)
    with open(path, "wb") as f:
        f.write(msgpack.packb([1, 2]))
    with pytest.raises(StateError):
        load(path)


def test_condemned_rings_raise_broker_restarted(first, tmp_path):
    s, _, _ = populated(first)
    ring = first.topics["grad/0"].ring
    pub = ring.publisher(timeout=0.1)
    sub = ring.subscriber()
    pub.send(b"kept")
    assert condemn(snapshot(first, str(tmp_path), [], {})) == 3
    assert ring.close_reason == "restarted"
    with pytest.raises(tensorbus.BrokerRestarted, match="could not take this ring over"):
        pub.send(b"lost")
    assert bytes(sub.recv(timeout=1)) == b"kept"  # what was committed is still read
    with pytest.raises(tensorbus.BrokerRestarted):
        sub.recv(timeout=1)
    assert isinstance(tensorbus.BrokerRestarted("x"), tensorbus.BrokerUnavailable)
    sub.close()
    pub.close()


def test_condemn_closes_a_ring_of_another_layout_version(make_ring):
    ring = make_ring(capacity=4, slot_size=64)
    with memoryview(ring.segment) as mem:
        mem[8:12] = (99).to_bytes(4, "little")  # another release's layout
        assert Ring.condemn(ring.name)
        assert int.from_bytes(mem[192:196], "little") == 2  # TB_CLOSED_RESTARTED
        mem[8:12] = (3).to_bytes(4, "little")
    assert not Ring.condemn("tb-0-nosuch-ring.0")
