"""Cumulative per-topic totals from a ring's counters, for Prometheus.

A ring keeps its counters per entry: each cursor counts what it received,
dropped and how late (a u32 latency histogram), each publisher record what
it published. Entries are zeroed when taken again, so a sum over today's
entries goes down whenever a subscriber or publisher leaves, which a
Prometheus counter must never do. :class:`TopicTotals` keeps, per entry,
what it saw last (from ``Ring.totals()``, free entries included) and adds
only the growth: a subscriber or publisher that left is still counted whole
unless its entry was taken again within one reading (at 1 s, rare; then
its last second is lost). All of this runs once a second per topic on the
daemon's loop, never per message.
"""

from __future__ import annotations

from tensorbus.broker.stats import LATENCY_BUCKETS

__all__ = ["TopicTotals"]

_U32 = 0xFFFFFFFF


def _grown(now: int, before: int, same_owner: bool) -> int:
    """How much a counter grew since ``before``. The same owner: its growth
    (a decrease means it was zeroed and counted again). A new owner: its
    value, unless it still holds the old owner's (not yet zeroed)."""
    if same_owner:
        return now - before if now >= before else now
    return 0 if now == before else now


class TopicTotals:
    """One topic's totals since its ring was made."""

    __slots__ = (
        "published",
        "bytes",
        "delivered",
        "lapped",
        "overtaken",
        "latency",
        "depth",
        "credit",
        "publishers",
        "cursors_seen",
        "records_seen",
        "head",
        "quiet",
        "skipped",
    )

    def __init__(self) -> None:
        self.published = 0
        self.bytes = 0
        self.delivered = 0
        self.lapped = 0  # cursors' drops
        self.overtaken = 0  # publisher records' drops
        self.latency = [0] * LATENCY_BUCKETS
        self.depth = 0
        self.credit = 0
        self.publishers = 0  # records in use
        self.cursors_seen: dict[int, tuple] = {}  # index -> (generation, received, drops, latency)
        self.records_seen: dict[int, tuple] = {}  # index -> (pid, published, bytes, dropped)
        self.head = -1
        self.quiet = 0  # readings in a row that found nothing new
        self.skipped = 0  # readings skipped in a row

    def idle(self, head: int) -> bool:
        """Whether a reading can be skipped: nothing published since the
        last two readings found nothing new and nobody behind. (Two, since a
        subscriber moves its position before it counts the message.) Every
        tenth is read anyway: publishers come and go without publishing."""
        if head == self.head and self.quiet >= 2 and self.depth == 0 and self.skipped < 9:
            self.skipped += 1
            return True
        self.skipped = 0
        return False

    def update(self, totals: tuple, capacity: int) -> None:
        """Add what grew since the last reading; ``totals`` is ``Ring.totals()``."""
        head, cursors, records = totals
        before = (self.published, self.delivered, self.lapped, self.overtaken)
        depth = 0
        latency = self.latency
        seen = self.cursors_seen
        for index, generation, active, lag, received, drops, hist in cursors:
            last = seen.get(index)
            if last is None:
                self.delivered += received
                self.lapped += drops
                for i, n in enumerate(hist):
                    latency[i] += n
            else:
                same = last[0] == generation
                self.delivered += _grown(received, last[1], same)
                self.lapped += _grown(drops, last[2], same)
                for i, (n, was) in enumerate(zip(hist, last[3], strict=True)):
                    if n != was:
                        # u32 buckets wrap: the same cursor's growth is modulo 2^32
                        latency[i] += (n - was) & _U32 if same else n
            seen[index] = (generation, received, drops, hist)
            if active and lag > depth:
                depth = lag
        records_seen = self.records_seen
        self.publishers = 0
        for index, pid, live, published, nbytes, dropped in records:
            self.publishers += live
            last = records_seen.get(index)
            if last is None:
                self.published += published
                self.bytes += nbytes
                self.overtaken += dropped
            else:
                same = last[0] == pid
                self.published += _grown(published, last[1], same)
                self.bytes += _grown(nbytes, last[2], same)
                self.overtaken += _grown(dropped, last[3], same)
            records_seen[index] = (pid, published, nbytes, dropped)
        changed = before != (self.published, self.delivered, self.lapped, self.overtaken)
        self.quiet = 0 if changed or head != self.head else self.quiet + 1
        self.head = head
        self.depth = depth
        self.credit = max(0, capacity - depth)
