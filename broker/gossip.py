"""Seed discovery: daemons tell each other the members they know, as NATS
routes do, so a daemon that names any one member in ``--peer`` joins the
full mesh (docs/bridge.md, "A cluster from one seed").

* A member is a daemon with an up link of kind ``peer``: it said hello with
  the cluster's token (or CURVE key) and attached with its link's secret.
  Nothing else is ever gossiped: not a light client, not a daemon still
  dialing, not one whose link is down.
* A member is named by its advertised url, the ``tcp://HOST:PORT`` of its
  control socket: the url a dialer dialed, or the name an accepted daemon
  gave for itself. A daemon bound to a wildcard host advertises nothing
  (its peers cannot dial 0.0.0.0); it still links and learns.
* Every time a link to a member comes up, this daemon sends every member
  the list (a ``members`` control message on the link channel). A member
  learned from it that is not known yet is dialed, with the dialer's usual
  backoff; one that cannot be reached, or whose link stays down, for
  ``--link-grace`` is dropped. A learned member never holds up the others:
  each is dialed by a task of its own.
* Leaves (broker/hubs.py) are never members: a hub names only hubs, and a
  leaf neither gossips nor learns (it dials the hubs it lists itself).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from tensorbus.broker import hubs
from tensorbus.broker import peer_wire as W
from tensorbus.broker.dial import keep_dialing
from tensorbus.broker.peer import Peer

if TYPE_CHECKING:
    from tensorbus.broker.bridge import Bridge

__all__ = ["announce", "learn", "member_url", "members", "own_url"]

log = logging.getLogger("tensorbus.bridge")

_WILDCARDS = ("tcp://0.0.0.0:", "tcp://[::]:", "tcp://*:")


def advertisable(url: str | None) -> bool:
    """A tcp url another daemon can dial (not a wildcard host)."""
    return bool(url) and url.startswith("tcp://") and not url.startswith(_WILDCARDS)


def own_url(bridge: Bridge) -> str | None:
    """The url this daemon advertises, or None (no tcp, or a wildcard host)."""
    return bridge.link_name if advertisable(bridge.link_name) else None


def member_url(peer: Peer) -> str | None:
    """``peer``'s advertised url if it is a member now (an up daemon link)."""
    if peer.kind != "peer" or peer.state != "up" or peer.role == hubs.LEAF:
        return None
    url = peer.url or peer.name
    return url if advertisable(url) else None


def members(bridge: Bridge) -> list[str]:
    """Every member this daemon knows, itself included where it advertises."""
    urls = {url for url in map(member_url, bridge.peers) if url}
    own = own_url(bridge)
    if own:
        urls.add(own)
    return sorted(urls)


def announce(bridge: Bridge) -> None:
    """Send the member list on every up daemon link (a leaf's: none)."""
    if bridge.role == hubs.LEAF:
        return
    body = W.encode_control("members", urls=members(bridge))
    for peer in bridge.peers:
        if (
            peer.kind == "peer"
            and peer.role != hubs.LEAF
            and peer.link is not None
            and peer.link.up
        ):
            peer.link.send_control(body)


def learn(bridge: Bridge, urls: list[str], source: Peer) -> None:
    """Dial the members ``source`` named that this daemon does not know."""
    if source.kind != "peer" or source.role == hubs.LEAF or bridge.role == hubs.LEAF:
        return  # only members speak for the cluster; a leaf dials its hubs only
    own = own_url(bridge)
    known = {own}
    for peer in bridge.peers:
        known.add(peer.url)
        known.add(peer.name)
    for url in urls:
        if url in known or not advertisable(url):
            continue
        known.add(url)
        peer = Peer(bridge, "peer", url)
        peer.learned_from = source.name
        bridge.peers.append(peer)
        log.info(
            "member %s learned from %s: dialing it",
            url,
            source.name,
            extra={"event": "member_learned", "peer": url, "source": source.name},
        )
        peer.dialer = asyncio.get_running_loop().create_task(keep_dialing(bridge, peer, bridge.ctx))
