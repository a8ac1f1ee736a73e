"""The host-wide spinner table and wait-policy settings."""

import os

import pytest

from tensorbus._core import ReceiveTimeout, SpinRegistry, Waiter, segment_name


def test_waiter_settings(monkeypatch):
    monkeypatch.setenv("TENSORBUS_SPIN_US", "7")
    assert Waiter().spin_us == 7.0
    assert Waiter(spin_us=0).spin_us == 0.0
    assert Waiter().max_spinners >= 1
    monkeypatch.setenv("TENSORBUS_SPIN_US", "fast")
    with pytest.raises(ValueError, match="TENSORBUS_SPIN_US"):
        Waiter()
    with pytest.raises(ValueError, match=">= 0"):
        Waiter(spin_us=-1)


def test_spin_registry_is_shared_and_starts_empty():
    name = segment_name("testspin", "spinners")
    try:
        a, b = SpinRegistry(name), SpinRegistry(name)
        assert a.active() == b.active() == 0
        memoryview(a.segment)[:8] = (2**62).to_bytes(8, "little")  # a spinner "until forever"
        assert b.active() == 1  # every process of the user sees the same table
        memoryview(a.segment)[:8] = (1).to_bytes(8, "little")  # a deadline long past
        assert b.active() == 0  # a spinner that died mid-spin simply expires
    finally:
        os.unlink(f"/dev/shm/{name}")


def test_the_yield_phase_stretches_only_while_waits_stay_short(make_ring, monkeypatch):
    """Waits that end within ``yield_max_us`` stretch the next yield phase to
    twice their average (a peer across a link answers in ~100 us); long
    waits bring it back to the base 20 us, so a quiet subscriber never
    yields for long."""
    waiter = Waiter(0, max_spinners=0, yield_max_us=20_000)
    sub = make_ring(waiter=waiter).subscriber()
    assert waiter.yield_us_now() == 20.0  # no history: nothing stretched
    for _ in range(12):
        with pytest.raises(ReceiveTimeout):
            sub.recv(timeout=0.002)  # each wait ends after ~2 ms
    assert 2_000 <= waiter.recent_wait_us < 20_000
    assert waiter.yield_us_now() == min(2 * waiter.recent_wait_us, 20_000)
    for _ in range(12):
        with pytest.raises(ReceiveTimeout):
            sub.recv(timeout=0.05)  # long waits: past yield_max_us
    assert waiter.recent_wait_us > 20_000
    assert waiter.yield_us_now() == 20.0
    # A waiter that never yields (servers, background threads) stays so.
    assert Waiter.sleeping().yield_us_now() == 0.0
    monkeypatch.setenv("TENSORBUS_YIELD_US", "150")
    assert Waiter().yield_max_us == 150.0
    monkeypatch.setenv("TENSORBUS_YIELD_US", "soon")
    with pytest.raises(ValueError, match="TENSORBUS_YIELD_US"):
        Waiter()
