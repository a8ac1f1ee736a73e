#!/usr/bin/env python3
"""tensorbus reliability suite: what a real broker does when clients die,
when the daemon dies, when a subscriber stalls, and over a long soak.

    python perf/reliability.py r1 --trials 100              # kill -9 of a random client
    python perf/reliability.py r2 --trials 20               # kill -9 of the daemon
    python perf/reliability.py r4 --seconds 10              # one stalled subscriber of 8
    python perf/reliability.py r6 --seconds 600 --rate 100000  # soak: memory, losses
    python perf/reliability.py all                          # all four, full sizes
    python perf/reliability.py all --short                  # all four, CI sizes

Every case starts its own daemons (``tensorbus serve --ipc <tmp>/run/broker.sock
--arena-size 64MiB``) and worker processes (this file, ``_worker ROLE``),
stops them whatever happens, and prints a table of its figures, each beside
its target. The exit status is 1 if any target was missed. Workers publish
64-byte messages numbered per publisher (seq, pid, crc32), and report to the
harness through a small shared file of counters (Board). docs/reliability.md
explains the cases and their figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from array import array
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

import tensorbus
from tensorbus.broker.stats import private_rss_kb

HERE = os.path.abspath(__file__)
READY_TIMEOUT = 30.0  # a daemon or a worker on a loaded 2-core machine
DEADLINE = 10.0  # no progress within this long after a kill: a deadlock
NO_TOPIC = "rel/none"  # a pattern no topic matches: stats without topic rows
MiB = 1 << 20

# Case sizes for CI (tests/test_reliability.py, ``all --short``).
SHORT = {
    "r1": {"trials": 5},
    "r2": {"trials": 1, "standby_trials": 1},
    "r4": {"seconds": 2.0, "grace": 0.5},
    "r6": {"seconds": 10.0, "rate": 20_000},
}

# ---------------------------------------------------------------- messages

MSG_SIZE = 64
_HEAD = struct.Struct("<QI")  # seq, pid
_REPEAT = (MSG_SIZE - 4) // _HEAD.size


def encode(seq: int, pid: int) -> bytes:
    """A 64-byte message: (seq, pid) five times, then the crc32 of those 60 bytes."""
    body = _HEAD.pack(seq, pid) * _REPEAT
    return body + zlib.crc32(body).to_bytes(4, "little")


def decode(data) -> tuple[int, int] | None:
    """(seq, pid) of a message of :func:`encode`, None if it is torn."""
    raw = bytes(data)
    if len(raw) != MSG_SIZE:
        return None
    body = raw[:-4]
    if zlib.crc32(body) != int.from_bytes(raw[-4:], "little") or body != body[:12] * _REPEAT:
        return None
    return _HEAD.unpack_from(raw)


# ------------------------------------------------------------------- board

FIELDS = (
    "pid",  # the worker's pid
    "ready",  # 1 once subscribed / publishing
    "done",  # 1 once it closed its client and is about to exit
    "stop",  # set by the harness: stop now
    "count",  # messages sent (publisher) or distinct messages received (subscriber)
    "last_seq",  # subscriber: seq of its latest message
    "first_ns",  # subscriber: CLOCK_MONOTONIC of its first message
    "torn",  # messages whose checksum failed
    "gaps",  # messages skipped: seqs of a publisher that never arrived between two that did
    "dups",  # messages received twice (a seq at or below the last of its publisher)
    "stalls",  # publisher: sends that timed out waiting for credit (then retried)
    "errors",  # other exceptions, retried
    "max_wait_ns",  # publisher: the longest one message took to go out (retries included)
    "target_pid",  # set by the harness: report when a message of this pid ...
    "target_seq",  # ... with at least this seq is sent / received
    "reached_ns",  # CLOCK_MONOTONIC when that happened
    "go",  # set by the harness: a worker started with wait_go connects now
    "ready_ns",  # subscriber: CLOCK_MONOTONIC once subscribed
)
(
    PID,
    READY,
    DONE,
    STOP,
    COUNT,
    LAST_SEQ,
    FIRST_NS,
    TORN,
    GAPS,
    DUPS,
    STALLS,
    ERRORS,
    MAX_WAIT_NS,
    TARGET_PID,
    TARGET_SEQ,
    REACHED_NS,
    GO,
    READY_NS,
) = range(len(FIELDS))


class Board:
    """Counters shared by the harness and the workers of one run: a file
    mapped by every process, one row of FIELDS (int64) per worker."""

    def __init__(self, path: str, rows: int = 0):
        if rows:
            with open(path, "wb") as f:
                f.truncate(rows * len(FIELDS) * 8)
        self.path = path
        self.cells = np.memmap(path, dtype=np.int64, mode="r+").reshape(-1, len(FIELDS))
        if rows:
            self.cells[:, LAST_SEQ] = -1

    def get(self, row: int, column: int) -> int:
        return int(self.cells[row, column])

    def set(self, row: int, column: int, value: int) -> None:
        self.cells[row, column] = value

    def total(self, rows: Iterable[int], column: int) -> int:
        return sum(self.get(r, column) for r in rows)


# ----------------------------------------------------------------- workers


def _publish(
    url: str,
    topic: str,
    board: str,
    row: int,
    rate: float,
    catch_up: bool = True,
    timeout: float = 1.0,
) -> None:
    """Publish numbered messages on ``topic`` until told to stop, ``rate``
    per second (paced from a schedule; 0: as fast as credit allows). A send
    that times out waiting for credit is counted (stalls) and retried.
    ``catch_up``: after a wait, send what the schedule missed at once (an
    open-loop source: the count keeps to ``rate`` over the run); False:
    carry on at ``rate`` from where it is (a loop that makes one message
    per send: no burst after a wait)."""
    r = Board(board).cells[row]
    pid = os.getpid()
    clock = time.monotonic_ns
    with tensorbus.connect(url, name=f"rel-pub-{row}", spin_us=0) as client:
        pub = client.publisher(topic, timeout=timeout)
        r[PID] = pid
        t0 = time.monotonic()
        r[READY] = 1
        seq = 0
        while not r[STOP]:
            due = int((time.monotonic() - t0) * rate) if rate else seq + 256
            if rate and not catch_up and due - seq > rate / 100:  # over 10 ms behind
                t0 = time.monotonic() - seq / rate
                continue
            if seq >= due:
                time.sleep(0.0005)
                continue
            target_pid, target_seq = int(r[TARGET_PID]), int(r[TARGET_SEQ])
            end = min(due, seq + 256)
            while seq < end and not r[STOP]:
                started = clock()
                if not _send(pub, encode(seq, pid), r):
                    break  # told to stop while it waited
                now = clock()
                if now - started > r[MAX_WAIT_NS]:
                    r[MAX_WAIT_NS] = now - started
                seq += 1
                r[COUNT] = seq
                if target_pid == pid and seq > target_seq and not r[REACHED_NS]:
                    r[REACHED_NS] = now
    r[DONE] = 1


def _send(pub, data: bytes, r) -> bool:
    """Send ``data``, retrying a timeout for credit (counted: stalls) or an
    error (counted, and printed); False if told to stop meanwhile."""
    while True:
        try:
            pub.send(data)
            return True
        except tensorbus.BackpressureError:
            r[STALLS] += 1
        except tensorbus.TensorbusError as exc:
            r[ERRORS] += 1
            print(f"send: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            time.sleep(0.01)
        if r[STOP]:
            return False


def _subscribe(
    url: str,
    pattern: str,
    board: str,
    row: int,
    mode: str = "read",
    out: str = "",
    wait_go: bool = False,
) -> None:
    """Subscribe to ``pattern`` and check every message until told to stop:
    torn, skipped and repeated seqs per publisher. ``mode``: ``read`` (the
    subscriber exists before its publishers: each one's first seq must be
    0), ``late`` (it joins mid-stream: any first seq), ``latency`` (also
    record each message's latency, publish to receive in ns, into ``out``,
    a .npy), ``stall`` (subscribe, never read). ``wait_go``: start up (pid
    on the board), then connect only once the harness says go."""
    r = Board(board).cells[row]
    latency = array("q") if mode == "latency" else None
    r[PID] = os.getpid()
    while wait_go and not r[GO]:
        if r[STOP]:
            r[DONE] = 1
            return
        time.sleep(0.0005)
    with tensorbus.connect(url, name=f"rel-sub-{row}", spin_us=0) as client:
        sub = client.subscribe(pattern)
        r[READY_NS] = time.monotonic_ns()
        r[READY] = 1
        if mode == "stall":
            while not r[STOP]:
                time.sleep(0.05)
        else:
            _check_stream(sub, r, mode != "late", latency)
    if latency is not None:
        np.save(out, np.frombuffer(latency, np.int64))
    r[DONE] = 1


def _check_stream(sub, r, from_zero: bool, latency: array | None) -> None:
    """The loop of a reading subscriber (see :func:`_subscribe`)."""
    last: dict[int, int] = {}
    count = 0
    while not r[STOP]:
        try:
            batch = sub.recv_batch(256, 0.1)
        except tensorbus.TensorbusError as exc:
            r[ERRORS] += 1
            print(f"recv: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            time.sleep(0.05)
            continue
        if not batch:
            continue
        now, now_wall = time.monotonic_ns(), time.time_ns()
        target_pid, target_seq = int(r[TARGET_PID]), int(r[TARGET_SEQ])
        for msg in batch:
            got = decode(msg.data)
            if got is None:
                r[TORN] += 1
                continue
            seq, pid = got
            if latency is not None:
                latency.append(now_wall - msg.timestamp_ns)
            prev = last.get(pid)
            if prev is None:
                prev = -1 if from_zero else seq - 1
            if seq <= prev:
                r[DUPS] += 1
                continue
            if seq > prev + 1:
                r[GAPS] += seq - prev - 1
            last[pid] = seq
            count += 1
            if count == 1:
                r[FIRST_NS] = now
            r[LAST_SEQ] = seq
            if pid == target_pid and seq >= target_seq and not r[REACHED_NS]:
                r[REACHED_NS] = now
        r[COUNT] = count
        del batch


def worker(role: str, kwargs: dict) -> None:
    """Entry point of a worker process: ``python reliability.py _worker ROLE JSON``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the harness stops us through the board
    {"pub": _publish, "sub": _subscribe}[role](**kwargs)


class Workers:
    """Worker processes of one run (this file, ``_worker``); every one still
    alive is killed on exit. Their output goes to files in ``folder``."""

    def __init__(self, folder: str, board: Board):
        self.folder = folder
        self.board = board
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, str] = {}

    def start(self, role: str, row: int, **kwargs) -> subprocess.Popen:
        log = os.path.join(self.folder, f"worker-{row}-{len(self.logs)}.log")
        kwargs.update(board=self.board.path, row=row)
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, HERE, "_worker", role, json.dumps(kwargs)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs[row], self.logs[row] = proc, log
        return proc

    def tail(self, row: int) -> str:
        try:
            with open(self.logs[row], errors="replace") as f:
                return "".join(f.readlines()[-8:]).strip()
        except OSError:
            return ""

    def wait_ready(self, rows: Iterable[int], timeout: float = READY_TIMEOUT) -> None:
        """Until every worker of ``rows`` says ready; RuntimeError if one exits first."""
        deadline = time.monotonic() + timeout
        for row in rows:
            while not self.board.get(row, READY):
                if self.procs[row].poll() is not None:
                    raise RuntimeError(f"worker {row} exited before ready:\n{self.tail(row)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {row} not ready within {timeout:g} s")
                time.sleep(0.005)

    def stop(self, rows: Iterable[int], timeout: float = 10.0) -> list[int]:
        """Tell ``rows`` to stop and wait for them; the rows that did not
        exit cleanly in time (then killed) or failed."""
        rows = [r for r in rows if r in self.procs]
        for row in rows:
            self.board.set(row, STOP, 1)
        bad = []
        deadline = time.monotonic() + timeout
        for row in rows:
            proc = self.procs[row]
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.returncode != 0 or not self.board.get(row, DONE):
                bad.append(row)
        return bad

    def kill(self, row: int) -> None:
        self.procs[row].kill()
        self.procs[row].wait()

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ broker


class Broker:
    """A ``tensorbus serve`` process on a private socket, as tests/conftest.py's
    Daemon, with its output drained by a thread (a full pipe would block
    it). ``wait=False``: do not wait for its ready line (a standby prints it
    only once it takes over: :meth:`wait_ready`)."""

    def __init__(self, folder: str, *args: str, path: str | None = None, wait: bool = True) -> None:
        self.ipc_path = path or os.path.join(folder, "run", "broker.sock")
        self.url = f"ipc://{self.ipc_path}"
        cmd = [sys.executable, "-m", "tensorbus", "serve", "--ipc", self.ipc_path]
        cmd += ["--arena-size", "64MiB", *args]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        self.pid = self.proc.pid
        self.instance = f"d{self.pid}"
        self.tail: deque[str] = deque(maxlen=40)
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.tail.append(line.rstrip())
            if line.startswith("tensorbus ready "):
                self.ready.set()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.002):
            if self.proc.poll() is not None:
                self._reader.join(1.0)
                raise RuntimeError(f"the daemon exited before it was ready: {self.why()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon was not ready within {timeout:g} s")

    def why(self) -> str:
        """Its last line of output (an error says why it stopped)."""
        return self.tail[-1] if self.tail else f"exit code {self.proc.returncode}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """kill -9, and wait for it."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (it removes its segments), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5.0)
        self.proc.stdout.close()

    def segments(self) -> list[str]:
        """This instance's segments in /dev/shm."""
        return [n for n in os.listdir("/dev/shm") if f"-{self.instance}-" in n]

    def shm_bytes(self) -> int:
        """The /dev/shm memory its segments take (allocated blocks)."""
        total = 0
        for name in self.segments():
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join("/dev/shm", name)).st_blocks * 512
        return total

    def leftovers(self) -> list[str]:
        """What this instance left behind: segments, and its FIFO folder."""
        bells = os.path.join(os.path.dirname(self.ipc_path), f"bells-{self.instance}")
        return self.segments() + ([bells] if os.path.exists(bells) else [])

    def unlink(self) -> None:
        """Remove what a killed instance left behind (named after its pid)."""
        for name in self.segments():
            with contextlib.suppress(OSError):
                os.unlink(os.path.join("/dev/shm", name))
        bells = os.path.join(os.path.dirname(self.ipc_path), f"bells-{self.instance}")
        shutil.rmtree(bells, ignore_errors=True)

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------- figures


@dataclass
class Report:
    """One case's figures: (figure, value, target, met) rows; met None: no target."""

    title: str
    rows: list[tuple[str, str, str, bool | None]] = field(default_factory=list)
    figures: dict = field(default_factory=dict)

    def add(self, figure: str, value: str, target: str = "", met: bool | None = None) -> None:
        self.rows.append((figure, value, target, met))

    def count(self, figure: str, n: int, key: str | None = None) -> None:
        """A count whose target is 0."""
        self.figures[key or figure] = n
        self.add(figure, f"{n:,}", "0", n == 0)

    @property
    def ok(self) -> bool:
        return all(met is not False for *_, met in self.rows)

    def print(self, out=sys.stdout) -> None:
        cells = [("figure", "value", "target", "")]
        cells += [
            (f, v, t, "" if m is None else "ok" if m else "MISSED") for f, v, t, m in self.rows
        ]
        widths = [max(len(row[i]) for row in cells) for i in range(4)]

        def line(row) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

        print(f"\n{self.title}", file=out)
        print(line(cells[0]), file=out)
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
        for row in cells[1:]:
            print(line(row), file=out)
        print(f"{'all targets met' if self.ok else 'TARGETS MISSED'}", file=out, flush=True)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` (0..1) percentile of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.1f} ms"


def p50_p99(values: list[float], unit=ms) -> str:
    if not values:
        return "-"
    return f"{unit(percentile(values, 0.5))} / {unit(percentile(values, 0.99))}"


def note(text: str) -> None:
    """A progress line (stderr)."""
    print(text, file=sys.stderr, flush=True)


def wait_for(cond: Callable[[], bool], timeout: float, step: float = 0.001) -> bool:
    """Poll ``cond`` until true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def holdings(probe: tensorbus.Client) -> tuple[int, int, int]:
    """(sessions, free doorbells, free arena holder slots) of the broker."""
    b = probe.stats(NO_TOPIC)["broker"]
    return b["sessions"], b["bells_free"], b["holders_free"]


# --------------------------------------------------------------------- R1


@dataclass
class Trial:
    """What one R1 trial saw."""

    victim: str
    recovery_s: float | None = None
    deadlock: bool = False
    crashed: int = 0
    torn: int = 0
    gaps: int = 0
    dups: int = 0
    lost: int = 0
    left: str = ""
    records: int = 0
    errors: int = 0


def r1(
    trials: int = 100,
    subscribers: int = 3,
    rate: float = 20_000,
    capacity: int = 64,
    seed: int | None = None,
    out=sys.stdout,
) -> Report:
    """R1: kill -9 of a random client mid-stream, ``trials`` times, on one daemon.

    Each trial: a reliable topic of its own (``capacity`` slots), then
    ``subscribers`` subscriber processes and a publisher streaming numbered
    64-byte messages at ``rate``/s; after a random moment one of them,
    chosen at random, gets SIGKILL. Progress after the kill:

    * a subscriber killed: the publisher must get ``capacity`` + 1 messages
      past what it had sent at the kill (a dead cursor left in place would
      block it there) and the survivors must receive that far;
    * the publisher killed: a new publisher (this process) opens the topic
      and every survivor must receive its first message (a half-done claim
      of the dead one left unpadded would hold them back).

    Recovery time: from the kill to the last survivor's progress (so it
    includes the time to stream those ``capacity`` + 1 messages at ``rate``,
    or to open the new publisher); none within DEADLINE seconds is a
    deadlock. Then the publisher stops, the
    survivors must receive every message it sent (lost), and stop. Torn,
    gaps and duplicates are checked on every message received. After each
    trial the broker's sessions, doorbells and holder slots must return to
    what they were, and the topic must have no publisher or subscriber
    left; after the last, the stopped daemon must have left no segment.
    """
    rng = random.Random(seed)
    results: list[Trial] = []
    with tempfile.TemporaryDirectory(prefix="tb-rel-r1-") as folder:
        broker = Broker(folder)
        try:
            with tensorbus.connect(broker.url, name="rel-probe") as probe:
                base = holdings(probe)
                for trial in range(trials):
                    t = _r1_trial(broker, probe, folder, trial, subscribers, rate, capacity, rng)
                    _r1_settle(probe, f"rel/r1/t{trial}", base, t)
                    if not broker.alive():
                        raise RuntimeError(f"the daemon died in trial {trial}: {broker.why()}")
                    results.append(t)
                    note(
                        f"r1 trial {trial + 1}/{trials}: killed the {t.victim}, "
                        + (
                            "DEADLOCK"
                            if t.deadlock
                            else f"survivors moved on after {ms(t.recovery_s)}"
                        )
                        + (f"; LEFT {t.left}" if t.left else "")
                        + (f"; {t.records} dead publisher record(s) kept" if t.records else "")
                    )
        finally:
            broker.stop()
        leaked = broker.leftovers()
    report = Report(
        f"R1: kill -9 of a random client mid-stream ({trials} trials, 1 publisher at "
        f"{rate:,.0f} msgs/s + {subscribers} subscribers, reliable, {capacity} slots)"
    )
    pubs = sum(t.victim == "publisher" for t in results)
    report.add("trials", f"{len(results)} ({pubs} publishers, {len(results) - pubs} subscribers)")
    report.count(
        "deadlocks (no progress within 10 s)", sum(t.deadlock for t in results), "deadlocks"
    )
    report.count(
        "survivors that crashed or hung at stop", sum(t.crashed for t in results), "crashed"
    )
    report.count("torn messages", sum(t.torn for t in results), "torn")
    report.count("gaps (messages skipped)", sum(t.gaps for t in results), "gaps")
    report.count("duplicates", sum(t.dups for t in results), "dups")
    report.count("lost (sent, never received)", sum(t.lost for t in results), "lost")
    report.count("errors raised to the survivors", sum(t.errors for t in results), "errors")
    report.count(
        "trials leaving sessions or cursors behind", sum(bool(t.left) for t in results), "left"
    )
    report.count(
        "dead publishers' records left in the ring", sum(t.records for t in results), "records"
    )
    report.count("leaked segments after the daemon stopped", len(leaked), "leaked")
    for kind in ("subscriber", "publisher"):
        times = [t.recovery_s for t in results if t.victim == kind and t.recovery_s is not None]
        report.figures[f"recovery_{kind}_s"] = times
        report.add(f"recovery after a killed {kind}, p50 / p99", p50_p99(times))
    times = [t.recovery_s for t in results if t.recovery_s is not None]
    report.figures["recovery_s"] = times
    report.add(
        "recovery, median of all",
        ms(percentile(times, 0.5)) if times else "-",
        "< 10 s",
        len(times) == len(results),
    )
    report.print(out)
    return report


def _r1_settle(probe: tensorbus.Client, topic: str, base: tuple, t: Trial) -> None:
    """After a trial: the broker's sessions, doorbells and holder slots must
    return to ``base`` and the topic lose every subscriber (within DEADLINE),
    and its publisher records (``stats``: publishers) must all be freed."""

    def counts() -> tuple:
        s = probe.stats(topic)
        b = s["broker"]
        return (b["sessions"], b["bells_free"], b["holders_free"]), s["topics"][0]

    if not wait_for(lambda: counts()[0] == base and counts()[1]["subscribers"] == 0, DEADLINE):
        held, row = counts()
        t.left = f"sessions/bells/holders {held} (were {base}), subscribers {row['subscribers']}"
    wait_for(lambda: counts()[1]["publishers"] == 0, 1.0, 0.01)
    t.records = counts()[1]["publishers"]


def _r1_trial(
    broker: Broker,
    probe: tensorbus.Client,
    folder: str,
    trial: int,
    subscribers: int,
    rate: float,
    capacity: int,
    rng: random.Random,
) -> Trial:
    topic = f"rel/r1/t{trial}"
    probe.create_topic(topic, qos="reliable", capacity=capacity, slot_size=MSG_SIZE)
    board = Board(os.path.join(folder, f"board-{trial}"), rows=subscribers + 1)
    subs, pub = list(range(subscribers)), subscribers
    with Workers(folder, board) as workers:
        for row in subs:
            workers.start("sub", row, url=broker.url, pattern=topic)
        workers.wait_ready(subs)
        workers.start("pub", pub, url=broker.url, topic=topic, rate=rate)
        workers.wait_ready([pub])
        if not wait_for(lambda: all(board.get(r, COUNT) for r in subs), READY_TIMEOUT):
            raise RuntimeError(f"trial {trial}: the stream did not start")
        time.sleep(rng.uniform(0.0, 0.3))
        victim = rng.randrange(subscribers + 1)
        sent = board.get(pub, COUNT)
        t_kill = time.monotonic_ns()
        workers.kill(victim)
        t = Trial("publisher" if victim == pub else "subscriber")
        survivors = [r for r in (*subs, pub) if r != victim]
        extra = 0
        if victim == pub:
            for row in survivors:
                board.set(row, TARGET_SEQ, 0)
                board.set(row, TARGET_PID, os.getpid())
            extra = _publish_until(probe, topic, board, survivors, t_kill + int(DEADLINE * 1e9))
        else:
            for row in survivors:
                board.set(row, TARGET_SEQ, sent + capacity + 1)
                board.set(row, TARGET_PID, workers.procs[pub].pid)
            wait_for(lambda: all(board.get(r, REACHED_NS) for r in survivors), DEADLINE)
        reached = [board.get(r, REACHED_NS) for r in survivors]
        t.deadlock = not all(reached)
        if not t.deadlock:
            t.recovery_s = (max(reached) - t_kill) / 1e9
        # The end: the publisher stops, the survivors read all it sent, then stop.
        t.crashed += len(workers.stop([pub])) if victim != pub else 0
        expected = board.get(pub, COUNT) + extra  # a killed publisher: maybe 1 more
        readers = [r for r in survivors if r != pub]
        wait_for(lambda: all(board.get(r, COUNT) >= expected for r in readers), DEADLINE, 0.005)
        t.lost = sum(max(0, expected - board.get(r, COUNT)) for r in readers)
        t.crashed += len(workers.stop(readers))
        every = [*subs, pub]
        t.torn = board.total(every, TORN)
        t.gaps = board.total(every, GAPS)
        t.dups = board.total(every, DUPS)
        t.errors = board.total(survivors, ERRORS)
    return t


def _publish_until(
    probe: tensorbus.Client, topic: str, board: Board, rows: list[int], deadline_ns: int
) -> int:
    """After a publisher's kill: publish numbered messages from this process
    (one a millisecond) until every subscriber of ``rows`` received one, or
    the deadline. Returns how many were sent."""
    pid, seq = os.getpid(), 0
    with probe.publisher(topic, timeout=0.05) as pub:
        while time.monotonic_ns() < deadline_ns:
            with contextlib.suppress(tensorbus.BackpressureError):
                pub.send(encode(seq, pid))
                seq += 1
            if all(board.get(r, REACHED_NS) for r in rows):
                break
            time.sleep(0.001)
    return seq


# --------------------------------------------------------------------- R4


def r4(
    seconds: float = 10.0,
    rate: float = 5_000,
    subscribers: int = 8,
    grace: float = 1.0,
    qos: str = "reliable",
    out=sys.stdout,
) -> Report:
    """R4: one stalled subscriber among ``subscribers`` (it subscribes and
    never reads), beside a run with no staller, in the same invocation.

    The topic is reliable by default: that is where a staller can hurt.
    On a realtime topic the publisher never waits, so a staller is only
    lapped (its drops counted) and cannot touch the others by construction.
    On a reliable topic the publisher waits for the slowest cursor, so
    without eviction one staller would hold every reader forever (by
    design: every message, in order); the broker's ``--slow-consumer-grace``
    evicts it after ``grace`` seconds of a full ring. The case measures
    what that costs the other readers. The publisher is paced at ``rate``
    as a loop making one message per send would be: a wait delays it, and
    it carries on at ``rate`` afterwards (no burst of what it missed). The
    cost is then the publisher's longest wait (about the grace, shown),
    and the readers' latency, publish timestamp to receive, p50/p99 beside
    the no-staller run: target p99 within 2x. Memory must stay bounded: the
    daemon's RSS (less shared memory) and its /dev/shm use are sampled all
    along. ``qos="realtime"`` runs the same on a realtime topic (there the
    staller is evicted for dropping).
    """
    runs = {}
    for staller in (False, True):
        runs[staller] = _r4_run(seconds, rate, subscribers, grace, qos, staller)
        note(
            f"r4 run {'with' if staller else 'without'} a staller: p99 "
            f"{runs[staller]['p99_us']:,.0f} us, {runs[staller]['received']:,} received"
        )
    base, stalled = runs[False], runs[True]
    readers = subscribers - 1
    report = Report(
        f"R4: one stalled subscriber of {subscribers} ({qos}, {rate:,.0f} msgs/s for "
        f"{seconds:g} s, --slow-consumer-grace {grace:g}); the other {readers} readers"
    )
    for label, run in (("without staller", base), ("with staller", stalled)):
        report.add(
            f"latency p50 / p99, {label}",
            f"{run['p50_us']:,.0f} / {run['p99_us']:,.0f} us",
        )
    ratio = stalled["p99_us"] / max(base["p99_us"], 1e-9)
    report.figures.update(without=base, with_staller=stalled, p99_ratio=ratio)
    report.add("p99 with / without staller", f"{ratio:.2f}x", "<= 2x", ratio <= 2.0)
    for label, run in (("without staller", base), ("with staller", stalled)):
        report.add(f"publisher's longest send, {label}", ms(run["max_wait_s"]))
    report.count(
        "messages the readers lost (reliable)" if qos == "reliable" else "readers' gaps",
        base["lost"] + stalled["lost"],
        "lost",
    )
    report.count("torn messages", base["torn"] + stalled["torn"], "torn")
    if qos == "reliable":
        report.add("staller evicted", f"{stalled['evictions']}", "1", stalled["evictions"] == 1)
    else:  # a subscriber that never reads never counts its drops: nothing to evict it for
        report.add("staller evicted", f"{stalled['evictions']}")
    report.add("drops counted on the topic", f"{base['drops']:,} / {stalled['drops']:,}")
    for label, run in (("without staller", base), ("with staller", stalled)):
        report.add(
            f"daemon RSS min / max, {label}",
            f"{run['rss_min_kb'] / 1024:.1f} / {run['rss_max_kb'] / 1024:.1f} MiB",
        )
    bounded = stalled["rss_max_kb"] <= 1.1 * base["rss_max_kb"] + 1024
    report.add(
        "daemon RSS max, with / without staller",
        f"{stalled['rss_max_kb'] / max(base['rss_max_kb'], 1):.2f}x",
        "<= 1.1x + 1 MiB",
        bounded,
    )
    shm_same = stalled["shm_max"] == stalled["shm_min"]
    report.add(
        "daemon /dev/shm min / max, with staller",
        f"{stalled['shm_min'] / MiB:.1f} / {stalled['shm_max'] / MiB:.1f} MiB",
        "constant",
        shm_same,
    )
    report.print(out)
    return report


def _r4_run(
    seconds: float, rate: float, subscribers: int, grace: float, qos: str, staller: bool
) -> dict:
    """One R4 run: ``subscribers - 1`` latency readers, the staller or not."""
    topic = "rel/r4/data"
    readers = list(range(subscribers - 1))
    stall_row, pub = subscribers - 1, subscribers
    with (
        tempfile.TemporaryDirectory(prefix="tb-rel-r4-") as folder,
        Broker(folder, "--slow-consumer-grace", str(grace)) as broker,
        tensorbus.connect(broker.url, name="rel-probe") as probe,
    ):
        probe.create_topic(topic, qos=qos, capacity=1024, slot_size=MSG_SIZE)
        board = Board(os.path.join(folder, "board"), rows=subscribers + 1)
        with Workers(folder, board) as workers:
            for row in readers:
                npy = os.path.join(folder, f"lat-{row}.npy")
                workers.start("sub", row, url=broker.url, pattern=topic, mode="latency", out=npy)
            if staller:
                workers.start("sub", stall_row, url=broker.url, pattern=topic, mode="stall")
            workers.wait_ready(readers + ([stall_row] if staller else []))
            workers.start("pub", pub, url=broker.url, topic=topic, rate=rate, catch_up=False)
            workers.wait_ready([pub])
            rss, shm = [], []
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                rss.append(private_rss_kb(broker.pid) or 0)
                shm.append(broker.shm_bytes())
                time.sleep(0.2)
            failed = workers.stop([pub])
            sent = board.get(pub, COUNT)
            wait_for(lambda: all(board.get(r, COUNT) >= sent for r in readers), DEADLINE, 0.01)
            stats = probe.stats(topic)
            failed += workers.stop(readers + ([stall_row] if staller else []))
            if failed:
                raise RuntimeError(f"r4: worker {failed[0]} failed:\n{workers.tail(failed[0])}")
            lat = np.concatenate([np.load(os.path.join(folder, f"lat-{r}.npy")) for r in readers])
            return {
                "sent": sent,
                "received": board.total(readers, COUNT),
                "lost": sum(max(0, sent - board.get(r, COUNT)) for r in readers),
                "torn": board.total(readers, TORN),
                "p50_us": float(np.percentile(lat, 50)) / 1e3,
                "p99_us": float(np.percentile(lat, 99)) / 1e3,
                "max_wait_s": board.get(pub, MAX_WAIT_NS) / 1e9,
                "evictions": stats["broker"]["evictions"],
                "drops": stats["topics"][0]["drops"],
                "rss_min_kb": min(rss),
                "rss_max_kb": max(rss),
                "shm_min": min(shm),
                "shm_max": max(shm),
            }


# --------------------------------------------------------------------- R6


def r6(seconds: float = 600.0, rate: float = 100_000, out=sys.stdout) -> Report:
    """R6: a soak. One publisher at ``rate`` msgs/s to one subscriber on a
    reliable topic for ``seconds``; the RSS (less shared memory) of the
    daemon, the publisher and the subscriber sampled every second. Drift:
    the last sample against the first after a warm-up (a tenth of the run,
    at most 5 s), in %; target within 5 % each. Then the publisher stops and
    every message it sent must reach the subscriber, in order, intact."""
    topic = "rel/r6/data"
    sub, pub = 0, 1
    names = ("daemon", "publisher", "subscriber")
    warm = min(5.0, seconds / 10)
    with (
        tempfile.TemporaryDirectory(prefix="tb-rel-r6-") as folder,
        Broker(folder) as broker,
        tensorbus.connect(broker.url, name="rel-probe") as probe,
    ):
        probe.create_topic(topic, qos="reliable", capacity=4096, slot_size=MSG_SIZE)
        board = Board(os.path.join(folder, "board"), rows=2)
        with Workers(folder, board) as workers:
            workers.start("sub", sub, url=broker.url, pattern=topic)
            workers.wait_ready([sub])
            workers.start("pub", pub, url=broker.url, topic=topic, rate=rate)
            workers.wait_ready([pub])
            pids = (broker.pid, workers.procs[pub].pid, workers.procs[sub].pid)
            samples: list[tuple[float, list[int]]] = []
            t0 = time.monotonic()
            tick, last_note = t0, t0
            while tick - t0 < seconds:
                tick += 1.0
                time.sleep(max(0.0, tick - time.monotonic()))
                rss = [private_rss_kb(pid) for pid in pids]
                if None in rss:
                    gone = names[rss.index(None)]
                    raise RuntimeError(f"r6: the {gone} died after {tick - t0:.0f} s")
                samples.append((tick - t0, rss))
                if tick - last_note >= 60 or tick - t0 >= seconds:
                    last_note = tick
                    note(
                        f"r6 {tick - t0:.0f}/{seconds:g} s: sent {board.get(pub, COUNT):,}, "
                        f"received {board.get(sub, COUNT):,}, RSS "
                        + ", ".join(
                            f"{n} {k / 1024:.1f} MiB" for n, k in zip(names, rss, strict=True)
                        )
                    )
            elapsed = time.monotonic() - t0
            failed = workers.stop([pub])
            sent = board.get(pub, COUNT)
            wait_for(lambda: board.get(sub, COUNT) >= sent, 30.0, 0.01)
            failed += workers.stop([sub])
            if failed:
                raise RuntimeError(f"r6: worker {failed[0]} failed:\n{workers.tail(failed[0])}")
            received = board.get(sub, COUNT)
            torn, gaps, dups = (board.get(sub, c) for c in (TORN, GAPS, DUPS))
            stalls = board.get(pub, STALLS)
    report = Report(
        f"R6: soak, 1 publisher -> 1 subscriber, reliable, {rate:,.0f} msgs/s for {seconds:g} s"
    )
    report.add("messages sent", f"{sent:,} ({sent / elapsed:,.0f}/s)")
    report.add("messages received", f"{received:,}")
    report.count("lost", max(0, sent - received), "lost")
    report.count("gaps (messages skipped)", gaps, "gaps")
    report.count("duplicates", dups, "dups")
    report.count("torn", torn, "torn")
    report.add("publisher's sends that waited 1 s for credit", f"{stalls:,}")
    steady = [rss for at, rss in samples if at >= warm] or [samples[-1][1]]
    report.figures.update(sent=sent, received=received, samples=samples, warm_s=warm)
    for i, name in enumerate(names):
        first, last = steady[0][i], steady[-1][i]
        top = max(rss[i] for rss in steady)
        drift = 100.0 * (last - first) / max(first, 1)
        report.figures[f"{name}_drift_percent"] = drift
        report.add(
            f"{name} RSS first / last / max",
            f"{first / 1024:.1f} / {last / 1024:.1f} / {top / 1024:.1f} MiB",
        )
        report.add(f"{name} RSS drift", f"{drift:+.1f} %", "within 5 %", abs(drift) <= 5.0)
    report.add("samples (after a warm-up of)", f"{len(steady)} ({warm:g} s)")
    report.print(out)
    return report


# --------------------------------------------------------------------- R2


@dataclass
class Restart:
    """What one R2 trial saw."""

    standby: bool
    error: str = ""
    lost: int = 0
    dups: int = 0
    gaps: int = 0
    torn: int = 0
    split: bool = False
    errors: int = 0
    answer_s: float | None = None
    resume_s: float | None = None
    first_s: float | None = None
    leaked: int = 0


def r2(
    trials: int = 20,
    standby_trials: int = 20,
    rate: float = 2_000,
    seed: int | None = None,
    out=sys.stdout,
) -> Report:
    """R2: kill -9 of the daemon mid-stream, then a new daemon on the same
    socket: started after the kill (``trials``), or already waiting as
    ``tensorbus serve --standby`` (``standby_trials``).

    A publisher process streams numbered messages at ``rate``/s on a
    reliable topic to a subscriber process. After a random moment the
    daemon gets SIGKILL; the new one must take over its shared memory and
    the clients must carry on by themselves: the pair must lose and repeat
    nothing. A subscriber that joins after the restart must receive what
    the old publisher sends from then on: none within 5 s while the
    publisher kept sending is a silent split (its process is started
    before the kill and connects once a request is answered, so no Python
    start-up is in its times). Figures: the time from the kill to a
    client's request being answered (a restart includes the new daemon's
    start-up), from the kill to the new subscriber's first message, and
    from its subscribe to that message; errors raised to the clients; and
    what the last daemon left in /dev/shm once stopped."""
    rng = random.Random(seed)
    results: list[Restart] = []
    plan = [False] * trials + [True] * standby_trials
    for i, standby in enumerate(plan):
        t = _r2_trial(standby, rate, rng)
        results.append(t)
        note(
            f"r2 trial {i + 1}/{len(plan)} ({'standby' if standby else 'restart'}): "
            + (
                f"FAILED: {t.error}"
                if t.error
                else f"answered after {ms(t.answer_s)}, new subscriber's first message "
                f"after {ms(t.resume_s)}, lost {t.lost}, dups {t.dups}"
                + (", SILENT SPLIT" if t.split else "")
            )
        )
    report = Report(
        f"R2: kill -9 of the daemon mid-stream ({trials} restarts, {standby_trials} standby "
        f"takeovers; 1 publisher at {rate:,.0f} msgs/s -> 1 subscriber, reliable)"
    )
    report.add("trials", f"{len(results)}")
    failed = [t for t in results if t.error]
    report.count("trials that failed", len(failed), "failed")
    for reason in sorted({t.error for t in failed})[:3]:
        report.add("  failure", reason[-100:])
    report.count("messages lost", sum(t.lost for t in results), "lost")
    report.count("messages duplicated", sum(t.dups for t in results), "dups")
    report.count("gaps (messages skipped)", sum(t.gaps for t in results), "gaps")
    report.count("torn", sum(t.torn for t in results), "torn")
    report.count("silent splits", sum(t.split for t in results), "splits")
    report.count("errors raised to the clients", sum(t.errors for t in results), "errors")
    report.count(
        "leaked segments after the last daemon stopped", sum(t.leaked for t in results), "leaked"
    )
    for standby, label in ((False, "restart"), (True, "standby")):
        answer = [t.answer_s for t in results if t.standby == standby and t.answer_s is not None]
        resume = [t.resume_s for t in results if t.standby == standby and t.resume_s is not None]
        report.figures[f"{label}_answer_s"] = answer
        report.figures[f"{label}_resume_s"] = resume
        report.add(f"{label}: kill to a request answered, p50 / p99", p50_p99(answer))
        first = [t.first_s for t in results if t.standby == standby and t.first_s is not None]
        report.figures[f"{label}_first_s"] = first
        report.add(f"{label}: kill to a new subscriber's first message, p50 / p99", p50_p99(resume))
        report.add(f"{label}: its subscribe to its first message, p50 / p99", p50_p99(first))
    report.print(out)
    return report


def _answered(path: str, timeout: float) -> float | None:
    """When (CLOCK_MONOTONIC) a broker on socket ``path`` answered a stats
    request, trying until ``timeout``; None if none did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(path)  # a stale socket refuses at once
            except OSError:
                time.sleep(0.001)
                continue
        try:
            with tensorbus.connect(f"ipc://{path}", name="rel-probe", timeout=1.0) as client:
                client.stats(NO_TOPIC)
            return time.monotonic()
        except tensorbus.TensorbusError:
            time.sleep(0.001)
    return None


def _r2_trial(standby: bool, rate: float, rng: random.Random) -> Restart:
    topic = "rel/r2/data"
    old, pub, late = 0, 1, 2
    t = Restart(standby)
    brokers: list[Broker] = []
    with tempfile.TemporaryDirectory(prefix="tb-rel-r2-") as folder:
        path = os.path.join(folder, "run", "broker.sock")
        board = Board(os.path.join(folder, "board"), rows=3)
        try:
            with Workers(folder, board) as workers:
                brokers.append(Broker(folder, path=path))
                if standby:
                    brokers.append(Broker(folder, "--standby", path=path, wait=False))
                    if not wait_for(lambda: not brokers[1].alive(), 1.0, 0.05):
                        pass  # still waiting for the lock: as it should
                    else:
                        t.error = f"the standby daemon exited: {brokers[1].why()}"
                        return t
                with tensorbus.connect(brokers[0].url, name="rel-probe") as probe:
                    probe.create_topic(topic, qos="reliable", capacity=1024, slot_size=MSG_SIZE)
                workers.start("sub", old, url=brokers[0].url, pattern=topic)
                workers.wait_ready([old])
                workers.start("pub", pub, url=brokers[0].url, topic=topic, rate=rate)
                workers.start(
                    "sub", late, url=brokers[0].url, pattern=topic, mode="late", wait_go=True
                )
                workers.wait_ready([pub])
                if not wait_for(
                    lambda: board.get(old, COUNT) and board.get(late, PID), READY_TIMEOUT
                ):
                    raise RuntimeError("r2: the stream did not start")
                time.sleep(rng.uniform(0.1, 0.5))
                t_kill = time.monotonic()
                brokers[0].kill()
                if not standby:
                    brokers.append(Broker(folder, path=path, wait=False))
                answered = _answered(path, READY_TIMEOUT)
                if answered is None:
                    t.error = f"no daemon answered within {READY_TIMEOUT:g} s: {brokers[-1].why()}"
                    return t
                t.answer_s = answered - t_kill
                board.set(late, GO, 1)
                workers.wait_ready([late])
                sent_at_join = board.get(pub, COUNT)
                if wait_for(lambda: board.get(late, COUNT) > 0, 5.0):
                    t.resume_s = board.get(late, FIRST_NS) / 1e9 - t_kill
                    t.first_s = (board.get(late, FIRST_NS) - board.get(late, READY_NS)) / 1e9
                elif board.get(pub, COUNT) > sent_at_join:
                    t.split = True
                else:
                    t.error = "the publisher stopped after the restart"
                failed = workers.stop([pub])
                sent = board.get(pub, COUNT)
                wait_for(
                    lambda: (
                        board.get(old, COUNT) >= sent
                        and (t.split or board.get(late, LAST_SEQ) >= sent - 1)
                    ),
                    DEADLINE,
                    0.005,
                )
                t.lost = max(0, sent - board.get(old, COUNT))
                if not t.split and board.get(late, COUNT):
                    t.lost += max(0, sent - 1 - board.get(late, LAST_SEQ))
                t.dups = board.total((old, late), DUPS)
                t.gaps = board.total((old, late), GAPS)
                t.torn = board.total((old, late), TORN)
                t.errors = board.total((old, pub, late), ERRORS)
                failed += workers.stop([old, late])
                if failed and not t.error:
                    t.error = f"worker {failed[0]} failed: {workers.tail(failed[0])[-200:]}"
        finally:
            for b in brokers:
                b.stop()
            if brokers and not t.error:
                t.leaked = len(brokers[-1].leftovers())
            for b in brokers:
                b.unlink()
    return t


# -------------------------------------------------------------------- main


CASES = {"r1": r1, "r2": r2, "r4": r4, "r6": r6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="docs/reliability.md explains the cases, their figures and their targets.",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    cases = parser.add_subparsers(dest="case", required=True)
    p = cases.add_parser("r1", help="kill -9 of a random client mid-stream")
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--subscribers", type=int, default=3)
    p.add_argument("--rate", type=float, default=20_000, help="publisher's msgs/s")
    p.add_argument("--capacity", type=int, default=64, help="ring slots")
    p.add_argument("--seed", type=int, default=None)
    p = cases.add_parser("r2", help="kill -9 of the daemon: restart and standby takeover")
    p.add_argument("--trials", type=int, default=20, help="restarts after the kill")
    p.add_argument("--standby-trials", type=int, default=20, help="takeovers by a standby")
    p.add_argument("--rate", type=float, default=2_000, help="publisher's msgs/s")
    p.add_argument("--seed", type=int, default=None)
    p = cases.add_parser("r4", help="one stalled subscriber among 8")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each of the two runs")
    p.add_argument("--rate", type=float, default=5_000, help="publisher's msgs/s")
    p.add_argument("--subscribers", type=int, default=8, help="the staller included")
    p.add_argument("--grace", type=float, default=1.0, help="--slow-consumer-grace")
    p.add_argument("--qos", choices=("reliable", "realtime"), default="reliable")
    p = cases.add_parser("r6", help="soak: RSS drift and losses")
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--rate", type=float, default=100_000, help="publisher's msgs/s")
    p = cases.add_parser("all", help="r1, r4, r6 and r2 at full sizes")
    p.add_argument("--short", action="store_true", help="the CI sizes instead")
    args = vars(parser.parse_args(argv))
    case = args.pop("case")
    if case == "all":
        short = args.pop("short")
        reports = [
            CASES[name](**(SHORT[name] if short else {})) for name in ("r1", "r4", "r6", "r2")
        ]
    else:
        reports = [CASES[case](**args)]
    missed = [r.title.split(":")[0] for r in reports if not r.ok]
    if missed:
        print(f"\ntargets missed in {', '.join(missed)}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_worker"]:
        worker(sys.argv[2], json.loads(sys.argv[3]))
    else:
        sys.exit(main())
