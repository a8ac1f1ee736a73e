"""tensorbus request/reply across a bridge over UCX: see backends/req_bridge.py."""

from backends import req_bridge
from backends.bridge_ucx import missing  # noqa: F401 (the same needs)

NAME = "req-bridge-ucx"


def lat(size: int, count: int, warmup: int) -> list[int]:
    return req_bridge.lat("ucx", size, count, warmup)
