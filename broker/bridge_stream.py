"""The tcp data path of a link: a plain TCP stream that the daemon's event
loop writes and reads itself, beside the link's ZeroMQ channel.

Design notes (docs/bridge.md has the full story):

* Why not ZeroMQ: every ZeroMQ send wakes its I/O thread, and every
  receive is handed over by it, so a message crossing a link paid four
  thread hand-offs more than the wire needs (about 50 µs each on two
  cores, where the I/O thread takes the core the loop needs). Here the
  loop's ``send`` puts the bytes in the kernel, and the peer's loop wakes
  on the socket itself: a 64 B round trip crosses six hand-offs, as raw
  ZeroMQ REQ/REP does. Large bodies go from our arena to the kernel, and
  from the kernel into the receiver's arena loan: no staging copy.
* Who uses it: daemon links over tcp without CURVE. CURVE encrypts, so an
  encrypted cluster's data stays on ZeroMQ; so does a light client's,
  and a link to a daemon that announces no stream (an older release).
* Opening: the dialer asks for a stream in its ``link`` op; the acceptor
  answers with its stream port, and the dialer connects there and sends
  HELLO (magic, the acceptor's link id, the link's secret). A stranger's
  bytes or a wrong secret close the connection; a link whose stream does
  not come within the attach time goes down, and the dialer dials again.
* Framing: frames of an 8-byte header (u32 length, u8 kind, 3 bytes
  zero) and the payload: a batch (``D``) or a control message (``C``).
  The bodies a batch announces follow it on the stream, raw and in order,
  so the receiver reads each straight into its place (a loan in its arena).
  Every control message after the link channel's attach goes on it too
  (queued until the stream connects), so no two of them take different
  paths and overtake each other, and heartbeats say the data path is alive.
* Sending never blocks: what the kernel does not take waits in our queue
  (counted as in flight, which holds the pump back) and is written when
  the socket is writable again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import secrets
import socket
import struct
import time
from typing import TYPE_CHECKING

from tensorbus.broker import peer_wire as W
from tensorbus.broker.link import MAX_LINK_MESSAGE, Expected

if TYPE_CHECKING:
    from tensorbus.broker.bridge import Bridge
    from tensorbus.broker.link import Link

__all__ = ["HELLO", "HEADER", "StreamData", "StreamListener", "hello"]

log = logging.getLogger("tensorbus.bridge")

MAGIC = b"TBSTRM01"
HELLO = struct.Struct("<8sQ32s")  # magic, the acceptor's link id, the link's secret
HEADER = struct.Struct("<IB3x")  # payload length, kind
_KIND = {W.DATA[0]: W.DATA, W.CONTROL[0]: W.CONTROL}
READ_BUFFER = 256 << 10  # grown to fit a larger frame
BURST = 64  # reads per wake-up, so one busy link cannot starve the rest
WRITE_PARTS = 64  # buffers per sendmsg
MAX_STRANGERS = 64  # connections not yet past HELLO


def attach_s(config) -> float:
    """How long a stream may take to come (and say HELLO): three heartbeats,
    at least 1 s."""
    return max(1.0, 3 * config.heartbeat_s)


def hello(link_id: int, secret: str) -> bytes:
    return HELLO.pack(MAGIC, link_id, secret.encode())


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    # A lone small message goes at once: Nagle would hold it for the
    # acknowledgement of the last one (up to 40 ms).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class StreamData:
    """One link's data over a TCP stream: batches, their bodies and the
    control messages, in order. Until the socket is there (the dialer
    connecting, the acceptor waiting for HELLO) what is sent waits in the
    queue."""

    kind = "stream"
    # Every control message goes on the stream (queued until it connects):
    # interest travels as changes and groups as whole lists, which must not
    # overtake each other by taking two paths.
    takes_control = True

    def __init__(self, bridge: Bridge, link: Link):
        self.bridge = bridge
        self.link = link
        self.loop = bridge.loop
        self.sock: socket.socket | None = None
        self.out: collections.deque = collections.deque()  # memoryviews, in order
        self.inflight = 0  # bytes in self.out
        self.writing = False  # a writer is armed (the kernel's buffer was full)
        self.reading = False  # a reader is armed
        self.buf = bytearray(READ_BUFFER)
        self.view = memoryview(self.buf)
        self.start = self.end = 0  # unparsed bytes: buf[start:end]
        self.closed = False
        self.task: asyncio.Task | None = None
        self.deadline = self.loop.call_later(attach_s(bridge.config), self._late)

    @property
    def connected(self) -> bool:
        return self.sock is not None

    # -- opening -----------------------------------------------------------

    def dial(self, host: str, port: int, acceptor_link: int, secret: str) -> None:
        """Dialing side: connect to the acceptor's stream port and say HELLO."""
        self.task = self.loop.create_task(self._dial(host, port, hello(acceptor_link, secret)))

    async def _dial(self, host: str, port: int, greeting: bytes) -> None:
        try:
            infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, _, _, _, address = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                _tune(sock)
                await self.loop.sock_connect(sock, address)
                await self.loop.sock_sendall(sock, greeting)
            except BaseException:
                sock.close()
                raise
        except asyncio.CancelledError:
            raise
        except OSError as exc:
            self.link.down(f"data stream to {host}:{port}: {exc}")
            return
        if self.closed:
            sock.close()
            return
        self.attach(sock)

    def attach(self, sock: socket.socket) -> None:
        """The stream is connected (and, accepting, past HELLO): write what
        waited, and read it once the link is up. An acceptor may see HELLO
        before the link channel's attach: what the stream brings belongs to
        the link's epoch, which starts at link up."""
        self.deadline.cancel()
        self.sock = sock
        self.link_up()
        self._write()

    def link_up(self) -> None:
        """Start reading, if both the stream and the link are up."""
        if self.sock is not None and self.link.up and not self.reading and not self.closed:
            self.reading = True
            self.loop.add_reader(self.sock.fileno(), self._readable)

    def _late(self) -> None:
        if not self.connected and not self.closed:
            self.link.down("its data stream did not connect in time")

    # -- sending -----------------------------------------------------------

    def send(self, batch, bodies: list) -> None:
        """A batch, then its bodies raw (the receiver knows their sizes)."""
        self._queue(W.DATA, batch, bodies)

    def send_control(self, body: bytes) -> None:
        self._queue(W.CONTROL, body, ())

    def _queue(self, kind: bytes, payload, bodies) -> None:
        if self.closed:
            return
        if len(payload) > MAX_LINK_MESSAGE:
            raise ValueError(f"a link frame of {len(payload)} bytes exceeds {MAX_LINK_MESSAGE}")
        out = self.out
        header = HEADER.pack(len(payload), kind[0])
        out.append(memoryview(header))
        out.append(memoryview(payload))
        nbytes = len(header) + len(payload)
        for body in bodies:
            view = memoryview(body)
            if view.ndim != 1 or view.format != "B":
                view = view.cast("B")
            out.append(view)
            nbytes += len(view)
        self.inflight += nbytes
        if not self.writing:
            self._write()

    def _write(self) -> None:
        """Hand the kernel what it takes now; arm a writer for the rest."""
        sock, out = self.sock, self.out
        if sock is None or self.closed:
            return
        while out:
            try:
                sent = sock.sendmsg(list(itertools.islice(out, WRITE_PARTS)))
            except (BlockingIOError, InterruptedError):
                if not self.writing:
                    self.writing = True
                    self.loop.add_writer(sock.fileno(), self._writable)
                return
            except OSError as exc:
                self._fail(f"data stream send failed: {exc}")
                return
            self.inflight -= sent
            while sent:
                head = out[0]
                if len(head) <= sent:
                    sent -= len(head)
                    out.popleft()
                else:
                    out[0] = head[sent:]
                    sent = 0
        if self.writing:
            self.writing = False
            self.loop.remove_writer(sock.fileno())

    def _writable(self) -> None:
        self._write()
        self.link.peer.kick()  # the in-flight budget may have room again

    # -- receiving ---------------------------------------------------------

    def _body_head(self) -> Expected | None:
        """The body the stream's next bytes belong to, if any."""
        expect = self.link.expect
        if expect:
            head = expect[0]
            if head.entry.kind == W.BODY and head.offset < head.entry.nbytes:
                return head
        return None

    def _readable(self) -> None:
        link = self.link
        sock = self.sock
        try:
            for _ in range(BURST):
                if self.closed:
                    return
                head = self._body_head()
                if head is not None and self.start == self.end:
                    # Straight from the kernel into the body's place.
                    view = memoryview(head.dest).cast("B")[head.offset :]
                    got = sock.recv_into(view)
                    if got:
                        head.offset += got
                        if head.offset == head.entry.nbytes:
                            link._advance()
                    want = len(view)
                else:
                    self._make_room()
                    want = len(self.buf) - self.end
                    got = sock.recv_into(self.view[self.end :])
                    self.end += got
                    self._parse()
                if not got:
                    self._fail("the peer closed its data stream")
                    return
                if got < want and head is None:
                    # The socket is empty: the next bytes wake us again. A
                    # body reads on until EAGAIN: its sender is writing now,
                    # and a turn of the loop per short read halved tensors'
                    # throughput (4 MiB one way: 2.1 against 3.6 GB/s).
                    break
            link.last_rx = time.monotonic()
        except (BlockingIOError, InterruptedError):
            link.last_rx = time.monotonic()
        except OSError as exc:
            self._fail(f"data stream receive failed: {exc}")
        except Exception as exc:  # a peer's bytes never take the daemon down
            self._fail(link.bad_message(exc))

    def _make_room(self) -> None:
        if self.start == self.end:
            self.start = self.end = 0
            if len(self.buf) > READ_BUFFER:  # a large frame went: give its room back
                self.buf = bytearray(READ_BUFFER)
                self.view = memoryview(self.buf)
        elif len(self.buf) - self.end < 4096:
            self._compact(len(self.buf))

    def _compact(self, size: int) -> None:
        """Move the unparsed bytes to the front of a buffer of ``size``."""
        pending = self.view[self.start : self.end]
        if size != len(self.buf):
            fresh = bytearray(size)
            fresh[: len(pending)] = pending
            self.buf = fresh
            self.view = memoryview(self.buf)
        else:
            self.buf[: len(pending)] = bytes(pending)
        self.end -= self.start
        self.start = 0

    def _parse(self) -> None:
        """Act on every whole frame buffered, and fill the body the stream is in."""
        link = self.link
        view = self.view
        while self.start < self.end:
            head = self._body_head()
            if head is not None:
                take = min(self.end - self.start, head.entry.nbytes - head.offset)
                dest = memoryview(head.dest).cast("B")
                dest[head.offset : head.offset + take] = view[self.start : self.start + take]
                head.offset += take
                self.start += take
                if head.offset == head.entry.nbytes:
                    link._advance()
                continue
            if self.end - self.start < HEADER.size:
                break
            length, kind = HEADER.unpack_from(self.buf, self.start)
            if length > MAX_LINK_MESSAGE or kind not in _KIND:
                raise W.WireError(f"a bad data stream frame (kind {kind}, {length} bytes)")
            whole = HEADER.size + length
            if self.end - self.start < whole:
                if whole > len(self.buf):
                    self._compact(whole + READ_BUFFER)
                break
            payload = self.view[self.start + HEADER.size : self.start + whole]
            self.start += whole
            if _KIND[kind] == W.CONTROL:
                self.bridge.on_control(link, bytes(payload))
            else:
                for entry in link.peer.batch_entries(payload, bool(link.expect)):
                    link.expect.append(Expected(entry))
                link._advance()
            if self.closed:  # a control message (bye) may have closed the link
                return

    # -- closing -----------------------------------------------------------

    def _fail(self, reason: str) -> None:
        """The stream is broken: so is the link (reported once)."""
        self._stop_reading()
        self.link.down(reason)

    def _stop_reading(self) -> None:
        if self.sock is not None and self.reading:
            self.reading = False
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.sock.fileno())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.deadline.cancel()
        if self.task is not None:
            self.task.cancel()
        if self.sock is not None:
            self._stop_reading()
            if self.writing:
                with contextlib.suppress(Exception):
                    self.loop.remove_writer(self.sock.fileno())
            self.sock.close()
            self.sock = None
        self.out.clear()
        self.inflight = 0


class StreamListener:
    """The acceptor's stream port: connections that say HELLO with a link's
    id and secret become that link's data stream; any other is closed."""

    def __init__(self, bridge: Bridge, host: str, port: int):
        """Listen on ``host`` (as ``--tcp`` names it: ``*`` is every IPv4
        address, as for ZeroMQ) and ``port`` (0: any free one); OSError
        where that cannot be bound."""
        self.bridge = bridge
        self.loop = bridge.loop
        if host == "*":
            family, address = socket.AF_INET, ("0.0.0.0", port)
        else:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, address = info[0][0], info[0][4]
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(address)
            self.sock.listen(128)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.port = self.sock.getsockname()[1]
        self.strangers: dict[int, tuple[socket.socket, bytearray, asyncio.TimerHandle]] = {}
        self.loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(16):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("data stream accept failed: %s", exc)
                return
            if len(self.strangers) >= MAX_STRANGERS:
                conn.close()  # too many silent connections: a flood, not peers
                continue
            _tune(conn)
            fd = conn.fileno()
            timer = self.loop.call_later(
                attach_s(self.bridge.config), self._drop, fd, "no hello in time"
            )
            self.strangers[fd] = (conn, bytearray(), timer)
            self.loop.add_reader(fd, self._hello, fd)

    def _hello(self, fd: int) -> None:
        conn, got, _ = self.strangers[fd]
        try:
            chunk = conn.recv(HELLO.size - len(got))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(fd, str(exc))
            return
        if not chunk:
            self._drop(fd, "closed before its hello")
            return
        got += chunk
        if len(got) < HELLO.size:
            return
        magic, link_id, secret = HELLO.unpack(got)
        link = self.bridge.links.get(link_id)
        data = link.data if link is not None else None
        if (
            magic != MAGIC
            or not isinstance(data, StreamData)
            or data.connected
            or data.closed
            or not secrets.compare_digest(link.secret.encode(), secret)
        ):
            self._drop(fd, "a hello with a wrong magic, link id or secret")
            return
        self._forget(fd)
        data.attach(conn)

    def _forget(self, fd: int) -> None:
        conn, _, timer = self.strangers.pop(fd)
        timer.cancel()
        with contextlib.suppress(Exception):
            self.loop.remove_reader(fd)

    def _drop(self, fd: int, why: str) -> None:
        if fd in self.strangers:
            conn = self.strangers[fd][0]
            self._forget(fd)
            conn.close()
            log.warning("data stream connection refused: %s", why)

    def close(self) -> None:
        for fd in list(self.strangers):
            self._drop(fd, "the daemon stops")
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
