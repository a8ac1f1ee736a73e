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

This module is the Bridge itself: accepting links, dialing peers,
heartbeats, interest, and the shared ring mappings; dialing a configured
peer is broker/dial.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid

import zmq

from tensorbus._core import FLAG_GAP, BackpressureError, Ring, TensorbusError, Waiter
from tensorbus.broker import gossip, hubs
from tensorbus.broker import peer_wire as W
from tensorbus.broker import protocol as P
from tensorbus.broker.batching import parse_rules
from tensorbus.broker.bridge_stream import StreamData, StreamListener
from tensorbus.broker.bridge_view import BridgeView
from tensorbus.broker.curve import secure_server
from tensorbus.broker.dial import keep_dialing, keep_leaf_link
from tensorbus.broker.flow_in import InTopic
from tensorbus.broker.flow_out import DEFAULT_PRIORITIES, PRIORITY_NAMES, priority_of
from tensorbus.broker.groups import RemoteGroups
from tensorbus.broker.link import MAX_CHUNK_BYTES, MAX_LINK_MESSAGE, Link, Remote, Watch, drain
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


class Bridge:
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
            import zmq.asyncio

            self.router_async = ctx.socket(zmq.ROUTER)
            sock = self.router_async
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.SNDHWM, 0)  # credit bounds what we queue
            # What a stranger can make us buffer before attaching: messages
            # of at most MAX_LINK_MESSAGE, a bounded number of them.
            sock.setsockopt(zmq.RCVHWM, 1024)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_LINK_MESSAGE)
            secure_server(sock, self.config.curve_secret)
            port = self.config.link_port
            bind_host = f"[{host}]" if ":" in host else host
            if port:
                sock.bind(f"tcp://{bind_host}:{port}")
            else:
                sock.bind_to_random_port(f"tcp://{bind_host}")
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self.router = zmq.Socket.shadow(sock.underlying)
            self.router_watch = Watch(self.loop, self.router, self._on_router_message)
            if not self.config.curve_secret:  # CURVE encrypts: its data stays on ZeroMQ
                self._listen_for_streams(host)
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

    def _listen_for_streams(self, host: str) -> None:
        """The tcp data streams' port. A --stream-port that cannot be bound
        stops the start; an interface name ZeroMQ binds and sockets do not
        only leaves the data on ZeroMQ."""
        port = self.config.stream_port
        try:
            self.streams = StreamListener(self, host, port)
        except OSError as exc:
            if port:
                raise RuntimeError(
                    f"cannot listen for data streams on {host}:{port}: {exc}"
                ) from None
            log.warning("no tcp data streams on %s (%s): link data stays on ZeroMQ", host, exc)

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

    # -- accepting links ---------------------------------------------------

    def open_link(self, f: dict, session_key, user=None) -> dict:
        """The ``link`` op: a peer daemon or a light client wants a link.
        Returns the reply fields (where to attach, and with what secret).
        ``user``: the restricted user its session authenticated as (None:
        may do everything), whose permissions govern what the link carries."""
        if self.router is None:
            raise P.ProtocolViolation(
                "bad_request", "this broker accepts no links: start it with --tcp HOST:PORT"
            )
        kind = f.get("kind", "peer")
        if kind not in ("peer", "client"):
            raise P.ProtocolViolation(
                "bad_option", f"link kind must be peer or client, not {kind!r}"
            )
        node = f.get("node") or uuid.uuid4().hex
        if node == self.node:
            raise P.ProtocolViolation("bad_request", "a daemon cannot link to itself")
        transport = f.get("transport", "tcp")
        if transport == "ucx" and self.ucx_context is None:
            transport = "tcp"  # the dialer falls back: UCX needs both sides
        if transport == "ucx" and (
            not isinstance(f.get("ucx_address"), bytes) or not isinstance(f.get("ucx_tag"), int)
        ):
            raise P.ProtocolViolation("bad_request", "a ucx link needs ucx_address and ucx_tag")
        peer = None
        origin = f.get("origin") or None
        role = f.get("role", hubs.MESH) if kind == "peer" else None
        if kind == "peer":
            self._check_role(role, f.get("name") or node[:8])
            # Both daemons may list each other: the one with the smaller node
            # id keeps its own dialed link; the other's dialer stands by. A
            # new node of a known origin is that peer restarted: its Peer
            # goes on (broker/peer.py marks the gaps and starts afresh).
            # A member gossip named, still dialing, is the same party as its
            # link: matched by the url it advertises (its link name).
            advertised = f.get("name")
            for p in self.peers:
                if p.kind == "peer" and (
                    node in (p.node, p.node_hint)
                    or (origin and origin == p.origin)
                    or (advertised and p.url == advertised and p.node is None)
                ):
                    peer = p
            if peer is not None and peer.url is not None and peer.link is not None:
                if self.node < node:
                    raise P.ProtocolViolation(
                        "redundant_link", "redundant link: this daemon already dials you"
                    )
        if peer is None:
            peer = Peer(self, kind)
            peer.name = f.get("name") or node[:8]
            self.peers.append(peer)
        if peer.link is not None:
            peer.link_down("replaced by a new link")
        peer.user = user
        peer.origin = origin or peer.origin
        peer.role = role
        self.ids += 1
        link = Link(self, peer, self.ids, secrets.token_hex(16), transport, sock=self.router)
        link.chunk_bytes = MAX_CHUNK_BYTES  # the dialer's socket takes any size
        link.last_rx = time.monotonic()
        link.session = session_key
        link.pending = Remote(node, f.get("name") or node[:8], f.get("boot_id", ""))
        self.links[link.id] = link
        reply = {
            "link": link.id,
            "secret": link.secret,
            "endpoint": self.endpoint,
            "node": self.node,
            "origin": self.origin,
            "boot_id": self.boot_id,
            "transport": transport,
            "heartbeat_s": self.config.heartbeat_s,
            "max_chunk": MAX_CHUNK_BYTES,  # the body chunks this daemon takes (tcp)
            "role": self.role,
        }
        if transport == "tcp" and f.get("stream") is True and self.streams is not None:
            link.data = StreamData(self, link)  # the dialer connects to our stream port
            reply["stream_port"] = self.streams.port
        if transport == "ucx":
            from tensorbus.broker import bridge_ucx

            reply["ucx_address"] = bridge_ucx.worker_address()
            reply["ucx_tag"] = link.ucx_recv_tag = self.ucx_context.next_tag_base()
            link.ucx_peer_address = f["ucx_address"]
            link.ucx_send_tag = f["ucx_tag"]
        return reply

    def _check_role(self, role, dialer: str) -> None:
        """Refuse a daemon link whose roles do not join (broker/hubs.py),
        with a sentence both daemons log and show in their stats."""
        if role not in hubs.ROLES:
            reason = f"link role must be one of {', '.join(hubs.ROLES)}, not {str(role)[:40]!r}"
            self.refusals.add(dialer, reason)
            raise P.ProtocolViolation("bad_option", reason)
        reason = hubs.refusal(role, self.role, dialer, self.link_name)
        if reason is not None:
            self.refusals.add(dialer, reason)
            raise P.ProtocolViolation("link_refused", reason)

    def _on_router_message(self, sock) -> None:
        identity = sock.recv()
        link = self._by_identity(identity)
        if link is None:
            frames = []
            while sock.getsockopt(zmq.RCVMORE) and len(frames) < 2:
                frames.append(sock.recv())
            drain(sock)
            self._attach_link(identity, frames)
            return
        link.read(sock)

    def _by_identity(self, identity: bytes):
        link = self.by_identity.get(identity)
        return link if link is not None and link.up else None

    def _attach_link(self, identity: bytes, frames: list) -> None:
        """The first message of a new connection must attach it to a link
        opened on the control socket, with that link's secret."""
        try:
            if len(frames) != 2 or frames[0] != W.CONTROL:
                raise W.WireError("the first message on a link channel is attach")
            kind, f = W.decode_control(frames[1])
        except W.WireError:
            log.warning("link channel: a message from an unattached connection was dropped")
            return
        link = self.links.get(f.get("link")) if kind == "attach" else None
        if link is None or link.up or not secrets.compare_digest(link.secret, f.get("secret", "")):
            log.warning("link channel: attach with a wrong link id or secret refused")
            return
        link.identity = identity
        link.watch = self.router_watch
        self.by_identity[identity] = link
        self.go_up(link)

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
