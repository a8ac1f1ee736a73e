"""Liveness: which clients are gone, which subscribers fall behind.

* Clients on ipc: their pid is watched with a pidfd, so a client killed
  with -9 is seen within milliseconds; a holder slot kept after ``bye``
  (the process may still read arena blocks) is released when it exits.
* Clients on tcp send heartbeats; three periods of silence end a session.
* Realtime topics: subscribers' drop counters, announced on
  ``$sys/pressure/<topic>``; optionally, subscribers that stay too far
  behind for longer than a grace period are evicted (NATS's slow-consumer
  rule).
* Once a second, each topic's meter (rates and latency percentiles).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable

import msgpack

from tensorbus._core import TensorbusError
from tensorbus.broker.registry import Registry, Session, Subscription, Topic
from tensorbus.broker.startup import pid_alive
from tensorbus.broker.stats import LATENCY_BUCKETS
from tensorbus.broker.topics import SYSTEM_PREFIX, is_system

__all__ = ["PRESSURE_CAPACITY", "PRESSURE_MAX_LISTED", "PRESSURE_SLOT_SIZE", "Liveness"]

log = logging.getLogger("tensorbus.broker")

# $sys/pressure/<topic>: a realtime ring of this many slots of this size. A
# body lists at most PRESSURE_MAX_LISTED cursors; with names of at most
# P.MAX_NAME_BYTES it always fits one slot (tests/test_broker.py checks).
PRESSURE_CAPACITY = 64
PRESSURE_SLOT_SIZE = 8192
PRESSURE_MAX_LISTED = 32


class Liveness:
    """Watches the sessions and topics of ``registry`` on the event loop.
    ``drop(session, reason)`` ends a session whose client is gone."""

    def __init__(self, registry: Registry, config, drop: Callable[[Session, str], None]):
        self.registry = registry
        self.config = config
        self.drop = drop
        # Holder slots of clients that said bye while their process may still
        # view arena blocks: released when that process exits.
        # pidfd -> (slot, pid).
        self.parked: dict[int, tuple[int, int]] = {}
        # Called after each second's meters, on the loop (the metrics snapshot).
        self.meter_hooks: list[Callable[[float], None]] = []

    # -- pidfds ------------------------------------------------------------

    def watch(self, session: Session) -> None:
        """Watch an ipc client's pid (session.pidfd; -1 where no pidfd can
        be had: the monitor's pid check still catches its death)."""
        try:
            fd = os.pidfd_open(session.pid)
        except (OSError, AttributeError):
            session.pidfd = -1
            return
        asyncio.get_running_loop().add_reader(fd, self._exited, session)
        session.pidfd = fd

    def _exited(self, session: Session) -> None:
        if self.registry.sessions.get(session.key) is session:
            self.registry.counters["clients_lost"] += 1
            self.drop(session, "process exited")
        else:
            self.unwatch(session)

    def unwatch(self, session: Session) -> None:
        if session.pidfd >= 0:
            asyncio.get_running_loop().remove_reader(session.pidfd)
            os.close(session.pidfd)
            session.pidfd = -1

    def park(self, session: Session, slot: int) -> None:
        """Keep holder ``slot`` until ``session``'s process exits: numpy
        views it made before saying bye may still be read."""
        fd, session.pidfd = session.pidfd, -1
        loop = asyncio.get_running_loop()
        loop.remove_reader(fd)
        self.parked[fd] = (slot, session.pid)
        loop.add_reader(fd, self._unpark, fd)

    def park_pid(self, pid: int, slot: int) -> None:
        """Keep holder ``slot`` until process ``pid`` exits (taken over
        from a daemon that died); released now if it is gone already."""
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            self.registry.release_holder(slot)
            return
        self.parked[fd] = (slot, pid)
        asyncio.get_running_loop().add_reader(fd, self._unpark, fd)

    def parked_list(self) -> list[list[int]]:
        """[pid, slot] of every parked holder slot (broker/state.py)."""
        return [[pid, slot] for slot, pid in self.parked.values()]

    def _unpark(self, fd: int) -> None:
        slot, _ = self.parked.pop(fd, (0, 0))
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)
        if slot and self.registry.arena is not None:
            self.registry.release_holder(slot)
            self.registry.dirty = True

    def unpark_all(self) -> None:
        for fd in list(self.parked):
            self._unpark(fd)

    # -- the monitor -------------------------------------------------------

    async def run(self) -> None:
        last_meter = 0.0
        while True:
            await asyncio.sleep(self.config.monitor_interval)
            now = time.monotonic()
            try:
                self.check_sessions(now)
                self.check_pressure(now)
                if now - last_meter >= 1.0:
                    self.update_meters(now)
                    for hook in self.meter_hooks:
                        hook(now)
                    last_meter = now
            except Exception:
                log.exception("monitor tick failed")

    def check_sessions(self, now: float) -> None:
        timeout = 3 * self.config.heartbeat_s
        counters = self.registry.counters
        for session in list(self.registry.sessions.values()):
            if session.transport == "tcp":
                if now - session.last_seen > timeout:
                    counters["clients_lost"] += 1
                    self.drop(session, "heartbeat timeout")
            elif session.pidfd < 0 and not pid_alive(session.pid):
                counters["clients_lost"] += 1
                self.drop(session, "process gone")

    def check_pressure(self, now: float) -> None:
        grace = self.config.slow_consumer_grace
        for topic in list(self.registry.topics.values()):
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
        self.registry.counters["evictions"] += 1
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
            extra={
                "event": "subscriber_evicted",
                "topic": topic.name,
                "client": sub.session.name,
                "pid": sub.session.pid,
                "sub": sub.id,
                "qos": topic.qos,
                "behind_s": round(behind_s, 3),
                "reason": reason,
            },
        )
        self.registry.notify(sub, "evicted", {"topic": topic.name, "reason": reason})

    def _announce_pressure(self, topic: Topic, dropped: list) -> None:
        if topic.pressure_pub is None:
            channel, _ = self.registry.get_or_create(
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

    def update_meters(self, now: float) -> None:
        for topic in self.registry.topics.values():
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
