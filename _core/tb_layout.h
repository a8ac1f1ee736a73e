/* tb_layout.h: the byte layout of a ring segment. Every process that maps a
 * ring agrees on these structs; docs/ring.md explains the protocol. Fields
 * written by different processes at high rates sit on different 64-byte
 * lines so they do not false-share.
 */
#ifndef TB_LAYOUT_H
#define TB_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

#define TB_RING_MAGIC 0x314752425342ULL /* "BSBRG1" */
#define TB_RING_VERSION 3u
#define TB_HEADER_BYTES 512u
#define TB_CURSOR_BYTES 384u
#define TB_PUBLISHER_BYTES 64u
#define TB_SLOT_HEADER_BYTES 32u
#define TB_SLOTS_ALIGN 4096u
/* Marks a slot's commit word while an overwrite-ring writer fills it. */
#define TB_WRITING (1LL << 62)
/* Delivery-latency histogram of a cursor: bucket i counts latencies in
 * [2^((i + TB_LAT_FIRST) / 2), 2^((i + TB_LAT_FIRST + 1) / 2)) ns, half an
 * octave each, from 64 ns; the last bucket also takes everything above. */
#define TB_LAT_BUCKETS 48u
#define TB_LAT_FIRST 12u
#define TB_BELLS_MAGIC 0x314c4c4542425354ULL /* "TSBBELL1" */
#define TB_BELLS_VERSION 1u
#define TB_BELL_BYTES 64u

enum { TB_POLICY_BLOCK = 1, TB_POLICY_OVERWRITE = 2 };
enum { TB_CURSOR_FREE = 0, TB_CURSOR_JOINING = 1, TB_CURSOR_ACTIVE = 2, TB_CURSOR_EVICTED = 3 };
enum { TB_PUB_FREE = 0, TB_PUB_IDLE = 1, TB_PUB_CLAIMING = 2, TB_PUB_CLAIMED = 3 };
/* A slot holds raw bytes (INLINE), nothing (PAD: a dead publisher's hole),
 * a tensor descriptor followed by the tensor's bytes (TENSOR), or a
 * descriptor of a tensor in the arena (ARENA). */
enum { TB_MSG_INLINE = 0, TB_MSG_PAD = 1, TB_MSG_TENSOR = 2, TB_MSG_ARENA = 3 };
/* BOTH: a queue group's bell while a bridge serves it for other hosts:
 * its members sleep on the futex and the bridge watches the FIFO. */
enum { TB_BELL_FUTEX = 0, TB_BELL_FIFO = 1, TB_BELL_BOTH = 2 };
/* Slot flags: the low byte is the application's; tensorbus uses the high
 * byte. BRIDGED: published by a bridge from another host (a mesh daemon
 * never forwards it again; a hub relays it by the rules of
 * broker/hubs.py). GAP: an INLINE gap marker a bridge publishes where
 * messages were lost with a link (subscribers raise GapError). FROM_HUB:
 * bridged from a hub (a hub never relays it to another hub). HOPS: how
 * many links the message crossed to reach this ring (bits 8..11; it
 * crosses the wire in the batch entry's flags, and a receiver drops one
 * past the cluster's diameter). */
enum { TB_SLOT_BRIDGED = 0x8000, TB_SLOT_GAP = 0x4000, TB_SLOT_FROM_HUB = 0x2000,
       TB_SLOT_HOPS = 0x0F00, TB_SLOT_HOPS_SHIFT = 8 };
/* cursor flags */
enum { TB_CURSOR_LATEST = 1, /* reads only the newest message (QoS "latest") */
       TB_CURSOR_GROUP = 2 };  /* shared by a queue group: members claim each message by CAS */
/* The header's closed word: why the ring is closed. The magic, the version
 * and this word keep their offsets (0, 8, 192) in every release, so a
 * restarted broker can close a ring of any layout before it sweeps it. */
enum { TB_OPEN = 0, TB_CLOSED = 1, TB_CLOSED_RESTARTED = 2 };
/* ring flags */
enum { TB_RING_KEEP_LAST = 1 }; /* the newest message's arena block outlives its readers (QoS "latest") */

typedef struct {
    uint32_t seq;      /* bumped by every wake; the futex word */
    uint32_t sleeping; /* waiters between "announce" and "woken" */
    uint32_t kind;     /* TB_BELL_FUTEX (a cursor's own bell is always one) */
    uint32_t _reserved;
} tb_doorbell_t;

/* A doorbell in the broker's bell table: one per subscription, named by the
 * cursors of every ring that subscription reads, so one waiter can sleep on
 * several rings. Futex bells wake sync waiters; FIFO bells wake an asyncio
 * loop through a named pipe it watches with add_reader. */
typedef struct {
    uint32_t seq;        /* bumped by every wake; the futex word */
    uint32_t sleeping;   /* waiters between "announce" and "woken" */
    uint32_t kind;       /* TB_BELL_FUTEX, TB_BELL_FIFO or TB_BELL_BOTH */
    uint32_t generation; /* bumped by the broker on every reuse */
    uint32_t notice;     /* the broker has news for this subscription */
    uint32_t owner_pid;
    char _pad[40];
} tb_bell_t;

typedef struct {
    uint64_t magic;
    uint32_t version;
    uint32_t count;      /* bells after this 64-byte header */
    uint32_t creator_pid;
    char _pad[44];
} tb_bells_header_t;

typedef struct {
    /* lines 0-1: written once by the creator */
    uint64_t magic;
    uint32_t version;
    uint32_t policy;
    uint32_t capacity;        /* slots, a power of two */
    uint32_t slot_size;       /* largest payload of one slot, bytes */
    uint32_t slot_stride;     /* bytes from one slot to the next */
    uint32_t max_cursors;
    uint32_t max_publishers;
    uint32_t creator_pid;
    uint64_t segment_size;
    uint64_t cursors_offset;
    uint64_t publishers_offset;
    uint64_t slots_offset;
    int64_t created_ns;       /* CLOCK_REALTIME */
    uint32_t flags;           /* TB_RING_KEEP_LAST */
    char _pad0[128 - 84];
    /* line 2: the next sequence to claim, hot for every publisher */
    int64_t head;
    char _pad1[56];
    /* line 3: read on every publish, written rarely */
    uint32_t closed;          /* TB_OPEN, TB_CLOSED or TB_CLOSED_RESTARTED */
    uint32_t cursor_hwm;      /* cursor entries [0, hwm) may be in use */
    uint32_t publisher_hwm;   /* publisher records [0, hwm) may be in use */
    uint32_t sleepers;        /* subscribers of this ring inside futex_wait */
    /* arena rings: sequences below this have had their block references
     * dropped (or are being dropped); sweeps start here */
    int64_t reclaim_hint;
    /* request topics: members of the queue group reading this ring (the
     * broker keeps it), so a request with nobody to answer fails at once */
    uint32_t responders;
    char _pad2[36];
    /* line 4: publishers waiting for credit sleep here (block rings) */
    tb_doorbell_t space;
    char _pad3[48];
} tb_ring_header_t;

typedef struct {
    /* line 0: written by the owning subscriber on every message */
    int64_t position;         /* next sequence this subscriber reads */
    uint64_t drops;           /* messages lost to overwriting (overwrite rings) */
    uint64_t received;
    char _pad0[40];
    /* line 1: written on join, leave and sleep */
    uint32_t state;           /* TB_CURSOR_* */
    uint32_t generation;      /* bumped on every join: stale handles notice */
    uint32_t owner_pid;
    uint32_t bell_ref;        /* 0: ring `bell` below; i + 1: bell i of the broker's table */
    tb_doorbell_t bell;       /* the wake-up word of a subscriber without a bell table */
    uint32_t flags;           /* TB_CURSOR_LATEST, TB_CURSOR_GROUP */
    char _pad1[28];
    /* lines 2-4: delivery latency (publish timestamp to receive), written by the owner */
    uint32_t latency[TB_LAT_BUCKETS];
    char _pad2[64];
} tb_cursor_t;

typedef struct {
    uint32_t state;           /* TB_PUB_* */
    uint32_t owner_pid;
    int64_t seq;              /* the sequence being claimed or held */
    uint64_t published;
    uint64_t dropped;         /* overwrite rings: own messages overtaken in flight */
    uint64_t bytes;           /* payload bytes published */
    char _pad[24];
} tb_publisher_t;

typedef struct {
    int64_t commit;           /* block: seq once committed; overwrite: seqlock word */
    uint32_t length;
    uint16_t type;            /* TB_MSG_* */
    uint16_t flags;           /* low byte the application's; TB_SLOT_BRIDGED, _GAP, _FROM_HUB, _HOPS */
    int64_t timestamp_ns;     /* CLOCK_REALTIME at publish */
    uint32_t publisher;       /* publisher record index */
    uint32_t _reserved;
} tb_slot_header_t;

/* ---- tensors and the arena (docs/arena.md) ---------------------------- */

#define TB_DESC_BYTES 160u
#define TB_MAX_NDIM 8u
#define TB_META_BYTES 32u
#define TB_DTYPE_BYTES 16u
#define TB_NO_BLOCK 0xFFFFFFFFu

/* The first bytes of a TENSOR or ARENA slot's payload. */
typedef struct {
    uint32_t block;             /* arena block index; TB_NO_BLOCK when inline */
    uint32_t generation;        /* the block's generation when it was published */
    uint64_t offset;            /* arena: byte offset of the data in the data segment */
    uint64_t nbytes;            /* bytes of tensor data */
    /* arena: the sequence whose ring reference is still to be dropped, or -1
     * once dropped. Whoever CASes it from its sequence to -1 drops it, so the
     * reference is dropped exactly once even if the slot is being reused. */
    int64_t reclaim;
    char dtype[TB_DTYPE_BYTES]; /* numpy dtype.str ("<f4"), "bfloat16" or "bytes" */
    uint32_t ndim;
    uint32_t _reserved;
    int64_t shape[TB_MAX_NDIM];
    uint8_t meta[TB_META_BYTES];  /* the application's (DDP: step, bucket, chunk...) */
    char _pad[8];
} tb_tensor_desc_t;

#define TB_ARENA_MAGIC 0x314e455241425354ULL /* "TSBAREN1" */
#define TB_ARENA_VERSION 1u
#define TB_ARENA_HEADER_BYTES 4096u
#define TB_ARENA_BLOCK_BYTES 64u
#define TB_ARENA_MAX_ORDERS 48u
#define TB_ARENA_MAX_BLOCKS 65536u
#define TB_HOLD_OWNER 1ULL /* bit 0 of `holds`: the loan, then the ring's reference */
#define TB_MAX_HOLDERS 63u /* bits 1..63: one per client holding views */
#define TB_NIL 0xFFFFFFFFu

enum { TB_BLOCK_FREE = 0, TB_BLOCK_USED = 1 };

/* The arena's metadata segment: this header, then one entry per minimum
 * block. The data lives in a separate segment. The allocator is a buddy
 * system under a robust process-shared mutex; each block's head entry is
 * the truth (`state_order` = state | order << 8, written in one store), so a
 * process that dies inside the lock leaves something a walk can rebuild
 * the free lists from. */
typedef struct {
    uint64_t magic;
    uint32_t version;
    uint32_t nblocks;          /* minimum blocks, each with an entry */
    uint32_t min_shift;        /* log2 of the minimum block size */
    uint32_t max_order;        /* largest block: 2^max_order minimum blocks */
    uint32_t creator_pid;
    uint32_t _pad0;
    uint64_t data_size;        /* bytes of the data segment */
    char _pad1[64 - 40];
    /* line 1..: under the mutex */
    char mutex[64];            /* pthread_mutex_t, robust and process-shared */
    uint32_t free_head[TB_ARENA_MAX_ORDERS]; /* per order, TB_NIL if empty */
    uint64_t used_bytes;       /* sum of allocated block sizes */
    uint64_t allocs;
    uint64_t frees;
    uint64_t failed;           /* allocations that found no space */
    uint64_t repairs;          /* free lists rebuilt after a holder died */
} tb_arena_header_t;

typedef struct {
    /* Who keeps the block alive: bit 0 its owner (the publisher's loan,
     * then the ring), bit i the client in holder slot i. Changed with
     * CAS / fetch_and, so a crash leaves it consistent. */
    uint64_t holds;
    uint32_t generation;       /* bumped on every allocation */
    uint32_t state_order;      /* head entries: state | order << 8 */
    uint32_t next;             /* free list links (free head entries) */
    uint32_t prev;
    uint32_t owner;            /* holder slot of the client that allocated it */
    uint32_t _pad0;
    uint64_t nbytes;           /* bytes asked for */
    char _pad[64 - 40];
} tb_block_t;

_Static_assert(sizeof(tb_ring_header_t) <= TB_HEADER_BYTES, "ring header too large");
_Static_assert(offsetof(tb_ring_header_t, magic) == 0 && offsetof(tb_ring_header_t, version) == 8
               && offsetof(tb_ring_header_t, closed) == 192,
               "magic, version and closed keep their offsets in every release");
_Static_assert(sizeof(tb_cursor_t) == TB_CURSOR_BYTES, "cursor entry must be 384 B");
_Static_assert(sizeof(tb_publisher_t) == TB_PUBLISHER_BYTES, "publisher record must be 64 B");
_Static_assert(sizeof(tb_bell_t) == TB_BELL_BYTES, "bell must be 64 B");
_Static_assert(sizeof(tb_bells_header_t) == 64, "bell table header must be 64 B");
_Static_assert(sizeof(tb_slot_header_t) == TB_SLOT_HEADER_BYTES, "slot header must be 32 B");

_Static_assert(sizeof(tb_tensor_desc_t) == TB_DESC_BYTES, "tensor descriptor must be 160 B");
_Static_assert(sizeof(tb_arena_header_t) <= TB_ARENA_HEADER_BYTES, "arena header too large");
_Static_assert(sizeof(tb_block_t) == TB_ARENA_BLOCK_BYTES, "block entry must be 64 B");

#endif /* TB_LAYOUT_H */
