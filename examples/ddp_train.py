"""A small data-parallel training run whose gradients are averaged by
tensorbus parameter servers instead of an allreduce. Run under torchrun:

    TENSORBUS_URL=ipc:///.../broker.sock torchrun --nproc_per_node 2 \\
        examples/ddp_train.py --job demo --num-shards 2

It needs the broker and the parameter-server shards running (``tensorbus
serve``, ``tensorbus ps --job demo --shard I --num-shards 2 --world-size 2``);
examples/ddp_demo.py starts them all.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from tensorbus.clients.ddp import PSHookState, ps_hook


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", default="demo")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--compression", choices=["fp16", "bf16"], default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # torchrun's env:// rendezvous; DDP's own setup uses it
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(), torch.nn.Linear(1024, 10),
    )  # fmt: skip
    net = DDP(model, bucket_cap_mb=1)
    state = PSHookState(
        args.job, rank, world, num_shards=args.num_shards, compression=args.compression
    )
    net.register_comm_hook(state, ps_hook)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(256, 256, generator=gen)
    y = torch.randint(0, 10, (256,), generator=gen)
    t0 = time.perf_counter()
    for step in range(args.steps):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and step % 10 == 0:
            print(f"[trainer] step {step:3d} loss {loss.item():.4f}", flush=True)
    if rank == 0:
        ms = 1e3 * (time.perf_counter() - t0) / args.steps
        print(
            f"[trainer] {args.steps} steps, {ms:.1f} ms/step, "
            f"{state.bytes_sent / args.steps / 1e6:.1f} MB sent per step per trainer",
            flush=True,
        )
    state.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
