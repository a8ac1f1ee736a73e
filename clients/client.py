"""The pub/sub client: what applications code against.

A :class:`Client` holds one control connection to the broker (a ZeroMQ
DEALER speaking broker/protocol.py: clients/control.py). Publishing and receiving do not touch
that connection: a :class:`Publisher` writes straight into its topic's
shared-memory ring, and a :class:`Subscriber` reads the rings of every topic
its pattern matches through one doorbell (a RingSet). The broker is asked only
to open, subscribe and close, and it tells a subscriber when a new topic
matches its pattern (a notice).

A client is not thread-safe for receiving: use one subscriber per thread.
Requests to the broker are serialized by a lock.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

from tensorbus._core import Message
from tensorbus.broker.topics import validate_pattern, validate_topic
from tensorbus.clients._shared import (
    Mappings,
    client_name,
    ipc_unreachable,
    resolve_url,
)
from tensorbus.clients.channel import ControlChannel, curve_client
from tensorbus.clients.control import ControlConnection
from tensorbus.clients.errors import (
    BrokerUnavailable,
    ClientClosed,
    NotLocalError,
)
from tensorbus.clients.local import Publisher, Subscriber
from tensorbus.clients.reconnect import (
    BrokerWatch,
    reconnect_budget,
)
from tensorbus.clients.redial import Redialer
from tensorbus.clients.remote import LightLink, RemotePublisher, RemoteSubscriber, link_fields
from tensorbus.clients.reqrep import (
    DEFAULT_GROUP,
    Request,
    Requester,
    RequestStream,
    Responder,
)

__all__ = ["Client", "Message", "Publisher", "Subscriber", "connect"]

DEFAULT_TIMEOUT = 5.0

# Clients alive in this process, invalidated in a forked child: the child
# shares the parent's cursors and socket, and must not use either.
_LIVE_CLIENTS: weakref.WeakSet = weakref.WeakSet()


def _invalidate_after_fork() -> None:
    for client in list(_LIVE_CLIENTS):
        client._forked()


os.register_at_fork(after_in_child=_invalidate_after_fork)


def connect(
    url: str | None = None,
    *,
    name: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    token: str | None = None,
    max_holds: int = 1024,
    spin_us: float | None = None,
    curve_server_key: str | None = None,
    reconnect: bool | float = True,
) -> Client:
    """Connect to a broker and say hello.

    ``url``: ``ipc:///path`` (a broker on this host: shared memory) or
    ``tcp://host:port`` (a broker on another host: a light client, whose
    messages travel over the network, see clients/remote.py); default
    ``TENSORBUS_URL``, else this user's default ipc socket. ``token``:
    default ``TENSORBUS_TOKEN``. ``max_holds``: how many arena blocks this
    client may hold views of at once before ``recv`` raises HoldLimitError.
    ``spin_us``: how long a waiting receive spins before it sleeps (default
    ``TENSORBUS_SPIN_US``, else 50; 0: sleep at once, for servers and
    background threads that must not take a core). ``curve_server_key``:
    the broker's CURVE public key (z85) where it encrypts tcp (default
    ``TENSORBUS_CURVE_SERVER_KEY``). ``reconnect``: if the broker dies, how
    many seconds to look for its successor (a restart or a ``--standby``)
    and resume this client's session there (True: 30; False or 0: off, and
    control calls then fail); publishing and receiving go on meanwhile
    (clients/reconnect.py). Raises BrokerUnavailable if no broker answers
    within ``timeout`` seconds."""
    return Client(
        url,
        name=name,
        timeout=timeout,
        token=token,
        max_holds=max_holds,
        spin_us=spin_us,
        curve_server_key=curve_server_key,
        reconnect=reconnect,
    )


class Client(ControlConnection):
    """A connection to the broker. Use as a context manager, or ``close()``."""

    def __init__(
        self,
        url: str | None = None,
        *,
        name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
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
        self.name = client_name(name)
        self.timeout = timeout
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._channel = ControlChannel(self.url)
        self._closed = False
        self._maps: Mappings | None = None
        self._subscriptions: dict[int, Subscriber] = self._channel.subscriptions
        self._publishers: list[Publisher] = []
        self._requester: Requester | None = None
        self._streams: list = []  # RequestStreams and Responders
        # pyzmq's per-process context (recreated after a fork): one I/O
        # thread for all clients of the process, not one each.
        self._curve = curve_client(curve_server_key)
        self._sock = self._new_socket()
        self._link: LightLink | None = None
        self._redial: Redialer | None = None  # tcp: heartbeats and redials
        self._token = token or os.environ.get("TENSORBUS_TOKEN")
        # The broker's process, watched for its death (clients/reconnect.py);
        # what a dead broker left this client with, raised by every call.
        self._watch: BrokerWatch | None = None
        self._lost: BrokerUnavailable | None = None
        self._closing = False
        try:
            hello = self._request("hello", **self._hello_fields())
        except BaseException:
            self._sock.close(0)
            raise
        self.local = bool(hello.get("local"))
        self.broker_pid = hello.get("broker_pid")
        self._session = hello.get("session")
        if self.local:
            try:
                self._maps = Mappings(hello, max_holds, spin_us)
            except BaseException:
                self._sock.close(0)
                raise
        else:
            self._start_heartbeats(float(hello.get("heartbeat_s", 2.0)))
        if self.local and self.broker_pid:
            self._watch = BrokerWatch(self.broker_pid)
            self._start_watcher()
        _LIVE_CLIENTS.add(self)

    # -- the control connection -------------------------------------------

    def _check(self) -> None:
        if self._pid != os.getpid():
            raise ClientClosed(
                "this client was created before a fork(); a child process "
                "must connect() its own client"
            )
        if self._closed:
            raise ClientClosed("the client is closed")

    # -- the public API ----------------------------------------------------

    def create_topic(
        self,
        topic: str,
        *,
        qos: str = "reliable",
        capacity: int | None = None,
        slot_size: int | None = None,
        private: bool = False,
    ) -> dict:
        """Create ``topic`` with these options (or check that it exists with
        them: TopicError if not). QoS: ``reliable`` (every message, the
        publisher waits for credit), ``realtime`` (newest wins, drops
        counted), ``latest`` (last value only). ``private``: the topic must
        be new, and the broker removes it when this client goes."""
        self._check()
        validate_topic(topic)
        return self._request(
            "create_topic",
            topic=topic,
            qos=qos,
            capacity=capacity,
            slot_size=slot_size,
            private=private or None,
        )["topic"]

    def publisher(
        self,
        topic: str,
        *,
        qos: str | None = None,
        capacity: int | None = None,
        slot_size: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        inline_max: int | None = None,
    ) -> Publisher:
        """A publisher on ``topic``, creating the topic with these options
        (defaults: reliable, broker's capacity and slot size) if it does not
        exist. ``timeout``: how long a reliable ``send`` waits for credit
        (or arena space). ``inline_max``: messages up to this many bytes are
        copied through the ring slot, larger ones go through the arena
        (default: ``min(slot_size, INLINE_MAX)``)."""
        self._check()
        validate_topic(topic)
        if not self.local:
            info = self._request(
                "create_topic", topic=topic, qos=qos, capacity=capacity, slot_size=slot_size
            )["topic"]
            return RemotePublisher(self, self._light_link(), info, timeout)
        info = self._request(
            "open_publisher", topic=topic, qos=qos, capacity=capacity, slot_size=slot_size
        )["topic"]
        pub = Publisher(self, info, timeout, inline_max)
        self._publishers.append(pub)
        return pub

    def subscribe(self, pattern: str, *, group: str | None = None) -> Subscriber:
        """Receive every topic matching ``pattern`` (``*``: one level,
        ``>``: the rest), including topics created later. ``group``: join
        the queue group of that name on topic ``pattern`` (no wildcards):
        each message goes to exactly one member."""
        self._check()
        if group is None:
            validate_pattern(pattern)
        else:
            validate_topic(pattern)
        if not self.local:
            if group is not None:
                raise NotLocalError(
                    "queue groups need the broker's shared memory: join them from its host",
                    "not_local",
                )
            with self._lock:
                return RemoteSubscriber(self, self._light_link(), pattern)
        reply = self._request("subscribe", pattern=pattern, mode="sync", group=group)
        sub = Subscriber(self, reply, pattern)
        self._subscriptions[sub.id] = sub
        return sub

    def _light_link(self) -> LightLink:
        """This tcp client's link to its broker, opened on first use."""
        with self._lock:
            if self._link is None:
                reply = self._request("link", **link_fields(self.name))
                self._link = LightLink(self, reply, self._curve)
            return self._link

    # -- request/reply (clients/reqrep.py) ----------------------------------

    def request(
        self,
        topic: str,
        data,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 2,
    ) -> Message:
        """Send ``data`` to one responder of ``topic`` and return its reply
        (a Message). Without a reply within ``timeout`` seconds the request
        is sent again with the same id, up to ``retries`` times, then
        RequestTimeout. NoResponders at once if nobody serves ``topic``;
        ResponderError if the responder's handler failed. One request at a
        time per client."""
        self._check()
        if self._requester is None:
            self._requester = Requester(self)
        return self._requester.request(topic, data, timeout, retries)

    def requests(self, topic: str, *, group: str = DEFAULT_GROUP) -> RequestStream:
        """The requests of ``topic`` for this member of queue group
        ``group``: ``for req in client.requests(t): req.reply(data)``."""
        self._check()
        stream = RequestStream(self, topic, group)
        self._streams.append(stream)
        return stream

    def respond(
        self, topic: str, handler: Callable[[Request], Any], *, group: str = DEFAULT_GROUP
    ) -> Responder:
        """Answer every request of ``topic`` with ``handler(request)``'s
        return value, in a background thread, as a member of ``group``.
        ``close()`` the returned Responder to stop."""
        self._check()
        responder = Responder(self, topic, handler, group)
        self._streams.append(responder)
        return responder

    def topics(self, pattern: str | None = None) -> list[dict]:
        """The broker's topics (matching ``pattern``), with their options."""
        self._check()
        return self._request("list_topics", pattern=pattern)["topics"]

    def stats(self, pattern: str | None = None) -> dict:
        """Per-topic counters and rates, and the broker's own figures."""
        self._check()
        return self._request("stats", pattern=pattern)

    def close(self) -> None:
        """Close every publisher and subscriber, say bye, disconnect."""
        if self._closed or self._pid != os.getpid():
            self._closed = True
            return
        # Goodbyes to a broker that may be gone should not wait 5 s each,
        # nor look for a successor.
        self.timeout = min(self.timeout, 1.0)
        self._closing = True
        for stream in self._streams:
            stream.close()
        if self._requester is not None:
            self._requester.close()
        for sub in list(self._subscriptions.values()):
            sub.close()
        for pub in list(self._publishers):
            pub.close()
        if self._redial is not None:
            self._redial.stop()
        if self._link is not None:
            with self._lock:
                self._link.close()
        try:
            saved, self.timeout = self.timeout, min(self.timeout, 1.0)
            # Views of arena blocks may outlive the client: the broker then
            # keeps our holds until this process exits.
            self._request("bye", holds=self._maps.holds if self._maps else 0)
            self.timeout = saved
        except Exception:
            pass  # the broker is gone: nothing to say bye to
        self._closed = True
        if self._watch is not None:
            with contextlib.suppress(OSError):  # (gone already if the broker was lost)
                os.write(self._wake_w, b"x")  # the watcher thread ends
            os.close(self._wake_w)
            with self._lock:
                self._watch.close()
        if self._maps is not None:
            self._maps.detach()
        self._sock.close(0)
        _LIVE_CLIENTS.discard(self)

    def _forked(self) -> None:
        # The child must neither use nor release what the parent holds.
        self._pid = -1
        self._closed = True
        if self._maps is not None and self._maps.holder is not None:
            self._maps.holder.forget()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<tensorbus.Client {self.name!r} {self.url} {'closed' if self._closed else ''}>"
