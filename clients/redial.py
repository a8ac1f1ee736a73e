"""A light client across the death of its broker: notice, redial, relink.

A client on another host (``tcp://``) shares no memory with its broker,
only two connections: the control session and the link (clients/remote.py).
Neither outlives the broker's process: a successor (a restart on the same
``--tcp HOST:PORT``) takes over the ipc sessions, never the tcp ones
(broker/state.py). So the client itself:

* **notices**: the control connection drops (a socket monitor sees it the
  moment the broker's process dies), a heartbeat goes unanswered for three
  periods (its host died, or the network between), a request is answered
  ``no_session`` (the broker forgot this session), or the broker closes
  the link (``bye``);
* **redials** with backoff and jitter (clients/reconnect.py's Backoff),
  asking the kernel first whether anything listens at the address, within
  the ``reconnect`` budget of ``connect()``;
* says **hello** again as a new session, **reopens the link** and
  **re-announces** its topics and its subscribers' patterns
  (:func:`relink`);
* tells its reliable subscribers that messages were lost (in flight, or
  published before the new link was up): a gap marker in each one's queue
  raises GapError there (:func:`mark_lost`), as a gap between
  daemons does (docs/bridge.md).

With ``reconnect=0`` the first loss is final: every call raises
BrokerUnavailable. A broker that said it shuts down is not looked for
either, as for ipc clients. :class:`Redialer` is the sync client's
(a thread); the asyncio client's is :class:`AsyncRedialer` in
clients/aio_remote.py, the same policy on its event loop.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import msgpack
import zmq

from tensorbus.broker import peer_wire as W
from tensorbus.broker.topics import matches
from tensorbus.clients.channel import ControlChannel
from tensorbus.clients.errors import (
    BrokerUnavailable,
    ClientClosed,
    ProtocolError,
    TensorbusError,
)
from tensorbus.clients.reconnect import (
    IDEMPOTENT_OPS,
    Backoff,
    attempt_s,
    gave_up,
    in_flight_error,
    no_retry,
)
from tensorbus.clients.remote import LINK_CLOSED, LightLink, RemoteMessage, link_fields

__all__ = [
    "RESENDABLE_OPS",
    "Redialer",
    "beat_failure",
    "beat_timeout",
    "mark_lost",
    "monitor_event",
    "relink",
    "tcp_address",
    "tcp_unreachable",
]

# What a light client may send again after its broker died with the request
# in flight: the idempotent ops, and a link (the dead broker's is gone).
RESENDABLE_OPS = IDEMPOTENT_OPS | {"link"}

NO_SESSION = "the broker no longer knows this client's session"
DROPPED = "the connection to the broker dropped"


def monitor_event(frames: list) -> int:
    """The event of a ZeroMQ socket monitor's message (its first frame
    starts with it, a native u16; zmq.utils.monitor would import asyncio)."""
    return struct.unpack_from("=H", frames[0])[0]


def beat_timeout(period: float) -> float:
    """How long a heartbeat waits for its answer: three periods, as the
    broker waits for the client's, and at least a second."""
    return max(3 * period, 1.0)


def beat_failure(exc: Exception, period: float) -> str | None:
    """Why a failed heartbeat means the session is lost (no answer, or the
    broker no longer knows it), or None if it does not."""
    if isinstance(exc, BrokerUnavailable):
        return f"no answer to a heartbeat within {beat_timeout(period):g} s"
    if isinstance(exc, ProtocolError) and exc.code == "no_session":
        return NO_SESSION
    return None


def tcp_address(url: str) -> tuple[str, int]:
    """(host, port) of ``tcp://host:port`` (``[v6]`` brackets removed)."""
    host, _, port = url[len("tcp://") :].rpartition(":")
    return host.strip("[]"), int(port)


def tcp_unreachable(url: str, timeout: float) -> str | None:
    """Why nothing can answer at ``url`` (connection refused, no route),
    or None if something accepts connections there."""
    try:
        with socket.create_connection(tcp_address(url), timeout=timeout):
            return None
    except OSError as exc:
        return f"nothing accepts connections at {url}: {exc.strerror or exc}"


def ask(sock: zmq.Socket, channel: ControlChannel, op: str, fields: dict, timeout: float) -> dict:
    """One request on a socket nobody else uses yet, and its reply's fields."""
    request_id, frame = channel.request(op, **fields)
    try:
        sock.send(frame)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if sock.poll(int(left * 1000) + 1):
                answer = channel.receive(sock.recv())
                if answer is not None:
                    return channel.result(answer)
        raise channel.unanswered(op, timeout)
    finally:
        channel.forget(request_id)


def mark_lost(link: LightLink, why: str) -> None:
    """``link`` broke (``why``): every reliable topic a subscriber read may
    have lost messages, in flight or published before a new link is up.
    Each such subscriber gets a gap marker after what it has queued, so
    its receive raises GapError there, not silence. What the broker sent
    before it went is read first: messages, and credit (what it credited
    is known to have reached its ring, and is no gap). The credit of what
    is queued belonged to the old link."""
    if link.broken is not None:
        return
    try:
        link.pump(0)
    except (TensorbusError, zmq.ZMQError):
        pass  # a malformed last word: the gap says it all
    link.broken = why
    reason = (
        f"the link to the broker at {link.client.url} was lost ({why}); messages "
        "in flight, and those published before the client linked again, are missing"
    )
    for sub in link.subs:
        kept = [(msg, None) for msg, _ in sub.queue]
        sub.queue.clear()
        sub.queue.extend(kept)
    for name in sorted(set(link.in_topics.values()) & link.in_reliable):
        body = msgpack.packb({"topic": name, "peer": link.client.url, "reason": reason})
        for sub in link.subs:
            if matches(sub.pattern, name):
                sub.queue.append((RemoteMessage.gap(name, body), None))


def relink(link: LightLink, reply: dict) -> None:
    """Attach the new link ``reply`` names (a successor's, or a new
    session's) to ``link``, then say again what the client does: first
    what the old link may have lost of each published topic (``resume``:
    sent but not credited, so the broker marks a gap there), then every
    topic with a fresh window and sequence, then the subscribers' patterns."""
    try:
        link._close_socket()
    except zmq.ZMQError:
        pass
    link.in_topics.clear()
    link.in_reliable.clear()
    link.expect.clear()
    link.grants.clear()
    link.denied.clear()
    link._attach(reply)
    unacked = {}
    for name, state in link.out.items():
        if state[1] < W.INITIAL_WINDOW_MSGS:
            unacked[name] = W.INITIAL_WINDOW_MSGS - state[1]
        state[1:4] = [W.INITIAL_WINDOW_MSGS, W.INITIAL_WINDOW_BYTES, 0]
    link._control("resume", sent=unacked)
    for name, state in link.out.items():
        link._announce(name, state)
    patterns = sorted({sub.pattern for sub in link.subs})
    if patterns:
        link._control("interest", add=patterns, remove=[], reset=True)
    link.broken = None


class Redialer:
    """The sync light client's keeper: a thread that heartbeats, watches
    the control connection, and redials when the session is lost. Requests
    go through :meth:`request`, which waits out a redial.

    Also the ``watch`` a request hands to ``Client._exchange``: ``fd`` is
    readable once the session is known lost (or the client closes), so a
    request in flight stops waiting for an answer that cannot come."""

    def __init__(self, client, period: float):
        self.client = client
        self.period = period
        self.budget = client._reconnect_s
        self.generation = 0  # sessions this client had to open again
        self.broken: str | None = None  # why the session was lost, until redialed
        self.stopped = False
        self._fd_lock = threading.Lock()
        self.fd, self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._monitor = None
        self._monitor_gen = -1
        self._thread = threading.Thread(target=self._run, name="tensorbus-redial", daemon=True)
        self._thread.start()

    # -- the watch of a request in flight --------------------------------

    def dead(self) -> bool:
        return self.broken is not None or self.stopped

    def _signal(self) -> None:
        with self._fd_lock:
            if self._wake >= 0:
                try:
                    os.write(self._wake, b"x")
                except BlockingIOError:
                    pass  # readable already

    def _clear(self) -> None:
        with self._fd_lock:
            try:
                while os.read(self.fd, 4096):
                    pass
            except (BlockingIOError, OSError):
                pass

    # -- noticing -----------------------------------------------------------

    def lose(self, why: str, generation: int | None = None) -> None:
        """The session (of ``generation``, default the current one) is lost:
        requests in flight stop waiting and the keeper redials. Any thread."""
        if generation is not None and generation != self.generation:
            return  # news of a session already replaced
        if self.broken is None:
            self.broken = why
        self._signal()

    def stop(self) -> None:
        """The client closes: no more heartbeats or redials."""
        self.stopped = True
        self._signal()

    # -- requests -------------------------------------------------------------

    def request(self, op: str, fields: dict) -> dict:
        """``Client._request`` for a tcp client: one request and its reply,
        after a redial if the session was lost; sent again if the broker
        died with it in flight and that is safe (RESENDABLE_OPS)."""
        client = self.client
        client._lock_for(op, f"redial the broker at {client.url}")
        try:
            while True:
                if client._lost is not None:
                    raise client._lost
                if self.broken is not None:
                    if client._closing or self.stopped:
                        raise ClientClosed(f"the client is closing; {op!r} was not sent")
                    self.recover()
                    continue
                generation = self.generation
                try:
                    reply = client._exchange(
                        op, fields, client.timeout, None if self.stopped else self
                    )
                except ProtocolError as exc:
                    if exc.code != "no_session":
                        raise
                    self.lose(NO_SESSION, generation)
                    continue  # refused, so not done: safe to send again
                if reply is not None:
                    return reply
                if self.broken is None:
                    if self.stopped:  # woken by close()
                        raise ClientClosed(f"the client closed while {op!r} was in flight")
                    self._clear()  # a wake-up meant for a redial already done
                    continue
                self.recover()
                if client._lost is not None:
                    raise client._lost
                if op not in RESENDABLE_OPS:
                    raise in_flight_error(op, client.url)
        finally:
            client._lock.release()

    # -- redialing -------------------------------------------------------------

    def recover(self) -> None:
        """(with the client's lock held) Find the broker again and open a
        new session and link there, trying with backoff for the
        ``reconnect`` budget; what is left when that fails goes to
        ``client._lost``."""
        client = self.client
        why = self.broken
        if why is None or client._lost is not None:
            return
        if why == LINK_CLOSED:  # a shutdown notice may follow the link's bye
            client._sock.poll(250)
        client._drain_socket()
        client._lost = no_retry(client.url, client._channel.shutdown_reason, self.budget)
        if client._lost is not None:
            return
        if client._link is not None:
            with client._link.lock:
                mark_lost(client._link, why)
        deadline = time.monotonic() + self.budget
        backoff = Backoff()
        channel = ControlChannel(client.url)
        while not (client._closing or self.stopped):
            left = deadline - time.monotonic()
            if tcp_unreachable(client.url, attempt_s(left)) is None:
                sock = client._new_socket()
                try:
                    hello = ask(sock, channel, "hello", client._hello_fields(), attempt_s(left))
                    link = None
                    if client._link is not None:
                        link = ask(sock, channel, "link", link_fields(client.name), attempt_s(left))
                except BrokerUnavailable:
                    sock.close(0)  # not answered in time: try again
                except TensorbusError as exc:  # refused (a token, a version): final
                    sock.close(0)
                    client._lost = exc
                    return
                else:
                    self._install(sock, hello, link)
                    return
            if time.monotonic() >= deadline:
                break
            self._nap(backoff.next())
        if not client._closing:
            client._lost = gave_up(client.url, self.budget)

    def _install(self, sock: zmq.Socket, hello: dict, link: dict | None) -> None:
        client = self.client
        client._sock.close(0)
        client._sock = sock
        client._session = hello.get("session")
        client.broker_pid = hello.get("broker_pid")
        if link is not None:
            with client._link.lock:
                relink(client._link, link)
        self.generation += 1
        self.broken = None
        self._clear()

    def _nap(self, seconds: float) -> None:
        """Sleep, but not past close()."""
        deadline = time.monotonic() + seconds
        while not self.stopped and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))

    # -- the keeper thread ------------------------------------------------------

    def _run(self) -> None:
        client = self.client
        next_beat = time.monotonic() + self.period
        try:
            while not self.stopped and client._lost is None and not client._closed:
                if self.broken is not None:
                    with client._lock:
                        self.recover()
                    next_beat = time.monotonic() + self.period
                    continue
                if self._monitor_gen != self.generation:
                    self._watch_socket()
                poller = zmq.Poller()
                poller.register(self.fd, zmq.POLLIN)
                if self._monitor is not None:
                    poller.register(self._monitor, zmq.POLLIN)
                wait = max(0.0, next_beat - time.monotonic())
                events = dict(poller.poll(int(wait * 1000) + 1))
                if self._monitor is not None and self._monitor in events:
                    self._on_monitor_event()
                elif self.fd in events:
                    if self.broken is None:
                        self._clear()  # a wake-up from a redial another thread did
                elif time.monotonic() >= next_beat:
                    self._beat()
                    next_beat = time.monotonic() + self.period
        finally:
            self._close_monitor()
            with self._fd_lock:
                os.close(self.fd)
                os.close(self._wake)
                self.fd = self._wake = -1

    def _watch_socket(self) -> None:
        """A monitor of the current control socket's disconnects."""
        self._close_monitor()
        with self.client._lock:
            self._monitor_gen = self.generation
            try:
                self._monitor = self.client._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            except zmq.ZMQError:  # closed under us: the client is closing
                self._monitor = None

    def _close_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.close(0)
            self._monitor = None

    def _on_monitor_event(self) -> None:
        try:
            frames = self._monitor.recv_multipart(zmq.NOBLOCK)
        except zmq.ZMQError:
            return
        event = monitor_event(frames)
        if event == zmq.EVENT_DISCONNECTED:
            self.lose(DROPPED, self._monitor_gen)
        if event == zmq.EVENT_MONITOR_STOPPED or event == zmq.EVENT_DISCONNECTED:
            self._close_monitor()  # watched again once a new session is up

    def _beat(self) -> None:
        """One heartbeat: keeps the session alive at the broker, and its
        answer says the broker is alive."""
        client = self.client
        if not client._lock.acquire(timeout=beat_timeout(self.period)):
            return  # held that long: someone else is talking to the broker
        try:
            if self.broken is not None or self.stopped:
                return
            generation = self.generation
            try:
                client._exchange("heartbeat", {}, beat_timeout(self.period), self)
            except TensorbusError as exc:
                why = beat_failure(exc, self.period)
                if why is not None:
                    self.lose(why, generation)
        finally:
            client._lock.release()
