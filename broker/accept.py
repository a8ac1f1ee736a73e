"""Accepting links: the link ROUTER a daemon binds for the peer daemons
and light clients that dial it, the ``link`` op that opens a link, and a
new connection's attach to it. A mixin of broker/bridge.py's Bridge (the
state is the Bridge's); dialing is broker/dial.py.

Design notes (docs/bridge.md, "Opening a link"):

* A link is opened on the control socket (the ``link`` op, authenticated
  like any session), which answers with a link id and a secret; the
  dialer's first message on the link channel must attach with both, or it
  is dropped. So a stranger on the link port can make the daemon buffer
  only a bounded number of bounded messages, and never a link.
* Roles (hub, leaf, mesh) are checked at open: a pair that cannot join is
  refused with a sentence both daemons log.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid

import zmq

from tensorbus.broker import hubs
from tensorbus.broker import peer_wire as W
from tensorbus.broker import protocol as P
from tensorbus.broker.bridge_stream import StreamData, StreamListener
from tensorbus.broker.curve import secure_server
from tensorbus.broker.link import MAX_CHUNK_BYTES, MAX_LINK_MESSAGE, Link, Remote, Watch, drain
from tensorbus.broker.peer import Peer

__all__ = ["Acceptor"]

log = logging.getLogger("tensorbus.bridge")


class Acceptor:
    """The accepting half of :class:`~tensorbus.broker.bridge.Bridge` (a
    mixin: the state is the Bridge's)."""

    def _bind_router(self, ctx, host: str) -> None:
        """Bind the link ROUTER on ``host`` (and the data streams' port)."""
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
