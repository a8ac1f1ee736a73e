"""DDP jobs for the tests: trainer ranks (tests/ddp_workers.py) and
parameter-server shards (``tensorbus ps``) as subprocesses, always stopped
by whoever started them (tests/test_ddp.py, tests/test_ddp_survive.py)."""

import contextlib
import os
import subprocess
import sys

from daemons import free_port

from conftest import HERE, read_line


@contextlib.contextmanager
def ddp_procs():
    """``start(*args, script=...)`` runs tests/ddp_workers.py (or, with
    ``script="cli"``, ``tensorbus``); whatever is alive at the end is killed."""
    started = []

    def start(*args, script="ddp_workers.py"):
        cmd = (
            [sys.executable, "-m", "tensorbus", *args]
            if script == "cli"
            else [sys.executable, os.path.join(HERE, script), *args]
        )
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
            p.wait(10)
            p.stdout.close()
            p.stderr.close()


def outcome(proc, timeout=30) -> str:
    """A trainer's last line: ``done ...`` or ``error <sentence>``."""
    line = ""
    while not line.startswith(("error", "done")):
        line = read_line(proc, timeout)
    return line


def train(start, tmp_path, tag, *extra, steps=6, wait=True):
    """Two ranks; with ``wait``, the parameters rank 0 saved after each
    step (both ranks must say done), else (ranks, output file)."""
    port, out = free_port(), str(tmp_path / f"{tag}.pt")
    ranks = [
        start("--rank", str(r), "--port", str(port), "--out", out, "--steps", str(steps), *extra)
        for r in range(2)
    ]
    if not wait:
        return ranks, out
    for r in ranks:
        assert read_line(r, 60) == "ready"
    for r in ranks:
        line = outcome(r, 60)
        assert line.startswith("done"), line
    import torch

    return torch.load(out)


def servers(start, url, job, shards, *extra):
    """``shards`` parameter-server shards of ``job``, each subscribed."""
    started = []
    for i in range(shards):
        p = start(
            "ps", "--url", url, "--job", job, "--shard", str(i), "--num-shards", str(shards),
            "--world-size", "2", *extra, script="cli",
        )  # fmt: skip
        assert read_line(p, 30).startswith("tensorbus ps ready")
        started.append(p)
    return started


def stop_server(server) -> dict:
    """SIGTERM a shard; the stats it prints as it stops."""
    import ast

    server.terminate()
    line = ""
    while not line.startswith("tensorbus ps stopped"):
        line = read_line(server, 10)
    return ast.literal_eval(line.split(": ", 1)[1])
