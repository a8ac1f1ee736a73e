"""What the bridge (broker/bridge.py) may use of the registry: exactly the
operations of :class:`BridgeView` and the two segments, nothing else."""

from __future__ import annotations

import os
import stat

from tensorbus.broker import protocol as P
from tensorbus.broker.registry import Group, Registry, Subscription, Topic
from tensorbus.broker.topics import INBOX_PREFIX, TopicNameError

__all__ = ["BRIDGE_OWNED", "BridgeView", "INBOX_CAPACITY", "drain_fifo"]

BRIDGE_OWNED = -1  # a topic's owner: the bridge made it (a far requester's reply inbox)
INBOX_CAPACITY = 64  # slots of a reply inbox, as a requester makes its own


def drain_fifo(fd: int) -> None:
    """Empty a FIFO bell the loop found readable (O_NONBLOCK): a short read
    emptied it, so one read is the usual cost."""
    try:
        while len(os.read(fd, 4096)) == 4096:
            pass
    except BlockingIOError:
        pass


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


class BridgeView:
    """The registry as the bridge sees it. The bridge's subscriptions read
    every topic ``wants`` accepts, now and later, through one FIFO bell, and
    hear of new topics through ``on_attach`` rather than a notice."""

    __slots__ = ("_registry",)

    def __init__(self, registry: Registry):
        self._registry = registry

    @property
    def bells(self):
        return self._registry.bells

    @property
    def arena(self):
        return self._registry.arena

    def topic(self, name: str) -> Topic | None:
        return self._registry.topics.get(name)

    def session_alive(self, key) -> bool:
        return key in self._registry.sessions

    def owned_by(self, key, name: str) -> bool:
        """Whether topic ``name`` is a private topic (a reply inbox) of the
        session on ``key``."""
        session = self._registry.sessions.get(key)
        return session is not None and self._registry.owns(session, name)

    def take_holder(self) -> int:
        return self._registry.take_holder()

    def local_patterns(self) -> set[str]:
        return self._registry.local_patterns()

    def open_subscription(self, wants, on_attach) -> tuple[Subscription, dict]:
        """A subscription for a bridge: cursors on every topic ``wants``
        accepts, now and later (``on_attach`` hears of each), one FIFO bell."""
        reg = self._registry
        bell, generation = reg.take_bell("fifo", os.getpid())
        fifo = reg.make_fifo(bell, generation)
        sub = Subscription(
            reg.new_id(),
            reg.bridge_session,
            "(bridge)",
            "async",
            bell,
            generation,
            fifo,
            wants=wants,
            on_attach=on_attach,
        )
        reg.bridge_subs.add(sub)
        return sub, {"index": bell, "generation": generation, "fifo": fifo}

    def refresh_subscription(self, sub: Subscription) -> None:
        """Attach every existing topic a bridge subscription now wants."""
        reg = self._registry
        for topic in list(reg.topics.values()):
            reg.attach_new(sub, topic)

    def drop_cursor(self, sub: Subscription, name: str) -> None:
        member = sub.members.pop(name, None)
        if member is not None:
            self._registry.free_member(name, member)

    def close_subscription(self, sub: Subscription) -> None:
        self._registry.bridge_subs.discard(sub)
        self._registry.release_subscription(sub)

    # -- queue groups that span hosts (broker/groups.py) ------------------

    def served_groups(self) -> list[list[str]]:
        """[topic, group] of every queue group with a member on this host."""
        return sorted([g.topic, g.name] for g in self._registry.groups.values() if g.members)

    def serve_group(self, name: str, group: str) -> Group:
        """Queue group ``group`` on topic ``name``, served by other hosts
        too: made if need be; its bell then also rings a FIFO (``fifo``)."""
        reg = self._registry
        try:
            name = reg.user_topic(name)
            if name.startswith(INBOX_PREFIX):
                raise TopicNameError(f"{name!r} is a reply inbox, not a request topic")
            g = reg.groups.get((name, group)) or reg.make_group(name, group)
        except (TopicNameError, P.ProtocolViolation) as exc:
            raise ValueError(f"cannot serve group {group!r} on {name!r}: {exc}") from None
        if g.fifo is None:
            path = reg.bells.fifo_path(g.bell, g.bell_generation)
            # A predecessor's FIFO stays: publishers may hold it open already.
            g.fifo = path if _is_fifo(path) else reg.make_fifo(g.bell, g.bell_generation)
        reg.bells.set_kind(g.bell, "both")
        return g

    def set_remote(self, g: Group, servers: int) -> None:
        """``servers`` daemons serve group ``g`` for other hosts now; at 0
        its bell is a futex bell again (and a group without members goes)."""
        reg = self._registry
        g.remote = servers
        if not servers:
            reg.bells.set_kind(g.bell, "futex")
        reg.dirty = True
        reg.count_responders(g)

    def make_inbox(self, name: str) -> None:
        """A far requester's reply inbox, for replies to requests this
        daemon's members serve for it (kept until the bridge drops it)."""
        reg = self._registry
        topic = reg.topics.get(name)
        if topic is not None:
            if topic.owner not in (BRIDGE_OWNED, None):
                raise ValueError(f"reply inbox {name!r} belongs to a requester on this host")
            return
        topic, _ = reg.get_or_create(name, {"capacity": INBOX_CAPACITY})
        topic.owner = BRIDGE_OWNED

    def drop_inbox(self, name: str) -> None:
        topic = self._registry.topics.get(name)
        if topic is not None and topic.owner == BRIDGE_OWNED:
            self._registry.remove_topic(topic)

    def bridge_topic(self, name: object, f: dict) -> Topic:
        """The local topic a link's messages go to: made with the origin's
        options, or the one that exists (whatever its options)."""
        reg = self._registry
        try:
            name = reg.user_topic(name)
        except (TopicNameError, P.ProtocolViolation) as exc:
            raise ValueError(f"a link announced a bad topic: {exc}") from None
        existing = reg.topics.get(name)
        if existing is not None:
            return existing
        if name.startswith(INBOX_PREFIX):  # replies come back to a requester here, or nowhere
            raise ValueError(f"reply inbox {name!r} is gone (its requester left)")
        options = {k: f[k] for k in ("qos", "capacity", "slot_size") if k in f}
        try:
            topic, _ = reg.get_or_create(name, options)
        except P.ProtocolViolation as exc:
            raise ValueError(f"cannot make topic {name!r} for a link: {exc.message}") from None
        return topic
