"""The control channel without I/O (clients/channel.py): no socket, no daemon."""

import pytest

from tensorbus.broker import protocol as P
from tensorbus.clients._shared import HELLO_PROBE_S
from tensorbus.clients.channel import ControlChannel
from tensorbus.clients.errors import BrokerUnavailable, ProtocolError, TopicError


class Sub:
    def __init__(self):
        self.notices = []

    def on_notice(self, kind, fields):
        self.notices.append((kind, fields))


def test_replies_match_requests_by_id_and_late_ones_are_dropped():
    ch = ControlChannel("ipc:///nowhere")
    first, frame = ch.request("list_topics", pattern=None)
    assert P.decode_request(frame).id == first == 1
    second, _ = ch.request("stats")
    answer = ch.receive(P.encode_reply(second, broker={}))
    assert answer.id == second and ch.result(answer) == {"broker": {}}
    ch.forget(first)  # timed out
    assert ch.receive(P.encode_reply(first, topics=[])) is None  # late: dropped
    assert ch.receive(P.encode_reply(second)) is None  # answered already


def test_an_error_without_an_id_goes_to_the_one_request_in_flight():
    ch = ControlChannel("ipc:///nowhere")
    only, _ = ch.request("create_topic", topic="x")
    answer = ch.receive(P.encode_error(None, "bad_topic", "no"))
    assert answer.id == only
    with pytest.raises(TopicError, match=r"no \[bad_topic\]"):
        ch.result(answer)
    ch.request("stats")
    ch.request("stats")
    assert ch.receive(P.encode_error(None, "internal", "?")) is None  # whose? nobody's


def test_notices_reach_their_subscription_and_shutdown_reaches_all():
    ch = ControlChannel("ipc:///nowhere")
    a, b = Sub(), Sub()
    ch.subscriptions.update({1: a, 2: b})
    assert ch.receive(P.encode_notice("evicted", sub=2, topic="t", reason="slow")) is None
    assert ch.receive(P.encode_notice("shutdown", reason="bye")) is None
    assert [k for k, _ in a.notices] == ["shutdown"]
    assert [k for k, _ in b.notices] == ["evicted", "shutdown"]
    with pytest.raises(ProtocolError, match="malformed"):
        ch.receive(b"\x01not msgpack")


def test_only_hello_probes_and_an_unanswered_request_names_the_broker():
    assert ControlChannel.wait_plan("stats", 5.0) == [(5.0, False)]
    assert ControlChannel.wait_plan("hello", 5.0) == [
        (HELLO_PROBE_S, True),
        (5.0 - HELLO_PROBE_S, False),
    ]
    err = ControlChannel("ipc:///x").unanswered("hello", 2)
    assert isinstance(err, BrokerUnavailable) and "ipc:///x within 2 s" in str(err)
