"""The broker daemon, through the real CLI process and the public client."""

import os
import signal
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorbus
from tensorbus._core import Ring
from tensorbus.broker import liveness
from tensorbus.broker import protocol as P

from conftest import read_line

pytestmark = pytest.mark.timeout(60)


def test_ready_line_socket_mode_and_clean_shutdown(daemon):
    assert daemon.url == f"ipc://{daemon.ipc_path}"
    assert os.stat(daemon.ipc_path).st_mode & 0o777 == 0o600
    assert os.stat(os.path.dirname(daemon.ipc_path)).st_mode & 0o777 == 0o700
    with tensorbus.connect(daemon.url) as c:
        c.publisher("a/b").send(b"x")
        c.subscribe("a/>")
        assert daemon.segments()  # a ring and the bell table
        for name in daemon.segments():
            assert os.stat(f"/dev/shm/{name}").st_mode & 0o777 == 0o600
    assert daemon.stop() == 0
    assert daemon.segments() == []
    assert not os.path.exists(daemon.ipc_path)


def test_second_daemon_on_the_same_path_is_refused(daemon, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tensorbus", "serve", "--ipc", daemon.ipc_path],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert "already serves" in proc.stderr
    with tensorbus.connect(daemon.url) as c:  # the first one is untouched
        assert c.topics() == []


def test_pub_sub_across_processes_in_order(daemon, popen):
    sub = popen("subscriber", daemon.url, "data/>", "3000")
    assert read_line(sub) == "ready"
    pub = popen("publisher", daemon.url, "data/x", "3000", "200")
    assert read_line(pub) == "ready"
    assert read_line(pub, 30) == "done"
    import hashlib

    digest = hashlib.sha256()
    for i in range(3000):
        digest.update(i.to_bytes(8, "little") * 25)
    assert read_line(sub, 30) == digest.hexdigest()


def test_wildcards(daemon):
    with tensorbus.connect(daemon.url) as c:
        one = c.subscribe("m/*")
        many = c.subscribe("m/>")
        exact = c.subscribe("m/a/b")
        for topic in ("m/a", "m/a/b", "n/a"):
            c.publisher(topic).send(topic.encode())
        assert bytes(one.recv(timeout=2).data) == b"m/a"
        assert sorted(bytes(many.recv(timeout=2).data) for _ in range(2)) == [b"m/a", b"m/a/b"]
        assert exact.recv(timeout=2).topic == "m/a/b"
        for s in (one, many, exact):
            with pytest.raises(tensorbus.ReceiveTimeout):
                s.recv(timeout=0.1)
        assert sorted(many.topics) == ["m/a", "m/a/b"]


def test_topic_created_after_subscribe_is_attached_without_loss(daemon):
    with tensorbus.connect(daemon.url) as c, tensorbus.connect(daemon.url) as other:
        sub = c.subscribe("late/>")
        pub = other.publisher("late/x")
        for i in range(100):
            pub.send(bytes([i]))
        got = [sub.recv(timeout=2).data[0] for _ in range(100)]
        assert got == list(range(100))


def test_reliable_blocks_then_backpressure(daemon):
    with tensorbus.connect(daemon.url) as c:
        sub = c.subscribe("rel/x")
        pub = c.publisher("rel/x", capacity=4)
        for i in range(4):
            pub.send(bytes([i]))
        t0 = time.monotonic()
        with pytest.raises(tensorbus.BackpressureError):
            pub.send(b"x", timeout=0.2)
        assert time.monotonic() - t0 >= 0.19
        assert [sub.recv(timeout=1).data[0] for _ in range(4)] == [0, 1, 2, 3]
        pub.send(b"\x04", timeout=0.2)  # credit is back
        assert sub.recv(timeout=1).data[0] == 4


def test_realtime_drops_are_counted_and_announced(daemon):
    with tensorbus.connect(daemon.url, name="é" * 100) as c:
        pressure = c.subscribe("$sys/pressure/>")
        sub = c.subscribe("rt/x")
        pub = c.publisher("rt/x", qos="realtime", capacity=8)
        for i in range(100):
            pub.send(i.to_bytes(4, "little"))  # never blocks
        first = sub.recv(timeout=1)
        assert int.from_bytes(first.data, "little") > 8  # lapped: skipped ahead
        notice = pressure.recv(timeout=3)
        assert notice.topic == "$sys/pressure/rt/x"
        body = msgpack.unpackb(notice.data)
        assert body["topic"] == "rt/x" and body["new_drops"] > 0
        stats = {t["name"]: t for t in c.stats()["topics"]}
        assert stats["rt/x"]["drops"] == body["subscribers"][0]["drops"] > 0
        # The session name, cut to 128 bytes of UTF-8 (protocol.md, hello).
        assert body["subscribers"][0]["client"] == "é" * (P.MAX_NAME_BYTES // 2)
        (channel,) = c.topics("$sys/pressure/>")
        assert (channel["qos"], channel["capacity"], channel["slot_size"]) == (
            "realtime",
            liveness.PRESSURE_CAPACITY,
            liveness.PRESSURE_SLOT_SIZE,
        )


def test_a_pressure_body_of_the_most_listed_cursors_fits_its_slot():
    """protocol.md section 8: never cut, because names are bounded."""
    biggest = 2**64 - 1
    entry = {
        "sub": 2**63 - 1,
        "client": P.session_name("é" * 1000, 1),
        "drops": biggest,
        "new": biggest,
    }
    body = {
        "topic": "t" * 255,  # the longest topic name
        "subscribers": [entry] * liveness.PRESSURE_MAX_LISTED,
        "new_drops": biggest,
        "time_ns": 2**63 - 1,
    }
    assert len(msgpack.packb(body)) <= liveness.PRESSURE_SLOT_SIZE


def test_latest_keeps_only_the_last_value(daemon):
    with tensorbus.connect(daemon.url) as c:
        pub = c.publisher("params/global", qos="latest")
        early = c.subscribe("params/global")
        for i in range(10):
            pub.send(bytes([i]))
        assert early.recv(timeout=1).data[0] == 9
        late = c.subscribe("params/global")  # a new subscriber gets the value at once
        assert late.recv(timeout=1).data[0] == 9
        with pytest.raises(tensorbus.ReceiveTimeout):
            late.recv(timeout=0.1)


def test_killed_subscriber_releases_a_blocked_publisher(daemon, popen):
    sub = popen("subscriber", daemon.url, "k/x", "1", "stall")
    assert read_line(sub) == "ready"
    with tensorbus.connect(daemon.url) as c:
        pub = c.publisher("k/x", capacity=4)
        for _ in range(4):
            pub.send(b"x")
        with pytest.raises(tensorbus.BackpressureError):
            pub.send(b"x", timeout=0.1)
        sub.kill()
        sub.wait()
        t0 = time.monotonic()
        pub.send(b"x", timeout=5)
        assert time.monotonic() - t0 < 1.5


def test_killed_publisher_does_not_wedge_subscribers(daemon, popen):
    with tensorbus.connect(daemon.url) as c:
        sub = c.subscribe("w/x")
        pub_proc = popen("publisher", daemon.url, "w/x", "0", "64", "forever")
        assert read_line(pub_proc) == "ready"
        sub.recv(timeout=5)
        pub_proc.kill()
        pub_proc.wait()
        while True:  # drain what it committed
            try:
                sub.recv(timeout=0.5)
            except tensorbus.ReceiveTimeout:
                break
        mine = c.publisher("w/x")
        mine.send(b"after")
        assert bytes(sub.recv(timeout=3).data) == b"after"


def test_slow_consumer_is_evicted_and_told_why(daemon_factory):
    d = daemon_factory("--slow-consumer-grace", "0.5")
    with tensorbus.connect(d.url) as c:
        sub = c.subscribe("slow/x")
        pub = c.publisher("slow/x", capacity=4)
        for _ in range(4):
            pub.send(b"x")
        pub.send(b"x", timeout=5)  # unblocked by the eviction
        with pytest.raises(tensorbus.SlowConsumer, match="slow consumer"):
            for _ in range(10):
                sub.recv(timeout=2)
        assert c.stats()["broker"]["evictions"] == 1


def _raw(url):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(url)
    return ctx, sock


def _ask(sock, raw):
    sock.send(raw)
    return P.decode_reply(sock.recv())


def test_garbage_gets_error_replies_and_the_daemon_keeps_serving(daemon):
    ctx, sock = _raw(daemon.url)
    try:
        cases = {
            b"\xc1\xff garbage": "bad_request",
            msgpack.packb([1, 2, 3]): "bad_request",
            msgpack.packb({"v": 1, "op": "hello", "id": 1}): "bad_request",
            msgpack.packb({"v": 2, "op": "hello", "id": 1}): "unsupported_version",
            msgpack.packb({"v": 1.0, "op": "hello", "id": 1}): "unsupported_version",
            msgpack.packb({"v": 1, "op": "hello", "id": 1, b"pid": 1}): "bad_request",
            msgpack.packb({"v": 1, "op": "explode", "id": 1}): "unknown_op",
            msgpack.packb({"v": 1, "op": "stats", "id": 1}): "no_session",
            b"\x80" * (P.MAX_MESSAGE_BYTES + 10): "too_large",
        }
        for raw, code in cases.items():
            reply = _ask(sock, raw)
            assert not reply.ok and reply.code == code and reply.error
            assert not reply.error.endswith("()"), reply.error
        hello = _ask(sock, P.encode_request("hello", 2, pid=os.getpid(), protocol=1))
        assert hello.ok
        bad = {
            P.encode_request("open_publisher", 3, topic="a//b"): "bad_topic",
            P.encode_request("open_publisher", 4, topic="$sys/x"): "read_only_topic",
            P.encode_request("create_topic", 4, topic="$sys/x"): "read_only_topic",
            P.encode_request("create_topic", 4, topic="_inbox/0123"): "bad_topic",
            P.encode_request("subscribe", 5, pattern="a/>/b"): "bad_pattern",
            P.encode_request("create_topic", 6, topic="t", capacity=3): "bad_option",
            P.encode_request("create_topic", 7, topic="t", qos="fast"): "bad_option",
            P.encode_request("unsubscribe", 8, sub=99): "no_such_subscription",
            P.encode_request("hello", 9, pid=1, protocol=7): "unsupported_version",
        }
        for raw, code in bad.items():
            reply = _ask(sock, raw)
            assert (reply.ok, reply.code) == (False, code), reply
        sock.send_multipart([b"two", b"frames"])
        assert P.decode_reply(sock.recv()).code == "bad_request"
        assert _ask(sock, P.encode_request("create_topic", 10, topic="t", capacity=8)).ok
        clash = _ask(sock, P.encode_request("create_topic", 11, topic="t", capacity=16))
        assert clash.code == "topic_conflict"
    finally:
        ctx.destroy(0)
    with tensorbus.connect(daemon.url) as c:
        assert [t["name"] for t in c.topics()] == ["t"]


@pytest.mark.timeout(120)
def test_fuzzed_requests_never_kill_the_daemon(daemon):
    ctx, sock = _raw(daemon.url)
    sock.send(P.encode_request("hello", 1, pid=os.getpid(), protocol=1))
    assert P.decode_reply(sock.recv()).ok
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.text(max_size=30)
        | st.binary(max_size=30)
        | st.floats()
    )
    fields = st.dictionaries(
        st.sampled_from(
            [
                "v",
                "id",
                "op",
                "topic",
                "pattern",
                "sub",
                "qos",
                "capacity",
                "slot_size",
                "mode",
                "pid",
                "protocol",
            ]
        ),
        scalars
        | st.sampled_from(
            [
                "subscribe",
                "open_publisher",
                "create_topic",
                "stats",
                "list_topics",
                "unsubscribe",
                "heartbeat",
                1,
                "a/b",
                ">",
            ]
        ),
        max_size=8,
    )

    @settings(
        max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(fields)
    def check(body):
        try:
            raw = msgpack.packb(body, use_bin_type=True)
        except (OverflowError, ValueError):
            return
        sock.send(raw)
        reply = P.decode_reply(sock.recv())
        assert reply.ok or (reply.code in P.ERROR_CODES and reply.error)

    try:
        check()
    finally:
        ctx.destroy(0)
    assert daemon.proc.poll() is None
    with tensorbus.connect(daemon.url) as c:
        c.stats()


def test_tcp_serves_tools_and_refuses_shared_memory_ops(daemon_factory):
    d = daemon_factory("--tcp", "127.0.0.1:*")
    tcp = d.endpoints[1]
    assert tcp.startswith("tcp://127.0.0.1:")
    with tensorbus.connect(d.url) as local:
        local.publisher("t/x")
    with tensorbus.connect(tcp) as remote:
        assert [t["name"] for t in remote.topics()] == ["t/x"]
        assert remote.stats()["broker"]["topics"] == 1
        # The ops that hand out shared memory are for clients on the host;
        # a tcp client publishes and subscribes over a link (test_bridge.py).
        with pytest.raises(tensorbus.NotLocalError, match="shared memory"):
            remote._request("open_publisher", topic="t/y")
        with pytest.raises(tensorbus.NotLocalError):
            remote._request("subscribe", pattern="t/>")
        with pytest.raises(tensorbus.NotLocalError):
            remote.subscribe("t/x", group="workers")


def test_tcp_token(daemon_factory, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o600)  # a token file open to others is refused, as ssh does
    d = daemon_factory("--tcp", "127.0.0.1:*", "--token-file", str(token))
    with pytest.raises(tensorbus.AuthError):
        tensorbus.connect(d.endpoints[1], token="wrong")
    with tensorbus.connect(d.endpoints[1], token="s3cret") as c:
        assert c.topics() == []


def test_non_loopback_tcp_needs_a_token(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorbus",
            "serve",
            "--ipc",
            str(tmp_path / "b.sock"),
            "--tcp",
            "0.0.0.0:*",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1 and "without a token" in proc.stderr


def test_no_broker_is_a_clear_error(tmp_path):
    with pytest.raises(tensorbus.BrokerUnavailable, match="tensorbus serve"):
        tensorbus.connect(f"ipc://{tmp_path}/none.sock", timeout=0.3)


def test_sigint_also_cleans_up(daemon):
    with tensorbus.connect(daemon.url) as c:
        c.publisher("s/x")
    assert daemon.stop(signal.SIGINT) == 0
    assert daemon.segments() == []


def test_broker_shutdown_reaches_a_waiting_subscriber(daemon):
    c = tensorbus.connect(daemon.url)
    try:
        sub = c.subscribe("gone/>")
        c.publisher("gone/x")
        daemon.proc.send_signal(signal.SIGTERM)
        with pytest.raises(tensorbus.BrokerUnavailable):
            sub.recv(timeout=5)
    finally:
        c.close()


def test_cli_pub_sub_topics_stats(daemon):
    env = dict(os.environ, TENSORBUS_URL=daemon.url)
    cli = [sys.executable, "-m", "tensorbus"]
    sub = subprocess.Popen(
        [*cli, "sub", "cli/>", "--count", "2"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 10
        with tensorbus.connect(daemon.url) as c:
            while not c.stats("cli/>")["broker"]["sessions"] > 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(0.3)
        subprocess.run(
            [*cli, "pub", "cli/a", "hello", "--count", "2"], env=env, check=True, timeout=30
        )
        out, _ = sub.communicate(timeout=15)
        assert out.splitlines() == ["cli/a hello", "cli/a hello"]
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    topics = subprocess.run([*cli, "topics"], env=env, capture_output=True, text=True, timeout=30)
    assert topics.stdout.startswith("cli/a\treliable")
    stats = subprocess.run([*cli, "stats"], env=env, capture_output=True, text=True, timeout=30)
    assert stats.stdout.splitlines()[0].split()[:4] == ["TOPIC", "QOS", "PUBS", "SUBS"]
    assert "cli/a" in stats.stdout
    for command in ("serve", "topics", "stats", "pub", "sub"):
        helped = subprocess.run(
            [*cli, command, "--help"], capture_output=True, text=True, timeout=30
        )
        assert helped.returncode == 0 and "usage: tensorbus" in helped.stdout


def test_stats_show_rates_and_latency(daemon):
    with tensorbus.connect(daemon.url) as c:
        sub = c.subscribe("lat/x")
        pub = c.publisher("lat/x", capacity=1024)
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            for _ in range(50):
                pub.send(b"x" * 100)
            sub.recv_batch(100, 0.1)
            time.sleep(0.01)
        t = {t["name"]: t for t in c.stats()["topics"]}["lat/x"]
        assert t["msgs_per_s"] > 100 and t["bytes_per_s"] > 100 * 100
        assert t["p50_ns"] is not None and 0 < t["p50_ns"] <= t["p99_ns"] < 5e9
        assert t["publishers"] == 1 and t["subscribers"] == 1


def test_fork_invalidates_the_client_in_the_child(daemon):
    with tensorbus.connect(daemon.url) as c:
        c.publisher("f/x")
        pid = os.fork()
        if pid == 0:  # the child must not use (or release) the parent's client
            try:
                c.topics()
            except tensorbus.ClientClosed:
                os._exit(0)
            os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert c.topics()[0]["publishers"] == 1


def _hello(request_id, name=None):
    return P.encode_request("hello", request_id, pid=os.getpid(), protocol=1, name=name)


def test_list_topics_and_stats_count_the_rings_publisher_records(daemon):
    ctx, sock = _raw(daemon.url)
    try:
        assert _ask(sock, _hello(1)).ok
        opened = _ask(sock, P.encode_request("open_publisher", 2, topic="pubs/x"))
        with tensorbus.connect(daemon.url) as c:

            def counts():
                return c.topics()[0]["publishers"], c.stats()["topics"][0]["publishers"]

            assert counts() == (0, 0)  # open_publisher alone takes no record
            ring = Ring.attach(opened.fields["topic"]["ring"])
            record = ring.publisher()  # a record, as a third-party client takes one
            assert counts() == (1, 1)
            record.close()
            assert counts() == (0, 0)
            ring.detach()
    finally:
        ctx.destroy(0)


def test_a_session_that_timed_out_or_said_bye_is_told_so(daemon_factory):
    d = daemon_factory("--tcp", "127.0.0.1:*", "--heartbeat", "0.2")
    ctx, sock = _raw(d.endpoints[1])
    try:
        assert _ask(sock, _hello(1)).ok
        time.sleep(1.2)  # past 3 x 0.2 s and a monitor tick
        reply = _ask(sock, P.encode_request("stats", 2))
        assert reply.code == "no_session"
        assert "timed out" in reply.error and "send hello again" in reply.error, reply.error
        assert "heartbeat" in reply.error and "0.2 s" in reply.error
        assert _ask(sock, _hello(3)).ok
        assert _ask(sock, P.encode_request("stats", 4)).ok
        assert _ask(sock, P.encode_request("bye", 5)).ok
        reply = _ask(sock, P.encode_request("heartbeat", 6))
        assert reply.code == "no_session" and "ended with bye" in reply.error
    finally:
        ctx.destroy(0)
    ctx, sock = _raw(d.url)
    try:
        reply = _ask(sock, P.encode_request("stats", 1))
        assert reply.code == "no_session" and "send hello first" in reply.error
    finally:
        ctx.destroy(0)


def test_clients_get_62_of_the_63_arena_holder_slots(daemon):
    """The daemon's bridge takes one slot at start (arena.md, Limits)."""
    ctx = zmq.Context()
    try:
        socks = []
        for _ in range(63):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, 5000)
            sock.connect(daemon.url)
            socks.append(sock)
        holders = [_ask(sock, _hello(1)).fields["arena"]["holder"] for sock in socks]
        assert len(set(holders[:62])) == 62 and all(1 <= h <= 63 for h in holders[:62])
        assert holders[62] == 0
        stats = _ask(socks[0], P.encode_request("stats", 2)).fields
        assert stats["broker"]["holders_free"] == 0
        assert _ask(socks[0], P.encode_request("bye", 3)).ok  # its slot goes back
        assert _ask(socks[0], _hello(4)).fields["arena"]["holder"] == holders[0]
    finally:
        ctx.destroy(0)


_CLOSE_WITHOUT_BYE = """
import os, sys, zmq
from tensorbus.broker import protocol as P
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(sys.argv[1])
sock.send(P.encode_request("hello", 1, pid=os.getpid(), protocol=1, name="no-bye"))
assert P.decode_reply(sock.recv()).ok
sock.send(P.encode_request("subscribe", 2, pattern="keep/x"))
assert P.decode_reply(sock.recv()).ok
sock.close()
print("closed", flush=True)
sys.stdin.read()
"""


def test_an_ipc_session_closed_without_bye_lives_until_its_process_exits(daemon):
    with tensorbus.connect(daemon.url) as c:
        c._request("create_topic", topic="keep/x")
        child = subprocess.Popen(
            [sys.executable, "-c", _CLOSE_WITHOUT_BYE, daemon.url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert read_line(child) == "closed"
            time.sleep(0.5)  # a closed socket is nothing the broker can see
            assert c.stats()["broker"]["sessions"] == 2
            assert c.topics()[0]["subscribers"] == 1
            child.stdin.close()
            child.wait(10)
            deadline = time.monotonic() + 5
            while c.stats()["broker"]["sessions"] != 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.stats()["broker"]["sessions"] == 1
            assert c.topics()[0]["subscribers"] == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()


def test_attach_while_another_thread_waits(daemon):
    with tensorbus.connect(daemon.url) as c:
        sub = c.subscribe("w/>")
        got = []

        def wait():
            got.append(bytes(sub.recv(timeout=10).data))

        t = threading.Thread(target=wait)
        t.start()
        time.sleep(0.2)  # it sleeps on the ring set's arrays now
        for i in range(20):  # each new topic rebuilds those arrays (attach notice)
            c.publisher(f"w/t{i}")
        c.publisher("w/last").send(b"done")
        t.join(10)
        assert got == [b"done"]


def test_a_killed_publisher_is_repaired_while_still_a_zombie(daemon):
    """The daemon sees a client's exit on its pidfd before the parent reaps
    it; the repair then must count the zombie as dead, or its publisher
    record (and a claim it left half-done) stays in the ring."""
    code = (
        "import sys, tensorbus; c = tensorbus.connect(sys.argv[1]); "
        "c.publisher('z/t').send(b'x'); print('sent', flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, daemon.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "sent"
        with tensorbus.connect(daemon.url, spin_us=0) as c:
            assert c.stats("z/t")["topics"][0]["publishers"] == 1
            child.kill()  # not reaped until the end: a zombie meanwhile
            deadline = time.monotonic() + 5
            while c.stats("z/t")["topics"][0]["publishers"]:
                assert time.monotonic() < deadline, "the zombie's record was kept"
                time.sleep(0.02)
    finally:
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()
