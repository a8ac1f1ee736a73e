#!/usr/bin/env python3
"""tensorbus benchmarks: one harness, one backend per transport, every number
printed beside its peers measured in the same run.

    python perf/perf.py lat --backend ring,bus,zmq,mp,iox2,nats,redis --size 64
    python perf/perf.py thr --backend ring,bus,zmq --size 64 --json out.json
    python perf/perf.py idle
    python perf/perf.py control --topics 1000 --clients 200
    python perf/perf.py ddp --backend allreduce,ps_hook,ps_hook_fp16
    python perf/perf.py lat --backend bus,zmq --size 64 --plot lat.png

lat: ping-pong round trip between two processes (p50 / p99 / mean, us).
thr: one-way messages from one process to another (msgs/s and GB/s).
idle: CPU a ring subscriber burns while waiting for nothing (bridge-tcp,
bridge-ucx: both daemons of a linked pair, together).
control: the broker daemon's control plane: subscribe + unsubscribe ops/s of
many clients at once, over many topics, and the daemon's RSS around them.
ddp: DDP step time of two trainers with tensorbus's ps_hook beside DDP's own
allreduce (gloo), same model and threads, also across two bridged daemons
(ps_hook_bridge_tcp, ps_hook_bridge_ucx; perf/ddp_bench.py).
Backends run interleaved, ``--repeat`` times, so machine noise hits all of
them alike; the table quotes medians and ratios to the first backend. A
backend this machine cannot run (a package or server program missing) is
skipped with a note (``--strict``: an error). bus, nats and redis start
their own broker or server for every run and stop it afterwards. A line per
backend and repeat goes to stderr as each run ends; ``--plot FILE.png``
draws the result (perf/plot.py).
"""

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from progress import Progress, short  # noqa: E402

from backends import load, missing  # noqa: E402

UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "kb": 1000,
    "mb": 10**6,
    "gb": 10**9,
}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 64, 4KiB or 64MiB")
    return int(match.group(1)) * UNITS[match.group(2).lower()]


CONTROL_TARGET = 20_000  # subscribe + unsubscribe ops/s the daemon should sustain


def default_count(mode: str, size: int) -> int:
    if mode == "control":
        return 50  # subscribe/unsubscribe cycles per client
    if mode == "lat":
        return 20_000 if size <= 65536 else max(200, (256 << 20) // size)
    return max(20, min(200_000, (2 << 30) // max(size, 1)))


def warmup_count(size: int, count: int) -> int:
    """Untimed round trips first: many for small messages (caches, branch
    predictors, the spin policy), few for large ones (each costs a copy)."""
    return max(1000, count // 10) if size <= 65536 else max(5, count // 10)


def machine() -> str:
    """This machine in a few words, for a figure's title and the JSON."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), ""
            )
    except OSError:
        pass
    return ", ".join(filter(None, [platform.node(), f"{os.cpu_count()} CPUs", model]))


def record(backend: str, mode: str, size: int, **fields) -> dict:
    base = {
        "backend": backend,
        "mode": mode,
        "size": size,
        "p50_us": None,
        "p99_us": None,
        "mean_us": None,
        "msgs_per_s": None,
        "gb_per_s": None,
    }
    base.update(fields)
    return base


def run_lat(names, size, count, repeat):
    """Records, and every backend's round trips (ns) for the CDF. The samples
    stay out of the records: --json would otherwise carry up to 60,000
    numbers per backend, where the percentiles are what a reader compares."""
    samples = {name: [] for name in names}
    progress = Progress("lat", len(names) * repeat, repeat)
    for rep in range(repeat):
        for name in names:
            with progress.running(name, rep + 1):
                times = load(name).lat(size, count, warmup_count(size, count))
                ordered = sorted(times)
                progress.finish(
                    f"p50 {short(ordered[len(ordered) // 2] / 1e3)} us, "
                    f"p99 {short(percentile(ordered, 0.99) / 1e3)} us ({len(times)} samples)"
                )
            samples[name] += times
    out = []
    for name in names:
        xs = sorted(samples[name])
        out.append(
            record(
                name,
                "lat",
                size,
                p50_us=xs[len(xs) // 2] / 1e3,
                p99_us=percentile(xs, 0.99) / 1e3,
                mean_us=statistics.fmean(xs) / 1e3,
                samples=len(xs),
            )
        )
    return out, samples


def percentile(ordered: list, fraction: float):
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def run_thr(names, size, count, repeat):
    rates = {name: [] for name in names}
    progress = Progress("thr", len(names) * repeat, repeat)
    for rep in range(repeat):
        for name in names:
            with progress.running(name, rep + 1):
                received, seconds = load(name).thr(size, count)
                if received != count:
                    raise SystemExit(f"{name}: the peer received {received} of {count} messages")
                rate = received / seconds
                gb_per_s = rate * size / 1e9
                progress.finish(f"{short(rate)} msgs/s, {short(gb_per_s)} GB/s ({count} msgs)")
            rates[name].append(rate)
    out = []
    for name in names:
        rate = statistics.median(rates[name])
        out.append(
            record(
                name,
                "thr",
                size,
                msgs_per_s=rate,
                gb_per_s=rate * size / 1e9,
                runs=len(rates[name]),
            )
        )
    return out


def run_idle(names, seconds):
    out = []
    progress = Progress("idle", len(names), 1)
    for name in names:
        backend = load(name)
        if not hasattr(backend, "idle"):
            print(f"({name} has no idle measurement)")
            continue
        with progress.running(name, 1):
            cpu = backend.idle(seconds)
            progress.finish(f"{100 * cpu / seconds:.2f} % of one core")
        out.append(record(name, "idle", 0, cpu_percent=100 * cpu / seconds, seconds=seconds))
    return out


def run_control(topics, clients, cycles, repeat):
    bus = load("bus")
    runs = []
    progress = Progress("control", repeat, repeat)
    for rep in range(repeat):
        with progress.running("bus", rep + 1):
            runs.append(bus.control(topics, clients, cycles))
            progress.finish(f"{runs[-1]['ops_per_s']:,.0f} subscribe+unsubscribe ops/s")
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    return [
        record(
            "bus",
            "control",
            0,
            topics=topics,
            clients=clients,
            cycles=cycles,
            runs=repeat,
            target_ops_per_s=CONTROL_TARGET,
            **median,
            per_run=runs,
        )
    ]


def table(records):
    if not records:
        return
    mode, base = records[0]["mode"], records[0]
    if mode == "ddp":
        import ddp_bench

        ddp_bench.table(records)
        return
    if mode == "lat":
        print(
            f"\nround trip, {base['size']} B ({base['samples']} samples each; "
            f"ratio = {base['backend']} / backend, lower is better for {base['backend']})"
        )
        print(
            f"{'backend':<8}{'p50 us':>10}{'p99 us':>10}{'mean us':>10}"
            f"{'p50 ratio':>12}{'p99 ratio':>12}"
        )
        for r in records:
            print(
                f"{r['backend']:<8}{r['p50_us']:>10.2f}{r['p99_us']:>10.2f}{r['mean_us']:>10.2f}"
                f"{base['p50_us'] / r['p50_us']:>12.3f}{base['p99_us'] / r['p99_us']:>12.3f}"
            )
    elif mode == "thr":
        print(
            f"\none way, {base['size']} B messages (median of {base['runs']} runs; "
            f"ratio = {base['backend']} / backend, higher is better for {base['backend']})"
        )
        print(f"{'backend':<8}{'msgs/s':>14}{'GB/s':>10}{'ratio':>10}")
        for r in records:
            print(
                f"{r['backend']:<8}{r['msgs_per_s']:>14,.0f}{r['gb_per_s']:>10.3f}"
                f"{base['msgs_per_s'] / r['msgs_per_s']:>10.2f}"
            )
    elif mode == "control":
        r, mib = base, 1 / 1024
        print(
            f"\ncontrol plane, {r['topics']} topics, {r['clients']} clients x {r['cycles']} "
            f"subscribe+unsubscribe cycles each (median of {r['runs']} runs)"
        )
        print(
            f"{'subscribe+unsubscribe':<24}{r['ops_per_s']:>12,.0f} ops/s"
            f"   target >= {r['target_ops_per_s']:,} ops/s: "
            f"{r['ops_per_s'] / r['target_ops_per_s']:.2f}x "
            f"({'met' if r['ops_per_s'] >= r['target_ops_per_s'] else 'NOT met'})"
        )
        print(
            f"{'':<24}{r['daemon_cpu_percent']:>12.0f} % of one core: the daemon's CPU "
            f"during the cycles"
        )
        print(
            f"{'':<24}{r['ops_per_daemon_cpu_s']:>12,.0f} ops per CPU second of the daemon "
            f"(its ceiling with a core to itself)"
        )
        print(f"{'create_topic':<24}{r['topics_per_s']:>12,.0f} topics/s")
        print(
            f"{'daemon RSS MiB':<24}{'empty':>12}{'+topics':>10}{'before':>10}{'after':>10}"
            f"{'after-before':>14}"
        )
        print(
            f"{'':<24}{r['rss_kb_empty'] * mib:>12.1f}{r['rss_kb_topics'] * mib:>10.1f}"
            f"{r['rss_kb_before'] * mib:>10.1f}{r['rss_kb_after'] * mib:>10.1f}"
            f"{(r['rss_kb_after'] - r['rss_kb_before']) * mib:>+14.1f}"
        )
        if r["subscriptions_left"]:
            print(f"WARNING: {r['subscriptions_left']:g} subscriptions still held after the cycles")
    else:
        print(f"\nidle, {base['seconds']:g} s waiting for nothing (bridges: both daemons)")
        for r in records:
            print(f"{r['backend']:<12}{r['cpu_percent']:>8.2f} % of one core")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["lat", "thr", "idle", "control", "ddp"])
    parser.add_argument(
        "--backend",
        help="comma-separated; the first is the one the ratios describe "
        "(default: ring,zmq,mp,iox2; for idle: ring; control measures bus only)",
    )
    parser.add_argument("--size", type=parse_size, default=64, help="message size, e.g. 64, 4KiB")
    parser.add_argument(
        "--count",
        type=int,
        help="messages per run (default: by mode and size); "
        "control: subscribe/unsubscribe cycles per client (default 50)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs per backend")
    parser.add_argument("--seconds", type=float, default=2.0, help="idle: how long to wait")
    parser.add_argument("--topics", type=int, default=1000, help="control: topics to create")
    parser.add_argument("--clients", type=int, default=200, help="control: clients cycling")
    parser.add_argument("--width", type=int, default=3072, help="ddp: the MLP's hidden width")
    parser.add_argument("--steps", type=int, default=12, help="ddp: steps per run")
    parser.add_argument("--warmup", type=int, default=4, help="ddp: steps not timed")
    parser.add_argument("--threads", type=int, default=1, help="ddp: torch threads per trainer")
    parser.add_argument("--batch", type=int, default=32, help="ddp: batch size")
    parser.add_argument("--json", metavar="PATH", help="also write the records as JSON")
    parser.add_argument(
        "--plot", metavar="FILE.png", help="lat, thr, ddp: also draw the result (matplotlib)"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="a backend this machine cannot run is an error, not a skip (CI)",
    )
    args = parser.parse_args(argv)
    if args.plot and args.mode not in ("lat", "thr", "ddp"):
        parser.error("--plot draws lat, thr and ddp runs")
    if args.mode == "ddp":
        import ddp_bench

        names = (args.backend or "allreduce,ps_hook,ps_hook_fp16").split(",")
        bad = [n for n in names if n not in ddp_bench.BACKENDS]
        if bad:
            parser.error(f"ddp backends are {', '.join(ddp_bench.BACKENDS)}, not {bad}")
        started = time.time()
        records = ddp_bench.run(
            names, args.width, args.steps, args.warmup, args.repeat, args.threads, args.batch
        )
        table(records)
        write_outputs(args, records, None, started)
        return 0
    default = {"idle": "ring", "control": "bus"}.get(args.mode, "ring,zmq,mp,iox2")
    if args.mode == "control":
        if args.backend not in (None, "bus"):
            parser.error("control measures the bus backend only")
        if args.topics < 1 or args.clients < 1:
            parser.error("--topics and --clients must be at least 1")
    names = []
    for name in (n.strip() for n in (args.backend or default).split(",")):
        if not name:
            continue
        why = missing(name)  # also fails fast on an unknown backend
        if why and args.strict:
            raise SystemExit(f"{name} cannot run here (--strict): {why}")
        if why:
            print(f"({name} skipped: {why})", flush=True)
        else:
            names.append(name)
    if not names:
        raise SystemExit("no backend left to run")
    count = args.count or default_count(args.mode, args.size)
    started = time.time()
    samples = None
    if args.mode == "lat":
        records, samples = run_lat(names, args.size, count, args.repeat)
    elif args.mode == "thr":
        records = run_thr(names, args.size, count, args.repeat)
    elif args.mode == "control":
        records = run_control(args.topics, args.clients, count, args.repeat)
    else:
        records = run_idle(names, args.seconds)
    table(records)
    write_outputs(args, records, samples, started)
    return 0


def write_outputs(args, records: list[dict], samples: dict | None, started: float) -> None:
    """--json and --plot, if asked for; each path is printed once written."""
    if args.json:
        with open(args.json, "w") as f:
            header = {"started": started, "cpus": os.cpu_count(), "machine": machine()}
            json.dump({**header, "records": records}, f, indent=2)
    if args.plot and records:
        import plot  # matplotlib loads here, never before a measurement

        if args.mode == "lat":
            plot.lat_cdf(args.plot, records, samples, machine())
        elif args.mode == "thr":
            plot.thr_bars(args.plot, records, machine())
        else:
            plot.ddp_bars(args.plot, records, machine())
        print(f"plot: {args.plot}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
