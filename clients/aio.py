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
import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from tensorbus._core import Message
from tensorbus.broker import protocol as P
from tensorbus.broker.topics import validate_pattern, validate_topic
from tensorbus.clients._shared import (
    Mappings,
    client_name,
    ipc_unreachable,
    resolve_url,
)
from tensorbus.clients.aio_local import AsyncPublisher, AsyncSubscriber
from tensorbus.clients.aio_remote import (
    AsyncLightLink,
    AsyncRedialer,
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
from tensorbus.clients.errors import (
    BrokerRestarted,
    BrokerUnavailable,
    ClientClosed,
    NotLocalError,
    ProtocolError,
)
from tensorbus.clients.reconnect import (
    IDEMPOTENT_OPS,
    Backoff,
    BrokerWatch,
    attempt_s,
    gave_up,
    in_flight_error,
    no_retry,
    reconnect_budget,
)
from tensorbus.clients.remote import link_fields
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


async def connect(
    url: str | None = None,
    *,
    name: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    token: str | None = None,
    max_holds: int = 1024,
    spin_us: float | None = None,
    curve_server_key: str | None = None,
    reconnect: bool | float = True,
) -> AsyncClient:
    """Connect to a broker (see :func:`tensorbus.connect`, which takes the
    same arguments, ``reconnect`` included: the loop watches the broker's
    pidfd and resumes the session with its successor). ``url`` may be
    ``tcp://host:port``: a light client (clients/remote.py). ``spin_us``:
    how long a responder's waiting thread spins before it sleeps (asyncio
    subscribers always sleep on the loop)."""
    client = AsyncClient(
        url,
        name=name,
        timeout=timeout,
        max_holds=max_holds,
        spin_us=spin_us,
        curve_server_key=curve_server_key,
        reconnect=reconnect,
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
        reconnect: bool | float = True,
    ):
        self.url = resolve_url(url)
        self._reconnect_s = reconnect_budget(reconnect)
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
        self._closing = False
        self._curve = curve_client(curve_server_key)
        self._heartbeat: asyncio.Task | None = None
        self._redial: AsyncRedialer | None = None
        self._open_socket()
        # The broker's process, watched on the loop (clients/reconnect.py):
        # ``_death`` resolves when it dies, ``_recovery`` finds its successor.
        self._watch: BrokerWatch | None = None
        self._death: asyncio.Future | None = None
        self._recovery: asyncio.Task | None = None
        self._lost: BrokerUnavailable | None = None
        self._session: int | None = None
        self._token: str | None = None

    def _open_socket(self) -> None:
        self._sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:
            self._curve(self._sock)
        self._sock.connect(self.url)
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    async def _close_socket(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        self._sock.close(0)

    def _hello_fields(self) -> dict:
        return {
            "name": self.name,
            "pid": os.getpid(),
            "protocol": P.PROTOCOL_VERSION,
            "token": self._token,
        }

    async def _hello(self, token: str | None) -> None:
        self._token = token
        hello = await self._request("hello", **self._hello_fields())
        self.local = bool(hello.get("local"))
        self._session = hello.get("session")
        if self.local:
            self._maps = Mappings(hello, self.max_holds, self.spin_us)
            self._watch_broker(hello.get("broker_pid"))
        else:  # tcp: heartbeats, and a new session if the broker is lost
            self._redial = AsyncRedialer(self, float(hello.get("heartbeat_s", 2.0)))
            self._heartbeat = self._redial.task

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
        """Send one request and await its reply (clients/channel.py). If
        the broker dies meanwhile, wait for the session to resume with its
        successor, then send the request again if that is safe."""
        if self._closed:
            raise ClientClosed("the client is closed")
        while True:
            await self._recovered(op)
            reply = await self._exchange(op, fields, self.timeout, self._death)
            if reply is not None:
                return reply
            if op not in IDEMPOTENT_OPS:
                await self._recovered(op)
                raise in_flight_error(op, self.url)

    async def _exchange(
        self, op: str, fields: dict, timeout: float, death: asyncio.Future | None
    ) -> dict | None:
        """One request and its reply; None if ``death`` (the broker's) came first."""
        request_id, frame = self._channel.request(op, **fields)
        fut = self._pending[request_id] = asyncio.get_running_loop().create_future()
        waits = [fut] if death is None else [fut, death]
        try:
            await self._sock.send(frame)
            for span, probe in self._channel.wait_plan(op, timeout):
                done, _ = await asyncio.wait(
                    waits, timeout=max(span, 0.001), return_when=asyncio.FIRST_COMPLETED
                )
                if fut in done:
                    return self._channel.result(fut.result())
                if done:
                    return None
                why = ipc_unreachable(self.url, probe=True) if probe else None
                if why:
                    raise BrokerUnavailable(why, "unavailable")
            raise self._channel.unanswered(op, timeout)
        finally:
            self._pending.pop(request_id, None)
            self._channel.forget(request_id)

    # -- surviving the broker (clients/reconnect.py) -----------------------

    def _watch_broker(self, pid: int | None) -> None:
        if not pid:
            return
        self._watch = BrokerWatch(pid)
        self._death = asyncio.get_running_loop().create_future()
        if self._watch.fd >= 0:
            asyncio.get_running_loop().add_reader(self._watch.fd, self._broker_died)

    def _broker_died(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._watch.fd)
        if not self._death.done():
            self._death.set_result(None)
        if self._recovery is None or self._recovery.done():
            self._recovery = loop.create_task(self._recover())

    async def _recovered(self, op: str) -> None:
        """Wait (up to the timeout) for a resume under way; raise what a
        dead broker left this client with."""
        if self._recovery is not None and not self._recovery.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._recovery), self.timeout)
            except TimeoutError:
                raise BrokerUnavailable(
                    f"{op!r} waited {self.timeout:g} s for this client to resume its "
                    f"session with a successor of the broker at {self.url}",
                    "unavailable",
                ) from None
        if self._lost is not None:
            raise self._lost

    async def _recover(self) -> None:
        """Find the dead broker's successor and resume this session there,
        with backoff, within the ``reconnect`` budget; else set _lost."""
        await asyncio.sleep(0)  # the reader hands over what came before the death
        self._lost = no_retry(self.url, self._channel.shutdown_reason, self._reconnect_s)
        if self._lost is not None:
            return
        deadline = time.monotonic() + self._reconnect_s
        backoff = Backoff()
        while self._reconnect_s and not self._closing:
            left = deadline - time.monotonic()
            if ipc_unreachable(self.url, probe=True) is None:
                await self._close_socket()
                self._open_socket()
                fields = {**self._hello_fields(), "resume": self._session}
                try:
                    hello = await self._exchange("hello", fields, attempt_s(left), None)
                except BrokerRestarted as exc:
                    self._lost = exc
                    return
                except BrokerUnavailable:
                    hello = None
                if hello is not None:
                    self._watch.close()
                    self._watch_broker(hello.get("broker_pid"))
                    return
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(backoff.next())
        self._lost = gave_up(self.url, self._reconnect_s)

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
        if self._closed:
            raise ClientClosed("the client is closed")
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
            reply = await self._request("link", **link_fields(self.name))
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
        self._closing = True  # goodbyes do not look for a successor
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
        if self._watch is not None:
            if self._watch.fd >= 0 and not self._death.done():
                asyncio.get_running_loop().remove_reader(self._watch.fd)
            self._watch.close()
        for task in (self._reader, self._heartbeat, self._recovery):
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
