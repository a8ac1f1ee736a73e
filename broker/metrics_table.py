"""Every metric ``tensorbus serve --metrics`` exports, defined once.

broker/metrics.py builds its families from this table and
docs/metrics.md's table is generated from it (``markdown_table()``;
tests/test_metrics.py checks both the file and a real scrape against it),
so the documentation cannot drift from the code.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["LATENCY_LE_NS", "METRICS", "MetricDef", "markdown_table"]


class MetricDef(NamedTuple):
    name: str  # as scraped: counters end in _total
    kind: str  # counter, gauge or histogram
    labels: tuple[str, ...]
    help: str


# Histogram bucket bounds in ns: edges of the core's own buckets, so each
# Prometheus bucket is an exact sum, never an estimate. The core splits each
# octave [2^e, 2^(e+1)) at 1.5 * 2^e (ring.md, "Latency"); the bounds are
# one octave apart from 2^10 ns (1.024 us) to 2^29 ns (0.537 s), then
# 1.5 * 2^29 ns (0.805 s), where the core's last bucket (everything slower)
# starts.
LATENCY_LE_NS = tuple(float(2**k) for k in range(10, 30)) + (1.5 * 2**29,)

_T = ("topic",)
_K = ("kind",)

METRICS = (
    MetricDef(
        "tensorbus_published_messages_total",
        "counter",
        _T,
        "Messages publishers committed to the topic's ring (from the ring's publisher records).",
    ),
    MetricDef(
        "tensorbus_published_bytes_total",
        "counter",
        _T,
        "Payload bytes published; a tensor in the arena counts its nbytes.",
    ),
    MetricDef(
        "tensorbus_delivered_messages_total",
        "counter",
        _T,
        "Messages consumed, summed over the topic's cursors: a message read by "
        "three subscribers counts three; bridges' and queue groups' cursors included.",
    ),
    MetricDef(
        "tensorbus_dropped_messages_total",
        "counter",
        (*_T, "reason"),
        "Messages lost on the topic. reason=lapped: a subscriber was overtaken on a "
        "realtime or latest ring (or skipped an unreadable slot); reason=overtaken: a "
        "publisher's message was overtaken before it committed, or a full arena refused it.",
    ),
    MetricDef(
        "tensorbus_delivery_latency_seconds",
        "histogram",
        _T,
        "Publish-to-receive latency of delivered messages, from the cursors' histograms; "
        "_sum is estimated (each message at its core bucket's geometric middle).",
    ),
    MetricDef(
        "tensorbus_topic_depth_messages",
        "gauge",
        _T,
        "Messages the slowest active subscriber has yet to read (topic=other: the largest).",
    ),
    MetricDef(
        "tensorbus_topic_credit_messages",
        "gauge",
        _T,
        "Slots publishers may still claim before a reliable ring makes them wait: "
        "capacity minus depth (topic=other: the smallest).",
    ),
    MetricDef("tensorbus_topic_subscribers", "gauge", _T, "Cursors the broker handed out."),
    MetricDef("tensorbus_topic_publishers", "gauge", _T, "Publisher records in use."),
    MetricDef("tensorbus_topics", "gauge", (), "Topics, $sys and reply inboxes included."),
    MetricDef("tensorbus_sessions", "gauge", ("transport",), "Client sessions (ipc or tcp)."),
    MetricDef("tensorbus_arena_size_bytes", "gauge", (), "Size of the tensor arena."),
    MetricDef("tensorbus_arena_used_bytes", "gauge", (), "Arena bytes in allocated blocks."),
    MetricDef(
        "tensorbus_arena_alloc_failures_total",
        "counter",
        (),
        "Arena allocations refused for want of a large enough free block.",
    ),
    MetricDef(
        "tensorbus_arena_holders_free",
        "gauge",
        (),
        "Arena holder slots left: each local client session takes one.",
    ),
    MetricDef("tensorbus_doorbells_free", "gauge", (), "Doorbells left (--max-subscriptions)."),
    MetricDef(
        "tensorbus_evictions_total",
        "counter",
        (),
        "Slow consumers evicted (--slow-consumer-grace).",
    ),
    MetricDef(
        "tensorbus_clients_lost_total",
        "counter",
        (),
        "Sessions ended because the client died or missed its heartbeats.",
    ),
    MetricDef(
        "tensorbus_takeovers_total",
        "counter",
        (),
        "Times a restarted or standby daemon took over this socket's state.",
    ),
    MetricDef("tensorbus_control_requests_total", "counter", (), "Control requests answered."),
    MetricDef(
        "tensorbus_control_errors_total", "counter", (), "Control requests answered with an error."
    ),
    MetricDef(
        "tensorbus_links_up",
        "gauge",
        _K,
        "Links that are up: kind=peer (another daemon) or kind=client (a light client).",
    ),
    MetricDef(
        "tensorbus_link_reconnects_total",
        "counter",
        _K,
        "Links that came up again to a peer that had been linked before.",
    ),
    MetricDef("tensorbus_link_sent_messages_total", "counter", _K, "Messages sent over links."),
    MetricDef("tensorbus_link_sent_bytes_total", "counter", _K, "Payload bytes sent over links."),
    MetricDef(
        "tensorbus_link_received_messages_total", "counter", _K, "Messages received over links."
    ),
    MetricDef(
        "tensorbus_link_received_bytes_total", "counter", _K, "Payload bytes received over links."
    ),
    MetricDef(
        "tensorbus_link_dropped_messages_total",
        "counter",
        _K,
        "Messages a bridge dropped: realtime ones it could not publish here (full arena), "
        "or ones for a topic that cannot exist here.",
    ),
    MetricDef(
        "tensorbus_link_gaps_total",
        "counter",
        _K,
        "Gap markers published for reliable messages lost with a link.",
    ),
)


def markdown_table() -> str:
    """docs/metrics.md's table of the metrics, from METRICS."""
    rows = ["| metric | type | labels | meaning |", "| --- | --- | --- | --- |"]
    for m in METRICS:
        labels = ", ".join(f"`{label}`" for label in m.labels) or "–"
        rows.append(f"| `{m.name}` | {m.kind} | {labels} | {m.help} |")
    return "\n".join(rows) + "\n"
