#!/usr/bin/env python3
"""tensorbus reliability suite: what a real broker does when clients die,
when the daemon dies, when a subscriber stalls, and over a long soak.

    python perf/reliability.py r1 --trials 100              # kill -9 of a random client
    python perf/reliability.py r2 --trials 20               # kill -9 of the daemon
    python perf/reliability.py r4 --seconds 10              # one stalled subscriber of 8
    python perf/reliability.py r6 --seconds 600 --rate 100000  # soak: memory, losses
    python perf/reliability.py all                          # all four, full sizes
    python perf/reliability.py all --short                  # all four, CI sizes

Every case starts its own daemons (``tensorbus serve --ipc <tmp>/run/broker.sock
--arena-size 64MiB``) and worker processes (this file, ``_worker ROLE``),
stops them whatever happens, and prints a table of its figures, each beside
its target. The exit status is 1 if any target was missed. Workers publish
64-byte messages numbered per publisher (seq, pid, crc32), and report to the
harness through a small shared file of counters (Board). docs/reliability.md
explains the cases and their figures.
"""

from __future__ import annotations

import argparse
import json
import sys

from rel.harness import SHORT, worker
from rel.r1 import r1
from rel.r2 import r2
from rel.r4 import r4
from rel.r6 import r6

# -------------------------------------------------------------------- main


CASES = {"r1": r1, "r2": r2, "r4": r4, "r6": r6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="docs/reliability.md explains the cases, their figures and their targets.",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    cases = parser.add_subparsers(dest="case", required=True)
    p = cases.add_parser("r1", help="kill -9 of a random client mid-stream")
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--subscribers", type=int, default=3)
    p.add_argument("--rate", type=float, default=20_000, help="publisher's msgs/s")
    p.add_argument("--capacity", type=int, default=64, help="ring slots")
    p.add_argument("--seed", type=int, default=None)
    p = cases.add_parser("r2", help="kill -9 of the daemon: restart and standby takeover")
    p.add_argument("--trials", type=int, default=20, help="restarts after the kill")
    p.add_argument("--standby-trials", type=int, default=20, help="takeovers by a standby")
    p.add_argument("--rate", type=float, default=2_000, help="publisher's msgs/s")
    p.add_argument("--seed", type=int, default=None)
    p = cases.add_parser("r4", help="one stalled subscriber among 8")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each of the two runs")
    p.add_argument("--rate", type=float, default=5_000, help="publisher's msgs/s")
    p.add_argument("--subscribers", type=int, default=8, help="the staller included")
    p.add_argument("--grace", type=float, default=1.0, help="--slow-consumer-grace")
    p.add_argument("--qos", choices=("reliable", "realtime"), default="reliable")
    p = cases.add_parser("r6", help="soak: RSS drift and losses")
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--rate", type=float, default=100_000, help="publisher's msgs/s")
    p = cases.add_parser("all", help="r1, r4, r6 and r2 at full sizes")
    p.add_argument("--short", action="store_true", help="the CI sizes instead")
    args = vars(parser.parse_args(argv))
    case = args.pop("case")
    if case == "all":
        short = args.pop("short")
        reports = [
            CASES[name](**(SHORT[name] if short else {})) for name in ("r1", "r4", "r6", "r2")
        ]
    else:
        reports = [CASES[case](**args)]
    missed = [r.title.split(":")[0] for r in reports if not r.ok]
    if missed:
        print(f"\ntargets missed in {', '.join(missed)}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_worker"]:
        worker(sys.argv[2], json.loads(sys.argv[3]))
    else:
        sys.exit(main())
