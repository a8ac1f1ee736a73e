"""tensorbus request/reply across a bridge: ``client.request`` on daemon A
to a responder process on daemon B (a queue group of one there), two
daemons of this machine linked as if on two hosts (backends/bridged.py).
The request crosses the link once each way: A's bridge claims it from A's
group (no member on A) and B's member answers into A's inbox."""

import time

import tensorbus

from backends._peer import peer, result_of, time_round_trips
from backends.bridged import LINK_TIMEOUT, linked
from backends.req_bus import TOPIC, _responder


def wait_served(url: str, topic: str) -> None:
    """Until the daemon at ``url`` knows a peer that serves ``topic``."""
    deadline = time.monotonic() + LINK_TIMEOUT
    with tensorbus.connect(url, name="perf-req-probe") as probe:
        while time.monotonic() < deadline:
            groups = probe.stats()["broker"]["remote_groups"]
            if any(g["topic"] == topic and g["servers"] for g in groups):
                return
            time.sleep(0.02)
    raise RuntimeError(f"no peer serving {topic} within {LINK_TIMEOUT:g} s")


def lat(transport: str, size: int, count: int, warmup: int) -> list[int]:
    with (
        linked(transport, size) as (url_a, url_b),
        tensorbus.connect(url_a, name="perf-req-client") as client,
    ):
        with peer(_responder, url_b, warmup + count) as (_, result):
            wait_served(url_a, TOPIC)
            msg = bytes(size)

            def round_trip():
                client.request(TOPIC, msg, timeout=60, retries=0)

            times = time_round_trips(round_trip, count, warmup)
            result_of(result, f"req-bridge-{transport}")
    return times
