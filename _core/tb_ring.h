/* tb_ring.h: the ring protocol in C (docs/ring.md): claim, commit, read,
 * join, repair and reclaim on a validated view of a ring segment. Every
 * function is nogil and cannot raise; the Cython classes in ring.pyx,
 * publisher.pyx and subscriber.pyx add Python's side (errors, waiting,
 * buffers) around them.
 *
 * Block rings: a publisher claims a sequence by CAS on the head only after
 * it has confirmed credit, and claim, copy and commit are one call, so no
 * Python exception can leave a claimed hole. Overwrite rings: a publisher
 * claims by fetch-add and never waits; each slot is a seqlock, read by copy.
 */
#ifndef TB_RING_H
#define TB_RING_H

#include <stdint.h>
#include <string.h>

#include "tb_atomic.h"
#include "tb_layout.h"
#include "tb_arena.h"

/* Limits of a ring's geometry, checked at create and attach. */
#define TB_MAX_CAPACITY (1 << 24)
#define TB_MAX_SLOT_SIZE (1 << 26)
#define TB_MAX_ENTRIES 4096
/* Overwrite rings: how long a writer waits for an older writer of its slot. */
#define TB_BUSY_SLOT_WAIT_NS 200000

/* What the calls below report. */
enum {
    TB_ST_OK = 0,
    TB_ST_EMPTY = 1,   /* subscriber: nothing to read yet; publisher: no credit yet */
    TB_ST_CLOSED = 2,
    TB_ST_LOST = 3,    /* our claim was padded by a repair that took us for dead */
    TB_ST_DROPPED = 4, /* overwrite: our message was overtaken in flight (counted) */
    TB_ST_EVICTED = 5
};

/* Validated geometry, copied out of the header at attach time: indexing uses
 * these and never a value another process could change under us. */
typedef struct {
    tb_ring_header_t *h;
    char *slots;
    tb_cursor_t *cursors;
    tb_publisher_t *records;
    int64_t capacity;
    int64_t mask;
    uint32_t stride;
    uint32_t slot_size;
    uint32_t max_cursors;
    uint32_t max_publishers;
    uint32_t policy;
    tb_arena_t *arena; /* the broker's tensor arena; NULL for a ring without one */
    int64_t keep;      /* 1: the newest message's block outlives its readers ("latest") */
} tb_ring_t;

/* One subscriber's reading state, kept in its process (the shared cursor is
 * published from it). */
typedef struct {
    tb_cursor_t *cur;
    int64_t pos;          /* local copy of the cursor; published on advance */
    int64_t stall_since;  /* when the awaited slot was first seen claimed but unfilled */
    char *scratch;        /* overwrite rings read by copy into here */
    int latest;           /* QoS "latest": always read the newest message */
    int group;            /* a queue group's shared cursor: messages are claimed by CAS */
    int claimed;          /* group: whether the last advance won its message */
} tb_reader_t;

/* What a waiter's ready callback needs. */
typedef struct {
    tb_ring_t *v;
    tb_cursor_t *cur;
    int64_t pos;
    int latest;
} tb_ring_wait_t;

static inline tb_slot_header_t *tb_slot_at(const tb_ring_t *v, int64_t seq) {
    return (tb_slot_header_t *)(v->slots + (seq & v->mask) * v->stride);
}

static inline char *tb_payload_of(tb_slot_header_t *s) {
    return (char *)s + TB_SLOT_HEADER_BYTES;
}

static inline uint32_t tb_cursor_bound(const tb_ring_t *v) {
    uint32_t hwm = tb_load_acq32(&v->h->cursor_hwm);
    return hwm < v->max_cursors ? hwm : v->max_cursors;
}

static inline uint32_t tb_record_bound(const tb_ring_t *v) {
    uint32_t hwm = tb_load_acq32(&v->h->publisher_hwm);
    return hwm < v->max_publishers ? hwm : v->max_publishers;
}

static inline void tb_bump_max32(uint32_t *word, uint32_t value) {
    for (;;) {
        uint32_t seen = tb_load_acq32(word);
        if (seen >= value || tb_cas32(word, seen, value))
            return;
    }
}

/* The smallest position of an active cursor, or `head` if there is none. */
static inline int64_t tb_slowest_cursor(const tb_ring_t *v, int64_t head) {
    int64_t low = head;
    uint32_t n = tb_cursor_bound(v);
    for (uint32_t i = 0; i < n; i++) {
        tb_cursor_t *c = &v->cursors[i];
        if (tb_load_acq32(&c->state) == TB_CURSOR_ACTIVE) {
            int64_t p = tb_load_sc64(&c->position);
            if (p < low)
                low = p;
        }
    }
    return low;
}

/* Count one delivery latency in the cursor's half-octave histogram. */
static inline void tb_record_latency(tb_cursor_t *c, int64_t ns) {
    uint64_t x = ns > 0 ? (uint64_t)ns : 1;
    int e = 63 - __builtin_clzll(x);
    int b = 2 * e + (e > 0 ? (int)((x >> (e - 1)) & 1) : 0) - (int)TB_LAT_FIRST;
    if (b < 0)
        b = 0;
    else if (b >= (int)TB_LAT_BUCKETS)
        b = TB_LAT_BUCKETS - 1;
    c->latency[b] += 1; /* single writer: the cursor's owner */
}

/* Is there something at `pos` (a message, a lap, a newer value for a
 * "latest" reader), or was the ring closed or the cursor evicted? A cheap
 * check for a waiter; the subscriber's poll then tells which. */
static inline int tb_cursor_ready(const tb_ring_t *v, tb_cursor_t *cur, int64_t pos, int latest) {
    int64_t c = tb_load_acq64(&tb_slot_at(v, pos)->commit);
    if (c == pos || (c & ~TB_WRITING) > pos)
        return 1;
    if (latest && tb_load_rlx64(&v->h->head) - 1 > pos)
        return 1;
    return tb_load_rlx32(&v->h->closed) != 0 || tb_load_rlx32(&cur->state) != TB_CURSOR_ACTIVE;
}

/* Waiter callbacks (wait.pxd's ready_fn) over a tb_ring_wait_t. */
static inline int tb_ring_data_ready(void *p) {
    tb_ring_wait_t *w = (tb_ring_wait_t *)p;
    return tb_cursor_ready(w->v, w->cur, w->pos, w->latest);
}

static inline int tb_ring_credit_ready(void *p) {
    tb_ring_t *v = ((tb_ring_wait_t *)p)->v;
    if (tb_load_rlx32(&v->h->closed))
        return 1;
    int64_t head = tb_load_sc64(&v->h->head);
    if (head - tb_slowest_cursor(v, head) >= v->capacity)
        return 0;
    return tb_load_acq64(&tb_slot_at(v, head)->commit) >= head - v->capacity;
}

/* ---- reclaim (docs/arena.md, "Reclaim") -------------------------------- */

/* Drop the arena reference of the message `seq` in slot `s`, unless someone
 * already did. The block and generation are read before the CAS on
 * `reclaim`: if it still names `seq`, nobody has begun to reuse the slot, so
 * they are that message's. */
static inline int tb_reclaim_slot(tb_ring_t *v, tb_slot_header_t *s, int64_t seq) {
    tb_tensor_desc_t *d = (tb_tensor_desc_t *)tb_payload_of(s);
    uint32_t block = d->block, gen = d->generation;
    if (tb_cas64(&d->reclaim, seq, -1)) {
        tb_arena_drop_owner(v->arena, block, gen);
        return 1;
    }
    return 0;
}

/* Drop the arena references of the messages in [lo, *upto) that every
 * active cursor has read (all but the newest on "latest" rings; *upto is
 * set to that bound). Slots older than a ring's worth were reused, and their
 * writers dropped them. Returns how many it dropped. */
static inline int tb_reclaim_window(tb_ring_t *v, int64_t lo, int64_t *upto) {
    int64_t head = tb_load_acq64(&v->h->head), seq;
    int n = 0;
    *upto = tb_slowest_cursor(v, head);
    if (*upto > head - v->keep)
        *upto = head - v->keep;
    seq = lo > head - v->capacity ? lo : head - v->capacity;
    if (seq < 0)
        seq = 0;
    for (; seq < *upto; seq++) {
        tb_slot_header_t *s = tb_slot_at(v, seq);
        if (tb_load_acq64(&s->commit) == seq && s->type == TB_MSG_ARENA)
            n += tb_reclaim_slot(v, s, seq);
    }
    return n;
}

/* Drop the arena references of the messages every active cursor has read,
 * from the ring's hint on, and move the hint (never backwards). */
static inline void tb_reclaim_passed(tb_ring_t *v) {
    int64_t upto, lo;
    if (v->arena == NULL)
        return;
    tb_reclaim_window(v, tb_load_acq64(&v->h->reclaim_hint), &upto);
    for (;;) {
        lo = tb_load_acq64(&v->h->reclaim_hint);
        if (lo >= upto || tb_cas64(&v->h->reclaim_hint, lo, upto))
            break;
    }
}

/* ---- wakes ------------------------------------------------------------- */

/* Wake publishers sleeping for credit. Callers have issued the seq_cst fence
 * after making the credit visible. */
static inline void tb_ring_wake_publishers(tb_ring_t *v) {
    if (tb_load_rlx32(&v->h->space.sleeping)) {
        tb_fetch_add32(&v->h->space.seq, 1);
        tb_futex_wake_all(&v->h->space.seq);
    }
}

/* ---- joining (docs/ring.md, "Subscribing") ----------------------------- */

/* Allocate and activate a cursor; UINT32_MAX if every entry is taken. Join
 * without loss: publish a position, become visible, and retry if the head
 * ran a whole ring ahead meanwhile (a publisher that scanned cursors before
 * we were visible may have lapped us). */
static inline uint32_t tb_ring_join(tb_ring_t *v, uint32_t owner_pid, uint32_t bell_ref,
                                    uint32_t flags) {
    uint32_t i;
    tb_cursor_t *c = NULL;
    for (i = 0; i < v->max_cursors; i++) {
        c = &v->cursors[i];
        if (tb_cas32(&c->state, TB_CURSOR_FREE, TB_CURSOR_JOINING))
            break;
    }
    if (i == v->max_cursors)
        return UINT32_MAX;
    c->owner_pid = owner_pid;
    c->generation += 1;
    c->drops = 0;
    c->received = 0;
    c->bell.sleeping = 0;
    c->bell_ref = bell_ref;
    c->flags = flags;
    memset(c->latency, 0, sizeof(c->latency));
    tb_bump_max32(&v->h->cursor_hwm, i + 1);
    int first = 1;
    for (;;) {
        int64_t head = tb_load_sc64(&v->h->head);
        if ((flags & TB_CURSOR_LATEST) && head > 0)
            head -= 1; /* a new "latest" reader gets the current value at once */
        tb_store_sc64(&c->position, head);
        if (first) {
            tb_cas32(&c->state, TB_CURSOR_JOINING, TB_CURSOR_ACTIVE);
            first = 0;
        }
        if (tb_load_sc64(&v->h->head) - head < v->capacity)
            break;
    }
    return i;
}

/* ---- publishing (docs/ring.md, "Publishing") --------------------------- */

static inline int tb_ring_overtaken(tb_publisher_t *rec, int64_t head, int64_t *seq) {
    tb_store_rel32(&rec->state, TB_PUB_IDLE);
    tb_fetch_add_u64(&rec->dropped, 1);
    *seq = head;
    return TB_ST_DROPPED;
}

/* Claim, copy (`hdr`, then `data`) and commit one message as publisher
 * record `index`. Never leaves a claim held. `cached_min` is the
 * publisher's lower bound of the slowest cursor, rescanned only when it says
 * "full". On TB_ST_OK the seq_cst fence after the commit is done: the caller
 * reads the header's `sleepers` next and wakes subscribers if any sleep. */
static inline int tb_ring_publish(tb_ring_t *v, tb_publisher_t *rec, uint32_t index,
                                  int64_t *cached_min, const char *hdr, uint32_t hn,
                                  const char *data, uint32_t n, uint16_t type, uint16_t flags,
                                  int64_t *seq) {
    tb_slot_header_t *s;
    int64_t head, prev, give_up = 0;
    int ok;
    if (tb_load_acq32(&v->h->closed))
        return TB_ST_CLOSED;

    if (v->policy == TB_POLICY_BLOCK) {
        for (;;) {
            head = tb_load_sc64(&v->h->head);
            if (head - *cached_min >= v->capacity) {
                *cached_min = tb_slowest_cursor(v, head);
                if (head - *cached_min >= v->capacity)
                    return TB_ST_EMPTY;
            }
            s = tb_slot_at(v, head);
            prev = tb_load_acq64(&s->commit);
            if (prev >= head)
                continue; /* our head is stale: someone claimed and committed it */
            if (prev < head - v->capacity)
                return TB_ST_EMPTY; /* the slot's previous writer has not committed yet */
            /* Record the intent before the claim so a repair can tell whose
             * sequence this is if we die right after the CAS. */
            tb_store_rlx64(&rec->seq, head);
            tb_store_rel32(&rec->state, TB_PUB_CLAIMING);
            if (tb_cas64(&v->h->head, head, head + 1))
                break;
        }
        tb_store_rel32(&rec->state, TB_PUB_CLAIMED);
        if (s->type == TB_MSG_ARENA && v->arena != NULL)
            tb_reclaim_slot(v, s, head - v->capacity); /* usually done already */
    } else {
        tb_store_rel32(&rec->state, TB_PUB_CLAIMING);
        head = tb_fetch_add64(&v->h->head, 1);
        tb_store_rlx64(&rec->seq, head);
        tb_store_rel32(&rec->state, TB_PUB_CLAIMED);
        s = tb_slot_at(v, head);
        for (;;) {
            prev = tb_load_acq64(&s->commit);
            if (prev >= 0 && (prev & TB_WRITING)) {
                /* Another writer fills this slot: a newer one makes our
                 * message stale; an older one should finish in a moment. */
                if ((prev & ~TB_WRITING) > head)
                    return tb_ring_overtaken(rec, head, seq);
                if (give_up == 0)
                    give_up = tb_now_ns() + TB_BUSY_SLOT_WAIT_NS;
                else if (tb_now_ns() > give_up)
                    return tb_ring_overtaken(rec, head, seq);
                continue;
            }
            if (prev >= head)
                return tb_ring_overtaken(rec, head, seq);
            if (tb_cas64(&s->commit, prev, head | TB_WRITING)) {
                if (prev >= 0 && s->type == TB_MSG_ARENA && v->arena != NULL)
                    tb_reclaim_slot(v, s, prev); /* we overwrite it: its block goes */
                prev = head | TB_WRITING;
                break;
            }
        }
        tb_fence_rel(); /* the WRITING mark is visible before any payload byte */
    }

    s->length = hn + n;
    s->type = type;
    s->flags = flags;
    s->timestamp_ns = tb_realtime_ns();
    s->publisher = index;
    if (hn) {
        memcpy(tb_payload_of(s), hdr, hn);
        if (type == TB_MSG_ARENA) /* the ring's reference to the block, dropped once everyone passed */
            ((tb_tensor_desc_t *)tb_payload_of(s))->reclaim = head;
    }
    memcpy(tb_payload_of(s) + hn, data, n);
    ok = tb_cas64(&s->commit, prev, head); /* release: payload before commit */
    tb_store_rel32(&rec->state, TB_PUB_IDLE);
    if (!ok)
        return TB_ST_LOST;
    rec->published += 1; /* single writer: the record's owner */
    rec->bytes += type != TB_MSG_ARENA ? n : ((const tb_tensor_desc_t *)hdr)->nbytes;
    *seq = head;
    tb_fence_sc(); /* commit before reading "sleepers": see docs/ring.md */
    return TB_ST_OK;
}

/* ---- reading (docs/ring.md, "Subscribing") ----------------------------- */

/* Consume the current message: publish the new cursor position and, on
 * block rings, wake publishers that sleep waiting for credit. A queue-group
 * member claims the message by CAS instead; r->claimed says whether it won
 * (else another member has it). */
static inline void tb_ring_advance(tb_ring_t *v, tb_reader_t *r) {
    if (r->group) {
        r->claimed = tb_cas64(&r->cur->position, r->pos, r->pos + 1);
        r->pos += 1;
        if (!r->claimed)
            return;
    } else {
        r->pos += 1;
        tb_store_rel64(&r->cur->position, r->pos);
    }
    tb_fetch_add_u64(&r->cur->received, 1);
    r->stall_since = 0;
    if (v->policy == TB_POLICY_BLOCK) {
        tb_fence_sc();
        tb_ring_wake_publishers(v);
    }
}

/* Locate the next message. Block rings: *out is the slot itself. Overwrite
 * rings: the slot was copied to r->scratch and validated. */
static inline int tb_ring_poll(tb_ring_t *v, tb_reader_t *r, tb_slot_header_t **out) {
    tb_slot_header_t *s;
    int64_t c, c2, seqv, head, jump;
    uint32_t n;
    if (r->latest) {
        head = tb_load_acq64(&v->h->head);
        if (head - 1 > r->pos) {
            r->pos = head - 1; /* older values are superseded, not lost */
            tb_store_rel64(&r->cur->position, r->pos);
        }
    }
    for (;;) {
        /* An evicted cursor no longer holds publishers back, so its next
         * slots may be rewritten under it: stop at once. */
        if (tb_load_rlx32(&r->cur->state) == TB_CURSOR_EVICTED)
            return TB_ST_EVICTED;
        s = tb_slot_at(v, r->pos);
        c = tb_load_acq64(&s->commit);
        if (v->policy == TB_POLICY_BLOCK) {
            if (c == r->pos) {
                if (s->type == TB_MSG_PAD) {
                    tb_ring_advance(v, r);
                    continue;
                }
                *out = s;
                return TB_ST_OK;
            }
        } else if (c == r->pos) {
            n = tb_load_rlx32(&s->length);
            if (n > v->slot_size)
                n = v->slot_size; /* torn read: the re-check below rejects it */
            memcpy(r->scratch, (char *)s, TB_SLOT_HEADER_BYTES + n);
            tb_fence_acq();
            c2 = tb_load_rlx64(&s->commit);
            if (c2 == c) {
                s = (tb_slot_header_t *)r->scratch;
                if (s->type == TB_MSG_PAD || s->length > v->slot_size) {
                    tb_fetch_add_u64(&r->cur->drops, 1);
                    tb_ring_advance(v, r);
                    continue;
                }
                *out = s;
                return TB_ST_OK;
            }
            c = c2; /* overwritten while we copied */
        }
        seqv = c & ~TB_WRITING;
        if (seqv > r->pos && r->group) {
            /* A queue-group member that slept while the others claimed on:
             * catch up with the shared position (only the claim CAS ever
             * moves it). */
            r->pos = tb_load_acq64(&r->cur->position);
            continue;
        }
        if (seqv > r->pos) {
            /* Lapped (overwrite rings; on a block ring only if our cursor
             * was wrongly freed): skip to the middle of the live window, not
             * to the oldest slot, which is the next to be overwritten. */
            head = tb_load_acq64(&v->h->head);
            jump = head - v->capacity / 2;
            if (jump <= r->pos)
                jump = r->pos + 1;
            tb_fetch_add_u64(&r->cur->drops, (uint64_t)(jump - r->pos));
            r->pos = jump;
            tb_store_rel64(&r->cur->position, jump);
            continue;
        }
        if (tb_load_rlx32(&r->cur->state) == TB_CURSOR_EVICTED)
            return TB_ST_EVICTED;
        if (tb_load_acq32(&v->h->closed)) {
            if (tb_load_acq64(&s->commit) == r->pos)
                continue;
            if (tb_load_acq64(&v->h->head) <= r->pos)
                return TB_ST_CLOSED;
        }
        return TB_ST_EMPTY;
    }
}

/* After copying out what tb_ring_poll found: is the message still in its
 * slot? Block rings: always (our cursor pins it); overwrite rings: the slot
 * was not claimed by a newer writer meanwhile. */
static inline int tb_ring_still_there(const tb_ring_t *v, const tb_reader_t *r) {
    if (v->policy == TB_POLICY_BLOCK)
        return 1;
    tb_fence_acq(); /* the copy's loads before the re-check */
    return tb_load_acq64(&tb_slot_at(v, r->pos)->commit) == r->pos;
}

/* ---- crash recovery (docs/ring.md, "Crash safety") --------------------- */

/* Pad `seq` if a dead publisher claimed it and nobody committed it.
 * 1 padded, 0 nothing to do, -1 try again later. */
static inline int tb_ring_pad_claim(tb_ring_t *v, int64_t seq) {
    tb_slot_header_t *s = tb_slot_at(v, seq);
    int64_t c = tb_load_acq64(&s->commit);
    if (v->policy == TB_POLICY_OVERWRITE) {
        if (c != (seq | TB_WRITING))
            return 0;
    } else {
        if (c >= seq || tb_load_acq64(&v->h->head) <= seq)
            return 0; /* committed, or the claim never happened */
        if (c < seq - v->capacity)
            return -1; /* the slot's previous claim is unresolved: pad that first */
        uint32_t n = tb_record_bound(v);
        for (uint32_t i = 0; i < n; i++) {
            uint32_t st = tb_load_acq32(&v->records[i].state);
            if ((st == TB_PUB_CLAIMING || st == TB_PUB_CLAIMED)
                && tb_load_rlx64(&v->records[i].seq) == seq
                && tb_pid_alive(tb_load_rlx32(&v->records[i].owner_pid)))
                return -1;
        }
    }
    s->length = 0;
    s->type = TB_MSG_PAD;
    s->flags = 0;
    s->timestamp_ns = tb_realtime_ns();
    return tb_cas64(&s->commit, c, seq) ? 1 : 0;
}

#endif /* TB_RING_H */
