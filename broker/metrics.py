"""``tensorbus serve --metrics HOST:PORT``: Prometheus metrics at /metrics.

Two threads, one rule: only the event loop reads the registry and the
rings. Once a second (liveness' meter tick) it folds them into an immutable
:class:`Snapshot` and swaps it in with one assignment; a scrape, served by
prometheus_client's own HTTP server in a thread of its own, formats the
latest snapshot and never touches the loop's state. A thread rather than an
asyncio handler: formatting a large scrape never delays the loop's
requests, and prometheus_client does the HTTP and the text format.

Every metric is defined in broker/metrics_table.py (docs/metrics.md is
generated from it). prometheus_client is imported only when --metrics is
given.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import NamedTuple

from tensorbus._core import TensorbusError
from tensorbus.broker.metrics_table import LATENCY_LE_NS, METRICS
from tensorbus.broker.metrics_totals import TopicTotals
from tensorbus.broker.startup import BrokerStartError
from tensorbus.broker.stats import LATENCY_BUCKETS, bucket_bounds_ns
from tensorbus.broker.topics import INBOX_PREFIX

__all__ = [
    "MetricsServer",
    "Snapshot",
    "TopicLabels",
    "core_bucket_bounds_ns",
    "latency_buckets",
    "parse_address",
]

log = logging.getLogger("tensorbus.broker")

OTHER = "other"
# Peer.counters keys -> the metric that sums them by link kind.
_LINK_METRICS = {
    "reconnects": "tensorbus_link_reconnects_total",
    "sent": "tensorbus_link_sent_messages_total",
    "sent_bytes": "tensorbus_link_sent_bytes_total",
    "received": "tensorbus_link_received_messages_total",
    "received_bytes": "tensorbus_link_received_bytes_total",
    "dropped": "tensorbus_link_dropped_messages_total",
    "gaps": "tensorbus_link_gaps_total",
}


def parse_address(text: str) -> tuple[str, int]:
    """(host, port) from ``HOST:PORT``, ``[V6]:PORT`` or a bare ``PORT``
    (loopback: metrics are for this host's scraper unless asked otherwise)."""
    host, sep, port = str(text).rpartition(":")
    if not sep:
        host = "127.0.0.1"
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not host or not 0 <= number <= 65535:
        raise BrokerStartError(f"--metrics must be HOST:PORT or PORT, not {text!r}")
    return host, number


# The core's buckets, exactly (broker/stats.py): Prometheus bucket edges are
# chosen among their edges, so each Prometheus bucket is an exact sum.
core_bucket_bounds_ns = bucket_bounds_ns
# The last core bucket below each Prometheus bound (its high edge is the bound).
_LAST_CORE_BUCKET = tuple(
    max(i for i in range(LATENCY_BUCKETS) if core_bucket_bounds_ns(i)[1] <= le)
    for le in LATENCY_LE_NS
)
# Each core bucket's geometric middle in seconds, for the estimated _sum.
_MIDDLE_S = tuple(
    (low if math.isinf(high) else math.sqrt(max(low, 1.0) * high)) * 1e-9
    for low, high in map(core_bucket_bounds_ns, range(LATENCY_BUCKETS))
)


def latency_buckets(hist: list[int]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative Prometheus buckets (le in seconds, +Inf last) and an
    estimated sum in seconds, from a core latency histogram."""
    cumulative = []
    seen = 0
    start = 0
    for le, last in zip(LATENCY_LE_NS, _LAST_CORE_BUCKET, strict=True):
        seen += sum(hist[start : last + 1])
        start = last + 1
        cumulative.append((repr(le / 1e9), seen))  # division: 0.805306368, not ...01
    cumulative.append(("+Inf", sum(hist)))
    return cumulative, sum(n * m for n, m in zip(hist, _MIDDLE_S, strict=True))


class TopicLabels:
    """The topic label of each topic: its own name for the first ``limit``
    topics, ``other`` beyond (and always for reply inboxes, one per
    requester). A topic keeps its label for life, so no series jumps."""

    def __init__(self, limit: int):
        self.limit = limit
        self.named: set[str] = set()  # keys of topics with a label of their own

    def label(self, key: str, name: str) -> str:
        if key in self.named:
            return name
        if len(self.named) < self.limit and not name.startswith(INBOX_PREFIX):
            self.named.add(key)
            return name
        return OTHER

    def forget(self, key: str) -> None:
        self.named.discard(key)


class TopicRow(NamedTuple):
    label: str
    published: int
    bytes: int
    delivered: int
    lapped: int
    overtaken: int
    latency: tuple
    depth: int
    credit: int
    subscribers: int
    publishers: int


class Snapshot(NamedTuple):
    """What a scrape shows: rows per topic label, and label-free values by
    metric name (a dict of label tuple -> value where the metric has labels)."""

    topics: tuple
    values: dict


def _fold(rows: list[TopicRow]) -> TopicRow:
    """topic="other": counters and counts summed, depth the largest, credit the smallest."""
    return TopicRow(
        OTHER,
        *(sum(getattr(r, f) for r in rows) for f in TopicRow._fields[1:6]),
        tuple(map(sum, zip(*(r.latency for r in rows), strict=True))),
        max(r.depth for r in rows),
        min(r.credit for r in rows),
        sum(r.subscribers for r in rows),
        sum(r.publishers for r in rows),
    )


class Snapshotter:
    """Folds the daemon's state into snapshots; runs on the event loop only."""

    def __init__(self, registry, bridge, max_topics: int):
        self.registry = registry
        self.bridge = bridge
        self.labels = TopicLabels(max_topics)
        self.totals: dict[str, tuple[TopicTotals, str]] = {}  # ring name -> (totals, label)
        # Topics gone (reply inboxes) still count in topic="other".
        self.retired_other = TopicRow(OTHER, 0, 0, 0, 0, 0, (0,) * LATENCY_BUCKETS, 0, 0, 0, 0)
        self.peers: dict[int, tuple] = {}  # id -> (peer, its last counters): kept one tick
        self.retired_links: dict[str, dict] = {}  # kind -> counters of peers gone
        self.snapshot = Snapshot((), {})

    def refresh(self, now: float = 0.0) -> None:
        registry = self.registry
        rows: list[TopicRow] = []
        alive = set()
        for topic in list(registry.topics.values()):
            key = topic.ring.name
            alive.add(key)
            entry = self.totals.get(key)
            if entry is None:
                entry = self.totals[key] = (TopicTotals(), self.labels.label(key, topic.name))
            totals, label = entry
            try:
                if not totals.idle(topic.ring.head):
                    totals.update(topic.ring.totals(), topic.capacity)
            except TensorbusError:  # closed under us: last reading stands
                pass
            rows.append(self._row(label, totals, topic))
        for key in [k for k in self.totals if k not in alive]:
            totals, label = self.totals.pop(key)
            self.labels.forget(key)
            if label == OTHER:
                gone = self._row(OTHER, totals, None)
                self.retired_other = _fold([self.retired_other, gone])._replace(
                    depth=0, credit=0, subscribers=0, publishers=0
                )
        named = [r for r in rows if r.label != OTHER]
        folded = [r for r in rows if r.label == OTHER]
        if folded or self.retired_other.published or self.retired_other.delivered:
            other = _fold([*folded, self.retired_other])
            if folded:
                other = other._replace(
                    depth=max(r.depth for r in folded), credit=min(r.credit for r in folded)
                )
            named.append(other)
        self.snapshot = Snapshot(tuple(named), self._broker_values())

    @staticmethod
    def _row(label: str, t: TopicTotals, topic) -> TopicRow:
        subscribers = len(topic.cursors) if topic is not None else 0
        return TopicRow(
            label,
            t.published,
            t.bytes,
            t.delivered,
            t.lapped,
            t.overtaken,
            tuple(t.latency),
            t.depth,
            t.credit,
            subscribers,
            t.publishers if topic is not None else 0,
        )

    def _broker_values(self) -> dict:
        registry = self.registry
        sessions = {("ipc",): 0, ("tcp",): 0}
        for session in registry.sessions.values():
            if (session.transport,) in sessions:
                sessions[(session.transport,)] += 1
        arena = registry.arena.stats() if registry.arena is not None else {}
        counters = registry.counters
        values = {
            "tensorbus_topics": len(registry.topics),
            "tensorbus_sessions": sessions,
            "tensorbus_arena_size_bytes": arena.get("size", 0),
            "tensorbus_arena_used_bytes": arena.get("used", 0),
            "tensorbus_arena_alloc_failures_total": arena.get("failed", 0),
            "tensorbus_arena_holders_free": len(registry.free_holders),
            "tensorbus_doorbells_free": len(registry.free_bells),
            "tensorbus_evictions_total": counters["evictions"],
            "tensorbus_clients_lost_total": counters["clients_lost"],
            "tensorbus_takeovers_total": counters["takeovers"],
            "tensorbus_control_requests_total": counters["requests"],
            "tensorbus_control_errors_total": counters["errors"],
        }
        values.update(self._link_values())
        return values

    def _link_values(self) -> dict:
        """Link counters summed by kind; a peer the bridge forgot keeps
        counting (from its last reading) so no counter goes down."""
        current = {id(p): (p, dict(p.counters)) for p in self.bridge.peers}
        for pid, (peer, last) in self.peers.items():
            if pid not in current:
                kept = self.retired_links.setdefault(peer.kind, {})
                for name in _LINK_METRICS:
                    kept[name] = kept.get(name, 0) + last.get(name, 0)
        self.peers = current
        up = {("peer",): 0, ("client",): 0}
        sums = {kind: dict(kept) for kind, kept in self.retired_links.items()}
        for peer, counters in current.values():
            if peer.state == "up":
                up[(peer.kind,)] = up.get((peer.kind,), 0) + 1
            mine = sums.setdefault(peer.kind, {})
            for name in _LINK_METRICS:
                mine[name] = mine.get(name, 0) + counters.get(name, 0)
        values = {"tensorbus_links_up": up}
        for name, metric in _LINK_METRICS.items():
            values[metric] = {
                (kind,): sums.get(kind, {}).get(name, 0) for kind in ("peer", "client")
            }
        return values


def _families(snapshot: Snapshot):
    """prometheus_client metric families for ``snapshot``, in METRICS order."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    kinds = {
        "counter": CounterMetricFamily,
        "gauge": GaugeMetricFamily,
        "histogram": HistogramMetricFamily,
    }
    per_topic = {
        "tensorbus_published_messages_total": "published",
        "tensorbus_published_bytes_total": "bytes",
        "tensorbus_delivered_messages_total": "delivered",
        "tensorbus_topic_depth_messages": "depth",
        "tensorbus_topic_credit_messages": "credit",
        "tensorbus_topic_subscribers": "subscribers",
        "tensorbus_topic_publishers": "publishers",
    }
    for m in METRICS:
        family = kinds[m.kind](m.name, m.help, labels=m.labels)
        if m.name == "tensorbus_delivery_latency_seconds":
            for row in snapshot.topics:
                buckets, total = latency_buckets(row.latency)
                family.add_metric([row.label], buckets, total)
        elif m.name == "tensorbus_dropped_messages_total":
            for row in snapshot.topics:
                family.add_metric([row.label, "lapped"], row.lapped)
                family.add_metric([row.label, "overtaken"], row.overtaken)
        elif m.name in per_topic:
            for row in snapshot.topics:
                family.add_metric([row.label], getattr(row, per_topic[m.name]))
        else:
            value = snapshot.values.get(m.name, 0)
            if isinstance(value, dict):
                for labels, v in value.items():
                    family.add_metric(list(labels), v)
            else:
                family.add_metric([], value)
        yield family


class MetricsServer:
    """The snapshotter plus prometheus_client's HTTP server thread."""

    def __init__(self, registry, bridge, config):
        self.address = parse_address(config.metrics)
        if config.metrics_max_topics < 0:
            raise BrokerStartError(
                f"--metrics-max-topics must be 0 or more, not {config.metrics_max_topics}"
            )
        self.snapshotter = Snapshotter(registry, bridge, config.metrics_max_topics)
        self.httpd = None
        self.url = ""

    def start(self) -> None:
        """Take a first snapshot and listen; BrokerStartError with a sentence
        where the address cannot be bound (never a daemon without metrics)."""
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.process_collector import ProcessCollector

        snapshotter = self.snapshotter

        class SnapshotCollector:
            def collect(self):  # the HTTP thread: reads one immutable snapshot
                return _families(snapshotter.snapshot)

        scrape = CollectorRegistry(auto_describe=False)
        scrape.register(SnapshotCollector())
        ProcessCollector(registry=scrape)  # process_* (CPU, memory, fds) of the daemon
        snapshotter.refresh()
        host, port = self.address
        try:
            self.httpd, _ = start_http_server(port, addr=host, registry=scrape)
        except OSError as exc:
            raise BrokerStartError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
            ) from None
        bound = self.httpd.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound}/metrics"
        log.info("metrics on %s", self.url)

    def refresh(self, now: float = 0.0) -> None:
        self.snapshotter.refresh(now)

    def close(self) -> None:
        if self.httpd is not None:
            with contextlib.suppress(Exception):
                self.httpd.shutdown()
                self.httpd.server_close()
            self.httpd = None
