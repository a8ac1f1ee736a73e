"""Per-topic rates and delivery-latency percentiles, as pure arithmetic.

Every cursor keeps a histogram of delivery latencies (publish timestamp to
receive) in two buckets per octave: a latency whose top bit is ``e`` and
next bit ``h`` counts in bucket ``2e + h - 12`` (tb_ring.h,
``tb_record_latency``), so each octave ``[2^e, 2^(e+1))`` splits at
``1.5 * 2^e``. The broker sums the histograms of a topic's
cursors once a second; the difference between two sums is the histogram of
that second, from which p50/p99 are read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["LATENCY_BUCKETS", "TopicMeter", "bucket_bounds_ns", "percentile_ns", "private_rss_kb"]

LATENCY_BUCKETS = 48
_FIRST = 12


def bucket_bounds_ns(i: int) -> tuple[float, float]:
    """The latency range ``[low, high)`` in ns that bucket ``i`` counts; the
    first and the last bucket also hold what is below and above them."""
    e, h = divmod(i + _FIRST, 2)
    low = 0.0 if i == 0 else 2.0**e * (1.5 if h else 1.0)
    high = math.inf if i == LATENCY_BUCKETS - 1 else 2.0**e * (2.0 if h else 1.5)
    return low, high


def percentile_ns(hist: Sequence[int], q: float) -> float | None:
    """The ``q``-quantile (0..1) of a bucket histogram, as the geometric
    middle of the bucket it falls in (within a factor of sqrt(1.5) of the
    truth), or None for an empty histogram."""
    total = sum(hist)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(hist):
        seen += count
        if seen >= rank and count:
            low, high = bucket_bounds_ns(i)
            if math.isinf(high):
                return low
            return math.sqrt(max(low, 1.0) * high)
    return None


class TopicMeter:
    """Turns a topic's cumulative counters into per-second figures."""

    __slots__ = ("at", "head", "bytes", "hist", "msgs_per_s", "bytes_per_s", "p50_ns", "p99_ns")

    def __init__(self) -> None:
        self.at: float | None = None
        self.head = 0
        self.bytes: dict = {}  # (record index, pid) -> bytes at the last sample
        self.hist = [0] * LATENCY_BUCKETS
        self.msgs_per_s = 0.0
        self.bytes_per_s = 0.0
        self.p50_ns: float | None = None
        self.p99_ns: float | None = None

    def update(self, now: float, head: int, publisher_bytes: dict, hist: Sequence[int]) -> None:
        """Take a new sample of the cumulative counters at time ``now``:
        ``publisher_bytes`` maps each live publisher record (index, pid) to
        its byte count, so one that left does not make the total go down.
        Counters that went down (a cursor left) count as 0."""
        if self.at is not None and now > self.at:
            dt = now - self.at
            self.msgs_per_s = max(0, head - self.head) / dt
            sent = sum(max(0, n - self.bytes.get(k, 0)) for k, n in publisher_bytes.items())
            self.bytes_per_s = sent / dt
            delta = [max(0, a - b) for a, b in zip(hist, self.hist, strict=True)]
            if sum(delta):
                self.p50_ns = percentile_ns(delta, 0.50)
                self.p99_ns = percentile_ns(delta, 0.99)
            elif self.msgs_per_s == 0:
                self.p50_ns = self.p99_ns = None
        self.at = now
        self.head = head
        self.bytes = dict(publisher_bytes)
        self.hist = list(hist)


def private_rss_kb(pid: int | str = "self") -> int | None:
    """Resident memory of process ``pid`` in KiB, less the shared memory it
    maps (rings and the arena are counted once, in /dev/shm); None if
    /proc cannot say."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "RssShmem"):
                    fields[name] = int(value.split()[0])
    except OSError:
        return None
    if "VmRSS" not in fields:
        return None
    return fields["VmRSS"] - fields.get("RssShmem", 0)
