"""numpy's ``np.copyto`` of the same array within one process: the physical
ceiling of any path that copies the data once."""

import time

import numpy as np

NAME = "memcpy"


def lat(size: int, count: int, warmup: int) -> list[int]:
    """One copy of ``size`` bytes (no second process: the floor of one way)."""
    src, dst = np.ones(size, dtype=np.uint8), np.zeros(size, dtype=np.uint8)
    for _ in range(warmup):
        np.copyto(dst, src)
    clock = time.perf_counter_ns
    times = []
    for _ in range(count):
        t0 = clock()
        np.copyto(dst, src)
        times.append(clock() - t0)
    return times


def thr(size: int, count: int) -> tuple[int, float]:
    src, dst = np.ones(size, dtype=np.uint8), np.zeros(size, dtype=np.uint8)
    np.copyto(dst, src)  # warm: the destination's pages exist
    t0 = time.perf_counter()
    for _ in range(count):
        np.copyto(dst, src)
    return count, time.perf_counter() - t0
