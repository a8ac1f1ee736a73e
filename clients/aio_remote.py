"""The asyncio light client: publish and subscribe through a daemon on
another host (``await tensorbus.aio.connect("tcp://host:port")``).

The link protocol and its state are clients/remote.py's, shared with the
sync light client; only the waiting differs. The link's socket is a
``zmq.asyncio`` DEALER: the event loop waits on it (``await poll``) while a
send waits for credit or a receive for a message, and the link reads and
writes it through a plain shadow socket, never blocking.

:class:`AsyncRedialer` keeps the session across the broker's death, as
clients/redial.py does for the sync client, on the loop: heartbeats, a
monitor of the control connection, and a new session and link with the
broker's successor.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import zmq
import zmq.asyncio

from tensorbus.clients._shared import AsyncEndpoint
from tensorbus.clients.errors import (
    BrokerUnavailable,
    ClientClosed,
    TensorbusError,
)
from tensorbus.clients.reconnect import Backoff, attempt_s, gave_up, no_retry
from tensorbus.clients.redial import (
    DROPPED,
    beat_failure,
    beat_timeout,
    mark_lost,
    monitor_event,
    relink,
    tcp_address,
)
from tensorbus.clients.remote import (
    LINK_CLOSED,
    LightLink,
    RemoteInlet,
    RemoteMessage,
    RemoteOutlet,
    check_alive,
    link_fields,
)

__all__ = ["AsyncLightLink", "AsyncRedialer", "AsyncRemotePublisher", "AsyncRemoteSubscriber"]


class AsyncLightLink(LightLink):
    """A light client's link whose waits are awaited on the event loop."""

    async_sock: zmq.asyncio.Socket

    def _new_socket(self) -> zmq.Socket:
        self.async_sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        return zmq.Socket.shadow(self.async_sock.underlying)

    def _close_socket(self) -> None:
        self.async_sock.close(0)  # the shadow in self.sock goes with it

    async def wait(self, timeout_s: float) -> bool:
        """Read what the broker sent, waiting up to ``timeout_s`` (on the
        loop) for the first message. False if nothing came."""
        sock = self.async_sock
        try:
            ready = await sock.poll(max(0, int(timeout_s * 1000)), zmq.POLLIN)
        except (asyncio.CancelledError, zmq.ZMQError):
            # Closing a socket cancels its polls: a new link replaced it.
            task = asyncio.current_task()
            if not sock.closed or (task is not None and task.cancelling()):
                raise
            return False
        if ready and sock is self.async_sock:
            return self.pump(0)
        return False


class AsyncRemotePublisher(RemoteOutlet):
    """A publisher on a remote broker's topic (see :class:`AsyncPublisher`)."""

    _link: AsyncLightLink

    async def send(self, data, *, timeout: float | None = None, meta: bytes | None = None) -> int:
        """Send ``data``; on a reliable topic await the broker's credit up to
        ``timeout`` seconds, then BackpressureError. Returns this link's
        sequence, or -1 for a realtime message dropped for want of credit."""
        entry, body = self._describe(data, meta)
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            if self.client._closed:
                raise ClientClosed("the client is closed")
            check_alive(self.client)
            seq = self._attempt(entry, body)
            if seq is not None:
                return seq
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._unsent(timeout)
            if self._link.broken is None:
                await self._link.wait(min(left, 0.01))
            else:  # a redial is under way
                await asyncio.sleep(min(left, 0.01))

    async def close(self) -> None:
        self._closed = True
        if self in self.client._publishers:
            self.client._publishers.remove(self)


class AsyncRemoteSubscriber(RemoteInlet, AsyncEndpoint):
    """Receives a remote broker's topics matching a pattern (see
    :class:`AsyncSubscriber`)."""

    _link: AsyncLightLink

    async def recv(self, timeout: float | None = None) -> RemoteMessage:
        """The next message; ReceiveTimeout after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._closed or self.client._closed:
                raise ClientClosed("the subscriber is closed")
            self._raise_if_denied()
            if self.queue:
                return self._pop_one()
            check_alive(self.client)
            left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
            if await self._link.wait(max(0.0, left)) or left > 0:
                continue
            raise self._timed_out(timeout)

    def _more(self, max_n: int) -> list:
        return self._pop_more(max_n)

    async def close(self) -> None:
        if self._closed:
            return
        self._leave()
        self.client._remote_subs.discard(self)


class AsyncRedialer:
    """The asyncio light client's keeper (clients/redial.py has the policy):
    a task that heartbeats, and a monitor of the control socket. A loss
    resolves the client's ``_death`` (requests in flight stop waiting, and
    are sent again after the redial if idempotent) and starts its
    ``_recovery``, which requests wait for."""

    def __init__(self, client, period: float):
        self.client = client
        self.period = period
        self.budget = client._reconnect_s
        self.generation = 0  # sessions this client had to open again
        self.broken: str | None = None
        loop = asyncio.get_running_loop()
        client._death = loop.create_future()
        self._monitor = loop.create_task(self._watch_socket(client._sock, 0))
        self.task = loop.create_task(self._run())

    def lose(self, why: str, generation: int | None = None) -> None:
        """The session (of ``generation``, default the current one) is lost."""
        client = self.client
        if generation is not None and generation != self.generation:
            return
        if self.broken is not None or client._closed or client._lost is not None:
            return
        self.broken = why
        if not client._death.done():
            client._death.set_result(None)
        client._recovery = asyncio.get_running_loop().create_task(self._recover(why))

    async def _run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.period)
                if self.client._lost is not None:
                    return
                if self.broken is None:
                    await self._beat()
        finally:
            self._monitor.cancel()

    async def _beat(self) -> None:
        client = self.client
        generation = self.generation
        try:
            await client._exchange("heartbeat", {}, beat_timeout(self.period), client._death)
        except TensorbusError as exc:
            why = beat_failure(exc, self.period)
            if why is not None:
                self.lose(why, generation)

    async def _watch_socket(self, sock, generation: int) -> None:
        """Lose the session the moment its connection drops."""
        try:
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        except zmq.ZMQError:
            return
        try:
            while True:
                event = monitor_event(await monitor.recv_multipart())
                if event == zmq.EVENT_DISCONNECTED:
                    self.lose(DROPPED, generation)
                if event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_MONITOR_STOPPED):
                    return
        finally:
            monitor.close(0)

    async def _recover(self, why: str) -> None:
        """Find the broker again, then a new session and link there, with
        backoff, within the ``reconnect`` budget; else set ``_lost``."""
        client = self.client
        await asyncio.sleep(0)  # the reader hands over what came before (a shutdown notice)
        for _ in range(25 if why == LINK_CLOSED else 0):  # a notice may follow the bye
            if client._channel.shutdown_reason is not None:
                break
            await asyncio.sleep(0.01)
        client._lost = no_retry(client.url, client._channel.shutdown_reason, self.budget)
        if client._lost is not None:
            return
        if client._link is not None:
            mark_lost(client._link, why)
        deadline = time.monotonic() + self.budget
        backoff = Backoff()
        while not client._closing:
            left = deadline - time.monotonic()
            if await _accepts(client.url, min(1.0, max(0.05, left))):
                await client._close_socket()
                client._open_socket()
                try:
                    hello = await client._exchange(
                        "hello", client._hello_fields(), attempt_s(left), None
                    )
                    link = None
                    if client._link is not None:
                        fields = link_fields(client.name)
                        link = await client._exchange("link", fields, attempt_s(left), None)
                except BrokerUnavailable:
                    hello = None
                except TensorbusError as exc:  # refused (a token, a version): final
                    client._lost = exc
                    return
                if hello is not None:
                    client._session = hello.get("session")
                    if link is not None:
                        relink(client._link, link)
                    self.generation += 1
                    self.broken = None
                    loop = asyncio.get_running_loop()
                    client._death = loop.create_future()
                    self._monitor = loop.create_task(
                        self._watch_socket(client._sock, self.generation)
                    )
                    return
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(backoff.next())
        if not client._closing:
            client._lost = gave_up(client.url, self.budget)


async def _accepts(url: str, timeout: float) -> bool:
    """Whether something accepts connections at ``url`` (tcp)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(*tcp_address(url)), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
