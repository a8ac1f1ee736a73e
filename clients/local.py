"""The endpoints of a client on the broker's host: a :class:`Publisher`
writes straight into its topic's shared-memory ring, a :class:`Subscriber`
reads the rings of every topic its pattern matches through one doorbell.
Neither touches the control connection on its hot path
(clients/client.py holds that)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tensorbus._core import Message, SlowConsumer
from tensorbus._core.errors import ReceiveTimeout
from tensorbus._core.tensors import from_object
from tensorbus.broker.topics import INBOX_PREFIX
from tensorbus.clients._shared import INLINE_MAX, Endpoint, Subscription
from tensorbus.clients.errors import ClientClosed

if TYPE_CHECKING:
    from tensorbus.clients.client import Client

__all__ = ["Publisher", "Subscriber"]


class Publisher:
    """Publishes on one topic straight into its shared-memory ring.

    ``send(data, *, timeout=None, meta=None)`` takes bytes, any buffer, a
    numpy array, a torch CPU tensor or a ``__dlpack__`` object and returns
    the message's sequence number. Small messages are copied into the ring
    slot; large ones are copied once into the arena, and arrays from
    :meth:`loan` are sent with no copy. On a reliable topic it waits up to
    ``timeout`` (default: the publisher's) for the slowest subscriber (and
    for arena space), then raises BackpressureError.

    ``loan(shape, dtype="float32", *, timeout=None)`` returns a writable
    array of ``shape`` and ``dtype`` in the arena: fill it, then ``send`` it
    with no copy (it then belongs to the subscribers); it waits up to
    ``timeout`` (default: the publisher's) for arena space.

    Both are the core publisher's own methods, bound in ``__init__``: no
    Python frame sits between the caller and the ring."""

    send: Callable[..., int]
    loan: Callable[..., Any]

    def __init__(self, client: Client, info: dict, timeout: float, inline_max: int | None):
        self.client = client
        self.topic: str = info["name"]
        self.qos: str = info["qos"]
        self.slot_size: int = info["slot_size"]
        self._pub = client._maps.ring(info).publisher(timeout=timeout)
        self._pub.encoder = from_object  # torch tensors, __dlpack__ objects
        self._pub.inline_max = min(
            self.slot_size, INLINE_MAX if inline_max is None else max(0, inline_max)
        )
        # The hot path is the core's send itself: no Python frame in between.
        self.send = self._pub.send
        self.loan = self._pub.loan
        self._closed = False

    @property
    def inline_max(self) -> int:
        """Messages up to this size travel in the ring slot."""
        return self._pub.inline_max

    @property
    def published(self) -> int:
        return self._pub.published

    @property
    def dropped(self) -> int:
        """Realtime topics: own messages overtaken before they were written."""
        return self._pub.dropped

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        ring = self._pub.ring
        self._pub.close()
        client = self.client
        if self in client._publishers:
            client._publishers.remove(self)
        if self.topic.startswith(INBOX_PREFIX) and client._maps is not None:
            client._maps.forget(ring)  # a requester's inbox: unmapped once unused
        if not client._closed and client._pid == os.getpid():
            try:
                client._request("close_publisher", topic=self.topic)
            except Exception:
                pass

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<tensorbus.Publisher {self.topic!r} {self.qos}>"


class Subscriber(Subscription, Endpoint):
    """Receives every topic matching a pattern.

    ``recv()`` returns a :class:`Message` (``topic``, ``seq``,
    ``timestamp_ns``, ``data``); ``recv_batch()`` takes what has arrived in
    one call; iterating yields messages until the subscriber is closed.
    Messages of one topic arrive in publish order; topics are interleaved."""

    def __init__(self, client: Client, reply: dict, pattern: str):
        super().__init__(client._maps, reply, pattern)
        self.client = client
        self._closed = False

    def recv(self, timeout: float | None = None) -> Message:
        """The next message of any matching topic; waits up to ``timeout``
        seconds (None: forever), then raises ReceiveTimeout. Raises
        SlowConsumer once evicted, BrokerUnavailable once the broker is gone."""
        if self._closed:
            raise ClientClosed("the subscriber is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._broker_gone:  # (inline: this loop is the receive hot path)
                self._check_broker()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                msg = self._rings.recv(left)
            except SlowConsumer as exc:
                self.client._drain_notices(wait=0.2)  # the eviction notice has the reason
                raise self._slow_consumer(exc) from None
            if msg is not None:
                return msg
            if self._closed:  # closed from another thread while we waited
                raise ClientClosed("the subscriber is closed")
            # The bell's notice flag was up (or a ring closed): read the news.
            self._rings.notice()
            self.client._drain_notices(wait=0.2)
            if deadline is not None and time.monotonic() >= deadline:
                raise ReceiveTimeout(f"no message on {self.pattern!r} within {timeout:g} s")

    def _more(self, max_n: int) -> list[Message]:
        return self._take(max_n, keep_gap=True)

    def close(self) -> None:
        """Stop receiving; the broker frees this subscription's cursors."""
        if self._closed:
            return
        self._closed = True
        if self.client._pid != os.getpid():
            return
        self._rings.close()
        self.client._subscriptions.pop(self.id, None)
        if not self.client._closed:
            try:
                self.client._request("unsubscribe", sub=self.id)
            except Exception:
                pass

    def __repr__(self) -> str:
        return f"<tensorbus.Subscriber {self.pattern!r} topics={self.topics}>"
