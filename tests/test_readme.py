"""Every Python block of the README runs as written, against a real daemon.

Each block runs in a fresh interpreter with ``TENSORBUS_URL`` pointing at
the test's daemon, so ``tensorbus.connect()`` with no argument finds it as a
user's default broker would. A block that serves forever runs in the
background while the test sends it a request; a block that needs more than
one machine or a launcher is skipped, and says why.
"""

import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

import tensorbus

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

# A block is classified by a line it contains; anything else just runs.
SKIPS = {
    "dist.init_process_group": "needs torchrun (a process group of several trainers) "
    "and running parameter-server shards; tests/test_ddp.py runs the same hook",
    "tcp://10.0.0.1": "needs a second host (a remote daemon at 10.0.0.1); "
    "tests/test_bridge.py runs light clients against a local daemon's tcp port",
}
SERVES = "client.requests("  # a responder loop: runs until stopped


def python_blocks() -> list[tuple[int, str]]:
    """(line number, source) of every fenced ```python block."""
    with open(README) as f:
        text = f.read()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 6


def _env(daemon) -> dict:
    return {**os.environ, "TENSORBUS_URL": daemon.url}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("line,source", BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_block_runs_as_written(daemon, tmp_path, line, source):
    for marker, why in SKIPS.items():
        if marker in source:
            pytest.skip(f"README.md:{line} {why}")
    if SERVES in source:
        _serve_and_ask(daemon, tmp_path, source)
        return
    proc = subprocess.run(
        [sys.executable, "-c", source],
        cwd=tmp_path,
        env=_env(daemon),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"README.md:{line} failed:\n{proc.stderr[-3000:]}"


def _serve_and_ask(daemon, tmp_path, source):
    """Run a responder block in the background, ask it once, stop it."""
    topic = re.search(r'client\.requests\("([^"]+)"\)', source).group(1)
    server = subprocess.Popen(
        [sys.executable, "-c", source],
        cwd=tmp_path,
        env=_env(daemon),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with tensorbus.connect(daemon.url) as client:
            request = np.arange(4, dtype=np.float32)
            reply = None
            for _ in range(100):  # until the background block has joined the group
                try:
                    reply = client.request(topic, request, timeout=2.0, retries=1)
                    break
                except tensorbus.NoResponders:
                    assert server.poll() is None, server.stderr.read()[-3000:]
                    time.sleep(0.1)
            assert reply is not None, "the README's responder never joined its group"
            np.testing.assert_array_equal(reply.data, request * 2)
    finally:
        server.kill()
        server.wait(10)
        for stream in (server.stdout, server.stderr):
            stream.close()
