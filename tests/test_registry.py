"""The registry on its own: no ZeroMQ, no event loop, real segments."""

import contextlib
import os

import pytest

from tensorbus._core import Arena, BellTable
from tensorbus.broker import protocol as P
from tensorbus.broker.bridge_view import BridgeView
from tensorbus.broker.config import BrokerConfig
from tensorbus.broker.registry import Registry
from tensorbus.broker.topics import TopicNameError


@pytest.fixture
def reg(tmp_path):
    instance = f"reg{os.getpid()}"
    config = BrokerConfig(max_subscriptions=8, max_topics=6, max_subscribers=4)
    bells = BellTable.create(config.max_subscriptions, str(tmp_path), instance=instance)
    arena = Arena.create(1 << 22, instance=instance)
    notices, interest = [], []
    registry = Registry(
        config,
        instance,
        bells,
        arena,
        str(tmp_path),
        notify=lambda sub, kind, fields: notices.append((sub.id, kind, fields)),
        interest=lambda: interest.append(1),
    )
    registry.notices, registry.interest_calls = notices, interest
    yield registry
    for session in list(registry.sessions.values()):
        registry.drop_session(session)
    registry.close_all()
    with contextlib.suppress(Exception):
        arena.unlink()
    with contextlib.suppress(Exception):
        bells.segment.unlink()


def session(reg, n=1, transport="ipc"):
    return reg.open_session(("sock", b"c%d" % n), transport, f"client{n}", os.getpid(), 0.0)


def code_of(call, *args):
    with pytest.raises(P.ProtocolViolation) as info:
        call(*args)
    return info.value.code


def test_create_topic_then_the_same_options_again(reg):
    s = session(reg)
    topic, created = reg.create_topic(s, {"topic": "a/b", "capacity": 16})
    assert created and topic.info()["capacity"] == 16 and topic.qos == "reliable"
    again, created = reg.create_topic(s, {"topic": "a/b"})
    assert again is topic and not created
    assert code_of(reg.create_topic, s, {"topic": "a/b", "capacity": 32}) == "topic_conflict"


@pytest.mark.parametrize(
    "fields",
    [{"qos": "lossy"}, {"capacity": 6}, {"capacity": 1 << 25}, {"slot_size": 0}],
)
def test_bad_options(reg, fields):
    assert code_of(reg.create_topic, session(reg), {"topic": "t", **fields}) == "bad_option"


def test_topic_limit_and_names(reg):
    s = session(reg)
    for i in range(reg.config.max_topics):
        reg.create_topic(s, {"topic": f"t{i}", "capacity": 2, "slot_size": 64})
    assert code_of(reg.create_topic, s, {"topic": "one/more"}) == "capacity"
    assert code_of(reg.open_publisher, s, {"topic": "$sys/x"}) == "read_only_topic"
    with pytest.raises(TopicNameError):
        reg.create_topic(s, {"topic": "a//b"})


def test_subscribe_attaches_existing_and_new_topics(reg):
    s = session(reg)
    reg.create_topic(s, {"topic": "grad/0"})
    reply = reg.subscribe(s, {"pattern": "grad/*"})
    assert [m["topic"]["name"] for m in reply["members"]] == ["grad/0"]
    assert reply["bell"]["kind"] == "futex" and reg.interest_calls
    reg.create_topic(s, {"topic": "grad/1"})
    reg.create_topic(s, {"topic": "other"})
    assert [(kind, f["topic"]["name"]) for _, kind, f in reg.notices] == [("attach", "grad/1")]
    sub = s.subscriptions[reply["sub"]]
    assert set(sub.members) == {"grad/0", "grad/1"}
    assert len(reg.topics["grad/1"].cursors) == 1


def test_unsubscribe_frees_cursors_and_bells(reg):
    s = session(reg)
    reg.create_topic(s, {"topic": "x"})
    free = len(reg.free_bells)
    reply = reg.subscribe(s, {"pattern": "x", "mode": "async"})
    fifo = reply["bell"]["fifo"]
    assert os.path.exists(fifo) and len(reg.free_bells) == free - 1
    reg.unsubscribe(s, reply["sub"])
    assert not reg.topics["x"].cursors and len(reg.free_bells) == free
    assert not os.path.exists(fifo)
    assert code_of(reg.unsubscribe, s, reply["sub"]) == "no_such_subscription"


def test_bells_run_out(reg):
    s = session(reg)
    for _ in range(reg.config.max_subscriptions):
        reg.subscribe(s, {"pattern": "p/>"})
    assert code_of(reg.subscribe, s, {"pattern": "p/>"}) == "capacity"
    reg.drop_session(s)
    assert len(reg.free_bells) == reg.config.max_subscriptions


def test_tcp_sessions_neither_publish_nor_subscribe(reg):
    s = session(reg, transport="tcp")
    assert s.holder == 0
    assert code_of(reg.subscribe, s, {"pattern": "a"}) == "not_local"
    assert code_of(reg.open_publisher, s, {"topic": "a"}) == "not_local"


def test_publishers_are_counted_per_session(reg):
    s = session(reg)
    reg.open_publisher(s, {"topic": "a"})
    reg.open_publisher(s, {"topic": "a"})
    reg.close_publisher(s, "a")
    reg.close_publisher(s, "a")
    assert code_of(reg.close_publisher, s, "a") == "no_such_topic"


def test_a_reply_inbox_goes_with_its_session(reg):
    owner, other = session(reg, 1), session(reg, 2)
    assert code_of(reg.create_topic, owner, {"topic": "_inbox/q"}) == "bad_topic"
    reg.create_topic(owner, {"topic": "_inbox/q", "private": True})
    assert code_of(reg.create_topic, other, {"topic": "_inbox/q", "private": True}) == (
        "topic_conflict"
    )
    reply = reg.subscribe(other, {"pattern": "_inbox/q"})
    reg.drop_session(owner)
    assert "_inbox/q" not in reg.topics
    assert not other.subscriptions[reply["sub"]].members
    assert code_of(reg.open_publisher, other, {"topic": "_inbox/q"}) == "no_such_topic"


def test_a_queue_group_shares_one_cursor_and_bell(reg):
    a, b = session(reg, 1), session(reg, 2)
    free = len(reg.free_bells)
    ra = reg.subscribe(a, {"pattern": "svc", "group": "g"})
    rb = reg.subscribe(b, {"pattern": "svc", "group": "g"})
    assert ra["members"] == rb["members"] and ra["bell"] == rb["bell"]
    assert len(reg.free_bells) == free - 1 and reg.local_patterns() == set()
    reg.unsubscribe(a, ra["sub"])
    assert ("svc", "g") in reg.groups
    reg.unsubscribe(b, rb["sub"])
    assert ("svc", "g") not in reg.groups and len(reg.free_bells) == free
    assert not reg.topics["svc"].cursors
    reg.create_topic(a, {"topic": "fast", "qos": "realtime"})
    assert code_of(reg.subscribe, a, {"pattern": "fast", "group": "g"}) == "bad_option"
    assert code_of(reg.subscribe, a, {"pattern": "svc", "group": "g", "mode": "async"}) == (
        "bad_option"
    )


def test_holder_slots_are_released_or_kept(reg):
    free = len(reg.free_holders)
    s = session(reg)
    slot = s.holder
    assert slot and len(reg.free_holders) == free - 1
    assert reg.drop_session(s, keep_holder=True) == slot
    assert slot not in reg.free_holders
    reg.release_holder(slot)
    assert len(reg.free_holders) == free
    t = session(reg, 2)
    assert reg.drop_session(t) == 0 and t.holder == 0


def test_the_bridge_view(reg):
    view = BridgeView(reg)
    s = session(reg)
    reg.create_topic(s, {"topic": "grad/0"})
    attached = []
    sub, bell = view.open_subscription(
        lambda name: name.startswith("grad/"),
        lambda sub, topic, cursor, generation: attached.append(topic.name),
    )
    assert os.path.exists(bell["fifo"]) and not attached
    view.refresh_subscription(sub)
    reg.create_topic(s, {"topic": "grad/1"})
    assert attached == ["grad/0", "grad/1"] and not reg.notices
    view.drop_cursor(sub, "grad/0")
    assert not reg.topics["grad/0"].cursors
    assert view.topic("grad/1") is reg.topics["grad/1"] and view.topic("nope") is None
    made = view.bridge_topic("from/peer", {"qos": "realtime", "capacity": 8})
    assert made.qos == "realtime" and view.bridge_topic("from/peer", {}) is made
    with pytest.raises(ValueError):
        view.bridge_topic("_inbox/x", {})
    with pytest.raises(ValueError):
        view.bridge_topic("$sys/x", {})
    assert view.session_alive(s.key) and not view.session_alive(("gone", b""))
    view.close_subscription(sub)
    assert not reg.bridge_subs and not reg.topics["grad/1"].cursors
    with pytest.raises(AttributeError):
        view.sessions  # noqa: B018 - the view shows nothing else
