"""A daemon's client sessions: ``hello`` opens one (or resumes one a dead
predecessor left, broker/lineage.py), and a session ends with a bye, its
process's death, a heartbeat timeout or the daemon's shutdown. A mixin of
:class:`~tensorbus.broker.daemon.Broker` (its state is the Broker's), as
Lineage is: the loop and the request I/O stay in broker/daemon.py.

Design notes:

* Who a client is comes from the kernel on ipc (SO_PEERCRED's uid and
  pid) and from its token; what it may do is broker/access.py's.
* A session that ended with a bye or a heartbeat timeout leaves why, for
  its connection's next request (a bounded table), so a client hears
  "timed out" or "bye" rather than "send hello first".
* A client that may still view arena blocks when its session ends keeps
  its holder slot, parked until its process exits (broker/liveness.py).
"""

from __future__ import annotations

import logging
import os
import time

from tensorbus.broker import protocol as P
from tensorbus.broker.records import Session

__all__ = ["CLIENT_DEATHS", "ENDED_SESSIONS_KEPT", "Sessions", "log_client"]

log = logging.getLogger("tensorbus.broker")

# How many ended sessions are remembered, so that a connection's next
# request hears why its session is gone (timed out, bye) instead of "no hello".
ENDED_SESSIONS_KEPT = 1024
# Why a session ends when its client is gone without a bye (broker/liveness.py).
CLIENT_DEATHS = frozenset(("process exited", "process gone", "heartbeat timeout"))


class Sessions:
    """The session half of :class:`~tensorbus.broker.daemon.Broker` (a
    mixin: the state is the Broker's)."""

    def _hello(self, key, transport: str, peer, request: P.Request) -> bytes:
        """A new session; ``peer``: (uid, pid) from the kernel on ipc."""
        f = request.fields
        if f["protocol"] != P.PROTOCOL_VERSION:
            raise P.ProtocolViolation(
                "unsupported_version",
                f"client speaks protocol {f['protocol']}, this broker {P.PROTOCOL_VERSION}",
            )
        uid = peer[0] if peer is not None else None
        user = self.access.identify(transport, uid, f.get("token") or "")
        registry = self.registry
        pid = peer[1] if peer is not None else f["pid"]
        resumed = None
        if f.get("resume") is not None:
            resumed = self._resumable(f["resume"], pid, transport, request.id or 0)
            if resumed is None:
                raise P.ProtocolViolation(
                    "session_lost",
                    f"session {f['resume']} cannot be resumed: this broker (pid "
                    f"{os.getpid()}) did not take it over from the one that died; "
                    "connect again",
                )
        old = registry.sessions.get(key)
        if old is not None and old is not resumed:
            self._drop_session(old, "hello again on the same connection")
        self.access.bind(key, user)
        self.ended_sessions.pop(key, None)
        if resumed is not None:
            session = resumed
            if session.key != key:  # its orphan key, or a connection its client gave up on
                self.access.forget(session.key)
            session.resumed_by = request.id or 0
            registry.resume(session, key)
            self.outbox.extend((key, frame, bell) for frame, bell in session.pending)
            session.pending.clear()
            log_client(session, "resumed")
        else:
            session = registry.open_session(
                key, transport, P.session_name(f.get("name"), pid), pid, time.monotonic()
            )
        reader = self.access.reader(session, lambda name: registry.owns(session, name))
        if reader is not None:
            session.may_read = reader
            log.info("%s is %s", session.name, user)
        if resumed is None:
            if transport == "ipc":
                self.liveness.watch(session)
            log_client(session, "joined")
        local = transport == "ipc"
        return P.encode_reply(
            request.id,
            session=session.id,
            resumed=resumed is not None,
            instance=self.instance,
            local=local,
            # Segment names and paths are for clients that can map them.
            bells={"name": registry.bells.name, "fifo_dir": self.fifo_dir} if local else None,
            arena={
                "meta": registry.arena.meta.name,
                "data": registry.arena.data.name,
                "holder": session.holder,
            }
            if local
            else None,
            heartbeat_s=self.config.heartbeat_s,
            broker_pid=os.getpid(),
            node=self.bridge.node,
        )

    def _drop_session(self, session: Session, reason: str, views_alive: bool = False) -> None:
        """End a session: the registry releases what it holds; its arena
        holder slot is parked until the process exits if it may still view
        blocks; its pid is no longer watched; a light client's link goes."""
        slot = self.registry.drop_session(session, keep_holder=views_alive and session.pidfd >= 0)
        if slot:
            self.liveness.park(session, slot)
        self.liveness.unwatch(session)
        self.bridge.session_closed(session.key)
        log_client(session, "died" if reason in CLIENT_DEATHS else "left", reason)
        self.access.forget(session.key)
        if reason in ("bye", "heartbeat timeout"):  # the connection may speak again
            self._remember_end(session, reason)
        self.commit_soon()

    def _remember_end(self, session: Session, reason: str) -> None:
        """Keep why ``session`` ended for its connection's next request."""
        if reason == "bye":
            why = "this connection's session ended with bye; send hello again"
        else:
            beat = self.config.heartbeat_s
            why = (
                f"the session timed out after {3 * beat:g} s without a message "
                f"(3 x heartbeat_s); send hello again, then any request, such as "
                f"heartbeat, at least every {beat:g} s"
            )
        self.ended_sessions[session.key] = why
        self.ended_sessions.move_to_end(session.key)
        while len(self.ended_sessions) > ENDED_SESSIONS_KEPT:
            self.ended_sessions.popitem(last=False)


def log_client(session: Session, what: str, reason: str | None = None) -> None:
    """Tell the operator a client ``what`` ("joined", "left" or "died"):
    the events client_joined, client_left and client_died."""
    fields = {"client": session.name, "pid": session.pid, "transport": session.transport}
    if reason is None:
        log.info(
            "client %s %s (pid %d, %s)",
            session.name,
            what,
            session.pid,
            session.transport,
            extra={"event": f"client_{what}", **fields},
        )
    else:
        log.info(
            "client %s %s: %s",
            session.name,
            what,
            reason,
            extra={"event": f"client_{what}", "reason": reason, **fields},
        )
