"""What every case of the reliability suite shares: numbered and checksummed
messages, the board of counters workers report on, the workers, a broker
on a private socket, and the report tables."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from array import array
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

import tensorbus

# Workers run perf/reliability.py _worker ROLE KWARGS.
HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reliability.py")
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
