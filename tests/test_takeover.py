"""Surviving the daemon (broker/state.py, clients/reconnect.py): a daemon
killed with -9 and started again on the same socket, or a --standby that
got its lock, takes over the rings and sessions; clients resume by
themselves; what cannot be taken over is closed as "restarted" first."""

import asyncio
import grp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import pytest

import tensorbus
import tensorbus.aio
from tensorbus.broker.state import state_path
from tensorbus.cli import stats_table

pytestmark = pytest.mark.timeout(60)


def kill(daemon) -> None:
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()


def wait_resumed(client, pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while client.broker_pid != pid:
        assert time.monotonic() < deadline, "the client did not resume with the successor"
        time.sleep(0.01)


def seqs(sub, n: int) -> list[int]:
    out = []
    for _ in range(n):
        msg = sub.recv(timeout=5)
        out.append(int.from_bytes(bytes(msg.data), "little"))
        del msg
    return out


def test_restart_takes_over_rings_and_sessions(daemon_factory, tmp_path):
    first = daemon_factory()
    c = tensorbus.connect(first.url, spin_us=0)
    pub = c.publisher("r2/y", capacity=1024)
    sub = c.subscribe("r2/y")
    for i in range(300):
        pub.send(i.to_bytes(4, "little"))
    kill(first)
    for i in range(300, 600):  # the data plane goes on without the daemon
        pub.send(i.to_bytes(4, "little"))
    second = daemon_factory()
    wait_resumed(c, second.proc.pid)
    late = tensorbus.connect(second.url, spin_us=0)
    joined = late.subscribe("r2/y")
    for i in range(600, 700):
        pub.send(i.to_bytes(4, "little"))
    # Nothing lost, nothing twice, in order; and no split: the subscriber
    # that joined after the restart reads the old publisher's messages.
    assert seqs(sub, 700) == list(range(700))
    assert seqs(joined, 100) == list(range(600, 700))
    broker = c.stats()["broker"]
    assert broker["takeovers"] == 1 and broker["takeover"]["previous_pid"] == first.proc.pid
    assert broker["takeover"]["sessions"] == 1
    assert [t["name"] for t in c.topics()] == ["r2/y"]
    late.close()
    c.close()
    second.stop()
    assert not [n for n in os.listdir("/dev/shm") if f"-{first.instance}-" in n]
    assert not os.path.exists(state_path(second.ipc_path))


def test_standby_takes_over_when_the_primary_dies(daemon_factory):
    primary = daemon_factory()
    standby = daemon_factory("--standby", wait=False)
    c = tensorbus.connect(primary.url, spin_us=0)
    deadline = time.monotonic() + 10
    while c.stats()["broker"]["standby_pid"] != standby.proc.pid:
        assert time.monotonic() < deadline, "the standby never announced itself"
        time.sleep(0.05)
    assert f"role: primary, standby: pid {standby.proc.pid}, takeovers: 0" in stats_table(c.stats())
    pub = c.publisher("hot/x")
    sub = c.subscribe("hot/>")
    pub.send(b"before")
    kill(primary)
    standby.ready()
    wait_resumed(c, standby.proc.pid)
    pub.send(b"after")
    assert [bytes(m.data) for m in (sub.recv(timeout=5), sub.recv(timeout=5))] == [
        b"before",
        b"after",
    ]
    broker = c.stats()["broker"]
    assert broker["role"] == "primary" and broker["takeovers"] == 1
    assert broker["standby_pid"] is None
    assert f"takeovers: 1 (last from pid {primary.proc.pid}" in stats_table(c.stats())
    c.close()


def test_a_new_topic_after_the_restart_reaches_a_pattern_subscriber(daemon_factory):
    first = daemon_factory()
    c = tensorbus.connect(first.url, spin_us=0)
    sub = c.subscribe("p/>")
    kill(first)
    second = daemon_factory()
    # Created whether or not the client has resumed yet: an orphan session's
    # notices wait for it in the state.
    other = tensorbus.connect(second.url, spin_us=0)
    other.publisher("p/new").send(b"hello")
    msg = sub.recv(timeout=10)
    assert (msg.topic, bytes(msg.data)) == ("p/new", b"hello")
    del msg
    other.close()
    c.close()


def test_a_state_that_cannot_be_taken_over_closes_its_rings_as_restarted(daemon_factory):
    first = daemon_factory()
    c = tensorbus.connect(first.url, spin_us=0, reconnect=5)
    pub = c.publisher("old/t")
    sub = c.subscribe("old/t")
    pub.send(b"committed")
    kill(first)
    path = state_path(first.ipc_path)
    with open(path, "rb") as f:
        snap = msgpack.unpackb(f.read(), strict_map_key=False)
    snap["version"] = 999  # another release's state
    with open(path, "wb") as f:
        f.write(msgpack.packb(snap))
    second = daemon_factory()
    # Never silence: the old publisher hears it at once, the subscriber
    # once it has read what was committed, the client at its next call.
    with pytest.raises(tensorbus.BrokerRestarted, match="could not take"):
        pub.send(b"into the void")
    assert bytes(sub.recv(timeout=5).data) == b"committed"
    with pytest.raises(tensorbus.BrokerRestarted):
        sub.recv(timeout=5)
    with pytest.raises(tensorbus.BrokerRestarted, match="connect again"):
        c.stats()
    assert not [n for n in os.listdir("/dev/shm") if f"-{first.instance}-" in n]
    fresh = tensorbus.connect(second.url, spin_us=0)
    assert fresh.topics() == []
    fresh.close()
    c.close()


def test_reconnect_off_gives_the_old_error(daemon_factory):
    first = daemon_factory()
    c = tensorbus.connect(first.url, spin_us=0, reconnect=False)
    c.publisher("off/t")
    kill(first)
    second = daemon_factory()
    with pytest.raises(tensorbus.BrokerUnavailable, match="reconnect=0"):
        c.stats()
    # Its session stays an orphan in the successor, which still stops cleanly:
    # every segment and marker of both instances, and the state, are gone.
    assert second.stop() == 0
    c.close()
    left = [n for n in os.listdir("/dev/shm") if f"-{first.instance}-" in n]
    assert not left + [n for n in os.listdir("/dev/shm") if f"-{second.instance}-" in n]
    assert not os.path.exists(state_path(second.ipc_path))


def test_a_call_in_flight_is_retried_only_if_idempotent(daemon_factory):
    first = daemon_factory()
    c = tensorbus.connect(first.url, spin_us=0)
    first.proc.send_signal(signal.SIGSTOP)  # requests now wait in flight
    outcome = {}

    def call(name, fn):
        try:
            outcome[name] = fn()
        except Exception as exc:
            outcome[name] = exc

    # One at a time: the client serializes its requests.
    t = threading.Thread(target=call, args=("subscribe", lambda: c.subscribe("f/x")))
    t.start()
    time.sleep(0.3)
    kill(first)
    second = daemon_factory()
    t.join(10)
    assert isinstance(outcome["subscribe"], tensorbus.BrokerUnavailable)
    assert "cannot tell whether 'subscribe' was done" in str(outcome["subscribe"])
    second.proc.send_signal(signal.SIGSTOP)
    t = threading.Thread(target=call, args=("stats", c.stats))
    t.start()
    time.sleep(0.3)
    kill(second)
    third = daemon_factory()
    t.join(10)
    assert outcome["stats"]["broker"]["pid"] == third.proc.pid  # sent again, answered
    c.close()


def test_a_queue_group_serves_requests_across_a_restart(daemon_factory):
    first = daemon_factory()
    server = tensorbus.connect(first.url, spin_us=0)
    responder = server.respond("svc/echo", lambda req: bytes(req.data) * 2)
    client = tensorbus.connect(first.url, spin_us=0)
    assert bytes(client.request("svc/echo", b"a", timeout=5).data) == b"aa"
    kill(first)
    second = daemon_factory()
    wait_resumed(client, second.proc.pid)
    wait_resumed(server, second.proc.pid)
    assert bytes(client.request("svc/echo", b"b", timeout=5).data) == b"bb"
    responder.close()
    client.close()
    server.close()


def test_the_asyncio_client_resumes(daemon_factory):
    first = daemon_factory()

    async def main():
        c = await tensorbus.aio.connect(first.url)
        pub = await c.publisher("aio/t")
        sub = await c.subscribe("aio/t")
        await pub.send(b"1")
        kill(first)
        second = daemon_factory()
        await pub.send(b"2")
        got = [bytes((await sub.recv(timeout=5)).data) for _ in range(2)]
        deadline = time.monotonic() + 5
        while (await c.stats())["broker"]["pid"] != second.proc.pid:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        late = await tensorbus.aio.connect(second.url)
        joined = await late.subscribe("aio/t")
        await pub.send(b"3")
        got.append(bytes((await joined.recv(timeout=5)).data))
        await late.close()
        await c.close()
        return got

    assert asyncio.run(main()) == [b"1", b"2", b"3"]


SETPRIV = shutil.which("setpriv")
NOBODY = 65534
ORPHAN_CLIENT = """
import sys, time, tensorbus
c = tensorbus.connect(sys.argv[1], reconnect=False)
c.subscribe("metrics/>")
print("subscribed", flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(
    os.getuid() != 0 or SETPRIV is None, reason="needs root and setpriv to run as a second uid"
)
def test_an_orphan_session_keeps_its_permissions(daemon_factory):
    """A restricted user's session taken over but not resumed (it connected
    with reconnect=False) gets cursors only on topics its user may read."""
    base = tempfile.mkdtemp(prefix="tb-orphan-")
    os.chmod(base, 0o711)
    proc = None
    try:
        cfg = os.path.join(base, "tensorbus.toml")
        with open(cfg, "w") as f:
            f.write(
                f"""
[[users]]
name = "nobody"
uid = {NOBODY}
subscribe = {{ allow = ["metrics/>"], deny = ["metrics/secret/>"] }}
"""
            )
        group = grp.getgrgid(NOBODY).gr_name
        args = ("--config", cfg, "--ipc-group", group)
        first = daemon_factory(*args, path=Path(base))
        proc = subprocess.Popen(
            [SETPRIV, "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]
            + [sys.executable, "-u", "-c", ORPHAN_CLIENT, first.url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HOME": base},
        )
        assert proc.stdout.readline().strip() == "subscribed", proc.stderr.read()
        kill(first)
        second = daemon_factory(*args, path=Path(base))
        with tensorbus.connect(second.url, spin_us=0) as owner:
            owner.publisher("metrics/secret/key")
            owner.publisher("metrics/open/loss")
            subscribers = {t["name"]: t["subscribers"] for t in owner.topics("metrics/>")}
        assert subscribers == {"metrics/secret/key": 0, "metrics/open/loss": 1}
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(5)
            proc.stdout.close()
            proc.stderr.close()
        shutil.rmtree(base, ignore_errors=True)
