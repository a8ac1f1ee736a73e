"""pyzmq over tcp://127.0.0.1: the path a bridge over tcp should match.
REQ/REP for latency, PUSH/PULL (``copy=False`` from 64 KiB) for throughput,
exactly as the ipc backend, on a loopback port."""

from backends import zmq as _zmq
from backends._peer import free_port

NAME = "zmq-tcp"


def lat(size: int, count: int, warmup: int) -> list[int]:
    return _zmq.lat_at(f"tcp://127.0.0.1:{free_port()}", size, count, warmup)


def thr(size: int, count: int) -> tuple[int, float]:
    return _zmq.thr_at(f"tcp://127.0.0.1:{free_port()}", size, count)
