# Declarations of tb_atomic.h: atomics with explicit memory orders, the
# shared futex and the monotonic clock. Everything here is nogil and cannot
# raise.
from libc.stdint cimport int64_t, uint32_t, uint64_t


cdef extern from "tb_atomic.h" nogil:
    int64_t tb_load_acq64(const int64_t *p)
    int64_t tb_load_rlx64(const int64_t *p)
    int64_t tb_load_sc64(const int64_t *p)
    void tb_store_rel64(int64_t *p, int64_t v)
    void tb_store_rlx64(int64_t *p, int64_t v)
    void tb_store_sc64(int64_t *p, int64_t v)
    int64_t tb_fetch_add64(int64_t *p, int64_t v)
    bint tb_cas64(int64_t *p, int64_t expected, int64_t desired)

    uint32_t tb_load_acq32(const uint32_t *p)
    uint32_t tb_load_rlx32(const uint32_t *p)
    void tb_store_rel32(uint32_t *p, uint32_t v)
    uint32_t tb_fetch_add32(uint32_t *p, uint32_t v)
    uint32_t tb_fetch_sub32(uint32_t *p, uint32_t v)
    bint tb_cas32(uint32_t *p, uint32_t expected, uint32_t desired)
    uint64_t tb_fetch_add_u64(uint64_t *p, uint64_t v)
    uint64_t tb_load_rlx_u64(const uint64_t *p)
    uint64_t tb_load_acq_u64(const uint64_t *p)
    uint64_t tb_fetch_and_u64(uint64_t *p, uint64_t v)
    bint tb_cas_u64(uint64_t *p, uint64_t *expected, uint64_t desired)

    void tb_fence_acq()
    void tb_fence_rel()
    void tb_fence_sc()
    void tb_cpu_relax()

    int64_t tb_now_ns()
    int64_t tb_realtime_ns()
    int tb_futex_wait(uint32_t *addr, uint32_t expected, int64_t timeout_ns)
    void tb_futex_wake_all(uint32_t *addr)
    bint tb_pid_alive(uint32_t pid)
