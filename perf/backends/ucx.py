"""Raw ucxx between two processes: the path a bridge over UCX should match.

Endpoints from worker addresses exchanged out of band (here: the peer's
queue), error handling off (one machine), ucxx's own ``polling`` progress
(its fastest: it spins a core in each process). Tag send/recv of numpy
arrays; the receiver posts into a preallocated array.

* ``lat``: ping-pong of ``size`` bytes.
* ``thr``: ``count`` messages one way, each acknowledged only at the end.

On one machine UCX moves large messages with CMA (process_vm_readv), which
pins every page it copies: numpy's private buffers come in 2 MiB huge pages,
shared memory (any broker's zero-copy arena, /dev/shm) in 4 KiB pages, and
that alone changes the rate by 2-3x. ``ucx-shm`` is this backend with both
buffers in shared memory, so the bridge can be compared on equal memory.
"""

import asyncio
import os
import time

import numpy as np

from backends._peer import SPAWN, peer, result_of, time_round_trips_async

NAME = "ucx"
PING, PONG, DATA = 1, 2, 3


def missing() -> str | None:
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    try:
        import ucxx  # noqa: F401
    except ImportError as exc:
        return f"ucxx is not installed ({exc}); pip install ucxx-cu12"
    return None


def buffer(size: int, shm: bool) -> np.ndarray:
    """A buffer of ``size`` bytes: private memory (numpy's, in transparent
    huge pages where the kernel gives them), or (``shm``) a shared-memory
    mapping of 4 KiB pages, the kind a tensorbus arena is made of."""
    if not shm:
        return np.ones(size, np.uint8)
    import mmap
    import tempfile

    with tempfile.TemporaryFile(dir="/dev/shm") as f:
        f.truncate(size)
        mem = mmap.mmap(f.fileno(), size)
    arr = np.frombuffer(mem, np.uint8)
    arr[:] = 1
    return arr


def _ucxx():
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    import ucxx

    ucxx.init(progress_mode="polling")
    return ucxx


async def _endpoint(ucxx, address: bytes):
    addr = ucxx.get_ucx_address_from_buffer(address)
    return await ucxx.create_endpoint_from_worker_address(addr, endpoint_error_handling=False)


def _echo(size: int, total: int, to_peer, from_peer, ready, result) -> None:
    async def main():
        ucxx = _ucxx()
        from_peer.put(ucxx.get_worker_address().tobytes())
        ready.put(True)
        ep = await _endpoint(ucxx, to_peer.get(timeout=60))
        buf = np.empty(size, np.uint8)
        for _ in range(total):
            await ep.recv(buf, tag=PING, force_tag=True)
            await ep.send(buf, tag=PONG, force_tag=True)
        await ep.close()

    asyncio.run(main())
    result.put(True)


def _sink(size: int, count: int, shm: bool, to_peer, from_peer, ready, result) -> None:
    async def main():
        ucxx = _ucxx()
        from_peer.put(ucxx.get_worker_address().tobytes())
        ready.put(True)
        ep = await _endpoint(ucxx, to_peer.get(timeout=60))
        buf = buffer(size, shm)
        for _ in range(count):
            await ep.recv(buf, tag=DATA, force_tag=True)
        done = time.perf_counter()
        await ep.send(np.zeros(8, np.uint8), tag=PONG, force_tag=True)
        await ep.close()
        return done

    result.put((count, asyncio.run(main())))


def _with_peer(target, args: tuple, work):
    to_peer, from_peer = SPAWN.Queue(), SPAWN.Queue()
    ucxx = _ucxx()
    try:
        with peer(target, *args, to_peer, from_peer) as (_, result):
            address = from_peer.get(timeout=60)
            to_peer.put(ucxx.get_worker_address().tobytes())

            async def main():
                ep = await _endpoint(ucxx, address)
                out = await work(ep)
                await ep.close()
                return out

            out = asyncio.run(main())
            reported = result_of(result, NAME)
    finally:
        ucxx.reset()  # the next measurement initialises afresh
    return out, reported


def lat(size: int, count: int, warmup: int) -> list[int]:
    msg, back = np.ones(size, np.uint8), np.empty(size, np.uint8)

    async def work(ep):
        async def round_trip():
            await ep.send(msg, tag=PING, force_tag=True)
            await ep.recv(back, tag=PONG, force_tag=True)

        return await time_round_trips_async(round_trip, count, warmup)

    times, _ = _with_peer(_echo, (size, warmup + count), work)
    return times


def thr(size: int, count: int, shm: bool = False) -> tuple[int, float]:
    msg = buffer(size, shm)

    async def work(ep):
        t0 = time.perf_counter()
        for _ in range(count):
            await ep.send(msg, tag=DATA, force_tag=True)
        await ep.recv(np.empty(8, np.uint8), tag=PONG, force_tag=True)
        return t0

    t0, (received, t1) = _with_peer(_sink, (size, count, shm), work)
    return received, t1 - t0
