"""The tcp data stream of a link (broker/bridge_stream.py), byte by byte
against a real daemon: who may attach one, its framing (frames split
anywhere, bodies raw after their batch), and what a bad byte costs (the
link, never the daemon)."""

import socket
import time

import numpy as np
import pytest
from daemons import tcp_of, wait_for

import tensorbus
from tensorbus.broker import peer_wire as W
from tensorbus.broker.bridge_stream import HEADER, hello

pytestmark = pytest.mark.timeout(60)


def frame(kind: bytes, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), kind[0]) + payload


def closed(sock: socket.socket) -> bool:
    """Whether the daemon closed ``sock``: what it sent first (a bye, say)
    is skipped; waits up to the socket's timeout for the end."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:  # closed with our bytes unread
        return True
    except TimeoutError:
        return False
    return True


def links(url) -> list:
    with tensorbus.connect(url, name="probe") as c:
        return c.stats()["broker"]["links"]


@pytest.fixture
def acceptor(daemon_factory, tmp_path):
    return daemon_factory(
        "--tcp", "127.0.0.1:*", "--transport", "tcp", "--heartbeat", "0.2", path=tmp_path / "a"
    )


class FakeDialer:
    """The dialing side of a link, by hand: the ``link`` op (asking for a
    stream), the link channel's attach, and a raw stream socket."""

    def __init__(self, daemon, attach=True):
        import zmq

        self.remote = tensorbus.connect(tcp_of(daemon), name="fake-dialer")
        self.reply = self.remote._request(
            "link", kind="client", name="fake-dialer", transport="tcp", stream=True
        )
        self.zsock = zmq.Context.instance().socket(zmq.DEALER)
        self.zsock.setsockopt(zmq.LINGER, 0)
        self.zsock.connect(self.reply["endpoint"])
        if attach:
            link, secret = self.reply["link"], self.reply["secret"]
            self.zsock.send_multipart(
                [W.CONTROL, W.encode_control("attach", link=link, secret=secret)]
            )
        self.stream = socket.create_connection(("127.0.0.1", self.reply["stream_port"]), timeout=5)

    def say_hello(self, secret=None):
        self.stream.sendall(hello(self.reply["link"], secret or self.reply["secret"]))

    def send_split(self, data: bytes, pieces: int = 7) -> None:
        """Send ``data`` in uneven pieces, each its own segment."""
        cuts = sorted({0, len(data), *np.random.default_rng(1).integers(0, len(data), pieces)})
        for start, stop in zip(cuts, cuts[1:], strict=False):
            self.stream.sendall(data[start:stop])
            time.sleep(0.002)

    def closed_by_daemon(self) -> bool:
        return closed(self.stream)

    def close(self):
        self.stream.close()
        self.zsock.close(0)
        self.remote.close()


def test_a_daemon_link_over_tcp_asks_for_and_gets_a_stream(acceptor):
    dialer = FakeDialer(acceptor)
    try:
        assert 0 < dialer.reply["stream_port"] < 65536
        dialer.say_hello()
        wait_for(lambda: [lk["data"] for lk in links(acceptor.url)] == ["stream"], what="stream")
    finally:
        dialer.close()


def test_strangers_and_wrong_secrets_are_shut_out(acceptor):
    dialer = FakeDialer(acceptor)
    try:
        port = dialer.reply["stream_port"]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as stranger:
            stranger.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(40))
            assert closed(stranger)  # not a hello
        dialer.say_hello(secret="0" * 32)
        assert dialer.closed_by_daemon()
        # The right secret on a new connection still attaches the link.
        dialer.stream = socket.create_connection(("127.0.0.1", port), timeout=5)
        dialer.say_hello()
        wait_for(lambda: [lk["data"] for lk in links(acceptor.url)] == ["stream"], what="stream")
    finally:
        dialer.close()
    assert acceptor.proc.poll() is None


def test_frames_split_anywhere_and_raw_bodies_are_delivered(acceptor):
    """A topic announcement, a batch of bytes, a tensor whose body follows
    its batch raw (into an arena loan), and a message after it: all in
    order, whatever the segments' boundaries."""
    body = np.arange(300_000, dtype=np.float32)
    with tensorbus.connect(acceptor.url) as local:
        sub = local.subscribe("st/t")
        dialer = FakeDialer(acceptor)
        try:
            dialer.say_hello()
            announce = W.encode_control(
                "topic", id=1, name="st/t", qos="reliable", capacity=8, slot_size=256
            )
            batch = W.encode_batch_entry(W.BYTES, 0, 1, 0, 5) + b"first"
            batch += W.encode_batch_entry(W.BODY, 0, 1, 1, body.nbytes, "<f4", None, body.shape)
            after = W.encode_batch_entry(W.BYTES, 0, 1, 2, 4) + b"last"
            stream = frame(W.CONTROL, announce) + frame(W.DATA, batch) + body.tobytes()
            stream += frame(W.DATA, after)
            dialer.send_split(stream, pieces=9)
            assert bytes(sub.recv(timeout=5).data) == b"first"
            m = sub.recv(timeout=5)
            assert m.data.dtype == np.float32 and np.array_equal(m.data, body)
            m.release()
            assert bytes(sub.recv(timeout=5).data) == b"last"
        finally:
            dialer.close()


@pytest.mark.parametrize(
    "bad",
    [
        HEADER.pack(5, ord("Z")) + b"hello",  # an unknown kind
        HEADER.pack(1 << 31, W.DATA[0]),  # longer than any link message
        frame(W.DATA, W.encode_batch_entry(W.BYTES, 0, 42, 0, 3) + b"abc"),  # unannounced
        frame(W.CONTROL, b"\xc1 not msgpack"),
    ],
    ids=["kind", "length", "unannounced", "control"],
)
def test_a_bad_frame_costs_the_link_not_the_daemon(acceptor, bad):
    dialer = FakeDialer(acceptor)
    try:
        dialer.say_hello()
        wait_for(lambda: [lk["data"] for lk in links(acceptor.url)] == ["stream"], what="stream")
        dialer.stream.sendall(bad)
        assert dialer.closed_by_daemon()
        wait_for(lambda: not links(acceptor.url), what="the link dropped")
    finally:
        dialer.close()
    assert acceptor.proc.poll() is None
    with tensorbus.connect(acceptor.url) as local:  # still serving
        sub = local.subscribe("ok/t")
        local.publisher("ok/t").send(b"alive")
        assert bytes(sub.recv(timeout=5).data) == b"alive"


def test_a_stream_that_never_comes_takes_its_link_down(acceptor):
    """The link channel attached, the stream never said hello: the link
    goes down after the attach time (3 heartbeats, at least 1 s)."""
    dialer = FakeDialer(acceptor)
    try:
        wait_for(lambda: links(acceptor.url), what="the link")
        wait_for(lambda: not links(acceptor.url), timeout=10, what="the link dropped")
        assert dialer.closed_by_daemon()  # and the silent connection is closed too
    finally:
        dialer.close()


def test_a_wildcard_host_listens_for_streams_on_every_address(daemon_factory, tmp_path):
    """``--tcp '*:*'`` (ZeroMQ's wildcard) binds the stream port on every
    IPv4 address too: a peer dialing 127.0.0.1 gets a stream link."""
    common = ("--transport", "tcp", "--heartbeat", "0.2", "--insecure")
    a = daemon_factory("--tcp", "*:*", *common, path=tmp_path / "a")
    port = tcp_of(a).rsplit(":", 1)[1]
    b = daemon_factory(
        "--tcp", "127.0.0.1:*", "--peer", f"tcp://127.0.0.1:{port}", *common, path=tmp_path / "b"
    )
    wait_for(lambda: [lk["data"] for lk in links(b.url)] == ["stream"], what="a stream link")
    with tensorbus.connect(a.url) as ca, tensorbus.connect(b.url) as cb:
        sub = cb.subscribe("w/t")
        wait_for(lambda: any("w/t" in lk["interest"] for lk in links(a.url)), what="interest")
        ca.publisher("w/t").send(b"over the stream")
        assert bytes(sub.recv(timeout=5).data) == b"over the stream"


def test_a_stream_port_in_use_stops_the_start_with_a_sentence(daemon_factory, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        d = daemon_factory(
            "--tcp", "127.0.0.1:*", "--stream-port", str(port), path=tmp_path / "a", wait=False
        )
        assert d.proc.wait(15) != 0
        assert f"cannot listen for data streams on 127.0.0.1:{port}" in d.proc.stderr.read()
