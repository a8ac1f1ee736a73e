"""Starting a daemon: its options checked, the one-broker-per-socket lock,
and the sweep of what dead broker instances left behind."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import shutil

from tensorbus.broker.paths import ensure_private_dir

__all__ = [
    "BrokerStartError",
    "check_tcp",
    "default_arena_size",
    "pid_alive",
    "release_lock",
    "sweep",
    "take_lock",
]

log = logging.getLogger("tensorbus.broker")


class BrokerStartError(RuntimeError):
    """The broker cannot start (endpoint taken, bad option); the sentence says why."""


def check_tcp(config) -> tuple[str, int] | None:
    """``--tcp HOST:PORT`` as (host, port) (port 0: any), None without it;
    raises BrokerStartError for a bad address, transport or a missing token."""
    if not config.tcp:
        return None
    host, sep, port = config.tcp.rpartition(":")
    if not sep or not (port.isdigit() or port == "*") or not host:
        raise BrokerStartError(
            f"--tcp must be HOST:PORT (PORT may be * for any free port), not {config.tcp!r}"
        )
    host = host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if config.transport not in ("ucx", "tcp", "auto"):
        raise BrokerStartError(f"--transport must be ucx, tcp or auto, not {config.transport!r}")
    if not loopback and not config.token and not config.insecure:
        raise BrokerStartError(
            f"refusing to serve tcp on non-loopback address {host!r} without a token: "
            "set --token-file or TENSORBUS_TOKEN, or pass --insecure"
        )
    return host, 0 if port == "*" else int(port)


def take_lock(ipc_path: str) -> int:
    """Lock ``ipc_path``'s lock file for this process (its fd), or raise
    BrokerStartError naming the broker that holds it."""
    ensure_private_dir(os.path.dirname(os.path.abspath(ipc_path)))
    fd = os.open(ipc_path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise BrokerStartError(
            f"another tensorbus broker (pid {other}) already serves ipc://{ipc_path}; "
            "stop it first or choose another --ipc path"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release_lock(ipc_path: str, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(ipc_path + ".lock")
    os.close(fd)


def sweep(ipc_path: str) -> int:
    """Unlink the segments and FIFO folders of broker instances that died
    without cleaning up (their pid no longer exists)."""
    prefix = f"tb-{os.getuid()}-d"
    swept = 0
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        names = []
    for name in names:
        if not name.startswith(prefix):
            continue
        instance = name[len(prefix) :].split("-", 1)[0]
        if instance.isdigit() and not pid_alive(int(instance)):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join("/dev/shm", name))
                swept += 1
    run_dir = os.path.dirname(os.path.abspath(ipc_path))
    for name in os.listdir(run_dir):
        if name.startswith("bells-d") and name[7:].isdigit() and not pid_alive(int(name[7:])):
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
    if swept:
        log.info("swept %d segment(s) of dead broker instances", swept)
    return swept


def default_arena_size() -> int:
    """1 GiB, or a quarter of /dev/shm where that is smaller (containers
    often give it 64 MiB)."""
    try:
        st = os.statvfs("/dev/shm")
        shm = st.f_blocks * st.f_frsize
    except OSError:
        shm = 0
    return max(1 << 22, min(1 << 30, shm // 4)) if shm else 1 << 26


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
