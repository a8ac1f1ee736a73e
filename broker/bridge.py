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
* Credit (hard detail 12): the receiver grants per-topic windows (messages
  and bytes, INITIAL_WINDOW_* up front) and returns them as it commits into
  its ring. A reliable topic at zero credit is taken out of the bridge's
  ring set, so its cursor stalls and local publishers block on a full ring: a
  slow remote subscriber slows the publisher and nothing is dropped.
  Realtime and latest topics never stall: out of credit, the bridge keeps
  each topic's newest message for when credit returns, and counts what it
  replaces.
* Batching is opportunistic: the bridge sends what it took as soon as its
  ring sets are empty, coalescing what queued meanwhile (up to BATCH_BYTES), so a
  lone small message never waits for a timer.
* Priorities: control > params > gradients by topic prefix. The bridge
  drains the classes in that order while the link's bytes in flight stay
  under INFLIGHT_BYTES.
* Liveness: heartbeats on the link channel; a link silent for three
  periods is down. The dialing side reconnects with backoff. Outbound
  cursors survive a link for ``link_grace_s`` (reliable publishers feel
  backpressure meanwhile); then they are freed, and reliable topics fed by
  the lost link get a gap marker so their subscribers raise GapError
  instead of silently missing messages.
* Loops: messages a bridge published carry FLAG_BRIDGED and are never
  forwarded to another daemon, so a full mesh carries each message once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import secrets
import time
import uuid

import msgpack
import numpy as np
import zmq

from tensorbus._core import (
    FLAG_BRIDGED,
    FLAG_GAP,
    BackpressureError,
    Ring,
    RingSet,
    Subscriber,
    TensorbusError,
    Waiter,
)
from tensorbus._core import tensors as _tensors
from tensorbus.broker import peer_wire as W
from tensorbus.broker import protocol as P
from tensorbus.broker.topics import TopicNameError, is_system, matches, validate_pattern

__all__ = ["Bridge", "PRIORITY_NAMES", "priority_of"]

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
BATCH_BYTES = 64 << 10  # inline entries up to this; a batch is sent at this size
# Beyond this much in flight on a link (and one message), lower classes
# wait. tcp: ZeroMQ's queue is first in, first out, so keep it short; UCX
# sends each message on its own, so it can hold several tensors.
INFLIGHT_BYTES = {"tcp": 8 << 20, "ucx": 256 << 20}
CHUNK_BYTES = 2 << 20  # tcp: bodies travel in chunks, so control never waits long
MAX_LINK_MESSAGE = CHUNK_BYTES + (2 << 20)  # a chunk, or a batch, or a control message
TAKE = 8  # messages taken from a ring set at a time
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 5.0
NOT_FORWARDED = ("_inbox/",)  # reply inboxes are private to their host
APP_FLAGS = 0x00FF  # the slot flags an application sets; ours never cross a link


def priority_of(name: str, table=DEFAULT_PRIORITIES) -> int:
    """0 (control), 1 (params) or 2 (gradients) for topic ``name``."""
    for prefix, level in table:
        if name.startswith(prefix):
            return level
    return DEFAULT_PRIORITY


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class OutTopic:
    """A local topic forwarded on one peer's link."""

    __slots__ = (
        "newest",
        "name",
        "id",
        "qos",
        "prio",
        "sub",
        "credit_msgs",
        "credit_bytes",
        "parked",
        "sent",
        "announced",
    )

    def __init__(self, name: str, tid: int, qos: str, prio: int, sub: Subscriber):
        self.name = name
        self.id = tid
        self.qos = qos
        self.prio = prio
        self.sub = sub
        self.credit_msgs = W.INITIAL_WINDOW_MSGS
        self.credit_bytes = W.INITIAL_WINDOW_BYTES
        self.parked = False
        self.sent = 0  # sequence of the next message on this link epoch
        self.announced = False
        self.newest = None  # realtime out of credit: the newest message, sent on credit


class InTopic:
    """A topic that arrives on one peer's link, published into the local ring."""

    __slots__ = ("id", "name", "qos", "pub", "backlog")

    def __init__(self, tid: int, name: str, qos: str, pub):
        self.id = tid
        self.name = name
        self.qos = qos
        self.pub = pub
        self.backlog: collections.deque = collections.deque()


class Peer:
    """One remote party: another daemon (``kind="peer"``) or a light client
    (``kind="client"``). Outlives its links: outbound cursors and what was
    received per topic survive a reconnect to the same instance."""

    def __init__(self, bridge: Bridge, kind: str, url: str | None = None):
        self.bridge = bridge
        self.kind = kind
        self.url = url  # dialed peers: where to dial
        self.node: str | None = None  # the remote daemon's node id
        self.node_hint: str | None = None  # dialed peers: its node id from hello
        self.name = url or "?"
        self.boot_id = ""
        self.state = "connecting"
        self.link: Link | None = None
        self.since = time.monotonic()
        self.patterns: set[str] = set()  # the remote side's interest
        self.sent_interest: set[str] = set()
        self.out: dict[str, OutTopic] = {}
        self.out_ids: dict[str, int] = {}  # topic -> its id on links to this peer, kept
        self.classes: list = [None, None, None]  # per priority: (Subscription, RingSet, fd)
        self.in_topics: dict[int, InTopic] = {}
        self.received: dict[str, int] = {}  # topic -> messages received from this instance
        self.grants: dict[int, list] = {}
        self.kick_pending = False
        self.armed = False
        self.kept: set[str] = set()  # realtime topics holding a message for credit
        self.backlogged: set[int] = set()
        self.grace_handle: asyncio.TimerHandle | None = None
        self.counters = collections.Counter()
        self.dialer: asyncio.Task | None = None

    # -- interest and outbound cursors -----------------------------------

    def wants(self, name: str) -> bool:
        if is_system(name) or name.startswith(NOT_FORWARDED):
            return False
        return any(matches(p, name) for p in self.patterns)

    def set_interest(self, add: list, remove: list, reset: bool = False) -> None:
        """The remote side's subscribers read ``add`` now and no longer
        ``remove``; ``reset``: ``add`` is the whole set (after a reconnect)."""
        valid = []
        for pattern in add:
            try:
                valid.append(validate_pattern(pattern))
            except TopicNameError as exc:
                log.warning("peer %s: interest %r ignored: %s", self.name, pattern, exc)
        if reset:
            self.patterns = set(valid)
        else:
            self.patterns.update(valid)
            self.patterns.difference_update(remove)
        self.disarm()
        broker = self.bridge.broker
        if self.patterns and self.classes[0] is None:
            for prio in range(3):
                sub, bell = broker.open_bridge_subscription(
                    self,
                    lambda name, p=prio: self.wants(name) and self.prio(name) == p,
                    self._attach,
                )
                rings = RingSet(
                    broker.bells, bell["index"], waiter=self.bridge.waiter, raise_gaps=False
                )
                fd = os.open(bell["fifo"], os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                self.classes[prio] = (sub, rings, fd)
                asyncio.get_running_loop().add_reader(fd, self._fifo_ready, fd)
        for name in [n for n in self.out if not self.wants(n)]:
            self._detach(name)
        if self.classes[0] is not None:
            for sub, _, _ in self.classes:
                broker.refresh_bridge_subscription(sub)
            if not self.patterns:
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
        t = OutTopic(topic.name, tid, topic.qos, prio, core)
        self.out[topic.name] = t
        self.classes[prio][1].add(topic.name, core)
        if self.link is not None and self.link.up:
            self._announce(t)
        self.kick()

    def _detach(self, name: str) -> None:
        t = self.out.pop(name)
        if not t.parked:
            self.classes[t.prio][1].remove(name)
        t.sub.close()
        self.bridge.broker.drop_bridge_cursor(self.classes[t.prio][0], name)

    def close_outbound(self) -> None:
        """Free every outbound cursor and the class subscriptions."""
        self.disarm()
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
            self.bridge.broker.close_bridge_subscription(sub)
        self.classes = [None, None, None]

    def _announce(self, t: OutTopic) -> None:
        topic = self.bridge.broker.topics.get(t.name)
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
        with contextlib.suppress(BlockingIOError):
            while os.read(fd, 4096):
                pass
        self.kick()

    def disarm(self) -> None:
        if self.armed:
            for entry in self.classes:
                if entry is not None:
                    entry[1].disarm()
            self.armed = False

    def kick(self) -> None:
        """Pump soon (once, however many events ask)."""
        if not self.kick_pending:
            self.kick_pending = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        self.kick_pending = False
        self.disarm()
        link = self.link
        if link is None or not link.up or self.classes[0] is None:
            return
        budget = INFLIGHT_BYTES[link.transport]
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
                rings = self.classes[prio][1]
                while True:
                    if link.inflight() >= budget:
                        budget_hit = True
                        break
                    try:
                        msgs = rings.take(TAKE)
                    except TensorbusError as exc:  # a cursor the broker took back
                        log.warning("peer %s: bridge read failed: %s", self.name, exc)
                        self.counters["bad"] += 1
                        msgs = []
                    if not msgs:
                        break
                    for m in msgs:
                        self._encode_one(m, batch, bodies)
                        if len(batch) >= BATCH_BYTES or bodies:
                            link.send_data(batch, bodies)
                            batch, bodies = bytearray(), []
                if budget_hit:
                    break
            if batch or bodies:
                link.send_data(batch, bodies)
            if budget_hit or link.flush():
                # Chunks wait for the transport to drain: look again shortly.
                asyncio.get_running_loop().call_later(0.0005, self.kick)
            if budget_hit:
                return
            self.armed = True
            if all(entry[1].arm() for entry in self.classes):
                return
            self.disarm()  # something arrived while arming: go again

    def _encode_one(self, m, batch: bytearray, bodies: list) -> None:
        try:
            self._encode(m, batch, bodies)
        except (ValueError, TypeError) as exc:  # one bad message, not the link
            log.warning("peer %s: message of %s not sent: %s", self.name, m.topic, exc)
            self.counters["bad"] += 1

    def _encode(self, m, batch: bytearray, bodies: list) -> None:
        t = self.out.get(m.topic)
        flags = m.flags
        if t is None or (self.kind == "peer" and flags & (FLAG_BRIDGED | FLAG_GAP)):
            return  # detached meanwhile, or it came from another host
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
        flags &= APP_FLAGS if self.kind == "peer" else APP_FLAGS | FLAG_GAP
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
        if t.qos == "reliable" and (t.credit_msgs <= 0 or t.credit_bytes <= 0) and not t.parked:
            self.classes[t.prio][1].remove(t.name)  # its cursor stalls: backpressure upstream
            t.parked = True

    def on_credit(self, grants: list) -> None:
        by_id = {t.id: t for t in self.out.values()}
        self.disarm()
        for tid, msgs, nbytes in grants:  # validated by decode_control
            t = by_id.get(tid)
            if t is None:
                continue
            t.credit_msgs += msgs
            t.credit_bytes += nbytes
            if t.parked and t.credit_msgs > 0 and t.credit_bytes > 0:
                self.classes[t.prio][1].add(t.name, t.sub)
                t.parked = False
        self.kick()

    # -- receiving ---------------------------------------------------------

    def on_topic(self, f: dict) -> None:
        name = f["name"]
        old = self.in_topics.get(f["id"])
        if old is not None and old.name == name:
            return  # announced again (a re-attach): the same publisher serves
        if old is not None and old.pub is not None:
            old.pub.close()
        try:
            topic = self.bridge.broker.bridge_topic(name, f)
            pub = self.bridge.ring(topic.ring.name).publisher(timeout=0)
        except (ValueError, TensorbusError) as exc:
            # This one topic cannot exist here: its messages are dropped
            # (and credited) rather than the whole link.
            log.warning("peer %s: topic %r refused: %s", self.name, name, exc)
            self.in_topics[f["id"]] = InTopic(f["id"], str(name), "realtime", None)
            return
        pub.inline_max = min(topic.slot_size, BATCH_BYTES)
        self.in_topics[f["id"]] = InTopic(f["id"], name, topic.qos, pub)

    def in_topic(self, tid: int) -> InTopic:
        t = self.in_topics.get(tid)
        if t is None:
            raise W.WireError(f"data for topic id {tid} before its announcement")
        return t

    def loan_for(self, entry: W.Entry):
        """Where a body lands: a loan in the local arena, or None (then the
        transport keeps it and the backlog copies it in later)."""
        t = self.in_topic(entry.topic)
        if entry.nbytes > self.bridge.max_body:
            raise W.WireError(f"a body of {entry.nbytes} bytes is larger than this daemon's arena")
        if t.backlog or t.pub is None:
            return None
        try:
            return t.pub.loan((entry.nbytes,), "uint8", timeout=0)
        except (BackpressureError, TensorbusError):
            return None

    def deliver(self, entry: W.Entry, body=None, loaned: bool = False) -> None:
        """Publish one arrived message into its local ring (or queue it
        behind the ones waiting for credit there). ``loaned``: ``body`` is
        a loan of this bridge's publisher, published with no copy."""
        t = self.in_topic(entry.topic)
        self.counters["received"] += 1
        self.counters["received_bytes"] += entry.nbytes
        item = (entry, body if body is not None else entry.payload, loaned)
        if t.backlog:
            if entry.payload is not None:  # it views the transport's frame: keep a copy
                item = (entry, bytes(entry.payload), False)
            t.backlog.append(item)
            return
        left = self._publish(t, item)
        if left is not None:
            if left[0] is entry and not left[2] and entry.payload is not None:
                # It views the transport's frame: keep a copy while it waits.
                left = (entry, bytes(entry.payload), False)
            t.backlog.append(left)
            self.backlogged.add(t.id)
            self.bridge.schedule_retry()

    def _publish(self, t: InTopic, item):
        """Publish ``item`` (entry, data, loaned) into its ring. None once
        published (or dropped for good); else the item to try again later
        (the ring is full), possibly now holding a loan with the data."""
        entry, data, loaned = item
        # From another daemon: never forwarded again. From a light client:
        # forwarded like anything published on this host. Only the
        # application's flag bits are taken from the wire.
        flags = 0
        if entry is not None:
            flags = entry.flags & APP_FLAGS
            if self.kind == "peer":
                flags |= FLAG_BRIDGED
        try:
            if t.pub is None:  # a topic refused here: dropped, credited
                self.counters["dropped"] += 1
            elif entry is None:  # a gap marker
                t.pub.send(data, flags=FLAG_GAP)
                return None
            elif entry.kind == W.BYTES:
                t.pub.send(data, flags=flags)
            else:
                itemsize = _tensors.numpy_dtype(entry.dtype).itemsize
                if not loaned and entry.nbytes > t.pub.inline_max:
                    loan = t.pub.loan((entry.nbytes,), "uint8", timeout=0)
                    loan[:] = np.frombuffer(data, np.uint8, entry.nbytes)
                    item = (entry, loan, True)  # if the ring is full, the copy waits
                    data, loaned = loan, True
                buf = data if loaned else np.frombuffer(data, np.uint8, entry.nbytes)
                arr = buf.view(f"V{itemsize}").reshape(entry.shape) if entry.nbytes else buf
                t.pub.send_described(arr, entry.dtype, meta=entry.meta, flags=flags)
        except BackpressureError:
            if t.qos != "reliable":
                self.counters["dropped"] += 1  # realtime: a full arena is a drop, counted
            else:
                return item
        except (TensorbusError, ValueError, TypeError) as exc:
            log.warning("peer %s: message for %s dropped: %s", self.name, t.name, exc)
            self.counters["bad"] += 1
            if entry is not None and t.qos == "reliable" and t.pub is not None:
                # Reliable subscribers hear of it where it was: a gap marker
                # in its place (kept for later if the ring is full).
                self.counters["gaps"] += 1
                reason = f"a message could not be published here ({exc})"
                item = self._publish(t, (None, self._marker(t.name, 0, reason), False))
                if item is not None:
                    self._count(t, entry)
                    return item
        if entry is not None:
            self._count(t, entry)
        return None

    def _count(self, t: InTopic, entry: W.Entry) -> None:
        """``entry`` is in the ring (or dropped for good): counted, and its
        credit owed. A backlog lost with a link thus shows as a shortfall at
        resume, so as a gap."""
        self.received[t.name] = self.received.get(t.name, 0) + 1
        grant = self.grants.setdefault(t.id, [0, 0])
        grant[0] += 1
        grant[1] += entry.nbytes

    def _marker(self, name: str, received: int, reason: str) -> bytes:
        """A gap marker's body (clients raise GapError with it)."""
        return msgpack.packb(
            {"topic": name, "peer": self.name, "received": received, "reason": reason}
        )

    def retry_backlog(self) -> bool:
        """Publish what waited; True while something still waits."""
        for tid in list(self.backlogged):
            t = self.in_topics.get(tid)
            if t is None:
                self.backlogged.discard(tid)
                continue
            while t.backlog:
                left = self._publish(t, t.backlog[0])
                if left is not None:
                    t.backlog[0] = left
                    break
                t.backlog.popleft()
            if not t.backlog:
                self.backlogged.discard(tid)
        self.flush_grants()
        return bool(self.backlogged)

    def flush_grants(self) -> None:
        if self.grants and self.link is not None and self.link.up:
            grants = [[tid, m, b] for tid, (m, b) in self.grants.items()]
            self.link.send_control(W.encode_control("credit", grants=grants))
        self.grants.clear()

    def mark_gaps(self, reason: str, names=None) -> None:
        """Tell the reliable subscribers of topics this peer fed (``names``,
        default all) that messages were lost: a gap marker in each ring,
        behind whatever of that topic still waits for ring space."""
        for name in list(self.received if names is None else names):
            count = self.received.pop(name, 0)
            topic = self.bridge.broker.topics.get(name)
            if topic is None or topic.qos != "reliable":
                continue
            body = self._marker(name, count, reason)
            self.counters["gaps"] += 1
            waiting = next(
                (t for t in self.in_topics.values() if t.name == name and t.backlog), None
            )
            if waiting is not None:
                waiting.backlog.append((None, body, False))
                continue
            try:
                pub = self.bridge.ring(topic.ring.name).publisher(timeout=0)
            except TensorbusError as exc:
                log.warning("peer %s: no gap marker for %s: %s", self.name, name, exc)
                continue
            t = InTopic(-1, name, topic.qos, pub)
            left = self._publish(t, (None, body, False))
            if left is None:
                pub.close()
            else:
                t.backlog.append(left)
                self.bridge.orphans.append(t)
                self.bridge.schedule_retry()

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
            log.info("peer %s restarted (new node id): starting afresh", name)
            self.mark_gaps(f"peer {name} restarted; messages it held are lost")
            self.close_outbound()
            self.patterns.clear()
        self.node, self.name, self.boot_id = node, name, boot
        self.link = link
        self.state = "up"
        self.since = time.monotonic()
        for t in self.in_topics.values():  # the last link's ids; a lost backlog
            markers = [item for item in t.backlog if item[0] is None]  # shows as a
            if markers:  # shortfall in the peer's resume; gap markers still go out
                t.backlog = collections.deque(markers)
                self.bridge.orphans.append(t)
                self.bridge.schedule_retry()
            elif t.pub is not None:
                t.pub.close()
        self.in_topics.clear()
        self.backlogged.clear()
        self.sent_interest = None  # the next interest message is the whole set
        if self.counters["links"]:
            self.counters["reconnects"] += 1
        self.counters["links"] += 1
        # A fresh epoch: credit and sequences start again, topics are
        # re-announced, and the peer hears what we sent on the last link
        # (first, in order with the data).
        resume = {}
        self.disarm()
        for t in self.out.values():
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
        log.info("link to %s %s is up (%s)", self.kind, name, link.transport)
        self.kick()

    def on_resume(self, sent: dict) -> None:
        """What the peer sent of each topic on the last link. Less arrived
        here (lost in flight, or waiting for ring space when the link
        broke), or a topic it no longer lists (its cursor was freed while
        the link was down): a gap."""
        lost = {}
        for name, got in list(self.received.items()):
            count = sent.get(name)
            if count is None:
                lost[name] = "messages published while the link was down were not forwarded"
            elif count > got:
                lost[name] = f"{count - got} message(s) lost with a broken link"
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
        log.warning("link to %s %s is down: %s", self.kind, self.name, reason)
        if self.kind == "client":
            self.close()
            return
        grace = self.bridge.config.link_grace_s
        self.grace_handle = asyncio.get_running_loop().call_later(grace, self._grace_over, reason)

    def _grace_over(self, reason: str) -> None:
        self.grace_handle = None
        if self.link is not None:
            return
        log.warning(
            "peer %s stayed down for %.1f s: its cursors are freed",
            self.name,
            self.bridge.config.link_grace_s,
        )
        self.close_outbound()  # first: local publishers must not stay blocked
        self.patterns.clear()
        self.mark_gaps(f"link to peer {self.name} lost ({reason})")
        if self.url is None:  # it dialed us: it will open a new link if it returns
            self.bridge.forget(self)

    def close(self) -> None:
        if self.grace_handle is not None:
            self.grace_handle.cancel()
        if self.link is not None:
            self.link.close()
            self.link = None
        self.close_outbound()
        for t in self.in_topics.values():
            if t.pub is not None:
                with contextlib.suppress(Exception):
                    t.pub.close()
        self.in_topics.clear()
        self.state = "closed"
        self.bridge.forget(self)

    def stats(self) -> dict:
        return {
            "kind": self.kind,
            "peer": self.name,
            "node": self.node,
            "state": self.state,
            "transport": self.link.transport if self.link is not None else None,
            "for_s": round(time.monotonic() - self.since, 3),
            "interest": sorted(self.patterns),
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
                    "received",
                    "received_bytes",
                    "dropped",
                    "gaps",
                    "reconnects",
                    "bad",
                )
            },
        }


class Link:
    """One link channel: the ZeroMQ connection (and, for UCX, the endpoint)
    of one epoch of a peer. ``send_control``/``send_data`` never block."""

    def __init__(
        self,
        bridge: Bridge,
        peer: Peer,
        link_id: int,
        secret: str,
        transport: str,
        sock=None,
        identity: bytes | None = None,
    ):
        self.bridge = bridge
        self.peer = peer
        self.id = link_id
        self.secret = secret
        self.transport = transport
        self.sock = sock  # dialing side: our DEALER; accepting side: the link ROUTER
        self.identity = identity
        self.up = False
        self.last_rx = time.monotonic()
        self.trackers: collections.deque = collections.deque()  # (tracker, nbytes)
        self.chunks: collections.deque = collections.deque()  # body chunks not yet sent
        self.queued = 0  # bytes of chunks ZeroMQ holds
        # Receiving: entries of batches in order; a body blocks those after it
        # until its chunks have all arrived. [entry, dest, loaned, offset]
        self.expect: collections.deque = collections.deque()
        self.ucx = None  # a UcxData when the data goes over UCX
        self.ucx_peer_address: bytes | None = None
        self.ucx_send_tag = 0  # the tag base the peer receives our bodies on
        self.ucx_recv_tag = 0  # the tag base we receive its bodies on
        self.async_sock = None  # dialing side: the socket object that owns our DEALER
        self.watch: Watch | None = None  # what reads self.sock (the ROUTER's for accepted links)
        self.session = None  # accepting side: the control session that opened it
        self.pending: tuple = ("", "", "")  # (node, name, boot id) until attached
        self.remote_id = link_id  # dialed links: the id the peer gave, for attach
        self.closed = False

    def down(self, reason: str) -> None:
        """Report this link failed (soon, outside the caller's frame)."""
        if not self.closed:
            self.bridge.loop.call_soon(self.peer.link_down, reason, self)

    def send_ordered(self, body: bytes) -> None:
        """A control message that must stay in order with the data (a topic
        announcement, a resume): over UCX it goes with the data."""
        if self.ucx is not None:
            self.ucx.send_control(body)
        else:
            self.send_control(body)

    def _frames(self, frames: list) -> list:
        return frames if self.identity is None else [self.identity, *frames]

    def send_control(self, body: bytes) -> None:
        try:
            self.sock.send_multipart(self._frames([W.CONTROL, body]), zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.down(f"send failed: {exc}")
        if self.watch is not None:
            self.watch.poke()

    def send_data(self, batch: bytearray, bodies: list) -> None:
        """Send a batch now; its bodies follow in CHUNK-sized messages, fed
        to ZeroMQ only while less than INFLIGHT_BYTES is queued there, so a
        heartbeat, a credit or a control topic never waits behind a whole
        large tensor (ZeroMQ's queue and TCP are first in, first out)."""
        if self.ucx is not None:
            self.ucx.send(bytes(batch), bodies)
            return
        try:
            tracker = self.sock.send_multipart(
                self._frames([W.DATA, bytes(batch)]), zmq.NOBLOCK, copy=False, track=True
            )
        except zmq.ZMQError as exc:
            self.down(f"send failed: {exc}")
            if self.watch is not None:
                self.watch.poke()  # a failed send may have taken a waiting message's edge
            return
        self.trackers.append((tracker, len(batch)))  # batches count against the budget too
        self.queued += len(batch)
        if self.watch is not None:
            self.watch.poke()
        for body in bodies:
            view = memoryview(body).cast("B")
            for at in range(0, len(view), CHUNK_BYTES):
                self.chunks.append(view[at : at + CHUNK_BYTES])
        self.flush()

    def flush(self) -> bool:
        """Feed queued body chunks to ZeroMQ; True while any are left or in flight."""
        while self.trackers and self.trackers[0][0].done:
            self.queued -= self.trackers.popleft()[1]
        while self.chunks and self.queued < INFLIGHT_BYTES["tcp"] and self.sock is not None:
            chunk = self.chunks.popleft()
            try:
                tracker = self.sock.send_multipart(
                    self._frames([W.BODY_CHUNK, chunk]), zmq.NOBLOCK, copy=False, track=True
                )
            except zmq.ZMQError as exc:
                self.down(f"send failed: {exc}")
                if self.watch is not None:
                    self.watch.poke()  # a failed send may have taken a waiting message's edge
                return False
            self.trackers.append((tracker, len(chunk)))
            self.queued += len(chunk)
            if self.watch is not None:
                self.watch.poke()
        return bool(self.chunks or self.trackers)

    def inflight(self) -> int:
        """Bytes handed to the transport and not yet sent, and waiting to be."""
        if self.ucx is not None:
            return self.ucx.inflight
        self.flush()
        return self.queued + sum(len(c) for c in self.chunks)

    def close(self) -> None:
        self.closed = True
        self.up = False
        if self.ucx is not None:
            self.ucx.close()
            self.ucx = None
        if self.async_sock is not None:  # our own DEALER: stop reading it, close it
            if self.watch is not None:
                self.watch.close()
            self.async_sock.close(0)  # the shadow in self.sock goes with it
            self.async_sock = None
        self.watch = None
        self.sock = None
        self.bridge.links.pop(self.id, None)
        if self.identity is not None and self.bridge.by_identity.get(self.identity) is self:
            del self.bridge.by_identity[self.identity]


class Watch:
    """Reads a ZeroMQ socket from the event loop without zmq.asyncio.

    ZeroMQ's FD is edge-triggered, and any operation on the socket (a send
    included) may consume the edge of a message that is waiting. So the
    reader drains while ``EVENTS`` says POLLIN, and every send on the
    socket schedules another look (``poke``): no message waits for an
    unrelated wake-up. zmq.asyncio's poll added hundreds of microseconds
    per hop here."""

    BURST = 64  # messages per turn of the loop, so one busy link cannot starve the rest

    def __init__(self, loop, sock, handle):
        self.loop = loop
        self.sock = sock
        self.handle = handle  # handle(sock): read one whole message
        self.fd = sock.getsockopt(zmq.FD)
        self.scheduled = False
        self.closed = False
        loop.add_reader(self.fd, self.drain)

    def poke(self) -> None:
        if not self.scheduled and not self.closed:
            self.scheduled = True
            self.loop.call_soon(self.drain)

    def drain(self) -> None:
        self.scheduled = False
        sock = self.sock
        for _ in range(self.BURST):
            if self.closed:
                return
            try:
                if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    return
                self.handle(sock)
            except zmq.ZMQError:
                return  # closed under us: its link is down
            except Exception:  # a peer's bytes never take the daemon down
                log.exception("link message failed")
        self.poke()  # more waiting: after the rest of the loop has had a turn

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.fd)


class Bridge:
    """Every link of one daemon: the link ROUTER that accepts them, the
    dialers of configured peers, and the shared ring mappings."""

    def __init__(self, broker, config):
        self.broker = broker
        self.config = config
        self.node = uuid.uuid4().hex
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
        self.waiter = Waiter(0, yield_us=0)
        self.priorities = DEFAULT_PRIORITIES
        self.retry_pending = False
        self.orphans: list[InTopic] = []  # gap markers waiting for ring space
        self.tasks: list[asyncio.Task] = []
        self.router_watch: Watch | None = None
        self.transport = config.transport
        self.ucx_context = None
        self.max_body = 0  # the largest body a link may announce: our arena's size

    # -- start and stop ----------------------------------------------------

    async def start(self, ctx, host: str | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.max_body = self.broker.arena.size
        slot = self.broker.take_holder()
        self.holder = self.broker.arena.holder(slot, 1 << 20) if slot else None
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
            self.broker.secure_server(sock)
            port = self.config.link_port
            bind_host = f"[{host}]" if ":" in host else host
            if port:
                sock.bind(f"tcp://{bind_host}:{port}")
            else:
                sock.bind_to_random_port(f"tcp://{bind_host}")
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self.router = zmq.Socket.shadow(sock.underlying)
            self.router_watch = Watch(self.loop, self.router, self._on_router_message)
        links_possible = host is not None or bool(self.config.peers)
        if self.transport in ("ucx", "auto") and links_possible:
            from tensorbus.broker import bridge_ucx

            self.ucx_context = await bridge_ucx.start(self.transport == "ucx")
            self.transport = "tcp" if self.ucx_context is None else "ucx"
        self.tasks.append(asyncio.create_task(self._heartbeats()))
        for url in self.config.peers:
            peer = Peer(self, "peer", url)
            self.peers.append(peer)
            peer.dialer = asyncio.create_task(self._dial(peer, ctx))

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
        if self.router_watch is not None:
            self.router_watch.close()
        if self.router_async is not None:
            self.router_async.close(0)
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
                bells=self.broker.bells,
                waiter=self.waiter,
                arena=self.broker.arena,
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
        if peer in self.peers and peer.url is None:
            self.peers.remove(peer)
            if peer.kind == "client" and peer.patterns:
                self.interest_changed()  # its patterns leave this host's interest

    # -- interest ----------------------------------------------------------

    def local_patterns(self) -> set[str]:
        patterns = set(self.broker.local_patterns())
        for peer in self.peers:
            if peer.kind == "client":
                patterns |= peer.patterns
        return patterns

    def interest_changed(self) -> None:
        for peer in self.peers:
            if peer.kind == "peer" and peer.link is not None and peer.link.up:
                self.send_interest(peer)

    def send_interest(self, peer: Peer) -> None:
        """Tell ``peer`` what this host's subscribers read now: the whole
        set on a fresh link, then what changed."""
        now = self.local_patterns()
        if peer.sent_interest is None:
            body = W.encode_control("interest", add=sorted(now), remove=[], reset=True)
        else:
            add, remove = now - peer.sent_interest, peer.sent_interest - now
            if not add and not remove:
                return
            body = W.encode_control("interest", add=sorted(add), remove=sorted(remove))
        peer.link.send_control(body)
        peer.sent_interest = now

    # -- backlog -----------------------------------------------------------

    def schedule_retry(self) -> None:
        if not self.retry_pending:
            self.retry_pending = True
            self.loop.call_later(0.001, self._retry)

    def _retry(self) -> None:
        self.retry_pending = False
        waiting = False
        for peer in self.peers:
            if peer.backlogged:
                waiting |= peer.retry_backlog()
        for t in list(self.orphans):  # gap markers of a topic no link feeds now
            try:
                while t.backlog:
                    t.pub.send(t.backlog[0][1], flags=FLAG_GAP)
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

    def open_link(self, f: dict, session_key) -> dict:
        """The ``link`` op: a peer daemon or a light client wants a link.
        Returns the reply fields (where to attach, and with what secret)."""
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
        if kind == "peer":
            # Both daemons may list each other: the one with the smaller node
            # id keeps its own dialed link; the other's dialer stands by.
            for p in self.peers:
                if p.kind == "peer" and node in (p.node, p.node_hint):
                    peer = p
            if peer is not None and peer.url is not None and peer.link is not None:
                if self.node < node:
                    raise P.ProtocolViolation(
                        "topic_conflict", "redundant link: this daemon already dials you"
                    )
        if peer is None:
            peer = Peer(self, kind)
            peer.name = f.get("name") or node[:8]
            self.peers.append(peer)
        if peer.link is not None:
            peer.link_down("replaced by a new link")
        self.ids += 1
        link = Link(self, peer, self.ids, secrets.token_hex(16), transport, sock=self.router)
        link.last_rx = time.monotonic()
        link.session = session_key
        link.pending = (node, f.get("name") or node[:8], f.get("boot_id", ""))
        self.links[link.id] = link
        reply = {
            "link": link.id,
            "secret": link.secret,
            "endpoint": self.endpoint,
            "node": self.node,
            "boot_id": self.boot_id,
            "transport": transport,
            "heartbeat_s": self.config.heartbeat_s,
        }
        if transport == "ucx":
            from tensorbus.broker import bridge_ucx

            reply["ucx_address"] = bridge_ucx.worker_address(self.ucx_context)
            reply["ucx_tag"] = link.ucx_recv_tag = self.ucx_context.next_tag_base()
            link.ucx_peer_address = f["ucx_address"]
            link.ucx_send_tag = f["ucx_tag"]
        return reply

    def _on_router_message(self, sock) -> None:
        identity = sock.recv()
        link = self._by_identity(identity)
        if link is None:
            frames = []
            while sock.getsockopt(zmq.RCVMORE) and len(frames) < 2:
                frames.append(sock.recv())
            self._drain(sock)
            self._attach_link(identity, frames)
            return
        self.on_frames(link, sock)

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
        self._go_up(link)

    def _go_up(self, link: Link) -> None:
        link.up = True
        link.last_rx = time.monotonic()
        node, name, boot = link.pending
        if link.transport == "ucx":
            from tensorbus.broker import bridge_ucx

            link.ucx = bridge_ucx.UcxData(
                self,
                link,
                link.ucx_peer_address,
                send_tag=link.ucx_send_tag,
                recv_tag=link.ucx_recv_tag,
                same_host=boot == self.boot_id,
            )
        link.peer.link_up(link, node, name, boot)

    # -- frames on any link channel -----------------------------------------

    def on_frames(self, link: Link, sock) -> None:
        """Read the rest of one message (its first frame is next) and act."""
        link.last_rx = time.monotonic()
        kind = sock.recv()
        more = sock.getsockopt(zmq.RCVMORE)
        try:
            if not more:
                raise W.WireError("a link message without a body")
            if kind == W.CONTROL:
                body = sock.recv()
                self._drain(sock)
                self.on_control(link, body)
            elif kind == W.DATA:
                batch = sock.recv(copy=False)
                self._drain(sock)
                for entry in W.decode_batch(batch.buffer):
                    link.expect.append([entry, None, False, 0])
                self._advance(link)
            elif kind == W.BODY_CHUNK:
                self._on_chunk(link, sock)
                self._drain(sock)
                self._advance(link)
            else:
                self._drain(sock)
                raise W.WireError(f"unknown link frame kind {bytes(kind)[:8]!r}")
        except Exception as exc:  # a peer's bytes never take the daemon down
            self._drain(sock)
            if not isinstance(exc, W.WireError):
                log.exception("link %s: handling a message failed", link.peer.name)
            log.warning("link %s: %s; closing it", link.peer.name, exc)
            link.peer.counters["bad"] += 1
            link.down(f"protocol error: {exc}")

    @staticmethod
    def _drain(sock) -> None:
        while sock.getsockopt(zmq.RCVMORE):
            sock.recv(copy=False)

    def _advance(self, link: Link) -> None:
        """Deliver the expected entries that are complete, in order; give
        the body at the head a place to land (a loan in our arena)."""
        peer = link.peer
        expect = link.expect
        while expect:
            head = expect[0]
            entry = head[0]
            if entry.kind != W.BODY:
                expect.popleft()
                peer.deliver(entry)
                continue
            if head[1] is None:
                dest = peer.loan_for(entry)
                head[2] = dest is not None
                head[1] = dest if dest is not None else np.empty(entry.nbytes, np.uint8)
            if head[3] < entry.nbytes:
                break  # chunks still to come
            expect.popleft()
            peer.deliver(entry, head[1], loaned=head[2])
        peer.flush_grants()

    def _on_chunk(self, link: Link, sock) -> None:
        """The next chunk of the body at the head: straight into its place."""
        if not link.expect or link.expect[0][0].kind != W.BODY:
            raise W.WireError("a body chunk nobody expects")
        head = link.expect[0]
        entry, dest, offset = head[0], head[1], head[3]
        if dest is None:
            self._advance(link)
            dest = head[1]
        got = sock.recv_into(memoryview(dest)[offset:])
        if got > entry.nbytes - offset:
            raise W.WireError(f"a body chunk runs past its body of {entry.nbytes} bytes")
        head[3] = offset + got

    def on_control(self, link: Link, body: bytes) -> None:
        kind, f = W.decode_control(body)
        peer = link.peer
        if kind == "credit":
            peer.on_credit(f["grants"])
        elif kind == "topic":
            peer.on_topic(f)
        elif kind == "interest":
            peer.set_interest(f["add"], f["remove"], bool(f.get("reset")))
            if peer.kind == "client":
                self.interest_changed()
        elif kind == "resume":
            peer.on_resume(f["sent"])
        elif kind == "bye":
            self.loop.call_soon(peer.link_down, "the peer said bye")
        # "hb" and "attach" (a repeat) need nothing beyond last_rx.

    # -- dialing -------------------------------------------------------------

    async def _dial(self, peer: Peer, ctx) -> None:
        """Keep a link to a configured peer: connect, link, watch; on loss,
        back off and try again."""
        delay = BACKOFF_MIN_S
        while True:
            if peer.link is not None:  # the peer dialed us: that link serves
                await asyncio.sleep(self.config.heartbeat_s / 4)
                continue
            try:
                await self._connect(peer, ctx)
                delay = BACKOFF_MIN_S
                while peer.link is not None:
                    await asyncio.sleep(self.config.heartbeat_s / 4)
            except asyncio.CancelledError:
                raise
            except _Redundant:
                await asyncio.sleep(self.config.heartbeat_s)
                continue
            except Exception as exc:
                peer.counters["dial_failures"] += 1
                if peer.state != "down" or peer.counters["dial_failures"] % 20 == 1:
                    log.info("cannot link to peer %s: %s", peer.url, exc)
                if peer.state == "connecting" and peer.counters["links"]:
                    peer.state = "down"
            # Jitter: two daemons that lost each other do not redial in step.
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _connect(self, peer: Peer, ctx) -> None:
        control = ctx.socket(zmq.DEALER)
        control.setsockopt(zmq.LINGER, 0)
        self.broker.secure_client(control)
        control.connect(peer.url)
        timeout = max(1.0, 2 * self.config.heartbeat_s)
        try:
            hello = await _ask(
                control,
                "hello",
                timeout,
                name=f"bridge-{self.node[:8]}",
                pid=os.getpid(),
                protocol=P.PROTOCOL_VERSION,
                token=self.config.token,
            )
            fields = dict(
                kind="peer",
                node=self.node,
                boot_id=self.boot_id,
                name=self.broker.link_name(),
                transport=self.transport,
            )
            if self.transport == "ucx":
                from tensorbus.broker import bridge_ucx

                fields["ucx_address"] = bridge_ucx.worker_address(self.ucx_context)
                fields["ucx_tag"] = recv_tag = self.ucx_context.next_tag_base()
            peer.node_hint = hello.get("node")
            reply = await _ask(control, "link", timeout, **fields)
            with contextlib.suppress(Exception):
                await _ask(control, "bye", 0.5)
        finally:
            control.close(0)
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        self.broker.secure_client(sock)
        sock.connect(_on_host_of(reply["endpoint"], peer.url))
        sync = zmq.Socket.shadow(sock.underlying)
        self.ids += 1
        link = Link(self, peer, self.ids, reply["secret"], reply["transport"], sock=sync)
        link.remote_id = reply["link"]
        link.pending = (reply["node"], peer.url, reply.get("boot_id", ""))
        if link.transport == "ucx":
            link.ucx_peer_address = reply["ucx_address"]
            link.ucx_send_tag = reply["ucx_tag"]
            link.ucx_recv_tag = recv_tag
        link.async_sock = sock
        self.links[link.id] = link
        link.send_control(W.encode_control("attach", link=link.remote_id, secret=link.secret))
        link.watch = Watch(self.loop, sync, lambda sock, link=link: self.on_frames(link, sock))
        self._go_up(link)

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
                alive = self.broker.session_alive(link.session)
            else:
                alive = now - link.last_rx <= 3 * period
            if not alive:
                peer.link_down(f"no heartbeat for {now - link.last_rx:.1f} s", link)
                continue
            if peer.kind == "peer":
                link.send_control(hb)
            for entry in peer.classes:
                if entry is not None:
                    entry[1].check_stalls()  # a dead publisher's claim: repair

    def stats(self) -> list[dict]:
        return [peer.stats() for peer in self.peers]


class _Redundant(Exception):
    pass


def _on_host_of(endpoint: str, url: str) -> str:
    """``endpoint``'s port on the host of ``url``: a daemon bound to a
    wildcard (0.0.0.0) announces it as such, which is no address to dial."""
    port = endpoint.rsplit(":", 1)[1]
    host = url.split("://", 1)[1].rsplit(":", 1)[0]
    return f"tcp://{host}:{port}"


async def _ask(sock, op: str, timeout: float, **fields) -> dict:
    """One request on a control DEALER (asyncio), its reply's fields."""
    sock.send(P.encode_request(op, 1, **fields))
    if not await sock.poll(int(timeout * 1000)):
        raise TimeoutError(f"no answer to {op!r} within {timeout:g} s")
    reply = P.decode_reply(await sock.recv())
    if not reply.ok:
        if reply.code == "topic_conflict" and "redundant" in (reply.error or ""):
            raise _Redundant(reply.error)
        raise ConnectionRefusedError(f"{reply.code}: {reply.error}")
    return reply.fields
