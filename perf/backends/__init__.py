"""One module per transport, each with the same two functions:

``lat(size, count, warmup) -> list[int]``: round-trip times in ns of a
ping-pong with a peer process.

``thr(size, count) -> (received, seconds)``: one-way messages to a peer
process, timed from the first send to the peer's receipt of the last.
"""

import importlib

BACKENDS = ("ring", "zmq", "mp", "iox2")


def load(name: str):
    if name not in BACKENDS:
        raise SystemExit(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return importlib.import_module(f"backends.{name}")
