"""Request/reply for the asyncio client: the twin of clients/reqrep.py.

The protocol without I/O is reqrep.py's (``Call`` for a request, and
``Answering`` for the dedup window and the reply publishers), so the two
clients cannot drift; this module only awaits where the sync one blocks.

A queue group's members share one futex bell (docs/reqrep.md), which the
event loop cannot watch. So each asyncio request stream waits for requests
in one worker thread of its own, in short slices (``spin_us`` sets how long
it spins first); the handler, the replies and everything else run on the
loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import itertools
import secrets
import time
from collections.abc import Callable
from typing import Any

from tensorbus._core import Message
from tensorbus._core.errors import GapError, ReceiveTimeout, RingClosedError, TensorbusError
from tensorbus.broker.topics import validate_topic
from tensorbus.clients._shared import Subscription
from tensorbus.clients.errors import ClientClosed
from tensorbus.clients.reqrep import (
    INBOX_CAPACITY,
    KIND_FAILURE,
    KIND_REPLY,
    REPLY_TIMEOUT,
    Answering,
    Call,
    Request,
    encode_meta,
    inbox_topic,
)

__all__ = ["AsyncRequest", "AsyncRequestStream", "AsyncRequester", "AsyncResponder"]

WAIT_SLICE_S = 0.2  # a waiting stream looks at its close flag this often


class AsyncRequester:
    """The asyncio requesting side: a private inbox read by an
    AsyncSubscriber, a publisher per request topic (clients/reqrep.py)."""

    def __init__(self, client):
        self.client = client
        self.token = secrets.randbits(64)
        self.topic = inbox_topic(self.token)
        self.inbox = None
        self.publishers: dict[str, Any] = {}
        self.ids = itertools.count(1)
        self.lock = asyncio.Lock()  # one request at a time shares the inbox
        self.stats = {"requests": 0, "retries": 0, "late_replies": 0}

    async def open(self) -> None:
        await self.client.create_topic(self.topic, capacity=INBOX_CAPACITY, private=True)
        self.inbox = await self.client.subscribe(self.topic)

    async def request(self, topic: str, data, timeout: float, retries: int) -> Message:
        async with self.lock:
            pub = self.publishers.get(topic)
            if pub is None:
                pub = self.publishers[topic] = await self.client.publisher(topic)
            local = self.client.local
            ring = pub._pub.ring if local else CountSeen(await self._responders(topic))
            call = Call(topic, next(self.ids), self.token, ring, timeout, retries, self.stats)
            while True:
                if not local and call.attempt >= 0:  # a retry: is anyone left?
                    ring.responders = await self._responders(topic)
                await pub.send(data, meta=call.next_meta(), timeout=timeout)
                deadline = time.monotonic() + timeout
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        msg = await self.inbox.recv(left)
                    except ReceiveTimeout:
                        break
                    reply = call.answer(msg)
                    if reply is not None:
                        return reply

    async def _responders(self, topic: str) -> int:
        """A light client's count of ``topic``'s responders, from the broker."""
        return (await self.client._request("responders", topic=topic))["responders"]

    async def close(self) -> None:
        for pub in self.publishers.values():
            await pub.close()
        if self.inbox is not None:
            await self.inbox.close()


class CountSeen:
    """A light client's last count of a topic's responders, asked of the
    broker before each attempt; what :class:`Call` reads as ``ring``."""

    __slots__ = ("responders",)

    def __init__(self, responders: int):
        self.responders = responders


class AsyncRequest(Request):
    """A request as an asyncio responder sees it: ``await req.reply(data)``
    or ``await req.fail(text)`` (see :class:`tensorbus.Request`)."""

    __slots__ = ()

    async def reply(self, data) -> None:
        """Send ``data`` (anything ``Publisher.send`` takes) to the requester."""
        await self._stream._answer(self, data, KIND_REPLY)

    async def fail(self, text: str) -> None:
        """Answer with an error: the requester's call raises ResponderError."""
        await self._stream._answer(self, text.encode(), KIND_FAILURE)


class AsyncRequestStream:
    """The requests of one topic for one member of a queue group:
    ``async for req in client.requests(topic): await req.reply(...)``, or
    ``stream = await client.requests(topic)`` then ``await stream.next()``.
    It joins the group when awaited or first iterated. Repeated ids are
    answered from memory, not yielded."""

    def __init__(self, client, topic: str, group: str):
        validate_topic(topic)
        self.client = client
        self.topic = topic
        self.group = group
        self._answering = Answering(topic)
        self._replies = self._answering.replies
        self.stats = self._answering.stats
        self._reader: Subscription | None = None
        self._opening: asyncio.Lock = asyncio.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"tensorbus-requests-{topic}"
        )
        self._waiting: asyncio.Future | None = None  # the worker's wait in progress
        self._closed = False

    async def open(self) -> AsyncRequestStream:
        """Join the queue group (once)."""
        async with self._opening:
            if self._closed:
                raise ClientClosed("the request stream is closed")
            if self._reader is None:
                reply = await self.client._request(
                    "subscribe", pattern=self.topic, mode="sync", group=self.group
                )
                self._reader = Subscription(self.client._maps, reply, self.topic)
                self.client._subscriptions[self._reader.id] = self._reader
        return self

    def __await__(self):
        return self.open().__await__()

    def _wait(self, timeout: float) -> Message | None:
        """In the worker thread: the next message, or None after ``timeout``."""
        inbox = self._reader._rings
        try:
            msg = inbox.recv(timeout)
        except ReceiveTimeout:
            return None
        if msg is None:
            inbox.notice()  # news (a shutdown), or a ring closed: look again
        return msg

    async def _recv(self, timeout: float | None) -> Message:
        reader = self._reader
        taken = reader._take(1)
        if taken:
            return taken[0]
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._closed:
                raise ClientClosed("the request stream is closed")
            reader._check_broker()
            left = WAIT_SLICE_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise ReceiveTimeout(f"no request on {self.topic!r} within {timeout:g} s")
            if self._waiting is None:
                self._waiting = loop.run_in_executor(
                    self._pool, self._wait, min(left, WAIT_SLICE_S)
                )
            # Shielded: a cancelled caller leaves the wait to the next call,
            # so a request the worker claimed is never dropped.
            msg = await asyncio.shield(self._waiting)
            self._waiting = None
            if msg is not None:
                return msg
            if reader._broker_gone:
                await asyncio.sleep(0.05)

    async def next(self, timeout: float | None = None) -> AsyncRequest:
        """The next new request; ReceiveTimeout after ``timeout`` seconds."""
        if self._reader is None:
            await self.open()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                msg = await self._recv(left)
            except GapError:  # requests lost with a link: their callers retry
                self.stats["gaps"] += 1
                continue
            meta, again = self._answering.accept(msg)
            if again is not None:
                await self._send(meta.token, again[0], meta.id, again[1])  # the remembered answer
            elif meta is not None:
                return AsyncRequest(msg, meta.id, meta.token, meta.attempt, self)

    def __aiter__(self) -> AsyncRequestStream:
        return self

    async def __anext__(self) -> AsyncRequest:
        if self._closed:
            raise StopAsyncIteration
        try:
            return await self.next()
        except (RingClosedError, TensorbusError):
            if self._closed:
                raise StopAsyncIteration from None
            raise

    async def _answer(self, request: AsyncRequest, data, kind: int) -> None:
        self._answering.record(request, data, kind)
        await self._send(request._token, data, request.id, kind)

    async def _send(self, token: int, data, request_id: int, kind: int) -> None:
        answering = self._answering
        try:
            pub = answering.reply_publisher(token)
            if pub is None:
                for old in answering.evict():
                    await old.close()
                pub = await self.client.publisher(inbox_topic(token))
                answering.replies[token] = pub
            await pub.send(
                data, meta=encode_meta(request_id, token, 0, kind), timeout=REPLY_TIMEOUT
            )
            answering.sent()
        except TensorbusError as exc:
            stale = answering.undeliverable(token, exc)
            if stale is not None:
                await stale.close()

    async def close(self) -> None:
        """Leave the group: after the worker's current wait (at most
        ``WAIT_SLICE_S``), the subscription's cursor goes back."""
        if self._closed:
            return
        self._closed = True
        reader, self._reader = self._reader, None
        if reader is not None:
            loop = asyncio.get_running_loop()
            with contextlib.suppress(Exception):
                # In the worker: after its wait, never under it.
                await loop.run_in_executor(self._pool, reader._rings.close)
            self.client._subscriptions.pop(reader.id, None)
            if not self.client._closed:
                with contextlib.suppress(Exception):
                    await self.client._request("unsubscribe", sub=reader.id)
        self._pool.shutdown(wait=False)
        for pub in self._replies.values():
            await pub.close()
        self._replies.clear()
        if self in self.client._streams:
            self.client._streams.remove(self)


class AsyncResponder:
    """Answers every request of a topic with ``handler(request)`` (a
    function or a coroutine function) in a task of its own; a handler that
    raises answers with its error. ``await close()`` to stop."""

    def __init__(self, stream: AsyncRequestStream, handler: Callable[[AsyncRequest], Any]):
        self.stream = stream
        self.handler = handler
        self._stop = False
        self._task: asyncio.Task | None = None

    async def start(self) -> AsyncResponder:
        await self.stream.open()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"tensorbus-responder-{self.stream.topic}"
        )
        return self

    async def _run(self) -> None:
        try:
            await self._serve()
        finally:
            await self.stream.close()

    async def _serve(self) -> None:
        while not self._stop:
            try:
                req = await self.stream.next(timeout=WAIT_SLICE_S)
            except ReceiveTimeout:
                continue
            except TensorbusError:
                if self._stop:
                    return
                raise
            try:
                result = self.handler(req)
                if inspect.isawaitable(result):
                    result = await result
            except Exception as exc:
                if not req.answered:
                    await req.fail(f"{type(exc).__name__}: {exc}")
                continue
            if not req.answered:
                await req.reply(b"" if result is None else result)

    async def close(self) -> None:
        """Stop after the current handler; the task closes the stream."""
        self._stop = True
        task = self._task
        if task is not None and task is not asyncio.current_task():
            try:
                await asyncio.wait_for(asyncio.shield(task), 2.0)
            except TimeoutError:  # a handler that outlasts the wait: stopped now
                task.cancel()
            except (Exception, asyncio.CancelledError):
                pass  # what stopped the task; the stream closes below all the same
        await self.stream.close()
        if self in self.stream.client._streams:
            self.stream.client._streams.remove(self)

    async def __aenter__(self) -> AsyncResponder:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
