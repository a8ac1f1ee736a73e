"""Bridges: the daemon's side of links to other daemons and light clients.

Design notes (docs/bridge.md has the full story):

* Everything runs on the daemon's event loop; nothing here blocks. The
  bridge reads local rings through cursors the broker allocates for it (one
  internal subscription per peer and priority class, each with a FIFO bell
  the loop watches) and publishes what arrives into local rings with its
  own publishers, from its own mapping of the rings and its own arena
  holder slot. So a message crosses the network once per host: local fan-out
  is the ring's.
* Order: one cursor per topic and link reads the ring in order, one
  publisher per topic and link writes it in order: per-publisher order holds.
* Credit, batching and priorities: broker/flow_out.py; backlog and gaps:
  broker/flow_in.py; a peer and its links' epochs: broker/peer.py; the link
  channel: broker/link.py; UCX: broker/bridge_ucx.py.
* Liveness: heartbeats on the link channel; a link silent for three
  periods is down. The dialing side reconnects with backoff. Outbound
  cursors survive a link for ``link_grace_s`` (reliable publishers feel
  backpressure meanwhile); then they are freed, and reliable topics fed by
  the lost link get a gap marker so their subscribers raise GapError
  instead of silently missing messages.
* Loops: messages a bridge published carry FLAG_BRIDGED; a mesh daemon
  never forwards them to another daemon, so a full mesh carries each
  message once. Hubs relay by the rules of broker/hubs.py (roles, split
  horizon, echo publishers, a hop limit); a leaf keeps one hub link.

This module is the Bridge itself: its start and stop, links coming up,
control messages, heartbeats, interest and the shared ring mappings;
accepting links is broker/accept.py, dialing a configured peer
broker/dial.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from tensorbus._core import FLAG_GAP, BackpressureError, Ring, TensorbusError, Waiter
from tensorbus.broker import gossip, hubs
from tensorbus.broker import peer_wire as W
from tensorbus.broker.accept import Acceptor
from tensorbus.broker.batching import parse_rules
from tensorbus.broker.bridge_stream import StreamListener
from tensorbus.broker.bridge_view import BridgeView
from tensorbus.broker.dial import keep_dialing, keep_leaf_link
from tensorbus.broker.flow_in import InTopic
from tensorbus.broker.flow_out import DEFAULT_PRIORITIES, PRIORITY_NAMES, priority_of
from tensorbus.broker.groups import RemoteGroups
from tensorbus.broker.link import Link, Watch
from tensorbus.broker.peer import Peer
from tensorbus.broker.soon import Soon
from tensorbus.broker.topics import INBOX_PREFIX

__all__ = ["Bridge", "PRIORITY_NAMES", "priority_of"]

log = logging.getLogger("tensorbus.bridge")


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class Bridge(Acceptor):
    """Every link of one daemon: the link ROUTER that accepts them, the
    dialers of configured peers, and the shared ring mappings."""

    def __init__(self, config):
        self.config = config
        self.registry: BridgeView | None = None  # the daemon's state, as far as we may see it
        self.link_name = ""
        self.node = uuid.uuid4().hex  # this process: a restarted daemon is a new instance
        # This daemon's lineage: kept by a successor that takes over its
        # state (broker/state.py), so a peer knows the new instance for
        # the old one's heir, whichever side dials.
        self.origin = uuid.uuid4().hex
        self.boot_id = boot_id()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.peers: list[Peer] = []
        self.links: dict[int, Link] = {}  # by our own id, whoever dialed
        self.by_identity: dict[bytes, Link] = {}  # accepted links, by ROUTER identity
        self.ids = 0
        self.router = None
        self.router_async = None
        self.endpoint: str | None = None
        self.rings: dict[str, Ring] = {}
        self.holder = None
        self.waiter = Waiter.sleeping()
        self.priorities = DEFAULT_PRIORITIES
        self.batch_rules = parse_rules(config.bridge_batch)  # checked by config_from
        # Before a bridge sleeps on its bells it may spin this long, on a spare core only.
        self.spin_us = config.bridge_spin_us  # spun under self.waiter's spinner table
        self.schedule_retry = Soon(self._retry, 0.001)  # publish what waits, shortly
        self.orphans: list[InTopic] = []  # gap markers waiting for ring space
        self.tasks: list[asyncio.Task] = []
        self.router_watch: Watch | None = None
        self.streams: StreamListener | None = None  # the tcp data streams' port
        self.transport = config.transport
        self.ucx_context = None
        self.max_body = 0  # the largest body a link may announce: our arena's size
        self.ctx = None  # the ZeroMQ context links are dialed with (start)
        self.holder_slot = 0  # the arena holder slot of the bridge's holds (0: none)
        self.groups = RemoteGroups(self)  # queue groups that span daemons
        self.role = hubs.role_of(config)  # hub, leaf or mesh (broker/hubs.py)
        self.refusals = hubs.Refusals()  # daemon links refused lately, for stats

    # -- start and stop ----------------------------------------------------

    async def start(self, ctx, host: str | None, registry: BridgeView, link_name: str) -> None:
        """Bind the link ROUTER on ``host`` (None: accept no links) and dial
        the configured peers. ``link_name``: how this daemon names itself to
        the peers it dials."""
        self.loop = asyncio.get_running_loop()
        self.ctx = ctx  # for the members gossip names
        self.registry = registry
        self.link_name = link_name
        self.max_body = registry.arena.size
        slot = self.holder_slot = registry.take_holder()
        self.holder = registry.arena.holder(slot, 1 << 20) if slot else None
        if host is not None:
            self._bind_router(ctx, host)
        links_possible = host is not None or bool(self.config.peers or self.config.leaf_of)
        if self.transport in ("ucx", "auto") and links_possible:
            from tensorbus.broker import bridge_ucx

            self.ucx_context = await bridge_ucx.start(self.transport == "ucx")
            self.transport = "tcp" if self.ucx_context is None else "ucx"
        self.tasks.append(asyncio.create_task(self._heartbeats()))
        for url in self.config.peers:
            peer = Peer(self, "peer", url)
            self.peers.append(peer)
            peer.dialer = asyncio.create_task(keep_dialing(self, peer, ctx))
        if self.config.leaf_of:  # one hub link at a time, the next hub on loss
            leaf_hubs = [Peer(self, "peer", url) for url in self.config.leaf_of]
            self.peers.extend(leaf_hubs)
            task = asyncio.create_task(keep_leaf_link(self, leaf_hubs, ctx))
            for peer in leaf_hubs:
                peer.dialer = task

    async def stop(self) -> None:
        for peer in list(self.peers):
            if peer.dialer is not None:
                peer.dialer.cancel()
            if peer.link is not None:
                peer.link.send_control(W.encode_control("bye"))
            with contextlib.suppress(Exception):
                peer.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.groups.close()
        if self.router_watch is not None:
            self.router_watch.close()
        if self.router_async is not None:
            self.router_async.close(0)
        if self.streams is not None:
            self.streams.close()
        for ring in self.rings.values():
            with contextlib.suppress(Exception):
                ring.detach()
        if self.ucx_context is not None:
            from tensorbus.broker import bridge_ucx

            await bridge_ucx.stop(self.ucx_context)

    def ring(self, name: str) -> Ring:
        """The bridge's own mapping of a local ring (with its holder slot)."""
        ring = self.rings.get(name)
        if ring is None:
            ring = Ring.attach(
                name,
                bells=self.registry.bells,
                waiter=self.waiter,
                arena=self.registry.arena,
                holder=self.holder,
            )
            self.rings[name] = ring
        return ring

    def session_closed(self, key) -> None:
        """A control session ended: a light client's link goes with it."""
        for peer in list(self.peers):
            link = peer.link
            if peer.kind == "client" and link is not None and link.session == key:
                peer.link_down("its client session ended")

    def forget(self, peer: Peer) -> None:
        """Drop ``peer`` (one that dialed us, or a member gossip named; a
        configured peer is dialed for ever)."""
        if peer in self.peers and (peer.url is None or peer.learned_from is not None):
            self.peers.remove(peer)
            dialer = peer.dialer
            if dialer is not None and dialer is not asyncio.current_task():
                dialer.cancel()
            if peer.patterns and (peer.kind == "client" or self.role == hubs.HUB):
                self.interest_changed()  # its patterns leave the interest we tell

    # -- interest ----------------------------------------------------------

    def local_patterns(self) -> set[str]:
        """What this host's subscribers and light clients read, reply inboxes
        excepted: replies find their way by the link's inboxes message."""
        patterns = set(self.registry.local_patterns())
        for peer in self.peers:
            if peer.kind == "client":
                patterns |= peer.patterns
        return {p for p in patterns if not p.startswith(INBOX_PREFIX)}

    def interest_changed(self) -> None:
        for peer in self.peers:
            if peer.kind == "peer" and peer.link is not None and peer.link.up:
                self.send_interest(peer)

    def send_interest(self, peer: Peer) -> None:
        """Tell ``peer`` what this host's subscribers read now (a hub adds
        what it relays: broker/hubs.py) and the queue groups served here
        (broker/groups.py): the whole set on a fresh link, then what changed."""
        now = hubs.interest_for(self, peer)
        groups = self.groups.served_for(peer)
        extra = {} if groups == peer.sent_groups else {"groups": groups}
        if peer.sent_interest is None:
            body = W.encode_control("interest", add=sorted(now), remove=[], reset=True, **extra)
        else:
            add, remove = now - peer.sent_interest, peer.sent_interest - now
            if not add and not remove and not extra:
                return
            body = W.encode_control("interest", add=sorted(add), remove=sorted(remove), **extra)
        peer.link.send_control(body)
        peer.sent_interest = now
        peer.sent_groups = groups

    # -- backlog -----------------------------------------------------------

    def _retry(self) -> None:
        waiting = False
        for peer in self.peers:
            if peer.backlogged:
                waiting |= peer.retry_backlog()
        for t in list(self.orphans):  # gap markers of a topic no link feeds now
            try:
                while t.backlog:
                    t.pub.send(t.backlog[0].data, flags=FLAG_GAP)
                    t.backlog.popleft()
            except BackpressureError:
                waiting = True
                continue
            except TensorbusError as exc:  # the ring went away: nobody to tell
                log.warning("a gap marker for %s was not published: %s", t.name, exc)
            self.orphans.remove(t)
            with contextlib.suppress(TensorbusError):
                t.pub.close()
        if waiting:
            self.schedule_retry()

    # -- a link comes up ------------------------------------------------------

    def go_up(self, link: Link) -> None:
        link.up = True
        link.last_rx = time.monotonic()
        node, name, boot = link.pending
        if link.transport == "ucx":
            from tensorbus.broker import bridge_ucx

            link.data = bridge_ucx.UcxData(
                self,
                link,
                link.ucx_peer_address,
                send_tag=link.ucx_send_tag,
                recv_tag=link.ucx_recv_tag,
                same_host=boot == self.boot_id,
            )
        link.peer.link_up(link, node, name, boot)
        if link.data is not None:
            link.data.link_up()  # an acceptor's stream may have come before the link
        if link.peer.kind == "peer":
            gossip.announce(self)  # every member hears of the new one, and it of them

    # -- frames on any link channel -----------------------------------------

    def on_control(self, link: Link, body: bytes) -> None:
        kind, f = W.decode_control(body)
        peer = link.peer
        if kind == "credit":
            peer.on_credit(f["grants"])
        elif kind == "topic":
            peer.on_topic(f)
        elif kind == "interest":
            peer.set_interest(f["add"], f["remove"], bool(f.get("reset")))
            if peer.kind == "client" or self.role == hubs.HUB:
                self.interest_changed()  # a hub tells the others what it relays
            if peer.kind == "peer" and "groups" in f:
                self.groups.on_groups(peer, f["groups"])
        elif kind == "inboxes" and peer.kind == "peer":
            self.groups.on_inboxes(peer, f["add"], f["remove"])
        elif kind == "resume":
            peer.on_resume(f["sent"])
        elif kind == "bye":
            self.loop.call_soon(peer.link_down, "the peer said bye")
        elif kind == "members":
            gossip.learn(self, f["urls"], peer)
        elif kind == "denied":  # the peer refused what we sent or asked for
            log.warning("peer %s: permission denied: %s", peer.name, f["error"])
        # "hb" and "attach" (a repeat) need nothing beyond last_rx.

    # -- liveness ----------------------------------------------------------

    async def _heartbeats(self) -> None:
        period = self.config.heartbeat_s
        while True:
            await asyncio.sleep(period)
            try:
                self._beat(period)
            except Exception:  # one link's trouble must not end liveness for all
                log.exception("link heartbeat tick failed")

    def _beat(self, period: float) -> None:
        self.groups.check_inboxes()
        hb = W.encode_control("hb")
        now = time.monotonic()
        for link in list(self.links.values()):
            peer = link.peer
            if not link.up:
                if now - link.last_rx > 3 * period:  # opened but never attached
                    self.links.pop(link.id, None)
                    if peer.link is None and peer.url is None and peer.state == "connecting":
                        self.forget(peer)
                continue
            if peer.kind == "client":
                alive = self.registry.session_alive(link.session)
            else:
                alive = now - link.last_rx <= 3 * period
            if not alive:
                peer.link_down(f"no heartbeat for {now - link.last_rx:.1f} s", link)
                continue
            if peer.kind == "peer":
                link.send_control(hb)
            for entry in peer.classes:
                if entry is not None:
                    entry.rings.check_stalls()  # a dead publisher's claim: repair

    def stats(self) -> list[dict]:
        return [peer.stats() for peer in self.peers]

    def members(self) -> list[str]:
        """The cluster as this daemon knows it: its own and its up peers' urls."""
        return gossip.members(self)
