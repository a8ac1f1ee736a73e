"""The host-wide spinner table and wait-policy settings."""

import os

import pytest

from tensorbus._core import SpinRegistry, Waiter, segment_name


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
