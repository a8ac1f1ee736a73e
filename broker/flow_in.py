"""A peer's inbound flow: topics that arrive on its link are published into
local rings with the bridge's own publishers; what does not fit waits in a
per-topic backlog (so credit is returned only for what is in the ring), and
lost messages become gap markers that reliable subscribers raise GapError on.

A batch is published by the core in one call (``publish_batch``); Python
handles only what it stops at. Credit goes back when a topic's grant
reaches a quarter of its window, or CREDIT_DELAY_S after the first grant
waiting: a steady stream never waits for credit, and a lone message costs
no credit message of its own.
"""

from __future__ import annotations

import collections
import logging
from typing import NamedTuple

import msgpack
import numpy as np

from tensorbus._core import FLAG_GAP, BackpressureError, TensorbusError
from tensorbus._core import tensors as _tensors
from tensorbus._core.link_codec import BatchWriter, InState
from tensorbus.broker import peer_wire as W
from tensorbus.broker.batching import BATCH_BYTES
from tensorbus.broker.hubs import MAX_HOPS, MESH, arrived_flags, link_rules, update_echo
from tensorbus.broker.topics import INBOX_PREFIX

__all__ = ["CREDIT_DELAY_S", "InTopic", "Inbound", "Pending", "batch_writer"]

log = logging.getLogger("tensorbus.bridge")

# Credit is returned at once from a quarter of the window on, else after
# CREDIT_DELAY_S. The delay only bounds how stale the sender's count is,
# but each expiry wakes both daemons: at 2 ms, a link carrying a request
# every 100 µs woke them 500 times a second and slowed its round trips by
# a third (docs/bridge-performance.md).
CREDIT_EAGER_MSGS = W.INITIAL_WINDOW_MSGS // 4
CREDIT_EAGER_BYTES = W.INITIAL_WINDOW_BYTES // 4
CREDIT_DELAY_S = 0.01


def batch_writer(kind: str) -> BatchWriter:
    """The core's batch writer for a link to a ``kind`` party: what a peer
    daemon sends is marked bridged (never forwarded again); what a light
    client sends is forwarded like anything published here."""
    rules = link_rules(MESH, kind, MESH)
    return BatchWriter(rules.write_keep, rules.write_add, rules.hop_step, MAX_HOPS)


class Pending(NamedTuple):
    """A message waiting for ring space: its entry (None: a gap marker),
    its data, and whether the data is a loan of the bridge's publisher."""

    entry: W.Entry | None
    data: object
    loaned: bool


class InTopic(InState):
    """A topic that arrives on one peer's link, published into the local
    ring. Its id, publisher and backlog live in the core's InState, which
    the batch writer reads."""

    __slots__ = ("name", "qos")

    def __init__(self, tid: int, name: str, qos: str, pub):
        super().__init__(tid, pub, collections.deque())
        self.name = name
        self.qos = qos


class Inbound:
    """The inbound half of a :class:`~tensorbus.broker.peer.Peer` (a mixin:
    the state is the Peer's)."""

    def on_topic(self, f: dict) -> None:
        name = f["name"]
        old = self.in_topics.get(f["id"])
        if old is not None and old.name == name:
            return  # announced again (a re-attach): the same publisher serves
        if old is not None and old.pub is not None:
            old.pub.close()
        if (
            self.user is not None
            and isinstance(name, str)
            and not self.user.may_publish(name)
            and name not in self.told_inboxes  # replies to requests we sent it
        ):
            # Refused like a topic that cannot exist here: dropped, credited.
            self.refuse("publish on", name)
            self.in_topics[f["id"]] = InTopic(f["id"], name, "realtime", None)
            return
        try:
            topic = self.bridge.registry.bridge_topic(name, f)
            pub = self.bridge.ring(topic.ring.name).publisher(timeout=0)
        except (ValueError, TensorbusError) as exc:
            # This one topic cannot exist here: its messages are dropped
            # (and credited) rather than the whole link.
            log.warning("peer %s: topic %r refused: %s", self.name, name, exc)
            self.in_topics[f["id"]] = InTopic(f["id"], str(name), "realtime", None)
            return
        pub.inline_max = min(topic.slot_size, BATCH_BYTES)
        self.in_topics[f["id"]] = InTopic(f["id"], name, topic.qos, pub)
        update_echo(self, name)  # a hub sends none of it back to this leaf

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

    def batch_entries(self, frame, held_back: bool) -> list[W.Entry]:
        """A received batch: the core publishes what it can into the local
        rings in one call (unless a body ``held_back`` the entries before
        it); the entries it stopped at, decoded, are for ``deliver``."""
        at = 0 if held_back else self.writer.publish(frame, 0, self.in_topics)
        touched = self.writer.touched
        for t in touched:
            msgs, nbytes = t.fresh_msgs, t.fresh_bytes
            t.fresh_msgs = t.fresh_bytes = 0
            self.counters["received"] += msgs
            self.counters["received_bytes"] += nbytes
            self._count(t, msgs, nbytes)
        touched.clear()
        if self.writer.hops_dropped:
            self.counters["hops_dropped"] += self.writer.hops_dropped
            self.writer.hops_dropped = 0
        # Decoded from a copy: the entries may wait (behind a body, for
        # credit) longer than the transport keeps its buffer.
        return W.decode_batch(bytes(frame[at:])) if at < len(frame) else []

    def deliver(self, entry: W.Entry, body=None, loaned: bool = False) -> None:
        """Publish one arrived message into its local ring (or queue it
        behind the ones waiting for credit there). ``loaned``: ``body`` is
        a loan of this bridge's publisher, published with no copy."""
        t = self.in_topic(entry.topic)
        self.counters["received"] += 1
        self.counters["received_bytes"] += entry.nbytes
        item = Pending(entry, body if body is not None else entry.payload, loaned)
        if t.backlog:
            t.backlog.append(_kept(item))
            return
        left = self._publish(t, item)
        if left is not None:
            t.backlog.append(_kept(left) if left.entry is entry else left)
            self.backlogged.add(t.id)
            self.bridge.schedule_retry()

    def _publish(self, t: InTopic, item):
        """Publish ``item`` (entry, data, loaned) into its ring. None once
        published (or dropped for good); else the item to try again later
        (the ring is full), possibly now holding a loan with the data."""
        entry, data, loaned = item
        # The link's rules (broker/hubs.py), as the core's writer applies
        # them: from a daemon, marked bridged (and its hop counted); from a
        # light client, like anything published on this host.
        flags = 0
        w = self.writer
        if entry is not None:
            flags = arrived_flags(entry.flags, w.keep_flags, w.add_flags, w.hop_step, w.max_hops)
        try:
            if flags is None:  # past the cluster's diameter: it went round
                self.counters["hops_dropped"] += 1
            elif t.pub is None:  # a topic refused here: dropped, credited
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
                    item = Pending(entry, loan, True)  # if the ring is full, the copy waits
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
                item = self._publish(t, Pending(None, self._marker(t.name, 0, reason), False))
                if item is not None:
                    self._count(t, 1, entry.nbytes)
                    return item
        if entry is not None:
            self._count(t, 1, entry.nbytes)
        return None

    def _count(self, t: InTopic, msgs: int, nbytes: int) -> None:
        """``msgs`` messages of ``nbytes`` in all are in the ring (or dropped
        for good): counted, and their credit owed. A backlog lost with a link
        thus shows as a shortfall at resume, so as a gap."""
        self.received[t.name] = self.received.get(t.name, 0) + msgs
        grant = self.grants.setdefault(t.id, [0, 0])
        grant[0] += msgs
        grant[1] += nbytes

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

    def flush_grants(self, now: bool = False) -> None:
        """Return the credit of what reached the rings: at once if ``now``
        or a topic's grant is a quarter of its window, else soon."""
        grants = self.grants
        if not grants:
            return
        if not now and all(
            m < CREDIT_EAGER_MSGS and b < CREDIT_EAGER_BYTES for m, b in grants.values()
        ):
            if self.grant_timer is None:
                self.grant_timer = self.bridge.loop.call_later(
                    CREDIT_DELAY_S, self.flush_grants, True
                )
            return
        if self.grant_timer is not None:
            self.grant_timer.cancel()
            self.grant_timer = None
        if self.link is not None and self.link.up:
            grants = [[tid, m, b] for tid, (m, b) in grants.items()]
            self.link.send_control(W.encode_control("credit", grants=grants))
        self.grants.clear()

    def drop_grants(self) -> None:
        """A new link epoch: the last one's topic ids and credit are void."""
        if self.grant_timer is not None:
            self.grant_timer.cancel()
            self.grant_timer = None
        self.grants.clear()

    def mark_gaps(self, reason: str, names=None) -> None:
        """Tell the reliable subscribers of topics this peer fed (``names``,
        default all) that messages were lost: a gap marker in each ring,
        behind whatever of that topic still waits for ring space."""
        for name in list(self.received if names is None else names):
            count = self.received.pop(name, 0)
            topic = self.bridge.registry.topic(name)
            if topic is None or topic.qos != "reliable" or name.startswith(INBOX_PREFIX):
                continue  # a lost reply is a request its caller retries
            body = self._marker(name, count, reason)
            self.counters["gaps"] += 1
            waiting = next(
                (t for t in self.in_topics.values() if t.name == name and t.backlog), None
            )
            if waiting is not None:
                waiting.backlog.append(Pending(None, body, False))
                continue
            try:
                pub = self.bridge.ring(topic.ring.name).publisher(timeout=0)
            except TensorbusError as exc:
                log.warning("peer %s: no gap marker for %s: %s", self.name, name, exc)
                continue
            t = InTopic(-1, name, topic.qos, pub)
            left = self._publish(t, Pending(None, body, False))
            if left is None:
                pub.close()
            else:
                t.backlog.append(left)
                self.bridge.orphans.append(t)
                self.bridge.schedule_retry()


def _kept(item: Pending) -> Pending:
    """``item`` fit to wait in a backlog: an inline payload views the
    transport's frame, so it waits as a copy of its own."""
    if item.loaned or item.entry.payload is None:
        return item
    return Pending(item.entry, bytes(item.entry.payload), False)
