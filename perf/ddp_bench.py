"""perf.py's ddp mode: DDP step time of two trainer processes (gloo) with
tensorbus's ``ps_hook`` beside DDP's default allreduce, same model, same
threads, same data, measured in the same run.

Backends:

* ``allreduce``: DDP with no hook (gloo allreduce over loopback);
* ``ps_hook``: a broker and one parameter-server shard (``tensorbus ps``);
* ``ps_hook_fp16`` / ``ps_hook_bf16``: the same with compressed gradients.

Each run starts its own processes (and broker) and stops them. A trainer
prints its step times as JSON; the first ``warmup`` steps are dropped (DDP
rebuilds its buckets after step 1, and first touches of memory are slow).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from progress import Progress

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ("allreduce", "ps_hook", "ps_hook_fp16", "ps_hook_bf16")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def trainer(args) -> None:
    """One rank: ``steps`` timed DDP steps; prints {"step_s": [...], "bytes": n}."""
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

        compression = {"ps_hook": None, "ps_hook_fp16": "fp16", "ps_hook_bf16": "bf16"}
        state = PSHookState(
            "bench", args.rank, 2, url=args.url, compression=compression[args.backend]
        )
        net.register_comm_hook(state, ps_hook)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(args.rank)
    x = torch.randn(args.batch, 1024, generator=gen)
    y = torch.randn(args.batch, 1024, generator=gen)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    sent = state.bytes_sent if state is not None else 0
    if state is not None:
        state.close()
    print(json.dumps({"step_s": times, "bytes": sent, "steps": args.steps}), flush=True)
    dist.destroy_process_group()


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_once(backend: str, width: int, steps: int, warmup: int, threads: int, batch: int) -> dict:
    """One measurement of ``backend``: the median step time of both ranks
    after ``warmup`` steps, and the bytes each trainer sent per step."""
    helpers = []
    with tempfile.TemporaryDirectory(prefix="tb-perf-ddp-") as folder:
        url = None
        try:
            if backend != "allreduce":
                sock = os.path.join(folder, "b.sock")
                daemon = subprocess.Popen(
                    [sys.executable, "-m", "tensorbus", "serve", "--ipc", sock,
                     "--arena-size", str(arena_bytes(width))],
                    stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
                helpers.append(daemon)
                ready = daemon.stdout.readline()
                if not ready.startswith("tensorbus ready"):
                    raise RuntimeError(f"the broker did not start: {ready!r}")
                url = ready.split()[2]
                ps = subprocess.Popen(
                    [sys.executable, "-m", "tensorbus", "ps", "--url", url, "--job", "bench",
                     "--shard", "0", "--world-size", "2"],
                    stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
                helpers.append(ps)
                if not ps.stdout.readline().startswith("tensorbus ps ready"):
                    raise RuntimeError("the parameter server did not start")
            port = _free_port()
            ranks = [
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--trainer",
                        "--rank",
                        str(r),
                        "--port",
                        str(port),
                        "--backend",
                        backend,
                        "--width",
                        str(width),
                        "--steps",
                        str(steps),
                        "--threads",
                        str(threads),
                        "--batch",
                        str(batch),
                    ]
                    + (["--url", url] if url else []),
                    stdout=subprocess.PIPE,
                    text=True,
                )  # fmt: skip
                for r in range(2)
            ]
            helpers.extend(ranks)
            reports = []
            for r in ranks:
                out, _ = r.communicate(timeout=600)
                if r.returncode != 0:
                    raise RuntimeError(f"a {backend} trainer failed (exit {r.returncode})")
                reports.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            for p in reversed(helpers):
                _stop(p)
    step_s = [t for rep in reports for t in rep["step_s"][warmup:]]
    if backend == "allreduce":
        # gloo does not count: a ring allreduce sends 2 (W - 1) / W of the
        # gradients per trainer, W = 2.
        sent = 4 * params_of(width) * 2 * (2 - 1) / 2
    else:
        sent = reports[0]["bytes"] / max(reports[0]["steps"], 1)
    return {"step_ms": 1e3 * statistics.median(step_s), "bytes_per_step": sent}


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
    out = []
    for name in names:
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
            }
        )
    return out


def table(records: list[dict]) -> None:
    base = records[0]
    print(
        f"\nDDP step, 2 trainers, MLP of {base['params'] / 1e6:.1f} M parameters, batch "
        f"{base['batch']}, {base['threads']} thread(s) each (median of {base['runs']} runs x "
        f"{base['steps'] - base['warmup']} steps; ratio = backend / {base['backend']}, "
        "lower is faster)"
    )
    print(f"{'backend':<14}{'step ms':>10}{'ratio':>8}{'MB sent/step/trainer':>22}")
    for r in records:
        print(
            f"{r['backend']:<14}{r['step_ms']:>10.1f}{r['step_ms'] / base['step_ms']:>8.2f}"
            f"{r['bytes_per_step'] / 1e6:>22.1f}"
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
    trainer(p.parse_args())
