"""The broker daemon: one per host, an asyncio (uvloop) control plane.

It owns every shared-memory segment (topic rings, the doorbell table and the
tensor arena), allocates the cursors subscribers read with and the arena
holder slots, and answers the control
protocol (broker/protocol.py) on a ZeroMQ ROUTER socket. Messages never pass
through it: publishers and subscribers on this host meet in the rings.

What it watches:

* clients on ipc are checked by uid on every message, from the kernel's
  SO_PEERCRED (ZeroMQ's ``Peer-Address`` frame property), and their pid is
  watched with a pidfd: a client killed with -9 is seen within milliseconds
  and its cursors, doorbells, half-done publishes, arena loans and the
  arena blocks it held views of are released;
* clients on tcp (tools: ``topics``, ``stats``) send heartbeats;
* realtime topics: subscribers' drop counters, announced on
  ``$sys/pressure/<topic>``; optionally, subscribers that stay too far behind
  for longer than a grace period are evicted (NATS's slow-consumer rule).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hmac
import ipaddress
import itertools
import logging
import os
import shutil
import signal
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import zmq
import zmq.asyncio

from tensorbus._core import (
    Arena,
    BellTable,
    CapacityError,
    Ring,
    SegmentError,
    TensorbusError,
)
from tensorbus._core.arena import MAX_HOLDERS
from tensorbus.broker import protocol as P
from tensorbus.broker.bridge import Bridge
from tensorbus.broker.paths import default_ipc_path, ensure_private_dir
from tensorbus.broker.stats import LATENCY_BUCKETS, TopicMeter, private_rss_kb
from tensorbus.broker.topics import (
    SYSTEM_PREFIX,
    TopicNameError,
    is_system,
    matches,
    validate_pattern,
    validate_topic,
)

__all__ = ["Broker", "BrokerConfig", "BrokerStartError", "default_arena_size"]

log = logging.getLogger("tensorbus.broker")

MAX_CAPACITY = 1 << 24
INBOX_PREFIX = "_inbox/"  # reply inboxes: private topics, never recreated by a reply
MAX_SLOT_SIZE = 1 << 26
# $sys/pressure/<topic>: a realtime ring of this many slots of this size. A
# body lists at most PRESSURE_MAX_LISTED cursors; with names of at most
# P.MAX_NAME_BYTES it always fits one slot (tests/test_broker.py checks).
PRESSURE_CAPACITY = 64
PRESSURE_SLOT_SIZE = 8192
PRESSURE_MAX_LISTED = 32
# How many ended sessions are remembered, so that a connection's next
# request hears why its session is gone (timed out, bye) instead of "no hello".
ENDED_SESSIONS_KEPT = 1024


class BrokerStartError(RuntimeError):
    """The broker cannot start (endpoint taken, bad option); the sentence says why."""


@dataclass
class BrokerConfig:
    """Every daemon option; ``tensorbus serve --help`` documents each."""

    ipc_path: str | None = None  # None: the per-user default
    tcp: str | None = None  # "HOST:PORT"
    token: str | None = None
    insecure: bool = False
    default_capacity: int = 256
    default_slot_size: int = 4096
    latest_capacity: int = 8
    max_subscribers: int = 64  # cursors per topic ring
    max_publishers: int = 64
    max_bells: int = 4096  # concurrent subscriptions on this host
    max_topics: int = 4096
    arena_size: int | None = None  # bytes; None: default_arena_size()
    slow_consumer_grace: float = 0.0  # seconds; 0 disables eviction
    heartbeat_s: float = 2.0
    monitor_interval: float = 0.2
    # Bridges (docs/bridge.md): daemons to link to ("tcp://host:port"), the
    # data transport, the port links attach on (0: any; announced at link
    # time), how long a lost peer's cursors are kept, and a CURVE secret
    # key (z85) shared by the daemons of a cluster: encryption for tcp.
    peers: list = field(default_factory=list)
    transport: str = "auto"  # "ucx", "tcp" or "auto" (ucx where ucxx imports)
    link_port: int = 0
    link_grace_s: float = 10.0
    curve_secret: str | None = None


@dataclass(eq=False)
class Topic:
    name: str
    qos: str
    capacity: int
    slot_size: int
    ring: Ring
    # The cursors the broker handed out on this ring, keyed as the ring
    # reports them: (index, generation) -> Subscription. Publishers are
    # counted from the ring's own records.
    cursors: dict = field(default_factory=dict)
    meter: TopicMeter = field(default_factory=TopicMeter)
    drops_seen: dict = field(default_factory=dict)  # (cursor, generation) -> drops
    behind_since: dict = field(default_factory=dict)  # (cursor, generation) -> monotonic
    checked_head: int = -1  # the head at the last pressure check
    pressure_pub: object = None
    owner: tuple | None = None  # private topics (reply inboxes): the session that owns it

    def info(self) -> dict:
        return {
            "name": self.name,
            "qos": self.qos,
            "capacity": self.capacity,
            "slot_size": self.slot_size,
            "ring": self.ring.name,
        }


@dataclass(eq=False)
class Subscription:
    id: int
    session: Session
    pattern: str
    mode: str
    bell: int
    bell_generation: int
    fifo: str | None
    members: dict = field(default_factory=dict)  # topic name -> (cursor, generation)
    group: Group | None = None  # a queue-group member (request/reply responders)
    # A bridge's subscription: which topics it takes, and what to call (not
    # a notice) when a new one matches.
    wants: Callable[[str], bool] | None = None
    on_attach: Callable | None = None

    def reads(self, name: str) -> bool:
        """Whether a topic named ``name`` is one of this subscription's."""
        if self.wants is not None:
            return self.wants(name)
        return self.group is None and matches(self.pattern, name)


@dataclass(eq=False)
class Group:
    """A queue group on one topic: one cursor (the broker's) that every
    member adopts and claims messages from by CAS, and one futex bell that
    every member sleeps on."""

    topic: str
    name: str
    cursor: int
    generation: int
    bell: int
    bell_generation: int
    members: set = field(default_factory=set)  # Subscription


@dataclass(eq=False)
class Session:
    key: tuple  # (socket, identity)
    transport: str  # "ipc" or "tcp"
    name: str
    pid: int
    pidfd: int = -1
    last_seen: float = 0.0
    subscriptions: dict = field(default_factory=dict)  # id -> Subscription
    publishing: dict = field(default_factory=dict)  # topic name -> count
    holder: int = 0  # arena holder slot (1..63); 0: none


class Broker:
    """One daemon. ``await broker.serve()`` runs it until ``stop()``."""

    def __init__(self, config: BrokerConfig):
        self.config = config
        self.instance = f"d{os.getpid()}"
        self.ipc_path = config.ipc_path or default_ipc_path()
        self.endpoints: list[str] = []
        self.topics: dict[str, Topic] = {}
        self.sessions: dict[tuple, Session] = {}
        self.ended_sessions: OrderedDict[tuple, str] = OrderedDict()  # key -> why it ended
        self.ids = itertools.count(1)
        self.free_bells: list[int] = []
        self.groups: dict[tuple[str, str], Group] = {}  # (topic, group name) -> Group
        self.bells: BellTable | None = None
        self.arena: Arena | None = None
        self.free_holders: list[int] = []
        # Holder slots of clients that said bye while their process may still
        # view arena blocks: released when that process exits. pidfd -> slot.
        self.parked_holders: dict[int, int] = {}
        self.fifo_dir = ""
        self.ctx: zmq.asyncio.Context | None = None
        # (socket the loop waits on, a blocking shadow of it for NOBLOCK I/O, transport)
        self.sockets: list[tuple[zmq.asyncio.Socket, zmq.Socket, str]] = []
        self.lock_fd = -1
        self.started = time.monotonic()
        self.stopping: asyncio.Event | None = None
        self.counters = {"requests": 0, "errors": 0, "clients_lost": 0, "evictions": 0}
        self.bridge = Bridge(self, config)
        self.bridge_session = Session(("bridge", 0), "internal", "bridge", os.getpid())
        self.bridge_subs: set[Subscription] = set()
        self.interest_pending = False

    # -- start and stop ----------------------------------------------------

    def _check_tcp(self) -> tuple[str, int] | None:
        if not self.config.tcp:
            return None
        host, sep, port = self.config.tcp.rpartition(":")
        if not sep or not (port.isdigit() or port == "*") or not host:
            raise BrokerStartError(
                f"--tcp must be HOST:PORT (PORT may be * for any free "
                f"port), not {self.config.tcp!r}"
            )
        host = host.strip("[]")
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if self.config.transport not in ("ucx", "tcp", "auto"):
            raise BrokerStartError(
                f"--transport must be ucx, tcp or auto, not {self.config.transport!r}"
            )
        if not loopback and not self.config.token and not self.config.insecure:
            raise BrokerStartError(
                f"refusing to serve tcp on non-loopback address {host!r} without a token: "
                "set --token-file or TENSORBUS_TOKEN, or pass --insecure"
            )
        return host, 0 if port == "*" else int(port)

    def _take_lock(self) -> None:
        ensure_private_dir(os.path.dirname(os.path.abspath(self.ipc_path)))
        lock_path = self.ipc_path + ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise BrokerStartError(
                f"another tensorbus broker (pid {other}) already serves ipc://{self.ipc_path}; "
                "stop it first or choose another --ipc path"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.lock_fd = fd

    def _sweep(self) -> int:
        """Unlink the segments and FIFO folders of broker instances that died
        without cleaning up (their pid no longer exists)."""
        prefix = f"tb-{os.getuid()}-d"
        swept = 0
        try:
            names = os.listdir("/dev/shm")
        except OSError:
            names = []
        for name in names:
            if not name.startswith(prefix):
                continue
            instance = name[len(prefix) :].split("-", 1)[0]
            if instance.isdigit() and not _pid_alive(int(instance)):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join("/dev/shm", name))
                    swept += 1
        run_dir = os.path.dirname(os.path.abspath(self.ipc_path))
        for name in os.listdir(run_dir):
            if name.startswith("bells-d") and name[7:].isdigit() and not _pid_alive(int(name[7:])):
                shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
        if swept:
            log.info("swept %d segment(s) of dead broker instances", swept)
        return swept

    async def start(self) -> list[str]:
        """Bind the endpoints and create the doorbell table. Raises
        BrokerStartError with a sentence if this broker cannot serve."""
        tcp = self._check_tcp()
        self._take_lock()
        self._sweep()
        run_dir = os.path.dirname(os.path.abspath(self.ipc_path))
        self.fifo_dir = ensure_private_dir(os.path.join(run_dir, f"bells-{self.instance}"))
        self.bells = BellTable.create(self.config.max_bells, self.fifo_dir, instance=self.instance)
        self.free_bells = list(range(self.config.max_bells - 1, -1, -1))
        size = self.config.arena_size or default_arena_size()
        try:
            self.arena = Arena.create(size, instance=self.instance)
        except (SegmentError, ValueError) as exc:
            raise BrokerStartError(
                f"cannot create the tensor arena of {size} bytes: {exc}"
            ) from None
        self.free_holders = list(range(MAX_HOLDERS, 0, -1))
        log.info("arena: %s", self.arena)
        self.ctx = zmq.asyncio.Context()
        old_umask = os.umask(0o077)
        try:
            sock = self._socket()
            sock.bind(f"ipc://{self.ipc_path}")
            os.chmod(self.ipc_path, 0o600)
            self.sockets.append((sock, zmq.Socket.shadow(sock.underlying), "ipc"))
            self.endpoints.append(f"ipc://{self.ipc_path}")
            if tcp:
                tsock = self._socket()
                self.secure_server(tsock)
                try:
                    tsock.bind(f"tcp://{self.config.tcp}")
                except zmq.ZMQError as exc:
                    tsock.close(0)
                    raise BrokerStartError(
                        f"cannot listen on tcp://{self.config.tcp}: {exc}"
                    ) from None
                self.sockets.append((tsock, zmq.Socket.shadow(tsock.underlying), "tcp"))
                self.endpoints.append(tsock.getsockopt_string(zmq.LAST_ENDPOINT))
        finally:
            os.umask(old_umask)
        for url in self.config.peers:
            if not isinstance(url, str) or not url.startswith("tcp://"):
                raise BrokerStartError(f"--peer must be tcp://HOST:PORT, not {url!r}")
        try:
            await self.bridge.start(self.ctx, tcp[0] if tcp else None)
        except (zmq.ZMQError, RuntimeError) as exc:
            raise BrokerStartError(f"cannot start the bridge: {exc}") from None
        if self.bridge.endpoint:
            log.info("links attach on %s", self.bridge.endpoint)
        return self.endpoints

    def _socket(self) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting client keeps its identity
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES + 1024)
        return sock

    async def serve(self, ready=None) -> None:
        """Serve until :meth:`stop`. ``ready(endpoints)`` is called once
        every endpoint accepts clients."""
        self.stopping = asyncio.Event()
        if not self.endpoints:
            await self.start()
        if ready is not None:
            ready(self.endpoints)
        tasks = [asyncio.create_task(self._receive(*entry)) for entry in self.sockets]
        tasks.append(asyncio.create_task(self._monitor()))
        try:
            await self.stopping.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._shutdown()

    def stop(self) -> None:
        if self.stopping is not None:
            self.stopping.set()

    async def _shutdown(self) -> None:
        """Tell every client, close every ring, unlink everything we made."""
        log.info("shutting down: %d topic(s), %d session(s)", len(self.topics), len(self.sessions))
        with contextlib.suppress(Exception):
            await self.bridge.stop()
        for session in list(self.sessions.values()):
            self._send(
                session.key, P.encode_notice("shutdown", reason="the broker is shutting down")
            )
            for sub in session.subscriptions.values():
                with contextlib.suppress(Exception):
                    self.bells.notify(sub.bell)
            self._drop_session(session, "broker shutdown")
        for topic in self.topics.values():
            with contextlib.suppress(Exception):
                topic.ring.close()
            with contextlib.suppress(Exception):
                topic.ring.unlink()
        self.topics.clear()
        for fd in list(self.parked_holders):
            self._unpark(fd)
        if self.arena is not None:
            with contextlib.suppress(Exception):
                self.arena.unlink()
            self.arena = None
        if self.bells is not None:
            with contextlib.suppress(Exception):
                self.bells.segment.unlink()
            self.bells = None
        if self.fifo_dir:
            shutil.rmtree(self.fifo_dir, ignore_errors=True)
        for sock, _, _ in self.sockets:
            sock.close(0)
        self.sockets.clear()
        if self.lock_fd >= 0:  # the socket file is ours only while we hold the lock
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ipc_path)
        if self.ctx is not None:
            self.ctx.destroy(0)
        if self.lock_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ipc_path + ".lock")
            os.close(self.lock_fd)
            self.lock_fd = -1

    # -- the request loop --------------------------------------------------

    def _send(self, key: tuple, payload: bytes) -> None:
        """Send to one client. A ROUTER never blocks on send (it drops for a
        peer that is gone or over its high-water mark), so no await."""
        sock, identity = key
        with contextlib.suppress(zmq.ZMQError):
            sock.send_multipart([identity, payload], zmq.NOBLOCK)

    async def _receive(
        self, waitable: zmq.asyncio.Socket, sock: zmq.Socket, transport: str
    ) -> None:
        """Wait until requests are queued, then serve what is there (at most
        a burst, so the monitor still runs) without a future per message."""
        while True:
            await waitable.poll(zmq.POLLIN)
            for _ in range(256):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    reply = self._handle(sock, transport, frames)
                except Exception as exc:  # the broker never dies of a client's bytes
                    log.exception("request failed")
                    reply = P.encode_error(None, "internal", f"the broker failed: {exc}")
                if reply is not None:
                    self.counters["requests"] += 1
                    self._send((sock, frames[0].bytes), reply)
            await asyncio.sleep(0)

    def _handle(self, sock, transport: str, frames) -> bytes | None:
        key = (sock, frames[0].bytes)
        if len(frames) != 2:
            return self._error(
                None, "bad_request", f"a request is exactly one frame, got {len(frames) - 1}"
            )
        peer_pid = None
        if transport == "ipc":
            peer = _peer_credentials(frames[1])
            if peer is None or peer[0] != os.getuid():
                uid = "unknown" if peer is None else peer[0]
                return self._error(
                    None, "auth_failed", f"peer uid {uid} is not this broker's uid {os.getuid()}"
                )
            peer_pid = peer[1]
        try:
            request = P.decode_request(frames[1].bytes)
        except P.ProtocolViolation as exc:
            return self._error(exc.request_id, exc.code, exc.message)
        session = self.sessions.get(key)
        if request.op != "hello" and session is None:
            why = self.ended_sessions.get(key, "send hello first")
            return self._error(request.id, "no_session", f"op {request.op!r} has no session: {why}")
        if session is not None:
            session.last_seen = time.monotonic()
        try:
            if request.op == "hello":
                return self._hello(key, transport, peer_pid, request)
            return getattr(self, f"_op_{request.op}")(session, request)
        except P.ProtocolViolation as exc:
            return self._error(request.id, exc.code, exc.message)
        except TopicNameError as exc:
            code = (
                "bad_pattern"
                if request.op in ("subscribe", "list_topics", "stats")
                else "bad_topic"
            )
            return self._error(request.id, code, str(exc))

    def _error(self, request_id, code: str, message: str) -> bytes:
        self.counters["errors"] += 1
        log.debug("error reply %s: %s", code, message)
        return P.encode_error(request_id, code, message)

    # -- sessions ----------------------------------------------------------

    def _hello(self, key, transport: str, peer_pid, request: P.Request) -> bytes:
        f = request.fields
        if f["protocol"] != P.PROTOCOL_VERSION:
            raise P.ProtocolViolation(
                "unsupported_version",
                f"client speaks protocol {f['protocol']}, this broker {P.PROTOCOL_VERSION}",
            )
        if transport == "tcp" and self.config.token:
            token = f.get("token") or ""
            if not hmac.compare_digest(token.encode(), self.config.token.encode()):
                log.warning("tcp client refused: bad or missing token")
                raise P.ProtocolViolation("auth_failed", "missing or wrong token")
        old = self.sessions.pop(key, None)
        if old is not None:
            self._drop_session(old, "hello again on the same connection")
        self.ended_sessions.pop(key, None)
        pid = peer_pid if peer_pid is not None else f["pid"]
        session = Session(
            key, transport, P.session_name(f.get("name"), pid), pid, last_seen=time.monotonic()
        )
        if transport == "ipc":
            session.pidfd = self._watch_pid(session)
            if self.free_holders:
                session.holder = self.free_holders.pop()
            else:
                log.warning("no arena holder slot left for %s: it cannot use tensors", session.name)
        self.sessions[key] = session
        log.info("hello from %s (pid %d, %s)", session.name, pid, transport)
        return P.encode_reply(
            request.id,
            instance=self.instance,
            local=transport == "ipc",
            # Segment names and paths are for clients that can map them.
            bells={"name": self.bells.name, "fifo_dir": self.fifo_dir}
            if transport == "ipc"
            else None,
            arena={
                "meta": self.arena.meta.name,
                "data": self.arena.data.name,
                "holder": session.holder,
            }
            if transport == "ipc"
            else None,
            heartbeat_s=self.config.heartbeat_s,
            broker_pid=os.getpid(),
            node=self.bridge.node,
        )

    def _watch_pid(self, session: Session) -> int:
        try:
            fd = os.pidfd_open(session.pid)
        except (OSError, AttributeError):
            return -1  # the monitor's pid check still catches its death
        asyncio.get_running_loop().add_reader(fd, self._pid_exited, session)
        return fd

    def _pid_exited(self, session: Session) -> None:
        if self.sessions.get(session.key) is session:
            log.info("client %s (pid %d) died", session.name, session.pid)
            self.counters["clients_lost"] += 1
            self._drop_session(session, "process exited")
        else:
            self._unwatch(session)

    def _unwatch(self, session: Session) -> None:
        if session.pidfd >= 0:
            asyncio.get_running_loop().remove_reader(session.pidfd)
            os.close(session.pidfd)
            session.pidfd = -1

    def _drop_session(self, session: Session, reason: str, views_alive: bool = False) -> None:
        """Release everything a session holds: cursors, doorbells, (if its
        process is gone) its half-done publishes, and its arena holder slot
        (parked until the process exits if it may still view blocks)."""
        self.sessions.pop(session.key, None)
        for sub in list(session.subscriptions.values()):
            self._release_subscription(sub)
        for name in session.publishing:
            topic = self.topics.get(name)
            if topic is not None:
                with contextlib.suppress(TensorbusError):
                    topic.ring.repair()  # pads claims and frees records of dead pids
        session.publishing.clear()
        for topic in [t for t in self.topics.values() if t.owner == session.key]:
            self._remove_topic(topic)
        if session.holder:
            if views_alive and session.pidfd >= 0:
                self._park(session)
            else:
                self._release_holder(session.holder)
            session.holder = 0
        self._unwatch(session)
        self.bridge.session_closed(session.key)
        log.debug("session %s dropped: %s", session.name, reason)

    def _remember_end(self, session: Session, why: str) -> None:
        """Keep why ``session`` ended for its connection's next request."""
        self.ended_sessions[session.key] = why
        self.ended_sessions.move_to_end(session.key)
        while len(self.ended_sessions) > ENDED_SESSIONS_KEPT:
            self.ended_sessions.popitem(last=False)

    def _release_holder(self, slot: int) -> None:
        """A client is gone: clear its holds, and drop the loans it never
        published (blocks it allocated that no ring message references)."""
        held = self.arena.release_holder(slot)
        owned = self.arena.owned_by(slot)
        if owned:
            referenced = set()
            for topic in self.topics.values():
                with contextlib.suppress(TensorbusError):
                    referenced |= topic.ring.arena_refs()
            for block, generation in owned:
                if (block, generation) not in referenced:
                    self.arena.drop_owner(block, generation)
        if held or owned:
            log.debug("holder %d released: %d held, %d owned", slot, held, len(owned))
        self.free_holders.append(slot)

    def _park(self, session: Session) -> None:
        """Keep ``session``'s holder slot until its process exits: numpy
        views it made before saying bye may still be read."""
        fd, session.pidfd = session.pidfd, -1
        asyncio.get_running_loop().remove_reader(fd)
        self.parked_holders[fd] = session.holder
        asyncio.get_running_loop().add_reader(fd, self._unpark, fd)

    def _unpark(self, fd: int) -> None:
        slot = self.parked_holders.pop(fd, 0)
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)
        if slot and self.arena is not None:
            self._release_holder(slot)

    def _op_bye(self, session: Session, request: P.Request) -> bytes:
        self._drop_session(session, "bye", views_alive=bool(request.fields.get("holds")))
        self._remember_end(session, "this connection's session ended with bye; send hello again")
        return P.encode_reply(request.id)

    def _op_heartbeat(self, session: Session, request: P.Request) -> bytes:
        return P.encode_reply(request.id, now_ns=time.time_ns())

    # -- topics ------------------------------------------------------------

    def _topic_options(self, f: dict, existing: Topic | None) -> tuple[str, int, int]:
        qos = f.get("qos", existing.qos if existing else "reliable")
        if qos not in P.QOS_CLASSES:
            raise P.ProtocolViolation(
                "bad_option", f"qos must be one of {', '.join(P.QOS_CLASSES)}, not {qos!r}"
            )
        default_cap = (
            self.config.latest_capacity if qos == "latest" else self.config.default_capacity
        )
        capacity = f.get("capacity", existing.capacity if existing else default_cap)
        slot_size = f.get(
            "slot_size", existing.slot_size if existing else self.config.default_slot_size
        )
        low = 4 if qos == "latest" else 2
        if not low <= capacity <= MAX_CAPACITY or capacity & (capacity - 1):
            raise P.ProtocolViolation(
                "bad_option",
                f"capacity must be a power of two from {low} to {MAX_CAPACITY}, not {capacity}",
            )
        if not 1 <= slot_size <= MAX_SLOT_SIZE:
            raise P.ProtocolViolation(
                "bad_option", f"slot_size must be 1 to {MAX_SLOT_SIZE} bytes, not {slot_size}"
            )
        if existing is not None:
            asked = {k: f[k] for k in ("qos", "capacity", "slot_size") if k in f}
            have = {
                "qos": existing.qos,
                "capacity": existing.capacity,
                "slot_size": existing.slot_size,
            }
            clash = {k: v for k, v in asked.items() if have[k] != v}
            if clash:
                raise P.ProtocolViolation(
                    "topic_conflict",
                    f"topic {existing.name!r} exists with {have}; asked for {clash}",
                )
        return qos, capacity, slot_size

    def _get_or_create(self, name: str, f: dict) -> tuple[Topic, bool]:
        existing = self.topics.get(name)
        qos, capacity, slot_size = self._topic_options(f, existing)
        if existing is not None:
            return existing, False
        if len(self.topics) >= self.config.max_topics:
            raise P.ProtocolViolation(
                "capacity",
                f"this broker already has {self.config.max_topics} topics (--max-topics)",
            )
        try:
            ring = Ring.create(
                capacity=capacity,
                slot_size=slot_size,
                policy=P.QOS_CLASSES[qos],
                max_cursors=self.config.max_subscribers,
                max_publishers=self.config.max_publishers,
                instance=self.instance,
                bells=self.bells,
                spin_us=0,
                arena=self.arena,
                keep_last=qos == "latest",
            )
        except SegmentError as exc:
            raise P.ProtocolViolation(
                "capacity", f"cannot create the ring of topic {name!r}: {exc}"
            ) from None
        topic = Topic(name, qos, capacity, slot_size, ring)
        self.topics[name] = topic
        log.info("topic %s created (%s, %d x %d B)", name, qos, capacity, slot_size)
        # Cursors for every live pattern before anyone can publish: no loss.
        for sub in list(self.bridge_subs):
            self._attach_new(sub, topic)
        for session in list(self.sessions.values()):
            for sub in list(session.subscriptions.values()):
                self._attach_new(sub, topic)
        return topic, True

    def _attach_new(self, sub: Subscription, topic: Topic) -> None:
        """Give ``sub`` a cursor on new ``topic`` if it reads it; a broker
        out of cursors is logged, not raised (the topic exists regardless)."""
        if topic.name in sub.members or not sub.reads(topic.name):
            return
        try:
            self._attach(sub, topic, announce=True)
        except CapacityError:
            log.warning(
                "topic %s: no cursor left for subscription %d of %s (--max-subscribers)",
                topic.name,
                sub.id,
                sub.session.name,
            )

    def _attach(self, sub: Subscription, topic: Topic, announce: bool) -> tuple[int, int]:
        cursor, generation = topic.ring.join_cursor(
            sub.session.pid, bell=sub.bell + 1, latest=topic.qos == "latest"
        )
        sub.members[topic.name] = (cursor, generation)
        topic.cursors[(cursor, generation)] = sub
        if sub.on_attach is not None:
            sub.on_attach(sub, topic, cursor, generation)
        elif announce:
            payload = P.encode_notice(
                "attach", sub=sub.id, topic=topic.info(), cursor=cursor, generation=generation
            )
            self._notify(sub, payload)
        return cursor, generation

    def _notify(self, sub: Subscription, payload: bytes) -> None:
        """Send a notice, then raise the bell's notice flag so a sleeping
        subscriber wakes and reads it."""
        self._send(sub.session.key, payload)
        if sub.bell >= 0:
            self.bells.notify(sub.bell)

    def _user_topic(self, name: object) -> str:
        try:
            return validate_topic(name)
        except TopicNameError:
            if isinstance(name, str) and is_system(name):
                raise P.ProtocolViolation(
                    "read_only_topic",
                    f"topic {name!r} belongs to the broker; clients may only subscribe to it",
                ) from None
            raise

    def _op_create_topic(self, session: Session, request: P.Request) -> bytes:
        name = self._user_topic(request.fields["topic"])
        if name.startswith(INBOX_PREFIX) and not request.fields.get("private"):
            raise P.ProtocolViolation(
                "bad_topic", f"{INBOX_PREFIX}... topics are reply inboxes: create them private"
            )
        topic, created = self._get_or_create(name, request.fields)
        if request.fields.get("private"):
            if not created and topic.owner != session.key:
                raise P.ProtocolViolation(
                    "topic_conflict", f"topic {name!r} exists: a private topic must be new"
                )
            topic.owner = session.key  # removed with the session (a reply inbox)
        return P.encode_reply(request.id, topic=topic.info(), created=created)

    def _require_local(self, session: Session, what: str) -> None:
        if session.transport != "ipc":
            raise P.ProtocolViolation(
                "not_local",
                f"{what} needs shared memory with the broker: "
                "connect from the broker's host over ipc://, or publish and subscribe "
                "over a link (the light client does: docs/bridge.md)",
            )

    def _op_open_publisher(self, session: Session, request: P.Request) -> bytes:
        self._require_local(session, "publishing")
        name = self._user_topic(request.fields["topic"])
        if name.startswith(INBOX_PREFIX) and name not in self.topics:
            # A reply to a requester that left: do not bring its inbox back.
            raise P.ProtocolViolation("no_such_topic", f"reply inbox {name!r} is gone")
        topic, created = self._get_or_create(name, request.fields)
        session.publishing[name] = session.publishing.get(name, 0) + 1
        return P.encode_reply(request.id, topic=topic.info(), created=created)

    def _op_close_publisher(self, session: Session, request: P.Request) -> bytes:
        name = request.fields["topic"]
        if not session.publishing.get(name):
            raise P.ProtocolViolation("no_such_topic", f"this session has no publisher on {name!r}")
        session.publishing[name] -= 1
        if not session.publishing[name]:
            del session.publishing[name]
        return P.encode_reply(request.id)

    # -- subscriptions -----------------------------------------------------

    def _op_subscribe(self, session: Session, request: P.Request) -> bytes:
        self._require_local(session, "subscribing")
        if request.fields.get("group") is not None:
            return self._join_group(session, request)
        pattern = validate_pattern(request.fields["pattern"])
        mode = request.fields.get("mode", "sync")
        if mode not in ("sync", "async"):
            raise P.ProtocolViolation("bad_option", f"mode must be 'sync' or 'async', not {mode!r}")
        kind = "fifo" if mode == "async" else "futex"
        bell, generation = self._take_bell(kind, session.pid)
        fifo = None
        if kind == "fifo":
            fifo = self.bells.fifo_path(bell, generation)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(fifo)
            os.mkfifo(fifo, 0o600)
        sub = Subscription(next(self.ids), session, pattern, mode, bell, generation, fifo)
        session.subscriptions[sub.id] = sub
        members = []
        # A pattern without wildcards names one topic: no scan of every topic.
        literal = "*" not in pattern and ">" not in pattern
        candidates = (
            [self.topics[pattern]]
            if literal and pattern in self.topics
            else []
            if literal
            else list(self.topics.values())
        )
        try:
            for topic in candidates:
                if matches(pattern, topic.name):
                    cursor, gen = self._attach(sub, topic, announce=False)
                    members.append({"topic": topic.info(), "cursor": cursor, "generation": gen})
        except CapacityError as exc:
            self._release_subscription(sub)
            raise P.ProtocolViolation("capacity", str(exc)) from None
        self._interest_changed()
        return P.encode_reply(
            request.id,
            sub=sub.id,
            bell={"index": bell, "generation": generation, "kind": kind, "fifo": fifo},
            members=members,
        )

    def _take_bell(self, kind: str, owner_pid: int) -> tuple[int, int]:
        """A free doorbell set up as ``kind``: (index, generation)."""
        if not self.free_bells:
            raise P.ProtocolViolation(
                "capacity",
                f"all {self.config.max_bells} doorbells are in use (--max-subscriptions)",
            )
        bell = self.free_bells.pop()
        return bell, self.bells.setup(bell, kind, owner_pid)

    def _join_group(self, session: Session, request: P.Request) -> bytes:
        """A member of queue group ``group`` on one topic: it adopts the
        group's cursor and bell (made with the first member)."""
        name = self._user_topic(request.fields["pattern"])
        group = request.fields["group"]
        validate_topic(f"g/{group}")  # a group name is one topic level
        if "/" in group:
            raise P.ProtocolViolation("bad_option", f"a group name is one level, not {group!r}")
        if request.fields.get("mode", "sync") != "sync":
            raise P.ProtocolViolation("bad_option", "queue-group members read in sync mode")
        topic, _ = self._get_or_create(name, {})
        if topic.qos != "reliable":
            raise P.ProtocolViolation(
                "bad_option",
                f"a queue group reads a reliable topic; {name!r} is {topic.qos}",
            )
        g = self.groups.get((name, group))
        if g is None:
            bell, bell_generation = self._take_bell("futex", os.getpid())
            try:
                cursor, generation = topic.ring.join_cursor(os.getpid(), bell=bell + 1, group=True)
            except CapacityError as exc:
                self.free_bells.append(bell)
                raise P.ProtocolViolation("capacity", str(exc)) from None
            g = Group(name, group, cursor, generation, bell, bell_generation)
            self.groups[(name, group)] = g
        sub = Subscription(
            next(self.ids), session, name, "sync", g.bell, g.bell_generation, None, group=g
        )
        sub.members[name] = (g.cursor, g.generation)
        session.subscriptions[sub.id] = sub
        g.members.add(sub)
        topic.cursors[(g.cursor, g.generation)] = sub
        topic.ring.set_responders(len(g.members))
        return P.encode_reply(
            request.id,
            sub=sub.id,
            bell={"index": g.bell, "generation": g.bell_generation, "kind": "futex", "fifo": None},
            members=[{"topic": topic.info(), "cursor": g.cursor, "generation": g.generation}],
            group=group,
        )

    def _leave_group(self, sub: Subscription) -> None:
        g = sub.group
        g.members.discard(sub)
        sub.session.subscriptions.pop(sub.id, None)
        sub.members.clear()
        topic = self.topics.get(g.topic)
        if g.members:
            if topic is not None:
                topic.cursors[(g.cursor, g.generation)] = next(iter(g.members))
                topic.ring.set_responders(len(g.members))
            return
        del self.groups[(g.topic, g.name)]
        if topic is not None:
            topic.cursors.pop((g.cursor, g.generation), None)
            with contextlib.suppress(TensorbusError):
                topic.ring.set_responders(0)
                topic.ring.free_cursor(g.cursor, g.generation)
                topic.ring.reclaim()
        self.free_bells.append(g.bell)

    def _remove_topic(self, topic: Topic) -> None:
        """A private topic's owner left: its readers lose it, the ring goes."""
        for key, sub in list(topic.cursors.items()):
            sub.members.pop(topic.name, None)
            with contextlib.suppress(TensorbusError):
                topic.ring.free_cursor(*key)
        with contextlib.suppress(TensorbusError):
            topic.ring.reclaim()  # no reader left: every arena block it held goes back
        for key in [k for k in self.groups if k[0] == topic.name]:
            g = self.groups.pop(key)
            for sub in g.members:
                sub.group = None
                sub.bell = -1  # the group's bell, freed once here
            self.free_bells.append(g.bell)
        self.topics.pop(topic.name, None)
        with contextlib.suppress(Exception):
            topic.ring.close()
        with contextlib.suppress(Exception):
            topic.ring.unlink()

    def _release_subscription(self, sub: Subscription) -> None:
        if sub.group is not None:
            self._leave_group(sub)
            return
        for name, member in sub.members.items():
            self._free_member(name, member)
        sub.members.clear()
        sub.session.subscriptions.pop(sub.id, None)
        if sub.fifo:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sub.fifo)
        if sub.bell >= 0:
            self.free_bells.append(sub.bell)
            sub.bell = -1
        if sub.wants is None:
            self._interest_changed()

    def _free_member(self, name: str, member: tuple) -> None:
        """Free the cursor ``member`` (index, generation) of topic ``name``."""
        topic = self.topics.get(name)
        if topic is None:
            return
        topic.cursors.pop(member, None)
        topic.drops_seen.pop(member, None)
        topic.behind_since.pop(member, None)
        with contextlib.suppress(TensorbusError):
            topic.ring.free_cursor(*member)
            topic.ring.reclaim()  # blocks only this cursor still pinned

    def _op_unsubscribe(self, session: Session, request: P.Request) -> bytes:
        sub = session.subscriptions.get(request.fields["sub"])
        if sub is None:
            raise P.ProtocolViolation(
                "no_such_subscription",
                f"subscription {request.fields['sub']} is not one of this session's",
            )
        self._release_subscription(sub)
        return P.encode_reply(request.id)

    # -- bridges (broker/bridge.py) ----------------------------------------

    def _op_link(self, session: Session, request: P.Request) -> bytes:
        """A peer daemon or a light client opens a link (docs/bridge.md)."""
        return P.encode_reply(request.id, **self.bridge.open_link(request.fields, session.key))

    def _interest_changed(self) -> None:
        """Local subscriptions changed: tell peers (once per loop turn)."""
        if not self.interest_pending:
            self.interest_pending = True
            asyncio.get_running_loop().call_soon(self._send_interest)

    def _send_interest(self) -> None:
        self.interest_pending = False
        self.bridge.interest_changed()

    def local_patterns(self) -> set[str]:
        """The patterns this host's own subscribers read (queue groups and
        reply inboxes stay local)."""
        return {
            sub.pattern
            for session in self.sessions.values()
            for sub in session.subscriptions.values()
            if sub.group is None
        }

    def open_bridge_subscription(self, owner, wants, on_attach) -> tuple[Subscription, dict]:
        """A subscription for a bridge: cursors on every topic ``wants``
        accepts, now and later (``on_attach`` hears of each), one FIFO bell."""
        bell, generation = self._take_bell("fifo", os.getpid())
        fifo = self.bells.fifo_path(bell, generation)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fifo)
        os.mkfifo(fifo, 0o600)
        sub = Subscription(
            next(self.ids),
            self.bridge_session,
            "(bridge)",
            "async",
            bell,
            generation,
            fifo,
            wants=wants,
            on_attach=on_attach,
        )
        self.bridge_subs.add(sub)
        return sub, {"index": bell, "generation": generation, "fifo": fifo}

    def refresh_bridge_subscription(self, sub: Subscription) -> None:
        """Attach every existing topic a bridge subscription now wants."""
        for topic in list(self.topics.values()):
            self._attach_new(sub, topic)

    def drop_bridge_cursor(self, sub: Subscription, name: str) -> None:
        member = sub.members.pop(name, None)
        if member is not None:
            self._free_member(name, member)

    def close_bridge_subscription(self, sub: Subscription) -> None:
        self.bridge_subs.discard(sub)
        self._release_subscription(sub)

    def bridge_topic(self, name: object, f: dict) -> Topic:
        """The local topic a link's messages go to: made with the origin's
        options, or the one that exists (whatever its options)."""
        try:
            name = self._user_topic(name)
        except (TopicNameError, P.ProtocolViolation) as exc:
            raise ValueError(f"a link announced a bad topic: {exc}") from None
        if name.startswith(INBOX_PREFIX):
            raise ValueError(f"a link announced reply inbox {name!r}")
        existing = self.topics.get(name)
        if existing is not None:
            return existing
        options = {k: f[k] for k in ("qos", "capacity", "slot_size") if k in f}
        try:
            topic, _ = self._get_or_create(name, options)
        except P.ProtocolViolation as exc:
            raise ValueError(f"cannot make topic {name!r} for a link: {exc.message}") from None
        return topic

    def take_holder(self) -> int:
        """An arena holder slot for the bridge (0: none left)."""
        return self.free_holders.pop() if self.free_holders else 0

    def session_alive(self, key) -> bool:
        return key in self.sessions

    def link_name(self) -> str:
        tcp = [e for e in self.endpoints if e.startswith("tcp://")]
        return tcp[0] if tcp else f"{os.uname().nodename}:{self.instance}"

    def secure_server(self, sock) -> None:
        """CURVE on a tcp socket we bind, where a key is configured."""
        if self.config.curve_secret:
            sock.curve_secretkey = self.config.curve_secret.encode()
            sock.curve_publickey = zmq.curve_public(self.config.curve_secret.encode())
            sock.curve_server = True

    def secure_client(self, sock) -> None:
        """CURVE on a socket we connect to a peer sharing our key."""
        if self.config.curve_secret:
            public, secret = zmq.curve_keypair()
            sock.curve_serverkey = zmq.curve_public(self.config.curve_secret.encode())
            sock.curve_publickey = public
            sock.curve_secretkey = secret

    # -- introspection -----------------------------------------------------

    def _selected(self, pattern: str | None) -> list[Topic]:
        if pattern is None:
            return [t for t in self.topics.values() if not is_system(t.name)]
        validate_pattern(pattern)
        return [t for t in self.topics.values() if matches(pattern, t.name)]

    def _op_list_topics(self, session: Session, request: P.Request) -> bytes:
        topics = []
        for t in self._selected(request.fields.get("pattern")):
            info = t.info()
            info["publishers"] = len(t.ring.stats()["publishers"])
            info["subscribers"] = len(t.cursors)
            topics.append(info)
        return P.encode_reply(request.id, topics=topics)

    def _op_stats(self, session: Session, request: P.Request) -> bytes:
        topics = []
        for t in self._selected(request.fields.get("pattern")):
            s = t.ring.stats()
            head = s["head"]
            depth = max((c["lag"] for c in s["cursors"] if c["state"] == "active"), default=0)
            topics.append(
                {
                    "name": t.name,
                    "qos": t.qos,
                    "capacity": t.capacity,
                    "slot_size": t.slot_size,
                    "publishers": len(s["publishers"]),
                    "subscribers": len(t.cursors),
                    "messages": head,
                    "depth": depth,
                    "drops": sum(c["drops"] for c in s["cursors"]),
                    "msgs_per_s": t.meter.msgs_per_s,
                    "bytes_per_s": t.meter.bytes_per_s,
                    "p50_ns": t.meter.p50_ns,
                    "p99_ns": t.meter.p99_ns,
                }
            )
        broker = {
            "pid": os.getpid(),
            "instance": self.instance,
            "uptime_s": time.monotonic() - self.started,
            "sessions": len(self.sessions),
            "topics": len(self.topics),
            "rss_kb": private_rss_kb() or 0,
            "bells_free": len(self.free_bells),
            "arena": self.arena.stats() if self.arena is not None else None,
            "holders_free": len(self.free_holders),
            "node": self.bridge.node,
            "links": self.bridge.stats(),
            **self.counters,
        }
        return P.encode_reply(request.id, topics=topics, broker=broker)

    # -- the monitor: liveness, pressure, slow consumers, meters ----------

    async def _monitor(self) -> None:
        last_meter = 0.0
        while True:
            await asyncio.sleep(self.config.monitor_interval)
            now = time.monotonic()
            try:
                self._check_liveness(now)
                self._check_pressure(now)
                if now - last_meter >= 1.0:
                    self._update_meters(now)
                    last_meter = now
            except Exception:
                log.exception("monitor tick failed")

    def _check_liveness(self, now: float) -> None:
        timeout = 3 * self.config.heartbeat_s
        for session in list(self.sessions.values()):
            if session.transport == "tcp":
                if now - session.last_seen > timeout:
                    log.info("tcp client %s missed its heartbeats", session.name)
                    self.counters["clients_lost"] += 1
                    self._drop_session(session, "heartbeat timeout")
                    heartbeat = self.config.heartbeat_s
                    self._remember_end(
                        session,
                        f"the session timed out after {timeout:g} s without a message "
                        f"(3 x heartbeat_s); send hello again, then any request, such as "
                        f"heartbeat, at least every {heartbeat:g} s",
                    )
            elif session.pidfd < 0 and not _pid_alive(session.pid):
                self.counters["clients_lost"] += 1
                self._drop_session(session, "process gone")

    def _check_pressure(self, now: float) -> None:
        grace = self.config.slow_consumer_grace
        for topic in list(self.topics.values()):
            if not topic.cursors or is_system(topic.name):
                continue
            head = topic.ring.head
            if head == topic.checked_head and not topic.behind_since:
                continue  # nothing published and nobody behind since the last look
            topic.checked_head = head
            dropped = []
            for index, generation, lag, drops in topic.ring.cursor_lags():
                key = (index, generation)
                sub = topic.cursors.get(key)
                if sub is None or sub.group is not None or sub.wants is not None:
                    # A queue group is served by whichever member is free; a
                    # bridge's cursor stalls by design (credit), it is no
                    # slow consumer, and it counts its own drops.
                    continue
                before = topic.drops_seen.get(key, 0)
                topic.drops_seen[key] = drops
                if drops > before:
                    dropped.append(
                        {
                            "sub": sub.id,
                            "client": sub.session.name,
                            "drops": drops,
                            "new": drops - before,
                        }
                    )
                if topic.qos == "realtime":
                    behind = drops > before
                else:
                    behind = topic.qos == "reliable" and lag >= topic.capacity
                if not behind:
                    topic.behind_since.pop(key, None)
                    continue
                since = topic.behind_since.setdefault(key, now)
                if grace > 0 and now - since >= grace:
                    self._evict(topic, sub, key, now - since)
            if dropped:
                self._announce_pressure(topic, dropped)

    def _evict(self, topic: Topic, sub: Subscription, key: tuple, behind_s: float) -> None:
        topic.behind_since.pop(key, None)
        if not topic.ring.evict_cursor(*key):
            return
        self.counters["evictions"] += 1
        reason = (
            f"slow consumer: {'full ring' if topic.qos == 'reliable' else 'dropping'} "
            f"for {behind_s:.1f} s (grace {self.config.slow_consumer_grace:g} s)"
        )
        log.warning(
            "evicting subscription %d of %s from %s: %s",
            sub.id,
            sub.session.name,
            topic.name,
            reason,
        )
        self._notify(sub, P.encode_notice("evicted", sub=sub.id, topic=topic.name, reason=reason))

    def _announce_pressure(self, topic: Topic, dropped: list) -> None:
        if topic.pressure_pub is None:
            channel, _ = self._get_or_create(
                f"{SYSTEM_PREFIX}/pressure/{topic.name}",
                {
                    "qos": "realtime",
                    "capacity": PRESSURE_CAPACITY,
                    "slot_size": PRESSURE_SLOT_SIZE,
                },
            )
            topic.pressure_pub = channel.ring.publisher()
        body = msgpack.packb(
            {
                "topic": topic.name,
                "subscribers": dropped[:PRESSURE_MAX_LISTED],  # so the body fits one slot
                "new_drops": sum(d["new"] for d in dropped),
                "time_ns": time.time_ns(),
            }
        )
        with contextlib.suppress(TensorbusError):
            topic.pressure_pub.send(body)

    def _update_meters(self, now: float) -> None:
        for topic in self.topics.values():
            head = topic.ring.head
            if head == topic.meter.head and topic.meter.msgs_per_s == 0:
                topic.meter.at = now  # idle, and already shown as idle: skip the scan
                continue
            s = topic.ring.stats()
            hist = [0] * LATENCY_BUCKETS
            for c in s["cursors"]:
                for i, n in enumerate(c["latency"]):
                    hist[i] += n
            sent = {(p["index"], p["pid"]): p["bytes"] for p in s["publishers"]}
            topic.meter.update(now, head, sent, hist)


def default_arena_size() -> int:
    """1 GiB, or a quarter of /dev/shm where that is smaller (containers
    often give it 64 MiB)."""
    try:
        st = os.statvfs("/dev/shm")
        shm = st.f_blocks * st.f_frsize
    except OSError:
        shm = 0
    return max(1 << 22, min(1 << 30, shm // 4)) if shm else 1 << 26


def _peer_credentials(frame) -> tuple[int, int] | None:
    """(uid, pid) of an ipc peer from the kernel's SO_PEERCRED, which ZeroMQ
    exposes as the frame property ``Peer-Address`` = ``host:uid:gid:pid``."""
    try:
        parts = frame.get("Peer-Address").rsplit(":", 3)
        return int(parts[1]), int(parts[3])
    except (zmq.ZMQError, ValueError, IndexError, AttributeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run(config: BrokerConfig, ready=None) -> int:
    """Run a broker in this process until SIGTERM or SIGINT; returns an exit code."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        uvloop = None

    async def main() -> int:
        broker = Broker(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, broker.stop)
        try:
            await broker.start()
        except BaseException:
            await broker._shutdown()
            raise
        await broker.serve(ready)
        return 0

    if uvloop is not None:
        return uvloop.run(main())
    return asyncio.run(main())
