"""tensorbus request/reply across a bridge over tcp: see backends/req_bridge.py."""

from backends import req_bridge

NAME = "req-bridge-tcp"


def lat(size: int, count: int, warmup: int) -> list[int]:
    return req_bridge.lat("tcp", size, count, warmup)
