"""The control channel of one client, without I/O: what both clients say to
the broker and how they read its answers.

Like h11, it never touches a socket. :meth:`ControlChannel.request` gives
the bytes of a request (with its id); :meth:`ControlChannel.receive` takes
the bytes of one frame from the broker and returns the reply it matches, if
any, after handing notices to their subscriptions. :meth:`wait_plan` says how
long to wait for a reply and when to ask whether anything listens at all.
The sync client drives it with a blocking ZeroMQ socket, the asyncio client
with ``zmq.asyncio``, so the two cannot drift apart.

The rules (docs/protocol.md §2):

* ids count from 1; a reply is matched to a request in flight by its id;
* an error without an id answers a request the broker could not parse: it
  goes to the request in flight if there is exactly one;
* a reply to no request in flight (the late answer of a request that timed
  out) is dropped;
* a notice goes to the subscription it names (``sub``), a shutdown to all.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import zmq

from tensorbus.broker import protocol as P
from tensorbus.clients._shared import HELLO_PROBE_S
from tensorbus.clients.errors import BrokerUnavailable, ProtocolError, error_for

__all__ = ["Answer", "ControlChannel", "curve_client"]


class Answer(NamedTuple):
    """A reply matched to the request ``id`` it answers."""

    id: int
    reply: P.Reply


def curve_client(server_key: str | None) -> Callable | None:
    """What makes a socket a CURVE client of a broker with ``server_key``
    (default ``TENSORBUS_CURVE_SERVER_KEY``); None without a key."""
    server_key = server_key or os.environ.get("TENSORBUS_CURVE_SERVER_KEY")
    if not server_key:
        return None

    def secure(sock) -> None:
        public, secret = zmq.curve_keypair()
        sock.curve_serverkey = server_key.encode()
        sock.curve_publickey = public
        sock.curve_secretkey = secret

    return secure


class ControlChannel:
    """Request ids, reply matching and notice dispatch for one connection.

    ``subscriptions`` maps subscription ids to objects with an
    ``on_notice(kind, fields)`` method; the client adds and removes them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._ids = itertools.count(1)
        self._in_flight: dict[int, str] = {}  # id -> op
        self.subscriptions: dict[int, Any] = {}
        self.shutdown_reason: str | None = None  # the broker said it shuts down

    def request(self, op: str, **fields: Any) -> tuple[int, bytes]:
        """(id, frame) of a new request, now in flight until answered or
        :meth:`forget`-ten. Fields that are None are left out."""
        request_id = next(self._ids)
        frame = P.encode_request(op, request_id, **fields)
        self._in_flight[request_id] = op
        return request_id, frame

    def forget(self, request_id: int) -> None:
        """Give up on a request: a reply that still comes is a late one."""
        self._in_flight.pop(request_id, None)

    def receive(self, raw: bytes) -> Answer | None:
        """Take one frame from the broker: the Answer to a request in flight
        (no longer in flight then), or None (a notice, now dispatched, or a
        late reply). ProtocolError for a malformed frame."""
        try:
            reply = P.decode_reply(raw)
        except P.ProtocolViolation as exc:
            raise ProtocolError(f"the broker sent a malformed message: {exc}") from None
        if reply.notice is not None:
            self._dispatch_notice(reply)
            return None
        request_id = reply.id
        if request_id is None and not reply.ok and len(self._in_flight) == 1:
            # An error for a request the broker could not parse: ours.
            request_id = next(iter(self._in_flight))
        if request_id not in self._in_flight:
            return None  # the late answer of a request that timed out
        del self._in_flight[request_id]
        return Answer(request_id, reply)

    def _dispatch_notice(self, reply: P.Reply) -> None:
        if reply.notice == "shutdown":
            self.shutdown_reason = reply.fields.get("reason", "the broker shut down")
            targets = list(self.subscriptions.values())
        else:
            sub = self.subscriptions.get(reply.fields.get("sub"))
            targets = [] if sub is None else [sub]
        for sub in targets:
            sub.on_notice(reply.notice, reply.fields)

    @staticmethod
    def result(answer: Answer) -> dict:
        """The fields of a success reply; the error it reports, raised."""
        reply = answer.reply
        if not reply.ok:
            raise error_for(reply.code, reply.error)
        return reply.fields

    @staticmethod
    def wait_plan(op: str, timeout: float) -> list[tuple[float, bool]]:
        """How to wait ``timeout`` seconds for the reply to ``op``: spans of
        seconds, each with whether to probe the ipc socket if it passes with
        no reply. A hello that is not answered at once asks, once, whether
        anything listens, so a stale socket file fails at once instead of
        after the whole timeout."""
        if op != "hello":
            return [(timeout, False)]
        first = min(HELLO_PROBE_S, timeout)
        return [(first, True), (timeout - first, False)]

    def unanswered(self, op: str, timeout: float) -> BrokerUnavailable:
        """The error of a request whose reply did not come in time."""
        return BrokerUnavailable(
            f"no tensorbus broker answered {op!r} at {self.url} within "
            f"{timeout:g} s (is `tensorbus serve` running?)",
            "unavailable",
        )
