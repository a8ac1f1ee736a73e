"""pyzmq over ipc://: REQ/REP for latency, PUSH/PULL for throughput."""

import tempfile
import time

import zmq

from backends._peer import peer, result_of, time_round_trips

NAME = "zmq"
ZERO_COPY_FROM = 64 * 1024  # pyzmq's own advice: copy=False pays off only for large frames


def _bound(kind: int, endpoint: str, ready) -> tuple[zmq.Context, zmq.Socket]:
    """The peer's socket, bound before the peer reports ready."""
    ctx = zmq.Context()
    sock = ctx.socket(kind)
    sock.bind(endpoint)
    ready.put(True)
    return ctx, sock


def _rep(endpoint: str, total: int, ready, result) -> None:
    ctx, sock = _bound(zmq.REP, endpoint, ready)
    for _ in range(total):
        sock.send(sock.recv(copy=False), copy=False)
    result.put(True)
    ctx.destroy(linger=0)


def lat(size: int, count: int, warmup: int) -> list[int]:
    with tempfile.TemporaryDirectory(prefix="tb-perf-zmq-") as folder:
        return lat_at(f"ipc://{folder}/sock", size, count, warmup)


def lat_at(endpoint: str, size: int, count: int, warmup: int) -> list[int]:
    with peer(_rep, endpoint, warmup + count) as (_, result):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.REQ)
        sock.connect(endpoint)
        msg = bytes(size)
        copy = size < ZERO_COPY_FROM

        def round_trip():
            sock.send(msg, copy=copy)
            sock.recv(copy=copy)

        times = time_round_trips(round_trip, count, warmup)
        result_of(result, NAME)
        ctx.destroy(linger=0)
    return times


def _pull(endpoint: str, count: int, ready, result) -> None:
    ctx, sock = _bound(zmq.PULL, endpoint, ready)
    for _ in range(count):
        sock.recv(copy=False)
    result.put((count, time.perf_counter()))
    ctx.destroy(linger=0)


def thr(size: int, count: int) -> tuple[int, float]:
    with tempfile.TemporaryDirectory(prefix="tb-perf-zmq-") as folder:
        return thr_at(f"ipc://{folder}/sock", size, count)


def thr_at(endpoint: str, size: int, count: int) -> tuple[int, float]:
    with peer(_pull, endpoint, count) as (_, result):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.connect(endpoint)
        msg = bytes(size)
        copy = size < ZERO_COPY_FROM
        t0 = time.perf_counter()
        for _ in range(count):
            sock.send(msg, copy=copy)
        received, t1 = result_of(result, NAME)
        ctx.destroy(linger=0)
    return received, t1 - t0
