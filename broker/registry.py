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

All of the state lives in one :class:`Registry` object, in plain records,
so that it can later be written where a successor daemon can take it over.
The bridge sees only broker/bridge_view.py's BridgeView, the few
operations it needs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from tensorbus._core import (
    CapacityError,
    Ring,
    SegmentError,
    TensorbusError,
)
from tensorbus._core.arena import MAX_HOLDERS
from tensorbus.broker import protocol as P
from tensorbus.broker.queue_groups import Group, QueueGroups
from tensorbus.broker.stats import TopicMeter
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


@dataclass(eq=False)
class Topic:
    name: str
    qos: str
    capacity: int
    slot_size: int
    ring: Ring
    # The cursors the broker handed out on this ring, keyed as the ring reports
    # them: (index, generation) -> Subscription (publishers: the ring's records).
    cursors: dict = field(default_factory=dict)
    meter: TopicMeter = field(default_factory=TopicMeter)
    drops_seen: dict = field(default_factory=dict)  # (cursor, generation) -> drops
    behind_since: dict = field(default_factory=dict)  # (cursor, generation) -> monotonic
    checked_head: int = -1  # the head at the last pressure check
    pressure_pub: object = None
    owner: int | None = None  # private topics (reply inboxes): the id of the session that owns it

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
        return self.group is None and matches(self.pattern, name) and self.session.may_read(name)


@dataclass(eq=False)
class Session:
    key: tuple  # (socket, identity); ("adopted", id) until its client resumes it
    transport: str  # "ipc" or "tcp"
    name: str
    pid: int
    id: int = 0  # what a client names to resume it after a restart (broker/state.py)
    pidfd: int = -1
    last_seen: float = 0.0
    subscriptions: dict = field(default_factory=dict)  # id -> Subscription
    publishing: dict = field(default_factory=dict)  # topic name -> count
    holder: int = 0  # arena holder slot (1..63); 0: none
    may_read: Callable[[str], bool] = lambda name: True  # permissions: broker/access.py
    # Taken over from a daemon that died, and not yet resumed by its client:
    # notices wait in ``pending`` ([frame, bell]) until it is.
    orphan: bool = False
    pending: list = field(default_factory=list)
    # The request id of the resume that claimed it: an older one, late, may not.
    resumed_by: int = 0


def _no_notice(sub: Subscription, kind: str, fields: dict) -> None:
    pass


def _no_interest() -> None:
    pass


class Registry(QueueGroups):
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

    # -- subscriptions -----------------------------------------------------

    def attach_new(self, sub: Subscription, topic: Topic) -> None:
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
        self.dirty = True
        if sub.on_attach is not None:
            sub.on_attach(sub, topic, cursor, generation)
        elif announce:
            fields = {"topic": topic.info(), "cursor": cursor, "generation": generation}
            self.notify(sub, "attach", fields)
        return cursor, generation

    def take_bell(self, kind: str, owner_pid: int) -> tuple[int, int]:
        """A free doorbell set up as ``kind``: (index, generation)."""
        if not self.free_bells:
            raise P.ProtocolViolation(
                "capacity",
                f"all {self.config.max_subscriptions} doorbells are in use (--max-subscriptions)",
            )
        bell = self.free_bells.pop()
        return bell, self.bells.setup(bell, kind, owner_pid)

    def make_fifo(self, bell: int, generation: int) -> str:
        fifo = self.bells.fifo_path(bell, generation)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fifo)
        os.mkfifo(fifo, 0o660 if self.config.ipc_group else 0o600)  # --ipc-group: its users
        return fifo

    def subscribe(self, session: Session, f: dict) -> dict:
        """A subscription of ``session`` (a queue-group member where ``f``
        names a group): the reply's fields."""
        self.require_local(session, "subscribing")
        if f.get("group") is not None:
            return self._join_group(session, f)
        pattern = validate_pattern(f["pattern"])
        mode = f.get("mode", "sync")
        if mode not in ("sync", "async"):
            raise P.ProtocolViolation("bad_option", f"mode must be 'sync' or 'async', not {mode!r}")
        kind = "fifo" if mode == "async" else "futex"
        bell, generation = self.take_bell(kind, session.pid)
        fifo = self.make_fifo(bell, generation) if kind == "fifo" else None
        sub = Subscription(self.new_id(), session, pattern, mode, bell, generation, fifo)
        self.dirty = True
        session.subscriptions[sub.id] = sub
        members = []
        # A pattern without wildcards names one topic: no scan of every topic.
        literal = "*" not in pattern and ">" not in pattern
        if literal:
            candidates = [self.topics[pattern]] if pattern in self.topics else []
        else:
            candidates = list(self.topics.values())
        try:
            for topic in candidates:
                if sub.reads(topic.name):
                    cursor, gen = self._attach(sub, topic, announce=False)
                    members.append({"topic": topic.info(), "cursor": cursor, "generation": gen})
        except CapacityError as exc:
            self.release_subscription(sub)
            raise P.ProtocolViolation("capacity", str(exc)) from None
        self.interest()
        return {
            "sub": sub.id,
            "bell": {"index": bell, "generation": generation, "kind": kind, "fifo": fifo},
            "members": members,
        }

    def _join_group(self, session: Session, f: dict) -> dict:
        """A member of queue group ``group`` on one topic: it adopts the
        group's cursor and bell (made with the first member)."""
        name = self.user_topic(f["pattern"])
        group = f["group"]
        if f.get("mode", "sync") != "sync":
            raise P.ProtocolViolation("bad_option", "queue-group members read in sync mode")
        g = self.groups.get((name, group)) or self.make_group(name, group)
        topic = self.topics[name]
        sub = Subscription(
            self.new_id(), session, name, "sync", g.bell, g.bell_generation, None, group=g
        )
        sub.members[name] = (g.cursor, g.generation)
        session.subscriptions[sub.id] = sub
        g.members.add(sub)
        topic.cursors[(g.cursor, g.generation)] = sub
        self.count_responders(g)
        self.interest()  # the bridge tells other hosts what this one serves
        return {
            "sub": sub.id,
            "bell": {
                "index": g.bell,
                "generation": g.bell_generation,
                "kind": "futex",
                "fifo": None,
            },
            "members": [{"topic": topic.info(), "cursor": g.cursor, "generation": g.generation}],
            "group": group,
        }

    def unsubscribe(self, session: Session, sub_id: int) -> None:
        sub = session.subscriptions.get(sub_id)
        if sub is None:
            raise P.ProtocolViolation(
                "no_such_subscription", f"subscription {sub_id} is not one of this session's"
            )
        self.release_subscription(sub)

    def release_subscription(self, sub: Subscription) -> None:
        if sub.group is not None:
            self._leave_group(sub)
            return
        self.dirty = True
        for name, member in sub.members.items():
            self.free_member(name, member)
        sub.members.clear()
        sub.session.subscriptions.pop(sub.id, None)
        if sub.fifo:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sub.fifo)
        if sub.bell >= 0:
            self.free_bells.append(sub.bell)
            sub.bell = -1
        if sub.wants is None:
            self.interest()

    def free_member(self, name: str, member: tuple) -> None:
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

    def local_patterns(self) -> set[str]:
        """The patterns this host's own subscribers read (queue groups are
        told apart, broker/groups.py; reply inboxes stay local)."""
        return {
            sub.pattern
            for session in self.sessions.values()
            for sub in session.subscriptions.values()
            if sub.group is None
        }
