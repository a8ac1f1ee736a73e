"""pyzmq over ipc://: REQ/REP for latency, PUSH/PULL for throughput."""

import os
import tempfile
import time

import zmq

from backends._peer import peer, result_of

NAME = "zmq"
ZERO_COPY_FROM = 64 * 1024  # pyzmq's own advice: copy=False pays off only for large frames


def _endpoint() -> tuple[str, str]:
    folder = tempfile.mkdtemp(prefix="tb-perf-zmq-")
    return folder, f"ipc://{folder}/sock"


def _rep(endpoint: str, total: int, ready, result) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.bind(endpoint)
    ready.put(True)
    for _ in range(total):
        sock.send(sock.recv(copy=False), copy=False)
    result.put(True)
    ctx.destroy(linger=0)


def lat(size: int, count: int, warmup: int) -> list[int]:
    folder, endpoint = _endpoint()
    try:
        with peer(_rep, endpoint, warmup + count) as (_, result):
            ctx = zmq.Context()
            sock = ctx.socket(zmq.REQ)
            sock.connect(endpoint)
            msg = bytes(size)
            copy = size < ZERO_COPY_FROM
            clock = time.perf_counter_ns
            times = []
            for i in range(warmup + count):
                t0 = clock()
                sock.send(msg, copy=copy)
                sock.recv(copy=copy)
                if i >= warmup:
                    times.append(clock() - t0)
            result_of(result, NAME)
            ctx.destroy(linger=0)
        return times
    finally:
        _cleanup(folder)


def _pull(endpoint: str, count: int, ready, result) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind(endpoint)
    ready.put(True)
    for _ in range(count):
        sock.recv(copy=False)
    result.put((count, time.perf_counter()))
    ctx.destroy(linger=0)


def thr(size: int, count: int) -> tuple[int, float]:
    folder, endpoint = _endpoint()
    try:
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
    finally:
        _cleanup(folder)


def _cleanup(folder: str) -> None:
    for entry in os.listdir(folder):
        os.unlink(os.path.join(folder, entry))
    os.rmdir(folder)
