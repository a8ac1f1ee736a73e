"""Where a broker listens by default, and the private directory it uses.

The ipc socket, its lock file and the FIFO doorbells live in a per-user
directory of mode 0700: ``$XDG_RUNTIME_DIR/tensorbus`` when that is set,
else ``/tmp/tensorbus-<uid>``.
"""

import grp
import os
import stat

__all__ = [
    "default_ipc_path",
    "default_url",
    "ensure_private_dir",
    "runtime_dir",
    "share_with_group",
]


def runtime_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, "tensorbus")
    return f"/tmp/tensorbus-{os.getuid()}"


def default_ipc_path() -> str:
    return os.path.join(runtime_dir(), "broker.sock")


def default_url() -> str:
    """``TENSORBUS_URL`` if set, else the local broker's default ipc socket."""
    return os.environ.get("TENSORBUS_URL") or f"ipc://{default_ipc_path()}"


def ensure_private_dir(path: str) -> str:
    """Create ``path`` with mode 0700 if needed; refuse one that another
    user owns or that others can enter (a planted directory)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{path} exists and is not a directory")
    if st.st_uid != os.getuid():
        raise PermissionError(
            f"{path} belongs to uid {st.st_uid}, not to this user "
            f"({os.getuid()}); refusing to use it"
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def share_with_group(group: str | None, *dirs: str) -> int | None:
    """``--ipc-group``: open ``dirs`` to ``group`` (0750 plus setgid, so the
    FIFOs made in them are the group's too) and make every shared-memory
    segment this process creates from now on the group's, mode 0660.
    Returns the group's gid (None without a group)."""
    if not group:
        return None
    from tensorbus._core.segment import share_segments_with_group

    try:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise PermissionError(f"--ipc-group {group!r}: no such group") from None
    for path in dirs:
        os.chown(path, -1, gid)
        os.chmod(path, 0o2750)
    share_segments_with_group(gid)
    os.umask(0o007)  # FIFOs and files the daemon makes stay open to the group
    return gid
