"""Shared fixtures: rings that are always unlinked, and child processes that
are always stopped by the test that started them."""

import multiprocessing
import os

import pytest

from tensorbus._core import Ring

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def make_ring():
    """Create rings with test-friendly defaults; unlink them afterwards."""
    rings = []

    def make(**kwargs):
        kwargs.setdefault("instance", f"test{os.getpid()}")
        ring = Ring.create(**kwargs)
        rings.append(ring)
        return ring

    yield make
    for ring in rings:
        try:
            ring.unlink()
        except Exception:
            pass


@pytest.fixture
def procs():
    """Start child processes (spawned, so they attach like strangers would);
    whatever is still alive at the end of the test is killed."""
    started = []

    def start(target, *args):
        p = SPAWN.Process(target=target, args=args, daemon=True)
        p.start()
        started.append(p)
        return p

    yield start
    for p in started:
        if p.is_alive():
            p.kill()
        p.join(5)
