"""tensorbus's zero-copy path: the publisher loans its array from the arena,
fills it in place (here: writes nothing, as an application that produced the
data there), and sends it with no copy; the subscriber views it in place.

* ``lat``: ping-pong where both sides send fresh loans of ``size`` bytes:
  round trip = loan + send + receive, twice; one way is half of it.
* ``thr``: loans streamed one way: the hand-off rate of blocks of ``size``.
"""

import time

import tensorbus

from backends._peer import peer, result_of
from backends.bus import DATA, PING, PONG, arena_for, daemon, ping_pong, sink

NAME = "bus-loan"
OPTIONS = {"qos": "reliable", "capacity": 64}


def _echo(url: str, size: int, total: int, options: dict, ready, result) -> None:
    with tensorbus.connect(url, name="perf-loan-echo") as client:
        sub = client.subscribe(PING)
        pub = client.publisher(PONG, timeout=60, **options)
        ready.put(True)
        for _ in range(total):
            msg = sub.recv(timeout=60)
            pub.send(pub.loan(size, "uint8"))
            msg.release()
        result.put(True)


def lat(size: int, count: int, warmup: int) -> list[int]:
    return ping_pong(
        NAME, size, count, warmup, OPTIONS, lambda pub: pub.send(pub.loan(size, "uint8")), _echo
    )


def thr(size: int, count: int) -> tuple[int, float]:
    with (
        daemon(arena_for(size)) as (url, _),
        tensorbus.connect(url, name="perf-loan-source") as client,
    ):
        client.create_topic(DATA, **OPTIONS)
        with peer(sink, url, count) as (_, result):
            pub = client.publisher(DATA, timeout=60, **OPTIONS)
            t0 = time.perf_counter()
            for _ in range(count):
                pub.send(pub.loan(size, "uint8"))
            received, t1 = result_of(result, NAME)
    return received, t1 - t0
