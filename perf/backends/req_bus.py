"""tensorbus request/reply: ``client.request`` to a responder process that
reads ``client.requests(topic)`` (a queue group of one) and echoes."""

import tensorbus

from backends._peer import peer, result_of, time_round_trips
from backends.bus import daemon

NAME = "req-bus"
TOPIC = "bench/rpc"


def _responder(url: str, total: int, ready, result) -> None:
    with tensorbus.connect(url, name="perf-req-responder") as client:
        stream = client.requests(TOPIC)
        ready.put(True)
        for _ in range(total):
            req = stream.next(timeout=60)
            req.reply(req.data)
        result.put(True)


def lat(size: int, count: int, warmup: int) -> list[int]:
    with daemon() as (url, _), tensorbus.connect(url, name="perf-req-client") as client:
        with peer(_responder, url, warmup + count) as (_, result):
            msg = bytes(size)

            def round_trip():
                client.request(TOPIC, msg, timeout=60, retries=0)

            times = time_round_trips(round_trip, count, warmup)
            result_of(result, NAME)
    return times
