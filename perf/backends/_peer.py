"""Running the peer process of a measurement: spawned (so it starts clean,
as an unrelated process would), time-bounded, and always stopped."""

import multiprocessing
import time
from collections.abc import Callable
from contextlib import contextmanager

SPAWN = multiprocessing.get_context("spawn")
PEER_TIMEOUT = 120.0


@contextmanager
def peer(target: Callable, *args):
    """Start ``target(*args, ready, result)``; yield (ready, result) queues."""
    ready, result = SPAWN.Queue(), SPAWN.Queue()
    proc = SPAWN.Process(target=target, args=(*args, ready, result), daemon=True)
    proc.start()
    try:
        ready.get(timeout=PEER_TIMEOUT)
        yield ready, result
    finally:
        proc.join(PEER_TIMEOUT)
        if proc.is_alive():
            proc.kill()
            proc.join()


def result_of(result, what: str):
    try:
        return result.get(timeout=PEER_TIMEOUT)
    except Exception as exc:
        raise RuntimeError(f"the {what} peer did not report within {PEER_TIMEOUT:g} s") from exc


def time_round_trips(round_trip: Callable[[], object], count: int, warmup: int) -> list[int]:
    """Call ``round_trip`` ``warmup`` times untimed, then ``count`` times timed (ns)."""
    for _ in range(warmup):
        round_trip()
    clock = time.perf_counter_ns
    times = []
    for _ in range(count):
        t0 = clock()
        round_trip()
        times.append(clock() - t0)
    return times
