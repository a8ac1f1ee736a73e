"""Dialing a configured peer: keep a link to it, with jittered backoff.

The dialer says hello on the peer's control socket with the cluster's
token, asks for a ``link`` (docs/bridge.md), then attaches the link channel
the reply names with its secret. A ``redundant_link`` refusal means the
peer's own dialed link serves both: wait and look again, do not count a
failure. A ``link_refused`` refusal (the two daemons' roles do not join,
broker/hubs.py) is a failure like any other, shown as the link's
``refused`` in stats: a fix on the other side heals it at the next try.

A leaf (``--leaf-of``) keeps one hub link at a time (``keep_leaf_link``):
the first listed hub that answers; on loss, the next one, round-robin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from typing import TYPE_CHECKING

import zmq

from tensorbus.broker import hubs
from tensorbus.broker import peer_wire as W
from tensorbus.broker import protocol as P
from tensorbus.broker.bridge_stream import StreamData
from tensorbus.broker.curve import secure_client
from tensorbus.broker.link import CHUNK_BYTES, MAX_CHUNK_BYTES, Link, Remote, Watch
from tensorbus.broker.peer import Peer

if TYPE_CHECKING:
    from tensorbus.broker.bridge import Bridge

__all__ = [
    "BACKOFF_MAX_S",
    "BACKOFF_MIN_S",
    "LinkRefused",
    "connect",
    "keep_dialing",
    "keep_leaf_link",
]

log = logging.getLogger("tensorbus.bridge")

BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 5.0


async def keep_dialing(bridge: Bridge, peer: Peer, ctx) -> None:
    """Keep a link to a configured peer: connect, link, watch; on loss,
    back off and try again."""
    delay = BACKOFF_MIN_S
    while True:
        if peer.link is not None:  # the peer dialed us: that link serves
            await asyncio.sleep(bridge.config.heartbeat_s / 4)
            continue
        try:
            await connect(bridge, peer, ctx)
            delay = BACKOFF_MIN_S
            while peer.link is not None:
                await asyncio.sleep(bridge.config.heartbeat_s / 4)
        except asyncio.CancelledError:
            raise
        except _Redundant:
            await asyncio.sleep(bridge.config.heartbeat_s)
            continue
        except Exception as exc:
            if _failed(bridge, peer, exc):
                return
        # Jitter: two daemons that lost each other do not redial in step.
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(delay * 2, BACKOFF_MAX_S)


async def keep_leaf_link(bridge: Bridge, hubs_listed: list[Peer], ctx) -> None:
    """A leaf's one hub link: dial the listed hubs in turn until one
    links; while it is up, wait; once it is lost (three silent heartbeats),
    dial the next one. Backoff grows after each round that linked nowhere.
    One link at a time is what keeps a leaf from getting a message twice."""
    delay = BACKOFF_MIN_S
    turn = 0
    while True:
        peer = hubs_listed[turn % len(hubs_listed)]
        turn += 1
        try:
            await connect(bridge, peer, ctx)
            delay = BACKOFF_MIN_S
            for old in hubs_listed:  # the last hub's cursors would only hold publishers back
                if old is not peer:
                    old.give_up(f"the leaf failed over to hub {peer.url}")
            while peer.link is not None:
                await asyncio.sleep(bridge.config.heartbeat_s / 4)
            log.warning(
                "leaf: link to hub %s lost; dialing the next listed hub",
                peer.url,
                extra={"event": "leaf_failover", "peer": peer.url},
            )
            continue  # at once: the next hub is likely up
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _failed(bridge, peer, exc)
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        if turn % len(hubs_listed) == 0:
            delay = min(delay * 2, BACKOFF_MAX_S)


def _failed(bridge: Bridge, peer: Peer, exc: Exception) -> bool:
    """Count and log one failed dial; True: ``peer`` is dropped (a
    learned member unreachable for the grace)."""
    peer.counters["dial_failures"] += 1
    if isinstance(exc, LinkRefused):
        if peer.refused != str(exc):  # each new sentence once, not every retry
            log.warning(
                "link to %s refused: %s",
                peer.url,
                exc,
                extra={"event": "link_refused", "peer": peer.url, "reason": str(exc)},
            )
        peer.refused = str(exc)
    if peer.learned_from is not None and time.monotonic() - peer.since > bridge.config.link_grace_s:
        log.warning(
            "member %s (learned from %s) unreachable for %.1f s: dropped (%s)",
            peer.url,
            peer.learned_from,
            bridge.config.link_grace_s,
            exc,
            extra={"event": "member_dropped", "peer": peer.url, "reason": str(exc)},
        )
        bridge.forget(peer)
        return True
    if peer.state != "down" or peer.counters["dial_failures"] % 20 == 1:
        log.info("cannot link to peer %s: %s", peer.url, exc)
    if peer.state == "connecting" and peer.counters["links"]:
        peer.state = "down"
    return False


async def connect(bridge: Bridge, peer: Peer, ctx) -> None:
    """One attempt: hello and ``link`` on the peer's control socket, then
    attach the link channel it names and bring the link up."""
    control = ctx.socket(zmq.DEALER)
    control.setsockopt(zmq.LINGER, 0)
    secure_client(control, bridge.config.curve_secret)
    control.connect(peer.url)
    timeout = max(1.0, 2 * bridge.config.heartbeat_s)
    try:
        hello = await _ask(
            control,
            "hello",
            timeout,
            name=f"bridge-{bridge.node[:8]}",
            pid=os.getpid(),
            protocol=P.PROTOCOL_VERSION,
            token=bridge.config.token,
        )
        fields = dict(
            kind="peer",
            node=bridge.node,
            origin=bridge.origin,
            boot_id=bridge.boot_id,
            name=bridge.link_name,
            transport=bridge.transport,
            role=bridge.role,
        )
        if bridge.transport == "tcp" and not bridge.config.curve_secret:
            fields["stream"] = True  # data on a plain TCP stream (broker/bridge_stream.py)
        if bridge.transport == "ucx":
            from tensorbus.broker import bridge_ucx

            fields["ucx_address"] = bridge_ucx.worker_address()
            fields["ucx_tag"] = recv_tag = bridge.ucx_context.next_tag_base()
        peer.node_hint = hello.get("node")
        reply = await _ask(control, "link", timeout, **fields)
        # An acceptor of an older release says no role: a mesh daemon.
        role = reply.get("role", hubs.MESH)
        reason = (
            hubs.refusal(bridge.role, role, bridge.link_name, peer.url)
            if role in hubs.ROLES
            else f"{peer.url} answered with an unknown link role {str(role)[:40]!r}"
        )
        if reason is not None:
            raise LinkRefused(reason)
        peer.role = role
        with contextlib.suppress(Exception):
            await _ask(control, "bye", 0.5)
    finally:
        control.close(0)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    secure_client(sock, bridge.config.curve_secret)
    sock.connect(_on_host_of(reply["endpoint"], peer.url))
    sync = zmq.Socket.shadow(sock.underlying)
    bridge.ids += 1
    link = Link(bridge, peer, bridge.ids, reply["secret"], reply["transport"], sock=sync)
    link.remote_id = reply["link"]
    link.chunk_bytes = chunk_bytes_of(reply)
    peer.origin = reply.get("origin") or peer.origin
    link.pending = Remote(reply["node"], peer.url, reply.get("boot_id", ""))
    if link.transport == "ucx":
        link.ucx_peer_address = reply["ucx_address"]
        link.ucx_send_tag = reply["ucx_tag"]
        link.ucx_recv_tag = recv_tag
    link.async_sock = sock
    bridge.links[link.id] = link
    link.send_control(W.encode_control("attach", link=link.remote_id, secret=link.secret))
    port = reply.get("stream_port")
    if link.transport == "tcp" and type(port) is int and 0 < port < 65536:
        # From here on everything goes on the stream (attach was the link channel's).
        link.data = StreamData(bridge, link)
        link.data.dial(_host_of(peer.url).strip("[]"), port, link.remote_id, link.secret)
    link.watch = Watch(bridge.loop, sync, link.read)
    bridge.go_up(link)


def chunk_bytes_of(reply: dict) -> int:
    """The body chunk to send an acceptor: what its link reply says it
    takes (an older release says nothing: CHUNK_BYTES), at most ours."""
    take = reply.get("max_chunk")
    if type(take) is not int or take < CHUNK_BYTES:
        return CHUNK_BYTES
    return min(take, MAX_CHUNK_BYTES)


class _Redundant(Exception):
    pass


class LinkRefused(Exception):
    """The other daemon refused the link (or we refuse its role): the
    sentence says why; the dialer retries with backoff."""


def _on_host_of(endpoint: str, url: str) -> str:
    """``endpoint``'s port on the host of ``url``: a daemon bound to a
    wildcard (0.0.0.0) announces it as such, which is no address to dial."""
    port = endpoint.rsplit(":", 1)[1]
    return f"tcp://{_host_of(url)}:{port}"


def _host_of(url: str) -> str:
    """The host of ``tcp://HOST:PORT`` as written (an IPv6 one in brackets)."""
    return url.split("://", 1)[1].rsplit(":", 1)[0]


async def _ask(sock, op: str, timeout: float, **fields) -> dict:
    """One request on a control DEALER (asyncio), its reply's fields."""
    sock.send(P.encode_request(op, 1, **fields))
    if not await sock.poll(int(timeout * 1000)):
        raise TimeoutError(f"no answer to {op!r} within {timeout:g} s")
    reply = P.decode_reply(await sock.recv())
    if not reply.ok:
        if reply.code == "redundant_link":
            raise _Redundant(reply.error)
        if reply.code == "link_refused":
            raise LinkRefused(reply.error)
        raise ConnectionRefusedError(f"{reply.code}: {reply.error}")
    return reply.fields
