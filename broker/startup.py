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
    "announce_standby",
    "check_tcp",
    "default_arena_size",
    "marker_path",
    "pid_alive",
    "release_lock",
    "standby_pid",
    "sweep",
    "take_lock",
    "write_marker",
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


def take_lock(ipc_path: str, wait: bool = False) -> tuple[int, int | None]:
    """Lock ``ipc_path``'s lock file for this process: (its fd, the pid
    that held it last, if it died without a clean stop). Raises
    BrokerStartError naming the broker that holds it, unless ``wait``
    (``--standby``): then block until the kernel releases it, which it does
    the moment its holder dies."""
    ensure_private_dir(os.path.dirname(os.path.abspath(ipc_path)))
    fd = os.open(ipc_path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise BrokerStartError(
                f"another tensorbus broker (pid {other}) already serves ipc://{ipc_path}; "
                "stop it first, choose another --ipc path, or start this one with --standby"
            ) from None
        fcntl.flock(fd, fcntl.LOCK_EX)
    previous = os.pread(fd, 32, 0).decode(errors="replace").strip()
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, int(previous) if previous.isdigit() else None


def announce_standby(ipc_path: str) -> int:
    """Hold ``<socket>.standby`` while waiting, so the primary's stats can
    name its standby (a lock the kernel drops with us)."""
    fd = os.open(ipc_path + ".standby", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        pass  # a file being rewritten: the pid below is what counts
    os.pwrite(fd, f"{os.getpid()}\n".encode().ljust(16), 0)
    return fd


def standby_pid(ipc_path: str) -> int | None:
    """The pid of a standby waiting on this socket, or None."""
    try:
        fd = os.open(ipc_path + ".standby", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 16, 0).decode(errors="replace").strip()
            return int(pid) if pid.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None  # nobody holds it: no standby
    finally:
        os.close(fd)


def release_lock(ipc_path: str, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(ipc_path + ".lock")
    os.close(fd)


def marker_path(instance: str) -> str:
    """``/dev/shm/tb-<uid>-<instance>-owner``: the state file of the socket
    whose lineage uses this instance's segments (so another socket's
    daemon does not sweep them while a successor may take them over)."""
    return f"/dev/shm/tb-{os.getuid()}-{instance}-owner"


def write_marker(instance: str, state_file: str) -> None:
    fd = os.open(marker_path(instance), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, os.path.abspath(state_file).encode())
    finally:
        os.close(fd)


def _claimed(instance: str, own_state: str) -> bool:
    """Whether dead ``instance``'s segments may still be taken over by the
    daemons of another socket (its marker names a state file that exists)."""
    try:
        with open(marker_path(instance)) as f:
            state_file = f.read().strip()
    except OSError:
        return False
    return state_file != os.path.abspath(own_state) and os.path.exists(state_file)


def _segment_files(huge_dir: str | None) -> list[tuple[str, str]]:
    """(name, what ``keep`` calls it) of every file that may be a segment:
    in /dev/shm (its shm name), and in every hugetlbfs mount and
    ``huge_dir`` (an arena's data on huge pages: its path)."""
    from tensorbus.broker.hugepages import AUTO, hugetlbfs_mounts

    found = []
    folders = ["/dev/shm", *hugetlbfs_mounts()]
    if huge_dir and huge_dir != AUTO:
        folders.append(os.path.abspath(huge_dir))
    for folder in dict.fromkeys(folders):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            found.append((name, name if folder == "/dev/shm" else os.path.join(folder, name)))
    return found


def sweep(
    ipc_path: str,
    keep: frozenset = frozenset(),
    own_state: str = "",
    dead: int | None = None,
    huge_dir: str | None = None,
) -> int:
    """Unlink the segments and FIFO folders of broker instances that died
    without cleaning up (their pid no longer exists), except ``keep`` (names
    and folders taken over) and what another socket's successor may still
    take over. A ring is closed as "restarted" before it goes, so its users
    hear BrokerRestarted instead of writing into a segment nobody reads.
    ``dead``: the pid whose lock we now hold (dead, though maybe a zombie
    its parent has not reaped yet). Arena files on hugetlbfs (any mount,
    and ``huge_dir``) go too: their huge pages return to the pool."""
    from tensorbus._core import Ring

    prefix = f"tb-{os.getuid()}-d"
    swept = 0
    claimed: dict[str, bool] = {}
    for name, key in _segment_files(huge_dir):
        if not name.startswith(prefix) or key in keep:
            continue
        instance = name[len(prefix) :].split("-", 1)[0]
        if not instance.isdigit() or (int(instance) != dead and pid_alive(int(instance))):
            continue
        if instance not in claimed:
            claimed[instance] = _claimed(f"d{instance}", own_state)
        if claimed[instance]:
            continue
        if "-ring." in name and key == name:
            with contextlib.suppress(Exception):
                Ring.condemn(name)
        with contextlib.suppress(OSError):
            os.unlink(key if key != name else os.path.join("/dev/shm", name))
            swept += 1
    run_dir = os.path.dirname(os.path.abspath(ipc_path))
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if path in keep:
            continue
        if name.startswith("bells-d") and name[7:].isdigit() and not pid_alive(int(name[7:])):
            shutil.rmtree(path, ignore_errors=True)
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
