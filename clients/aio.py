"""The asyncio client: the same API as :mod:`tensorbus.clients.client`, with
``await`` where the sync client would wait.

No thread spins or blocks per subscriber: each asyncio subscription sleeps
on a FIFO doorbell the event loop watches (``loop.add_reader``), which a
publisher writes one byte to only when the subscription announced a sleep.
Control requests go through ``zmq.asyncio``; one reader task feeds the
control channel (clients/channel.py, the same as the sync client's), which
matches replies to requests and hands notices to their subscriptions.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from collections.abc import Callable
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
    INLINE_MAX,
    AsyncEndpoint,
    Mappings,
    Subscription,
    client_name,
    ipc_unreachable,
    resolve_url,
)
from tensorbus.clients.aio_remote import (
    AsyncLightLink,
    AsyncRemotePublisher,
    AsyncRemoteSubscriber,
)
from tensorbus.clients.aio_reqrep import (
    AsyncRequest,
    AsyncRequester,
    AsyncRequestStream,
    AsyncResponder,
)
from tensorbus.clients.channel import ControlChannel, curve_client
from tensorbus.clients.errors import BrokerUnavailable, ClientClosed, NotLocalError, ProtocolError
from tensorbus.clients.reqrep import DEFAULT_GROUP

__all__ = [
    "AsyncClient",
    "AsyncPublisher",
    "AsyncRemotePublisher",
    "AsyncRemoteSubscriber",
    "AsyncRequest",
    "AsyncRequestStream",
    "AsyncResponder",
    "AsyncSubscriber",
    "connect",
]

DEFAULT_TIMEOUT = 5.0
STALL_CHECK_S = 0.25  # how often a sleeping subscriber looks for a dead publisher's claim


async def connect(
    url: str | None = None,
    *,
    name: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    token: str | None = None,
    max_holds: int = 1024,
    spin_us: float | None = None,
    curve_server_key: str | None = None,
) -> AsyncClient:
    """Connect to a broker (see :func:`tensorbus.connect`, which takes the
    same arguments). ``url`` may be ``tcp://host:port``: a light client
    (clients/remote.py). ``spin_us``: how long a responder's waiting thread
    spins before it sleeps (asyncio subscribers always sleep on the loop)."""
    client = AsyncClient(
        url,
        name=name,
        timeout=timeout,
        max_holds=max_holds,
        spin_us=spin_us,
        curve_server_key=curve_server_key,
    )
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
        spin_us: float | None = None,
        curve_server_key: str | None = None,
    ):
        self.url = resolve_url(url)
        why = ipc_unreachable(self.url)
        if why:
            raise BrokerUnavailable(why, "unavailable")
        self.max_holds = max_holds
        self.spin_us = spin_us
        self.name = client_name(name)
        self.timeout = timeout
        self.local = False
        self._channel = ControlChannel(self.url)
        self._pending: dict[int, asyncio.Future] = {}  # request id -> its Answer
        self._subscriptions: dict[int, AsyncSubscriber] = self._channel.subscriptions
        self._publishers: list[AsyncPublisher | AsyncRemotePublisher] = []
        self._remote_subs: set[AsyncRemoteSubscriber] = set()
        self._link: AsyncLightLink | None = None
        self._maps: Mappings | None = None
        self._requester: AsyncRequester | None = None
        self._streams: list[AsyncRequestStream | AsyncResponder] = []
        self._closed = False
        self._sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._curve = curve_client(curve_server_key)
        if self._curve is not None:
            self._curve(self._sock)
        self._sock.connect(self.url)
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        self._heartbeat: asyncio.Task | None = None

    async def _hello(self, token: str | None) -> None:
        hello = await self._request(
            "hello", name=self.name, pid=os.getpid(), protocol=P.PROTOCOL_VERSION, token=token
        )
        self.local = bool(hello.get("local"))
        if self.local:
            self._maps = Mappings(hello, self.max_holds, self.spin_us)
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
                answer = self._channel.receive(raw)
            except ProtocolError:
                continue
            fut = None if answer is None else self._pending.pop(answer.id, None)
            if fut is not None and not fut.done():
                fut.set_result(answer)

    async def _request(self, op: str, **fields: Any) -> dict:
        """Send one request and await its reply (clients/channel.py)."""
        if self._closed:
            raise ClientClosed("the client is closed")
        request_id, frame = self._channel.request(op, **fields)
        fut = self._pending[request_id] = asyncio.get_running_loop().create_future()
        try:
            await self._sock.send(frame)
            for span, probe in self._channel.wait_plan(op, self.timeout):
                done, _ = await asyncio.wait([fut], timeout=max(span, 0.001))
                if done:
                    return self._channel.result(fut.result())
                why = ipc_unreachable(self.url, probe=True) if probe else None
                if why:
                    raise BrokerUnavailable(why, "unavailable")
            raise self._channel.unanswered(op, self.timeout)
        finally:
            self._pending.pop(request_id, None)
            self._channel.forget(request_id)

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
        self._check_local("requests")
        if self._requester is None:
            self._requester = AsyncRequester(self)
            await self._requester.open()
        return await self._requester.request(topic, data, timeout, retries)

    def requests(self, topic: str, *, group: str = DEFAULT_GROUP) -> AsyncRequestStream:
        """The requests of ``topic`` for this member of queue group ``group``:
        ``async for req in client.requests(t): await req.reply(data)``, or
        ``stream = await client.requests(t)`` to join the group at once."""
        self._check_local("queue groups")
        stream = AsyncRequestStream(self, topic, group)
        self._streams.append(stream)
        return stream

    async def respond(
        self, topic: str, handler: Callable[[AsyncRequest], Any], *, group: str = DEFAULT_GROUP
    ) -> AsyncResponder:
        """Answer every request of ``topic`` with ``handler(request)``'s
        return value (awaited if the handler is a coroutine function), in a
        task, as a member of ``group``; ``await close()`` the returned
        AsyncResponder to stop."""
        self._check_local("queue groups")
        responder = AsyncResponder(AsyncRequestStream(self, topic, group), handler)
        self._streams.append(responder)
        try:
            return await responder.start()
        except BaseException:
            self._streams.remove(responder)
            raise

    def _check_local(self, what: str) -> None:
        if self._closed:
            raise ClientClosed("the client is closed")
        if not self.local:
            raise NotLocalError(
                f"{what} need the broker's shared memory: join them from its host", "not_local"
            )

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
        """See :meth:`tensorbus.Client.publisher`. Over tcp, a publisher
        through the broker's link (clients/aio_remote.py)."""
        validate_topic(topic)
        if not self.local:
            info = (
                await self._request(
                    "create_topic", topic=topic, qos=qos, capacity=capacity, slot_size=slot_size
                )
            )["topic"]
            rpub = AsyncRemotePublisher(self, await self._light_link(), info, timeout)
            self._publishers.append(rpub)
            return rpub
        info = (
            await self._request(
                "open_publisher", topic=topic, qos=qos, capacity=capacity, slot_size=slot_size
            )
        )["topic"]
        pub = AsyncPublisher(self, info, timeout, inline_max)
        self._publishers.append(pub)
        return pub

    async def subscribe(self, pattern: str) -> AsyncSubscriber | AsyncRemoteSubscriber:
        """See :meth:`tensorbus.Client.subscribe` (queue groups: :meth:`requests`)."""
        validate_pattern(pattern)
        if not self.local:
            rsub = AsyncRemoteSubscriber(self, await self._light_link(), pattern)
            self._remote_subs.add(rsub)
            return rsub
        reply = await self._request("subscribe", pattern=pattern, mode="async")
        sub = AsyncSubscriber(self, reply, pattern)
        self._subscriptions[sub.id] = sub
        return sub

    async def _light_link(self) -> AsyncLightLink:
        """This tcp client's link to its broker, opened on first use."""
        if self._link is None:
            reply = await self._request("link", kind="client", name=self.name, transport="tcp")
            if self._link is None:  # another task may have opened it meanwhile
                self._link = AsyncLightLink(self, reply, self._curve)
        return self._link

    async def topics(self, pattern: str | None = None) -> list[dict]:
        return (await self._request("list_topics", pattern=pattern))["topics"]

    async def stats(self, pattern: str | None = None) -> dict:
        return await self._request("stats", pattern=pattern)

    async def close(self) -> None:
        if self._closed:
            return
        for stream in list(self._streams):
            await stream.close()
        if self._requester is not None:
            await self._requester.close()
        for sub in list(self._subscriptions.values()):
            if isinstance(sub, AsyncSubscriber):  # (a group's reader goes with its stream)
                await sub.close()
        for rsub in list(self._remote_subs):
            await rsub.close()
        for pub in list(self._publishers):
            await pub.close()
        if self._link is not None:
            with contextlib.suppress(Exception):
                self._link.close()
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


class AsyncSubscriber(Subscription, AsyncEndpoint):
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

    def on_notice(self, kind: str, fields: dict) -> None:
        """Queue a notice of the broker: it is applied between sleeps."""
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
                super().on_notice(*self._notices.popleft())
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

    def _more(self, max_n: int) -> list:
        return self._take(max_n, keep_gap=True)

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
