"""Hubs and leaves (docs/bridge.md, "Hubs and leaves"): the rules that let a
cluster grow past a full mesh, as NATS's routes and leaf nodes do.

* A daemon's *role* is ``hub`` (``--hub``: links to every other hub and to
  its leaves), ``leaf`` (``--leaf-of``: one link at a time, to one of its
  listed hubs) or ``mesh`` (neither: today's full mesh).
* Links join only ``leaf -> hub``, ``hub <-> hub`` and ``mesh <-> mesh``;
  anything else is refused at link time with a sentence (``refusal``).
* Interest: a hub tells a leaf its own patterns and every other link's; it
  tells a hub its own and its leaves' (split horizon: hubs are a full
  mesh). A leaf and a mesh daemon tell their own (``interest_for``).
* Messages cross each link at most once and never go back: per link, the
  core's batch reader skips by slot flags and by an *echo publisher* (the
  bridge's own publisher of what that leaf sent), and the batch writer
  marks what arrives (BRIDGED, FROM_HUB, the hop count). ``link_rules`` is
  the table; the Python fallback path applies the same masks.
* A message that arrives past ``MAX_HOPS`` links is dropped and counted:
  a bug or a misconfiguration cannot make it go round.

Everything here is a pure function of roles and flags, but for the few
helpers that apply them to a Peer.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import TYPE_CHECKING, NamedTuple

from tensorbus._core import FLAG_BRIDGED, FLAG_FROM_HUB, FLAG_GAP, FLAG_HOPS, HOPS_SHIFT

if TYPE_CHECKING:
    from tensorbus.broker.bridge import Bridge
    from tensorbus.broker.peer import Peer

__all__ = [
    "APP_FLAGS",
    "HUB",
    "LEAF",
    "MAX_HOPS",
    "MESH",
    "ROLES",
    "LinkRules",
    "Refusals",
    "apply_rules",
    "arrived_flags",
    "echo_of",
    "interest_for",
    "link_rules",
    "refusal",
    "role_of",
    "update_echo",
]

log = logging.getLogger("tensorbus.bridge")

HUB, LEAF, MESH = "hub", "leaf", "mesh"
ROLES = (HUB, LEAF, MESH)
APP_FLAGS = 0x00FF  # the slot flags an application sets
# The longest path a message takes: leaf, hub, hub, leaf. One that arrives
# having crossed more links went round: dropped and counted.
MAX_HOPS = 3
# How many refused links the acceptor keeps for `tensorbus stats`.
RECENT_REFUSALS = 16

# Which dialer role may link to which acceptor role.
_JOINS = {(LEAF, HUB), (HUB, HUB), (MESH, MESH)}


def role_of(config) -> str:
    """This daemon's role from its configuration."""
    if getattr(config, "hub", False):
        return HUB
    return LEAF if getattr(config, "leaf_of", None) else MESH


def refusal(dialer_role: str, acceptor_role: str, dialer: str, acceptor: str) -> str | None:
    """Why a daemon of ``dialer_role`` may not link to one of
    ``acceptor_role`` (None: it may). The sentence names both and says
    what to change; both daemons log it and show it in their stats."""
    if (dialer_role, acceptor_role) in _JOINS:
        return None
    if acceptor_role == LEAF:
        return (
            f"{acceptor} is a leaf: a leaf accepts no daemon links, it dials its hubs "
            f"itself (refused {dialer_role} {dialer}; name it in no --peer or --leaf-of)"
        )
    if dialer_role == LEAF:
        return (
            f"{acceptor} is not a hub (it is a {acceptor_role} daemon): leaf {dialer}'s "
            f"--leaf-of must name daemons started with --hub"
        )
    return (
        f"{dialer_role} {dialer} and {acceptor_role} {acceptor} disagree on membership: "
        f"hubs link only to hubs and their leaves, mesh daemons only to mesh daemons "
        f"(start every --peer of a hub with --hub, or none of them)"
    )


class LinkRules(NamedTuple):
    """What crosses one link, in the core codec's terms."""

    read_keep: int  # slot flags that go on the wire
    read_skip: int  # messages with any of these never go
    echo: bool  # skip what this party itself sent (its inbound publisher's messages)
    write_keep: int  # wire flags taken into the local slot
    write_add: int  # flags every arrived message gets
    hop_step: int  # 1: a link between daemons counts a hop; 0: a light client's


def link_rules(own_role: str, kind: str, peer_role: str | None) -> LinkRules:
    """The rules of a link from a daemon of ``own_role`` to a party of
    ``kind`` (``peer`` or ``client``) and ``peer_role``."""
    if kind != "peer":  # a light client: its messages are local publishes
        return LinkRules(APP_FLAGS | FLAG_GAP, 0, False, APP_FLAGS, 0, 0)
    wire = APP_FLAGS | FLAG_HOPS
    if own_role == HUB and peer_role == LEAF:
        # Everything but its own messages: local, other leaves', hubs', gaps.
        return LinkRules(wire | FLAG_GAP, 0, True, wire, FLAG_BRIDGED, 1)
    if own_role == HUB:  # to another hub: never what a hub sent (split horizon)
        return LinkRules(wire | FLAG_GAP, FLAG_FROM_HUB, False, wire | FLAG_GAP,
                         FLAG_BRIDGED | FLAG_FROM_HUB, 1)  # fmt: skip
    if own_role == LEAF:  # to its hub: its own messages; from it, relayed gaps too
        return LinkRules(wire, FLAG_BRIDGED | FLAG_GAP, False, wire | FLAG_GAP,
                         FLAG_BRIDGED | FLAG_FROM_HUB, 1)  # fmt: skip
    # A full mesh: each daemon sends only what was published on it.
    return LinkRules(wire, FLAG_BRIDGED | FLAG_GAP, False, wire, FLAG_BRIDGED, 1)


def apply_rules(peer: Peer) -> None:
    """Set ``peer``'s batch reader and writer to its link's rules (on each
    link up: the remote role is known only then)."""
    rules = link_rules(peer.bridge.role, peer.kind, peer.role)
    reader, writer = peer.reader, peer.writer
    reader.keep_flags, reader.skip_flags = rules.read_keep, rules.read_skip
    writer.keep_flags, writer.add_flags = rules.write_keep, rules.write_add
    writer.hop_step, writer.max_hops = rules.hop_step, MAX_HOPS
    peer.echo = rules.echo
    for name, t in peer.out.items():
        t.echo_publisher = echo_of(peer, name)


def arrived_flags(wire_flags: int, keep: int, add: int, hop_step: int, max_hops: int) -> int | None:
    """The slot flags of a message that arrived with ``wire_flags`` (the
    batch writer's rule, for the Python path); None: it crossed more than
    ``max_hops`` links, drop it."""
    hops = ((wire_flags & FLAG_HOPS) >> HOPS_SHIFT) + hop_step if hop_step else 0
    if hops > max_hops:
        return None
    return (wire_flags & keep & ~FLAG_HOPS) | add | ((hops << HOPS_SHIFT) & FLAG_HOPS)


def hops_of(flags: int) -> int:
    """The links a message crossed, from its slot or wire flags."""
    return (flags & FLAG_HOPS) >> HOPS_SHIFT


# -- echo: what a leaf sent never goes back to it --------------------------


def echo_of(peer: Peer, name: str) -> int:
    """The publisher record index of what ``peer`` sent into topic
    ``name``'s ring here (-1: none, or this link sends everything back)."""
    if not getattr(peer, "echo", False):
        return -1
    for t in peer.in_topics.values():
        if t.name == name and t.pub is not None:
            return t.pub.index
    return peer.last_echo.get(name, -1)


def update_echo(peer: Peer, name: str) -> None:
    """``peer`` has a new inbound publisher on ``name``: its outbound
    cursor on that topic skips that publisher's messages from now on."""
    index = echo_of(peer, name)
    if index >= 0:
        peer.last_echo[name] = index  # kept across links: a flap sends nothing back
    t = peer.out.get(name)
    if t is not None:
        t.echo_publisher = index


# -- interest --------------------------------------------------------------


def interest_for(bridge: Bridge, peer: Peer) -> set[str]:
    """The patterns this daemon tells ``peer``: its own subscribers' (and
    light clients'); a hub adds its leaves' for a hub, and every other
    link's for a leaf."""
    patterns = bridge.local_patterns()
    if bridge.role != HUB:
        return patterns
    for other in bridge.peers:
        if other is peer or other.kind != "peer":
            continue
        if peer.role == LEAF or other.role == LEAF:
            patterns |= other.patterns
    return patterns


# -- refusals --------------------------------------------------------------


class Refusals:
    """The links this daemon refused lately (for ``tensorbus stats``)."""

    def __init__(self) -> None:
        self.recent: collections.deque = collections.deque(maxlen=RECENT_REFUSALS)
        self.count = 0

    def add(self, peer: str, reason: str) -> None:
        self.count += 1
        log.warning(
            "link from %s refused: %s",
            peer,
            reason,
            extra={"event": "link_refused", "peer": peer, "reason": reason},
        )
        self.recent.append({"peer": peer, "reason": reason, "at": time.time()})

    def stats(self) -> list[dict]:
        return list(self.recent)
