/* tb_atomic.h: the few atomics, fences and syscalls the shared-memory core
 * needs, each with its memory order spelled out. GCC/Clang __atomic builtins
 * (the C11 memory model) so the same code is right on x86 and on aarch64,
 * where a missing acquire or release is a real bug and not a harmless one.
 */
#ifndef TB_ATOMIC_H
#define TB_ATOMIC_H

#include <stdint.h>
#include <time.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <limits.h>
#include <unistd.h>
#include <sched.h>
#include <signal.h>
#include <sys/syscall.h>
#include <linux/futex.h>

/* 64-bit sequence words */
static inline int64_t tb_load_acq64(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline int64_t tb_load_rlx64(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline int64_t tb_load_sc64(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void tb_store_rel64(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void tb_store_rlx64(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline void tb_store_sc64(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline int64_t tb_fetch_add64(int64_t *p, int64_t v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
/* Strong CAS, seq_cst on success and acquire on failure. Returns 1 on success. */
static inline int tb_cas64(int64_t *p, int64_t expected, int64_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE);
}

/* 32-bit words: doorbells, states, counters */
static inline uint32_t tb_load_acq32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint32_t tb_load_rlx32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void tb_store_rel32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline uint32_t tb_fetch_add32(uint32_t *p, uint32_t v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t tb_fetch_sub32(uint32_t *p, uint32_t v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
static inline int tb_cas32(uint32_t *p, uint32_t expected, uint32_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE);
}
static inline uint64_t tb_fetch_add_u64(uint64_t *p, uint64_t v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline uint64_t tb_load_rlx_u64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline uint64_t tb_load_acq_u64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t tb_fetch_and_u64(uint64_t *p, uint64_t v) { return __atomic_fetch_and(p, v, __ATOMIC_ACQ_REL); }
static inline int tb_cas_u64(uint64_t *p, uint64_t *expected, uint64_t desired) {
    return __atomic_compare_exchange_n(p, expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE);
}

static inline void tb_fence_acq(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
static inline void tb_fence_rel(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
/* The store-load barrier of the sleep/wake handshake: release/acquire alone
 * lets a waiter and a waker each miss the other's store, even on x86. */
static inline void tb_fence_sc(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static inline void tb_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

static inline int64_t tb_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline int64_t tb_realtime_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Shared (not FUTEX_PRIVATE_FLAG) futexes: waiter and waker are different
 * processes mapping the same page. Returns 0 when woken or when *addr no
 * longer equals expected, ETIMEDOUT on timeout, EINTR on a signal. */
static inline int tb_futex_wait(uint32_t *addr, uint32_t expected, int64_t timeout_ns) {
    struct timespec ts, *tsp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000LL;
        ts.tv_nsec = timeout_ns % 1000000000LL;
        tsp = &ts;
    }
    long rc = syscall(SYS_futex, addr, FUTEX_WAIT, expected, tsp, NULL, 0);
    if (rc == 0) return 0;
    if (errno == EAGAIN) return 0;
    return errno;
}

static inline void tb_futex_wake_all(uint32_t *addr) {
    syscall(SYS_futex, addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* 1 if the process exists (or exists under another uid), 0 if it is gone.
 * A zombie is gone: it will never write again, and its parent may reap it
 * late (or never), while the broker has already seen it exit and repairs
 * what it left. Only repair paths call this, never a send or a receive. */
static inline int tb_pid_alive(uint32_t pid) {
    if (pid == 0) return 0;
    if (kill((pid_t)pid, 0) != 0 && errno == ESRCH) return 0;
    char path[32], buf[256];
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 1; /* it exists (kill said so); /proc may hide it */
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 1;
    buf[n] = 0;
    const char *end = strrchr(buf, ')'); /* the name may hold spaces and ')' */
    if (end == NULL || end[1] == 0 || end[2] == 0) return 1;
    return end[2] != 'Z' && end[2] != 'X';
}

#endif /* TB_ATOMIC_H */
