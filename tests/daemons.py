"""Helpers the multi-daemon tests share: a free port, a daemon's tcp
endpoint, waiting for a condition, and the link transports to run over."""

import importlib.util
import socket
import time

import pytest

import tensorbus

__all__ = ["TRANSPORTS", "broker_stats", "free_port", "tcp_of", "wait_for"]

TRANSPORTS = [
    "tcp",
    pytest.param(
        "ucx",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("ucxx") is None, reason="ucxx is not installed"
        ),
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_of(d) -> str:
    """The tcp:// endpoint of a started daemon (tests/conftest.py's Daemon)."""
    return next(e for e in d.endpoints if e.startswith("tcp://"))


def broker_stats(d) -> dict:
    """A started daemon's ``broker`` stats, asked by a short-lived client."""
    with tensorbus.connect(d.url, name="probe") as c:
        return c.stats()["broker"]


def wait_for(predicate, timeout=15.0, what="condition"):
    """Poll ``predicate`` until it returns something true (and return that);
    AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
