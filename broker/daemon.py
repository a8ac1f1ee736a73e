"""The broker daemon: one per host, an asyncio (uvloop) control plane.

It owns every shared-memory segment (topic rings, the doorbell table and the
tensor arena) and answers the control protocol (broker/protocol.py) on a
ZeroMQ ROUTER socket. Messages never pass through it: publishers and
subscribers on this host meet in the rings.

This module is the loop and the session I/O: it binds the sockets, reads
requests, checks the peer's uid, dispatches each op through ``Broker.ops``
(an explicit table) to the registry (broker/registry.py, the state and its
operations), and sends replies and notices. Starting up (lock, sweep) is in
broker/startup.py, taking over a predecessor's state in broker/lineage.py,
opening and ending sessions in broker/sessions.py, watching clients and
subscribers in broker/liveness.py, links to other daemons in
broker/bridge.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
from collections import OrderedDict

import zmq
import zmq.asyncio

from tensorbus.broker import protocol as P
from tensorbus.broker.access import Access
from tensorbus.broker.bridge import Bridge
from tensorbus.broker.bridge_view import BridgeView
from tensorbus.broker.config import BrokerConfig
from tensorbus.broker.curve import secure_server
from tensorbus.broker.lineage import Lineage
from tensorbus.broker.liveness import Liveness
from tensorbus.broker.ops import Ops
from tensorbus.broker.paths import default_ipc_path, ensure_private_dir, share_with_group
from tensorbus.broker.registry import Registry, Subscription
from tensorbus.broker.sessions import Sessions
from tensorbus.broker.soon import Soon
from tensorbus.broker.startup import (
    BrokerStartError,
    announce_standby,
    check_tcp,
    default_arena_size,
    marker_path,
    release_lock,
    sweep,
    take_lock,
    write_marker,
)
from tensorbus.broker.state import (
    state_path,
)
from tensorbus.broker.topics import TopicNameError

__all__ = ["Broker", "BrokerConfig", "BrokerStartError", "default_arena_size"]

log = logging.getLogger("tensorbus.broker")

# Ops whose TopicNameError is about a pattern, not a topic name.
_PATTERN_OPS = frozenset(("subscribe", "list_topics", "stats"))


class Broker(Lineage, Sessions):
    """One daemon. ``await broker.serve()`` runs it until ``stop()``."""

    def __init__(self, config: BrokerConfig):
        self.config = config
        self.instance = f"d{os.getpid()}"
        self.ipc_path = config.ipc_path or default_ipc_path()
        self.endpoints: list[str] = []
        self.ended_sessions: OrderedDict[tuple, str] = OrderedDict()  # key -> why it ended
        self.registry: Registry | None = None  # made by start(), with the segments
        self.liveness: Liveness | None = None
        self.metrics = None  # a MetricsServer with --metrics
        self.fifo_dir = ""
        self.ctx: zmq.asyncio.Context | None = None
        # (socket the loop waits on, a blocking shadow of it for NOBLOCK I/O, transport)
        self.sockets: list[tuple[zmq.asyncio.Socket, zmq.Socket, str]] = []
        self.readers: dict[zmq.Socket, Soon] = {}  # serve a socket's requests, soon
        self.lock_fd = -1
        self.stopping: asyncio.Event | None = None
        self.bridge = Bridge(config)
        self.access = Access(config.users, config.token)
        self.interest_changed = Soon(self.bridge.interest_changed)  # once per loop turn
        # The op table (broker/ops.py), made by start() with the registry:
        # request op -> handler(session, request) -> reply. ``hello`` is
        # served before there is a session (_hello).
        self.ops: dict = {}
        self.state_file = state_path(self.ipc_path)
        # Notices wait here until the state that explains them is saved
        # (a successor must know every cursor a client has heard of).
        self.outbox: list[tuple[tuple, bytes, int]] = []
        self.commit_soon = Soon(self._commit)
        # This socket's lineage: the last takeover's figures, the instances
        # whose segments we hold (their owner markers).
        self.takeover: dict | None = None
        self.instances: set[str] = {self.instance}
        self.locked_at = 0.0

    # -- start and stop ----------------------------------------------------

    async def start(self) -> list[str]:
        """Bind the endpoints and create the segments and the registry.
        Raises BrokerStartError with a sentence if this broker cannot serve."""
        config = self.config
        tcp = check_tcp(config)
        standby = announce_standby(self.ipc_path) if config.standby else -1
        if config.standby:
            log.info("standby for ipc://%s: waiting for its broker's lock", self.ipc_path)
        self.lock_fd, previous = take_lock(self.ipc_path, wait=config.standby)
        self.locked_at = time.monotonic()  # the predecessor died (or stopped) by now
        if standby >= 0:
            os.close(standby)
        run_dir = os.path.dirname(os.path.abspath(self.ipc_path))
        huge = config.arena_hugepages  # its folder is swept of dead instances' arenas too
        taken = self._take_over_segments()
        if taken is not None:
            bells, arena, self.fifo_dir, snap = taken
            keep = {bells.name, *arena.names, self.fifo_dir}
            keep |= {entry[4] for entry in snap["topics"]}
            self.instances |= {n.split("-")[2] for n in keep if n.startswith("tb-")}
            keep |= {os.path.basename(marker_path(i)) for i in self.instances}
            sweep(self.ipc_path, frozenset(keep), self.state_file, previous, huge)
        else:
            sweep(self.ipc_path, own_state=self.state_file, dead=previous, huge_dir=huge)
            self.fifo_dir = ensure_private_dir(os.path.join(run_dir, f"bells-{self.instance}"))
        group = share_with_group(config.ipc_group, run_dir, self.fifo_dir)
        if taken is None:
            bells, arena = self._create_segments()
        log.info("arena: %s", arena)
        self.registry = Registry(
            config,
            self.instance,
            bells,
            arena,
            self.fifo_dir,
            notify=self._notify,
            interest=self.interest_changed,
        )
        self.liveness = Liveness(self.registry, config, self._drop_session)
        self.liveness.meter_hooks.append(lambda now: self._commit())
        if taken is not None:
            self._adopt(taken[3], previous)
        for instance in self.instances:
            write_marker(instance, self.state_file)
        self._commit()
        self.ops = Ops(
            self.registry,
            self.access,
            self.bridge,
            self._drop_session,
            self.instance,
            self.role,
        ).table()
        self.ctx = zmq.asyncio.Context()
        old_umask = os.umask(0o077)
        try:
            sock = self._socket()
            sock.bind(f"ipc://{self.ipc_path}")
            os.chmod(self.ipc_path, 0o600 if group is None else 0o660)
            if group is not None:
                os.chown(self.ipc_path, -1, group)
            self.sockets.append((sock, zmq.Socket.shadow(sock.underlying), "ipc"))
            self.endpoints.append(f"ipc://{self.ipc_path}")
            if tcp:
                tsock = self._socket()
                secure_server(tsock, config.curve_secret)
                try:
                    tsock.bind(f"tcp://{config.tcp}")
                except zmq.ZMQError as exc:
                    tsock.close(0)
                    raise BrokerStartError(f"cannot listen on tcp://{config.tcp}: {exc}") from None
                self.sockets.append((tsock, zmq.Socket.shadow(tsock.underlying), "tcp"))
                self.endpoints.append(tsock.getsockopt_string(zmq.LAST_ENDPOINT))
        finally:
            os.umask(old_umask)
        for url in config.peers:
            if not isinstance(url, str) or not url.startswith("tcp://"):
                raise BrokerStartError(f"--peer must be tcp://HOST:PORT, not {url!r}")
        try:
            await self.bridge.start(
                self.ctx, tcp[0] if tcp else None, BridgeView(self.registry), self.link_name()
            )
        except (zmq.ZMQError, RuntimeError) as exc:
            raise BrokerStartError(f"cannot start the bridge: {exc}") from None
        if self.bridge.endpoint:
            log.info("links attach on %s", self.bridge.endpoint)
        if config.metrics:
            from tensorbus.broker.metrics import MetricsServer  # prometheus_client only then

            self.metrics = MetricsServer(self.registry, self.bridge, config)
            self.metrics.start()
            self.liveness.meter_hooks.append(self.metrics.refresh)
        return self.endpoints

    def _socket(self) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting client keeps its identity
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES + 1024)
        return sock

    def link_name(self) -> str:
        tcp = [e for e in self.endpoints if e.startswith("tcp://")]
        return tcp[0] if tcp else f"{os.uname().nodename}:{self.instance}"

    async def serve(self, ready=None) -> None:
        """Serve until :meth:`stop`. ``ready(endpoints)`` is called once
        every endpoint accepts clients."""
        self.stopping = asyncio.Event()
        if not self.endpoints:
            await self.start()
        if self.takeover is not None and "ms" not in self.takeover:
            summary = self.takeover
            summary["ms"] = round((time.monotonic() - self.locked_at) * 1e3, 2)
            log.warning(
                "took over the state of broker pid %s: %d topic(s), %d session(s); "
                "serving %.1f ms after it died",
                summary["previous_pid"],
                summary["topics"],
                summary["sessions"],
                summary["ms"],
                extra={"event": "broker_takeover", **summary},
            )
        if ready is not None:
            ready(self.endpoints)
        log.info(
            "serving %s",
            " ".join(self.endpoints),
            extra={"event": "broker_started", "endpoints": self.endpoints, "pid": os.getpid()},
        )
        loop = asyncio.get_running_loop()
        fds = []
        for _, sock, transport in self.sockets:
            read = self.readers[sock] = Soon(lambda s=sock, t=transport: self._receive(s, t))
            fd = sock.getsockopt(zmq.FD)
            loop.add_reader(fd, read)
            fds.append(fd)
            read()  # requests queued before the reader was there
        tasks = [asyncio.create_task(self.liveness.run())]
        try:
            await self.stopping.wait()
        finally:
            for fd in fds:
                loop.remove_reader(fd)
            self.readers.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._shutdown()

    def stop(self) -> None:
        if self.stopping is not None:
            self.stopping.set()

    async def _shutdown(self) -> None:
        """Tell every client, close every ring, unlink everything we made."""
        registry = self.registry
        if self.metrics is not None:
            self.metrics.close()
        with contextlib.suppress(Exception):
            await self.bridge.stop()
        if registry is not None:
            log.info(
                "shutting down: %d topic(s), %d session(s)",
                len(registry.topics),
                len(registry.sessions),
                extra={
                    "event": "broker_stopping",
                    "topics": len(registry.topics),
                    "sessions": len(registry.sessions),
                },
            )
            for session in list(registry.sessions.values()):
                if not session.orphan:  # an orphan (taken over, not resumed) has no connection
                    notice = P.encode_notice("shutdown", reason="the broker is shutting down")
                    self._send(session.key, notice)
                for sub in session.subscriptions.values():
                    with contextlib.suppress(Exception):
                        registry.bells.notify(sub.bell)
                self._drop_session(session, "broker shutdown")
            registry.close_all()
            self.liveness.unpark_all()
            with contextlib.suppress(Exception):
                registry.arena.unlink()
            registry.arena = None
            with contextlib.suppress(Exception):
                registry.bells.segment.unlink()
            registry.bells = None
        if self.fifo_dir:
            shutil.rmtree(self.fifo_dir, ignore_errors=True)
        for sock, _, _ in self.sockets:
            sock.close(0)
        self.sockets.clear()
        if self.lock_fd >= 0:  # the socket file is ours only while we hold the lock
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ipc_path)
            if registry is not None:  # everything is unlinked: nothing to take over
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.state_file)
                for instance in self.instances:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(marker_path(instance))
        if self.ctx is not None:
            self.ctx.destroy(0)
        if self.lock_fd >= 0:
            release_lock(self.ipc_path, self.lock_fd)
            self.lock_fd = -1

    # -- the request loop --------------------------------------------------

    def _send(self, key: tuple, payload: bytes) -> None:
        """Send to one client. A ROUTER never blocks on send (it drops for a
        peer that is gone or over its high-water mark), so no await."""
        sock, identity = key
        with contextlib.suppress(zmq.ZMQError):
            sock.send_multipart([identity, payload], zmq.NOBLOCK)
        read = self.readers.get(sock)
        if read is not None:
            read()  # a send may take the edge of a request waiting: look again

    def _notify(self, sub: Subscription, kind: str, fields: dict) -> None:
        """Send a notice once the state is saved, then raise the bell's
        notice flag so a sleeping subscriber wakes and reads it. An orphan
        session (taken over, not yet resumed) keeps it for its client."""
        frame = P.encode_notice(kind, sub=sub.id, **fields)
        if sub.session.orphan:
            sub.session.pending.append([frame, sub.bell])
            self.registry.dirty = True
        else:
            self.outbox.append((sub.session.key, frame, sub.bell))
        self.commit_soon()

    def _receive(self, sock: zmq.Socket, transport: str) -> None:
        """Serve what requests are queued (a burst at most, then the loop's
        other work first), with no future per message. Runs when the
        socket's fd (edge-triggered) says so, and after every send on it,
        which may have taken a waiting request's edge."""
        replies = []
        more = True
        for _ in range(256):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                more = False
                break
            except zmq.ZMQError:  # closed under us: shutting down
                return
            try:
                reply = self._handle(sock, transport, frames)
            except Exception as exc:  # the broker never dies of a client's bytes
                log.exception("request failed")
                reply = P.encode_error(None, "internal", f"the broker failed: {exc}")
            if reply is not None:
                self.registry.counters["requests"] += 1
                replies.append(((sock, frames[0].bytes), reply))
        self._commit()  # saved before anyone hears of what changed
        for key, reply in replies:
            self._send(key, reply)
        if more and not replies:  # (a reply sent above looks again already)
            self.readers[sock]()

    def _handle(self, sock, transport: str, frames) -> bytes | None:
        key = (sock, frames[0].bytes)
        if len(frames) != 2:
            return self._error(
                None, "bad_request", f"a request is exactly one frame, got {len(frames) - 1}"
            )
        peer = None
        if transport == "ipc":
            peer = _peer_credentials(frames[1])
            if peer is None or not self.access.admits_uid(peer[0]):
                uid = "unknown" if peer is None else peer[0]
                return self._error(
                    None,
                    "auth_failed",
                    f"peer uid {uid} is neither this broker's uid {os.getuid()} "
                    "nor a configured user's",
                )
        try:
            request = P.decode_request(frames[1].bytes)
        except P.ProtocolViolation as exc:
            return self._error(exc.request_id, exc.code, exc.message)
        session = self.registry.sessions.get(key)
        if request.op != "hello" and session is None:
            why = self.ended_sessions.get(key, "send hello first")
            return self._error(request.id, "no_session", f"op {request.op!r} has no session: {why}")
        if session is not None:
            session.last_seen = time.monotonic()
        try:
            if request.op == "hello":
                return self._hello(key, transport, peer, request)
            return self.ops[request.op](session, request)
        except P.ProtocolViolation as exc:
            return self._error(request.id, exc.code, exc.message)
        except TopicNameError as exc:
            code = "bad_pattern" if request.op in _PATTERN_OPS else "bad_topic"
            return self._error(request.id, code, str(exc))

    def _error(self, request_id, code: str, message: str) -> bytes:
        self.registry.counters["errors"] += 1
        log.debug("error reply %s: %s", code, message)
        return P.encode_error(request_id, code, message)


def _peer_credentials(frame) -> tuple[int, int] | None:
    """(uid, pid) of an ipc peer from the kernel's SO_PEERCRED, which ZeroMQ
    exposes as the frame property ``Peer-Address`` = ``host:uid:gid:pid``."""
    try:
        parts = frame.get("Peer-Address").rsplit(":", 3)
        return int(parts[1]), int(parts[3])
    except (zmq.ZMQError, ValueError, IndexError, AttributeError):
        return None


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
