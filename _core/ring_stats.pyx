"""What a ring's counters say, read without stopping anyone: the snapshot
``tensorbus stats`` shows, the cumulative totals metrics keep, the lags
the daemon checks for pressure, and the arena blocks messages still
reference. ``Ring.stats()`` and its siblings call these; the ring itself
(_core/ring.pyx) keeps to creating, attaching, joining and repairing.

Counters are read with relaxed atomic loads: each value is whole, the set
of them is not one instant (a message may count as published and not yet
as received).
"""

from libc.stdint cimport int64_t, uint32_t

from tensorbus._core.atomic cimport tb_load_acq32, tb_load_acq64, tb_load_rlx_u64
from tensorbus._core.layout cimport (
    TB_CURSOR_ACTIVE,
    TB_CURSOR_FREE,
    TB_LAT_BUCKETS,
    TB_MSG_ARENA,
    TB_PUB_FREE,
    tb_cursor_t,
    tb_publisher_t,
    tb_slot_header_t,
    tb_tensor_desc_t,
)
from tensorbus._core.ring cimport (
    Ring,
    tb_cursor_bound,
    tb_payload_of,
    tb_record_bound,
    tb_ring_t,
    tb_slot_at,
)

__all__ = ["arena_refs", "cursor_lags", "ring_stats", "totals"]


def arena_refs(Ring ring) -> set:
    """``(block, generation)`` of every arena block a message in this ring
    still references (the broker checks a dead publisher's loans)."""
    cdef tb_ring_t *v = &ring.v
    cdef int64_t head = tb_load_acq64(&v.h.head), seq
    cdef tb_slot_header_t *s
    cdef tb_tensor_desc_t *d
    out = set()
    seq = max(0, head - v.capacity)
    while seq < head:
        s = tb_slot_at(v, seq)
        if s.type == TB_MSG_ARENA:
            d = <tb_tensor_desc_t *>tb_payload_of(s)
            if tb_load_acq64(&d.reclaim) == seq:
                out.add((d.block, d.generation))
        seq += 1
    return out

def ring_stats(Ring ring) -> dict:
    """A snapshot of the ring: head, every live cursor and publisher."""
    cdef tb_ring_t *v = &ring.v
    cdef int64_t head = tb_load_acq64(&v.h.head)
    cdef uint32_t i, state
    cdef tb_cursor_t *c
    cdef tb_publisher_t *r
    cursors = []
    for i in range(tb_cursor_bound(v)):
        c = &v.cursors[i]
        state = tb_load_acq32(&c.state)  # once: a cursor freed meanwhile stays consistent
        if state != TB_CURSOR_FREE:
            pos = tb_load_acq64(&c.position)
            cursors.append({"index": i, "pid": c.owner_pid, "position": pos,
                            "lag": head - pos, "drops": tb_load_rlx_u64(&c.drops),
                            "received": tb_load_rlx_u64(&c.received),
                            "generation": c.generation,
                            "latency": [c.latency[k] for k in range(TB_LAT_BUCKETS)],
                            "state": ("joining", "active", "evicted")[state - 1]})
    publishers = []
    for i in range(tb_record_bound(v)):
        r = &v.records[i]
        if tb_load_acq32(&r.state) != TB_PUB_FREE:
            publishers.append({"index": i, "pid": r.owner_pid,
                               "published": tb_load_rlx_u64(&r.published),
                               "bytes": tb_load_rlx_u64(&r.bytes),
                               "dropped": tb_load_rlx_u64(&r.dropped)})
    return {"name": ring.name, "policy": ring.policy, "capacity": v.capacity,
            "slot_size": v.slot_size, "head": head, "closed": bool(v.h.closed),
            "cursors": cursors, "publishers": publishers}

def totals(Ring ring) -> tuple:
    """Every entry's counters, free entries included, for a reader that
    keeps cumulative totals: ``(head, cursors, publishers)``, cursors as
    ``(index, generation, active, lag, received, drops, latency)`` and
    publisher records as ``(index, pid, live, published, bytes, dropped)``.
    A freed entry keeps its last counts until it is taken again (which
    zeroes them), so a subscriber or publisher that left since the last
    read is still counted whole. The ``latency`` counts are u32 and wrap."""
    cdef tb_ring_t *v = &ring.v
    cdef int64_t head = tb_load_acq64(&v.h.head)
    cdef uint32_t i
    cdef tb_cursor_t *c
    cdef tb_publisher_t *r
    cursors = []
    for i in range(tb_cursor_bound(v)):
        c = &v.cursors[i]
        cursors.append((i, c.generation, tb_load_acq32(&c.state) == TB_CURSOR_ACTIVE,
                        head - tb_load_acq64(&c.position),
                        tb_load_rlx_u64(&c.received), tb_load_rlx_u64(&c.drops),
                        tuple([c.latency[k] for k in range(TB_LAT_BUCKETS)])))
    publishers = []
    for i in range(tb_record_bound(v)):
        r = &v.records[i]
        publishers.append((i, r.owner_pid, tb_load_acq32(&r.state) != TB_PUB_FREE,
                           tb_load_rlx_u64(&r.published),
                           tb_load_rlx_u64(&r.bytes), tb_load_rlx_u64(&r.dropped)))
    return head, cursors, publishers

def cursor_lags(Ring ring) -> list:
    """``(index, generation, lag, drops)`` of each active cursor: the
    broker's cheap per-tick view for pressure and slow-consumer checks."""
    cdef tb_ring_t *v = &ring.v
    cdef int64_t head = tb_load_acq64(&v.h.head)
    cdef uint32_t i
    cdef tb_cursor_t *c
    out = []
    for i in range(tb_cursor_bound(v)):
        c = &v.cursors[i]
        if tb_load_acq32(&c.state) == TB_CURSOR_ACTIVE:
            out.append((i, c.generation, head - tb_load_acq64(&c.position),
                        tb_load_rlx_u64(&c.drops)))
    return out
