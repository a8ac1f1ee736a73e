"""The byte layout of the shared segments, as this build's C compiler lays
it out from tb_layout.h: every field's offset and size, and the constants a
client needs (magics, versions, state values, flag bits).

It exists for clients written in other languages and for the docs:
docs/ring.md, docs/arena.md and docs/protocol.md carry the same numbers as
tables, and tests/test_layout_docs.py checks them against :func:`layout`, so
the docs cannot drift from the code. Nothing here is on a hot path.
"""

cdef extern from *:
    """
    #include <stddef.h>
    #include "tb_layout.h"

    /* One row per field. The name is the member designator itself (#f), so
     * a row cannot name a field the compiler did not place. */
    typedef struct { const char *name; size_t offset; size_t size; } tb_field_info_t;
    typedef struct { const char *name; unsigned long long value; } tb_const_info_t;
    #define TB_FIELD(T, f) {#f, offsetof(T, f), sizeof(((T *)0)->f)}
    #define TB_CONST(c) {#c, (unsigned long long)(c)}
    #define TB_COUNT(a) (sizeof(a) / sizeof((a)[0]))

    static const tb_field_info_t tb_info_ring_header[] = {
        TB_FIELD(tb_ring_header_t, magic),
        TB_FIELD(tb_ring_header_t, version),
        TB_FIELD(tb_ring_header_t, policy),
        TB_FIELD(tb_ring_header_t, capacity),
        TB_FIELD(tb_ring_header_t, slot_size),
        TB_FIELD(tb_ring_header_t, slot_stride),
        TB_FIELD(tb_ring_header_t, max_cursors),
        TB_FIELD(tb_ring_header_t, max_publishers),
        TB_FIELD(tb_ring_header_t, creator_pid),
        TB_FIELD(tb_ring_header_t, segment_size),
        TB_FIELD(tb_ring_header_t, cursors_offset),
        TB_FIELD(tb_ring_header_t, publishers_offset),
        TB_FIELD(tb_ring_header_t, slots_offset),
        TB_FIELD(tb_ring_header_t, created_ns),
        TB_FIELD(tb_ring_header_t, flags),
        TB_FIELD(tb_ring_header_t, head),
        TB_FIELD(tb_ring_header_t, closed),
        TB_FIELD(tb_ring_header_t, cursor_hwm),
        TB_FIELD(tb_ring_header_t, publisher_hwm),
        TB_FIELD(tb_ring_header_t, sleepers),
        TB_FIELD(tb_ring_header_t, reclaim_hint),
        TB_FIELD(tb_ring_header_t, responders),
        TB_FIELD(tb_ring_header_t, space),
    };
    static const tb_field_info_t tb_info_doorbell[] = {
        TB_FIELD(tb_doorbell_t, seq),
        TB_FIELD(tb_doorbell_t, sleeping),
        TB_FIELD(tb_doorbell_t, kind),
    };
    static const tb_field_info_t tb_info_cursor[] = {
        TB_FIELD(tb_cursor_t, position),
        TB_FIELD(tb_cursor_t, drops),
        TB_FIELD(tb_cursor_t, received),
        TB_FIELD(tb_cursor_t, state),
        TB_FIELD(tb_cursor_t, generation),
        TB_FIELD(tb_cursor_t, owner_pid),
        TB_FIELD(tb_cursor_t, bell_ref),
        TB_FIELD(tb_cursor_t, bell),
        TB_FIELD(tb_cursor_t, flags),
        TB_FIELD(tb_cursor_t, latency),
    };
    static const tb_field_info_t tb_info_publisher[] = {
        TB_FIELD(tb_publisher_t, state),
        TB_FIELD(tb_publisher_t, owner_pid),
        TB_FIELD(tb_publisher_t, seq),
        TB_FIELD(tb_publisher_t, published),
        TB_FIELD(tb_publisher_t, dropped),
        TB_FIELD(tb_publisher_t, bytes),
    };
    static const tb_field_info_t tb_info_slot_header[] = {
        TB_FIELD(tb_slot_header_t, commit),
        TB_FIELD(tb_slot_header_t, length),
        TB_FIELD(tb_slot_header_t, type),
        TB_FIELD(tb_slot_header_t, flags),
        TB_FIELD(tb_slot_header_t, timestamp_ns),
        TB_FIELD(tb_slot_header_t, publisher),
    };
    static const tb_field_info_t tb_info_bells_header[] = {
        TB_FIELD(tb_bells_header_t, magic),
        TB_FIELD(tb_bells_header_t, version),
        TB_FIELD(tb_bells_header_t, count),
        TB_FIELD(tb_bells_header_t, creator_pid),
    };
    static const tb_field_info_t tb_info_bell[] = {
        TB_FIELD(tb_bell_t, seq),
        TB_FIELD(tb_bell_t, sleeping),
        TB_FIELD(tb_bell_t, kind),
        TB_FIELD(tb_bell_t, generation),
        TB_FIELD(tb_bell_t, notice),
        TB_FIELD(tb_bell_t, owner_pid),
    };
    static const tb_field_info_t tb_info_tensor_desc[] = {
        TB_FIELD(tb_tensor_desc_t, block),
        TB_FIELD(tb_tensor_desc_t, generation),
        TB_FIELD(tb_tensor_desc_t, offset),
        TB_FIELD(tb_tensor_desc_t, nbytes),
        TB_FIELD(tb_tensor_desc_t, reclaim),
        TB_FIELD(tb_tensor_desc_t, dtype),
        TB_FIELD(tb_tensor_desc_t, ndim),
        TB_FIELD(tb_tensor_desc_t, shape),
        TB_FIELD(tb_tensor_desc_t, meta),
    };
    static const tb_field_info_t tb_info_arena_header[] = {
        TB_FIELD(tb_arena_header_t, magic),
        TB_FIELD(tb_arena_header_t, version),
        TB_FIELD(tb_arena_header_t, nblocks),
        TB_FIELD(tb_arena_header_t, min_shift),
        TB_FIELD(tb_arena_header_t, max_order),
        TB_FIELD(tb_arena_header_t, creator_pid),
        TB_FIELD(tb_arena_header_t, data_size),
        TB_FIELD(tb_arena_header_t, mutex),
        TB_FIELD(tb_arena_header_t, free_head),
        TB_FIELD(tb_arena_header_t, used_bytes),
        TB_FIELD(tb_arena_header_t, allocs),
        TB_FIELD(tb_arena_header_t, frees),
        TB_FIELD(tb_arena_header_t, failed),
        TB_FIELD(tb_arena_header_t, repairs),
    };
    static const tb_field_info_t tb_info_block[] = {
        TB_FIELD(tb_block_t, holds),
        TB_FIELD(tb_block_t, generation),
        TB_FIELD(tb_block_t, state_order),
        TB_FIELD(tb_block_t, next),
        TB_FIELD(tb_block_t, prev),
        TB_FIELD(tb_block_t, owner),
        TB_FIELD(tb_block_t, nbytes),
    };

    typedef struct {
        const char *name;   /* the key in layout()["structs"] */
        const char *ctype;  /* its typedef in tb_layout.h */
        size_t size;
        const tb_field_info_t *fields;
        size_t nfields;
    } tb_struct_info_t;
    #define TB_STRUCT(name, T) {#name, #T, sizeof(T), tb_info_##name, TB_COUNT(tb_info_##name)}

    static const tb_struct_info_t tb_info_structs[] = {
        TB_STRUCT(ring_header, tb_ring_header_t),
        TB_STRUCT(doorbell, tb_doorbell_t),
        TB_STRUCT(cursor, tb_cursor_t),
        TB_STRUCT(publisher, tb_publisher_t),
        TB_STRUCT(slot_header, tb_slot_header_t),
        TB_STRUCT(bells_header, tb_bells_header_t),
        TB_STRUCT(bell, tb_bell_t),
        TB_STRUCT(tensor_desc, tb_tensor_desc_t),
        TB_STRUCT(arena_header, tb_arena_header_t),
        TB_STRUCT(block, tb_block_t),
    };
    static const size_t tb_info_nstructs = TB_COUNT(tb_info_structs);

    static const tb_const_info_t tb_info_constants[] = {
        TB_CONST(TB_RING_MAGIC), TB_CONST(TB_RING_VERSION),
        TB_CONST(TB_HEADER_BYTES), TB_CONST(TB_CURSOR_BYTES), TB_CONST(TB_PUBLISHER_BYTES),
        TB_CONST(TB_SLOT_HEADER_BYTES), TB_CONST(TB_SLOTS_ALIGN), TB_CONST(TB_WRITING),
        TB_CONST(TB_LAT_BUCKETS), TB_CONST(TB_LAT_FIRST),
        TB_CONST(TB_BELLS_MAGIC), TB_CONST(TB_BELLS_VERSION), TB_CONST(TB_BELL_BYTES),
        TB_CONST(TB_POLICY_BLOCK), TB_CONST(TB_POLICY_OVERWRITE),
        TB_CONST(TB_CURSOR_FREE), TB_CONST(TB_CURSOR_JOINING), TB_CONST(TB_CURSOR_ACTIVE),
        TB_CONST(TB_CURSOR_EVICTED),
        TB_CONST(TB_PUB_FREE), TB_CONST(TB_PUB_IDLE), TB_CONST(TB_PUB_CLAIMING),
        TB_CONST(TB_PUB_CLAIMED),
        TB_CONST(TB_MSG_INLINE), TB_CONST(TB_MSG_PAD), TB_CONST(TB_MSG_TENSOR),
        TB_CONST(TB_MSG_ARENA), TB_CONST(TB_SLOT_BRIDGED), TB_CONST(TB_SLOT_GAP),
        TB_CONST(TB_SLOT_FROM_HUB), TB_CONST(TB_SLOT_HOPS), TB_CONST(TB_SLOT_HOPS_SHIFT),
        TB_CONST(TB_BELL_FUTEX), TB_CONST(TB_BELL_FIFO), TB_CONST(TB_BELL_BOTH),
        TB_CONST(TB_CURSOR_LATEST), TB_CONST(TB_CURSOR_GROUP), TB_CONST(TB_RING_KEEP_LAST),
        TB_CONST(TB_OPEN), TB_CONST(TB_CLOSED), TB_CONST(TB_CLOSED_RESTARTED),
        TB_CONST(TB_DESC_BYTES), TB_CONST(TB_MAX_NDIM), TB_CONST(TB_META_BYTES),
        TB_CONST(TB_DTYPE_BYTES), TB_CONST(TB_NO_BLOCK),
        TB_CONST(TB_ARENA_MAGIC), TB_CONST(TB_ARENA_VERSION), TB_CONST(TB_ARENA_HEADER_BYTES),
        TB_CONST(TB_ARENA_BLOCK_BYTES), TB_CONST(TB_ARENA_MAX_ORDERS),
        TB_CONST(TB_ARENA_MAX_BLOCKS), TB_CONST(TB_HOLD_OWNER), TB_CONST(TB_MAX_HOLDERS),
        TB_CONST(TB_NIL), TB_CONST(TB_BLOCK_FREE), TB_CONST(TB_BLOCK_USED),
    };
    static const size_t tb_info_nconstants = TB_COUNT(tb_info_constants);
    """
    ctypedef struct tb_field_info_t:
        const char *name
        size_t offset
        size_t size

    ctypedef struct tb_const_info_t:
        const char *name
        unsigned long long value

    ctypedef struct tb_struct_info_t:
        const char *name
        const char *ctype
        size_t size
        const tb_field_info_t *fields
        size_t nfields

    const tb_struct_info_t tb_info_structs[]
    const size_t tb_info_nstructs
    const tb_const_info_t tb_info_constants[]
    const size_t tb_info_nconstants


__all__ = ["layout"]


def layout() -> dict:
    """The compiled layout::

        {"structs": {name: {"ctype": "tb_..._t", "size": bytes,
                            "fields": {field: (offset, size)}}},
         "constants": {"TB_...": int}}

    Offsets are from the start of each struct; docs/ring.md says where each
    struct lives in its segment. Padding and reserved fields are left out."""
    cdef size_t i, k
    cdef const tb_struct_info_t *s
    structs = {}
    for i in range(tb_info_nstructs):
        s = &tb_info_structs[i]
        fields = {}
        for k in range(s.nfields):
            fields[s.fields[k].name.decode()] = (s.fields[k].offset, s.fields[k].size)
        structs[s.name.decode()] = {"ctype": s.ctype.decode(), "size": s.size, "fields": fields}
    constants = {}
    for i in range(tb_info_nconstants):
        constants[tb_info_constants[i].name.decode()] = tb_info_constants[i].value
    return {"structs": structs, "constants": constants}
