"""One module per transport, each with the same two functions:

``lat(size, count, warmup) -> list[int]``: round-trip times in ns of a
ping-pong with a peer process.

``thr(size, count) -> (received, seconds)``: one-way messages to a peer
process, timed from the first send to the peer's receipt of the last.

A module that needs something this machine may lack (a package, a server
program) also has ``missing() -> str | None``: why it cannot run, or None.
"""

import importlib

BACKENDS = (
    "ring",
    "zmq",
    "mp",
    "iox2",
    "bus",
    "bus-loan",
    "bus-arena",
    "bus-huge",
    "memcpy",
    "shm",
    "nats",
    "redis",
    "req-bus",
    "req-zmq",
    "req-nats",
    "req-bridge-tcp",
    "req-bridge-ucx",
    "bridge-tcp",
    "bridge-ucx",
    "bridge-ucx-huge",
    "ucx",
    "ucx-shm",
    "zmq-tcp",
)

# Backends whose module must not bear the name of the package it measures
# (a module nats.py would shadow nats for whoever puts backends/ on sys.path).
MODULES = {
    "nats": "nats_ps",
    "redis": "redis_ps",
    "bus-loan": "bus_loan",
    "bus-arena": "bus_arena",
    "req-bus": "req_bus",
    "req-zmq": "zmq",  # its lat is REQ/REP over ipc already
    "req-nats": "nats_ps",  # its lat is request/reply already
    "req-bridge-tcp": "req_bridge_tcp",
    "req-bridge-ucx": "req_bridge_ucx",
    "bridge-tcp": "bridge_tcp",
    "bridge-ucx": "bridge_ucx",
    "bridge-ucx-huge": "bridge_ucx_huge",
    "bus-huge": "bus_huge",
    "zmq-tcp": "zmq_tcp",
    "ucx-shm": "ucx_shm",
}


def load(name: str):
    if name not in BACKENDS:
        raise SystemExit(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return importlib.import_module(f"backends.{MODULES.get(name, name)}")


def missing(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine; None if it can."""
    check = getattr(load(name), "missing", None)
    return check() if check is not None else None
