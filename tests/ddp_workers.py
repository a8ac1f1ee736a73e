"""One DDP trainer rank for the parameter-server tests, run as

    python ddp_workers.py --rank R --world-size W --port P --out FILE
        [--url URL --job J --shards S --compression fp16|bf16] [--steps N]
        [--gate STEP:FILE ...]

Without --url it trains with DDP's own allreduce (gloo); with it, through
``ps_hook``. Every rank trains the same small model (several buckets) on
its own fixed batch; rank 0 saves the parameters after every step.
Prints ``ready`` after DDP is set up, ``step N START END`` (monotonic
seconds) after each step, then ``done BYTES BROKER_PID`` (the broker its
client speaks to at the end), or ``error <sentence>`` if backward() failed.
``--gate STEP:FILE`` waits before STEP until FILE exists (at most
--timeout seconds, outside the step's time), so a test can hold training
until something happened.
"""

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 8),
    )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--url")
    p.add_argument("--job", default="t")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--compression", default=None)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--timeout", type=float, default=20.0)
    p.add_argument("--chunk-bytes", type=int, default=64 * 1024)
    p.add_argument("--stall-at", type=int, default=-1, help="sleep forever before this step")
    p.add_argument("--gate", action="append", default=[], help="STEP:FILE")
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{args.port}",
        rank=args.rank,
        world_size=args.world_size,
    )
    net = DDP(model(), bucket_cap_mb=0.1)  # 0.1 MB buckets: several of them
    state = None
    if args.url:
        from tensorbus.clients.ddp import PSHookState, ps_hook

        state = PSHookState(
            args.job,
            args.rank,
            args.world_size,
            url=args.url,
            num_shards=args.shards,
            compression=args.compression,
            timeout=args.timeout,
            chunk_bytes=args.chunk_bytes,
        )
        net.register_comm_hook(state, ps_hook)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(100 + args.rank)
    x = torch.randn(64, 32, generator=gen)  # one batch per rank: the loss must fall
    y = torch.randn(64, 8, generator=gen)
    gates = {int(step): path for step, path in (g.split(":", 1) for g in args.gate)}
    history, losses = [], []
    print("ready", flush=True)
    try:
        for step in range(args.steps):
            if step == args.stall_at:
                time.sleep(600)
            if step in gates:
                deadline = time.monotonic() + args.timeout
                while not os.path.exists(gates[step]) and time.monotonic() < deadline:
                    time.sleep(0.005)
            start = time.monotonic()
            loss = torch.nn.functional.mse_loss(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            history.append(torch.cat([q.detach().flatten() for q in net.parameters()]).clone())
            print(f"step {step} {start:.6f} {time.monotonic():.6f}", flush=True)
    except RuntimeError as exc:
        print(f"error {str(exc).splitlines()[0]}", flush=True)
        os._exit(3)  # the process group's peers may be gone: do not wait for them
    if args.rank == 0:
        uncopied = state.buckets_uncopied if state is not None else 0
        torch.save({"params": history, "losses": losses, "uncopied": uncopied}, args.out)
    sent = state.bytes_sent if state is not None else 0
    broker_pid = state.client.broker_pid if state is not None else 0
    if state is not None:
        state.close()
    print(f"done {sent} {broker_pid}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
