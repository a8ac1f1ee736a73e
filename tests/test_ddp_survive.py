"""A DDP job survives its daemon: two trainers (``ps_hook``, world size 2)
and a sync parameter-server shard, all through one daemon, which is killed
with -9 mid-training, then restarted on the same socket or replaced by a
``--standby`` waiting on its lock. Gradients and aggregates travel in the
shared-memory rings, which need no daemon: no step may fail, every client
must resume its session with the successor, and every step's parameters
must be bitwise those of the same job run with nothing killed.

With ``-s`` each case prints its step times around the kill."""

import statistics
import time

import pytest

import tensorbus

from conftest import Daemon, read_line
from ddp_jobs import ddp_procs, outcome, servers, stop_server, train

pytestmark = pytest.mark.timeout(120)

JOB = "survive"
STEPS = 400  # 5-15 ms each on 2 cores: a restarted daemon (1-2 s) comes back mid-run
KILL_AFTER = 20  # the daemon is killed once rank 0 reports this step
CLIENTS = ("ddp-survive-rank0", "ddp-survive-rank1", "ps-survive-0")


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    """(every step's parameters, the shard's stats) of the job, nothing killed."""
    torch = pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("undisturbed")
    daemon = Daemon(tmp)
    try:
        with ddp_procs() as start:
            # The shard starts while the trainers import torch (they wait for it).
            ranks, out = train(start, tmp, "undisturbed", "--url", daemon.url, "--job", JOB,
                               steps=STEPS, wait=False)  # fmt: skip
            (server,) = servers(start, daemon.url, JOB, 1)
            for r in ranks:
                line = outcome(r, 90)
                assert line.startswith("done"), line
            return torch.load(out), stop_server(server)
    finally:
        daemon.stop()


def _steps(lines) -> list[tuple[int, float, float]]:
    """(step, start, end) of each ``step N START END`` line."""
    return [
        (int(n), float(a), float(b))
        for n, a, b in (line.split()[1:] for line in lines if line.startswith("step "))
    ]


def _wait_for_standby(primary, standby, timeout=15.0) -> None:
    """Until the primary names ``standby`` as the one waiting on its lock."""
    deadline = time.monotonic() + timeout
    with tensorbus.connect(primary.url) as c:
        while c.stats()["broker"]["standby_pid"] != standby.proc.pid:
            assert time.monotonic() < deadline, "the standby never queued for the lock"
            time.sleep(0.05)


def _figure(case, steps, killed_at, up_at) -> str:
    """Median step time against the step that spanned the kill and the one
    that spanned the successor's start, each with the share of the other
    steps it was slower than (steps 0 and 1 are warm-up: DDP rebuilds its
    buckets after the first)."""
    ms = {n: (end - start) * 1e3 for n, start, end in steps}
    at_kill = next(n for n, _, end in steps if end > killed_at)
    at_up = next((n for n, start, end in steps if start <= up_at < end), None)
    normal = [t for n, t in ms.items() if n > 1 and n not in (at_kill, at_up)]

    def step(n) -> str:
        slower = 100 * sum(t < ms[n] for t in normal) / len(normal)
        return f"step {n} {ms[n]:.1f} ms (slower than {slower:.0f}% of the others)"

    alone = sum(killed_at < start and end < up_at for _, start, end in steps)
    return (
        f"{case}: median step {statistics.median(normal):.1f} ms (max {max(normal):.1f}, "
        f"n={len(normal)}); spanning the kill: {step(at_kill)}; spanning the successor's "
        f"start: {'none (between steps)' if at_up is None else step(at_up)}; daemon down "
        f"{up_at - killed_at:.2f} s, {alone} step(s) ran with no daemon"
    )


@pytest.mark.parametrize("case", ["restart", "standby"])
def test_a_ddp_job_survives_its_daemon(daemon_factory, procs_ddp, tmp_path, undisturbed, case):
    import torch

    primary = daemon_factory()
    standby = None
    if case == "standby":
        standby = daemon_factory("--standby", "--log-level", "info", wait=False)
    killed, taken_over = tmp_path / "killed", tmp_path / "taken_over"
    # The gates hold training so that it cannot end before the kill, and
    # so that its last steps run with the successor. The trainers wait for
    # the shard (and the standby starts) while they import torch.
    ranks, out = train(procs_ddp, tmp_path, case, "--url", primary.url, "--job", JOB,
                       "--gate", f"{KILL_AFTER + 30}:{killed}",
                       "--gate", f"{STEPS - 10}:{taken_over}", steps=STEPS, wait=False)  # fmt: skip
    (server,) = servers(procs_ddp, primary.url, JOB, 1)
    if standby is not None:
        _wait_for_standby(primary, standby)
    for r in ranks:
        assert read_line(r, 60) == "ready"
    lines = []
    while not lines or not lines[-1].startswith(f"step {KILL_AFTER} "):
        lines.append(read_line(ranks[0], 60))
    killed_at = time.monotonic()
    primary.proc.kill()
    primary.proc.wait(10)
    killed.touch()
    if standby is None:
        # Restarted once a step has begun with no daemon at all.
        while _steps(lines)[-1][1] < killed_at:
            lines.append(read_line(ranks[0], 30))
        successor = daemon_factory("--log-level", "info")
    else:
        standby.ready()
        successor = standby
    up_at = time.monotonic()
    taken_over.touch()
    while not lines[-1].startswith(("done", "error")):
        lines.append(read_line(ranks[0], 60))
    ends = [lines[-1], outcome(ranks[1], 60)]

    # No step failed, and both trainers end with the successor.
    for end in ends:
        assert end.startswith("done"), end
        assert int(end.split()[2]) == successor.proc.pid, end
    steps = _steps(lines)
    assert [n for n, _, _ in steps] == list(range(STEPS))
    # The kill fell mid-run: steps ended before it, and began after it.
    assert sum(end < killed_at for _, _, end in steps) > KILL_AFTER
    assert sum(start > up_at for _, start, _ in steps) >= 10
    with tensorbus.connect(successor.url) as c:
        broker = c.stats()["broker"]
    assert broker["pid"] == successor.proc.pid != primary.proc.pid
    assert broker["takeovers"] == 1
    assert broker["takeover"]["previous_pid"] == primary.proc.pid
    assert broker["takeover"]["sessions"] == len(CLIENTS)

    # The shard summed exactly what it sums undisturbed, and no step errors.
    params, ps_stats = undisturbed
    assert stop_server(server) == ps_stats
    assert ps_stats["errors"] == 0
    got = torch.load(out)
    assert len(got["params"]) == STEPS
    for step, (a, b) in enumerate(zip(got["params"], params["params"], strict=True)):
        assert torch.equal(a, b), f"step {step}: parameters differ from the undisturbed run"
    assert got["losses"] == params["losses"]

    # Every client resumed its session, and its goodbyes (control calls)
    # reached the successor.
    successor.proc.terminate()
    successor.proc.wait(10)
    log = successor.proc.stderr.read()
    for name in CLIENTS:
        assert f"client {name} resumed" in log, log
        assert f"client {name} left: bye" in log, log

    print("\n" + _figure(case, steps, killed_at, up_at))
