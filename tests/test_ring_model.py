"""Stateful property test: the ring against a plain Python model, across
several cursors, wrap-around, blocking, lapping and overwriting."""

import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tensorbus._core import BackpressureError, ReceiveTimeout, Ring

CAPACITY = 8
SLOT = 24


class RingModel(RuleBasedStateMachine):
    """Model: ``log[seq]`` is every message ever sent; each cursor is a
    position. Block: a send fails when the slowest cursor is a ring behind.
    Overwrite: a recv lapped by more than a ring jumps to head - capacity/2."""

    policy = "block"

    def __init__(self):
        super().__init__()
        self.ring = Ring.create(
            capacity=CAPACITY,
            slot_size=SLOT,
            policy=self.policy,
            max_cursors=4,
            instance=f"model{os.getpid()}",
        )
        self.pub = self.ring.publisher(timeout=0)
        self.log = []
        self.subs = []  # [subscriber, model position, model drops]

    def teardown(self):
        for sub, _, _ in self.subs:
            sub.close()
        self.pub.close()
        self.ring.unlink()
        self.ring.detach()

    @property
    def head(self):
        return len(self.log)

    @precondition(lambda self: len(self.subs) < 4)
    @rule()
    def join(self):
        self.subs.append([self.ring.subscriber(), self.head, 0])

    @precondition(lambda self: self.subs)
    @rule(i=st.integers(0, 3))
    def leave(self, i):
        sub, _, _ = self.subs.pop(i % len(self.subs))
        sub.close()

    @rule(data=st.binary(max_size=SLOT))
    def send(self, data):
        full = (
            self.policy == "block"
            and self.subs
            and self.head - min(pos for _, pos, _ in self.subs) >= CAPACITY
        )
        if full:
            with pytest.raises(BackpressureError):
                self.pub.send(data)
        else:
            assert self.pub.send(data) == self.head
            self.log.append(data)

    @precondition(lambda self: self.subs)
    @rule(i=st.integers(0, 3))
    def recv(self, i):
        entry = self.subs[i % len(self.subs)]
        sub, pos, _ = entry
        if pos == self.head:
            with pytest.raises(ReceiveTimeout):
                sub.recv(timeout=0)
            return
        if self.head - pos > CAPACITY:  # only an overwrite ring gets here
            jump = max(pos + 1, self.head - CAPACITY // 2)
            entry[2] += jump - pos
            pos = jump
        assert sub.recv(timeout=0) == self.log[pos]
        assert sub.last_seq == pos
        entry[1] = pos + 1

    @precondition(lambda self: self.policy == "block" and self.subs)
    @rule(i=st.integers(0, 3))
    def peek_release(self, i):
        entry = self.subs[i % len(self.subs)]
        sub, pos, _ = entry
        if pos < self.head:
            view = sub.peek(timeout=0)
            assert bytes(view) == self.log[pos]
            sub.release()
            entry[1] = pos + 1

    @invariant()
    def cursors_match(self):
        assert self.ring.head == self.head
        for sub, pos, drops in self.subs:
            assert sub.position == pos
            assert sub.drops == drops
            assert sub.lag == self.head - pos


class OverwriteRingModel(RingModel):
    policy = "overwrite"


model_settings = settings(
    max_examples=60,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBlockRing = RingModel.TestCase
TestBlockRing.settings = model_settings
TestOverwriteRing = OverwriteRingModel.TestCase
TestOverwriteRing.settings = model_settings
