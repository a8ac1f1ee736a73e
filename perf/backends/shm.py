"""``multiprocessing.shared_memory`` with a pipe notification: the standard
library's way to hand a large array to another process. The sender copies
the array into one of SLOTS buffers and sends its index down a pipe; the
receiver views it in place and sends the index back once done."""

import time
from multiprocessing import shared_memory

import numpy as np

from backends._peer import SPAWN, peer, result_of, time_round_trips

NAME = "shm"
SLOTS = 4


def _views(shm, size: int) -> list:
    return [np.ndarray((size,), np.uint8, buffer=shm.buf, offset=i * size) for i in range(SLOTS)]


def _sink(name: str, size: int, count: int, conn, ready, result) -> None:
    shm = shared_memory.SharedMemory(name)
    views = _views(shm, size)
    ready.put(True)
    for _ in range(count):
        i = int.from_bytes(conn.recv_bytes(), "little")
        views[i][0]  # noqa: B018  (viewed in place, like a zero-copy receive)
        conn.send_bytes(i.to_bytes(1, "little"))
    result.put((count, time.perf_counter()))
    del views
    shm.close()


def thr(size: int, count: int) -> tuple[int, float]:
    shm = shared_memory.SharedMemory(create=True, size=SLOTS * size)
    here, there = SPAWN.Pipe()
    try:
        views = _views(shm, size)
        src = np.ones(size, dtype=np.uint8)
        for v in views:
            np.copyto(v, src)  # warm pages, as the arena's are
        with peer(_sink, shm.name, size, count, there) as (_, result):
            free = list(range(SLOTS))
            t0 = time.perf_counter()
            for _ in range(count):
                if not free:
                    free.append(int.from_bytes(here.recv_bytes(), "little"))
                i = free.pop()
                np.copyto(views[i], src)
                here.send_bytes(i.to_bytes(1, "little"))
            received, t1 = result_of(result, NAME)
            while here.poll():
                here.recv_bytes()
        del views
        return received, t1 - t0
    finally:
        shm.close()
        shm.unlink()


def _echo(name: str, size: int, total: int, conn, ready, result) -> None:
    shm = shared_memory.SharedMemory(name)
    pong = np.ndarray((size,), np.uint8, buffer=shm.buf, offset=size)
    src = np.ones(size, dtype=np.uint8)
    ready.put(True)
    for _ in range(total):
        conn.recv_bytes()
        np.copyto(pong, src)
        conn.send_bytes(b"\x01")
    result.put(True)
    del pong
    shm.close()


def lat(size: int, count: int, warmup: int) -> list[int]:
    shm = shared_memory.SharedMemory(create=True, size=2 * size)
    here, there = SPAWN.Pipe()
    try:
        ping = np.ndarray((size,), np.uint8, buffer=shm.buf)
        src = np.ones(size, dtype=np.uint8)
        with peer(_echo, shm.name, size, warmup + count, there) as (_, result):

            def round_trip():
                np.copyto(ping, src)
                here.send_bytes(b"\x00")
                here.recv_bytes()

            times = time_round_trips(round_trip, count, warmup)
            result_of(result, NAME)
        ping = None  # noqa: F841  (drop the view: shm.close() refuses while it lives)
        return times
    finally:
        shm.close()
        shm.unlink()
