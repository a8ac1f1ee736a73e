"""Connecting where no broker is: the sync client, the asyncio client and
the CLI say why at once instead of waiting out their timeout, and keep the
timeout for a socket that exists but does not answer."""

import asyncio
import os
import socket
import subprocess
import sys
import time

import pytest

import tensorbus

LONG = 5.0  # a timeout long enough that failing within FAST proves no wait
FAST = 1.0


def stale_socket(path: str) -> None:
    """A socket file nobody listens on, as a killed broker leaves it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()


def test_missing_socket_fails_at_once(tmp_path):
    url = f"ipc://{tmp_path}/none.sock"
    t0 = time.monotonic()
    with pytest.raises(tensorbus.BrokerUnavailable) as info:
        tensorbus.connect(url, timeout=LONG)
    assert time.monotonic() - t0 < FAST
    assert str(info.value).startswith(f"no broker at {url}: the socket does not exist")
    assert "start one with `tensorbus serve`" in str(info.value)


def test_stale_socket_fails_at_once(tmp_path):
    path = str(tmp_path / "stale.sock")
    stale_socket(path)
    t0 = time.monotonic()
    with pytest.raises(tensorbus.BrokerUnavailable, match="nothing listens on it"):
        tensorbus.connect(f"ipc://{path}", timeout=LONG)
    assert time.monotonic() - t0 < FAST


def test_silent_listener_waits_for_the_timeout(tmp_path):
    """A socket that accepts but never answers may be a busy broker: only
    the timeout can tell, and the error says how long it waited."""
    path = str(tmp_path / "silent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    try:
        t0 = time.monotonic()
        with pytest.raises(tensorbus.BrokerUnavailable, match="within 0.5 s"):
            tensorbus.connect(f"ipc://{path}", timeout=0.5)
        assert time.monotonic() - t0 >= 0.45
    finally:
        listener.close()


def test_asyncio_client_fails_at_once(tmp_path):
    path = str(tmp_path / "stale.sock")
    stale_socket(path)

    async def attempt(url):
        t0 = time.monotonic()
        with pytest.raises(tensorbus.BrokerUnavailable) as info:
            await tensorbus.aio.connect(url, timeout=LONG)
        assert time.monotonic() - t0 < FAST
        return str(info.value)

    assert "does not exist" in asyncio.run(attempt(f"ipc://{tmp_path}/none.sock"))
    assert "nothing listens on it" in asyncio.run(attempt(f"ipc://{path}"))


def test_cli_fails_at_once(tmp_path):
    url = f"ipc://{tmp_path}/none.sock"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tensorbus", "topics", "--url", url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert f"no broker at {url}: the socket does not exist" in proc.stderr
    # The interpreter's start-up is most of it; the client itself did not wait.
    assert time.monotonic() - t0 < LONG


def test_a_live_broker_is_not_judged(daemon):
    with tensorbus.connect(daemon.url, timeout=LONG) as client:
        assert client.local


def test_aio_is_reachable_from_a_plain_import_and_loaded_lazily():
    code = (
        "import sys, tensorbus\n"
        "assert 'tensorbus.clients.aio' not in sys.modules\n"
        "assert 'asyncio' not in sys.modules\n"
        "assert tensorbus.aio.connect is not None\n"
        "assert 'aio' in dir(tensorbus)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30, env=env)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tensorbus.nope  # noqa: B018
