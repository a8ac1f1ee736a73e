"""Links across a daemon's death. Light clients over tcp keep their
session: heartbeats that never wait behind receiving threads, and
(clients/redial.py) a new session and link when the broker is killed -9
and a successor serves the same address. Bridged daemons: a peer killed
-9 and restarted on the same socket (taking over its state) is relinked,
and messages flow both ways, with gaps where messages were lost."""

import asyncio
import signal
import threading
import time

import pytest
from daemons import TRANSPORTS, free_port, tcp_of, wait_for

import tensorbus
import tensorbus.aio

pytestmark = pytest.mark.timeout(40)


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


def kill(daemon) -> None:
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()


def numbers(sub, n, timeout=5.0):
    return [int(bytes(sub.recv(timeout=timeout).data)) for _ in range(n)]


def peer_links(url) -> list:
    with tensorbus.connect(url, name="probe") as c:
        return [link for link in c.stats()["broker"]["links"] if link["kind"] == "peer"]


def linked(url, pattern, reconnects=0):
    """A peer link at ``url`` is up (after ``reconnects`` new links) and
    reads ``pattern``."""
    return lambda: any(
        link["state"] == "up" and pattern in link["interest"] and link["reconnects"] >= reconnects
        for link in peer_links(url)
    )


def recv_after_gap(sub, n, timeout=5.0):
    """``n`` numbers, and whether a GapError came first."""
    try:
        first = numbers(sub, 1, timeout)
        gap = False
    except tensorbus.GapError:
        first, gap = [], True
    return gap, first + numbers(sub, n - len(first), timeout)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("killed", ["listener", "dialer"])
def test_bridged_daemons_deliver_both_ways_across_a_restart(
    daemon_factory, tmp_path, killed, transport
):
    """Daemon B is killed -9 and started again on the same socket and port:
    it takes over its state (its local client resumes), the link comes
    back (whichever side dials), both sides re-announce their interest,
    and messages flow both ways again; what the survivor had from the
    dead B and may have lost is a gap, in its place."""
    port = free_port()
    common = ("--transport", transport, "--heartbeat", "0.5", "--link-grace", "2")
    listen = ("--tcp", f"127.0.0.1:{port}", *common)
    if killed == "listener":
        start_b = lambda: daemon_factory(*listen, path=tmp_path / "b")  # noqa: E731
        b = start_b()
        a = daemon_factory(
            "--tcp",
            "127.0.0.1:*",
            "--peer",
            f"tcp://127.0.0.1:{port}",
            *common,
            path=tmp_path / "a",
        )
    else:
        a = daemon_factory(*listen, path=tmp_path / "a")
        start_b = lambda: daemon_factory(  # noqa: E731
            "--tcp",
            "127.0.0.1:*",
            "--peer",
            f"tcp://127.0.0.1:{port}",
            *common,
            path=tmp_path / "b",
        )
        b = start_b()
    ca, cb = tensorbus.connect(a.url), tensorbus.connect(b.url)
    try:
        sub_a, sub_b = ca.subscribe("b2a/>"), cb.subscribe("a2b/>")
        pub_a, pub_b = ca.publisher("a2b/t"), cb.publisher("b2a/t")
        wait_for(linked(a.url, "a2b/>"), what="B's interest at A")
        wait_for(linked(b.url, "b2a/>"), what="A's interest at B")
        pub_a.send(b"0")
        pub_b.send(b"0")
        assert numbers(sub_b, 1) == [0] and numbers(sub_a, 1) == [0]
        kill(b)
        b2 = start_b()
        wait_for(lambda: cb.broker_pid == b2.proc.pid, what="B's client resumed")
        wait_for(linked(a.url, "a2b/>", reconnects=1), what="B's interest at A again")
        wait_for(linked(b2.url, "b2a/>"), what="A's interest at B again")
        for i in range(1, 101):
            pub_a.send(b"%d" % i)
            pub_b.send(b"%d" % i)
        assert recv_after_gap(sub_b, 100)[1] == list(range(1, 101))
        gap, got = recv_after_gap(sub_a, 100)
        assert gap and got == list(range(1, 101))  # B's instance died: a gap, first
        with pytest.raises(tensorbus.ReceiveTimeout):
            sub_a.recv(timeout=3)  # and no late gap marker in the middle of the stream
    finally:
        ca.close()
        cb.close()


def test_what_a_restarted_peer_had_not_committed_is_a_gap_there(daemon_factory, tmp_path):
    """B's subscriber reads nothing, so B's ring of a2b/t (8 slots) is full
    and B's bridge holds A's next messages uncommitted (uncredited). B is
    killed -9: those are lost with it. Its successor hears from A, first
    thing on the new link, how many A sent that B never credited: B's
    subscriber reads the 8 that were committed, then a GapError, then the
    messages sent after the restart."""
    port = free_port()
    common = ("--transport", "tcp", "--heartbeat", "0.5", "--link-grace", "2")
    start_b = lambda: daemon_factory(  # noqa: E731
        "--tcp", f"127.0.0.1:{port}", *common, path=tmp_path / "b"
    )
    b = start_b()
    a = daemon_factory(
        "--tcp", "127.0.0.1:*", "--peer", f"tcp://127.0.0.1:{port}", *common, path=tmp_path / "a"
    )
    ca, cb = tensorbus.connect(a.url), tensorbus.connect(b.url)
    try:
        sub_b = cb.subscribe("a2b/>")
        wait_for(linked(a.url, "a2b/>"), what="B's interest at A")
        pub_a = ca.publisher("a2b/t", capacity=8)
        for i in range(40):
            pub_a.send(b"%d" % i)
        wait_for(lambda: peer_links(b.url)[0]["backlog"] > 0, what="B's backlog")
        kill(b)
        b2 = start_b()
        wait_for(lambda: cb.broker_pid == b2.proc.pid, what="B's client resumed")
        wait_for(linked(a.url, "a2b/>", reconnects=1), what="B's interest at A again")
        assert numbers(sub_b, 8) == list(range(8))
        with pytest.raises(tensorbus.GapError, match="may not have arrived"):
            sub_b.recv(timeout=5)
        pub_a.send(b"100")
        assert numbers(sub_b, 1) == [100]
    finally:
        ca.close()
        cb.close()


def interest_at(url, pattern):
    """A light client's link at the daemon at ``url`` reads ``pattern``."""
    return lambda: any(pattern in link["interest"] for link in client_links(url))


@pytest.fixture
def restartable(daemon_factory, tmp_path):
    """``start()`` a daemon on a fixed tcp port; each call after the first
    starts its successor there (same socket: it takes over the state)."""
    port = free_port()

    def start():
        return daemon_factory(
            "--tcp",
            f"127.0.0.1:{port}",
            "--transport",
            "tcp",
            "--heartbeat",
            "0.5",
            path=tmp_path,
        )

    return start


def test_light_client_keeps_publishing_and_receiving_across_a_restart(restartable):
    first = restartable()
    local = tensorbus.connect(first.url)
    remote = tensorbus.connect(tcp_of(first), name="light")
    try:
        rsub = remote.subscribe("m/>")
        rpub = remote.publisher("c/x")
        lsub = local.subscribe("c/>")
        lpub = local.publisher("m/x")
        wait_for(interest_at(first.url, "m/>"), what="interest")
        lpub.send(b"0")
        rpub.send(b"0")
        assert numbers(rsub, 1) == [0] and numbers(lsub, 1) == [0]
        kill(first)
        second = restartable()
        # The light client redials by itself: a new session, its link
        # reopened, its interest and its topic announced again.
        wait_for(interest_at(second.url, "m/>"), what="interest re-announced")
        wait_for(lambda: local.broker_pid == second.proc.pid, what="the local client resumed")
        for i in range(1, 201):
            lpub.send(b"%d" % i)
            rpub.send(b"%d" % i)
        # What was in flight across the death is not known: a reliable
        # subscriber hears of it as a gap, then goes on.
        with pytest.raises(tensorbus.GapError) as info:
            rsub.recv(timeout=5)
        assert info.value.topic == "m/x" and info.value.peer == tcp_of(first)
        assert numbers(rsub, 200) == list(range(1, 201))
        # The broker may have died before it credited "0": a gap, "may".
        assert recv_after_gap(lsub, 200)[1] == list(range(1, 201))
        assert remote._redial.generation == 1
        assert [t["name"] for t in remote.topics()] == ["c/x", "m/x"]
    finally:
        remote.close()
        local.close()


def test_asyncio_light_client_keeps_its_topics_across_a_restart(restartable):
    first = restartable()

    async def run():
        local = tensorbus.connect(first.url)
        remote = await tensorbus.aio.connect(tcp_of(first), name="light-aio")
        try:
            rsub = await remote.subscribe("m/>")
            rpub = await remote.publisher("c/x")
            lsub = local.subscribe("c/>")
            lpub = local.publisher("m/x")
            wait_for(interest_at(first.url, "m/>"), what="interest")
            lpub.send(b"0")
            await rpub.send(b"0")
            assert int(bytes((await rsub.recv(timeout=5)).data)) == 0
            assert numbers(lsub, 1) == [0]
            kill(first)
            second = restartable()
            deadline = time.monotonic() + 15
            while not interest_at(second.url, "m/>")():
                assert time.monotonic() < deadline, "interest not re-announced"
                await asyncio.sleep(0.05)
            for i in range(1, 101):
                lpub.send(b"%d" % i)
                await rpub.send(b"%d" % i, timeout=5)
            with pytest.raises(tensorbus.GapError):
                await rsub.recv(timeout=5)
            got = [int(bytes((await rsub.recv(timeout=5)).data)) for _ in range(100)]
            assert got == list(range(1, 101))
            assert recv_after_gap(lsub, 100)[1] == list(range(1, 101))
            assert remote._redial.generation == 1
        finally:
            await remote.close()
            local.close()

    asyncio.run(run())


def test_reconnect_false_gives_broker_unavailable(restartable):
    first = restartable()
    remote = tensorbus.connect(tcp_of(first), reconnect=False)
    try:
        rsub = remote.subscribe("m/>")
        rpub = remote.publisher("c/x")
        kill(first)
        restartable()  # a successor is there, but this client does not look for it
        with pytest.raises(tensorbus.BrokerUnavailable, match="reconnect=0"):
            while True:
                rsub.recv(timeout=5)
        with pytest.raises(tensorbus.BrokerUnavailable, match="reconnect=0"):
            rpub.send(b"x")
        with pytest.raises(tensorbus.BrokerUnavailable, match="reconnect=0"):
            remote.topics()
    finally:
        remote.close()


def test_asyncio_reconnect_false_gives_broker_unavailable(restartable):
    first = restartable()

    async def run():
        remote = await tensorbus.aio.connect(tcp_of(first), reconnect=False)
        try:
            rsub = await remote.subscribe("m/>")
            rpub = await remote.publisher("c/x")
            kill(first)
            restartable()
            with pytest.raises(tensorbus.BrokerUnavailable, match="reconnect=0"):
                while True:
                    await rsub.recv(timeout=5)
            with pytest.raises(tensorbus.BrokerUnavailable, match="reconnect=0"):
                await rpub.send(b"x")
            with pytest.raises(tensorbus.BrokerUnavailable, match="reconnect=0"):
                await remote.topics()
        finally:
            await remote.close()

    asyncio.run(run())


def test_a_broker_that_shuts_down_is_not_redialed(restartable):
    """SIGTERM is not a death: the broker says it shuts down, and the light
    client raises at once instead of looking for a successor for 30 s."""
    first = restartable()
    remote = tensorbus.connect(tcp_of(first))
    try:
        rsub = remote.subscribe("m/>")
        first.stop()
        t0 = time.monotonic()
        with pytest.raises(tensorbus.BrokerUnavailable, match="shut down"):
            rsub.recv(timeout=10)
        assert time.monotonic() - t0 < 5
    finally:
        remote.close()


def test_what_a_light_client_sent_to_a_dead_broker_is_a_gap_there(restartable):
    """The broker's subscriber reads nothing, so the ring (8 slots) is full
    and the broker holds the light client's next messages uncommitted. It
    is killed -9: they are lost. The client, relinking, tells the successor
    how many the dead one never credited: a gap there, after the 8."""
    first = restartable()
    local = tensorbus.connect(first.url)
    remote = tensorbus.connect(tcp_of(first), name="light")
    try:
        lsub = local.subscribe("c/>")
        rpub = remote.publisher("c/x", capacity=8)
        for i in range(40):
            rpub.send(b"%d" % i)
        wait_for(lambda: client_links(first.url)[0]["backlog"] > 0, what="the broker's backlog")
        kill(first)
        second = restartable()
        wait_for(lambda: local.broker_pid == second.proc.pid, what="the local client resumed")
        assert numbers(lsub, 8) == list(range(8))
        with pytest.raises(tensorbus.GapError, match="may not have arrived"):
            lsub.recv(timeout=5)
        rpub.send(b"100", timeout=5)
        assert numbers(lsub, 1) == [100]
    finally:
        remote.close()
        local.close()
