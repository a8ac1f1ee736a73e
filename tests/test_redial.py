"""Light clients over tcp keep their session: heartbeats that never wait
behind receiving threads, and (clients/redial.py) a new session and link
when the broker dies and a successor serves the same address."""

import socket
import threading

import pytest

import tensorbus

pytestmark = pytest.mark.timeout(40)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_of(d) -> str:
    return next(e for e in d.endpoints if e.startswith("tcp://"))


def client_links(url) -> list:
    with tensorbus.connect(url, name="probe") as c:
        return [link for link in c.stats()["broker"]["links"] if link["kind"] == "client"]


def test_heartbeats_do_not_wait_behind_receiving_threads(daemon_factory):
    """Four threads wait in recv on one light client's link: its heartbeats
    still reach the broker every period, so its session lives (they once
    shared one lock with the receivers and starved past 3 periods)."""
    d = daemon_factory("--tcp", "127.0.0.1:*", "--transport", "tcp", "--heartbeat", "0.4")
    with tensorbus.connect(d.url) as local, tensorbus.connect(tcp_of(d)) as remote:
        subs = [remote.subscribe("hb/>") for _ in range(4)]
        pub = local.publisher("hb/t")
        got = {}

        def read(sub):
            try:
                sub.recv(timeout=5)  # nothing comes: waits the whole time
            except tensorbus.ReceiveTimeout:
                got[sub] = "timeout"
            except Exception as exc:  # reported below
                got[sub] = exc

        threads = [threading.Thread(target=read, args=(sub,)) for sub in subs]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert list(got.values()) == ["timeout"] * 4
        [link] = client_links(d.url)
        assert link["state"] == "up" and link["for_s"] >= 5
        pub.send(b"still here")
        assert [bytes(sub.recv(timeout=5).data) for sub in subs] == [b"still here"] * 4
