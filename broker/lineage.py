"""A daemon's place in its socket's lineage: starting from the state a dead
predecessor left (broker/state.py) or from fresh segments, saving the state
before any client hears of a change, and resuming a client's session.

A mixin of :class:`~tensorbus.broker.daemon.Broker` (its state is the
Broker's), as the Peer's halves are: the daemon's loop and session I/O
stay in broker/daemon.py.
"""

from __future__ import annotations

import contextlib
import logging
import os

from tensorbus._core import Arena, BellTable, SegmentError
from tensorbus.broker import hugepages
from tensorbus.broker.registry import Session
from tensorbus.broker.startup import BrokerStartError, default_arena_size, standby_pid
from tensorbus.broker.state import (
    StateError,
    condemn,
    load,
    open_segments,
    read_any,
    restore,
    save,
    snapshot,
)

__all__ = ["Lineage"]

log = logging.getLogger("tensorbus.broker")


class Lineage:
    """Taking over, saving and resuming: the Broker's methods for them."""

    def _take_over_segments(self):
        """(bells, arena, fifo_dir, snapshot) of the daemon that died on this
        socket, mapped and ours, or None: no state, or one that cannot be
        taken over (its rings are then condemned: BrokerRestarted)."""
        try:
            snap = load(self.state_file)
            if snap is None:
                return None
            return (*open_segments(snap), snap)
        except StateError as exc:
            closed = condemn(read_any(self.state_file))
            log.warning(
                "cannot take over the previous broker's state: %s; "
                "%d ring(s) closed for their users (BrokerRestarted), then swept",
                exc,
                closed,
                extra={"event": "state_condemned", "reason": str(exc), "rings": closed},
            )
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.state_file)
            return None

    def _create_segments(self):
        config = self.config
        bells = BellTable.create(config.max_subscriptions, self.fifo_dir, instance=self.instance)
        size = config.arena_size or default_arena_size()
        data_dir = None
        try:
            if config.arena_hugepages:
                data_dir = hugepages.arena_dir(config.arena_hugepages)
                size = hugepages.check_room(data_dir, size)
            arena = Arena.create(size, instance=self.instance, data_dir=data_dir)
        except BrokerStartError:
            with contextlib.suppress(Exception):
                bells.segment.unlink()
            raise
        except (SegmentError, ValueError) as exc:
            with contextlib.suppress(Exception):
                bells.segment.unlink()
            raise BrokerStartError(
                f"cannot create the tensor arena of {size} bytes: {exc}"
            ) from None
        return bells, arena

    def _adopt(self, snap: dict, previous: int | None) -> None:
        """Rebuild the registry from the dead daemon's snapshot; sessions
        whose process is gone are ended, the others wait for their client."""
        summary = restore(self.registry, snap)
        for pid, slot in summary.pop("parked"):
            self.liveness.park_pid(pid, slot)
        for session in list(self.registry.sessions.values()):
            self.liveness.watch(session)
            if session.pidfd < 0:
                self._drop_session(session, "process gone")
                continue
            # Its permissions hold while it is an orphan too: a new topic
            # its pattern matches attaches only if its user may read it.
            with contextlib.suppress(OSError):
                uid = os.stat(f"/proc/{session.pid}").st_uid
                self.access.bind(session.key, self.access.identify("ipc", uid, ""))
            reader = self.access.reader(
                session, lambda name, s=session: self.registry.owns(s, name)
            )
            if reader is not None:
                session.may_read = reader
        self.registry.counters["takeovers"] = int(snap.get("takeovers", 0)) + 1
        self.bridge.origin = str(snap.get("origin") or self.bridge.origin)
        summary["previous_pid"] = summary["previous_pid"] or previous
        self.takeover = summary  # its "ms", lock to serving, is set by serve()

    def role(self) -> dict:
        """What ``stats`` says of this daemon's place in its socket's lineage."""
        return {
            "role": "primary",
            "standby_pid": standby_pid(self.ipc_path),
            "takeover": self.takeover,
        }

    def _commit(self) -> None:
        """Save the state if it changed, then send the notices that waited
        for it: a client never hears of a cursor a successor would not know."""
        registry = self.registry
        if registry is None or registry.bells is None:
            return
        if registry.dirty:
            registry.dirty = False
            meta = {
                "takeovers": registry.counters["takeovers"],
                "instances": sorted(self.instances),
                "origin": self.bridge.origin,  # peers know a successor for the same daemon
                "bridge_holder": self.bridge.holder_slot,  # a successor releases its holds
            }
            try:
                save(
                    self.state_file,
                    snapshot(registry, self.fifo_dir, self.liveness.parked_list(), meta),
                )
            except OSError as exc:
                log.error("cannot save the broker's state to %s: %s", self.state_file, exc)
        outbox, self.outbox = self.outbox, []
        for key, frame, bell in outbox:
            self._send(key, frame)
            if bell >= 0:
                registry.bells.notify(bell)

    def _resumable(self, sid: int, pid: int, transport: str, request_id: int) -> Session | None:
        """The session a resume from ``pid`` names, if it may have it: one
        taken over and not yet resumed, or one an older request of the same
        client resumed already (the reply came after the client gave up on
        that connection, and it asked again on a new one). A stale resume
        arriving after a newer one gets nothing: its connection is given up."""
        registry = self.registry
        session = registry.sessions.get(("adopted", sid))
        if session is None:
            session = next(
                (s for s in registry.sessions.values() if s.id == sid and s.transport == "ipc"),
                None,
            )
            if session is not None and request_id <= session.resumed_by:
                return None
        if session is None or session.pid != pid or transport != "ipc":
            return None
        return session
