"""Spin-then-sleep waiting shared by publishers (waiting for credit) and
subscribers (waiting for data).

A kernel wake-up costs ~25 us on small VMs while a shared-memory spin sees a
message in ~1 us, so waiters spin first. But spinning processes starve each
other when they outnumber cores, so a spin is time-bounded, registered in a
host-wide table, and skipped when ``cores - 1`` others already spin."""

import math
import os

from libc.stdint cimport int64_t, uint32_t
from posix.fcntl cimport O_CREAT, O_RDWR
from posix.mman cimport shm_open
from posix.unistd cimport close, ftruncate

from tensorbus._core.atomic cimport (
    tb_cas64,
    tb_cpu_relax,
    tb_fence_sc,
    tb_fetch_add32,
    tb_fetch_sub32,
    tb_futex_wait,
    tb_load_acq32,
    tb_load_rlx64,
    tb_now_ns,
    tb_store_rel64,
)
from tensorbus._core.segment cimport Segment

from tensorbus._core.errors import SegmentError

cdef extern from "<sched.h>" nogil:
    int sched_yield()

__all__ = ["SpinRegistry", "Waiter", "spin_registry_name"]

cdef enum:
    REGISTRY_SLOTS = 64
    CHECK_CLOCK_EVERY = 32  # spin iterations between clock reads


def _env_us(str name, double default):
    env = os.environ.get(name)
    try:
        return float(env) if env else default
    except ValueError:
        raise ValueError(f"{name}={env!r} is not a number of microseconds")


def spin_registry_name() -> str:
    return f"tb-{os.getuid()}-host-spinners"


cdef class SpinRegistry:
    """The per-user table of active spinners (one small shared segment)."""

    def __cinit__(self, str name=None):
        if name is None:
            name = spin_registry_name()
        cdef size_t size = REGISTRY_SLOTS * sizeof(int64_t)
        # Opened with O_CREAT but without O_EXCL: every process of the user
        # shares one table. ftruncate to the same size is idempotent, so two
        # first users racing both end with a zero-filled table.
        cdef int fd = shm_open(("/" + name).encode(), O_CREAT | O_RDWR, 0o600)
        if fd < 0:
            raise SegmentError(0, f"cannot open the spinner registry {name!r}")
        if ftruncate(fd, size) != 0:
            close(fd)
            raise SegmentError(0, f"cannot size the spinner registry {name!r}")
        close(fd)
        self.segment = Segment.attach(name)
        self.slots = <int64_t *>self.segment.base
        self.nslots = REGISTRY_SLOTS

    cdef int enter(self, int64_t now_ns, int64_t until_ns, int max_spinners) noexcept nogil:
        """Take a slot if fewer than ``max_spinners`` are active; -1 if not."""
        cdef int i, active = 0, free_slot = -1
        cdef int64_t v
        for i in range(self.nslots):
            v = tb_load_rlx64(&self.slots[i])
            if v > now_ns:
                active += 1
            elif free_slot < 0:
                free_slot = i
        if active >= max_spinners or free_slot < 0:
            return -1
        v = tb_load_rlx64(&self.slots[free_slot])
        if v > now_ns or not tb_cas64(&self.slots[free_slot], v, until_ns):
            return -1  # lost a race for the slot: behave as if the table were full
        return free_slot

    cdef void leave(self, int index) noexcept nogil:
        if index >= 0:
            tb_store_rel64(&self.slots[index], 0)

    def active(self) -> int:
        """How many processes of this user spin right now."""
        cdef int64_t now = tb_now_ns()
        return sum(1 for i in range(self.nslots) if self.slots[i] > now)


cdef class Waiter:
    """One wait policy (spin budget, registry) used by a ring's endpoints."""

    def __cinit__(self, spin_us=None, yield_us=20.0, prespin_us=2.0, max_spinners=None,
                  yield_max_us=None):
        if spin_us is None:
            spin_us = _env_us("TENSORBUS_SPIN_US", 50.0)
        if yield_max_us is None:
            yield_max_us = _env_us("TENSORBUS_YIELD_US", 300.0)
        if spin_us < 0 or yield_us < 0 or prespin_us < 0 or yield_max_us < 0:
            raise ValueError("spin, yield and pre-spin times must be >= 0 microseconds")
        if max_spinners is None:
            max_spinners = max(1, len(os.sched_getaffinity(0)) - 1)
        if max_spinners < 0:
            raise ValueError("max_spinners must be >= 0")
        self.policy.prespin_ns = <int64_t>(min(prespin_us, spin_us) * 1000)
        self.policy.spin_ns = <int64_t>(spin_us * 1000)
        self.policy.yield_ns = <int64_t>(yield_us * 1000)
        self.policy.yield_max_ns = <int64_t>(yield_max_us * 1000)
        # No history yet: as if waits were long (four times the limit), so
        # a waiter stretches nothing until about five short waits in a row.
        self.recent_ns = 4 * self.policy.yield_max_ns + 1
        self.policy.max_spinners = max_spinners
        self.registry = SpinRegistry()

    @staticmethod
    def sleeping() -> Waiter:
        """A waiter that neither spins nor yields: it sleeps at once
        (servers, background threads, the bridge, whose cores are others')."""
        return Waiter(0, yield_us=0, yield_max_us=0)

    @property
    def spin_us(self) -> float:
        return self.policy.spin_ns / 1000.0

    @property
    def max_spinners(self) -> int:
        return self.policy.max_spinners

    @property
    def yield_max_us(self) -> float:
        return self.policy.yield_max_ns / 1000.0

    @property
    def recent_wait_us(self) -> float:
        """The moving average of recent waits, which sets the yield phase."""
        return self.recent_ns / 1000.0

    def yield_us_now(self) -> float:
        """How long the next wait's yield phase may last."""
        return self._yield_ns() / 1000.0

    cdef int64_t _yield_ns(self) noexcept nogil:
        """The base yield, stretched to twice the recent wait (at most
        yield_max_ns) while recent waits are under yield_max_ns."""
        cdef int64_t r = self.recent_ns
        if r > self.policy.yield_max_ns:
            return self.policy.yield_ns
        return max(self.policy.yield_ns, min(2 * r, self.policy.yield_max_ns))

    cdef void _note(self, int64_t waited_ns) noexcept nogil:
        # A quarter weight for the newest: one odd gap does not undo a steady
        # ping-pong, a few long ones end the stretching. Racing threads of
        # one waiter may lose an update: it is only a hint.
        self.recent_ns += (waited_ns - self.recent_ns) >> 2

    cdef bint wait(self, ready_fn ready, void *ctx, uint32_t *bell_seq, uint32_t *bell_sleeping,
                   uint32_t **ring_sleepers, int n_rings, int64_t timeout_ns) noexcept nogil:
        """Wait until ``ready(ctx)`` or ``timeout_ns`` passes; True if ready.

        Sleeping follows the doorbell handshake: read the bell's sequence,
        announce the sleep, full fence, re-check, then futex_wait on that
        sequence. A waker commits, fences, reads ``sleeping`` and only then
        bumps the sequence and wakes, so one of the two always sees the
        other: no lost wake-up, and no syscall when nobody sleeps.
        ``ring_sleepers`` are the ``sleepers`` counters of every ring whose
        publishers must ring this bell (``n_rings`` of them, maybe none)."""
        cdef int64_t start = tb_now_ns()
        cdef int64_t now = start
        cdef int64_t deadline = start + timeout_ns
        cdef int64_t spin_end
        cdef unsigned int i = 0
        cdef int k
        cdef uint32_t seq
        cdef bint ok

        if ready(ctx):
            return True
        if timeout_ns <= 0:
            return False

        # 1. Pre-spin, unregistered: long enough to cover a peer's reply in
        #    a ping-pong, short enough not to matter when it is wasted.
        spin_end = start + self.policy.prespin_ns
        while now < spin_end and now < deadline:
            if ready(ctx):
                self._note(tb_now_ns() - start)
                return True
            tb_cpu_relax()
            i += 1
            if i % CHECK_CLOCK_EVERY == 0:
                now = tb_now_ns()

        # 2. Registered spin, only while fewer than cores-1 others spin.
        if self.policy.spin_ns > self.policy.prespin_ns and now < deadline:
            if self.spin(ready, ctx, min(start + self.policy.spin_ns, deadline) - now) == 1:
                self._note(tb_now_ns() - start)
                return True

        # 3. Yield the core to whoever needs it, still without a syscall-sleep.
        #    Stretched while recent waits were short (a peer across a link
        #    answers in ~100 us): a yielding core is awake, so the wake-up
        #    that ends the wait, ours or a daemon's on this core, is cheap.
        spin_end = min(tb_now_ns() + self._yield_ns(), deadline)
        now = tb_now_ns()
        while now < spin_end:
            if ready(ctx):
                self._note(now - start)
                return True
            sched_yield()
            now = tb_now_ns()

        # 4. Sleep on the doorbell.
        while True:
            now = tb_now_ns()
            if now >= deadline:
                self._note(now - start)
                return ready(ctx)
            seq = tb_load_acq32(bell_seq)
            tb_fetch_add32(bell_sleeping, 1)
            for k in range(n_rings):
                tb_fetch_add32(ring_sleepers[k], 1)
            tb_fence_sc()
            ok = ready(ctx)
            if not ok:
                tb_futex_wait(bell_seq, seq, deadline - now)
            for k in range(n_rings):
                tb_fetch_sub32(ring_sleepers[k], 1)
            tb_fetch_sub32(bell_sleeping, 1)
            if ok or ready(ctx):
                self._note(tb_now_ns() - start)
                return True


    cdef int spin(self, ready_fn ready, void *ctx, int64_t spin_ns) noexcept nogil:
        """Spin up to ``spin_ns`` for ``ready(ctx)``, registered, only while
        fewer than cores-1 others spin; never sleeps. 1: ready; 0: the time
        passed; -1: no spare core (it did not spin)."""
        cdef int64_t now = tb_now_ns()
        cdef int64_t spin_end = now + spin_ns
        cdef unsigned int i = 0
        cdef int slot
        cdef int got = 0
        if ready(ctx):
            return 1
        if spin_ns <= 0:
            return 0
        slot = self.registry.enter(now, spin_end + 1000000, self.policy.max_spinners)
        if slot < 0:
            return -1
        while now < spin_end:
            if ready(ctx):
                got = 1
                break
            tb_cpu_relax()
            i += 1
            if i % CHECK_CLOCK_EVERY == 0:
                now = tb_now_ns()
        self.registry.leave(slot)
        return got


cdef int64_t timeout_to_ns(object timeout) except -2:
    """None -> -1 (no limit); seconds -> ns; a clear error for anything else.
    Shared with the publisher, the subscriber and the ring set (wait.pxd)."""
    if timeout is None:
        return -1
    cdef double t
    try:
        t = float(timeout)
    except (TypeError, ValueError):
        raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if math.isnan(t) or t < 0:
        raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
    if math.isinf(t):
        return -1
    return <int64_t>(t * 1e9)
