# The ring segment's byte layout (tb_layout.h). Fields that different
# processes write often live on separate 64-byte lines; see docs/ring.md for
# the protocol that reads and writes them.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "tb_layout.h" nogil:
    uint64_t TB_RING_MAGIC
    uint32_t TB_RING_VERSION
    uint32_t TB_HEADER_BYTES
    uint32_t TB_CURSOR_BYTES
    uint32_t TB_PUBLISHER_BYTES
    uint32_t TB_SLOT_HEADER_BYTES
    uint32_t TB_SLOTS_ALIGN
    int64_t TB_WRITING
    uint32_t TB_LAT_BUCKETS
    uint32_t TB_LAT_FIRST
    uint64_t TB_BELLS_MAGIC
    uint32_t TB_BELLS_VERSION
    uint32_t TB_BELL_BYTES

    enum:
        TB_POLICY_BLOCK
        TB_POLICY_OVERWRITE
        TB_CURSOR_FREE
        TB_CURSOR_JOINING
        TB_CURSOR_ACTIVE
        TB_CURSOR_EVICTED
        TB_PUB_FREE
        TB_PUB_IDLE
        TB_PUB_CLAIMING
        TB_PUB_CLAIMED
        TB_MSG_INLINE
        TB_MSG_PAD
        TB_BELL_FUTEX
        TB_BELL_FIFO
        TB_BELL_BOTH
        TB_CURSOR_LATEST
        TB_CURSOR_GROUP
        TB_RING_KEEP_LAST
        TB_OPEN
        TB_CLOSED
        TB_CLOSED_RESTARTED
        TB_SLOT_BRIDGED
        TB_SLOT_GAP
        TB_SLOT_FROM_HUB
        TB_SLOT_HOPS
        TB_SLOT_HOPS_SHIFT

    ctypedef struct tb_doorbell_t:
        uint32_t seq          # bumped by every wake; the futex word
        uint32_t sleeping     # waiters that announced they will sleep
        uint32_t kind         # TB_BELL_FUTEX

    ctypedef struct tb_bell_t:
        uint32_t seq          # bumped by every wake; the futex word
        uint32_t sleeping     # waiters that announced they will sleep
        uint32_t kind         # TB_BELL_FUTEX, TB_BELL_FIFO or TB_BELL_BOTH
        uint32_t generation   # bumped by the broker on each reuse
        uint32_t notice       # the broker has news for this subscription
        uint32_t owner_pid

    ctypedef struct tb_bells_header_t:
        uint64_t magic
        uint32_t version
        uint32_t count        # bells after the 64-byte header
        uint32_t creator_pid

    ctypedef struct tb_ring_header_t:
        uint64_t magic
        uint32_t version
        uint32_t policy       # TB_POLICY_BLOCK or TB_POLICY_OVERWRITE
        uint32_t capacity     # slots, a power of two
        uint32_t slot_size    # largest payload of one slot
        uint32_t slot_stride  # slot header + payload, 64-byte multiple
        uint32_t max_cursors
        uint32_t max_publishers
        uint32_t creator_pid
        uint64_t segment_size
        uint64_t cursors_offset
        uint64_t publishers_offset
        uint64_t slots_offset
        int64_t created_ns
        uint32_t flags        # TB_RING_KEEP_LAST
        int64_t head          # next sequence to claim (own line)
        uint32_t closed       # set once (TB_CLOSED or TB_CLOSED_RESTARTED); wakes everyone
        uint32_t cursor_hwm   # publishers scan cursors [0, hwm)
        uint32_t publisher_hwm
        uint32_t sleepers     # subscribers inside futex_wait: publishers wake only if > 0
        int64_t reclaim_hint  # arena block references below this sequence are dropped
        uint32_t responders   # request topics: queue-group members reading the ring
        tb_doorbell_t space   # publishers waiting for credit sleep here

    ctypedef struct tb_cursor_t:
        int64_t position      # next sequence to read; the subscriber's credit
        uint64_t drops        # messages lost to overwriting
        uint64_t received
        uint32_t state        # TB_CURSOR_*
        uint32_t generation   # bumped on each join
        uint32_t owner_pid    # liveness: a dead owner's cursor is freed by repair
        uint32_t bell_ref     # 0: `bell` below; i + 1: bell i of the broker's table
        tb_doorbell_t bell    # wake-up word of a subscriber without a bell table
        uint32_t flags        # TB_CURSOR_LATEST
        uint32_t latency[48]  # delivery-latency histogram, half-octave buckets from 64 ns

    ctypedef struct tb_publisher_t:
        uint32_t state        # TB_PUB_*: repair pads the claim of a dead owner
        uint32_t owner_pid
        int64_t seq           # the sequence being claimed or held
        uint64_t published
        uint64_t dropped
        uint64_t bytes        # payload bytes published

    ctypedef struct tb_slot_header_t:
        int64_t commit        # block: seq when committed; overwrite: seqlock word
        uint32_t length
        uint16_t type         # TB_MSG_*
        uint16_t flags        # the application's
        int64_t timestamp_ns
        uint32_t publisher

    # -- tensors and the arena ---------------------------------------------
    uint32_t TB_DESC_BYTES
    uint32_t TB_MAX_NDIM
    uint32_t TB_META_BYTES
    uint32_t TB_DTYPE_BYTES
    uint32_t TB_NO_BLOCK
    uint64_t TB_ARENA_MAGIC
    uint32_t TB_ARENA_VERSION
    uint32_t TB_ARENA_HEADER_BYTES
    uint32_t TB_ARENA_BLOCK_BYTES
    uint32_t TB_ARENA_MAX_ORDERS
    uint32_t TB_ARENA_MAX_BLOCKS
    uint64_t TB_HOLD_OWNER
    uint32_t TB_MAX_HOLDERS
    uint32_t TB_NIL

    enum:
        TB_MSG_TENSOR
        TB_MSG_ARENA
        TB_BLOCK_FREE
        TB_BLOCK_USED

    ctypedef struct tb_tensor_desc_t:
        uint32_t block        # arena block; TB_NO_BLOCK when the data follows inline
        uint32_t generation   # the block's generation at publish: holds check it
        uint64_t offset       # byte offset of the data in the arena's data segment
        uint64_t nbytes
        int64_t reclaim       # the sequence whose ring reference is pending, -1 once dropped
        char dtype[16]        # numpy dtype.str, "bfloat16" or "bytes"
        uint32_t ndim
        int64_t shape[8]
        uint8_t meta[32]      # the application's

    ctypedef struct tb_arena_header_t:
        uint64_t magic
        uint32_t version
        uint32_t nblocks      # minimum blocks (one entry each)
        uint32_t min_shift    # log2 of the minimum block size
        uint32_t max_order    # largest block: 2^max_order minimum blocks
        uint32_t creator_pid
        uint64_t data_size
        char mutex[64]        # robust, process-shared pthread mutex
        uint32_t free_head[48]  # per order; TB_NIL when empty
        uint64_t used_bytes
        uint64_t allocs
        uint64_t frees
        uint64_t failed
        uint64_t repairs

    ctypedef struct tb_block_t:
        uint64_t holds        # bit 0 owner/ring, bit i holder slot i
        uint32_t generation   # bumped by every allocation
        uint32_t state_order  # head entries: state | order << 8
        uint32_t next         # free-list links
        uint32_t prev
        uint32_t owner        # holder slot of the allocating client
        uint64_t nbytes
