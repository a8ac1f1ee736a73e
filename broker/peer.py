"""One remote party of the bridge and the life of its links: what survives a
link (outbound cursors, what was received per topic), a fresh epoch on
each new link (credit and sequences restart, a resume message tells what
was sent on the last one), and the grace period after a link is lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from tensorbus.broker import hubs
from tensorbus.broker import peer_wire as W
from tensorbus.broker.access import denied
from tensorbus.broker.flow_in import Inbound, InTopic, batch_writer
from tensorbus.broker.flow_out import Outbound, OutClass, OutTopic, batch_reader
from tensorbus.broker.link import Link
from tensorbus.broker.soon import Soon

if TYPE_CHECKING:
    from tensorbus.broker.bridge import Bridge

__all__ = ["Peer"]

log = logging.getLogger("tensorbus.bridge")


class Peer(Outbound, Inbound):
    """One remote party: another daemon (``kind="peer"``) or a light client
    (``kind="client"``). Outlives its links: outbound cursors and what was
    received per topic survive a reconnect to the same instance."""

    def __init__(self, bridge: Bridge, kind: str, url: str | None = None):
        self.bridge = bridge
        self.kind = kind
        self.url = url  # dialed peers: where to dial
        self.node: str | None = None  # the remote daemon's node id
        self.node_hint: str | None = None  # dialed peers: its node id from hello
        self.origin: str | None = None  # its lineage: the same across takeovers
        self.name = url or "?"
        self.boot_id = ""
        self.state = "connecting"
        self.link: Link | None = None
        self.since = time.monotonic()
        self.patterns: set[str] = set()  # the remote side's interest
        self.sent_interest: set[str] = set()
        self.out: dict[str, OutTopic] = {}
        self.out_by_id: dict[int, OutTopic] = {}  # the same topics by link id (credit)
        self.out_ids: dict[str, int] = {}  # topic -> its id on links to this peer, kept
        self.unacked: dict[str, int] = {}  # topic -> sent, not credited, cursor freed
        self.classes: list[OutClass | None] = [None, None, None]  # per priority
        # Request/reply across hosts (broker/groups.py): the queue groups the
        # peer serves, the request topics sent to it that way (not by
        # interest), the reply inboxes it made for requesters here, and
        # those made here for its requesters.
        self.served_groups: set[tuple[str, str]] = set()
        self.served_topics: set[str] = set()
        self.forwarding: dict[str, OutTopic] = {}
        self.told_inboxes: set[str] = set()
        self.inboxes: set[str] = set()
        self.sent_groups: list | None = None  # what it was last told this host serves
        self.in_topics: dict[int, InTopic] = {}
        self.received: dict[str, int] = {}  # topic -> messages received from this instance
        self.grants: dict[int, list] = {}  # topic id -> [messages, bytes] to credit
        self.grant_timer: asyncio.TimerHandle | None = None
        self.reader = batch_reader(kind)  # the core's outbound batch codec
        self.writer = batch_writer(kind)  # and its inbound one
        self.kick = Soon(self._pump)  # pump soon (once, however many events ask)
        self.budget_hit = False  # the pump stopped at the link's in-flight budget
        self.chunk_timer: asyncio.TimerHandle | None = None  # body chunks in flight: look again
        self.armed = False
        self.kept: set[str] = set()  # realtime topics holding a message for credit
        self.backlogged: set[int] = set()
        self.grace_handle: asyncio.TimerHandle | None = None
        self.counters = collections.Counter()
        self.dialer: asyncio.Task | None = None
        # Learned from gossip (broker/gossip.py): the member that named it;
        # such a peer is dropped once unreachable for the link grace.
        self.learned_from: str | None = None
        # The restricted user (broker/permissions.py) this party authenticated
        # as; None: it may publish and subscribe to everything.
        self.user = None
        # Hubs and leaves (broker/hubs.py): the remote daemon's role (None:
        # a light client), why our last dial was refused, whether its
        # outbound cursors skip what it sent us (a hub's link to a leaf),
        # and the last inbound publisher of each topic it sent.
        self.role: str | None = None
        self.refused: str | None = None
        self.echo = False
        self.last_echo: dict[str, int] = {}

    def refuse(self, op: str, topic: str) -> None:
        """Tell the remote side (and the log) that its user may not ``op``
        ``topic``: the link goes on without it."""
        error = denied(self.user, op, topic, f"{self.kind} {self.name}").message
        if self.link is not None and self.link.up:
            self.link.send_control(W.encode_control("denied", topic=topic, error=error))

    # -- link life ---------------------------------------------------------

    def link_up(self, link: Link, node: str, name: str, boot: str) -> None:
        if self.grace_handle is not None:
            self.grace_handle.cancel()
            self.grace_handle = None
        if self.link is not None and self.link is not link:
            old = self.link  # both sides dialed at once: the newer link wins
            old.send_control(W.encode_control("bye"))
            old.close()
        new_instance = self.node is not None and node != self.node
        if new_instance:
            log.info(
                "peer %s restarted (new node id): starting afresh",
                name,
                extra={"event": "peer_restarted", "peer": name, "node": node},
            )
            self.mark_gaps(f"peer {name} restarted; messages it held are lost")
            self.close_outbound()
            self.patterns.clear()
            self.bridge.groups.drop_inboxes(self)  # its requesters are gone
            self.last_echo.clear()
            if self.bridge.role == hubs.HUB:
                self.bridge.interest_changed()  # what we relayed for it is void
            # What the last instance had not credited may not have reached
            # its ring: the new one hears of it first (resume), as a gap.
            resume = self.unacked
        else:
            resume = {}
        self.unacked = {}
        self.node, self.name, self.boot_id = node, name, boot
        self.link = link
        self.state = "up"
        self.refused = None
        self.since = time.monotonic()
        hubs.apply_rules(self)  # the remote role is known now
        for t in self.in_topics.values():  # the last link's ids; a lost backlog
            markers = [item for item in t.backlog if item.entry is None]  # shows as a
            if markers:  # shortfall in the peer's resume; gap markers still go out
                t.backlog = collections.deque(markers)
                self.bridge.orphans.append(t)
                self.bridge.schedule_retry()
            elif t.pub is not None:
                t.pub.close()
        self.in_topics.clear()
        self.drop_grants()
        self.backlogged.clear()
        self.sent_interest = None  # the next interest message is the whole set
        if self.counters["links"]:
            self.counters["reconnects"] += 1
        self.counters["links"] += 1
        # A fresh epoch: credit and sequences start again, topics are
        # re-announced, and the peer hears what we sent on the last link
        # (first, in order with the data).
        self.disarm()
        self.told_inboxes.clear()
        self.sent_groups = None
        for t in [*self.out.values(), *self.forwarding.values()]:
            resume[t.name] = t.sent
            t.sent = 0
            t.announced = False
            t.credit_msgs, t.credit_bytes = W.INITIAL_WINDOW_MSGS, W.INITIAL_WINDOW_BYTES
            if t.parked:
                self.classes[t.prio][1].add(t.name, t.sub)
                t.parked = False
        link.send_ordered(W.encode_control("resume", sent=resume))
        if self.kind == "peer":
            self.bridge.send_interest(self)
        log.info(
            "link to %s %s is up (%s)",
            self.kind,
            name,
            link.transport,
            extra={
                "event": "link_up",
                "kind": self.kind,
                "peer": name,
                "node": node,
                "transport": link.transport,
                "reconnects": self.counters["reconnects"],
            },
        )
        self.kick()

    def on_resume(self, sent: dict) -> None:
        """What the peer sent of each topic on the last link. Less arrived
        here (lost in flight, or waiting for ring space when the link
        broke; none at all, or this daemon is a successor that cannot
        know), or a topic it no longer lists (its cursor was freed while
        the link was down): a gap."""
        lost = {}
        for name, got in list(self.received.items()):
            count = sent.get(name)
            if count is None:
                lost[name] = "messages published while the link was down were not forwarded"
            elif count > got:
                lost[name] = f"{count - got} message(s) lost with a broken link"
        for name, count in sent.items():
            if name not in self.received and count > 0:
                lost[name] = f"{count} message(s) sent on a broken link may not have arrived"
        for name, reason in lost.items():
            self.mark_gaps(reason, [name])
        self.received.clear()

    def link_down(self, reason: str, link: Link | None = None) -> None:
        """The link failed (``link``: the one that did, if known; a later
        link that replaced it is left alone)."""
        if link is not None and link is not self.link:
            if not link.closed:
                link.close()
            return
        link, self.link = self.link, None
        if link is None:
            return
        if self.kind == "client":
            link.send_control(W.encode_control("bye"))  # the client raises, not hangs
        link.close()
        self.state = "down"
        self.since = time.monotonic()
        self.disarm()
        self.bridge.groups.peer_down(self)  # its servers leave the groups at once
        log.warning(
            "link to %s %s is down: %s",
            self.kind,
            self.name,
            reason,
            extra={"event": "link_down", "kind": self.kind, "peer": self.name, "reason": reason},
        )
        if self.kind == "client":
            self.close()
            return
        grace = self.bridge.config.link_grace_s
        self.grace_handle = asyncio.get_running_loop().call_later(grace, self._grace_over, reason)

    def give_up(self, reason: str) -> None:
        """End the grace now: this link will not resume (a leaf linked to
        another hub), so local publishers must not wait on its cursors."""
        if self.link is None and self.grace_handle is not None:
            self.grace_handle.cancel()
            self._grace_over(reason)

    def _grace_over(self, reason: str) -> None:
        self.grace_handle = None
        if self.link is not None:
            return
        log.warning(
            "peer %s stayed down for %.1f s: its cursors are freed",
            self.name,
            self.bridge.config.link_grace_s,
            extra={"event": "peer_lost", "peer": self.name, "reason": reason},
        )
        self.close_outbound()  # first: local publishers must not stay blocked
        self.patterns.clear()
        self.bridge.groups.drop_inboxes(self)
        if self.bridge.role == hubs.HUB:
            self.bridge.interest_changed()  # others no longer hear its interest from us
        self.mark_gaps(f"link to peer {self.name} lost ({reason})")
        if self.url is None or self.learned_from is not None:
            # It dialed us (it will open a new link if it returns), or gossip
            # named it (a member that still knows it will name it again).
            self.bridge.forget(self)

    def close(self) -> None:
        if self.grace_handle is not None:
            self.grace_handle.cancel()
        if self.link is not None:
            self.link.close()
            self.link = None
        self.close_outbound()
        self.bridge.groups.peer_down(self)
        self.bridge.groups.drop_inboxes(self)
        for t in self.in_topics.values():
            if t.pub is not None:
                with contextlib.suppress(Exception):
                    t.pub.close()
        self.in_topics.clear()
        self.drop_grants()
        self.state = "closed"
        self.bridge.forget(self)

    def stats(self) -> dict:
        return {
            "kind": self.kind,
            "role": self.role,
            "peer": self.name,
            "node": self.node,
            "state": self.state,
            "transport": self.link.transport if self.link is not None else None,
            # What carries its data: "stream" (a plain TCP stream), "zeromq"
            # (CURVE, light clients, older peers) or "ucx".
            "data": self.link.data_path() if self.link is not None else None,
            "for_s": round(time.monotonic() - self.since, 3),
            "learned_from": self.learned_from,
            "refused": self.refused,  # why our last dial was refused (None: it was not)
            "interest": sorted(self.patterns),
            "serves": sorted(f"{t} ({g})" for t, g in self.served_groups),
            "forwarding": len(self.out),
            "parked": sum(1 for t in self.out.values() if t.parked),
            "backlog": sum(len(t.backlog) for t in self.in_topics.values()),
            # Realtime messages the ring overwrote before the bridge read them.
            "lapped": sum(t.sub.drops for t in self.out.values()),
            **{
                k: self.counters[k]
                for k in (
                    "sent",
                    "sent_bytes",
                    "batches",
                    "received",
                    "received_bytes",
                    "dropped",
                    "gaps",
                    "reconnects",
                    "bad",
                    "hops_dropped",
                )
            },
        }
