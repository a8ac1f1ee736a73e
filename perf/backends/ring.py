"""tensorbus's shared-memory ring between two processes (block policy)."""

import time

from tensorbus._core import Ring

from backends._peer import peer, result_of, time_round_trips

NAME = "ring"


def _slot(size: int) -> int:
    return max(size, 64)


def _echo(ping_name: str, pong_name: str, size: int, total: int, ready, result) -> None:
    ping, pong = Ring.attach(ping_name), Ring.attach(pong_name)
    sub, pub = ping.subscriber(), pong.publisher(timeout=60)
    buf = bytearray(size)
    ready.put(True)
    for _ in range(total):
        n = sub.recv_into(buf, timeout=60)
        pub.send(memoryview(buf)[:n])
    sub.close()
    pub.close()
    result.put(True)


def lat(size: int, count: int, warmup: int) -> list[int]:
    ping = Ring.create(capacity=64, slot_size=_slot(size), instance="perf")
    pong = Ring.create(capacity=64, slot_size=_slot(size), instance="perf")
    try:
        with peer(_echo, ping.name, pong.name, size, warmup + count) as (_, result):
            pub, sub = ping.publisher(timeout=60), pong.subscriber()
            msg, buf = bytes(size), bytearray(size)

            def round_trip():
                pub.send(msg)
                sub.recv_into(buf, timeout=60)

            times = time_round_trips(round_trip, count, warmup)
            result_of(result, NAME)
            pub.close()
            sub.close()
        return times
    finally:
        for r in (ping, pong):
            r.unlink()


def _sink(name: str, size: int, count: int, ready, result) -> None:
    ring = Ring.attach(name)
    sub = ring.subscriber()
    buf = bytearray(size)
    ready.put(True)
    received = 0
    for _ in range(count):
        sub.recv_into(buf, timeout=60)
        received += 1
    result.put((received, time.perf_counter()))
    sub.close()


def thr(size: int, count: int) -> tuple[int, float]:
    ring = Ring.create(capacity=1024, slot_size=_slot(size), instance="perf")
    try:
        with peer(_sink, ring.name, size, count) as (_, result):
            pub = ring.publisher(timeout=60)
            msg = bytes(size)
            t0 = time.perf_counter()
            for _ in range(count):
                pub.send(msg)
            received, t1 = result_of(result, NAME)
            pub.close()
        return received, t1 - t0
    finally:
        ring.unlink()


def _idle_subscriber(name: str, seconds: float, ready, result) -> None:
    ring = Ring.attach(name)
    sub = ring.subscriber()
    ready.put(True)
    time.sleep(0.1)  # the queue's feeder thread sends "ready": not the wait's CPU
    cpu0 = time.process_time()
    try:
        sub.recv(timeout=seconds)
    except Exception:  # the expected ReceiveTimeout
        pass
    result.put(time.process_time() - cpu0)
    sub.close()


def idle(seconds: float) -> float:
    """CPU seconds a subscriber uses while waiting ``seconds`` for nothing."""
    ring = Ring.create(capacity=64, slot_size=64, instance="perf")
    try:
        with peer(_idle_subscriber, ring.name, seconds) as (_, result):
            return result_of(result, NAME)
    finally:
        ring.unlink()
