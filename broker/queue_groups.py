"""Queue groups (request/reply responders) in the registry: one cursor per
group that every member adopts and claims messages from by CAS, one futex
bell they sleep on, and the ring header's ``responders`` count
(docs/reqrep.md). A mixin of :class:`~tensorbus.broker.registry.Registry`:
the state is the registry's."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

from tensorbus._core import CapacityError, TensorbusError
from tensorbus.broker import protocol as P
from tensorbus.broker.topics import validate_topic

__all__ = ["Group", "QueueGroups"]


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
    remote: int = 0  # daemons that serve it for other hosts (broker/groups.py)
    fifo: str | None = None  # the bell's FIFO, while a bridge watches it too


class QueueGroups:
    """Joining, leaving and counting queue groups (the Registry's)."""

    def make_group(self, name: str, group: str) -> Group:
        """Queue group ``group`` on topic ``name`` (made with the defaults if
        need be): its cursor and bell."""
        validate_topic(f"g/{group}")  # a group name is one topic level
        if "/" in group:
            raise P.ProtocolViolation("bad_option", f"a group name is one level, not {group!r}")
        topic, _ = self.get_or_create(name, {})
        if topic.qos != "reliable":
            raise P.ProtocolViolation(
                "bad_option",
                f"a queue group reads a reliable topic; {name!r} is {topic.qos}",
            )
        bell, bell_generation = self.take_bell("futex", os.getpid())
        try:
            cursor, generation = topic.ring.join_cursor(os.getpid(), bell=bell + 1, group=True)
        except CapacityError as exc:
            self.free_bells.append(bell)
            raise P.ProtocolViolation("capacity", str(exc)) from None
        g = Group(name, group, cursor, generation, bell, bell_generation)
        self.groups[(name, group)] = g
        return g

    def count_responders(self, g: Group) -> None:
        """Write the group's responders (its members here, and the daemons
        that serve it for other hosts) into its ring; free a group with none."""
        topic = self.topics.get(g.topic)
        if g.members or g.remote:
            if topic is not None:
                if g.members:  # the cursor's owner in stats
                    topic.cursors[(g.cursor, g.generation)] = next(iter(g.members))
                else:
                    topic.cursors.pop((g.cursor, g.generation), None)
                topic.ring.set_responders(len(g.members) + g.remote)
            return
        del self.groups[(g.topic, g.name)]
        if topic is not None:
            topic.cursors.pop((g.cursor, g.generation), None)
            with contextlib.suppress(TensorbusError):
                topic.ring.set_responders(0)
                topic.ring.free_cursor(g.cursor, g.generation)
                topic.ring.reclaim()
        if g.fifo:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(g.fifo)
        self.free_bells.append(g.bell)

    def _leave_group(self, sub) -> None:
        g = sub.group
        self.dirty = True
        g.members.discard(sub)
        sub.session.subscriptions.pop(sub.id, None)
        sub.members.clear()
        self.count_responders(g)
        self.interest()
