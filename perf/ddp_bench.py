"""perf.py's ddp mode: DDP step time of two trainer processes (gloo) with
tensorbus's ``ps_hook`` beside DDP's default allreduce, same model, same
threads, same data, measured in the same run.

Backends:

* ``allreduce``: DDP with no hook (gloo allreduce over loopback);
* ``ps_hook``: a broker and one parameter-server shard (``tensorbus ps``);
* ``ps_hook_fp16`` / ``ps_hook_bf16``: the same with compressed gradients;
* ``ps_hook_bridge_tcp`` / ``ps_hook_bridge_ucx``: two daemons on this
  machine as if on two hosts (their own sockets and arenas, linked over tcp
  or UCX, perf/backends/bridged.py), one trainer on each, and two shards,
  shard ``k`` on daemon ``k % 2``: half of each trainer's gradients and
  half of its aggregates cross the link every step.

Each run starts its own processes (and brokers) and stops them. A trainer
prints its step times and a digest of its final parameters as JSON; the
first ``warmup`` steps are dropped (DDP rebuilds its buckets after step 1,
and first touches of memory are slow). Every backend trains the same model
on the same data for the same steps, so an exact one ends with the very
parameters of ``allreduce``: the table says whether it did (bitwise). For
the bridged backends it also says what a step cost the two daemons (CPU)
and what crossed the link (messages and MB each way), from the daemons'
own counters.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack

from progress import Progress

HERE = os.path.dirname(os.path.abspath(__file__))
# backend -> transport; "_huge": both arenas on huge pages ($TENSORBUS_PERF_HUGEPAGES or
# the first hugetlbfs mount, perf/backends/bus.py), which UCX copies about 2x faster.
BRIDGED = {
    "ps_hook_bridge_tcp": "tcp",
    "ps_hook_bridge_ucx": "ucx",
    "ps_hook_bridge_ucx_huge": "ucx",
}
BACKENDS = ("allreduce", "ps_hook", "ps_hook_fp16", "ps_hook_bf16", *BRIDGED)
COMPRESSION = {"ps_hook_fp16": "fp16", "ps_hook_bf16": "bf16"}  # the others send float32
JOB = "bench"


def _model(width: int):
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(1024, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, 1024),
    )


def params_of(width: int) -> int:
    return 1024 * width + width + width * width + width + width * 1024 + 1024


def arena_bytes(width: int) -> int:
    """The broker's arena for a model of ``width``: 2 GiB for the default
    model (64 copies of its gradients, room to spare), less for a small one,
    since the broker pre-faults its whole arena before it is ready (seconds
    per GiB on a small VM, paid by every run)."""
    return min(2 << 30, max(256 << 20, 64 * 4 * params_of(width)))


def digest(module) -> str:
    """sha256 of the parameters' bytes: equal digests, bitwise equal models."""
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def trainer(args) -> None:
    """One rank: ``steps`` timed DDP steps; prints {"step_s": [...], "bytes":
    n, "digest": sha256 of the parameters after the last step}."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=2
    )
    net = DDP(_model(args.width))
    state = None
    if args.backend != "allreduce":
        from tensorbus.clients.ddp import PSHookState, ps_hook
        from tensorbus.clients.ps_wire import agg_pattern

        state = PSHookState(
            JOB,
            args.rank,
            2,
            url=args.url,
            num_shards=args.num_shards,
            compression=COMPRESSION.get(args.backend),
        )
        # PSHookState waited for a subscriber (local, or the link to the
        # other daemon) on every grad topic. Across a bridge the aggregates
        # must come back too: wait until the other daemon knows that this
        # one reads agg/<job>/* (its link then forwards its shard's sums), so
        # that no aggregate of step 0 can be published before that.
        if args.peer_url:
            from backends.bridged import wait_interest

            wait_interest(args.peer_url, agg_pattern(JOB), BRIDGED[args.backend])
        net.register_comm_hook(state, ps_hook)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(args.rank)
    x = torch.randn(args.batch, 1024, generator=gen)
    y = torch.randn(args.batch, 1024, generator=gen)
    times, probes = [], []
    probe = (
        (args.probe.split(","), [int(p) for p in args.probe_pids.split(",")])
        if args.probe
        else None
    )
    for i in range(args.steps):
        if probe and i == args.warmup:  # between steps: outside the times
            probes.append(_snapshot(*probe))
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    if probe:
        probes.append(_snapshot(*probe))
    sent = state.bytes_sent if state is not None else 0
    if state is not None:
        state.close()
    report = {"step_s": times, "bytes": sent, "steps": args.steps, "digest": digest(net.module)}
    if probe:
        report["probe"] = probes
    print(json.dumps(report), flush=True)
    dist.barrier()  # neither rank tears gloo down while the other still uses it
    dist.destroy_process_group()


def _serve(stack: ExitStack, backend: str, width: int) -> tuple[list, list]:
    """The brokers of ``backend`` and its shards, stopped when ``stack``
    closes: (the url of each rank's broker, the brokers' pids)."""
    from backends._peer import server

    if backend == "allreduce":
        return [None, None], []
    pids: list = []
    if backend in BRIDGED:
        from backends.bridged import linked

        urls = list(
            stack.enter_context(
                linked(
                    BRIDGED[backend],
                    0,
                    backend.endswith("_huge"),
                    arena=arena_bytes(width),
                    pids=pids,
                )
            )
        )
    else:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="tb-perf-ddp-"))
        argv = [sys.executable, "-m", "tensorbus", "serve", "--ipc", f"{folder}/b.sock",
                "--arena-size", str(arena_bytes(width))]  # fmt: skip
        pids.append(stack.enter_context(server(argv, "broker", ready_line="tensorbus ready")).pid)
        urls = [f"ipc://{folder}/b.sock"] * 2
    shards = len(set(urls))  # one per broker, shard k on broker k % 2
    for k in range(shards):
        argv = [sys.executable, "-m", "tensorbus", "ps", "--url", urls[k], "--job", JOB,
                "--shard", str(k), "--num-shards", str(shards), "--world-size", "2"]  # fmt: skip
        stack.enter_context(server(argv, f"shard {k}", ready_line="tensorbus ps ready"))
    return urls, pids


def _snapshot(urls: list, pids: list) -> dict:
    """Each daemon's CPU seconds so far and the counters of its one link
    (``sent``: what it forwarded to the other)."""
    import tensorbus

    from backends.bus import _cpu_s

    links = []
    for url in urls:
        with tensorbus.connect(url, name="perf-ddp-probe") as probe:
            (link,) = probe.stats()["broker"]["links"]
            links.append(link)
    return {"cpu": [_cpu_s(p) for p in pids], "links": links}


def _bridge_cost(before: dict, after: dict, steps: int) -> dict:
    """Per step: each daemon's CPU ms, messages and MB it sent over the link."""

    def per_step(key, i):
        return (after["links"][i][key] - before["links"][i][key]) / steps

    return {
        "daemon_cpu_ms": [
            1e3 * (a - b) / steps for a, b in zip(after["cpu"], before["cpu"], strict=True)
        ],
        "link_msgs": [per_step("sent", i) for i in range(2)],
        "link_mb": [per_step("sent_bytes", i) / 1e6 for i in range(2)],
        "link_dropped": sum(link["dropped"] + link["gaps"] for link in after["links"]),
    }


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _report(backend: str, rank: int, proc) -> dict:
    """A trainer's report: its last line of output, once it has exited.
    A trainer that printed its report and then died is counted, with a
    line on stderr: all that runs after the report is torch's process-group
    teardown, whose gloo threads abort the process now and then (seen once
    in a plain ``allreduce`` run: "terminate called without an active
    exception"). One that died before its report fails the run."""
    out, _ = proc.communicate(timeout=600)
    lines = out.strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else None
    except ValueError:
        report = None
    if not isinstance(report, dict) or "digest" not in report:
        raise RuntimeError(f"a {backend} trainer failed (exit {proc.returncode})")
    if proc.returncode != 0:
        print(
            f"[ddp] {backend} rank {rank} exited {proc.returncode} after its report "
            "(process-group teardown): its figures stand",
            file=sys.stderr,
        )
    return report


def run_once(backend: str, width: int, steps: int, warmup: int, threads: int, batch: int) -> dict:
    """One measurement of ``backend``: the median step time of both ranks
    after ``warmup`` steps, the bytes each trainer sent per step, the digest
    of the final parameters (None if the ranks disagree) and, bridged, what
    a step cost the daemons and the link."""
    bridged = backend in BRIDGED
    with ExitStack() as stack:
        urls, pids = _serve(stack, backend, width)
        from backends._peer import free_port

        port = free_port()
        ranks = []
        for r in range(2):
            argv = [sys.executable, __file__, "--trainer", "--rank", str(r), "--port", str(port),
                    "--backend", backend, "--width", str(width), "--steps", str(steps),
                    "--threads", str(threads), "--batch", str(batch),
                    "--num-shards", str(len(set(urls)))]  # fmt: skip
            if urls[r]:
                argv += ["--url", urls[r]]
            if bridged:
                argv += ["--peer-url", urls[1 - r]]
            if bridged and r == 0:  # it samples the daemons around its timed steps
                argv += ["--probe", ",".join(urls), "--probe-pids", ",".join(map(str, pids)),
                         "--warmup", str(warmup)]  # fmt: skip
            ranks.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
            stack.callback(_stop, ranks[-1])
        reports = [_report(backend, rank, r) for rank, r in enumerate(ranks)]
        cost = None
        if bridged:
            cost = _bridge_cost(*reports[0]["probe"], steps - warmup)
    step_s = [t for rep in reports for t in rep["step_s"][warmup:]]
    if backend == "allreduce":
        # gloo does not count: a ring allreduce sends 2 (W - 1) / W of the
        # gradients per trainer, W = 2.
        sent = 4 * params_of(width) * 2 * (2 - 1) / 2
    else:
        sent = reports[0]["bytes"] / max(reports[0]["steps"], 1)
    digests = {rep["digest"] for rep in reports}
    return {
        "step_ms": 1e3 * statistics.median(step_s),
        "bytes_per_step": sent,
        "digest": digests.pop() if len(digests) == 1 else None,
        "bridge": cost,
    }


def run(names, width, steps, warmup, repeat, threads, batch) -> list[dict]:
    """Interleaved runs of each backend; records as perf.py writes them."""
    runs = {name: [] for name in names}
    progress = Progress("ddp", len(names) * repeat, repeat)
    for rep in range(repeat):
        for name in names:
            with progress.running(name, rep + 1):
                result = run_once(name, width, steps, warmup, threads, batch)
                progress.finish(
                    f"{result['step_ms']:.1f} ms/step (2 trainers x {steps - warmup} steps)"
                )
            runs[name].append(result)
    # Same model, data and steps: an exact backend ends where allreduce does.
    reference = {r["digest"] for r in runs.get("allreduce", [])}
    out = []
    for name in names:
        digests = {r["digest"] for r in runs[name]}
        bridge = [r["bridge"] for r in runs[name] if r["bridge"]]
        out.append(
            {
                "mode": "ddp",
                "backend": name,
                "size": 4 * params_of(width),
                "params": params_of(width),
                "step_ms": statistics.median(r["step_ms"] for r in runs[name]),
                "bytes_per_step": runs[name][0]["bytes_per_step"],
                "runs": repeat,
                "steps": steps,
                "warmup": warmup,
                "threads": threads,
                "batch": batch,
                "trainers": 2,
                "bitwise_equal": (
                    digests == reference and None not in digests
                    if len(reference) == 1 and None not in reference
                    else None
                ),
                "bridge": _median_cost(bridge) if bridge else None,
            }
        )
    return out


def _median_cost(costs: list[dict]) -> dict:
    out = {}
    for key in ("daemon_cpu_ms", "link_msgs", "link_mb"):
        out[key] = [statistics.median(c[key][i] for c in costs) for i in range(2)]
    out["link_dropped"] = sum(c["link_dropped"] for c in costs)
    return out


def table(records: list[dict]) -> None:
    base = records[0]
    print(
        f"\nDDP step, 2 trainers, MLP of {base['params'] / 1e6:.1f} M parameters, batch "
        f"{base['batch']}, {base['threads']} thread(s) each (median of {base['runs']} runs x "
        f"{base['steps'] - base['warmup']} steps; ratio = backend / {base['backend']}, "
        "lower is faster; = allreduce: final parameters bitwise equal)"
    )
    print(
        f"{'backend':<20}{'step ms':>10}{'ratio':>8}{'MB sent/step/trainer':>22}{'= allreduce':>13}"
    )
    for r in records:
        equal = {True: "yes", False: "NO", None: "-"}[r.get("bitwise_equal")]
        if equal == "NO" and r["backend"] in COMPRESSION.keys():
            equal = "no (lossy)"
        print(
            f"{r['backend']:<20}{r['step_ms']:>10.1f}{r['step_ms'] / base['step_ms']:>8.2f}"
            f"{r['bytes_per_step'] / 1e6:>22.1f}{equal:>13}"
        )
    bridged = [r for r in records if r.get("bridge")]
    if bridged:
        print(
            "\nbridged, per timed step: CPU of daemon A / B, messages and MB each sent "
            "over the link"
        )
        print(f"{'backend':<20}{'CPU ms A/B':>16}{'msgs A>B/B>A':>16}{'MB A>B/B>A':>16}")
        for r in bridged:
            c = r["bridge"]
            print(
                f"{r['backend']:<20}{c['daemon_cpu_ms'][0]:>8.0f}/{c['daemon_cpu_ms'][1]:<7.0f}"
                f"{c['link_msgs'][0]:>8.1f}/{c['link_msgs'][1]:<7.1f}"
                f"{c['link_mb'][0]:>8.1f}/{c['link_mb'][1]:<7.1f}"
                + (f"  {c['link_dropped']} dropped/gaps!" if c["link_dropped"] else "")
            )


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--trainer", action="store_true")
    p.add_argument("--rank", type=int)
    p.add_argument("--port", type=int)
    p.add_argument("--backend", choices=BACKENDS)
    p.add_argument("--width", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--url")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--peer-url", help="bridged: the other rank's broker")
    p.add_argument("--probe", help="bridged, rank 0: the brokers' urls, comma-separated")
    p.add_argument("--probe-pids", help="bridged, rank 0: the brokers' pids")
    p.add_argument("--warmup", type=int, default=0)
    trainer(p.parse_args())
