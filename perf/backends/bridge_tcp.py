"""tensorbus across a bridge over tcp (ZeroMQ): see backends/bridged.py."""

from backends import bridged

NAME = "bridge-tcp"


def lat(size: int, count: int, warmup: int) -> list[int]:
    return bridged.lat("tcp", size, count, warmup)


def thr(size: int, count: int) -> tuple[int, float]:
    return bridged.thr("tcp", size, count)


def idle(seconds: float) -> float:
    return bridged.idle("tcp", seconds)
