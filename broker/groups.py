"""Request/reply across hosts: queue groups that span daemons
(docs/reqrep.md, "Across hosts").

* Each daemon tells its peers which queue groups its own members serve: the
  ``groups`` field of the link's ``interest`` message, the whole list
  whenever it changes.
* For a group that peers serve, this daemon's bridge is one more member of
  the local group (a :class:`ServedGroup`). The ring's ``responders`` count
  includes the serving daemons, so a requester here sends rather than
  raising ``NoResponders``, which stays immediate when nobody anywhere
  serves. The group's bell then rings both ways (``TB_BELL_BOTH``): local
  members sleep on its futex, the bridge's loop watches its FIFO.
* A free local member is preferred: the bridge claims a request (by the
  same CAS as any member) only once it has waited ``--local-first-us``
  unclaimed, or at once when the group has no member here.
* A claimed request goes to one serving daemon, as a message of its topic;
  there the local members claim it. A retry of the same (inbox, id) goes to
  the daemon the first attempt went to while its link is up, so that
  daemon's responders (and their dedup windows) see every attempt; when
  that link is gone, a retry goes to another server, and a requester whose
  last server left gets ``NoResponders`` or ``RequestTimeout``.
* Replies: before the first request of a requester crosses to a daemon,
  an ``inboxes`` message (ordered with the data) makes its reply inbox
  there; that daemon forwards what is published on it back, and drops it
  when told (the inbox went here: checked every heartbeat) or when this
  daemon is lost.
* A request that came from another daemon (FLAG_BRIDGED) is for the local
  members: a mesh daemon's or a leaf's bridge never claims it, so in a full
  mesh a request crosses at most one link. A hub relays (broker/hubs.py):
  it tells a leaf every group its other links serve and a hub the groups
  its leaves serve (split horizon, as for interest), and it claims a
  bridged request for a server the link's rules let it reach: never the
  leaf it came from (its echo publisher), never a hub when it came from a
  hub. So leaf, hub, hub, leaf is the longest way, with the hop count
  behind it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import struct
import time
from typing import TYPE_CHECKING

from tensorbus._core import FLAG_BRIDGED, RingSet, Subscriber, TensorbusError
from tensorbus.broker import peer_wire as W
from tensorbus.broker.bridge_view import drain_fifo
from tensorbus.broker.hubs import HUB, LEAF, echo_of
from tensorbus.broker.topics import inbox_topic

if TYPE_CHECKING:
    from tensorbus.broker.bridge import Bridge
    from tensorbus.broker.peer import Peer
    from tensorbus.broker.registry import Group

__all__ = ["RemoteGroups", "ServedGroup", "request_key"]

log = logging.getLogger("tensorbus.bridge")

ROUTES = 1024  # (inbox, id) -> server remembered per group, for retries
LOOK_AGAIN_S = 0.001  # a request left to local members: look at the group again
MAX_INBOXES = 4096  # reply inboxes one peer may have made here
_REQUEST_META = struct.Struct("<QQ")  # the request meta's id and inbox token (docs/reqrep.md)


def request_key(meta: bytes | None) -> tuple[int, int] | None:
    """(inbox token, request id) of a request's meta, or None without one."""
    if meta is None or len(meta) < _REQUEST_META.size:
        return None
    rid, token = _REQUEST_META.unpack_from(meta)
    return (token, rid) if rid else None


def _remember(routes: collections.OrderedDict, key: tuple[int, int], peer: Peer) -> None:
    """Request ``key`` went to ``peer``: its retries go there too (the last
    ROUTES requests are remembered)."""
    routes[key] = peer
    routes.move_to_end(key)
    if len(routes) > ROUTES:
        routes.popitem(last=False)


class ServedGroup:
    """A local queue group that other daemons serve too: the bridge's
    membership (the group's cursor, read through a ring set on its bell) and
    the daemons it may send requests to."""

    __slots__ = ("key", "group", "rings", "fd", "servers", "turn", "seen", "timer", "routes")

    def __init__(self, key: tuple[str, str], group: Group, rings: RingSet, fd: int):
        self.key = key
        self.group = group
        self.rings = rings
        self.fd = fd
        self.servers: list[Peer] = []
        self.turn = 0  # round robin over servers
        self.seen = (-1, 0.0)  # the head request's position, when first seen
        self.timer: asyncio.TimerHandle | None = None
        self.routes: collections.OrderedDict = collections.OrderedDict()


class RemoteGroups:
    """Every local queue group this daemon's peers serve."""

    def __init__(self, bridge: Bridge):
        self.bridge = bridge
        self.served: dict[tuple[str, str], ServedGroup] = {}
        self.local_first_s = bridge.config.local_first_us / 1e6
        self.counters = collections.Counter()

    # -- what this host serves, and what peers serve -------------------------

    def served_for(self, peer: Peer) -> list[list[str]]:
        """[topic, group] of the groups this daemon tells ``peer`` it
        serves: those with a member here; a hub adds those its other links
        serve (a leaf hears of every other link's, a hub of the leaves')."""
        groups = {tuple(g) for g in self.bridge.registry.served_groups()}
        if self.bridge.role == HUB:
            for sg in self.served.values():
                if any(
                    server is not peer and (peer.role == LEAF or server.role == LEAF)
                    for server in sg.servers
                ):
                    groups.add(sg.key)
        return [list(g) for g in sorted(groups)]

    def on_groups(self, peer: Peer, groups: list) -> None:
        """``peer`` serves exactly ``groups`` ([topic, group] pairs) now.
        A restricted peer serves only topics its user may read (it reads
        the requests); the others are refused, and said so."""
        new = set()
        for t, g in groups:
            if peer.user is not None and not peer.user.may_subscribe(t):
                if (t, g) not in peer.served_groups:
                    peer.refuse("serve requests of", t)
                continue
            new.add((t, g))
        old = peer.served_groups
        peer.served_groups = new
        for key in old - new:
            self._drop_server(key, peer)
        for key in new - old:
            self._add_server(key, peer)
        peer.requests_changed({t for t, _ in new})
        if self.bridge.role == HUB and new != old:
            self.bridge.interest_changed()  # the others hear what it relays

    def peer_down(self, peer: Peer) -> None:
        """``peer``'s link is down: it serves nothing until it says again."""
        if not peer.served_groups:
            return
        for key in peer.served_groups:
            self._drop_server(key, peer)
        peer.served_groups = set()
        if self.bridge.role == HUB:
            self.bridge.interest_changed()

    def _add_server(self, key: tuple[str, str], peer: Peer) -> None:
        sg = self.served.get(key)
        if sg is None:
            bridge = self.bridge
            try:
                g = bridge.registry.serve_group(*key)
            except ValueError as exc:
                log.warning("peer %s: %s", peer.name, exc)
                return
            ring = bridge.ring(bridge.registry.topic(g.topic).ring.name)
            rings = RingSet(bridge.registry.bells, g.bell, waiter=bridge.waiter, raise_gaps=False)
            rings.add(g.topic, Subscriber(ring, cursor=g.cursor, generation=g.generation))
            fd = os.open(g.fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            sg = self.served[key] = ServedGroup(key, g, rings, fd)
            bridge.loop.add_reader(fd, self._fifo_ready, sg)
        if peer not in sg.servers:
            sg.servers.append(peer)
        self.bridge.registry.set_remote(sg.group, len(sg.servers))
        self.kick(sg)

    def _drop_server(self, key: tuple[str, str], peer: Peer) -> None:
        sg = self.served.get(key)
        if sg is None or peer not in sg.servers:
            return
        sg.servers.remove(peer)
        if not sg.servers:
            del self.served[key]
            self._close(sg)
        self.bridge.registry.set_remote(sg.group, len(sg.servers))

    def _close(self, sg: ServedGroup) -> None:
        if sg.timer is not None:
            sg.timer.cancel()
        sg.rings.disarm()
        with contextlib.suppress(Exception):
            self.bridge.loop.remove_reader(sg.fd)
        os.close(sg.fd)
        sg.rings.close()  # the group's cursor stays: the registry frees it

    def close(self) -> None:
        for sg in self.served.values():
            self._close(sg)
        self.served.clear()

    # -- claiming requests -------------------------------------------------

    def _fifo_ready(self, sg: ServedGroup) -> None:
        drain_fifo(sg.fd)
        self._pump(sg)  # now, not a loop turn later: a request waits

    def kick(self, sg: ServedGroup) -> None:
        if self.served.get(sg.key) is sg:
            self.bridge.loop.call_soon(self._pump, sg)

    def kick_all(self) -> None:
        for sg in self.served.values():
            self.kick(sg)

    def _look_again(self, sg: ServedGroup, delay: float) -> None:
        if sg.timer is None:
            sg.timer = self.bridge.loop.call_later(delay, self._timer_due, sg)

    def _timer_due(self, sg: ServedGroup) -> None:
        sg.timer = None
        self._pump(sg)

    def _pump(self, sg: ServedGroup) -> None:
        """Claim the requests a free local member has not taken in time,
        and send each to a serving daemon; then sleep on the group's FIFO."""
        if self.served.get(sg.key) is not sg:
            return
        rings = sg.rings
        rings.disarm()
        while True:
            try:
                head = rings.group_head(True)
            except TensorbusError:
                return  # the ring went away with its topic
            if head is None:
                if rings.arm():
                    return  # sleep: the next request rings the FIFO
                continue
            position, flags, publisher, meta = head
            servers = self._reachable(sg, flags, publisher)
            if not servers:
                # From another daemon, for this host's members only (or, on a
                # hub, for no server but where it came from). With no member
                # here it would block every request behind it: dropped (its
                # requester retries, elsewhere).
                if sg.group.members:
                    self._look_again(sg, max(self.local_first_s, LOOK_AGAIN_S))
                    return
                if rings.claim_at(position) is not None:
                    self.counters["dropped"] += 1
                continue
            if sg.group.members and self.local_first_s:
                now = time.monotonic()
                if sg.seen[0] != position:
                    sg.seen = (position, now)
                wait = sg.seen[1] + self.local_first_s - now
                if wait > 0:
                    self._look_again(sg, wait)  # a free member here takes it first
                    return
            topic = sg.group.topic
            servers = [p for p in servers if p.can_forward(topic)]
            if not servers:
                return  # credit or a link comes back: kick_all
            key = request_key(meta)
            peer = self._route(sg, key, servers)
            try:
                sent = peer.forward_at(rings, topic, position)
            except TensorbusError as exc:
                log.warning("group %s on %s: claim failed: %s", sg.key[1], sg.key[0], exc)
                return
            if not sent:
                continue  # a member here took it
            if key is not None:
                _remember(sg.routes, key, peer)
            self.counters["forwarded"] += 1

    def _reachable(self, sg: ServedGroup, flags: int, publisher: int) -> list:
        """The servers a request with these slot flags, written by this
        publisher, may go to: any, for one made here; on a hub, those the
        link's rules let it reach (not back where it came from); else none."""
        if not flags & FLAG_BRIDGED:
            return sg.servers
        if self.bridge.role != HUB:
            return []
        topic = sg.group.topic
        return [
            p
            for p in sg.servers
            if not flags & p.reader.skip_flags and publisher != echo_of(p, topic)
        ]

    def _route(self, sg: ServedGroup, key: tuple[int, int] | None, servers: list) -> Peer:
        """The server a request goes to: where an earlier attempt of it went
        (that daemon's responders dedupe), else the next in turn. Its reply
        inbox is made there first (an ``inboxes`` message, ordered before
        the request; harmless if a member here claims it after all)."""
        peer = sg.routes.get(key) if key is not None else None
        if peer not in servers:
            peer = self._next_server(sg, servers)
        if key is not None:
            inbox = inbox_topic(key[0])
            if inbox not in peer.told_inboxes and self.bridge.registry.topic(inbox) is not None:
                peer.link.send_ordered(W.encode_control("inboxes", add=[inbox]))
                peer.told_inboxes.add(inbox)
        return peer

    def _next_server(self, sg: ServedGroup, servers: list) -> Peer:
        """The next of ``servers`` in turn (they can all take it now)."""
        sg.turn += 1
        return servers[sg.turn % len(servers)]

    # -- reply inboxes -------------------------------------------------------

    def check_inboxes(self) -> None:
        """Each heartbeat: tell peers which inboxes they made for requesters
        here are gone."""
        registry = self.bridge.registry
        for peer in self.bridge.peers:
            gone = [name for name in peer.told_inboxes if registry.topic(name) is None]
            if gone and peer.link is not None and peer.link.up:
                peer.link.send_control(W.encode_control("inboxes", remove=gone))
                peer.told_inboxes.difference_update(gone)

    def on_inboxes(self, peer: Peer, add: list, remove: list) -> None:
        """``peer`` forwards requests of requesters whose inboxes are ``add``:
        make them here (replies go back through them); drop ``remove``."""
        registry = self.bridge.registry
        for name in remove:
            if name in peer.inboxes:
                peer.inboxes.discard(name)
                registry.drop_inbox(name)
        for name in add:
            if name in peer.inboxes:
                continue
            if len(peer.inboxes) >= MAX_INBOXES:
                log.warning("peer %s: more than %d reply inboxes refused", peer.name, MAX_INBOXES)
                self.counters["inboxes_refused"] += 1
                break
            peer.inboxes.add(name)  # first: the new topic's cursor goes to this peer
            try:
                registry.make_inbox(name)
            except (ValueError, TensorbusError) as exc:
                peer.inboxes.discard(name)
                log.warning("peer %s: reply inbox %s refused: %s", peer.name, name, exc)
                self.counters["inboxes_refused"] += 1
        peer.requests_changed(None)

    def drop_inboxes(self, peer: Peer) -> None:
        """``peer`` is gone: the inboxes made for its requesters go."""
        for name in peer.inboxes:
            self.bridge.registry.drop_inbox(name)
        peer.inboxes = set()

    def stats(self) -> list[dict]:
        return [
            {
                "topic": sg.key[0],
                "group": sg.key[1],
                "members_here": len(sg.group.members),
                "servers": [p.name for p in sg.servers],
            }
            for sg in self.served.values()
        ]
