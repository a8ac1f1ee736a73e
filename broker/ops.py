"""The ops of the control protocol (docs/protocol.md), one handler each:
``handler(session, request) -> reply``. They check permissions
(broker/access.py), call the registry (broker/registry.py) and encode the
reply; the daemon (broker/daemon.py) reads requests, finds the session and
looks the op up in :meth:`Ops.table`. ``hello`` is the daemon's own: it is
served before there is a session.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from tensorbus.broker import protocol as P
from tensorbus.broker.access import Access
from tensorbus.broker.bridge import Bridge
from tensorbus.broker.registry import Registry, Session
from tensorbus.broker.stats import private_rss_kb

__all__ = ["Ops"]


class Ops:
    """The handlers, over the registry, the permissions and the bridge;
    ``drop_session(session, reason, views_alive)`` ends a session (bye);
    ``role()`` gives what stats say of the daemon's lineage."""

    def __init__(
        self,
        registry: Registry,
        access: Access,
        bridge: Bridge,
        drop_session: Callable[..., None],
        instance: str,
        role: Callable[[], dict] = dict,
    ):
        self.registry = registry
        self.access = access
        self.bridge = bridge
        self.drop_session = drop_session
        self.instance = instance
        self.role = role  # primary or standby, takeovers (the daemon's)
        self.started = time.monotonic()

    def table(self) -> dict[str, Callable[[Session, P.Request], bytes]]:
        """Request op -> handler, built once."""
        return {
            "create_topic": self.op_create_topic,
            "open_publisher": self.op_open_publisher,
            "close_publisher": self.op_close_publisher,
            "subscribe": self.op_subscribe,
            "unsubscribe": self.op_unsubscribe,
            "list_topics": self.op_list_topics,
            "responders": self.op_responders,
            "stats": self.op_stats,
            "heartbeat": self.op_heartbeat,
            "bye": self.op_bye,
            "link": self.op_link,
        }

    def op_bye(self, session: Session, request: P.Request) -> bytes:
        self.drop_session(session, "bye", views_alive=bool(request.fields.get("holds")))
        return P.encode_reply(request.id)

    def op_heartbeat(self, session: Session, request: P.Request) -> bytes:
        return P.encode_reply(request.id, now_ns=time.time_ns())

    def op_create_topic(self, session: Session, request: P.Request) -> bytes:
        f = request.fields
        self.access.check_publish(session, "create", f["topic"], private=bool(f.get("private")))
        topic, created = self.registry.create_topic(session, request.fields)
        return P.encode_reply(request.id, topic=topic.info(), created=created)

    def op_open_publisher(self, session: Session, request: P.Request) -> bytes:
        self.registry.require_local(session, "publishing")
        self.access.check_publish(session, "publish on", request.fields["topic"])
        topic, created = self.registry.open_publisher(session, request.fields)
        return P.encode_reply(request.id, topic=topic.info(), created=created)

    def op_close_publisher(self, session: Session, request: P.Request) -> bytes:
        self.registry.close_publisher(session, request.fields["topic"])
        return P.encode_reply(request.id)

    def op_subscribe(self, session: Session, request: P.Request) -> bytes:
        self.registry.require_local(session, "subscribing")
        pattern = request.fields["pattern"]
        owned = isinstance(pattern, str) and self.registry.owns(session, pattern)
        self.access.check_subscribe(session, pattern, owned=owned)
        return P.encode_reply(request.id, **self.registry.subscribe(session, request.fields))

    def op_unsubscribe(self, session: Session, request: P.Request) -> bytes:
        self.registry.unsubscribe(session, request.fields["sub"])
        return P.encode_reply(request.id)

    def op_link(self, session: Session, request: P.Request) -> bytes:
        """A peer daemon or a light client opens a link (docs/bridge.md)."""
        user = self.access.user_of(session.key)
        return P.encode_reply(
            request.id, **self.bridge.open_link(request.fields, session.key, user)
        )

    def op_responders(self, session: Session, request: P.Request) -> bytes:
        """The responders of a request topic, as its ring header counts them
        (0 if there is no such topic): a light client's NoResponders."""
        name = request.fields["topic"]
        self.access.check_publish(session, "request on", name)
        topic = self.registry.topics.get(self.registry.user_topic(name))
        return P.encode_reply(request.id, responders=topic.ring.responders if topic else 0)

    def op_list_topics(self, session: Session, request: P.Request) -> bytes:
        topics = []
        for t in self.registry.selected(request.fields.get("pattern")):
            info = t.info()
            info["publishers"] = len(t.ring.stats()["publishers"])
            info["subscribers"] = len(t.cursors)
            topics.append(info)
        return P.encode_reply(request.id, topics=topics)

    def op_stats(self, session: Session, request: P.Request) -> bytes:
        registry = self.registry
        topics = []
        for t in registry.selected(request.fields.get("pattern")):
            s = t.ring.stats()
            depth = max((c["lag"] for c in s["cursors"] if c["state"] == "active"), default=0)
            topics.append(
                {
                    "name": t.name,
                    "qos": t.qos,
                    "capacity": t.capacity,
                    "slot_size": t.slot_size,
                    "publishers": len(s["publishers"]),
                    "subscribers": len(t.cursors),
                    "messages": s["head"],
                    "depth": depth,
                    "drops": sum(c["drops"] for c in s["cursors"]),
                    "msgs_per_s": t.meter.msgs_per_s,
                    "bytes_per_s": t.meter.bytes_per_s,
                    "p50_ns": t.meter.p50_ns,
                    "p99_ns": t.meter.p99_ns,
                }
            )
        broker = {
            "pid": os.getpid(),
            "instance": self.instance,
            "uptime_s": time.monotonic() - self.started,
            "sessions": len(registry.sessions),
            "topics": len(registry.topics),
            "rss_kb": private_rss_kb() or 0,
            "bells_free": len(registry.free_bells),
            "arena": registry.arena.stats() if registry.arena is not None else None,
            "holders_free": len(registry.free_holders),
            "node": self.bridge.node,
            "links": self.bridge.stats(),
            "cluster": self.bridge.members(),
            "remote_groups": self.bridge.groups.stats(),
            "cluster_role": self.bridge.role,  # hub, leaf or mesh (broker/hubs.py)
            "refused_links": self.bridge.refusals.stats(),  # lately, newest last
            **self.role(),
            **registry.counters,
        }
        return P.encode_reply(request.id, topics=topics, broker=broker)
