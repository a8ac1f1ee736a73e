"""A peer's outbound flow: which local topics it reads, the cursors the
bridge reads them with (one internal subscription per priority class),
batching, and per-topic credit (docs/bridge.md).

The receiver grants per-topic windows (messages and bytes,
INITIAL_WINDOW_* up front) and returns them as it commits into its ring. A
reliable topic at zero credit is taken out of the bridge's ring set, so its
cursor stalls and local publishers block on a full ring: a slow remote
subscriber slows the publisher and nothing is dropped. Realtime and latest
topics never stall: out of credit, the bridge keeps each topic's newest
message for when credit returns, and counts what it replaces.

Batching is opportunistic: what was taken is sent as soon as the ring sets are
empty, coalescing what queued meanwhile (up to BATCH_BYTES), so a lone
small message never waits for a timer. Priorities: control > params >
gradients by topic prefix, drained in that order while the link's bytes in
flight stay under INFLIGHT_BYTES.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import NamedTuple

import numpy as np

from tensorbus._core import RingSet, Subscriber, TensorbusError
from tensorbus._core.link_codec import CLAIMED, EMPTY, FULL, LOST, PARK, BatchReader, OutState
from tensorbus._core.ringset import spin_any
from tensorbus.broker import peer_wire as W
from tensorbus.broker.batching import BATCH_BYTES, MAX_BATCH_BYTES, batching_of
from tensorbus.broker.batching import DEFAULT as DEFAULT_BATCHING
from tensorbus.broker.bridge_view import drain_fifo
from tensorbus.broker.hubs import APP_FLAGS, MESH, echo_of, link_rules
from tensorbus.broker.link import INFLIGHT_BYTES
from tensorbus.broker.topics import (
    INBOX_PREFIX,
    TopicNameError,
    is_system,
    matches,
    validate_pattern,
)

__all__ = [
    "APP_FLAGS",
    "BATCH_BYTES",
    "PRIORITY_NAMES",
    "OutClass",
    "OutTopic",
    "Outbound",
    "batch_reader",
    "priority_of",
]

log = logging.getLogger("tensorbus.bridge")

PRIORITY_NAMES = ("control", "params", "gradients")
DEFAULT_PRIORITIES = (
    ("control/", 0),
    ("ctl/", 0),
    ("params/", 1),
    ("agg/", 1),
    ("grad/", 2),
)
DEFAULT_PRIORITY = 1
CHUNK_POLL_S = 0.0005  # how often body chunks in flight are looked at


def priority_of(name: str, table=DEFAULT_PRIORITIES) -> int:
    """0 (control), 1 (params) or 2 (gradients) for topic ``name``."""
    for prefix, level in table:
        if name.startswith(prefix):
            return level
    return DEFAULT_PRIORITY


class OutTopic(OutState):
    """A local topic forwarded on one peer's link. Its id, sequence
    (``sent``), credit and ``announced`` live in the core's OutState, where
    the batch reader updates them."""

    __slots__ = ("newest", "name", "qos", "prio", "sub", "parked")

    def __init__(
        self, name: str, tid: int, qos: str, prio: int, sub: Subscriber, batching=DEFAULT_BATCHING
    ):
        super().__init__(
            tid,
            qos == "reliable",
            W.INITIAL_WINDOW_MSGS,
            W.INITIAL_WINDOW_BYTES,
            batching.nbytes,
            batching.ns,
        )
        self.name = name
        self.qos = qos
        self.prio = prio
        self.sub = sub
        self.parked = False
        self.newest = None  # realtime out of credit: the newest message, sent on credit


def batch_reader(kind: str) -> BatchReader:
    """The core's batch reader for a link to a ``kind`` party: a peer daemon
    never gets back what came from another host (bridged messages, gap
    markers); a light client gets gap markers. A hub's links get their
    own masks at link up (broker/hubs.py)."""
    rules = link_rules(MESH, kind, MESH)
    return BatchReader(rules.read_keep, rules.read_skip, BATCH_BYTES)


class OutClass(NamedTuple):
    """One priority class of a peer's outbound topics: the bridge's
    subscription, the ring set its cursors are read through, its FIFO bell's fd."""

    sub: object  # registry.Subscription
    rings: RingSet
    fd: int


class Outbound:
    """The outbound half of a :class:`~tensorbus.broker.peer.Peer` (a mixin:
    the state is the Peer's)."""

    # -- interest and outbound cursors -----------------------------------

    def wants(self, name: str) -> bool:
        if name.startswith(INBOX_PREFIX):  # replies to requests it forwarded here
            return name in self.inboxes or (name in self.patterns and self._own_inbox(name))
        if is_system(name) or name in self.served_topics:
            return False  # requests reach a serving daemon through its group only
        if self.user is not None and not self.user.may_subscribe(name):
            return False  # a wildcard interest gets only the topics its user may read
        return any(matches(p, name) for p in self.patterns)

    def set_interest(self, add: list, remove: list, reset: bool = False) -> None:
        """The remote side's subscribers read ``add`` now and no longer
        ``remove``; ``reset``: ``add`` is the whole set (after a reconnect)."""
        valid = []
        for pattern in add:
            try:
                validate_pattern(pattern)
            except TopicNameError as exc:
                log.warning("peer %s: interest %r ignored: %s", self.name, pattern, exc)
                continue
            if (
                self.user is not None
                and not self.user.may_subscribe(pattern)
                and not self._own_inbox(pattern)
            ):
                self.refuse("subscribe to", pattern)
                continue
            valid.append(pattern)
        if reset:
            self.patterns = set(valid)
        else:
            self.patterns.update(valid)
            self.patterns.difference_update(remove)
        self._refresh_outbound()

    def _own_inbox(self, name: str) -> bool:
        """Whether ``name`` is this light client's own reply inbox."""
        link = self.link
        return (
            self.kind == "client"
            and link is not None
            and self.bridge.registry.owned_by(link.session, name)
        )

    def requests_changed(self, served: set[str] | None) -> None:
        """The request topics the peer serves (``served``; None: unchanged)
        or the reply inboxes made for it changed: what it reads changes."""
        if served is not None:
            self.served_topics = served
            for name in [n for n in self.forwarding if n not in served]:
                t = self.forwarding.pop(name)
                if self.out_by_id.get(t.id) is t:
                    del self.out_by_id[t.id]
        self._refresh_outbound()

    def _refresh_outbound(self) -> None:
        """Cursors for exactly the topics ``wants`` accepts now."""
        self.disarm()
        registry = self.bridge.registry
        reads = bool(self.patterns or self.inboxes)
        if reads and self.classes[0] is None:
            for prio in range(3):
                sub, bell = registry.open_subscription(
                    lambda name, p=prio: self.wants(name) and self.prio(name) == p,
                    self._attach,
                )
                rings = RingSet(
                    registry.bells, bell["index"], waiter=self.bridge.waiter, raise_gaps=False
                )
                fd = os.open(bell["fifo"], os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                self.classes[prio] = OutClass(sub, rings, fd)
                asyncio.get_running_loop().add_reader(fd, self._fifo_ready, fd)
        for name in [n for n in self.out if not self.wants(n)]:
            self._detach(name)
        if self.classes[0] is not None:
            for sub, _, _ in self.classes:
                registry.refresh_subscription(sub)
            if not reads:
                self.close_outbound()
        self.kick()

    def prio(self, name: str) -> int:
        return priority_of(name, self.bridge.priorities)

    def _attach(self, sub, topic, cursor: int, generation: int) -> None:
        """The broker gave this peer a cursor on ``topic`` (a match)."""
        self.disarm()
        ring = self.bridge.ring(topic.ring.name)
        core = Subscriber(ring, cursor=cursor, generation=generation)
        prio = self.prio(topic.name)
        tid = self.out_ids.setdefault(topic.name, len(self.out_ids) + 1)
        batching = batching_of(topic.name, self.bridge.batch_rules)
        t = OutTopic(topic.name, tid, topic.qos, prio, core, batching)
        t.echo_publisher = echo_of(self, topic.name)  # a leaf's own never go back
        self.out[topic.name] = self.out_by_id[tid] = t
        self.classes[prio].rings.add(topic.name, core)
        if self.link is not None and self.link.up:
            self._announce(t)
        self.kick()

    def _detach(self, name: str) -> None:
        t = self.out.pop(name)
        del self.out_by_id[t.id]
        if not t.parked:
            self.classes[t.prio].rings.remove(name)
        t.sub.close()
        self.bridge.registry.drop_cursor(self.classes[t.prio].sub, name)

    def close_outbound(self) -> None:
        """Free every outbound cursor and the class subscriptions; what
        each topic sent that the peer had not credited is kept in
        ``unacked`` (told to the peer's successor, broker/peer.py)."""
        self.disarm()
        for name, t in self.out.items():
            if t.credit_msgs < W.INITIAL_WINDOW_MSGS:
                self.unacked[name] = self.unacked.get(name, 0) + (
                    W.INITIAL_WINDOW_MSGS - t.credit_msgs
                )
        for name in list(self.out):
            self._detach(name)
        loop = asyncio.get_running_loop()
        for entry in self.classes:
            if entry is None:
                continue
            sub, rings, fd = entry
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
            os.close(fd)
            rings.close()
            self.bridge.registry.close_subscription(sub)
        self.classes = [None, None, None]

    def _announce(self, t: OutTopic) -> None:
        topic = self.bridge.registry.topic(t.name)
        if topic is None:
            return
        self.link.send_ordered(
            W.encode_control(
                "topic",
                id=t.id,
                name=t.name,
                qos=topic.qos,
                capacity=topic.capacity,
                slot_size=topic.slot_size,
            )
        )
        t.announced = True

    # -- the send pump -----------------------------------------------------

    def _fifo_ready(self, fd: int) -> None:
        drain_fifo(fd)
        self._pump()  # now: a kick would cost a turn of the loop per message

    def disarm(self) -> None:
        if self.armed:
            for entry in self.classes:
                if entry is not None:
                    entry.rings.disarm()
            self.armed = False

    def _pump(self) -> None:
        """Send what the rings hold: the core reads whole batches, Python
        sees only the messages it stops at (bodies, announcements, parking,
        realtime topics out of credit)."""
        self.disarm()
        link = self.link
        if link is None or not link.up or self.classes[0] is None:
            return
        budget = INFLIGHT_BYTES[link.transport]
        reader = self.reader
        while True:
            batch = bytearray()
            bodies: list = []
            budget_hit = False
            for name in list(self.kept):  # realtime messages kept for credit go first
                t = self.out.get(name)
                if t is None or t.newest is None:
                    self.kept.discard(name)
                elif t.credit_msgs > 0 and t.credit_bytes > 0:
                    self.kept.discard(name)
                    m, t.newest = t.newest, None
                    self._encode_one(m, batch, bodies)
            for prio in range(3):
                rings = self.classes[prio].rings
                while True:
                    if link.inflight() >= budget:
                        budget_hit = True
                        break
                    why = reader.take(rings, self.out, batch, MAX_BATCH_BYTES)
                    if why == EMPTY:
                        break
                    if why == FULL:
                        link.send_data(batch, bodies)
                        batch, bodies = bytearray(), []
                        continue
                    if why == PARK:
                        self._park(self.out.get(reader.stopped))
                        continue
                    # SLOW: the message the reader stopped at, through Python.
                    try:
                        msgs = rings.take(1)
                    except TensorbusError as exc:  # a cursor the broker took back
                        log.warning("peer %s: bridge read failed: %s", self.name, exc)
                        self.counters["bad"] += 1
                        msgs = []
                    if not msgs:
                        break
                    self._encode_one(msgs[0], batch, bodies)
                    if len(batch) >= BATCH_BYTES or bodies:
                        link.send_data(batch, bodies)
                        batch, bodies = bytearray(), []
                if budget_hit:
                    break
            if batch or bodies:
                link.send_data(batch, bodies)
            took = self._count_sent()
            if budget_hit or link.flush():
                # Chunks wait for the transport to drain: feed it shortly, and
                # pump again only once the budget has room.
                self.budget_hit = self.budget_hit or budget_hit
                self._watch_chunks()
            if budget_hit:
                return
            # A stream (this turn found more than one message): spin briefly
            # (a spare core only) rather than sleep and pay a wake-up for the
            # next message. A lone message is more likely a request, whose
            # answer is a round trip away: spinning for it only takes the
            # core the other parties need (measured: +60 µs per round trip).
            spin_us = self.bridge.spin_us
            if took > 1 and spin_us:
                ring_sets = [entry.rings for entry in self.classes]
                if spin_any(ring_sets, self.bridge.waiter, spin_us) > 0:
                    continue
            self.armed = True
            if all(entry.rings.arm() for entry in self.classes):
                return
            self.disarm()  # something arrived while arming: go again

    def _count_sent(self) -> int:
        """Fold what the core encoded since the last fold into the link's
        counters; how many messages that was."""
        reader = self.reader
        took = reader.msgs
        if took:
            self.counters["sent"] += took
            self.counters["sent_bytes"] += reader.nbytes
            reader.reset_counts()
        return took

    def _watch_chunks(self) -> None:
        if self.chunk_timer is None:
            self.chunk_timer = asyncio.get_running_loop().call_later(CHUNK_POLL_S, self._chunks_due)

    def _chunks_due(self) -> None:
        """Feed the transport what waits (ZeroMQ says nothing when it has sent
        a tracked chunk); pump once the in-flight budget has room again."""
        self.chunk_timer = None
        link = self.link
        if link is None or not link.up:
            return
        pending = link.flush()
        if self.budget_hit and link.inflight() < INFLIGHT_BYTES[link.transport]:
            self.budget_hit = False
            self.kick()
        elif pending:
            self._watch_chunks()

    def _park(self, t: OutTopic | None) -> None:
        """A reliable topic out of credit: its cursor stalls (backpressure
        upstream) until credit returns."""
        if t is not None and t.sub is not None and not t.parked:
            self.classes[t.prio].rings.remove(t.name)
            t.parked = True

    def _encode_one(self, m, batch: bytearray, bodies: list, t: OutTopic | None = None) -> None:
        try:
            self._encode(m, batch, bodies, t)
        except (ValueError, TypeError) as exc:  # one bad message, not the link
            log.warning("peer %s: message of %s not sent: %s", self.name, m.topic, exc)
            self.counters["bad"] += 1

    def _encode(self, m, batch: bytearray, bodies: list, t: OutTopic | None = None) -> None:
        t = t or self.out.get(m.topic)
        flags = m.flags
        reader = self.reader  # the link's rules (broker/hubs.py), as the core applies them
        if t is None or flags & reader.skip_flags or m.publisher == t.echo_publisher:
            return  # detached meanwhile, or not for this link (where it came from)
        nbytes = m.nbytes
        if t.qos != "reliable" and (t.credit_msgs <= 0 or t.credit_bytes <= 0):
            # Newest wins: keep this one for when credit returns; the one it
            # replaces is dropped and counted.
            if t.newest is not None:
                self.counters["dropped"] += 1
            t.newest = m
            self.kept.add(t.name)
            return
        # Encode first: a message that cannot be encoded costs no credit.
        seq = t.sent
        flags &= reader.keep_flags
        body = None
        if m.dtype is None:
            entry = W.encode_batch_entry(W.BYTES, flags, t.id, seq, nbytes)
            inline = m.data
        else:
            data = m.data
            raw = (
                data.cast("B") if isinstance(data, memoryview) else data.reshape(-1).view(np.uint8)
            )
            kind = W.TENSOR if nbytes <= BATCH_BYTES else W.BODY
            entry = W.encode_batch_entry(kind, flags, t.id, seq, nbytes, m.dtype, m.meta, m.shape)
            inline, body = (memoryview(raw), None) if kind == W.TENSOR else (None, raw)
        t.credit_msgs -= 1
        t.credit_bytes -= nbytes
        t.sent += 1
        self.counters["sent"] += 1
        self.counters["sent_bytes"] += nbytes
        if not t.announced:
            self._announce(t)
        batch += entry
        if inline is not None:
            batch += inline
        if body is not None:
            bodies.append(body)
        if t.qos == "reliable" and (t.credit_msgs <= 0 or t.credit_bytes <= 0):
            self._park(t)

    def on_credit(self, grants: list) -> None:
        self.disarm()
        for tid, msgs, nbytes in grants:  # validated by decode_control
            t = self.out_by_id.get(tid)
            if t is None:
                continue
            t.credit_msgs += msgs
            t.credit_bytes += nbytes
            if t.parked and t.credit_msgs > 0 and t.credit_bytes > 0:
                self.classes[t.prio].rings.add(t.name, t.sub)
                t.parked = False
        self.kick()
        if self.forwarding:
            self.bridge.groups.kick_all()  # requests may wait for this credit

    # -- requests for the queue groups the peer serves (broker/groups.py) ---

    def can_forward(self, topic: str) -> bool:
        """Whether a request of ``topic`` can go to the peer now."""
        if self.link is None or not self.link.up:
            return False
        t = self.forwarding.get(topic)
        return t is None or (t.credit_msgs > 0 and t.credit_bytes > 0)

    def forward_at(self, rings: RingSet, topic: str, position: int) -> bool:
        """Claim the request at ``position`` of a local queue group
        (``rings``, on ``topic``) and send it at once; False if a member
        here took it first. The core claims and encodes it in one call; a
        body in the arena, or the topic's first request (announced first),
        goes through Python."""
        t = self.forwarding.get(topic)
        if t is None:
            tid = self.out_ids.setdefault(topic, len(self.out_ids) + 1)
            t = OutTopic(topic, tid, "reliable", self.prio(topic), None)
            self.forwarding[topic] = self.out_by_id[tid] = t
        batch, bodies = bytearray(), []
        got = self.reader.claim_into(rings, position, t, batch)
        if got == LOST:
            return False
        if got == CLAIMED:
            self._count_sent()
        else:  # SLOW
            m = rings.claim_at(position)
            if m is None:
                return False
            self._encode_one(m, batch, bodies, t)
        if batch:
            self.link.send_data(batch, bodies)
        return True
