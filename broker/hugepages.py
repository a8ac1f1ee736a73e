"""The arena on huge pages (``tensorbus serve --arena-hugepages[=DIR]``).

POSIX shm cannot use huge pages here (shmem THP is usually ``never``), so
the arena's data becomes a file on a hugetlbfs mount, named like any
segment (``tb-<uid>-<instance>-arenadata.<random>``, mode 0600 or 0660 for
an ``--ipc-group``). Its absolute path is what the hello reply and the
state record instead of a shm name, so clients and a successor open it by
that path. Creating it fallocates every huge page up front: too few pages
fail at start, with a sentence saying how many are needed and free, never
with a SIGBUS later. docs/operations.md tells the operator how to set up.
"""

from __future__ import annotations

import contextlib
import os

from tensorbus.broker.startup import BrokerStartError

__all__ = [
    "AUTO",
    "arena_dir",
    "check_room",
    "free_pages",
    "hugetlbfs_mounts",
    "pages_needed",
]

AUTO = "auto"  # --arena-hugepages without a directory: the first usable mount
MOUNT_HINT = (
    "mount one with `mount -t hugetlbfs -o pagesize=2M none /dev/hugepages` "
    "(mode=1777 or uid=<the daemon's uid> if it does not run as root) "
    "and reserve pages with `sysctl vm.nr_hugepages=N` (docs/operations.md)"
)


def _unescape(field: str) -> str:
    """A /proc/mounts field: spaces and the like are written as \\040."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def hugetlbfs_mounts() -> list[str]:
    """The mount points of every hugetlbfs, as /proc/mounts lists them."""
    try:
        with open("/proc/mounts") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    mounts = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "hugetlbfs":
            mounts.append(_unescape(fields[1]))
    return mounts


def _on_hugetlbfs(path: str) -> bool:
    """Whether ``path`` lies on a hugetlbfs (its longest mount prefix is one)."""
    real = os.path.realpath(path)
    best, fstype = "", ""
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 3:
                continue
            point = _unescape(fields[1])
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, fstype = point, fields[2]
    return fstype == "hugetlbfs"


def page_size(directory: str) -> int:
    """The huge page size of the hugetlbfs ``directory`` is on (bytes)."""
    return os.statvfs(directory).f_bsize


def arena_dir(option: str) -> str:
    """The directory to create the arena's data in, for the option's value
    (``auto``: the first hugetlbfs mount this uid can write to, preferring
    the default huge page size). Raises BrokerStartError with what to do."""
    if option != AUTO:
        if not os.path.isdir(option):
            raise BrokerStartError(f"--arena-hugepages={option}: no such directory; {MOUNT_HINT}")
        if not _on_hugetlbfs(option):
            raise BrokerStartError(
                f"--arena-hugepages={option} is not on a hugetlbfs mount; {MOUNT_HINT}"
            )
        if not os.access(option, os.W_OK | os.X_OK):
            raise BrokerStartError(
                f"--arena-hugepages={option}: uid {os.getuid()} cannot create files there; "
                "mount it with mode=1777 or uid=<the daemon's uid>, or give a directory "
                "on it that this user owns"
            )
        return os.path.abspath(option)
    mounts = hugetlbfs_mounts()
    if not mounts:
        raise BrokerStartError(f"--arena-hugepages: no hugetlbfs is mounted; {MOUNT_HINT}")
    default = _default_page_size()
    usable = [m for m in mounts if os.access(m, os.W_OK | os.X_OK)]
    if not usable:
        raise BrokerStartError(
            f"--arena-hugepages: uid {os.getuid()} cannot create files in any hugetlbfs "
            f"mount ({', '.join(mounts)}); mount one with mode=1777 or uid=<the daemon's "
            "uid>, or name a directory on one that this user owns: --arena-hugepages=DIR"
        )
    usable.sort(key=lambda m: _safe_page_size(m) != default)
    return usable[0]


def _safe_page_size(directory: str) -> int:
    try:
        return page_size(directory)
    except OSError:
        return 0


def _meminfo_kb(key: str) -> int:
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name == key:
                return int(rest.split()[0])
    return 0


def _default_page_size() -> int:
    return _meminfo_kb("Hugepagesize") * 1024 or 2 << 20


def free_pages(size: int) -> tuple[int, int]:
    """(free, total) huge pages of ``size`` bytes in the kernel's pool;
    free excludes pages reserved by mappings that have not touched them."""
    base = f"/sys/kernel/mm/hugepages/hugepages-{size // 1024}kB"

    def read(name: str) -> int:
        try:
            with open(f"{base}/{name}") as f:
                return int(f.read())
        except (OSError, ValueError):
            return -1

    free, resv, total = read("free_hugepages"), read("resv_hugepages"), read("nr_hugepages")
    if free < 0 and size == _default_page_size():
        free, total = _meminfo_kb("HugePages_Free"), _meminfo_kb("HugePages_Total")
        resv = _meminfo_kb("HugePages_Rsvd")
    return max(0, free - max(0, resv)), max(0, total)


def pages_needed(nbytes: int, page: int) -> int:
    """Huge pages an arena of ``nbytes`` takes (its size is rounded up)."""
    return max(1, -(-nbytes // page))


def _fmt(page: int) -> str:
    return f"{page >> 30} GiB" if page >= 1 << 30 else f"{page >> 20} MiB"


def _reserve_hint(page: int, pages: int) -> str:
    if page == _default_page_size():
        return f"`sysctl vm.nr_hugepages={pages}`"
    return f"`echo {pages} > /sys/kernel/mm/hugepages/hugepages-{page // 1024}kB/nr_hugepages`"


def check_room(directory: str, nbytes: int) -> int:
    """Check that an arena of ``nbytes`` fits in the free huge pages (the
    pool's and, for a mount with ``size=``, the mount's); return its size
    rounded up to whole huge pages. Raises BrokerStartError naming how many
    pages it needs, how many are free and how to reserve more."""
    page = page_size(directory)
    need = pages_needed(nbytes, page)
    free, total = free_pages(page)
    where = f"the kernel's pool of {_fmt(page)} pages"
    st = os.statvfs(directory)
    if st.f_blocks and st.f_bavail < free:  # a mount with a size= limit
        free, where = st.f_bavail, f"the hugetlbfs mount {directory} (size= limit)"
    if need > free:
        raise BrokerStartError(
            f"--arena-hugepages: an arena of {nbytes} bytes needs {need} huge pages of "
            f"{_fmt(page)}, but {where} has only {free} free ({total} reserved in all); "
            f"reserve more with {_reserve_hint(page, total + need - free)} "
            "(as root), or give a smaller --arena-size"
        )
    return need * page
