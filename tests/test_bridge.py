"""Bridges between daemons: two real daemons on this machine treated as two
hosts (their own ipc paths, arenas and TCP ports; they share no segment),
with each transport this machine has."""

import os
import shutil
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
from daemons import TRANSPORTS, free_port, tcp_of, wait_for

import tensorbus
from tensorbus import AuthError, BrokerUnavailable, GapError
from tensorbus.broker import peer_wire as W
from tensorbus.cli import stats_table

pytestmark = pytest.mark.timeout(120)


def links(url) -> list:
    with tensorbus.connect(url, name="probe") as c:
        return c.stats()["broker"]["links"]


def link_up(url, interest=None):
    def check():
        ls = [link for link in links(url) if link["kind"] == "peer"]
        return bool(ls) and all(
            link["state"] == "up" and (interest is None or interest in link["interest"])
            for link in ls
        )

    return check


@pytest.fixture
def pair(daemon_factory, tmp_path):
    """Start daemon A, then B linked to it (B dials A); both stopped at the end."""

    def start(transport, *, a_args=(), b_args=(), arena="128MiB", env_a=None, env_b=None):
        common = ("--transport", transport, "--heartbeat", "0.2", "--arena-size", arena)
        a = daemon_factory("--tcp", "127.0.0.1:*", *common, *a_args, path=tmp_path / "a", env=env_a)
        b = daemon_factory(
            "--tcp",
            "127.0.0.1:*",
            "--peer",
            tcp_of(a),
            *common,
            *b_args,
            path=tmp_path / "b",
            env=env_b,
        )
        return a, b

    return start


def publish_in_thread(pub, items, **kw):
    errors = []

    def run():
        try:
            for item in items:
                pub.send(item, **kw)
        except Exception as exc:  # reported by the test
            errors.append(exc)

    th = threading.Thread(target=run)
    th.start()
    return th, errors


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_small_messages_reach_both_hosts_in_order(pair, transport):
    a, b = pair(transport)
    with tensorbus.connect(a.url) as ca, tensorbus.connect(b.url) as cb:
        sub_a = ca.subscribe("grad/>")
        sub_b = cb.subscribe("grad/>")
        wait_for(link_up(b.url), what="link up")
        wait_for(lambda: any("grad/>" in lk["interest"] for lk in links(a.url)), what="interest")
        p1, p2 = ca.publisher("grad/w"), ca.publisher("grad/w")
        n = 3000
        t1, e1 = publish_in_thread(p1, [b"1:%d" % i for i in range(n)])
        t2, e2 = publish_in_thread(p2, [b"2:%d" % i for i in range(n)])
        seen = {sub: {b"1": [], b"2": []} for sub in (sub_a, sub_b)}

        def read(sub):  # both hosts' subscribers read at once: reliable waits for the slowest
            for _ in range(2 * n):
                who, i = bytes(sub.recv(timeout=10).data).split(b":")
                seen[sub][who].append(int(i))

        reader = threading.Thread(target=read, args=(sub_a,))
        reader.start()
        read(sub_b)
        reader.join()
        t1.join(), t2.join()
        for sub in (sub_a, sub_b):  # each publisher's order holds, across the bridge too
            assert seen[sub][b"1"] == list(range(n)) and seen[sub][b"2"] == list(range(n))
        assert not e1 and not e2
        # One copy crossed the link per message, whatever the fan-out.
        assert links(a.url)[0]["sent"] == 2 * n
        assert links(b.url)[0]["received"] == 2 * n
        # Between daemons, tcp data goes on a plain TCP stream, not ZeroMQ
        # (broker/bridge_stream.py); `tensorbus stats` shows the link.
        data = "stream" if transport == "tcp" else "ucx"
        assert [lk["data"] for lk in links(a.url) + links(b.url)] == [data, data]
        table = stats_table(cb.stats())
        path = "tcp stream" if transport == "tcp" else transport
        assert f"link peer {tcp_of(a)}: up ({path})" in table, table


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_tensors_up_to_256mib_cross_intact(pair, transport):
    a, b = pair(transport, arena="640MiB")
    with tensorbus.connect(a.url) as ca, tensorbus.connect(b.url) as cb:
        sub_b = cb.subscribe("params/>")
        wait_for(link_up(b.url), what="link up")
        wait_for(lambda: any(lk["forwarding"] == 0 and lk["interest"] for lk in links(a.url)))
        pub = ca.publisher("params/big")
        small = np.arange(12, dtype=np.int16).reshape(3, 4)
        pub.send(small, meta=b"step-1")
        m = sub_b.recv(timeout=10)
        assert m.data.dtype == np.int16 and m.data.shape == (3, 4)
        assert np.array_equal(m.data, small) and m.meta[:6] == b"step-1"
        big = np.arange(64 << 20, dtype=np.uint32)  # 256 MiB
        for k in range(2):
            big[0] = k
            th, errors = publish_in_thread(pub, [big], meta=b"big")
            m = sub_b.recv(timeout=60)
            th.join()
            assert not errors
            assert m.data.shape == big.shape and m.data.dtype == np.uint32
            assert m.zero_copy  # it landed in B's arena, and we view it there
            assert m.data[0] == k and np.array_equal(m.data[1:], big[1:])
            del m
        torch = pytest.importorskip("torch")
        t = torch.arange(10, dtype=torch.bfloat16)
        pub.send(t)
        got = sub_b.recv(timeout=10).as_torch()
        assert got.dtype == torch.bfloat16 and torch.equal(got, t)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_interest_is_added_and_withdrawn(pair, transport):
    a, b = pair(transport)
    with tensorbus.connect(a.url) as ca, tensorbus.connect(b.url) as cb:
        wait_for(link_up(b.url), what="link up")
        pub = ca.publisher("metrics/loss")
        assert links(a.url)[0]["interest"] == []
        sub = cb.subscribe("metrics/*")
        sub2 = cb.subscribe("metrics/*")
        wait_for(lambda: links(a.url)[0]["forwarding"] == 1, what="forwarding starts")
        pub.send(b"hello")
        assert bytes(sub.recv(timeout=5).data) == b"hello"
        assert bytes(sub2.recv(timeout=5).data) == b"hello"
        sub.close()
        time.sleep(0.3)
        assert links(a.url)[0]["interest"] == ["metrics/*"]  # one subscriber is left
        sub2.close()
        wait_for(lambda: links(a.url)[0]["forwarding"] == 0, what="interest withdrawn")
        assert links(a.url)[0]["interest"] == []
        # Nobody reads it any more on A: a reliable publisher is not held back.
        with tensorbus.connect(a.url) as probe:
            topic = next(t for t in probe.stats()["topics"] if t["name"] == "metrics/loss")
            assert topic["subscribers"] == 0
        for _ in range(1000):
            pub.send(b"x", timeout=1)


@pytest.fixture
def fixed_pair(daemon_factory, tmp_path):
    """``start(transport, listener)``: daemon ``listener`` ("a" or "b") on a
    fixed port, so that it can be killed and started again there
    (``restart()``), and the other daemon dialing it. Returns (a, b, restart)."""

    def start(transport: str, listener: str):
        port = free_port()
        common = ("--transport", transport, "--heartbeat", "0.2", "--link-grace", "0.5")
        listen = ("--tcp", f"127.0.0.1:{port}", *common)
        dial = ("--tcp", "127.0.0.1:*", "--peer", f"tcp://127.0.0.1:{port}", *common)
        dialer = "b" if listener == "a" else "a"

        def restart():
            return daemon_factory(*listen, path=tmp_path / listener)

        first = restart()
        other = daemon_factory(*dial, path=tmp_path / dialer)
        return (first, other, restart) if listener == "a" else (other, first, restart)

    return start


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_peer_killed_and_restarted_reconnects(fixed_pair, transport):
    a, b, restart_b = fixed_pair(transport, listener="b")
    with tensorbus.connect(a.url) as ca:
        pub = ca.publisher("ctl/beat", qos="realtime")
        with tensorbus.connect(b.url) as cb:
            sub = cb.subscribe("ctl/>")
            wait_for(link_up(a.url, "ctl/>"), what="link up")
            pub.send(b"before")
            assert bytes(sub.recv(timeout=5).data) == b"before"
        b.stop(signal.SIGKILL)
        wait_for(lambda: links(a.url)[0]["state"] == "down", what="link down")
        for _ in range(100):
            pub.send(b"while down")  # realtime: never blocks on a dead peer
        b2 = restart_b()
        with tensorbus.connect(b2.url) as cb:
            sub = cb.subscribe("ctl/>")
            wait_for(link_up(a.url, "ctl/>"), what="link back up")
            pub.send(b"after")
            assert bytes(sub.recv(timeout=5).data) == b"after"
        link = links(a.url)[0]
        assert link["reconnects"] >= 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_lost_origin_is_a_gap_error_not_silence(fixed_pair, transport):
    a, b, restart_a = fixed_pair(transport, listener="a")
    with tensorbus.connect(b.url) as cb:
        sub = cb.subscribe("grad/>")
        wait_for(link_up(b.url), what="link up")
        with tensorbus.connect(a.url) as ca:
            wait_for(lambda: links(a.url)[0]["interest"] == ["grad/>"], what="interest")
            pub = ca.publisher("grad/g")
            pub.send(b"one")
            assert bytes(sub.recv(timeout=5).data) == b"one"
            a.stop(signal.SIGKILL)
        with pytest.raises(GapError) as info:
            sub.recv(timeout=10)
        assert info.value.topic == "grad/g"
        # The origin comes back: the same subscription goes on.
        a2 = restart_a()
        wait_for(link_up(b.url), what="link back up")
        with tensorbus.connect(a2.url) as ca:
            wait_for(lambda: links(a2.url)[0]["interest"] == ["grad/>"], what="interest again")
            ca.publisher("grad/g").send(b"two")
            assert bytes(sub.recv(timeout=5).data) == b"two"


def test_peer_with_a_wrong_token_is_refused(pair):
    a, b = pair(
        "tcp",
        env_a={**_env(), "TENSORBUS_TOKEN": "right-token"},
        env_b={**_env(), "TENSORBUS_TOKEN": "wrong-token"},
    )
    time.sleep(1.0)
    with tensorbus.connect(a.url) as c:
        assert c.stats()["broker"]["links"] == []
    with tensorbus.connect(b.url) as c:
        assert all(link["state"] != "up" for link in c.stats()["broker"]["links"])
    with pytest.raises(AuthError):
        tensorbus.connect(tcp_of(a), token="wrong-token", timeout=2)


def _env():
    return dict(os.environ)


def test_light_client_publishes_and_subscribes_through_a_remote_daemon(daemon_factory, tmp_path):
    a = daemon_factory("--tcp", "127.0.0.1:*", "--transport", "tcp", path=tmp_path / "a")
    with tensorbus.connect(a.url) as local, tensorbus.connect(tcp_of(a)) as remote:
        assert not remote.local
        rsub = remote.subscribe("metrics/>")
        lsub = local.subscribe("cmd/>")
        lpub = local.publisher("metrics/loss")
        rpub = remote.publisher("cmd/go")
        time.sleep(0.2)
        th, errors = publish_in_thread(lpub, [b"%d" % i for i in range(800)])
        assert [int(bytes(rsub.recv(timeout=5).data)) for _ in range(800)] == list(range(800))
        th.join()
        big = np.random.default_rng(1).random((1024, 1024), dtype=np.float32)
        rpub.send(big, meta=b"m")
        m = lsub.recv(timeout=5)
        assert np.array_equal(m.data, big) and m.meta[:1] == b"m"
        lpub.send(big)
        assert np.array_equal(rsub.recv(timeout=5).data, big)
        with pytest.raises(tensorbus.NotLocalError):
            remote.subscribe("cmd/go", group="workers")
        with pytest.raises(tensorbus.NoResponders):  # asked of the broker
            remote.request("cmd/go", b"x")


def test_curve_encrypts_links_and_refuses_clients_without_the_key(pair, tmp_path):
    import zmq

    public, secret = zmq.curve_keypair()
    key_file = tmp_path / "curve.key"
    key_file.write_text(secret.decode())
    args = ("--curve-secret-file", str(key_file))
    a, b = pair("tcp", a_args=args, b_args=args)
    with tensorbus.connect(a.url) as ca, tensorbus.connect(b.url) as cb:
        sub = cb.subscribe("x/>")
        wait_for(lambda: any("x/>" in lk["interest"] for lk in links(a.url)), what="interest")
        ca.publisher("x/y").send(b"secret")
        assert bytes(sub.recv(timeout=5).data) == b"secret"
        # CURVE encrypts ZeroMQ only: the data stays there, off the plain stream.
        assert [lk["data"] for lk in links(a.url) + links(b.url)] == ["zeromq", "zeromq"]
    with tensorbus.connect(tcp_of(a), curve_server_key=public.decode()) as c:
        assert c.stats()["broker"]["links"]
    with pytest.raises(BrokerUnavailable):
        tensorbus.connect(tcp_of(a), timeout=1)


@pytest.fixture
def netns():
    """A network namespace joined to this one by a veth pair: (prefix that
    runs a command inside it, host-side address, its address). Skipped
    where namespaces cannot be made (not root, no ip(8), a container)."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and ip(8)")
    tag = os.getpid() % 100000
    name, host_if, ns_if = f"tb{tag}", f"tb{tag}h", f"tb{tag}n"
    subnet = f"10.231.{tag % 250}"
    steps = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
        ["ip", "link", "set", ns_if, "netns", name],
        ["ip", "addr", "add", f"{subnet}.1/24", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "netns", "exec", name, "ip", "addr", "add", f"{subnet}.2/24", "dev", ns_if],
        ["ip", "netns", "exec", name, "ip", "link", "set", ns_if, "up"],
        ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
    ]
    try:
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"cannot set up a network namespace: {done.stderr.strip()}")
        yield ["ip", "netns", "exec", name], f"{subnet}.1", f"{subnet}.2"
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_daemon_in_another_network_namespace(daemon_factory, tmp_path, netns, transport):
    """Daemon B in its own network namespace really is another address: the
    link crosses a veth pair, with a token (non-loopback addresses need one)."""
    prefix, host_ip, ns_ip = netns
    env = {**os.environ, "TENSORBUS_TOKEN": "netns-token"}
    port = free_port()
    common = ("--transport", transport, "--heartbeat", "0.2")
    a = daemon_factory("--tcp", f"{host_ip}:{port}", *common, path=tmp_path / "a", env=env)
    b = daemon_factory(
        "--tcp",
        f"{ns_ip}:*",
        "--peer",
        f"tcp://{host_ip}:{port}",
        *common,
        path=tmp_path / "b",
        env=env,
        prefix=prefix,
    )
    # The ipc sockets are paths and /dev/shm is shared: clients here reach both.
    with tensorbus.connect(a.url) as ca, tensorbus.connect(b.url) as cb:
        sub = cb.subscribe("ns/>")
        wait_for(link_up(b.url), what="link up across the namespaces")
        wait_for(lambda: links(a.url)[0]["interest"] == ["ns/>"], what="interest")
        pub = ca.publisher("ns/t")
        th, errors = publish_in_thread(pub, [b"%d" % i for i in range(500)])
        assert [int(bytes(sub.recv(timeout=10).data)) for _ in range(500)] == list(range(500))
        th.join()
        assert not errors
        assert links(a.url)[0]["peer"].startswith(f"tcp://{ns_ip}:")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_slow_remote_subscriber_slows_the_publisher_and_nothing_is_lost(pair, transport):
    a, b = pair(transport)
    with tensorbus.connect(a.url) as ca, tensorbus.connect(b.url) as cb:
        sub = cb.subscribe("grad/>")
        wait_for(lambda: any("grad/>" in lk["interest"] for lk in links(a.url)), what="interest")
        pub = ca.publisher("grad/slow", capacity=64)
        sent = 0
        with pytest.raises(tensorbus.BackpressureError):
            for sent in range(100_000):  # noqa: B007 - the count is the point
                pub.send(b"%d" % sent, timeout=0.5)
        # The far subscriber read nothing: credit ran out on the link, the
        # bridge's cursor stalled, and A's ring filled. Bounded by the rings
        # and the window, not by the publisher's speed.
        assert 64 < sent < 64 + 2 * W.INITIAL_WINDOW_MSGS + 64
        assert links(a.url)[0]["parked"] == 1
        got = [int(bytes(sub.recv(timeout=5).data)) for _ in range(sent)]
        assert got == list(range(sent))  # every message, in order, none dropped
        pub.send(b"after", timeout=5)  # credit came back
        assert bytes(sub.recv(timeout=5).data) == b"after"


def test_batching_is_switched_per_topic(pair):
    """``--bridge-batch ctl/>=off``: each ctl message crosses in a batch of
    its own; other topics still coalesce a burst."""
    a, b = pair("tcp", a_args=("--bridge-batch", "ctl/>=off"))
    with tensorbus.connect(a.url) as ca, tensorbus.connect(b.url) as cb:
        subs = {name: cb.subscribe(name) for name in ("ctl/x", "data/x")}
        for name in subs:
            wait_for(link_up(a.url, name), what=f"interest in {name}")
        counts = {}
        for name, sub in subs.items():
            before = links(a.url)[0]["batches"]
            pub = ca.publisher(name, capacity=1024)
            for k in range(300):
                pub.send(b"%d" % k)
            got = [int(bytes(sub.recv(timeout=5).data)) for _ in range(300)]
            assert got == list(range(300))
            counts[name] = links(a.url)[0]["batches"] - before
        assert counts["ctl/x"] >= 300
        assert counts["data/x"] < 300


def test_a_gap_marker_raises_once_where_it_is_even_mid_batch(daemon):
    """What a bridge does on loss, without a bridge: a gap marker between
    messages. A batch stops before it, the next receive raises GapError,
    and the one after goes on."""
    import msgpack

    from tensorbus._core import FLAG_GAP

    marker = msgpack.packb({"topic": "g/t", "peer": "tcp://x:1", "received": 2, "reason": "test"})
    with tensorbus.connect(daemon.url) as c:
        sub = c.subscribe("g/t")
        pub = c.publisher("g/t")
        pub.send(b"a")
        pub.send(b"b")
        pub._pub.send(marker, flags=FLAG_GAP)
        pub.send(b"c")
        time.sleep(0.05)
        assert [bytes(m.data) for m in sub.recv_batch(10, 1)] == [b"a", b"b"]
        with pytest.raises(GapError) as info:
            sub.recv(timeout=1)
        assert (info.value.topic, info.value.peer, info.value.reason) == (
            "g/t",
            "tcp://x:1",
            "test",
        )
        assert bytes(sub.recv(timeout=1).data) == b"c"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_realtime_never_waits_for_the_link_and_counts_what_it_drops(pair, transport):
    a, b = pair(transport)
    with tensorbus.connect(a.url) as ca, tensorbus.connect(b.url) as cb:
        sub = cb.subscribe("ctl/>")
        wait_for(lambda: any("ctl/>" in lk["interest"] for lk in links(a.url)), what="interest")
        pub = ca.publisher("ctl/rt", qos="realtime", capacity=16)
        n = 20_000
        t0 = time.monotonic()
        for i in range(n):
            pub.send(b"%d" % i)  # far faster than a link: never blocks
        assert time.monotonic() - t0 < 5
        got = []
        while True:
            try:
                got.append(int(bytes(sub.recv(timeout=1).data)))
            except tensorbus.ReceiveTimeout:
                break
        assert got == sorted(got) and len(set(got)) == len(got)  # in order, no duplicates
        link = links(a.url)[0]
        lost = link["dropped"] + link["lapped"]
        assert lost > 0 and link["sent"] + lost == n  # every message sent, or counted
        # B's ring is realtime too: its subscriber may be lapped there as well.
        assert len(got) <= link["sent"] and got[-1] == n - 1  # the newest arrives


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_stalled_peer_is_dropped_and_relinked_without_loss(pair, transport):
    """SIGSTOP daemon B past three heartbeats: both sides call the link
    down; on SIGCONT, B redials, the same instance resumes, nothing that was
    published is lost, and no gap is reported."""
    a, b = pair(transport)
    with tensorbus.connect(a.url) as ca, tensorbus.connect(b.url) as cb:
        sub = cb.subscribe("x/>")
        wait_for(lambda: any("x/>" in lk["interest"] for lk in links(a.url)), what="interest")
        pub = ca.publisher("x/y")
        pub.send(b"before")
        assert bytes(sub.recv(timeout=5).data) == b"before"
        b.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: links(a.url)[0]["state"] == "down", what="link down on A")
            pub.send(b"while stopped")  # waits in A's ring: B's cursor is kept (grace)
        finally:
            b.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: links(a.url)[0]["state"] == "up", what="link up again")
        pub.send(b"after")
        assert [bytes(sub.recv(timeout=5).data) for _ in range(2)] == [b"while stopped", b"after"]
        assert links(a.url)[0]["reconnects"] >= 1 and links(b.url)[0]["gaps"] == 0


def test_garbage_on_a_link_closes_that_link_and_the_daemon_lives(daemon_factory, tmp_path):
    """Attached links are trusted with framing, not content: malformed
    control, batches, bodies and chunks close the link, and the daemon goes
    on serving (a new link works)."""
    import random

    import msgpack
    import zmq

    a = daemon_factory("--tcp", "127.0.0.1:*", "--transport", "tcp", path=tmp_path / "a")
    rng = random.Random(6)
    bad_messages = [
        [W.CONTROL, b"\xff\xfe"],
        [W.CONTROL, msgpack.packb({"t": "credit", "grants": [[1, -5, "x"]]})],
        [W.CONTROL, msgpack.packb({"t": "interest", "add": [1, 2]})],
        [
            W.CONTROL,
            msgpack.packb(
                {
                    "t": "topic",
                    "id": 1,
                    "name": "$sys/x",
                    "qos": "reliable",
                    "capacity": 3,
                    "slot_size": 1,
                }
            ),
        ],
        [W.DATA, bytes(rng.randrange(256) for _ in range(300))],
        [W.DATA, W.encode_batch_entry(W.BYTES, 0, 99, 0, 3) + b"abc"],  # unannounced topic
        [W.DATA, W.encode_batch_entry(W.BODY, 0, 1, 0, 1 << 62, "<f4", None, (1,))],
        [W.BODY_CHUNK, b"nobody expects me"],
        [b"Z", b"unknown kind"],
        [W.CONTROL],
    ]
    ctx = zmq.Context.instance()
    for frames in bad_messages:
        with tensorbus.connect(tcp_of(a), name="fuzzer") as client:
            reply = client._request("link", kind="client", name="fuzzer", transport="tcp")
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(reply["endpoint"])
            sock.send_multipart(
                [W.CONTROL, W.encode_control("attach", link=reply["link"], secret=reply["secret"])]
            )
            if frames[0] == W.DATA and len(frames) > 1 and b"<f4" in frames[1]:
                sock.send_multipart(
                    [
                        W.CONTROL,
                        W.encode_control(
                            "topic", id=1, name="fz/t", qos="reliable", capacity=8, slot_size=64
                        ),
                    ]
                )
            sock.send_multipart(frames)
            time.sleep(0.1)
            sock.close(0)
    assert a.proc.poll() is None  # alive
    with tensorbus.connect(a.url) as local, tensorbus.connect(tcp_of(a)) as remote:
        sub = local.subscribe("ok/>")
        remote.publisher("ok/t").send(b"still serving")
        assert bytes(sub.recv(timeout=5).data) == b"still serving"


def test_a_reliable_message_that_cannot_be_published_is_a_gap(daemon_factory, tmp_path):
    """A message the receiving daemon cannot publish (here: a dtype tag it
    does not know) is not dropped in silence on a reliable topic: its
    subscribers get GapError in its place, then the stream goes on."""
    import zmq

    a = daemon_factory("--tcp", "127.0.0.1:*", "--transport", "tcp", path=tmp_path / "a")
    with tensorbus.connect(a.url) as local, tensorbus.connect(tcp_of(a)) as remote:
        sub = local.subscribe("odd/t")
        reply = remote._request("link", kind="client", name="odd", transport="tcp")
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(reply["endpoint"])
        try:
            for kind, fields in (
                ("attach", {"link": reply["link"], "secret": reply["secret"]}),
                (
                    "topic",
                    {"id": 1, "name": "odd/t", "qos": "reliable", "capacity": 8, "slot_size": 256},
                ),
            ):
                sock.send_multipart([W.CONTROL, W.encode_control(kind, **fields)])
            batch = W.encode_batch_entry(W.BYTES, 0, 1, 0, 6) + b"before"
            batch += W.encode_batch_entry(W.TENSOR, 0, 1, 1, 4, "nope", None, (1,)) + b"????"
            batch += W.encode_batch_entry(W.BYTES, 0, 1, 2, 5) + b"after"
            sock.send_multipart([W.DATA, batch])
            assert bytes(sub.recv(timeout=5).data) == b"before"
            with pytest.raises(GapError, match="could not be published"):
                sub.recv(timeout=5)
            assert bytes(sub.recv(timeout=5).data) == b"after"
        finally:
            sock.close(0)


def test_a_light_client_hears_of_a_gap_too(daemon_factory, tmp_path):
    """A gap marker in a ring a light client reads reaches it as GapError,
    in its place (the bridge forwards markers to clients, never to daemons)."""
    import msgpack

    from tensorbus._core import FLAG_GAP

    a = daemon_factory("--tcp", "127.0.0.1:*", "--transport", "tcp", path=tmp_path / "a")
    marker = msgpack.packb({"topic": "g/t", "peer": "tcp://x:1", "received": 1, "reason": "test"})
    with tensorbus.connect(a.url) as local, tensorbus.connect(tcp_of(a)) as remote:
        sub = remote.subscribe("g/>")
        wait_for(lambda: links(a.url) and links(a.url)[0]["interest"] == ["g/>"], what="interest")
        pub = local.publisher("g/t")
        pub.send(b"a")
        pub._pub.send(marker, flags=FLAG_GAP)
        pub.send(b"b")
        assert bytes(sub.recv(timeout=5).data) == b"a"
        with pytest.raises(GapError, match="test"):
            sub.recv(timeout=5)
        assert bytes(sub.recv(timeout=5).data) == b"b"
        assert links(a.url)[0]["bad"] == 0


def test_recv_batch_keeps_its_first_message_when_a_gap_follows(daemon):
    import msgpack

    from tensorbus._core import FLAG_GAP

    marker = msgpack.packb({"topic": "g/t", "peer": "p", "received": 1, "reason": "test"})
    with tensorbus.connect(daemon.url) as c:
        sub = c.subscribe("g/t")
        pub = c.publisher("g/t")
        pub.send(b"first")
        pub._pub.send(marker, flags=FLAG_GAP)
        time.sleep(0.05)
        assert [bytes(m.data) for m in sub.recv_batch(10, 1)] == [b"first"]
        with pytest.raises(GapError):
            sub.recv_batch(10, 1)


def test_daemons_that_dial_each_other_keep_one_link(daemon_factory, tmp_path):
    """Both list the other as a peer: one link is up (the other dial is
    refused with redundant_link and stands by; its peer entry may remain)
    and messages cross once."""
    port_a, port_b = free_port(), free_port()
    common = ("--transport", "tcp", "--heartbeat", "0.2")
    a = daemon_factory(
        "--tcp",
        f"127.0.0.1:{port_a}",
        "--peer",
        f"tcp://127.0.0.1:{port_b}",
        *common,
        path=tmp_path / "a",
    )
    b = daemon_factory(
        "--tcp",
        f"127.0.0.1:{port_b}",
        "--peer",
        f"tcp://127.0.0.1:{port_a}",
        *common,
        path=tmp_path / "b",
    )
    with tensorbus.connect(a.url) as ca, tensorbus.connect(b.url) as cb:
        sub = cb.subscribe("ctl/>")
        pub = ca.publisher("ctl/x", qos="realtime")
        wait_for(
            lambda: any(
                link["state"] == "up" and "ctl/>" in link["interest"] for link in links(a.url)
            ),
            what="link up",
        )
        time.sleep(1.0)  # a second dial, if any, has been answered by now
        for url in (a.url, b.url):
            assert sum(link["state"] == "up" for link in links(url)) == 1
        pub.send(b"once")
        assert bytes(sub.recv(timeout=5).data) == b"once"
        with pytest.raises(tensorbus.ReceiveTimeout):
            sub.recv(timeout=0.3)


def test_a_dialer_sends_the_body_chunks_its_acceptor_takes():
    from tensorbus.broker.dial import chunk_bytes_of
    from tensorbus.broker.link import CHUNK_BYTES, MAX_CHUNK_BYTES

    assert chunk_bytes_of({}) == CHUNK_BYTES == 2 << 20  # an older release says nothing
    assert chunk_bytes_of({"max_chunk": 8 << 20}) == MAX_CHUNK_BYTES == 8 << 20
    assert chunk_bytes_of({"max_chunk": 1 << 30}) == MAX_CHUNK_BYTES  # never more than ours
    for bad in (1024, "8MiB", None, True, 3.5):
        assert chunk_bytes_of({"max_chunk": bad}) == CHUNK_BYTES
