#!/usr/bin/env python3
"""The bridge's targets (docs/bridge.md, "Performance"), each measured
beside its peer in one run, as a table of ratios: met or missed.

    python perf/bridge_targets.py            # about 8 minutes on 2 cores
    python perf/bridge_targets.py --quick    # fewer samples, for a look

It runs perf/perf.py (lat, thr, ddp) for each row and reads its JSON.
64 MiB over UCX needs the arena on huge pages: with $TENSORBUS_PERF_HUGEPAGES
(a hugetlbfs directory with free pages) it is used as is; else, as root,
this script mounts a hugetlbfs of its own, reserves HUGE_PAGES pages and
restores both afterwards; else that row says why it was skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
HUGE_PAGES = 512  # two daemons' arenas for 64 MiB messages (448 MiB each), 2 MiB pages


def perf(mode: str, backends: str, *args: str, env=None) -> dict:
    """perf.py ``mode`` for ``backends``: its records by backend."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, os.path.join(HERE, "perf.py"), mode, "--backend", backends]
        cmd += [*args, "--json", out.name, "--strict"]
        subprocess.run(cmd, check=True, env=env, stdout=sys.stderr)
        with open(out.name) as f:
            return {r["backend"]: r for r in json.load(f)["records"]}


@contextlib.contextmanager
def huge_pages():
    """A hugetlbfs directory with free pages (None and why, where there is none)."""
    given = os.environ.get("TENSORBUS_PERF_HUGEPAGES")
    if given:
        yield given, None
        return
    if os.geteuid() != 0:
        yield None, "not root and no $TENSORBUS_PERF_HUGEPAGES: no huge pages to use"
        return
    folder = tempfile.mkdtemp(prefix="tb-hugetlbfs-")
    with open("/proc/sys/vm/nr_hugepages") as f:
        before = f.read().strip()
    mounted, why = False, None
    try:
        mount = ["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", folder]
        subprocess.run(mount, check=True)
        mounted = True
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write(str(int(before) + HUGE_PAGES))
    except (OSError, subprocess.CalledProcessError) as exc:
        why = f"could not mount hugetlbfs and reserve pages: {exc}"
    try:
        yield (folder, None) if why is None else (None, why)
    finally:
        if mounted:
            subprocess.run(["umount", folder], check=False)
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write(before)
        os.rmdir(folder)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer samples and runs")
    args = p.parse_args(argv)
    lat_n, thr_n, repeat = ("1000", "300000", "1") if args.quick else ("3000", "1000000", "3")
    rows = []  # (target, ours, peer's, limit, higher is better, unit or why skipped)

    lat = perf("lat", "bridge-tcp,zmq-tcp,bridge-ucx,ucx,req-bridge-tcp", "--size", "64",
               "--count", lat_n, "--repeat", repeat)  # fmt: skip
    rows.append(("64 B round trip, tcp bridge / pyzmq REQ/REP", lat["bridge-tcp"]["p50_us"],
                 lat["zmq-tcp"]["p50_us"], 1.5, False, "us p50"))  # fmt: skip
    rows.append(("64 B round trip, UCX bridge / raw ucxx", lat["bridge-ucx"]["p50_us"],
                 lat["ucx"]["p50_us"], 3.0, False, "us p50"))  # fmt: skip
    rows.append(("64 B request, tcp bridge / pyzmq REQ/REP", lat["req-bridge-tcp"]["p50_us"],
                 lat["zmq-tcp"]["p50_us"], 1.5, False, "us p50"))  # fmt: skip
    rows.append(("64 B request p99, tcp bridge / a 500 us budget",
                 lat["req-bridge-tcp"]["p99_us"], 500.0, 1.0, False, "us p99"))  # fmt: skip
    thr = perf("thr", "bridge-tcp,zmq-tcp", "--size", "64", "--count", thr_n, "--repeat", repeat)
    rows.append(("64 B one way, tcp bridge / pyzmq PUSH/PULL", thr["bridge-tcp"]["msgs_per_s"],
                 thr["zmq-tcp"]["msgs_per_s"], 1.0, True, "msgs/s"))  # fmt: skip
    with huge_pages() as (folder, why):
        if folder is None:
            rows.append(("64 MiB one way, UCX bridge on huge pages / raw ucxx", None, None, 0.9,
                         True, why))  # fmt: skip
        else:
            env = {**os.environ, "TENSORBUS_PERF_HUGEPAGES": folder}
            big = perf("thr", "bridge-ucx-huge,ucx", "--size", "64MiB", "--count", "20",
                       "--repeat", repeat, env=env)  # fmt: skip
            rows.append(("64 MiB one way, UCX bridge on huge pages / raw ucxx",
                         big["bridge-ucx-huge"]["gb_per_s"], big["ucx"]["gb_per_s"], 0.9, True,
                         "GB/s"))  # fmt: skip
    ddp = perf("ddp", "allreduce,ps_hook_bridge_tcp,ps_hook_bridge_ucx", "--repeat", repeat)
    gloo = ddp["allreduce"]["step_ms"]
    for name, transport in (("ps_hook_bridge_tcp", "tcp"), ("ps_hook_bridge_ucx", "UCX")):
        target = f"DDP step, two daemons over {transport} / gloo allreduce"
        rows.append((target, ddp[name]["step_ms"], gloo, 1.0, False, "ms"))

    print(f"\n{'target':<54}{'ours':>12}{'peer':>12}{'ratio':>8}{'limit':>8}  result")
    missed = 0
    for target, ours, theirs, limit, higher, unit in rows:
        if ours is None:
            print(f"{target:<54}{'':>12}{'':>12}{'':>8}{limit:>8}  skipped: {unit}")
            missed += 1
            continue
        ratio = ours / theirs
        met = ratio >= limit if higher else ratio <= limit
        missed += not met
        sign = ">=" if higher else "<="
        print(f"{target:<54}{ours:>12,.1f}{theirs:>12,.1f}{ratio:>8.2f}{sign + str(limit):>8}  "
              f"{'met' if met else 'MISSED'} ({unit})")  # fmt: skip
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
