"""The whole story on one machine: a broker, two parameter-server shards,
and two DDP trainers under torchrun whose gradients go through the shards
instead of an allreduce, with the live stats view; then everything stops.

    python examples/ddp_demo.py [--steps 300]
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args()
    run_dir = tempfile.mkdtemp(prefix="tensorbus-ddp-demo-")
    os.chmod(run_dir, 0o700)
    cli = [sys.executable, "-m", "tensorbus"]
    daemon = subprocess.Popen(
        [*cli, "serve", "--ipc", os.path.join(run_dir, "broker.sock"), "--arena-size", "512MiB"],
        stdout=subprocess.PIPE,
        text=True,
    )
    children = [daemon]
    try:
        ready = daemon.stdout.readline().strip()
        print(f"[broker] {ready}", flush=True)
        url = ready.split()[2]
        for shard in range(args.shards):
            ps = subprocess.Popen(
                [*cli, "ps", "--url", url, "--job", "demo", "--shard", str(shard),
                 "--num-shards", str(args.shards), "--world-size", "2"],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            children.append(ps)
            print(f"[ps {shard}] {ps.stdout.readline().strip()}", flush=True)
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
        env = {**os.environ, "TENSORBUS_URL": url, "OMP_NUM_THREADS": "1"}
        trainers = subprocess.Popen(
            [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()),
             os.path.join(HERE, "ddp_train.py"), "--job", "demo",
             "--num-shards", str(args.shards), "--steps", str(args.steps)],
            env=env,
        )  # fmt: skip
        children.append(trainers)
        watch = subprocess.Popen([*cli, "stats", "--url", url, "--watch", "1"])
        children.append(watch)
        code = trainers.wait(timeout=600)
        stop(watch)
        subprocess.run([*cli, "stats", "--url", url], check=False)
        print(f"[torchrun] exit {code}", flush=True)
        return code
    finally:
        for child in reversed(children):
            stop(child)
        left = [n for n in os.listdir("/dev/shm") if f"-d{daemon.pid}-" in n]
        print(f"[broker] stopped (exit {daemon.returncode}); segments left: {len(left)}")
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
