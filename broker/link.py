"""Link life: one link channel (:class:`Link`) and the reader of a ZeroMQ
socket on the event loop (:class:`Watch`).

Heartbeats go on the link channel (on its stream, where it has one); a link
silent for three periods is down.
Where the data stays on ZeroMQ (CURVE, light clients, older peers), bodies
travel in CHUNK_BYTES chunks fed to ZeroMQ only while less than
INFLIGHT_BYTES is queued, so control messages never wait long. Otherwise
``Link.data`` carries it: a tcp stream (broker/bridge_stream.py) or UCX
(broker/bridge_ucx.py).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import zmq

from tensorbus.broker import peer_wire as W
from tensorbus.broker.soon import Soon

if TYPE_CHECKING:
    from tensorbus.broker.bridge import Bridge
    from tensorbus.broker.peer import Peer

__all__ = [
    "CHUNK_BYTES",
    "MAX_CHUNK_BYTES",
    "INFLIGHT_BYTES",
    "MAX_LINK_MESSAGE",
    "Expected",
    "Link",
    "Remote",
    "Watch",
]

log = logging.getLogger("tensorbus.bridge")

# Beyond this much in flight on a link (and one message), lower classes
# wait. tcp: ZeroMQ's queue is first in, first out, so keep it short; UCX
# sends each message on its own, so it can hold several tensors.
INFLIGHT_BYTES = {"tcp": 16 << 20, "ucx": 256 << 20}
# tcp: bodies travel in chunks, so control never waits long. Every release
# takes CHUNK_BYTES; this one takes chunks up to MAX_CHUNK_BYTES and says so
# in its link reply (``max_chunk``), so its dialers send it fewer, larger
# ones (a 4 MiB DDP shard in one message, not two: less daemon CPU per step).
# A dialer's socket takes any size: what an acceptor sends is not bounded.
CHUNK_BYTES = 2 << 20
MAX_CHUNK_BYTES = 8 << 20
MAX_LINK_MESSAGE = MAX_CHUNK_BYTES + (2 << 20)  # a chunk, or a batch, or a control message


class Remote(NamedTuple):
    """Who is at the other end of a link, as the link exchange said."""

    node: str
    name: str
    boot_id: str


@dataclass(slots=True)
class Expected:
    """An entry of a received batch, in order. A body's entry holds back
    those after it until all its chunks have landed in ``dest`` (a loan in
    our arena where ``loaned``, else a buffer copied in later)."""

    entry: W.Entry
    dest: object = None
    loaned: bool = False
    offset: int = 0  # bytes of the body received so far


class Link:
    """One link channel: the ZeroMQ connection (and, for UCX, the endpoint)
    of one epoch of a peer. ``send_control``/``send_data`` never block."""

    def __init__(
        self,
        bridge: Bridge,
        peer: Peer,
        link_id: int,
        secret: str,
        transport: str,
        sock=None,
        identity: bytes | None = None,
    ):
        self.bridge = bridge
        self.peer = peer
        self.id = link_id
        self.secret = secret
        self.transport = transport
        self.sock = sock  # dialing side: our DEALER; accepting side: the link ROUTER
        self.identity = identity
        self.up = False
        self.last_rx = time.monotonic()
        self.trackers: collections.deque = collections.deque()  # (tracker, nbytes)
        self.chunks: collections.deque = collections.deque()  # body chunks not yet sent
        self.unsent = 0  # their bytes
        self.queued = 0  # bytes of chunks ZeroMQ holds
        # The largest body chunk the other side takes: an acceptor says in
        # its link reply; a dialer's socket takes any (we send our largest).
        self.chunk_bytes = CHUNK_BYTES
        # Receiving: entries of batches in order; a body blocks those after it
        # until its chunks have all arrived.
        self.expect: collections.deque = collections.deque()
        # The data channel when data does not go on the ZeroMQ channel: a
        # UcxData (broker/bridge_ucx.py) or a StreamData (broker/bridge_stream.py).
        self.data = None
        self.ucx_peer_address: bytes | None = None
        self.ucx_send_tag = 0  # the tag base the peer receives our bodies on
        self.ucx_recv_tag = 0  # the tag base we receive its bodies on
        self.async_sock = None  # dialing side: the socket object that owns our DEALER
        self.watch: Watch | None = None  # what reads self.sock (the ROUTER's for accepted links)
        self.session = None  # accepting side: the control session that opened it
        self.pending = Remote("", "", "")  # who dialed, until attached
        self.remote_id = link_id  # dialed links: the id the peer gave, for attach
        self.closed = False

    def data_path(self) -> str:
        """What carries this link's data: "ucx", "stream" or "zeromq"."""
        return "zeromq" if self.data is None else self.data.kind

    def down(self, reason: str) -> None:
        """Report this link failed (soon, outside the caller's frame)."""
        if not self.closed:
            self.bridge.loop.call_soon(self.peer.link_down, reason, self)

    def send_ordered(self, body: bytes) -> None:
        """A control message that must stay in order with the data (a topic
        announcement, a resume): over UCX or a stream it goes with the data."""
        if self.data is not None:
            self.data.send_control(body)
        else:
            self.send_control(body)

    def _frames(self, frames: list) -> list:
        return frames if self.identity is None else [self.identity, *frames]

    def send_control(self, body: bytes) -> None:
        data = self.data
        if data is not None and data.takes_control:
            data.send_control(body)  # a stream: one socket, in order
            return
        try:
            self.sock.send_multipart(self._frames([W.CONTROL, body]), zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.down(f"send failed: {exc}")
        if self.watch is not None:
            self.watch.poke()

    def send_data(self, batch: bytearray, bodies: list) -> None:
        """Send a batch now; its bodies follow in CHUNK-sized messages, fed
        to ZeroMQ only while less than INFLIGHT_BYTES is queued there, so a
        heartbeat, a credit or a control topic never waits behind a whole
        large tensor (ZeroMQ's queue and TCP are first in, first out)."""
        self.peer.counters["batches"] += 1
        if self.data is not None:
            self.data.send(batch, bodies)
            return
        try:
            # A batch is at most about BATCH_BYTES and credit bounds how many
            # wait in ZeroMQ: copied, not tracked (a tracker costs more than
            # the copy). Only body chunks count against the in-flight budget.
            self.sock.send_multipart(self._frames([W.DATA, batch]), zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.down(f"send failed: {exc}")
            if self.watch is not None:
                self.watch.poke()  # a failed send may have taken a waiting message's edge
            return
        if self.watch is not None:
            self.watch.poke()
        for body in bodies:
            view = memoryview(body).cast("B")
            step = self.chunk_bytes
            for at in range(0, len(view), step):
                self.chunks.append(view[at : at + step])
            self.unsent += len(view)
        self.flush()

    def flush(self) -> bool:
        """Feed queued body chunks to ZeroMQ; True while any are left or in
        flight (ZeroMQ says nothing when it has sent one: the pump looks
        again shortly). Another data channel feeds its transport itself and
        kicks the pump when its in-flight budget frees: False."""
        if self.data is not None:
            return False
        while self.trackers and self.trackers[0][0].done:
            self.queued -= self.trackers.popleft()[1]
        while self.chunks and self.queued < INFLIGHT_BYTES["tcp"] and self.sock is not None:
            chunk = self.chunks.popleft()
            self.unsent -= len(chunk)
            try:
                tracker = self.sock.send_multipart(
                    self._frames([W.BODY_CHUNK, chunk]), zmq.NOBLOCK, copy=False, track=True
                )
            except zmq.ZMQError as exc:
                self.down(f"send failed: {exc}")
                if self.watch is not None:
                    self.watch.poke()  # a failed send may have taken a waiting message's edge
                return False
            self.trackers.append((tracker, len(chunk)))
            self.queued += len(chunk)
            if self.watch is not None:
                self.watch.poke()
        return bool(self.chunks or self.trackers)

    def inflight(self) -> int:
        """Bytes handed to the transport and not yet sent, and waiting to be."""
        if self.data is not None:
            return self.data.inflight
        self.flush()
        return self.queued + self.unsent

    # -- receiving ---------------------------------------------------------

    def read(self, sock) -> None:
        """Read the rest of one message (its first frame is next) and act."""
        self.last_rx = time.monotonic()
        kind = sock.recv()
        more = sock.getsockopt(zmq.RCVMORE)
        try:
            if not more:
                raise W.WireError("a link message without a body")
            if kind == W.CONTROL:
                body = sock.recv()
                drain(sock)
                self.bridge.on_control(self, body)
            elif kind == W.DATA:
                frame = sock.recv(copy=False).buffer
                drain(sock)
                for entry in self.peer.batch_entries(frame, bool(self.expect)):
                    self.expect.append(Expected(entry))
                self._advance()
            elif kind == W.BODY_CHUNK:
                self._on_chunk(sock)
                drain(sock)
                self._advance()
            else:
                drain(sock)
                raise W.WireError(f"unknown link frame kind {bytes(kind)[:8]!r}")
        except Exception as exc:  # a peer's bytes never take the daemon down
            drain(sock)
            self.down(self.bad_message(exc))

    def bad_message(self, exc: Exception) -> str:
        """Log and count a received message that failed (its bytes, or our
        handling of them: then with the traceback; call it in the except
        block); the reason the link goes down with."""
        if not isinstance(exc, W.WireError):
            log.exception("link %s: handling a message failed", self.peer.name)
        log.warning("link %s: %s; closing it", self.peer.name, exc)
        self.peer.counters["bad"] += 1
        return f"protocol error: {exc}"

    def _advance(self) -> None:
        """Deliver the expected entries that are complete, in order; give
        the body at the head a place to land (a loan in our arena)."""
        peer = self.peer
        expect = self.expect
        while expect:
            head = expect[0]
            entry = head.entry
            if entry.kind != W.BODY:
                expect.popleft()
                peer.deliver(entry)
                continue
            if head.dest is None:
                dest = peer.loan_for(entry)
                head.loaned = dest is not None
                head.dest = dest if dest is not None else np.empty(entry.nbytes, np.uint8)
            if head.offset < entry.nbytes:
                break  # chunks still to come
            expect.popleft()
            peer.deliver(entry, head.dest, loaned=head.loaned)
        peer.flush_grants()

    def _on_chunk(self, sock) -> None:
        """The next chunk of the body at the head: straight into its place."""
        if not self.expect or self.expect[0].entry.kind != W.BODY:
            raise W.WireError("a body chunk nobody expects")
        head = self.expect[0]
        entry, offset = head.entry, head.offset
        if head.dest is None:
            self._advance()
        got = sock.recv_into(memoryview(head.dest)[offset:])
        if got > entry.nbytes - offset:
            raise W.WireError(f"a body chunk runs past its body of {entry.nbytes} bytes")
        head.offset = offset + got

    def close(self) -> None:
        self.closed = True
        self.up = False
        if self.data is not None:
            self.data.close()
            self.data = None
        if self.async_sock is not None:  # our own DEALER: stop reading it, close it
            if self.watch is not None:
                self.watch.close()
            self.async_sock.close(0)  # the shadow in self.sock goes with it
            self.async_sock = None
        self.watch = None
        self.sock = None
        self.bridge.links.pop(self.id, None)
        if self.identity is not None and self.bridge.by_identity.get(self.identity) is self:
            del self.bridge.by_identity[self.identity]


class Watch:
    """Reads a ZeroMQ socket from the event loop without zmq.asyncio.

    ZeroMQ's FD is edge-triggered, and any operation on the socket (a send
    included) may consume the edge of a message that is waiting. So the
    reader drains while ``EVENTS`` says POLLIN, and every send on the
    socket schedules another look (``poke``): no message waits for an
    unrelated wake-up. zmq.asyncio's poll added hundreds of microseconds
    per hop here."""

    BURST = 64  # messages per turn of the loop, so one busy link cannot starve the rest

    def __init__(self, loop, sock, handle):
        self.loop = loop
        self.sock = sock
        self.handle = handle  # handle(sock): read one whole message
        self.fd = sock.getsockopt(zmq.FD)
        self.soon = Soon(self.drain)
        self.closed = False
        loop.add_reader(self.fd, self.drain)

    def poke(self) -> None:
        if not self.closed:
            self.soon()

    def drain(self) -> None:
        sock = self.sock
        for _ in range(self.BURST):
            if self.closed:
                return
            try:
                if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    return
                self.handle(sock)
            except zmq.ZMQError:
                return  # closed under us: its link is down
            except Exception:  # a peer's bytes never take the daemon down
                log.exception("link message failed")
        self.poke()  # more waiting: after the rest of the loop has had a turn

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.fd)


def drain(sock) -> None:
    """Skip the rest of a multipart message."""
    while sock.getsockopt(zmq.RCVMORE):
        sock.recv(copy=False)
