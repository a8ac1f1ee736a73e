"""The registry's records: a topic, a subscription and a client's
session, as plain dataclasses (broker/registry.py holds them and every
operation on them; broker/state.py writes them where a successor daemon
can take them over). A queue group's record is broker/queue_groups.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tensorbus._core import Ring
from tensorbus.broker.queue_groups import Group
from tensorbus.broker.stats import TopicMeter
from tensorbus.broker.topics import matches

__all__ = ["Session", "Subscription", "Topic"]


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
