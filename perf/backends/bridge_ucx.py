"""tensorbus across a bridge over UCX (ucxx): see backends/bridged.py."""

from backends import bridged
from backends.ucx import missing  # noqa: F401  (needs what raw ucx needs)

NAME = "bridge-ucx"


def lat(size: int, count: int, warmup: int) -> list[int]:
    return bridged.lat("ucx", size, count, warmup)


def thr(size: int, count: int) -> tuple[int, float]:
    return bridged.thr("ucx", size, count)


def idle(seconds: float) -> float:
    return bridged.idle("ucx", seconds)
