"""The asyncio endpoints of a client on the broker's host: an
:class:`AsyncPublisher` writes into its topic's ring (awaiting credit
instead of blocking), an :class:`AsyncSubscriber` sleeps on a FIFO doorbell
the event loop watches. The control connection is clients/aio.py's."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from typing import TYPE_CHECKING

import numpy as np

from tensorbus._core import BackpressureError, Message
from tensorbus._core.errors import ReceiveTimeout
from tensorbus._core.tensors import from_object
from tensorbus.clients._shared import (
    INLINE_MAX,
    AsyncEndpoint,
    Subscription,
)
from tensorbus.clients.errors import (
    ClientClosed,
)

if TYPE_CHECKING:
    from tensorbus.clients.aio import AsyncClient

__all__ = ["AsyncPublisher", "AsyncSubscriber"]

STALL_CHECK_S = 0.25  # how often a sleeping subscriber looks for a dead publisher's claim


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
