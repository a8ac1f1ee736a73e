"""Request/reply on top of the rings, with at-least-once delivery.

A request topic is an ordinary ring read by a *queue group*: every
responder of the group adopts the same cursor (the broker's) and claims
each request by CAS, so one request reaches exactly one responder, with no
hop through the daemon. The ring's header counts the group's members, so a
request with nobody to answer fails at once (``NoResponders``).

Each requesting client has a private reply inbox (a topic
``_inbox/<token>`` the broker removes with the client). A request carries
its id, the inbox token and an attempt number in the descriptor's 32-byte
meta; the reply carries the id back. A request without a reply within its
timeout is sent again with the same id (it may reach another responder);
late or duplicate replies are counted and dropped, never returned to the
wrong call. Responders remember the ids they answered (a window per
responder): a repeated id gets the remembered reply, so a handler runs once
per id while its responder lives.

Payloads are what ``Publisher.send`` takes: bytes travel inline, arrays
keep dtype and shape, and large tensors go through the arena with no copy
on the receiving side.
"""

from __future__ import annotations

import collections
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from tensorbus._core import Message
from tensorbus._core.errors import GapError, ReceiveTimeout, RingClosedError, TensorbusError
from tensorbus.broker.topics import inbox_topic
from tensorbus.clients.meta import MetaCodec

__all__ = [
    "BrokerCount",
    "Call",
    "DEFAULT_GROUP",
    "NoResponders",
    "Request",
    "RequestStream",
    "RequestTimeout",
    "Requester",
    "Responder",
    "ResponderError",
    "decode_meta",
    "encode_meta",
    "inbox_topic",
]

log = logging.getLogger("tensorbus.reqrep")

KIND_REQUEST, KIND_REPLY, KIND_FAILURE = 0, 1, 2
DEFAULT_GROUP = "responders"
INBOX_CAPACITY = 64
DEDUP_WINDOW = 1024  # ids a responder remembers, with their replies
REPLY_TIMEOUT = 5.0  # a requester that does not read its inbox for this long loses the reply
REPLY_PUBLISHERS = 64  # reply publishers a responder keeps open (one per recent requester)


class NoResponders(TensorbusError):
    """Nobody answers requests on this topic."""


class RequestTimeout(ReceiveTimeout):
    """No reply came within the timeout, after every retry."""


class ResponderError(TensorbusError):
    """The responder's handler raised; the message is its sentence."""


class ReqMeta(NamedTuple):
    id: int
    token: int
    attempt: int
    kind: int


# id, inbox token, attempt, kind: the descriptor's 32 bytes of meta (clients/meta.py)
_CODEC = MetaCodec("<QQHB13x", ReqMeta, (KIND_REQUEST, KIND_REPLY, KIND_FAILURE), "request")


def encode_meta(request_id: int, token: int, attempt: int, kind: int) -> bytes:
    return _CODEC.encode(request_id, token, attempt, kind)


def decode_meta(raw: bytes | None) -> ReqMeta:
    """ValueError with a sentence for anything that is not request meta."""
    return _CODEC.decode(raw)


class Call:
    """One request's protocol without I/O, shared by the sync and asyncio
    requesters: the meta of each attempt, what a reply means, when to give
    up. ``stats`` counts requests, retries and late replies."""

    __slots__ = ("topic", "id", "token", "ring", "timeout", "retries", "attempt", "stats")

    def __init__(self, topic, request_id, token, ring, timeout, retries, stats):
        if ring.responders == 0:
            raise NoResponders(f"no responder serves requests on topic {topic!r}")
        self.topic, self.id, self.token, self.ring = topic, request_id, token, ring
        self.timeout, self.retries, self.stats = timeout, retries, stats
        self.attempt = -1
        stats["requests"] += 1

    def next_meta(self) -> bytes:
        """The meta of the next attempt; RequestTimeout after the last one,
        NoResponders if the group left meanwhile."""
        self.attempt += 1
        if self.attempt > self.retries:
            raise RequestTimeout(
                f"no reply to request {self.id} on topic {self.topic!r} within "
                f"{self.timeout:g} s ({self.retries + 1} attempt(s))"
            )
        if self.attempt:
            if self.ring.responders == 0:
                raise NoResponders(f"the responders of topic {self.topic!r} left before answering")
            self.stats["retries"] += 1
        return encode_meta(self.id, self.token, self.attempt, KIND_REQUEST)

    def answer(self, msg: Message) -> Message | None:
        """``msg`` if it answers this call (ResponderError if it reports a
        failure); None, counted, for a late answer to an earlier call."""
        meta = _CODEC.unpack(msg.meta)
        if meta is None or meta.id != self.id:
            self.stats["late_replies"] += 1
            return None
        if meta.kind == KIND_FAILURE:
            raise ResponderError(bytes(msg.data).decode(errors="replace"))
        return msg


class BrokerCount:
    """A request topic's responders as a light client sees them: the
    broker's count, asked over the control socket (a tcp client has no
    ring header to read). What :class:`Call` reads as ``ring.responders``."""

    __slots__ = ("client", "topic")

    def __init__(self, client, topic: str):
        self.client, self.topic = client, topic

    @property
    def responders(self) -> int:
        return self.client._request("responders", topic=self.topic)["responders"]


class Requester:
    """A client's requesting side: its reply inbox, a publisher per request
    topic, and the request ids. Not thread-safe: one request at a time."""

    def __init__(self, client):
        self.client = client
        self.token = secrets.randbits(64)
        self.topic = inbox_topic(self.token)
        client.create_topic(self.topic, capacity=INBOX_CAPACITY, private=True)
        self.inbox = client.subscribe(self.topic)
        self.publishers: dict[str, Any] = {}
        self.ids = itertools.count(1)
        self.stats = {"requests": 0, "retries": 0, "late_replies": 0}

    def _publisher(self, topic: str):
        pub = self.publishers.get(topic)
        if pub is None:
            pub = self.publishers[topic] = self.client.publisher(topic)
        return pub

    def request(self, topic: str, data, timeout: float, retries: int) -> Message:
        pub = self._publisher(topic)
        ring = pub._pub.ring if self.client.local else BrokerCount(self.client, topic)
        call = Call(topic, next(self.ids), self.token, ring, timeout, retries, self.stats)
        while True:
            pub.send(data, meta=call.next_meta(), timeout=timeout)
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                try:
                    msg = self.inbox.recv(left)
                except ReceiveTimeout:
                    break
                reply = call.answer(msg)
                if reply is not None:
                    return reply

    def close(self) -> None:
        for pub in self.publishers.values():
            pub.close()
        self.publishers.clear()
        self.inbox.close()


class Request:
    """One request as a responder sees it: ``data`` (what was sent),
    ``topic``, ``id``; answer it with ``reply(data)`` (or ``fail(text)``)."""

    __slots__ = ("message", "id", "attempt", "_token", "_stream", "answered")

    def __init__(
        self, message: Message, request_id: int, token: int, attempt: int, stream: RequestStream
    ):
        self.message = message
        self.id = request_id
        self.attempt = attempt
        self._token = token
        self._stream = stream
        self.answered = False

    @property
    def data(self):
        return self.message.data

    @property
    def topic(self) -> str:
        return self.message.topic

    def reply(self, data) -> None:
        """Send ``data`` (anything ``Publisher.send`` takes) to the requester."""
        self._stream._answer(self, data, KIND_REPLY)

    def fail(self, text: str) -> None:
        """Answer with an error: the requester's call raises ResponderError."""
        self._stream._answer(self, text.encode(), KIND_FAILURE)

    def __repr__(self) -> str:
        return f"<Request {self.id} on {self.topic!r} attempt {self.attempt}>"


_IN_PROGRESS = object()


class Answering:
    """The responding side's protocol without I/O, shared by the sync and
    asyncio request streams: which messages are new requests, the dedup
    window and its remembered replies, and the reply publishers kept per
    requester (least recently used first)."""

    def __init__(self, topic: str):
        self.topic = topic
        self.seen: collections.OrderedDict = collections.OrderedDict()  # (token, id) -> reply
        self.replies: collections.OrderedDict = collections.OrderedDict()  # token -> publisher
        self.stats = {"requests": 0, "duplicates": 0, "replies": 0, "undeliverable": 0, "gaps": 0}

    def accept(self, msg: Message) -> tuple[ReqMeta | None, tuple | None]:
        """(meta, None) for a new request; (meta, (data, kind)) for a
        repeated id answered before: send that again; (None, None) for a
        message to drop (no request meta, not a request, or a repeated id
        whose handler still runs)."""
        meta = _CODEC.unpack(msg.meta)
        if meta is None:
            log.warning("ignored a message without request meta on %s", self.topic)
            return None, None
        if meta.kind != KIND_REQUEST:
            return None, None
        key = (meta.token, meta.id)
        seen = self.seen.get(key)
        if seen is not None:
            self.stats["duplicates"] += 1
            return (None, None) if seen is _IN_PROGRESS else (meta, seen)
        self.seen[key] = _IN_PROGRESS
        if len(self.seen) > DEDUP_WINDOW:
            self.seen.popitem(last=False)
        self.stats["requests"] += 1
        return meta, None

    def record(self, request: Request, data, kind: int) -> None:
        """Remember ``request``'s answer; TensorbusError for a second one."""
        if request.answered:
            raise TensorbusError(f"request {request.id} was already answered")
        request.answered = True
        self.seen[(request._token, request.id)] = (data, kind)

    def reply_publisher(self, token: int):
        """The kept publisher on ``token``'s inbox, now most recently used."""
        pub = self.replies.get(token)
        if pub is not None:
            self.replies.move_to_end(token)
        return pub

    def evict(self) -> list:
        """Publishers to close to make room for one more."""
        out = []
        while len(self.replies) >= REPLY_PUBLISHERS:
            out.append(self.replies.popitem(last=False)[1])
        return out

    def sent(self) -> None:
        self.stats["replies"] += 1

    def undeliverable(self, token: int, exc: Exception):
        """Count a reply that could not be sent (the requester is gone, its
        inbox with it); the stale publisher to close, if any."""
        self.stats["undeliverable"] += 1
        log.debug("reply to %016x undeliverable: %s", token, exc)
        return self.replies.pop(token, None)


class RequestStream:
    """The requests of one topic for one member of a queue group; iterate
    it (``for req in client.requests(topic): req.reply(...)``) or call
    :meth:`next`. Repeated ids are answered from memory, not yielded."""

    def __init__(self, client, topic: str, group: str):
        self.client = client
        self.topic = topic
        self.group = group
        self._sub = client.subscribe(topic, group=group)
        self._answering = Answering(topic)
        self._replies = self._answering.replies
        self.stats = self._answering.stats
        self._closed = False

    def next(self, timeout: float | None = None) -> Request:
        """The next new request; ReceiveTimeout after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                msg = self._sub.recv(left)
            except GapError:
                # Requests lost with a link between daemons: their callers
                # retry (docs/reqrep.md); nothing for the responder to do.
                self.stats["gaps"] += 1
                continue
            meta, again = self._answering.accept(msg)
            if again is not None:
                self._send(meta.token, again[0], meta.id, again[1])  # the remembered answer
            elif meta is not None:
                return Request(msg, meta.id, meta.token, meta.attempt, self)

    def __iter__(self) -> Iterator[Request]:
        while not self._closed:
            try:
                yield self.next()
            except (RingClosedError, TensorbusError):
                if self._closed:
                    return
                raise

    def _answer(self, request: Request, data, kind: int) -> None:
        self._answering.record(request, data, kind)
        self._send(request._token, data, request.id, kind)

    def _send(self, token: int, data, request_id: int, kind: int) -> None:
        answering = self._answering
        try:
            pub = answering.reply_publisher(token)
            if pub is None:
                for old in answering.evict():
                    old.close()
                pub = answering.replies[token] = self.client.publisher(inbox_topic(token))
            pub.send(data, meta=encode_meta(request_id, token, 0, kind), timeout=REPLY_TIMEOUT)
            answering.sent()
        except TensorbusError as exc:
            stale = answering.undeliverable(token, exc)
            if stale is not None:
                stale.close()

    def close(self) -> None:
        self._closed = True
        self._sub.close()
        for pub in self._replies.values():
            pub.close()
        self._replies.clear()


class Responder:
    """Runs ``handler(request) -> reply data`` for every request of a topic
    in a thread of its own; a handler that raises answers with its error."""

    def __init__(self, client, topic: str, handler: Callable[[Request], Any], group: str):
        self.stream = RequestStream(client, topic, group)
        self.handler = handler
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"tensorbus-responder-{topic}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            self.stream.close()  # from this thread: never under a wait of its own

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                req = self.stream.next(timeout=0.2)
            except ReceiveTimeout:
                continue
            except TensorbusError:
                if self._stop.is_set():
                    return
                raise
            try:
                result = self.handler(req)
            except Exception as exc:
                if not req.answered:
                    req.fail(f"{type(exc).__name__}: {exc}")
                continue
            if not req.answered:
                req.reply(b"" if result is None else result)

    def close(self) -> None:
        """Stop after the current handler; the thread closes the stream."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(2.0)

    def __enter__(self) -> Responder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
