"""Child-process bodies for the multi-process tests. Each attaches to a ring
by name, as an unrelated process would, and reports through a queue."""

import os
import random
import signal
import struct
import time
import zlib

from tensorbus._core import ReceiveTimeout, Ring, RingClosedError

# Message: publisher id, per-publisher counter, crc32 of the body, body.
HEADER = struct.Struct("<IQI")


def body_source(seed: int, size: int = 1 << 16) -> bytes:
    return random.Random(seed).randbytes(size)


def stress_publisher(name, pub_id, count, max_body, ready, go, out):
    ring = Ring.attach(name)
    pub = ring.publisher(timeout=60.0)
    source = body_source(pub_id)
    rng = random.Random(1000 + pub_id)
    sizes = [rng.randrange(0, max_body + 1) for _ in range(4096)]
    pack = HEADER.pack
    buf = bytearray(HEADER.size + max_body)
    ready.put(pub_id)
    go.wait(30)
    for i in range(count):
        n = sizes[i & 4095]
        off = (i * 7919) % (len(source) - n) if n else 0
        body = source[off : off + n]
        buf[: HEADER.size] = pack(pub_id, i, zlib.crc32(body))
        buf[HEADER.size : HEADER.size + n] = body
        pub.send(memoryview(buf)[: HEADER.size + n])
    out.put(("pub", pub_id, pub.published, pub.dropped))
    pub.close()


def stress_subscriber(name, sub_id, expected, ready, out, idle_timeout):
    """Receive until ``expected`` messages or the ring closes; check every
    checksum and that each publisher's counter only grows (block rings: by
    exactly one)."""
    ring = Ring.attach(name)
    sub = ring.subscriber()
    ready.put(sub_id)
    unpack = HEADER.unpack_from
    last = {}
    received = corrupt = gaps = reorders = 0
    while received < expected:
        try:
            msg = sub.recv(timeout=idle_timeout)
        except (ReceiveTimeout, RingClosedError):
            break
        pub_id, counter, crc = unpack(msg)
        if zlib.crc32(msg[HEADER.size :]) != crc:
            corrupt += 1
        prev = last.get(pub_id, -1)
        if counter <= prev:
            reorders += 1
        elif counter != prev + 1:
            gaps += 1
        last[pub_id] = counter
        received += 1
    out.put(("sub", sub_id, received, corrupt, gaps, reorders, sub.drops, last))
    sub.close()


def sleepy_subscriber(name, ready, out, timeout):
    ring = Ring.attach(name)
    sub = ring.subscriber()
    ready.put(os.getpid())
    t0 = time.monotonic()
    try:
        msg = sub.recv(timeout=timeout)
        out.put(("msg", msg, time.monotonic() - t0))
    except RingClosedError:
        out.put(("closed", None, time.monotonic() - t0))
    except ReceiveTimeout:
        out.put(("timeout", None, time.monotonic() - t0))
    sub.close()


def idle_cpu(name, seconds, out):
    """CPU seconds a subscriber burns waiting ``seconds`` for nothing."""
    ring = Ring.attach(name)
    sub = ring.subscriber()
    c0 = time.process_time()
    try:
        sub.recv(timeout=seconds)
    except ReceiveTimeout:
        pass
    out.put(time.process_time() - c0)
    sub.close()


def joined_subscriber_then_sleep(name, ready):
    """Join and never read: holds back a block ring until killed."""
    ring = Ring.attach(name)
    sub = ring.subscriber()
    ready.put(os.getpid())
    time.sleep(3600)
    sub.close()


def interruptible_subscriber(name, ready, out):
    """Block in recv() with no timeout; report how a SIGINT ends it."""
    # Ctrl-C's own handler, whatever this process inherited: a runner started
    # in the background (bash `&`) passes SIGINT on as ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ring = Ring.attach(name)
    sub = ring.subscriber()
    t0 = time.monotonic()
    # Ready inside the try: on a loaded machine the SIGINT may land before
    # recv() is reached, and it must still be reported, not kill the worker.
    try:
        ready.put(os.getpid())
        sub.recv()
        out.put(("msg", time.monotonic() - t0))
    except KeyboardInterrupt:
        out.put(("interrupted", time.monotonic() - t0))
    sub.close()
