"""How a bridge batches each topic (``--bridge-batch``), as pure functions.

Batching is opportunistic: the bridge sends what it took as soon as its
rings are empty, so a lone message on an idle link goes at once. Under
load, messages coalesce into one batch until one of its bounds is reached:

* a size (default BATCH_BYTES): a batch holding a message of the topic is
  sent once it would pass this many bytes;
* a time (default BATCH_US): no message of the topic waits longer than this
  while the bridge fills the batch behind it;
* or ``off``: each message of the topic goes in a batch of its own.

A rule is ``PATTERN=off`` or ``PATTERN=SIZE[/MICROSECONDS]`` (``grad/>=1MiB/500``);
the first rule whose pattern matches a topic applies.
"""

from __future__ import annotations

from typing import NamedTuple

from tensorbus._core import parse_size
from tensorbus.broker.topics import TopicNameError, matches, validate_pattern

__all__ = [
    "BATCH_BYTES",
    "BATCH_US",
    "MAX_BATCH_BYTES",
    "BatchRule",
    "Batching",
    "batching_of",
    "parse_rules",
]

BATCH_BYTES = 64 << 10
BATCH_US = 100
MAX_BATCH_BYTES = 2 << 20  # a batch is one link message: under its limit (link.py)


class Batching(NamedTuple):
    """One topic's bounds: ``nbytes`` 0 means each message alone."""

    nbytes: int
    us: int

    @property
    def ns(self) -> int:
        return self.us * 1000


DEFAULT = Batching(BATCH_BYTES, BATCH_US)


class BatchRule(NamedTuple):
    pattern: str
    batching: Batching


def parse_rule(text: str) -> BatchRule:
    """One ``PATTERN=off`` or ``PATTERN=SIZE[/MICROSECONDS]``; ValueError
    with a sentence otherwise."""
    pattern, sep, spec = text.partition("=")
    if not sep or not pattern or not spec:
        raise ValueError(
            f"bridge batch rule {text!r} is not PATTERN=off or PATTERN=SIZE[/MICROSECONDS]"
        )
    try:
        validate_pattern(pattern)
    except TopicNameError as exc:
        raise ValueError(f"bridge batch rule {text!r}: {exc}") from None
    if spec.strip().lower() == "off":
        return BatchRule(pattern, Batching(0, 0))
    size, _, us = spec.partition("/")
    try:
        nbytes = parse_size(size.strip())
        micros = int(us) if us.strip() else BATCH_US
    except ValueError as exc:
        raise ValueError(f"bridge batch rule {text!r}: {exc}") from None
    if not 1 <= nbytes <= MAX_BATCH_BYTES:
        raise ValueError(
            f"bridge batch rule {text!r}: the size must be 1 byte to {MAX_BATCH_BYTES >> 20} MiB"
        )
    if not 0 <= micros <= 1_000_000:
        raise ValueError(f"bridge batch rule {text!r}: the time must be 0 to 1000000 µs")
    return BatchRule(pattern, Batching(nbytes, micros))


def parse_rules(texts: list[str]) -> list[BatchRule]:
    """Every rule of ``--bridge-batch``, in order."""
    return [parse_rule(t) for t in texts]


def batching_of(name: str, rules: list[BatchRule]) -> Batching:
    """The bounds of topic ``name``: the first rule that matches, else the default."""
    for rule in rules:
        if matches(rule.pattern, name):
            return rule.batching
    return DEFAULT
