"""What the sync and the asyncio client share: the shared memory a client
maps (rings, the broker's bell table and tensor arena, one wait policy) and
the state of one
subscription (its ring set, and what the broker's notices told it).

Nothing here does I/O on the control socket; each client does that its own
way (blocking or awaiting) and hands notices to :meth:`Subscription.on_notice`.
"""

from __future__ import annotations

import errno
import os
import socket
import sys

from tensorbus._core import Arena, BellTable, Message, Ring, RingSet, SlowConsumer, Waiter
from tensorbus._core import Subscriber as _RingSubscriber
from tensorbus._core.errors import ReceiveTimeout, TensorbusError
from tensorbus.broker.paths import default_url
from tensorbus.clients.errors import BrokerUnavailable, ClientClosed

__all__ = [
    "AsyncEndpoint",
    "Endpoint",
    "HELLO_PROBE_S",
    "INLINE_MAX",
    "Mappings",
    "Subscription",
    "client_name",
    "ipc_unreachable",
    "resolve_url",
]

# Where a copy through the ring slot stops being cheaper than the arena's
# zero-copy receive (perf/perf.py crossover measures it); topics with the
# default 4 KiB slots switch at their slot size.
INLINE_MAX = 65536


def resolve_url(url: str | None) -> str:
    url = url or default_url()
    if not url.startswith(("ipc://", "tcp://")):
        raise ValueError(f"broker url must start with ipc:// or tcp://, not {url!r}")
    return url


# How long a hello waits for its answer before it asks the kernel whether
# anything listens on the ipc socket at all (a healthy broker answers in
# well under a millisecond; a probe costs the broker an empty connection).
HELLO_PROBE_S = 0.1

_START = "start one with `tensorbus serve`"


def ipc_unreachable(url: str, probe: bool = False) -> str | None:
    """Why no broker can answer at ``url``'s ipc socket, or None if one may.

    Without ``probe`` only the socket file is looked at (one stat). With it,
    a plain connect() tells a listening broker from a socket file that a
    dead one left behind (ECONNREFUSED). tcp urls are never judged here:
    only their timeout can tell."""
    if not url.startswith("ipc://"):
        return None
    path = url[len("ipc://") :]
    try:
        os.stat(path)
    except FileNotFoundError:
        return f"no broker at {url}: the socket does not exist; {_START}"
    except PermissionError:
        return f"no broker at {url}: permission denied (the socket belongs to another user)"
    except OSError as exc:
        return f"no broker at {url}: {exc.strerror or exc}"
    if not probe:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect(path)
    except ConnectionRefusedError:
        return (
            f"no broker at {url}: the socket exists but nothing listens on it "
            f"(a broker that died?); {_START}"
        )
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EINPROGRESS):
            return None  # a full backlog: a broker that is alive but busy
        return f"no broker at {url}: {exc.strerror or exc}"
    finally:
        sock.close()
    return None


def client_name(name: str | None) -> str:
    return name or f"{os.path.basename(sys.argv[0] or 'python')}[{os.getpid()}]"


class Mappings:
    """The rings a client has attached (one mapping per ring, shared by its
    publishers and subscribers), the broker's bell table and tensor arena
    with this client's holds in it, and one wait policy for all of them."""

    __slots__ = ("arena", "bells", "holder", "rings", "waiter")

    def __init__(self, hello: dict, max_holds: int = 1024, spin_us: float | None = None):
        bells = hello["bells"]
        self.bells = BellTable.attach(bells["name"], bells["fifo_dir"])
        arena = hello.get("arena")
        self.arena = Arena.attach(arena["meta"], arena["data"]) if arena else None
        slot = arena["holder"] if arena else 0
        # No holder slot (the broker has 63 clients using tensors): this
        # client can still use bytes and small inline tensors.
        self.holder = self.arena.holder(slot, max_holds) if slot else None
        self.rings: dict[str, Ring] = {}
        # spin_us=0: never spin or yield, sleep at once (servers, background threads).
        self.waiter = Waiter(spin_us) if spin_us != 0 else Waiter.sleeping()

    def ring(self, info: dict) -> Ring:
        ring = self.rings.get(info["ring"])
        if ring is None:
            ring = Ring.attach(
                info["ring"],
                bells=self.bells,
                waiter=self.waiter,
                arena=self.arena,
                holder=self.holder,
            )
            self.rings[info["ring"]] = ring
        return ring

    def forget(self, ring: Ring) -> None:
        """Unmap ``ring`` if none of this client's endpoints uses it."""
        if not ring.endpoints and self.rings.get(ring.name) is ring:
            del self.rings[ring.name]
            ring.detach()

    @property
    def holds(self) -> int:
        """Arena blocks this client still holds views of."""
        return self.holder.held if self.holder is not None else 0

    def ringset(self, bell: dict) -> RingSet:
        return RingSet(self.bells, bell["index"], waiter=self.waiter)

    def detach(self) -> None:
        """Unmap every ring no endpoint uses any more."""
        for ring in self.rings.values():
            if not ring.endpoints:
                ring.detach()
        self.rings.clear()


class Subscription:
    """One subscription's receiving state, whatever the client's style."""

    def __init__(self, maps: Mappings, reply: dict, pattern: str):
        self.pattern = pattern
        self.id: int = reply["sub"]
        self._maps = maps
        self._rings = maps.ringset(reply["bell"])
        self._evicted: dict[str, str] = {}
        self._broker_gone: str | None = None
        for member in reply["members"]:
            self._attach(member)

    def _attach(self, member: dict) -> None:
        info = member["topic"]
        core = _RingSubscriber(
            self._maps.ring(info), cursor=member["cursor"], generation=member["generation"]
        )
        self._rings.add(info["name"], core)

    def on_notice(self, kind: str, fields: dict) -> None:
        """Apply a notice of the broker: a new topic to read, an eviction, a shutdown."""
        if kind == "attach":
            try:
                self._attach(fields)
            except TensorbusError:
                pass  # freed before we got here: the broker shut down or dropped us
        elif kind == "evicted":
            self._evicted[fields.get("topic", "?")] = fields.get("reason", "slow consumer")
        elif kind == "shutdown":
            self._broker_gone = fields.get("reason", "the broker shut down")

    def _slow_consumer(self, exc: SlowConsumer) -> SlowConsumer:
        """``exc`` with the reasons the broker gave."""
        reasons = "; ".join(f"{t}: {r}" for t, r in self._evicted.items())
        return SlowConsumer(f"{exc}" + (f" ({reasons})" if reasons else ""))

    def _check_broker(self) -> None:
        if self._broker_gone and not self._rings.topic_names:
            raise BrokerUnavailable(f"the broker went away: {self._broker_gone}", "unavailable")

    def _take(self, max_n: int, keep_gap: bool = False) -> list[Message]:
        """What has already arrived, up to ``max_n``, without waiting.
        ``keep_gap``: the caller holds a message already, so a gap marker met
        first is raised by the next call, not this one."""
        try:
            return self._rings.take(max_n, keep_gap)
        except SlowConsumer as exc:
            raise self._slow_consumer(exc) from None

    @property
    def topics(self) -> list[str]:
        """The topics this subscription reads now."""
        return self._rings.topic_names


class Endpoint:
    """What every sync receiving endpoint (a local or a remote subscriber)
    does the same way, written once: ``recv_batch``, iteration and the
    context manager. A subclass gives ``recv``, ``_more`` and ``close``."""

    _closed: bool

    def recv(self, timeout: float | None = None):
        raise NotImplementedError

    def _more(self, max_n: int) -> list:
        """Up to ``max_n`` messages that have already arrived, after one the
        caller holds: a gap met first is raised by the next call."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def recv_batch(self, max_n: int = 256, max_wait: float | None = None) -> list:
        """Up to ``max_n`` messages: waits up to ``max_wait`` seconds for the
        first (None: forever), then takes only what has already arrived.
        Returns an empty list if nothing came within ``max_wait``.

        A message whose tensor lives in the arena holds its block for as long
        as the message, its ``data`` or any view of it lives. Release each
        message (``msg.release()``) or drop the batch (``del batch``) before
        the next call: ``batch = sub.recv_batch(...)`` rebinds only after that
        call returns (and a ``for msg in batch`` loop's ``msg`` keeps the last
        one), so the old blocks stay held while it waits, and a publisher of
        loans or large tensors can stall on a full arena (``BackpressureError``
        after its timeout) while this call waits for the message it cannot
        send. Copy what you keep."""
        try:
            first = self.recv(max_wait)
        except ReceiveTimeout:
            return []
        return [first, *self._more(max_n - 1)]

    def __iter__(self):
        while not self._closed:
            try:
                yield self.recv()
            except ClientClosed:
                return

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncEndpoint:
    """The asyncio twin of :class:`Endpoint` (local and remote asyncio
    subscribers): ``await recv_batch``, ``async for`` and ``async with``."""

    _closed: bool

    async def recv(self, timeout: float | None = None):
        raise NotImplementedError

    def _more(self, max_n: int) -> list:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

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
        return [first, *self._more(max_n - 1)]

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._closed:
            raise StopAsyncIteration
        try:
            return await self.recv()
        except ClientClosed:
            raise StopAsyncIteration from None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
