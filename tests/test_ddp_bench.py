"""perf.py ddp's bridged backend (perf/ddp_bench.py) at a smoke size: two
daemons linked over tcp, a trainer and a parameter-server shard on each, so
gradients and aggregates cross the link both ways every step. The run must
finish and end with DDP allreduce's very parameters (bitwise), with nothing
dropped on the link. ddp_bench stops every daemon, shard and trainer it
started, whatever happens."""

import os
import sys

import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "perf")
)

import ddp_bench  # noqa: E402

SMOKE = {"width": 64, "steps": 3, "warmup": 1, "threads": 1, "batch": 8}


@pytest.mark.timeout(90)
def test_bridged_ps_hook_gives_the_allreduce_parameters():
    pytest.importorskip("torch")
    reference = ddp_bench.run_once("allreduce", **SMOKE)
    got = ddp_bench.run_once("ps_hook_bridge_tcp", **SMOKE)
    assert reference["digest"] is not None, "the allreduce ranks disagree"
    assert got["digest"] == reference["digest"]
    cost = got["bridge"]
    assert cost["link_dropped"] == 0
    assert min(cost["link_msgs"]) > 0  # both daemons forwarded: grads one way, sums back
