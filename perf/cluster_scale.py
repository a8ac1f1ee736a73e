#!/usr/bin/env python3
"""What a link costs a daemon, measured on this machine, for the scale
comparison in docs/bridge.md ("Scale: a full mesh and beyond").

    python perf/cluster_scale.py --daemons 8

It starts one seed and N-1 daemons that name only the seed (gossip makes
the full mesh), then measures:

* the time from the last daemon's start to the full mesh (every daemon
  linked to every other);
* each daemon's private memory against its number of links, and a daemon
  with no links, so the memory per link is the slope;
* idle CPU and heartbeat messages per link per second, over ``--seconds``
  of nothing but heartbeats;
* interest propagation: a subscription on one daemon until every other
  daemon's link to it lists the pattern (p50 over ``--trials``).

    python perf/cluster_scale.py --daemons 8 --hubs 2

does the same for hubs and leaves (docs/bridge.md, "Hubs and leaves"):
the hubs form their mesh from the first, every other daemon is a leaf of
two hubs; it measures the time until every leaf has its hub link, each
role's memory and idle CPU, and interest from a leaf to its hub (one hop)
and to every other leaf (leaf, hub, hub, leaf: three hops).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tensorbus  # noqa: E402
from tensorbus.broker.stats import private_rss_kb  # noqa: E402

from backends._peer import free_port, server  # noqa: E402
from backends.bus import _cpu_s  # noqa: E402

HEARTBEAT_S = 0.5


def start(stack: ExitStack, folder: str, name: str, peer: str | None, extra=()) -> tuple:
    """One daemon (``peer``: its seed; ``extra``: more serve flags);
    (ipc url, tcp url, pid)."""
    port = free_port()
    argv = [sys.executable, "-m", "tensorbus", "serve", "--ipc", f"{folder}/{name}.sock"]
    argv += ["--tcp", f"127.0.0.1:{port}", "--transport", "tcp", "--arena-size", "32MiB"]
    argv += ["--heartbeat", str(HEARTBEAT_S), "--link-grace", "5"]
    argv += ["--peer", peer] if peer else []
    argv += list(extra)
    proc = stack.enter_context(server(argv, f"daemon {name}", ready_line="tensorbus ready"))
    return f"ipc://{folder}/{name}.sock", f"tcp://127.0.0.1:{port}", proc.pid


def links_of(url: str) -> list[dict]:
    with tensorbus.connect(url, name="perf-scale-probe") as c:
        return c.stats()["broker"]["links"]


def lists(url: str, pattern: str, peer: str | None = None) -> bool:
    """Whether the daemon at ``url`` has ``pattern`` in a link's interest:
    the link from ``peer`` (its url), or any up link."""
    return any(
        pattern in lk["interest"] and (lk["peer"] == peer if peer else lk["state"] == "up")
        for lk in links_of(url)
    )


def up(url: str) -> int:
    return sum(1 for link in links_of(url) if link["state"] == "up")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--daemons", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--hubs", type=int, default=0, help="hubs and leaves instead of a mesh")
    args = p.parse_args(argv)
    if args.hubs:
        return hubs_main(args)
    n = args.daemons
    with ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="tb-scale-"))
        alone = start(stack, folder, "alone", None)  # no links: the baseline
        seed = start(stack, folder, "d0", None)
        daemons = [seed]
        for k in range(1, n):
            daemons.append(start(stack, folder, f"d{k}", seed[1]))
        t0 = time.monotonic()
        while any(up(d[0]) < n - 1 for d in daemons):
            if time.monotonic() - t0 > 60:
                raise SystemExit("no full mesh within 60 s")
            time.sleep(0.05)
        mesh_s = time.monotonic() - t0
        time.sleep(2.0)  # settle
        base_kb = private_rss_kb(alone[2])
        rss_kb = [private_rss_kb(d[2]) for d in daemons]
        per_link_kb = (statistics.median(rss_kb) - base_kb) / (n - 1)
        hb_before = [sum(lk["received"] for lk in links_of(d[0])) for d in daemons]
        cpu_before = [_cpu_s(d[2]) for d in daemons] + [_cpu_s(alone[2])]
        time.sleep(args.seconds)
        cpu_after = [_cpu_s(d[2]) for d in daemons] + [_cpu_s(alone[2])]
        cpu = [(b - a) / args.seconds for a, b in zip(cpu_before, cpu_after, strict=True)]
        mesh_cpu = statistics.median(cpu[:-1])
        cpu_per_link = max(0.0, mesh_cpu - cpu[-1]) / (n - 1)
        hb_after = [sum(lk["received"] for lk in links_of(d[0])) for d in daemons]
        assert hb_after == hb_before  # heartbeats are not messages: nothing else moved
        # Interest: subscribe on the last daemon, wait until every other lists it.
        waits = []
        last = daemons[-1]
        with tensorbus.connect(last[0], name="perf-scale-sub") as client:
            for trial in range(args.trials):
                pattern = f"scale/{trial}/>"
                t = time.monotonic()
                sub = client.subscribe(pattern)
                pending = [d for d in daemons if d is not last]
                while pending:
                    pending = [d for d in pending if not lists(d[0], pattern, last[1])]
                waits.append(time.monotonic() - t)
                sub.close()
    print(f"{n} daemons from one seed, heartbeat {HEARTBEAT_S:g} s, tcp, this machine")
    print(f"  full mesh ({n * (n - 1) // 2} links) formed in {mesh_s * 1e3:.0f} ms")
    mesh_mib = statistics.median(rss_kb) / 1024
    print(f"  private memory: alone {base_kb / 1024:.1f} MiB, with {n - 1} links "
          f"{mesh_mib:.1f} MiB: {per_link_kb:.0f} KiB per link")  # fmt: skip
    print(f"  idle CPU: alone {cpu[-1] * 100:.2f} %, with {n - 1} links {mesh_cpu * 100:.2f} % "
          f"of a core: {cpu_per_link * 1e6:.0f} us of CPU per link per second")  # fmt: skip
    print(f"  heartbeats: {2 / HEARTBEAT_S:.0f} messages per link per second (one each way)")
    print(f"  interest to all {n - 1} others: p50 {statistics.median(waits) * 1e3:.1f} ms, "
          f"max {max(waits) * 1e3:.1f} ms (includes polling their stats)")  # fmt: skip
    return 0


def hubs_main(args) -> int:
    """Hubs and leaves: ``args.hubs`` hubs, the rest leaves of two hubs each."""
    n, h = args.daemons, args.hubs
    with ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="tb-hubs-"))
        alone = start(stack, folder, "alone", None)
        hubs = [start(stack, folder, "h0", None, ["--hub"])]
        hubs += [start(stack, folder, f"h{k}", hubs[0][1], ["--hub"]) for k in range(1, h)]
        t0 = time.monotonic()
        leaves = []
        for k in range(n - h):
            listed = ["--leaf-of", hubs[k % h][1], "--leaf-of", hubs[(k + 1) % h][1]]
            leaves.append(start(stack, folder, f"l{k}", None, listed))
        while any(up(d[0]) < 1 for d in leaves) or any(up(d[0]) < h - 1 for d in hubs):
            if time.monotonic() - t0 > 60:
                raise SystemExit("no hub links within 60 s")
            time.sleep(0.05)
        formed_s = time.monotonic() - t0
        time.sleep(2.0)
        base_kb = private_rss_kb(alone[2])
        leaf_kb = statistics.median(private_rss_kb(d[2]) for d in leaves) - base_kb
        hub_kb = statistics.median(private_rss_kb(d[2]) for d in hubs) - base_kb
        everyone = leaves + hubs + [alone]
        cpu_before = [_cpu_s(d[2]) for d in everyone]
        time.sleep(args.seconds)
        cpu = [(_cpu_s(d[2]) - a) / args.seconds for d, a in zip(everyone, cpu_before, strict=True)]
        leaf_cpu = statistics.median(cpu[: len(leaves)]) - cpu[-1]
        hub_cpu = statistics.median(cpu[len(leaves) : -1]) - cpu[-1]
        # Interest from the last leaf: at its hub (one hop), then at every
        # other leaf (its hub link lists it: leaf, hub, hub, leaf).
        one_hop, all_hops = [], []
        last = leaves[-1]
        with tensorbus.connect(last[0], name="perf-scale-sub") as client:
            for trial in range(args.trials):
                pattern = f"scale/{trial}/>"
                t = time.monotonic()
                sub = client.subscribe(pattern)
                home = None
                pending = [d for d in leaves if d is not last]
                while home is None or pending:
                    if home is None and any(lists(hub[0], pattern, last[1]) for hub in hubs):
                        home = time.monotonic() - t
                    pending = [d for d in pending if not lists(d[0], pattern)]
                one_hop.append(home)
                all_hops.append(time.monotonic() - t)
                sub.close()
    print(f"{h} hubs and {n - h} leaves (each of two hubs), heartbeat {HEARTBEAT_S:g} s, tcp")
    print(f"  every leaf linked {formed_s * 1e3:.0f} ms after the first leaf's start")
    print(f"  private memory over a daemon alone: leaf {leaf_kb:.0f} KiB, hub {hub_kb:.0f} KiB")
    print(f"  idle CPU over a daemon alone: leaf {leaf_cpu * 100:.2f} %, "
          f"hub {hub_cpu * 100:.2f} % of a core")  # fmt: skip
    print(f"  interest, one hop (leaf to its hub): p50 {statistics.median(one_hop) * 1e3:.1f} ms")
    print(f"  interest, every other leaf (up to 3 hops): p50 "
          f"{statistics.median(all_hops) * 1e3:.1f} ms, max {max(all_hops) * 1e3:.1f} ms "
          f"(includes polling their stats)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
