"""The asyncio client: the same API as :mod:`tensorbus.clients.client`, with
``await`` where the sync client would wait.

No thread spins or blocks per subscriber: each asyncio subscription sleeps
on a FIFO doorbell the event loop watches (``loop.add_reader``), which a
publisher writes one byte to only when the subscription announced a sleep.
Control requests go through ``zmq.asyncio``; one reader task matches
replies to requests and hands notices to their subscriptions.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import secrets
import time
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from tensorbus._core import BackpressureError, Message
from tensorbus._core.errors import ReceiveTimeout
from tensorbus._core.tensors import from_object
from tensorbus.broker import protocol as P
from tensorbus.broker.topics import validate_pattern, validate_topic
from tensorbus.clients._shared import (
    HELLO_PROBE_S,
    INLINE_MAX,
    Mappings,
    Subscription,
    client_name,
    ipc_unreachable,
    resolve_url,
)
from tensorbus.clients.errors import BrokerUnavailable, ClientClosed, error_for
from tensorbus.clients.reqrep import INBOX_CAPACITY, Call, inbox_topic

__all__ = ["AsyncClient", "AsyncPublisher", "AsyncSubscriber", "connect"]

DEFAULT_TIMEOUT = 5.0
STALL_CHECK_S = 0.25  # how often a sleeping subscriber looks for a dead publisher's claim


async def connect(
    url: str | None = None,
    *,
    name: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    token: str | None = None,
    max_holds: int = 1024,
) -> AsyncClient:
    """Connect to a broker (see :func:`tensorbus.connect`)."""
    client = AsyncClient(url, name=name, timeout=timeout, max_holds=max_holds)
    try:
        await client._hello(token or os.environ.get("TENSORBUS_TOKEN"))
    except BaseException:
        await client._teardown()
        raise
    return client


class AsyncClient:
    """An asyncio connection to the broker; ``async with`` or ``await close()``."""

    def __init__(
        self,
        url: str | None = None,
        *,
        name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_holds: int = 1024,
    ):
        self.url = resolve_url(url)
        why = ipc_unreachable(self.url)
        if why:
            raise BrokerUnavailable(why, "unavailable")
        self.max_holds = max_holds
        self.name = client_name(name)
        self.timeout = timeout
        self.local = False
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._subscriptions: dict[int, AsyncSubscriber] = {}
        self._publishers: list[AsyncPublisher] = []
        self._maps: Mappings | None = None
        self._requester: _AsyncRequester | None = None
        self._closed = False
        self._sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.url)
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        self._heartbeat: asyncio.Task | None = None

    async def _hello(self, token: str | None) -> None:
        hello = await self._request(
            "hello", name=self.name, pid=os.getpid(), protocol=P.PROTOCOL_VERSION, token=token
        )
        self.local = bool(hello.get("local"))
        if self.local:
            self._maps = Mappings(hello, self.max_holds)
        else:
            period = float(hello.get("heartbeat_s", 2.0))
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat(period))

    async def _beat(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            with contextlib.suppress(Exception):
                await self._request("heartbeat")

    async def _read_loop(self) -> None:
        while True:
            raw = await self._sock.recv()
            try:
                reply = P.decode_reply(raw)
            except P.ProtocolViolation:
                continue
            if reply.notice is not None:
                self._dispatch_notice(reply)
                continue
            if reply.id is None and not reply.ok and len(self._pending) == 1:
                # an error for a request the broker could not parse: ours
                fut = self._pending.pop(next(iter(self._pending)))
            else:
                fut = self._pending.pop(reply.id, None)
            if fut is not None and not fut.done():
                fut.set_result(reply)

    def _dispatch_notice(self, reply: P.Reply) -> None:
        if reply.notice == "shutdown":
            targets = list(self._subscriptions.values())
        else:
            sub = self._subscriptions.get(reply.fields.get("sub"))
            targets = [] if sub is None else [sub]
        for sub in targets:
            sub._queue_notice(reply.notice, reply.fields)

    async def _request(self, op: str, **fields: Any) -> dict:
        if self._closed:
            raise ClientClosed("the client is closed")
        request_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[request_id] = fut
        try:
            await self._sock.send(P.encode_request(op, request_id, **fields))
            timeout = self.timeout
            if op == "hello":
                # Not answered at once: ask, once, whether anything listens on
                # the ipc socket, so a stale socket file fails now.
                done, _ = await asyncio.wait([fut], timeout=min(HELLO_PROBE_S, timeout))
                if not done:
                    why = ipc_unreachable(self.url, probe=True)
                    if why:
                        raise BrokerUnavailable(why, "unavailable")
                    timeout -= HELLO_PROBE_S
            reply = await asyncio.wait_for(fut, max(timeout, 0.001))
        except TimeoutError:
            raise BrokerUnavailable(
                f"no tensorbus broker answered {op!r} at {self.url} within "
                f"{self.timeout:g} s (is `tensorbus serve` running?)",
                "unavailable",
            ) from None
        finally:
            self._pending.pop(request_id, None)
        if not reply.ok:
            raise error_for(reply.code, reply.error)
        return reply.fields

    async def create_topic(
        self,
        topic: str,
        *,
        qos: str = "reliable",
        capacity: int | None = None,
        slot_size: int | None = None,
        private: bool = False,
    ) -> dict:
        """See :meth:`tensorbus.Client.create_topic`."""
        validate_topic(topic)
        reply = await self._request(
            "create_topic",
            topic=topic,
            qos=qos,
            capacity=capacity,
            slot_size=slot_size,
            private=private or None,
        )
        return reply["topic"]

    async def request(
        self, topic: str, data, *, timeout: float = DEFAULT_TIMEOUT, retries: int = 2
    ) -> Message:
        """The asyncio twin of :meth:`tensorbus.Client.request`: one
        responder's reply, retried with the same id, NoResponders at once."""
        if self._requester is None:
            self._requester = _AsyncRequester(self)
            await self._requester.open()
        return await self._requester.request(topic, data, timeout, retries)

    async def publisher(
        self,
        topic: str,
        *,
        qos: str | None = None,
        capacity: int | None = None,
        slot_size: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        inline_max: int | None = None,
    ) -> AsyncPublisher:
        """See :meth:`tensorbus.Client.publisher`."""
        validate_topic(topic)
        info = (
            await self._request(
                "open_publisher", topic=topic, qos=qos, capacity=capacity, slot_size=slot_size
            )
        )["topic"]
        pub = AsyncPublisher(self, info, timeout, inline_max)
        self._publishers.append(pub)
        return pub

    async def subscribe(self, pattern: str) -> AsyncSubscriber:
        validate_pattern(pattern)
        reply = await self._request("subscribe", pattern=pattern, mode="async")
        sub = AsyncSubscriber(self, reply, pattern)
        self._subscriptions[sub.id] = sub
        return sub

    async def topics(self, pattern: str | None = None) -> list[dict]:
        return (await self._request("list_topics", pattern=pattern))["topics"]

    async def stats(self, pattern: str | None = None) -> dict:
        return await self._request("stats", pattern=pattern)

    async def close(self) -> None:
        if self._closed:
            return
        if self._requester is not None:
            await self._requester.close()
        for sub in list(self._subscriptions.values()):
            await sub.close()
        for pub in list(self._publishers):
            await pub.close()
        with contextlib.suppress(Exception):
            saved, self.timeout = self.timeout, min(self.timeout, 1.0)
            await self._request("bye", holds=self._maps.holds if self._maps else 0)
            self.timeout = saved
        await self._teardown()

    async def _teardown(self) -> None:
        self._closed = True
        for task in (self._reader, self._heartbeat):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._maps is not None:
            self._maps.detach()
        self._sock.close(0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class _AsyncRequester:
    """The asyncio requesting side: a private inbox read by an
    AsyncSubscriber, a publisher per request topic (clients/reqrep.py)."""

    def __init__(self, client: AsyncClient):
        self.client = client
        self.token = secrets.randbits(64)
        self.topic = inbox_topic(self.token)
        self.inbox: AsyncSubscriber | None = None
        self.publishers: dict[str, AsyncPublisher] = {}
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
            call = Call(
                topic, next(self.ids), self.token, pub._pub.ring, timeout, retries, self.stats
            )
            while True:
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

    async def close(self) -> None:
        for pub in self.publishers.values():
            await pub.close()
        if self.inbox is not None:
            await self.inbox.close()


class AsyncPublisher:
    """Publishes into a topic's ring. Never blocks the event loop: a full
    reliable ring is retried with short sleeps until the timeout."""

    def __init__(
        self, client: AsyncClient, info: dict, timeout: float, inline_max: int | None = None
    ):
        self.client = client
        self.topic: str = info["name"]
        self.qos: str = info["qos"]
        self.timeout = timeout
        self._pub = client._maps.ring(info).publisher(timeout=timeout)
        self._pub.encoder = from_object  # torch tensors, __dlpack__ objects
        self._pub.inline_max = min(
            info["slot_size"], INLINE_MAX if inline_max is None else max(0, inline_max)
        )
        self._closed = False

    async def loan(self, shape, dtype="float32", *, timeout: float | None = None):
        """A writable array in the arena to fill and ``send`` with no copy
        (see :meth:`tensorbus.Publisher.loan`); waits (asynchronously) up to
        ``timeout`` seconds for arena space on a reliable topic."""
        try:
            return self._pub.loan(shape, dtype, timeout=0)
        except BackpressureError:
            if self.qos != "reliable":
                raise
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        nap = 0.0001
        while True:
            await asyncio.sleep(nap)
            nap = min(nap * 2, 0.01)
            try:
                return self._pub.loan(shape, dtype, timeout=0)
            except BackpressureError:
                if time.monotonic() >= deadline:
                    raise

    async def send(self, data, *, timeout: float | None = None, meta: bytes | None = None) -> int:
        """Publish ``data`` (what :meth:`tensorbus.Publisher.send` takes); on
        a full reliable ring wait (asynchronously) up to ``timeout`` seconds
        for credit, then raise BackpressureError."""
        try:
            return self._pub.send(data, timeout=0, meta=meta)
        except BackpressureError:
            pass
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        if (
            isinstance(data, np.ndarray)
            and data.nbytes > self._pub.inline_max
            and data.dtype.kind in "biufc"
        ):
            # Copy a large array into a loan once; each retry then sends the
            # loan itself instead of copying the array again.
            data = await self._loaned_copy(data, deadline)
        nap = 0.0001
        while True:
            await asyncio.sleep(nap)
            nap = min(nap * 2, 0.01)
            try:
                return self._pub.send(data, timeout=0, meta=meta)
            except BackpressureError:
                if time.monotonic() >= deadline:
                    raise BackpressureError(
                        f"topic {self.topic!r} is full: no credit within {limit:g} s"
                    ) from None

    async def _loaned_copy(self, arr: np.ndarray, deadline: float) -> np.ndarray:
        nap = 0.0001
        while True:
            try:
                loan = self._pub.loan(arr.shape, arr.dtype, timeout=0)
                break
            except BackpressureError:
                if self.qos != "reliable" or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(nap)
            nap = min(nap * 2, 0.01)
        np.copyto(loan, arr)
        return loan

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pub.close()
        if self in self.client._publishers:
            self.client._publishers.remove(self)
        with contextlib.suppress(Exception):
            await self.client._request("close_publisher", topic=self.topic)


class AsyncSubscriber(Subscription):
    """``await sub.recv()``, ``await sub.recv_batch()``, ``async for msg in sub``."""

    def __init__(self, client: AsyncClient, reply: dict, pattern: str):
        super().__init__(client._maps, reply, pattern)
        self.client = client
        # O_RDWR: we hold a writer ourselves, so the pipe never reads as EOF
        # (which would make it readable forever) while no publisher has it open.
        self._fd = os.open(reply["bell"]["fifo"], os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        # Notices wait here until recv is between sleeps: an armed ring set
        # cannot take a new member.
        self._notices: collections.deque[tuple[str, dict]] = collections.deque()
        self._waiter: asyncio.Future | None = None
        self._closed = False

    def _queue_notice(self, kind: str, fields: dict) -> None:
        self._notices.append((kind, fields))
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _drain_fifo(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._fd, 4096):
                pass

    async def recv(self, timeout: float | None = None) -> Message:
        """The next message of any matching topic; ReceiveTimeout after
        ``timeout`` seconds (None: no limit)."""
        if self._closed:
            raise ClientClosed("the subscriber is closed")
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._rings.notice()
            while self._notices:
                self.on_notice(*self._notices.popleft())
            batch = self._take(1)
            if batch:
                return batch[0]
            self._check_broker()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ReceiveTimeout(f"no message on {self.pattern!r} within {timeout:g} s")
            if self._notices or not self._rings.arm():
                continue
            self._waiter = loop.create_future()
            loop.add_reader(self._fd, self._wake)
            try:
                wait = STALL_CHECK_S if left is None else min(left, STALL_CHECK_S)
                done, _ = await asyncio.wait([self._waiter], timeout=wait)
            finally:
                loop.remove_reader(self._fd)
                self._waiter = None
                self._rings.disarm()
                self._drain_fifo()
            if not done:
                self._rings.check_stalls()

    async def recv_batch(self, max_n: int = 256, max_wait: float | None = None) -> list:
        """Up to ``max_n`` messages: waits up to ``max_wait`` for the first,
        then takes what has already arrived; [] if nothing came.

        As with the sync client, a message whose tensor lives in the arena
        holds its block while the message, its ``data`` or any view of it
        lives: release each message (``msg.release()``) or drop the batch
        (``del batch``) before the next call, or a publisher of loans or large
        tensors can stall on a full arena while this call waits. Copy what
        you keep."""
        try:
            first = await self.recv(max_wait)
        except ReceiveTimeout:
            return []
        return [first, *self._take(max_n - 1, keep_gap=True)]

    def __aiter__(self) -> AsyncSubscriber:
        return self

    async def __anext__(self) -> Message:
        if self._closed:
            raise StopAsyncIteration
        try:
            return await self.recv()
        except ClientClosed:
            raise StopAsyncIteration from None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake()
        self._rings.close()
        os.close(self._fd)
        self.client._subscriptions.pop(self.id, None)
        with contextlib.suppress(Exception):
            await self.client._request("unsubscribe", sub=self.id)
