"""A topic's options (QoS class and ring geometry) from a request: checked
against the daemon's limits, defaulted from its config, and compared with
the topic's own where it exists already (docs/protocol.md, create_topic)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tensorbus._core import MAX_CAPACITY, MAX_SLOT_SIZE
from tensorbus.broker import protocol as P

if TYPE_CHECKING:
    from tensorbus.broker.registry import Topic

__all__ = ["topic_options"]


def topic_options(config, f: dict, existing: Topic | None) -> tuple[str, int, int]:
    """(qos, capacity, slot_size) from request fields ``f``, checked, and
    checked against ``existing`` where the topic exists."""
    qos = f.get("qos", existing.qos if existing else "reliable")
    if qos not in P.QOS_CLASSES:
        raise P.ProtocolViolation(
            "bad_option", f"qos must be one of {', '.join(P.QOS_CLASSES)}, not {qos!r}"
        )
    default_cap = config.latest_capacity if qos == "latest" else config.default_capacity
    capacity = f.get("capacity", existing.capacity if existing else default_cap)
    slot_size = f.get("slot_size", existing.slot_size if existing else config.default_slot_size)
    low = 4 if qos == "latest" else 2
    if not low <= capacity <= MAX_CAPACITY or capacity & (capacity - 1):
        raise P.ProtocolViolation(
            "bad_option",
            f"capacity must be a power of two from {low} to {MAX_CAPACITY}, not {capacity}",
        )
    if not 1 <= slot_size <= MAX_SLOT_SIZE:
        raise P.ProtocolViolation(
            "bad_option", f"slot_size must be 1 to {MAX_SLOT_SIZE} bytes, not {slot_size}"
        )
    if existing is not None:
        asked = {k: f[k] for k in ("qos", "capacity", "slot_size") if k in f}
        have = {
            "qos": existing.qos,
            "capacity": existing.capacity,
            "slot_size": existing.slot_size,
        }
        clash = {k: v for k, v in asked.items() if have[k] != v}
        if clash:
            raise P.ProtocolViolation(
                "topic_conflict",
                f"topic {existing.name!r} exists with {have}; asked for {clash}",
            )
    return qos, capacity, slot_size
