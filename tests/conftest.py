"""Shared fixtures: rings that are always unlinked, and child processes that
are always stopped by the test that started them."""

import contextlib
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import time
import weakref

import pytest

from tensorbus._core import Ring

SPAWN = multiprocessing.get_context("spawn")
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def make_ring():
    """Create rings with test-friendly defaults; unlink them afterwards."""
    rings = []

    def make(**kwargs):
        kwargs.setdefault("instance", f"test{os.getpid()}")
        ring = Ring.create(**kwargs)
        rings.append(ring)
        return ring

    yield make
    for ring in rings:
        try:
            ring.unlink()
        except Exception:
            pass


@pytest.fixture
def procs():
    """Start child processes (spawned, so they attach like strangers would);
    whatever is still alive at the end of the test is killed."""
    started = []

    def start(target, *args):
        p = SPAWN.Process(target=target, args=args, daemon=True)
        p.start()
        started.append(p)
        return p

    yield start
    for p in started:
        if p.is_alive():
            p.kill()
        p.join(5)


class Daemon:
    """A real ``tensorbus serve`` subprocess on a private socket path."""

    def __init__(self, tmp_path, *args, env=None, prefix=(), wait=True):
        self.ipc_path = str(tmp_path / "run" / "broker.sock")
        self.args = args
        if not any(str(a).startswith("--arena-size") for a in args):
            args = (*args, "--arena-size", "64MiB")  # small: quick to create
        cmd = [*prefix, sys.executable, "-m", "tensorbus", "serve", "--ipc", self.ipc_path, *args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.instance = f"d{self.proc.pid}"
        if wait:  # a --standby says it is ready only once it took over: ready()
            self.ready()

    def ready(self, timeout=15.0):
        self.endpoints = self._wait_ready(timeout)
        self.url = self.endpoints[0]
        return self

    def _wait_ready(self, timeout=15.0):
        ready = select.select([self.proc.stdout], [], [], timeout)[0]
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("tensorbus ready "):
            self.proc.kill()
            err = self.proc.stderr.read()
            raise RuntimeError(f"daemon did not start: {line!r} {err}")
        return line.split()[2:]

    def segments(self):
        return [n for n in os.listdir("/dev/shm") if f"-{self.instance}-" in n]

    def unlink_segments(self):
        """Remove what this daemon left in /dev/shm: one killed with -9 (and
        not taken over) cleans up nothing. Only once every daemon of the
        test is stopped: a successor may be serving these segments."""
        for name in self.segments():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join("/dev/shm", name))

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()
        return self.proc.returncode


@pytest.fixture
def daemon_factory(tmp_path):
    """Start daemons with extra ``serve`` arguments; all stopped at the end."""
    started = []

    def start(*args, env=None, path=None, prefix=(), wait=True):
        d = Daemon(path or tmp_path, *args, env=env, prefix=prefix, wait=wait)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
    for d in started:
        d.unlink_segments()


@pytest.fixture
def daemon(daemon_factory):
    return daemon_factory()


@pytest.fixture
def procs_ddp():
    """Start DDP trainer ranks and parameter servers (tests/ddp_jobs.py);
    all killed at the end."""
    from ddp_jobs import ddp_procs

    with ddp_procs() as start:
        yield start


@pytest.fixture
def popen():
    """Start worker subprocesses (tests/bus_workers.py); all killed at the end."""
    started = []

    def start(*args):
        p = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "bus_workers.py"), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(p)
        return p

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(5)
        for stream in (p.stdin, p.stdout, p.stderr):
            stream.close()


# What read_line has read of a worker's stdout past the line it returned.
_UNREAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def read_line(proc, timeout=10.0):
    """The next stdout line of a worker, or fail with its stderr. It reads
    the pipe itself: select() cannot see lines that ``proc.stdout`` has
    already buffered, and would wait for the worker's next write (or exit)."""
    fd = proc.stdout.fileno()
    buf = _UNREAD.pop(proc, b"")
    deadline = time.monotonic() + timeout
    eof = False
    while b"\n" not in buf and not eof:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 65536)
        eof = not chunk
        buf += chunk
    line, sep, rest = buf.partition(b"\n")
    if sep or (eof and line):
        _UNREAD[proc] = rest
        return line.decode().strip()
    _UNREAD[proc] = buf  # a line begun, not ended: the rest of it comes later
    raise AssertionError(
        f"worker said nothing within {timeout} s: {proc.stderr.read()[-2000:]}"
        if proc.poll() is not None
        else f"worker silent for {timeout} s"
    )
