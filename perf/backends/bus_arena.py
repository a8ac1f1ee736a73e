"""tensorbus with every message through the arena (``inline_max=0``), even
small ones: beside the ``bus`` backend (copied through a slot sized for the
message) it shows where the arena's zero-copy receive starts to pay, which
sets the client's default ``inline_max``."""

import numpy as np

import tensorbus

from backends._peer import peer, result_of, time_round_trips
from backends.bus import PING, PONG, arena_for, daemon

NAME = "bus-arena"
OPTIONS = {"qos": "reliable", "capacity": 1024}


def _echo(url: str, size: int, total: int, ready, result) -> None:
    with tensorbus.connect(url, name="perf-arena-echo") as client:
        sub = client.subscribe(PING)
        pub = client.publisher(PONG, timeout=60, inline_max=0, **OPTIONS)
        ready.put(True)
        for _ in range(total):
            pub.send(sub.recv(timeout=60).data)
        result.put(True)


def lat(size: int, count: int, warmup: int) -> list[int]:
    with (
        daemon(arena_for(size)) as (url, _),
        tensorbus.connect(url, name="perf-arena-ping") as client,
    ):
        for topic in (PING, PONG):
            client.create_topic(topic, **OPTIONS)
        sub = client.subscribe(PONG)
        with peer(_echo, url, size, warmup + count) as (_, result):
            pub = client.publisher(PING, timeout=60, inline_max=0, **OPTIONS)
            msg = np.ones(size, dtype=np.uint8)

            def round_trip():
                pub.send(msg)
                sub.recv(timeout=60)

            times = time_round_trips(round_trip, count, warmup)
            result_of(result, NAME)
    return times
