"""tensorbus across a bridge: two daemons on this machine linked as if on
two hosts (their own ipc sockets, arenas and tcp ports), data over the
transport named. The publisher lives on daemon A, the peer process on
daemon B; every message crosses the link once.

* ``lat``: ping on A, echoed by a subscriber of B, pong back on A: the round
  trip crosses the link twice.
* ``thr``: loans of ``size`` bytes streamed from A (no copy on A: the
  transport reads the arena block) to a sink on B (which views them in B's
  arena, where the transport wrote them).
"""

import sys
import tempfile
import time
from contextlib import contextmanager

import tensorbus

from backends._peer import free_port, peer, result_of, server, time_round_trips
from backends.bus import (
    DATA,
    PING,
    PONG,
    _cpu_s,
    _options,
    _unlink_segments,
    arena_for,
    echo,
    hugepages_flag,
    payload,
    sink,
)

LINK_TIMEOUT = 30.0


@contextmanager
def linked(
    transport: str,
    size: int,
    hugepages: bool = False,
    *,
    arena: int | None = None,
    pids: list | None = None,
):
    """Daemons A and B, B linked to A over ``transport`` (both arenas on huge
    pages with ``hugepages``); yields (url_a, url_b). ``arena``: each
    daemon's arena (default: one for messages of ``size``); ``pids``, if
    given, gets the daemons' pids (A's, then B's)."""
    with tempfile.TemporaryDirectory(prefix="tb-perf-bridge-") as folder:
        port = free_port()
        arena = arena_for(size) if arena is None else arena
        common = ["--transport", transport, "--arena-size", str(arena)]
        common += [hugepages_flag()] if hugepages else []
        serve = [sys.executable, "-m", "tensorbus", "serve"]
        argv_a = [*serve, "--ipc", f"{folder}/a.sock", "--tcp", f"127.0.0.1:{port}", *common]
        argv_b = [*serve, "--ipc", f"{folder}/b.sock", "--tcp", "127.0.0.1:*"]
        argv_b += ["--peer", f"tcp://127.0.0.1:{port}", *common]
        started = []
        try:
            with (
                server(argv_a, "daemon A", ready_line="tensorbus ready") as a,
                server(argv_b, "daemon B", ready_line="tensorbus ready") as b,
            ):
                started += [a.pid, b.pid]
                if pids is not None:
                    pids += started
                yield f"ipc://{folder}/a.sock", f"ipc://{folder}/b.sock"
        finally:
            for pid in started:
                _unlink_segments(pid)


def wait_interest(url: str, topic: str, transport: str) -> None:
    """Until the daemon at ``url`` forwards ``topic`` over an up link."""
    deadline = time.monotonic() + LINK_TIMEOUT
    with tensorbus.connect(url, name="perf-bridge-probe") as probe:
        while time.monotonic() < deadline:
            for link in probe.stats()["broker"]["links"]:
                if link["state"] == "up" and topic in link["interest"]:
                    if link["transport"] != transport:
                        raise RuntimeError(
                            f"the link runs over {link['transport']}, not {transport}"
                        )
                    return
            time.sleep(0.02)
    raise RuntimeError(f"no link forwarding {topic} within {LINK_TIMEOUT:g} s")


def lat(transport: str, size: int, count: int, warmup: int, hugepages: bool = False) -> list[int]:
    options = _options(size)
    with (
        linked(transport, size, hugepages) as (url_a, url_b),
        tensorbus.connect(url_a, name="perf-bridge-ping") as client,
    ):
        sub = client.subscribe(PONG)
        with peer(echo, url_b, size, warmup + count, options) as (_, result):
            wait_interest(url_a, PING, transport)
            wait_interest(url_b, PONG, transport)
            pub = client.publisher(PING, timeout=60, **options)
            msg = payload(size)

            def round_trip():
                pub.send(msg)
                sub.recv(timeout=60).release()

            times = time_round_trips(round_trip, count, warmup)
            result_of(result, f"bridge-{transport}")
    return times


def thr(transport: str, size: int, count: int, hugepages: bool = False) -> tuple[int, float]:
    # Small messages: the ring of _options (ZeroMQ's queue holds 1,000).
    # Tensors: 64 descriptors, the arena bounds what is in flight.
    options = _options(size)
    if size > 65536:
        options["capacity"] = 64
    with (
        linked(transport, size, hugepages) as (url_a, url_b),
        tensorbus.connect(url_a, name="perf-bridge-source") as client,
    ):
        client.create_topic(DATA, **options)
        with peer(sink, url_b, count) as (_, result):
            wait_interest(url_a, DATA, transport)
            pub = client.publisher(DATA, timeout=60, **options)
            t0 = time.perf_counter()
            if size > 65536:
                for _ in range(count):
                    pub.send(pub.loan(size, "uint8"))
            else:
                msg = bytes(size)
                for _ in range(count):
                    pub.send(msg)
            received, t1 = result_of(result, f"bridge-{transport}")
    return received, t1 - t0


def idle(transport: str, seconds: float) -> float:
    """CPU seconds both daemons of a linked pair use, together, in
    ``seconds`` with nothing to forward (after one message each way, so
    their bridges are set up and asleep)."""
    pids: list = []
    with (
        linked(transport, 64, pids=pids) as (url_a, url_b),
        tensorbus.connect(url_a, name="perf-bridge-idle-a") as ca,
        tensorbus.connect(url_b, name="perf-bridge-idle-b") as cb,
    ):
        sub = cb.subscribe(PING)
        wait_interest(url_a, PING, transport)
        ca.publisher(PING, timeout=60).send(b"wake")
        sub.recv(timeout=60)
        time.sleep(0.5)
        before = sum(_cpu_s(pid) for pid in pids)
        time.sleep(seconds)
        return sum(_cpu_s(pid) for pid in pids) - before
