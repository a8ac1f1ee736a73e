"""The asyncio light client: publish and subscribe through a daemon on
another host (``await tensorbus.aio.connect("tcp://host:port")``).

The link protocol and its state are clients/remote.py's, shared with the
sync light client; only the waiting differs. The link's socket is a
``zmq.asyncio`` DEALER: the event loop waits on it (``await poll``) while a
send waits for credit or a receive for a message, and the link reads and
writes it through a plain shadow socket, never blocking.
"""

from __future__ import annotations

import time

import zmq
import zmq.asyncio

from tensorbus.clients._shared import AsyncEndpoint
from tensorbus.clients.errors import ClientClosed
from tensorbus.clients.remote import LightLink, RemoteInlet, RemoteMessage, RemoteOutlet

__all__ = ["AsyncLightLink", "AsyncRemotePublisher", "AsyncRemoteSubscriber"]


class AsyncLightLink(LightLink):
    """A light client's link whose waits are awaited on the event loop."""

    def __init__(self, client, reply: dict, curve):
        self.async_sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        super().__init__(client, reply, curve, sock=zmq.Socket.shadow(self.async_sock.underlying))

    async def wait(self, timeout_s: float) -> bool:
        """Read what the broker sent, waiting up to ``timeout_s`` (on the
        loop) for the first message. False if nothing came."""
        if await self.async_sock.poll(max(0, int(timeout_s * 1000)), zmq.POLLIN):
            return self.pump(0)
        return False

    def close(self) -> None:
        try:
            self._control("bye")
        finally:
            self.async_sock.close(0)  # the shadow in self.sock goes with it


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
            seq = self._attempt(entry, body)
            if seq is not None:
                return seq
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._no_credit(timeout)
            await self._link.wait(min(left, 0.01))

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
