"""The light client: publish and subscribe through a daemon on another host.

A client that reaches its broker over ``tcp://`` shares no memory with it.
Its publishers and subscribers then speak the daemons' own link protocol
(broker/peer_wire.py, docs/bridge.md) on a link the broker opens for it:
messages travel over ZeroMQ, the broker publishes what the client sends into
its rings and forwards the topics the client subscribed to, under the same
per-topic credit as a link between daemons. Made for dashboards, notebooks
and laptops; trainers on a daemon's host use its shared memory instead.

Everything here runs in the caller's thread, under the link's lock: a
``send`` that waits for credit, or a ``recv`` that waits for a message,
reads the link socket meanwhile. The control connection has the client's
own lock, so heartbeats never wait behind a receive.

When the broker dies, the link dies with it: the client redials, attaches
a new link to the same :class:`LightLink` and says again what it
publishes and reads (clients/redial.py); what the old link had in flight
is lost, and each reliable subscriber hears of it as GapError.
"""

from __future__ import annotations

import collections
import threading
import time

import numpy as np
import zmq

from tensorbus._core import FLAG_GAP
from tensorbus._core import tensors as _tensors
from tensorbus._core.errors import BackpressureError, ReceiveTimeout
from tensorbus.broker import peer_wire as W
from tensorbus.broker.topics import matches, validate_pattern
from tensorbus.clients._shared import Endpoint
from tensorbus.clients.errors import (
    BrokerUnavailable,
    ClientClosed,
    GapError,
    ProtocolError,
    error_for,
)

__all__ = [
    "LightLink",
    "check_alive",
    "RemoteInlet",
    "RemoteMessage",
    "RemoteOutlet",
    "RemotePublisher",
    "RemoteSubscriber",
    "link_fields",
]

BATCH_BYTES = 64 << 10
CHUNK_BYTES = 2 << 20
LINK_CLOSED = "the broker closed this client's link"


def link_fields(name: str) -> dict:
    """The ``link`` request of a light client named ``name``."""
    return {"kind": "client", "name": name, "transport": "tcp"}


class RemoteMessage:
    """A message received over a link; the same reading API as a local
    :class:`tensorbus.Message` (``topic``, ``seq``, ``data``, ``dtype``,
    ``shape``, ``meta``, ``as_torch()``), always a private copy."""

    __slots__ = ("topic", "seq", "flags", "dtype", "shape", "meta", "_data", "timestamp_ns")

    def __init__(self, topic: str, entry: W.Entry, data):
        self.topic = topic
        self.seq = entry.seq
        self.flags = entry.flags
        self.dtype = entry.dtype
        self.shape = tuple(entry.shape) if entry.dtype is not None else None
        self.meta = entry.meta
        self._data = data
        self.timestamp_ns = 0  # the origin's clock is not carried

    @classmethod
    def gap(cls, topic: str, marker: bytes) -> RemoteMessage:
        """A gap marker of this client's own making (a lost link)."""
        return cls(topic, W.Entry(W.BYTES, FLAG_GAP, 0, 0, len(marker)), marker)

    @property
    def data(self):
        if self.dtype is None or self.dtype == _tensors.BYTES_TAG:
            return memoryview(self._data).toreadonly()
        arr = np.frombuffer(self._data, dtype=_tensors.numpy_dtype(self.dtype))
        return arr.reshape(self.shape)

    def as_torch(self):
        if self.dtype is None or self.dtype == _tensors.BYTES_TAG:
            raise TypeError("a bytes message has no tensor form")
        return _tensors.to_torch(self.data, self.dtype)

    @property
    def is_tensor(self) -> bool:
        return self.dtype is not None and self.dtype != _tensors.BYTES_TAG

    @property
    def zero_copy(self) -> bool:
        return False

    @property
    def nbytes(self) -> int:
        return len(self._data)

    def __bytes__(self) -> bytes:
        return bytes(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def release(self) -> None:
        """Nothing to give back: the data is this process's own memory."""

    def __enter__(self) -> RemoteMessage:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def __repr__(self) -> str:
        return f"<tensorbus.RemoteMessage {self.topic!r} seq={self.seq} {self.nbytes} B>"


class LightLink:
    """One client's link to its remote broker; outlives the broker: a
    successor's link is attached to the same object (clients/redial.py)."""

    def __init__(self, client, reply: dict, curve):
        """Every call here is non-blocking but :meth:`pump` with a timeout."""
        self.client = client
        self.curve = curve
        self.out_ids = 0
        self.out: dict[str, list] = {}  # topic -> [id, credit msgs, credit bytes, seq, info]
        self.out_by_id: dict[int, list] = {}  # the same states by id (credit)
        self.in_topics: dict[int, str] = {}
        self.in_reliable: set[str] = set()  # announced topics whose loss is a gap
        self.subs: list[RemoteSubscriber] = []
        self.grants: dict[int, list] = {}
        self.expect: collections.deque = collections.deque()  # [entry, body, bytes got]
        self.denied: dict[str, str] = {}  # pattern the broker refused -> its sentence
        self.broken: str | None = None  # why the link is down, until a new one is attached
        self.lock = threading.RLock()  # the sync client's threads share the link
        self.sock = None
        self._attach(reply)

    def _new_socket(self) -> zmq.Socket:
        """The DEALER the link speaks on (the asyncio link: a shadow of its own)."""
        return zmq.Context.instance().socket(zmq.DEALER)

    def _close_socket(self) -> None:
        self.sock.close(0)

    def _attach(self, reply: dict) -> None:
        self.sock = self._new_socket()
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        if self.curve is not None:
            self.curve(self.sock)
        self.sock.connect(reply["endpoint"])
        self._control("attach", link=reply["link"], secret=reply["secret"])

    def _control(self, kind: str, **fields) -> None:
        self.sock.send_multipart([W.CONTROL, W.encode_control(kind, **fields)])

    def close(self) -> None:
        with self.lock:
            try:
                self._control("bye")
            finally:
                self._close_socket()

    # -- a broker's death (clients/redial.py relinks) -------------------------

    def _lost_link(self, why: str) -> None:
        """The broker closed the link: redial if this client may, else raise."""
        redial = getattr(self.client, "_redial", None)
        if redial is not None:
            redial.lose(why)
            if redial.budget:
                return
        raise BrokerUnavailable(why, "unavailable")

    # -- receiving ---------------------------------------------------------

    def pump(self, timeout_s: float) -> bool:
        """Read what the broker sent, waiting up to ``timeout_s`` for the
        first message. False if nothing came."""
        if not self.sock.poll(max(0, int(timeout_s * 1000))):
            return False
        while True:
            frames = self.sock.recv_multipart(copy=False)
            try:
                self._on_message(frames)
            except W.WireError as exc:
                raise ProtocolError(f"the broker sent a malformed link message: {exc}") from None
            if not self.sock.poll(0):
                break
        self._flush_grants()
        return True

    def _on_message(self, frames) -> None:
        kind = frames[0].bytes
        if kind == W.CONTROL:
            what, f = W.decode_control(frames[1].bytes)
            if what == "credit":
                for tid, msgs, nbytes in f["grants"]:
                    state = self.out_by_id.get(tid)
                    if state is not None:
                        state[1] += msgs
                        state[2] += nbytes
            elif what == "topic":
                self.in_topics[f["id"]] = f["name"]
                if f.get("qos") == "reliable":
                    self.in_reliable.add(f["name"])
            elif what == "denied":  # a subscription's user may not read its pattern
                self.denied[f["topic"]] = f["error"]
            elif what == "bye":
                self._lost_link(LINK_CLOSED)
            return
        if kind == W.BODY_CHUNK:
            if not self.expect or self.expect[0][0].kind != W.BODY:
                raise W.WireError("a body chunk nobody expects")
            head = self.expect[0]
            chunk = frames[1].buffer
            if len(chunk) > head[0].nbytes - head[2]:
                raise W.WireError("a body chunk runs past its body")
            head[1][head[2] : head[2] + len(chunk)] = chunk
            head[2] += len(chunk)
        elif kind == W.DATA:
            for entry in W.decode_batch(frames[1].buffer):
                self.expect.append(
                    [entry, bytearray(entry.nbytes) if entry.kind == W.BODY else None, 0]
                )
        else:
            raise W.WireError(f"unknown link frame kind {kind[:8]!r}")
        while self.expect:
            entry, body, got = self.expect[0]
            if entry.kind == W.BODY and got < entry.nbytes:
                break
            self.expect.popleft()
            self._deliver(entry, body if body is not None else bytes(entry.payload))

    def _deliver(self, entry: W.Entry, data) -> None:
        name = self.in_topics.get(entry.topic)
        if name is None:
            raise W.WireError(f"data for topic id {entry.topic} before its announcement")
        msg = RemoteMessage(name, entry, data)
        credited = False
        for sub in self.subs:
            if matches(sub.pattern, name):
                # The first subscriber's receive returns the credit.
                sub.queue.append((msg, None if credited else (entry.topic, entry.nbytes)))
                credited = True
        if not credited:
            self.credit(entry.topic, entry.nbytes)

    def credit(self, tid: int, nbytes: int) -> None:
        grant = self.grants.setdefault(tid, [0, 0])
        grant[0] += 1
        grant[1] += nbytes

    def _flush_grants(self) -> None:
        if self.grants:
            grants = [[tid, m, b] for tid, (m, b) in self.grants.items()]
            self._control("credit", grants=grants)
            self.grants.clear()

    def set_interest(self, add: list, remove: list) -> None:
        self._control("interest", add=add, remove=remove)

    # -- sending -----------------------------------------------------------

    def announce(self, info: dict) -> list:
        state = self.out.get(info["name"])
        if state is None:
            self.out_ids += 1
            state = [self.out_ids, W.INITIAL_WINDOW_MSGS, W.INITIAL_WINDOW_BYTES, 0, info]
            self.out[info["name"]] = self.out_by_id[state[0]] = state
            self._announce(info["name"], state)
        return state

    def _announce(self, name: str, state: list) -> None:
        info = state[4]
        self._control(
            "topic",
            id=state[0],
            name=name,
            qos=info["qos"],
            capacity=info["capacity"],
            slot_size=info["slot_size"],
        )

    def try_send(self, state: list, entry: tuple, body) -> int | None:
        """Send one described message if the broker's credit allows; None
        if not (yet). Reads the link first when out of credit."""
        nbytes = entry[4]
        if self.broken is not None:
            return None  # nowhere to send it until a new link is up
        if state[1] <= 0 or state[2] <= 0:
            self.pump(0)  # grants may be waiting
            if state[1] <= 0 or state[2] <= 0:
                return None
        state[1] -= 1
        state[2] -= nbytes
        seq = state[3]
        state[3] += 1
        kind, flags, tid, _, _, dtype, meta_b, shape, payload = entry
        head = W.encode_batch_entry(kind, flags, tid, seq, nbytes, dtype, meta_b, shape)
        if body is None:
            self.sock.send_multipart([W.DATA, b"".join((head, payload))])  # one copy
        else:
            # Copied: the caller may change its array as soon as send returns.
            self.sock.send_multipart([W.DATA, head])
            for at in range(0, len(body), CHUNK_BYTES):
                self.sock.send_multipart([W.BODY_CHUNK, body[at : at + CHUNK_BYTES]])
        return seq


def check_alive(client) -> None:
    """Raise what a lost broker left this client with, if anything (no
    successor within the ``reconnect`` budget, or reconnect off)."""
    lost = getattr(client, "_lost", None)
    if lost is not None:
        raise lost


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _describe(state: list, data, meta):
    """(entry fields, body or None) for one outgoing message."""
    if isinstance(data, bytes | bytearray | memoryview) and meta is None:
        payload = memoryview(data).cast("B")
        if payload.nbytes <= BATCH_BYTES:
            return (W.BYTES, 0, state[0], 0, payload.nbytes, None, None, (), payload), None
        arr, tag = np.frombuffer(payload, np.uint8), _tensors.BYTES_TAG
    elif isinstance(data, bytes | bytearray | memoryview):
        arr, tag = np.frombuffer(memoryview(data).cast("B"), np.uint8), _tensors.BYTES_TAG
    elif isinstance(data, np.ndarray):
        arr, tag = data, _tensors.tag_of(data)
    else:
        arr, tag = _tensors.from_object(data)
        if arr is None:  # any other buffer: bytes
            arr, tag = np.frombuffer(memoryview(data).cast("B"), np.uint8), _tensors.BYTES_TAG
        elif tag is None:
            tag = _tensors.tag_of(arr)
    arr = np.ascontiguousarray(arr)
    meta_b = None
    if meta is not None:
        meta_b = bytes(meta)
        if len(meta_b) > 32:
            raise ValueError(f"meta is at most 32 bytes, not {len(meta_b)}")
    shape = arr.shape if tag != _tensors.BYTES_TAG else (arr.nbytes,)
    raw = arr.reshape(-1).view(np.uint8)
    if arr.nbytes <= BATCH_BYTES:
        return (W.TENSOR, 0, state[0], 0, arr.nbytes, tag, meta_b, shape, raw), None
    return (W.BODY, 0, state[0], 0, arr.nbytes, tag, meta_b, shape, None), raw


class RemoteOutlet:
    """What a remote publisher is, whatever the client's style: its topic,
    its link state, and one attempt to send under the broker's credit."""

    def __init__(self, client, link: LightLink, info: dict, timeout: float):
        self.client = client
        self.topic: str = info["name"]
        self.qos: str = info["qos"]
        self.slot_size: int = info["slot_size"]
        self.timeout = timeout
        self._link = link
        self._state = link.announce(info)
        self._closed = False
        self.published = 0
        self.dropped = 0

    def _describe(self, data, meta):
        if self._closed:
            raise ClientClosed("the publisher is closed")
        return _describe(self._state, data, meta)

    def _attempt(self, entry: tuple, body) -> int | None:
        """This link's sequence of the message if sent, -1 for a realtime
        message dropped for want of credit, None to wait for credit."""
        seq = self._link.try_send(self._state, entry, body)
        if seq is None and self.qos != "reliable":
            seq = -1  # realtime: no credit, newest wins: dropped here
        if seq is not None:
            if seq < 0:
                self.dropped += 1
            else:
                self.published += 1
        return seq

    def _unsent(self, timeout: float) -> BackpressureError:
        if self._link.broken is not None:
            return BackpressureError(
                f"not sent within {timeout:g} s: the link to the broker at "
                f"{self.client.url} is down ({self._link.broken}) and being redialed"
            )
        return BackpressureError(
            f"no credit from the broker within {timeout:g} s: a subscriber "
            f"of {self.topic!r} is behind"
        )

    def __repr__(self) -> str:
        return f"<tensorbus.{type(self).__name__} {self.topic!r} {self.qos} via {self.client.url}>"


class RemotePublisher(RemoteOutlet):
    """A publisher on a remote broker's topic (see :class:`tensorbus.Publisher`)."""

    def __init__(self, client, link: LightLink, info: dict, timeout: float):
        with link.lock:
            super().__init__(client, link, info, timeout)

    def send(self, data, *, timeout: float | None = None, meta: bytes | None = None) -> int:
        """Send ``data`` (bytes, a buffer, an array or a CPU tensor); waits
        up to ``timeout`` for the broker's credit on a reliable topic, then
        raises BackpressureError. Returns this link's sequence, or -1 for a
        realtime message dropped for want of credit."""
        entry, body = self._describe(data, meta)
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        lock = self._link.lock
        while True:
            # The lock is taken per attempt, so receivers get their turn
            # while this waits for credit.
            if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise self._unsent(timeout)
            try:
                self.client._check()
                check_alive(self.client)
                seq = self._attempt(entry, body)
                if seq is not None:
                    return seq
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._unsent(timeout)
                if self._link.broken is None:
                    self._link.pump(min(left, 0.01))
            finally:
                lock.release()
            if self._link.broken is not None:
                time.sleep(min(left, 0.01))

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> RemotePublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RemoteInlet:
    """What a remote subscriber is, whatever the client's style: its
    pattern, the messages its link queued for it, and the credit they carry."""

    def __init__(self, client, link: LightLink, pattern: str):
        self.client = client
        self.pattern = validate_pattern(pattern)
        self._link = link
        self.queue: collections.deque = collections.deque()
        self._closed = False
        link.subs.append(self)
        if not any(s.pattern == pattern for s in link.subs if s is not self):
            link.set_interest([pattern], [])

    def _raise_if_denied(self) -> None:
        """The broker refused this pattern: its user may not subscribe to it."""
        error = self._link.denied.get(self.pattern)
        if error is not None:
            raise error_for("permission_denied", error)

    def _pop(self):
        msg, credit = self.queue.popleft()
        if credit is not None:
            self._link.credit(*credit)
        if msg.flags & FLAG_GAP:
            raise GapError.from_marker(bytes(msg), msg.topic)
        return msg

    def _pop_one(self):
        """The first queued message; the link's grants go out with the last."""
        msg = self._pop()
        if not self.queue:
            self._link._flush_grants()
        return msg

    def _pop_more(self, max_n: int) -> list:
        """Up to ``max_n`` queued messages, stopping before a gap marker."""
        out = []
        while self.queue and len(out) < max_n and not self.queue[0][0].flags & FLAG_GAP:
            out.append(self._pop())
        self._link._flush_grants()
        return out

    def _timed_out(self, timeout) -> ReceiveTimeout:
        return ReceiveTimeout(f"no message on {self.pattern!r} within {timeout:g} s")

    def _leave(self) -> None:
        """Give back the credit of what is still queued, withdraw interest."""
        self._closed = True
        link = self._link
        if self in link.subs:
            link.subs.remove(self)
        for _, credit in self.queue:
            if credit is not None:
                link.credit(*credit)
        self.queue.clear()
        if not self.client._closed:
            if not any(s.pattern == self.pattern for s in link.subs):
                link.set_interest([], [self.pattern])
            link._flush_grants()

    @property
    def topics(self) -> list[str]:
        names = self._link.in_topics.values()
        return sorted({name for name in names if matches(self.pattern, name)})

    def __repr__(self) -> str:
        return f"<tensorbus.{type(self).__name__} {self.pattern!r} via {self.client.url}>"


class RemoteSubscriber(RemoteInlet, Endpoint):
    """Receives a remote broker's topics matching a pattern (see
    :class:`tensorbus.Subscriber`)."""

    def __init__(self, client, link: LightLink, pattern: str):
        with link.lock:
            super().__init__(client, link, pattern)

    def recv(self, timeout: float | None = None) -> RemoteMessage:
        """The next message; ReceiveTimeout after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        lock = self._link.lock
        while True:
            if self._closed:
                raise ClientClosed("the subscriber is closed")
            if not lock.acquire(timeout=-1 if deadline is None else _left(deadline)):
                raise self._timed_out(timeout)
            try:
                self.client._check()
                self._raise_if_denied()
                if self.queue:
                    return self._pop_one()
                check_alive(self.client)
                left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
                if self._link.pump(max(0.0, left)) or left > 0:
                    continue
            finally:
                lock.release()
            raise self._timed_out(timeout)

    def _more(self, max_n: int) -> list:
        with self._link.lock:
            return self._pop_more(max_n)

    def close(self) -> None:
        if self._closed:
            return
        with self._link.lock:
            self._leave()
