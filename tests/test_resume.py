"""Sync clients outliving their broker (clients/reconnect.py): what a
client does when the daemon is killed, and what a successor answers to a
client resuming its session (broker/state.py)."""

import threading

import pytest

import tensorbus

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
