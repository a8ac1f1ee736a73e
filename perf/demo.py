#!/usr/bin/env python3
"""``make demo`` and ``make demo-smoke``: the README's main job, one stage
after another, from one list of stages so that the two cannot drift apart.

    python perf/demo.py            # the demo: a broker with a pub/sub demo and
                                   # its live stats, two DDP trainers through two
                                   # parameter-server shards, then tensorbus beside
                                   # its peers; plots under perf/results/
    python perf/demo.py --smoke    # every stage at small counts (CI): a backend
                                   # that cannot run is an error, not a skip
    python perf/demo.py --stage lat-64B,thr-64MiB   # some stages only

Each stage runs as its own process, with this Python (the venv's); the
first that fails stops the demo with its exit code. Every perf stage also
writes its records (JSON) and its plot (PNG) under perf/results/ (smoke:
perf/results/smoke/), and the paths are printed at the end.
"""

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join("perf", "results")
SMOKE_BUDGET_S = 180  # what CI allows the whole smoke run on 2 cores


@dataclass(frozen=True)
class Stage:
    name: str
    command: str  # a script of this repo and its arguments, as the demo runs it
    smoke: str  # arguments appended for the smoke run (argparse: the last one wins)

    @property
    def is_perf(self) -> bool:
        return self.command.startswith("perf/perf.py")


# The pub/sub demo with its live stats; two DDP trainers under torchrun
# through two parameter-server shards; then tensorbus beside its peers:
# latency and throughput of small messages, tensors (copy-in and loaned,
# beside memcpy and shared memory), the DDP hook beside allreduce,
# request/reply, and two daemons bridged over UCX and tcp.
STAGES = (
    Stage("pubsub-demo", "examples/pubsub_demo.py --seconds 4", "--seconds 2"),
    Stage("ddp-demo", "examples/ddp_demo.py --steps 300", "--steps 10"),
    Stage(
        "lat-64B",
        "perf/perf.py lat --backend bus,ring,zmq,nats,redis,iox2 --size 64",
        "--count 300 --repeat 1",
    ),
    Stage(
        "thr-64B", "perf/perf.py thr --backend bus,ring,zmq --size 64", "--count 20000 --repeat 1"
    ),
    # More messages than the arena holds even in the smoke run: a sink that
    # kept its blocks would stall the loans (issue 19).
    Stage(
        "thr-64MiB",
        "perf/perf.py thr --backend bus,bus-loan,memcpy,shm,zmq --size 64MiB --count 100",
        "--count 12 --repeat 1",
    ),
    Stage(
        "lat-4KiB-loan",
        "perf/perf.py lat --backend bus-loan,shm,zmq --size 4KiB --count 5000",
        "--count 300 --repeat 1",
    ),
    Stage(
        "lat-256MiB-loan",
        "perf/perf.py lat --backend bus-loan,shm --size 256MiB --count 100",
        "--count 5 --repeat 1",
    ),
    # The smoke run leaves out the bridged backends (two more daemons per
    # run; tests/test_ddp_bench.py runs one): the last --backend wins.
    Stage(
        "ddp",
        "perf/perf.py ddp --backend allreduce,ps_hook,ps_hook_fp16,ps_hook_bridge_tcp,"
        "ps_hook_bridge_ucx",
        "--width 512 --steps 3 --warmup 1 --repeat 1 --backend allreduce,ps_hook,ps_hook_fp16",
    ),
    Stage(
        "lat-64B-reqrep",
        "perf/perf.py lat --backend req-bus,req-zmq,req-nats --size 64",
        "--count 300 --repeat 1",
    ),
    Stage(
        "thr-64MiB-bridge",
        "perf/perf.py thr --backend bridge-ucx,bridge-tcp,ucx,ucx-shm,zmq-tcp --size 64MiB "
        "--count 40",
        "--count 4 --repeat 1",
    ),
    Stage(
        "lat-64B-bridge",
        "perf/perf.py lat --backend bridge-ucx,bridge-tcp,ucx,zmq-tcp --size 64 --count 5000",
        "--count 200 --repeat 1",
    ),
)


def argv_of(stage: Stage, smoke: bool, results: str) -> list[str]:
    argv = [sys.executable, *shlex.split(stage.command)]
    if smoke:
        argv += shlex.split(stage.smoke)
        if stage.is_perf:
            argv.append("--strict")  # CI: every peer of the demo runs, none is skipped
    if stage.is_perf:
        argv += ["--json", os.path.join(results, f"{stage.name}.json")]
        argv += ["--plot", os.path.join(results, f"{stage.name}.png")]
    return argv


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every stage at small counts")
    parser.add_argument(
        "--stage",
        help=f"comma-separated stages to run (default: all: {', '.join(s.name for s in STAGES)})",
    )
    args = parser.parse_args(argv)
    chosen = STAGES
    if args.stage:
        wanted = args.stage.split(",")
        unknown = sorted(set(wanted) - {s.name for s in STAGES})
        if unknown:
            parser.error(
                f"no stage {', '.join(unknown)}; the stages: {', '.join(s.name for s in STAGES)}"
            )
        chosen = [s for s in STAGES if s.name in wanted]
    os.chdir(ROOT)
    results = os.path.join(RESULTS, "smoke") if args.smoke else RESULTS
    os.makedirs(results, exist_ok=True)
    # Unbuffered children: their tables and progress lines interleave in
    # the order they happen, also in a CI log.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    python = os.path.relpath(sys.executable) if sys.executable.startswith(ROOT) else sys.executable
    timings, started = [], time.monotonic()
    for i, stage in enumerate(chosen, 1):
        command = argv_of(stage, args.smoke, results)
        print(
            f"\n=== [{i}/{len(chosen)}] {stage.name}: {shlex.join([python, *command[1:]])}",
            flush=True,
        )
        t0 = time.monotonic()
        code = subprocess.run(command, env=env, check=False).returncode
        timings.append((stage, time.monotonic() - t0))
        if code != 0:
            print(f"\n=== {stage.name} failed (exit {code})", flush=True)
            return code
    total = time.monotonic() - started
    print(f"\n=== {'smoke run' if args.smoke else 'demo'} done in {total:.0f} s", flush=True)
    for stage, seconds in timings:
        plot = os.path.join(results, f"{stage.name}.png") if stage.is_perf else ""
        print(f"{stage.name:<18}{seconds:>6.0f} s   {plot}")
    if args.smoke and not args.stage and total > SMOKE_BUDGET_S:
        print(f"(over the smoke run's budget of {SMOKE_BUDGET_S} s: shrink a stage's counts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
