"""The arena on huge pages (``tensorbus serve --arena-hugepages``,
broker/hugepages.py): a file on hugetlbfs that clients and a successor open
by its path; too few pages or no mount fail at start with what to do.

The tests that need huge pages mount a hugetlbfs of their own in a temp
folder and reserve pages (root only; they skip elsewhere), and put both
back in their fixture's teardown.
"""

import gc
import os
import signal
import subprocess
import time

import numpy as np
import pytest

import tensorbus
from tensorbus.broker.hugepages import free_pages, hugetlbfs_mounts
from tensorbus.broker.state import state_path
from tensorbus.cli import stats_table

pytestmark = pytest.mark.timeout(60)

PAGE = 2 << 20
NR = "/proc/sys/vm/nr_hugepages"
TENSOR = 16 << 20


def _set_nr(n: int) -> int:
    with open(NR, "w") as f:
        f.write(str(n))
    with open(NR) as f:
        return int(f.read())


class HugeTLB:
    """A private hugetlbfs mount and the pages reserved for it."""

    def __init__(self, folder: str, previous: int):
        self.dir = folder
        self.previous = previous

    def reserve(self, pages: int) -> None:
        """Make ``pages`` 2 MiB pages free beyond those free before (skip if
        the kernel cannot find them)."""
        want = self.previous + pages
        got = _set_nr(want)
        if got < want or free_pages(PAGE)[0] < pages:
            pytest.skip(f"the kernel gave {got} of {want} huge pages (memory too fragmented)")

    def files(self) -> list[str]:
        return os.listdir(self.dir)


@pytest.fixture
def hugetlbfs(tmp_path):
    """A hugetlbfs mounted on a temp folder (pagesize=2M); the mount and
    vm.nr_hugepages are restored afterwards, whatever happened."""
    if os.geteuid() != 0:
        pytest.skip("mounting hugetlbfs and reserving huge pages needs root")
    if not os.path.exists(NR):
        pytest.skip("this kernel has no huge pages")
    folder = tmp_path / "huge"
    folder.mkdir()
    with open(NR) as f:
        previous = int(f.read())
    mount = subprocess.run(
        ["mount", "-t", "hugetlbfs", "-o", "pagesize=2M,mode=0700", "none", str(folder)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount hugetlbfs here: {mount.stderr.strip()}")
    try:
        yield HugeTLB(str(folder), previous)
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        _set_nr(previous)


@pytest.fixture
def huge_daemons(hugetlbfs, daemon_factory):
    """(the hugetlbfs, daemon_factory): daemons stop before the unmount."""
    return hugetlbfs, daemon_factory


def _expected() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, TENSOR, dtype=np.uint8)


def _reader(url: str, ready, out) -> None:
    """Another process: take one tensor, say whether it is bitwise equal."""
    with tensorbus.connect(url, spin_us=0) as client:
        sub = client.subscribe("huge/t")
        ready.put(client.stats()["broker"]["arena"]["path"])
        msg = sub.recv(timeout=20)
        data = np.asarray(msg.data)
        out.put((msg.zero_copy, data.nbytes, bool(np.array_equal(data, _expected()))))
        msg.release()


def test_tensor_through_a_hugepage_arena(huge_daemons, procs):
    from conftest import SPAWN

    huge, start = huge_daemons
    huge.reserve(40)
    free_before = free_pages(PAGE)[0]
    d = start(f"--arena-hugepages={huge.dir}", "--arena-size", "63MiB")
    with tensorbus.connect(d.url, spin_us=0) as client:
        arena = client.stats()["broker"]["arena"]
        assert arena["hugepages"] is True and arena["page_size"] == PAGE
        assert arena["size"] == 64 << 20  # rounded up to whole huge pages
        assert os.path.dirname(arena["path"]) == huge.dir
        assert os.path.basename(arena["path"]) in huge.files()
        st = os.stat(arena["path"])
        assert st.st_blksize == PAGE and st.st_mode & 0o777 == 0o600
        assert free_pages(PAGE)[0] == free_before - 32  # all taken at start
        assert f"on 2.0 MiB huge pages ({arena['path']})" in stats_table(client.stats())
        ready, out = SPAWN.Queue(), SPAWN.Queue()
        reader = procs(_reader, d.url, ready, out)
        assert ready.get(timeout=20) == arena["path"]
        pub = client.publisher("huge/t")
        pub.send(_expected())
        zero_copy, nbytes, equal = out.get(timeout=20)
        assert zero_copy and nbytes == TENSOR and equal
        reader.join(10)
    assert d.stop() == 0
    assert huge.files() == []  # a clean stop removes the arena file
    del pub, client  # their mapping of the arena: the last one
    gc.collect()
    assert free_pages(PAGE)[0] == free_before  # unmapped everywhere: back in the pool


def test_too_few_huge_pages_fail_at_start(huge_daemons):
    huge, start = huge_daemons
    huge.reserve(4)
    free = free_pages(PAGE)[0]
    d = start(f"--arena-hugepages={huge.dir}", "--arena-size", "64MiB", wait=False)
    assert d.proc.wait(15) == 1
    err = d.proc.stderr.read()
    assert (
        f"needs 32 huge pages of 2 MiB, but the kernel's pool of 2 MiB pages has only {free} free"
        in err
    )
    assert "sysctl vm.nr_hugepages=" in err
    assert "Traceback" not in err
    assert huge.files() == [] and d.segments() == []


def test_no_hugepages_reserved_fails_clearly(huge_daemons):
    huge, start = huge_daemons
    if free_pages(PAGE)[0] > 0:
        pytest.skip("huge pages are free on this host already")
    d = start(f"--arena-hugepages={huge.dir}", wait=False)
    assert d.proc.wait(15) == 1
    err = d.proc.stderr.read()
    assert "needs 32 huge pages" in err and "has only 0 free" in err


def test_a_successor_takes_over_a_hugepage_arena_or_sweeps_it(huge_daemons, tmp_path):
    huge, start = huge_daemons
    huge.reserve(64)
    first = start(f"--arena-hugepages={huge.dir}")
    c = tensorbus.connect(first.url, spin_us=0)
    path = c.stats()["broker"]["arena"]["path"]
    sub = c.subscribe("huge/k")
    pub = c.publisher("huge/k")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    pub.send(np.full(1 << 20, 5, dtype=np.uint8))  # the data plane goes on
    second = start(f"--arena-hugepages={huge.dir}")
    assert os.path.exists(path) and huge.files() == [os.path.basename(path)]
    deadline = time.monotonic() + 10
    while c.broker_pid != second.proc.pid:
        assert time.monotonic() < deadline, "the client did not resume"
        time.sleep(0.01)
    assert c.stats()["broker"]["arena"]["path"] == path
    msg = sub.recv(timeout=5)
    assert msg.zero_copy and int(np.asarray(msg.data).sum()) == 5 << 20
    msg.release()
    c.close()
    second.proc.send_signal(signal.SIGKILL)
    second.proc.wait()
    os.unlink(state_path(second.ipc_path))  # nothing to take over: a fresh start
    third = start()  # without the flag: it sweeps every hugetlbfs mount all the same
    assert huge.files() == []
    assert third.stop() == 0


def test_a_folder_not_on_hugetlbfs_is_refused(daemon_factory, tmp_path):
    d = daemon_factory(f"--arena-hugepages={tmp_path}", wait=False)
    assert d.proc.wait(15) == 1
    err = d.proc.stderr.read()
    assert "is not on a hugetlbfs mount" in err and "mount -t hugetlbfs" in err


def test_no_mount_says_how_to_mount(daemon_factory):
    if hugetlbfs_mounts():
        pytest.skip("a hugetlbfs is mounted on this host")
    d = daemon_factory("--arena-hugepages", wait=False)
    assert d.proc.wait(15) == 1
    err = d.proc.stderr.read()
    assert "no hugetlbfs is mounted" in err and "vm.nr_hugepages" in err


def test_the_option_is_a_switch_or_a_folder(tmp_path):
    from tensorbus.broker.config_load import ConfigError, read_config_file

    for toml, value in (("true", "auto"), ("false", None), ('"/mnt/huge"', "/mnt/huge")):
        (tmp_path / "c.toml").write_text(f"arena_hugepages = {toml}\n")
        assert read_config_file(str(tmp_path / "c.toml"))["arena_hugepages"][0] == value
    (tmp_path / "c.toml").write_text("arena_hugepages = 2\n")
    with pytest.raises(ConfigError, match="must be true, false or a directory"):
        read_config_file(str(tmp_path / "c.toml"))
