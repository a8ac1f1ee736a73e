"""The daemon's state without sockets: topics, subscriptions, queue groups
and sessions, and every operation on them.

Nothing here does network I/O or needs an event loop: each operation takes
plain values, changes the records and the shared-memory segments
(``tensorbus._core``), and returns plain values or raises
:class:`~tensorbus.broker.protocol.ProtocolViolation`. The daemon
(broker/daemon.py) turns requests into these calls and their results into
replies; what the registry must tell the outside world goes through two
callbacks: ``notify(sub, kind, fields)`` (a notice for a subscription's
client) and ``interest()`` (local subscriptions changed).

All of the state lives in one :class:`Registry` object, in plain records
(broker/records.py), so that it can be written where a successor daemon
can take it over (broker/state.py). Subscriptions (broker/subscriptions.py)
and queue groups (broker/queue_groups.py) are its mixins.
The bridge sees only broker/bridge_view.py's BridgeView, the few
operations it needs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

from tensorbus._core import (
    Ring,
    SegmentError,
    TensorbusError,
)
from tensorbus._core.arena import MAX_HOLDERS
from tensorbus.broker import protocol as P
from tensorbus.broker.queue_groups import Group, QueueGroups
from tensorbus.broker.records import Session, Subscription, Topic
from tensorbus.broker.subscriptions import Subscriptions
from tensorbus.broker.topic_options import topic_options
from tensorbus.broker.topics import (
    INBOX_PREFIX,
    TopicNameError,
    is_system,
    matches,
    validate_pattern,
    validate_topic,
)

__all__ = [
    "Group",
    "Registry",
    "Session",
    "Subscription",
    "Topic",
]

log = logging.getLogger("tensorbus.broker")


def _no_notice(sub: Subscription, kind: str, fields: dict) -> None:
    pass


def _no_interest() -> None:
    pass


class Registry(Subscriptions, QueueGroups):
    """Every topic, subscription, queue group and session of one daemon.

    ``config`` gives the limits and defaults (a BrokerConfig); ``bells`` and
    ``arena`` are the daemon's doorbell table and tensor arena; new FIFO
    bells are made in ``fifo_dir``."""

    def __init__(
        self,
        config,
        instance: str,
        bells,
        arena,
        fifo_dir: str,
        notify: Callable[[Subscription, str, dict], None] = _no_notice,
        interest: Callable[[], None] = _no_interest,
    ):
        self.config = config
        self.instance = instance
        self.bells = bells
        self.arena = arena
        self.fifo_dir = fifo_dir
        self.notify = notify
        self.interest = interest
        self.topics: dict[str, Topic] = {}
        self.sessions: dict[tuple, Session] = {}
        self.groups: dict[tuple[str, str], Group] = {}  # (topic, group name) -> Group
        self.next_id = 1  # subscription and session ids (a successor goes on counting)
        # Set by every change a successor must know of (broker/state.py saves it).
        self.dirty = True
        self.free_bells = list(range(config.max_subscriptions - 1, -1, -1))
        self.free_holders = list(range(MAX_HOLDERS, 0, -1))
        self.bridge_session = Session(("bridge", 0), "internal", "bridge", os.getpid())
        self.bridge_subs: set[Subscription] = set()
        # takeovers: of this socket's state by a successor, so far (broker/state.py)
        counters = ("requests", "errors", "clients_lost", "evictions", "takeovers")
        self.counters = dict.fromkeys(counters, 0)

    # -- sessions ----------------------------------------------------------

    def open_session(self, key, transport: str, name: str, pid: int, now: float) -> Session:
        """A new session (the caller dropped any old one on ``key``); ipc
        sessions get an arena holder slot while any is left."""
        session = Session(key, transport, name, pid, id=self.new_id(), last_seen=now)
        self.dirty = True
        if transport == "ipc":
            if self.free_holders:
                session.holder = self.free_holders.pop()
            else:
                log.warning("no arena holder slot left for %s: it cannot use tensors", name)
        self.sessions[key] = session
        return session

    def drop_session(self, session: Session, keep_holder: bool = False) -> int:
        """Release everything a session holds: cursors, doorbells, (if its
        process is gone) its half-done publishes, its private topics and its
        arena holder slot. ``keep_holder``: the slot is not released but
        returned, for the caller to release once the process exits."""
        self.sessions.pop(session.key, None)
        self.dirty = True
        for sub in list(session.subscriptions.values()):
            self.release_subscription(sub)
        for name in session.publishing:
            topic = self.topics.get(name)
            if topic is not None:
                with contextlib.suppress(TensorbusError):
                    topic.ring.repair()  # pads claims and frees records of dead pids
        session.publishing.clear()
        for topic in [t for t in self.topics.values() if t.owner == session.id]:
            self.remove_topic(topic)
        slot, session.holder = session.holder, 0
        if slot and not keep_holder:
            self.release_holder(slot)
            slot = 0
        return slot

    def release_holder(self, slot: int) -> None:
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

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def resume(self, session: Session, key: tuple) -> None:
        """An orphan session taken over from a dead daemon is its client's
        again, now on connection ``key``."""
        self.sessions.pop(session.key, None)
        session.key = key
        session.orphan = False
        self.sessions[key] = session
        self.dirty = True

    def take_holder(self) -> int:
        """An arena holder slot for the daemon's own use (0: none left)."""
        return self.free_holders.pop() if self.free_holders else 0

    @staticmethod
    def require_local(session: Session, what: str) -> None:
        if session.transport != "ipc":
            raise P.ProtocolViolation(
                "not_local",
                f"{what} needs shared memory with the broker: "
                "connect from the broker's host over ipc://, or publish and subscribe "
                "over a link (the light client does: docs/bridge.md)",
            )

    # -- topics ------------------------------------------------------------

    def get_or_create(self, name: str, f: dict) -> tuple[Topic, bool]:
        """Topic ``name`` (options checked against ``f``), made if new: then
        every live subscription that reads it gets a cursor before anyone
        can publish, so none misses a message."""
        existing = self.topics.get(name)
        qos, capacity, slot_size = topic_options(self.config, f, existing)
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
        self.dirty = True
        log.info("topic %s created (%s, %d x %d B)", name, qos, capacity, slot_size)
        for sub in list(self.bridge_subs):
            self.attach_new(sub, topic)
        for session in list(self.sessions.values()):
            for sub in list(session.subscriptions.values()):
                self.attach_new(sub, topic)
        return topic, True

    def owns(self, session: Session, name: str) -> bool:
        """Whether ``name`` is a private topic of ``session`` (its reply inbox)."""
        topic = self.topics.get(name)
        return topic is not None and topic.owner == session.id

    def user_topic(self, name: object) -> str:
        """A topic name a client may create or publish on."""
        try:
            return validate_topic(name)
        except TopicNameError:
            if isinstance(name, str) and is_system(name):
                raise P.ProtocolViolation(
                    "read_only_topic",
                    f"topic {name!r} belongs to the broker; clients may only subscribe to it",
                ) from None
            raise

    def create_topic(self, session: Session, f: dict) -> tuple[Topic, bool]:
        name = self.user_topic(f["topic"])
        if name.startswith(INBOX_PREFIX) and not f.get("private"):
            raise P.ProtocolViolation(
                "bad_topic", f"{INBOX_PREFIX}... topics are reply inboxes: create them private"
            )
        topic, created = self.get_or_create(name, f)
        if f.get("private"):
            if not created and topic.owner != session.id:
                raise P.ProtocolViolation(
                    "topic_conflict", f"topic {name!r} exists: a private topic must be new"
                )
            topic.owner = session.id  # removed with the session (a reply inbox)
            self.dirty = True
        return topic, created

    def open_publisher(self, session: Session, f: dict) -> tuple[Topic, bool]:
        self.require_local(session, "publishing")
        name = self.user_topic(f["topic"])
        if name.startswith(INBOX_PREFIX) and name not in self.topics:
            # A reply to a requester that left: do not bring its inbox back.
            raise P.ProtocolViolation("no_such_topic", f"reply inbox {name!r} is gone")
        topic, created = self.get_or_create(name, f)
        session.publishing[name] = session.publishing.get(name, 0) + 1
        self.dirty = True
        return topic, created

    def close_publisher(self, session: Session, name: str) -> None:
        if not session.publishing.get(name):
            raise P.ProtocolViolation("no_such_topic", f"this session has no publisher on {name!r}")
        session.publishing[name] -= 1
        self.dirty = True
        if not session.publishing[name]:
            del session.publishing[name]

    def remove_topic(self, topic: Topic) -> None:
        """A private topic's owner left: its readers lose it, the ring goes."""
        self.dirty = True
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
            if g.fifo:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(g.fifo)
            self.free_bells.append(g.bell)
        self.topics.pop(topic.name, None)
        with contextlib.suppress(Exception):
            topic.ring.close()
        with contextlib.suppress(Exception):
            topic.ring.unlink()

    def close_all(self) -> None:
        """Shutdown: close and unlink every ring (subscribers still read
        what was committed, then see it closed)."""
        for topic in self.topics.values():
            with contextlib.suppress(Exception):
                topic.ring.close()
            with contextlib.suppress(Exception):
                topic.ring.unlink()
        self.topics.clear()

    def selected(self, pattern: str | None) -> list[Topic]:
        """The topics ``pattern`` matches (None: every one but $sys topics)."""
        if pattern is None:
            return [t for t in self.topics.values() if not is_system(t.name)]
        validate_pattern(pattern)
        return [t for t in self.topics.values() if matches(pattern, t.name)]
