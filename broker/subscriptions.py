"""Subscriptions in the registry: a subscriber's doorbell (a futex, or a
FIFO for asyncio), a cursor on every topic its pattern matches now and
on every one made later, and what is freed when it ends. A mixin of
:class:`~tensorbus.broker.registry.Registry`: the state is the
registry's, as with broker/queue_groups.py.

Design notes (joining a ring: docs/ring.md; the ops: docs/protocol.md):

* Only the daemon allocates cursors. A subscription answers only once its
  cursors are active, and a topic made later gets a cursor for every
  matching pattern before its publisher hears back, with a notice
  (``attach``) to the subscriber.
* A pattern without wildcards names one topic: no scan of every topic.
* A queue-group member adopts the group's cursor and bell instead
  (broker/queue_groups.py).
"""

from __future__ import annotations

import contextlib
import logging
import os

from tensorbus._core import CapacityError, TensorbusError
from tensorbus.broker import protocol as P
from tensorbus.broker.records import Session, Subscription, Topic
from tensorbus.broker.topics import validate_pattern

__all__ = ["Subscriptions"]

log = logging.getLogger("tensorbus.broker")


class Subscriptions:
    """The subscription half of :class:`~tensorbus.broker.registry.Registry`
    (a mixin: the state is the registry's)."""

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
