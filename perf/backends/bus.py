"""tensorbus through its public client API, with a broker daemon of its own.

Every call starts ``python -m tensorbus serve --ipc <tmp>/b.sock``, waits
for its "tensorbus ready" line, and stops it (SIGTERM: the daemon removes its
segments) when done, whatever happened:

* ``lat``: ping-pong over two reliable topics (bench/ping, bench/pong); the
  peer echoes each message's data with its own publisher.
* ``thr``: one publisher streams ``count`` messages on bench/data; the peer
  takes them with ``recv_batch``.

Up to INLINE bytes a message is copied through a ring slot sized for it;
larger ones take the default topic and go through the arena: the publisher
copies the array in once (the copy-in path), the peer views it in place.
* ``control``: the control plane (perf.py's control mode): topic creation,
  and subscribe/unsubscribe cycles of many clients at once.
"""

import contextlib
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

import tensorbus
from tensorbus.broker.stats import private_rss_kb

from backends._peer import PEER_TIMEOUT, SPAWN, peer, result_of, server, time_round_trips

NAME = "bus"
PING, PONG, DATA = "bench/ping", "bench/pong", "bench/data"
CAPACITY = 4096
RING_BYTES = 256 << 20  # bounds capacity * slot size for large messages
BATCH = 256  # recv_batch's max_n

CONTROL_PROCS = 4  # processes sharing the control mode's clients, one thread per client
CREATORS = 4  # clients creating the control mode's topics, one thread each
# The broker's own figures without a row per topic (1000 rows would cost
# the daemon time inside the measurement): a pattern no topic matches.
NO_TOPIC = "perf/none"


INLINE = 64 << 10  # the client's default inline_max


def _slot(size: int) -> int:
    return max(size, 64) if size <= INLINE else 4096


def _options(size: int) -> dict:
    """One topic's options: reliable, CAPACITY slots (fewer, a power of two,
    where CAPACITY slots of this size would exceed RING_BYTES)."""
    capacity = CAPACITY
    while capacity > 2 and capacity * _slot(size) > RING_BYTES:
        capacity //= 2
    if size > INLINE:
        capacity = 64  # descriptors only; the arena bounds what is in flight
    return {"qos": "reliable", "capacity": capacity, "slot_size": _slot(size)}


def payload(size: int):
    """What the benchmark sends: bytes inline, an array through the arena."""
    if size <= INLINE:
        return bytes(size)
    import numpy as np

    return np.ones(size, dtype=np.uint8)


def arena_for(size: int) -> int:
    """An arena that holds the messages in flight of ``size`` (a few)."""
    return max(256 << 20, 6 * size + (64 << 20))


def _rss_kb(pid: int) -> int:
    """The daemon's resident memory less the shared memory it maps (KiB)."""
    kb = private_rss_kb(pid)
    if kb is None:
        raise RuntimeError(f"no VmRSS in /proc/{pid}/status")
    return kb


def _unlink_segments(pid: int) -> None:
    """Remove what a killed daemon left in /dev/shm and on hugetlbfs: its
    segments are named after its pid, so nothing of anyone else's is touched."""
    from tensorbus.broker.hugepages import hugetlbfs_mounts

    prefix = f"tb-{os.getuid()}-d{pid}-"
    extra = os.environ.get("TENSORBUS_PERF_HUGEPAGES")
    for folder in dict.fromkeys(["/dev/shm", *hugetlbfs_mounts(), *([extra] if extra else [])]):
        with contextlib.suppress(OSError):
            for name in os.listdir(folder):
                if name.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(folder, name))


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hugepages_flag() -> str:
    """``--arena-hugepages=DIR`` for the ``-huge`` backends: DIR from
    $TENSORBUS_PERF_HUGEPAGES, else ``auto`` (the first hugetlbfs mount)."""
    return f"--arena-hugepages={os.environ.get('TENSORBUS_PERF_HUGEPAGES') or 'auto'}"


def hugepages_missing() -> str | None:
    """Why the ``-huge`` backends cannot run here (no usable hugetlbfs or no
    free huge pages), or None."""
    from tensorbus.broker.hugepages import arena_dir, free_pages, page_size
    from tensorbus.broker.startup import BrokerStartError

    try:
        folder = arena_dir(hugepages_flag().partition("=")[2])
    except BrokerStartError as exc:
        return str(exc)
    if free_pages(page_size(folder))[0] == 0:
        return "no free huge pages: reserve some with sysctl vm.nr_hugepages=N (docs/operations.md)"
    return None


@contextmanager
def daemon(arena_size: int = 256 << 20, hugepages: bool = False):
    """A broker of its own (its arena on huge pages with ``hugepages``);
    yields (url, pid). Always stopped (SIGTERM: it removes its segments
    and socket) and cleaned up after."""
    with tempfile.TemporaryDirectory(prefix="tb-perf-bus-") as folder:
        path = os.path.join(folder, "b.sock")
        argv = [sys.executable, "-m", "tensorbus", "serve", "--ipc", path]
        argv += ["--arena-size", str(arena_size), *([hugepages_flag()] if hugepages else [])]
        pids = []
        try:
            with server(argv, "tensorbus serve", ready_line="tensorbus ready") as proc:
                pids.append(proc.pid)
                yield f"ipc://{path}", proc.pid
        finally:
            for pid in pids:
                _unlink_segments(pid)


def echo(url: str, size: int, total: int, options: dict, ready, result) -> None:
    """The lat peer: send every ping's data back as a pong."""
    with tensorbus.connect(url, name="perf-bus-echo") as client:
        sub = client.subscribe(PING)
        pub = client.publisher(PONG, timeout=60, **options)
        ready.put(True)
        for _ in range(total):
            pub.send(sub.recv(timeout=60).data)
        result.put(True)


def ping_pong(
    name: str,
    size: int,
    count: int,
    warmup: int,
    options: dict,
    send,
    peer_fn=echo,
    hugepages: bool = False,
) -> list[int]:
    """Round trips through a broker of our own: ``send(pub)`` publishes a
    ping with a publisher of ``options``, the peer (``peer_fn``) answers."""
    with (
        daemon(arena_for(size), hugepages) as (url, _),
        tensorbus.connect(url, name=f"perf-{name}-ping") as client,
    ):
        topic_options = {k: v for k, v in options.items() if k != "inline_max"}
        for topic in (PING, PONG):
            client.create_topic(topic, **topic_options)
        sub = client.subscribe(PONG)
        with peer(peer_fn, url, size, warmup + count, options) as (_, result):
            pub = client.publisher(PING, timeout=60, **options)

            def round_trip():
                send(pub)
                sub.recv(timeout=60).release()

            times = time_round_trips(round_trip, count, warmup)
            result_of(result, name)
    return times


def lat(size: int, count: int, warmup: int, hugepages: bool = False) -> list[int]:
    msg = payload(size)
    send = lambda pub: pub.send(msg)  # noqa: E731
    return ping_pong(NAME, size, count, warmup, _options(size), send, hugepages=hugepages)


def sink(url: str, count: int, ready, result) -> None:
    """The thr peer: take ``count`` messages of bench/data in batches."""
    with tensorbus.connect(url, name="perf-bus-sink") as client:
        sub = client.subscribe(DATA)
        ready.put(True)
        received = 0
        while received < count:
            batch = sub.recv_batch(BATCH, 60)
            taken = len(batch)
            # Drop the batch before the next wait: its messages hold their
            # arena blocks, and a publisher of large tensors or loans needs
            # those blocks back to send the messages this wait is for.
            del batch
            if not taken:
                break
            received += taken
        result.put((received, time.perf_counter()))


def thr(size: int, count: int, hugepages: bool = False) -> tuple[int, float]:
    with (
        daemon(arena_for(size), hugepages) as (url, _),
        tensorbus.connect(url, name="perf-bus-source") as client,
    ):
        client.create_topic(DATA, **_options(size))
        with peer(sink, url, count) as (_, result):
            pub = client.publisher(DATA, timeout=60, **_options(size))
            msg = payload(size)
            t0 = time.perf_counter()
            for _ in range(count):
                pub.send(msg)
            received, t1 = result_of(result, NAME)
    return received, t1 - t0


# ------------------------------------------------------------- control plane


def _topic(i: int) -> str:
    return f"ctl/t{i}"


def _threads(work, items) -> None:
    """Run ``work(item)`` for every item, one thread each; re-raise the first error."""
    errors = []

    def run(item):
        try:
            work(item)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(item,)) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _cycler(
    url: str, first: int, n: int, total: int, topics: int, cycles: int, go, abort, ready, result
) -> None:
    """Clients ``first`` .. ``first + n - 1`` of ``total``, each in a thread
    of its own, subscribing to one topic and unsubscribing, ``cycles`` times;
    client i goes round the topics i * span .. i * span + span - 1 (span:
    topics per client), so that together they touch every topic."""
    span = max(1, topics // total)
    clients = []
    try:
        for i in range(first, first + n):
            clients.append(tensorbus.connect(url, name=f"perf-ctl-{i}", timeout=60))
        ready.put(True)
        if not go.wait(PEER_TIMEOUT):
            raise RuntimeError(f"no go within {PEER_TIMEOUT:g} s")
        if abort.is_set():
            return

        def cycle(i):
            client = clients[i - first]
            for j in range(cycles):
                client.subscribe(_topic((i * span + j % span) % topics)).close()

        _threads(cycle, range(first, first + n))
        result.put((2 * n * cycles, time.perf_counter(), None))
    except BaseException as exc:
        ready.put(False)  # in case it failed before ready: the caller waits on it
        result.put((0, 0.0, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        for client in clients:
            client.close()


def _cycles(url: str, pid: int, probe, topics: int, clients: int, cycles: int) -> dict:
    """The cycles of control(): ``clients`` clients in CONTROL_PROCS
    processes, connected first, then all cycling at once on a go."""
    go, abort = SPAWN.Event(), SPAWN.Event()
    shares = [
        clients // CONTROL_PROCS + (p < clients % CONTROL_PROCS) for p in range(CONTROL_PROCS)
    ]
    out = {}
    with contextlib.ExitStack() as stack:
        try:
            results, first = [], 0
            for n in shares:
                if n:
                    _, result = stack.enter_context(
                        peer(_cycler, url, first, n, clients, topics, cycles, go, abort)
                    )
                    results.append(result)
                    first += n
            bells = probe.stats(NO_TOPIC)["broker"]["bells_free"]
            out["rss_kb_before"] = _rss_kb(pid)
            cpu0, t0 = _cpu_s(pid), time.perf_counter()
            go.set()
            reports = [result_of(result, NAME) for result in results]
            cpu1, t1 = _cpu_s(pid), time.perf_counter()
            out["rss_kb_after"] = _rss_kb(pid)
        finally:
            if not go.is_set():  # an error before the go: the processes waiting for it end now
                abort.set()
                go.set()
        failed = [error for _, _, error in reports if error]
        if failed:
            raise RuntimeError(f"a control-mode client failed: {failed[0]}")
        out["ops"] = sum(ops for ops, _, _ in reports)
        out["seconds"] = max(t1 for _, t1, _ in reports) - t0
        out["ops_per_s"] = out["ops"] / out["seconds"]
        # Near 100: the daemon (one thread) is the bottleneck, not the clients.
        out["daemon_cpu_percent"] = 100 * (cpu1 - cpu0) / (t1 - t0)
        # The daemon's own ceiling, were it given a core of its own (on a small
        # machine the clients' processes take CPU from it).
        out["ops_per_daemon_cpu_s"] = out["ops"] / max(cpu1 - cpu0, 1e-9)
        # Every unsubscribe gave its doorbell back (close() does not say if it failed).
        out["subscriptions_left"] = bells - probe.stats(NO_TOPIC)["broker"]["bells_free"]
    return out


def control(topics: int, clients: int, cycles: int) -> dict:
    """Create ``topics`` topics (CREATORS clients at once), then let
    ``clients`` clients subscribe and unsubscribe ``cycles`` times each, all
    at once. Returns the rates, and the daemon's RSS along the way (KiB)."""
    with daemon() as (url, pid):
        out = {"rss_kb_empty": _rss_kb(pid)}
        creators = []
        try:
            for k in range(CREATORS):
                creators.append(tensorbus.connect(url, name=f"perf-ctl-creator{k}", timeout=60))

            def create(k):
                for i in range(k, topics, CREATORS):
                    creators[k].create_topic(_topic(i), capacity=16, slot_size=256)

            t0 = time.perf_counter()
            _threads(create, range(CREATORS))
            out["topics_per_s"] = topics / (time.perf_counter() - t0)
            out["rss_kb_topics"] = _rss_kb(pid)
            out.update(_cycles(url, pid, creators[0], topics, clients, cycles))
        finally:
            for client in creators:
                client.close()
    return out
