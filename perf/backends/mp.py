"""multiprocessing.Pipe: what the standard library offers between processes."""

import time

from backends._peer import SPAWN, peer, result_of, time_round_trips

NAME = "mp"


def _echo(conn, total: int, ready, result) -> None:
    ready.put(True)
    for _ in range(total):
        conn.send_bytes(conn.recv_bytes())
    result.put(True)


def lat(size: int, count: int, warmup: int) -> list[int]:
    here, there = SPAWN.Pipe()
    with peer(_echo, there, warmup + count) as (_, result):
        msg = bytes(size)

        def round_trip():
            here.send_bytes(msg)
            here.recv_bytes()

        times = time_round_trips(round_trip, count, warmup)
        result_of(result, NAME)
    return times


def _sink(conn, count: int, ready, result) -> None:
    ready.put(True)
    for _ in range(count):
        conn.recv_bytes()
    result.put((count, time.perf_counter()))


def thr(size: int, count: int) -> tuple[int, float]:
    here, there = SPAWN.Pipe(duplex=False)[::-1]
    with peer(_sink, there, count) as (_, result):
        msg = bytes(size)
        t0 = time.perf_counter()
        for _ in range(count):
            here.send_bytes(msg)
        received, t1 = result_of(result, NAME)
    return received, t1 - t0
