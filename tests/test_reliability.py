"""The reliability suite (perf/reliability.py) at CI sizes: kill -9 of a
client (R1), a stalled subscriber (R4), a short soak (R6) and kill -9 of the
daemon (R2). The tests assert what must hold on any machine: no deadlock (no
progress within 10 s), nothing torn, skipped, repeated, lost or leaked.
Latency and memory figures are printed in each case's table, not asserted.
Every case stops the daemons and workers it started, whatever happens."""

import os
import sys

import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "perf")
)

import reliability  # noqa: E402

SHORT = reliability.SHORT


@pytest.fixture(scope="module")
def r1_report():
    """One short R1 run (seed 1: publishers and subscribers among the victims)."""
    return reliability.r1(**SHORT["r1"], seed=1)


@pytest.mark.timeout(90)
def test_r1_kill9_of_a_random_client(r1_report):
    f = r1_report.figures
    for key in ("deadlocks", "crashed", "torn", "gaps", "dups", "lost", "errors", "left", "leaked"):
        assert f[key] == 0, f"{key}: {f[key]}"
    assert len(f["recovery_s"]) == SHORT["r1"]["trials"]


@pytest.mark.timeout(90)
def test_r1_frees_the_records_of_killed_publishers(r1_report):
    assert r1_report.figures["records"] == 0


@pytest.mark.timeout(60)
def test_r4_one_stalled_subscriber_among_eight():
    report = reliability.r4(**SHORT["r4"])
    f = report.figures
    for run in (f["without"], f["with_staller"]):
        assert run["received"] == 7 * run["sent"] > 0
        assert run["lost"] == run["torn"] == 0
    assert f["with_staller"]["evictions"] == 1
    assert f["without"]["evictions"] == 0


@pytest.mark.timeout(60)
def test_r6_short_soak_loses_nothing():
    report = reliability.r6(**SHORT["r6"])
    f = report.figures
    assert f["sent"] > 0
    for key in ("lost", "gaps", "dups", "torn"):
        assert f[key] == 0, f"{key}: {f[key]}"
    assert len(f["samples"]) >= SHORT["r6"]["seconds"] - 1


@pytest.mark.timeout(90)
def test_r2_kill9_of_the_daemon():
    report = reliability.r2(**SHORT["r2"], seed=1)
    f = report.figures
    for key in ("failed", "lost", "dups", "gaps", "torn", "splits", "errors", "leaked"):
        assert f[key] == 0, f"{key}: {f[key]}"
    assert f["restart_resume_s"] and f["standby_resume_s"] and f["standby_answer_s"]
