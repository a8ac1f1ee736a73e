"""Running the peer process of a measurement: spawned (so it starts clean,
as an unrelated process would), time-bounded, and always stopped."""

import multiprocessing
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
