"""iceoryx2 backend: zero-copy shared-memory publish-subscribe (pip ``iceoryx2``).

Measures iceoryx2's Python bindings between this process and a spawned peer
process, using publish-subscribe services whose payload is a dynamic slice of
bytes (``iox2.Slice[ctypes.c_uint8]``):

* ``lat``: ping-pong over two services (ping, pong). This process copies
  ``size`` bytes into a loaned sample and sends it; the peer copies the payload
  into a sample of its own and sends it back. Both sides busy-poll
  ``Subscriber.receive()``, the lowest-latency way to use iceoryx2. The reply
  is read in place (zero-copy), which is how iceoryx2 hands data to a reader.
* ``thr``: one-way stream of ``count`` samples of ``size`` bytes each (the
  sender copies ``size`` bytes into every sample); the peer busy-polls and
  reports how many it received and when the last one arrived.

Every call uses its own file prefix (``/dev/shm/iox2_<pid>_<token>_*``) and its
own root directory (``/tmp/iox2_<pid>_<token>/``), so concurrent runs cannot
collide and the files a call created can be removed exactly afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import multiprocessing as mp
import os
import queue
import secrets
import shutil
import time
import traceback
from dataclasses import dataclass
from typing import Any

NAME = "iox2"

_TIMEOUT_S = 60.0  # longest wait for any answer from the peer
_POLL_CHECK = 1 << 14  # empty polls between deadline checks (keeps the hot loop cheap)
_SHM_DIR = "/dev/shm"
_THR_RING_BYTES = 256 << 20  # in-flight bytes for thr; bounds the shared-memory segment
_THR_MAX_WINDOW = 1024  # most samples in flight for thr


@dataclass(frozen=True)
class _Names:
    """Per-call unique file prefix, root directory and service names."""

    prefix: str
    root: str
    base: str

    @staticmethod
    def new() -> _Names:
        tag = f"{os.getpid()}_{secrets.token_hex(6)}"
        return _Names(
            prefix=f"iox2_{tag}_",
            root=f"/tmp/iox2_{tag}/",
            base=f"perf/{tag}",
        )


def missing() -> str | None:
    """Why this backend cannot run here (perf.py then skips it); None if it can."""
    if importlib.util.find_spec("iceoryx2") is None:
        return "the iceoryx2 package is not installed (pip install 'tensorbus[perf]')"
    return None


def _iox2() -> Any:
    # Imported lazily so that perf.py can list backends without iceoryx2 installed.
    import iceoryx2

    return iceoryx2


def _node(names: _Names) -> Any:
    """Creates a node whose files all carry this call's prefix and root directory."""
    iox2 = _iox2()
    cfg = iox2.config.default()
    cfg.global_cfg.prefix = iox2.FileName.new(names.prefix)
    cfg.global_cfg.root_path = iox2.Path.new(names.root)
    return iox2.NodeBuilder.new().config(cfg).create(iox2.ServiceType.Ipc)


def _service(node: Any, name: str, buffer: int) -> Any:
    """Opens or creates a 1:1 byte-slice publish-subscribe service that never drops."""
    iox2 = _iox2()
    return (
        node.service_builder(iox2.ServiceName.new(name))
        .publish_subscribe(iox2.Slice[ctypes.c_uint8])
        .max_publishers(1)
        .max_subscribers(1)
        .max_nodes(2)
        .history_size(0)
        .subscriber_max_buffer_size(buffer)
        .subscriber_max_borrowed_samples(1)
        # No overwriting of unread samples: a full buffer makes the publisher wait.
        .enable_safe_overflow(False)
        .open_or_create()
    )


def _publisher(service: Any, size: int) -> Any:
    iox2 = _iox2()
    return (
        service.publisher_builder()
        # Sizes the data segment; without it large slices cannot be loaned.
        .initial_max_slice_len(max(size, 1))
        .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
        .max_loaned_samples(1)
        .create()
    )


def _subscriber(service: Any, buffer: int) -> Any:
    return service.subscriber_builder().buffer_size(buffer).create()


def _thr_window(size: int) -> int:
    return max(2, min(_THR_MAX_WINDOW, _THR_RING_BYTES // max(size, 1)))


class _Idle:
    """Cheap idle watchdog for busy-poll loops: reads the clock once per _POLL_CHECK polls."""

    def __init__(self, what: str, proc: Any = None) -> None:
        self.what = what
        self.proc = proc  # peer to watch (this side); None on the peer side
        self.ppid = os.getppid()
        self.since = 0.0

    def check(self, spins: int) -> None:
        now = time.monotonic()
        if spins == _POLL_CHECK:
            self.since = now
        elif now - self.since > _TIMEOUT_S:
            raise RuntimeError(f"iox2 peer did not {self.what} within {_TIMEOUT_S:.0f} s.")
        if self.proc is None:
            if os.getppid() != self.ppid:
                raise RuntimeError("iox2 peer: parent process exited.")
        elif not self.proc.is_alive():
            raise RuntimeError(
                f"iox2 peer exited (code {self.proc.exitcode}) while we waited to {self.what}."
            )


# --------------------------------------------------------------------- peer side


def _peer_main(
    mode: str, names: _Names, size: int, count: int, q: Any, acked: Any, done: Any
) -> None:
    """Peer process entry point (module level so the spawn context can import it)."""
    try:
        if mode == "lat":
            _peer_lat(names, size, count, q)
        else:
            _peer_thr(names, size, count, q, acked, done)
    except BaseException as exc:  # report instead of dying silently
        q.put(("error", f"{type(exc).__name__}: {exc}"))
        raise


def _peer_lat(names: _Names, size: int, rounds: int, q: Any) -> None:
    node = _node(names)
    ping = _service(node, f"{names.base}/ping", 1)
    pong = _service(node, f"{names.base}/pong", 1)
    sub = _subscriber(ping, 1)
    pub = _publisher(pong, size)
    q.put(("ready",))
    memmove = ctypes.memmove
    receive = sub.receive
    loan = pub.loan_slice_uninit
    idle = _Idle("get a ping")
    for _ in range(rounds):
        spins = 0
        while (sample := receive()) is None:
            spins += 1
            if spins % _POLL_CHECK == 0:
                idle.check(spins)
        n = sample.header.number_of_elements
        reply = loan(n)
        memmove(reply.payload_ptr, sample.payload_ptr, n)
        sample.delete()  # hand the slot back to the publisher right away
        reply.assume_init().send()


def _peer_thr(names: _Names, size: int, count: int, q: Any, acked: Any, done: Any) -> None:
    window = _thr_window(size)
    node = _node(names)
    data = _service(node, f"{names.base}/data", window)
    sub = _subscriber(data, window)
    q.put(("ready",))
    receive = sub.receive
    perf_counter = time.perf_counter
    idle = _Idle("get a sample")
    received = 0
    t_last = 0.0
    spins = 0
    finishing = False
    while received < count:
        sample = receive()
        if sample is None:
            if finishing:
                break  # sender is done and the buffer is empty: report what really arrived
            spins += 1
            if spins % _POLL_CHECK == 0:
                # Poll once more after seeing `done`, since a sample sent before it
                # may have landed after the receive above.
                finishing = done.is_set()
                idle.check(spins)
            continue
        t_last = perf_counter()
        spins = 0
        sample.delete()
        received += 1
        acked.value = received  # credit for the sender's flow control
    q.put(("result", received, t_last))


# ------------------------------------------------------------------- this side


def _expect(q: Any, proc: Any, kind: str) -> tuple[Any, ...]:
    """Waits for the peer's next message of ``kind``, raising on error or timeout."""
    deadline = time.monotonic() + _TIMEOUT_S
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"iox2 peer sent no '{kind}' within {_TIMEOUT_S:.0f} s.")
        try:
            msg = q.get(timeout=min(left, 1.0))
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(
                    f"iox2 peer exited (code {proc.exitcode}) before sending '{kind}'."
                ) from None
            continue
        if msg[0] == "error":
            raise RuntimeError(f"iox2 peer failed: {msg[1]}")
        if msg[0] == kind:
            return tuple(msg)


def _run_lat(proc: Any, q: Any, names: _Names, size: int, count: int, warmup: int) -> list[int]:
    node = _node(names)
    ping = _service(node, f"{names.base}/ping", 1)
    pong = _service(node, f"{names.base}/pong", 1)
    pub = _publisher(ping, size)
    sub = _subscriber(pong, 1)
    proc.start()
    _expect(q, proc, "ready")
    pub.update_connections()  # connect to the peer's subscriber before the first send

    payload = bytes(size)
    memmove = ctypes.memmove
    receive = sub.receive
    loan = pub.loan_slice_uninit
    perf_ns = time.perf_counter_ns
    idle = _Idle("answer a ping", proc)
    out: list[int] = []
    for i in range(warmup + count):
        t0 = perf_ns()
        sample = loan(size)
        memmove(sample.payload_ptr, payload, size)
        sample.assume_init().send()
        spins = 0
        while (reply := receive()) is None:
            spins += 1
            if spins % _POLL_CHECK == 0:
                idle.check(spins)
        t1 = perf_ns()
        got = reply.header.number_of_elements
        reply.delete()
        if got != size:
            raise RuntimeError(f"iox2 peer echoed {got} bytes instead of {size}.")
        if i >= warmup:
            out.append(t1 - t0)
    return out


def _run_thr(
    proc: Any, q: Any, acked: Any, done: Any, names: _Names, size: int, count: int
) -> tuple[int, float]:
    window = _thr_window(size)
    node = _node(names)
    data = _service(node, f"{names.base}/data", window)
    pub = _publisher(data, size)
    proc.start()
    _expect(q, proc, "ready")
    pub.update_connections()

    payload = bytes(size)
    memmove = ctypes.memmove
    loan = pub.loan_slice_uninit
    perf_counter = time.perf_counter
    idle = _Idle("drain its buffer", proc)
    credit = window  # samples we may send before re-reading the peer's count
    t0 = perf_counter()
    for sent in range(count):
        if credit == 0:
            # Flow control in Python: with RetryUntilDelivered a full buffer would
            # block inside send() holding the GIL, forever if the peer died.
            spins = 0
            while (credit := window - (sent - acked.value)) <= 0:
                spins += 1
                if spins % _POLL_CHECK == 0:
                    idle.check(spins)
        sample = loan(size)
        memmove(sample.payload_ptr, payload, size)
        sample.assume_init().send()
        credit -= 1
    done.set()
    _, received, t_last = _expect(q, proc, "result")
    if received == 0:
        raise RuntimeError("iox2 peer received no message at all.")
    return int(received), float(t_last) - t0


def _stop(proc: Any, failed: bool) -> None:
    """Joins the peer; kills it at once after a failure, else if it does not finish soon."""
    if proc.pid is None:
        return
    proc.join(0.0 if failed else 5.0)
    if proc.is_alive():
        proc.kill()
        proc.join(5.0)


def _cleanup(names: _Names) -> None:
    """Removes the files iceoryx2 left behind for this call (only ours, by unique name)."""
    gc.collect()  # drop any remaining iceoryx2 handles so they release their files first
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(_SHM_DIR):
            if entry.startswith(names.prefix):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(_SHM_DIR, entry))
    shutil.rmtree(names.root, ignore_errors=True)


def _run(mode: str, size: int, count: int, warmup: int) -> Any:
    names = _Names.new()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    acked = ctx.RawValue(ctypes.c_int64, 0)
    done = ctx.Event()
    rounds = warmup + count
    proc = ctx.Process(
        target=_peer_main,
        args=(mode, names, size, rounds if mode == "lat" else count, q, acked, done),
        daemon=True,
        name=f"iox2-{mode}-peer",
    )
    failed = True
    try:
        if mode == "lat":
            result: Any = _run_lat(proc, q, names, size, count, warmup)
        else:
            result = _run_thr(proc, q, acked, done, names, size, count)
        failed = False
        return result
    except BaseException as exc:
        # The traceback keeps the inner frames' iceoryx2 handles alive; drop them so
        # they close before their files are removed below.
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        _stop(proc, failed)
        q.close()
        q.join_thread()
        _cleanup(names)


def lat(size: int, count: int, warmup: int) -> list[int]:
    """Ping-pong round-trip times in ns for ``count`` messages of ``size`` bytes."""
    return _run("lat", size, count, warmup)


def thr(size: int, count: int) -> tuple[int, float]:
    """One-way stream: (messages the peer received, seconds first send -> last receipt)."""
    return _run("thr", size, count, 0)
