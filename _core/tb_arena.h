/* tb_arena.h: the tensor arena's allocator and holds, in C so every call is
 * nogil and the critical sections are a few dozen instructions.
 *
 * Allocation: a binary buddy system over `nblocks` minimum blocks, under a
 * robust process-shared mutex (clients allocate directly: a round trip to
 * the daemon per loan would cost 50-280 us). Free lists are LIFO, so a
 * block freed a moment ago (warm in cache and TLB) is the next one handed
 * out. Each block's head entry (`state_order`, one 32-bit store) is the
 * truth; the free lists are derived from it. A process that dies holding
 * the mutex leaves every head entry either before or after its write, so
 * the next locker (EOWNERDEAD) rebuilds the lists by walking the heads.
 * Splits write the new buddy's entry before shrinking the parent's, and
 * merges grow the surviving head last, so a walk never sees a half-done
 * split or merge.
 *
 * Lifetime: `holds` is a bitmap: bit 0 is the owner (the publisher's loan,
 * which becomes the ring's reference on publish), bit i the client in
 * holder slot i. Taking a hold is a CAS that fails on an empty bitmap (a
 * dead block cannot be revived) and then checks the generation (a reused
 * block is refused and the bit given back). Whoever clears the last bit
 * frees the block. A crash leaves the bitmap consistent; the daemon clears
 * a dead client's bit on every block.
 */
#ifndef TB_ARENA_H
#define TB_ARENA_H

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "tb_atomic.h"
#include "tb_layout.h"

typedef struct {
    tb_arena_header_t *h;
    tb_block_t *blocks;
    char *data;
    uint64_t data_size;
    uint32_t nblocks;
    uint32_t min_shift;
    uint32_t max_order;
} tb_arena_t;

#define TB_ST(e) ((e)->state_order & 0xffu)
#define TB_ORDER(e) ((e)->state_order >> 8)
#define TB_SO(state, order) ((uint32_t)(state) | ((uint32_t)(order) << 8))

static inline pthread_mutex_t *tb_arena_mutex(tb_arena_t *a) {
    return (pthread_mutex_t *)a->h->mutex;
}

static inline void tb_list_push(tb_arena_t *a, uint32_t i, uint32_t k) {
    tb_block_t *e = &a->blocks[i];
    uint32_t head = a->h->free_head[k];
    e->prev = TB_NIL;
    e->next = head;
    if (head != TB_NIL)
        a->blocks[head].prev = i;
    a->h->free_head[k] = i;
}

static inline void tb_list_remove(tb_arena_t *a, uint32_t i, uint32_t k) {
    tb_block_t *e = &a->blocks[i];
    if (e->prev != TB_NIL)
        a->blocks[e->prev].next = e->next;
    else
        a->h->free_head[k] = e->next;
    if (e->next != TB_NIL)
        a->blocks[e->next].prev = e->prev;
    e->next = e->prev = TB_NIL;
}

/* The largest order whose block starts at `i` and ends by `nblocks`. */
static inline uint32_t tb_fit_order(tb_arena_t *a, uint32_t i) {
    uint32_t k = 0;
    while (k < a->max_order && (i & ((1u << (k + 1)) - 1)) == 0 && i + (1u << (k + 1)) <= a->nblocks)
        k++;
    return k;
}

/* Rebuild the free lists from the head entries (under the mutex). A used
 * block nobody holds was being freed by a process that died: free it. */
static void tb_arena_rebuild(tb_arena_t *a) {
    uint32_t i = 0, k, st;
    uint64_t used = 0;
    for (k = 0; k < TB_ARENA_MAX_ORDERS; k++)
        a->h->free_head[k] = TB_NIL;
    while (i < a->nblocks) {
        tb_block_t *e = &a->blocks[i];
        st = TB_ST(e);
        k = TB_ORDER(e);
        if (k > a->max_order || (i & ((1u << k) - 1)) || i + (1u << k) > a->nblocks ||
            (st != TB_BLOCK_FREE && st != TB_BLOCK_USED)) {
            /* Never written by a clean split or merge; be safe: the largest
             * block that fits here, free. */
            k = tb_fit_order(a, i);
            st = TB_BLOCK_FREE;
        }
        if (st == TB_BLOCK_USED && tb_load_acq_u64(&e->holds) == 0)
            st = TB_BLOCK_FREE;
        e->state_order = TB_SO(st, k);
        if (st == TB_BLOCK_FREE)
            tb_list_push(a, i, k);
        else
            used += (uint64_t)1 << (k + a->min_shift);
        i += 1u << k;
    }
    a->h->used_bytes = used;
    a->h->repairs++;
}

/* 0, or an errno value from pthread_mutex_lock. */
static inline int tb_arena_lock(tb_arena_t *a) {
    int rc = pthread_mutex_lock(tb_arena_mutex(a));
    if (rc == EOWNERDEAD) {
        tb_arena_rebuild(a);
        pthread_mutex_consistent(tb_arena_mutex(a));
        rc = 0;
    }
    return rc;
}

static inline void tb_arena_unlock(tb_arena_t *a) {
    pthread_mutex_unlock(tb_arena_mutex(a));
}

/* The creator's initialisation: the mutex and one free list of maximal
 * aligned blocks covering [0, nblocks). */
static int tb_arena_init(tb_arena_t *a) {
    pthread_mutexattr_t attr;
    uint32_t i = 0, k;
    int rc = pthread_mutexattr_init(&attr);
    if (rc)
        return rc;
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    rc = pthread_mutex_init(tb_arena_mutex(a), &attr);
    pthread_mutexattr_destroy(&attr);
    if (rc)
        return rc;
    for (k = 0; k < TB_ARENA_MAX_ORDERS; k++)
        a->h->free_head[k] = TB_NIL;
    while (i < a->nblocks) {
        k = tb_fit_order(a, i);
        a->blocks[i].state_order = TB_SO(TB_BLOCK_FREE, k);
        tb_list_push(a, i, k);
        i += 1u << k;
    }
    return 0;
}

/* Minimum blocks -> order: the smallest k with 2^k blocks >= nbytes. */
static inline int tb_arena_order(tb_arena_t *a, uint64_t nbytes) {
    uint64_t units = (nbytes + ((uint64_t)1 << a->min_shift) - 1) >> a->min_shift;
    int k = 0;
    if (units == 0)
        units = 1;
    while (((uint64_t)1 << k) < units)
        k++;
    return k;
}

/* Allocate a block of at least `nbytes` owned (bit 0) by holder slot
 * `owner`. Returns its index and generation, -1 if there is no space now,
 * -2 if it could never fit, -3 if the mutex failed. */
static int64_t tb_arena_alloc(tb_arena_t *a, uint64_t nbytes, uint32_t owner, uint32_t *gen) {
    int need = tb_arena_order(a, nbytes);
    uint32_t k, i, buddy;
    tb_block_t *e;
    if ((uint32_t)need > a->max_order)
        return -2;
    if (tb_arena_lock(a))
        return -3;
    for (k = need; k <= a->max_order; k++)
        if (a->h->free_head[k] != TB_NIL)
            break;
    if (k > a->max_order) {
        a->h->failed++;
        tb_arena_unlock(a);
        return -1;
    }
    i = a->h->free_head[k];
    tb_list_remove(a, i, k);
    while (k > (uint32_t)need) {
        k--;
        buddy = i + (1u << k);
        a->blocks[buddy].state_order = TB_SO(TB_BLOCK_FREE, k);
        tb_list_push(a, buddy, k);
        __atomic_store_n(&a->blocks[i].state_order, TB_SO(TB_BLOCK_FREE, k), __ATOMIC_RELEASE);
    }
    e = &a->blocks[i];
    e->generation++;
    e->owner = owner;
    e->nbytes = nbytes;
    __atomic_store_n(&e->holds, TB_HOLD_OWNER, __ATOMIC_RELEASE);
    __atomic_store_n(&e->state_order, TB_SO(TB_BLOCK_USED, need), __ATOMIC_RELEASE);
    a->h->used_bytes += (uint64_t)1 << (need + a->min_shift);
    a->h->allocs++;
    *gen = e->generation;
    tb_arena_unlock(a);
    return i;
}

/* Return block `i` of generation `gen` to the free lists, merging buddies.
 * A block that is no longer that allocation (a repair freed it already) is
 * left alone, so a free can never hit someone else's block. */
static void tb_arena_free(tb_arena_t *a, uint32_t i, uint32_t gen) {
    tb_block_t *e = &a->blocks[i];
    uint32_t k, buddy;
    if (tb_arena_lock(a))
        return;
    if (TB_ST(e) != TB_BLOCK_USED || e->generation != gen || tb_load_acq_u64(&e->holds) != 0) {
        tb_arena_unlock(a);
        return;
    }
    k = TB_ORDER(e);
    a->h->used_bytes -= (uint64_t)1 << (k + a->min_shift);
    a->h->frees++;
    while (k < a->max_order) {
        buddy = i ^ (1u << k);
        if (buddy + (1u << k) > a->nblocks ||
            a->blocks[buddy].state_order != TB_SO(TB_BLOCK_FREE, k))
            break;
        tb_list_remove(a, buddy, k);
        if (buddy < i)
            i = buddy;
        k++;
    }
    __atomic_store_n(&a->blocks[i].state_order, TB_SO(TB_BLOCK_FREE, k), __ATOMIC_RELEASE);
    tb_list_push(a, i, k);
    tb_arena_unlock(a);
}

/* Clear `bits` of block `i` (taken at generation `gen`); free it if they
 * were the last. Returns 1 if this call freed the block. */
static inline int tb_arena_drop(tb_arena_t *a, uint32_t i, uint32_t gen, uint64_t bits) {
    uint64_t old = tb_fetch_and_u64(&a->blocks[i].holds, ~bits);
    if ((old & bits) && (old & ~bits) == 0) {
        tb_arena_free(a, i, gen);
        return 1;
    }
    return 0;
}

/* Drop the owner's reference (bit 0) of allocation `gen` of block `i`, if
 * it still has it. Returns 1 if dropped. Under the lock: the generation
 * only changes there, so the check and the clear cannot straddle a free
 * and a new allocation of the block (whose owner bit this must not take). */
static inline int tb_arena_drop_owner(tb_arena_t *a, uint32_t i, uint32_t gen) {
    tb_block_t *e = &a->blocks[i];
    uint64_t old;
    if (i >= a->nblocks || __atomic_load_n(&e->generation, __ATOMIC_ACQUIRE) != gen)
        return 0;
    if (tb_arena_lock(a))
        return 0;
    if (e->generation != gen || TB_ST(e) != TB_BLOCK_USED) {
        tb_arena_unlock(a);
        return 0;
    }
    old = tb_fetch_and_u64(&e->holds, ~TB_HOLD_OWNER);
    tb_arena_unlock(a);
    if (!(old & TB_HOLD_OWNER))
        return 0;
    if (old == TB_HOLD_OWNER)
        tb_arena_free(a, i, gen);
    return 1;
}

/* Set `bit` on allocation `gen` of block `i`. 1: held; 0: that allocation
 * is gone (freed, or the block was reused). */
static inline int tb_arena_hold(tb_arena_t *a, uint32_t i, uint32_t gen, uint64_t bit) {
    tb_block_t *e;
    uint64_t old;
    if (i >= a->nblocks)
        return 0;
    e = &a->blocks[i];
    old = tb_load_acq_u64(&e->holds);
    do {
        if (old == 0)
            return 0; /* dead: nobody may revive it */
    } while (!tb_cas_u64(&e->holds, &old, old | bit));
    if (__atomic_load_n(&e->generation, __ATOMIC_ACQUIRE) != gen) {
        /* A newer allocation: give the bit back (and free it if we were the
         * last holder of that allocation, which is ours to free then). */
        uint32_t now_gen = __atomic_load_n(&e->generation, __ATOMIC_ACQUIRE);
        if (!(old & bit))
            tb_arena_drop(a, i, now_gen, bit);
        return 0;
    }
    return 1;
}

#endif /* TB_ARENA_H */
