"""Sync clients outliving their broker (clients/reconnect.py): what a
client does when the daemon is killed, and what a successor answers to a
client resuming its session (broker/state.py)."""

import os
import threading

import pytest
import zmq

import tensorbus
from tensorbus.broker import protocol as P
from tensorbus.clients.channel import ControlChannel

pytestmark = pytest.mark.timeout(60)


def _connect_watched(url, **kwargs):
    """A client, and the thread that watches its broker's pid."""
    before = set(threading.enumerate())
    client = tensorbus.connect(url, **kwargs)
    new = [t for t in threading.enumerate() if t not in before]
    (watcher,) = [t for t in new if t.name == "tensorbus-watch"]
    return client, watcher


def test_a_client_that_gave_up_on_its_broker_still_closes(daemon_factory):
    d = daemon_factory()
    client, watcher = _connect_watched(d.url, reconnect=0)
    d.proc.kill()
    d.proc.wait(10)
    watcher.join(10)  # it saw the death, gave up (reconnect=0) and ended
    assert not watcher.is_alive()
    with pytest.raises(tensorbus.BrokerUnavailable, match="reconnect=0"):
        client.topics()
    client.close()  # raised BrokenPipeError: nobody read the watcher's wake-up pipe
    assert client.closed
    daemon_factory()  # takes the dead one's segments over, and removes them when stopped


def _dealer(url) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    return sock


def _ask(sock, channel, frame) -> dict:
    """Send a request built by ``channel``; its reply's fields."""
    sock.send(frame)
    assert sock.poll(10_000), "no reply"
    return channel.result(channel.receive(sock.recv()))


def _resume_request(channel, session) -> bytes:
    """A resume as a client sends it: its channel numbers its requests."""
    fields = {"name": "resumer", "pid": os.getpid(), "protocol": P.PROTOCOL_VERSION}
    return channel.request("hello", **fields, resume=session)[1]


@pytest.fixture
def taken_over(daemon_factory):
    """(successor, id of a session it took over from a daemon killed with -9)."""
    primary = daemon_factory()
    client = tensorbus.connect(primary.url, reconnect=0)  # it leaves the resuming to the test
    primary.proc.kill()
    primary.proc.wait(10)
    yield daemon_factory(), client._session
    client.close()


def test_a_resume_whose_reply_was_lost_may_be_sent_again(taken_over):
    """A client that got no reply to its resume in time sends it again on a
    new connection; a successor that did resume the session the first time
    (its reply went to the connection given up on) resumes it again: it
    answered session_lost, and the client gave up on a live session."""
    successor, session = taken_over
    channel = ControlChannel(successor.url)
    replies = []
    for _ in range(2):
        sock = _dealer(successor.url)
        replies.append(_ask(sock, channel, _resume_request(channel, session)))
        sock.close(0)
    assert all(r["resumed"] and r["session"] == session for r in replies)
    with tensorbus.connect(successor.url) as other:
        assert other.stats()["broker"]["sessions"] == 2  # the resumed one, and other
    sock = _dealer(successor.url)
    with pytest.raises(tensorbus.BrokerRestarted, match="cannot be resumed"):
        _ask(sock, channel, _resume_request(channel, session + 100))  # not this process's
    sock.close(0)


def test_a_stale_resume_cannot_take_the_session_back(taken_over):
    """Two resumes of one client cross: the older, arriving last, must not
    move the session to the connection its client gave up on."""
    successor, session = taken_over
    channel = ControlChannel(successor.url)
    older, newer = _resume_request(channel, session), _resume_request(channel, session)
    given_up, current = _dealer(successor.url), _dealer(successor.url)
    try:
        assert _ask(current, channel, newer)["resumed"]
        with pytest.raises(tensorbus.BrokerRestarted, match="cannot be resumed"):
            _ask(given_up, channel, older)
        _, stats = channel.request("stats")
        assert _ask(current, channel, stats)["broker"]["pid"] == successor.proc.pid
    finally:
        given_up.close(0)
        current.close(0)
