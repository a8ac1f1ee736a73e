"""Exceptions raised by the shared-memory core.

Each is also an instance of the closest builtin (``ValueError``,
``TimeoutError``, ...) so callers that know nothing of tensorbus can still
catch them sensibly.
"""

__all__ = [
    "TensorbusError",
    "SegmentError",
    "SegmentNotFoundError",
    "SegmentNameError",
    "LayoutMismatchError",
    "MessageTooLargeError",
    "RingClosedError",
    "BackpressureError",
    "ReceiveTimeout",
    "ViewInUseError",
    "CapacityError",
    "ClaimLostError",
    "BrokerError",
    "BrokerUnavailable",
    "BrokerRestarted",
    "SlowConsumer",
    "HoldLimitError",
    "GapError",
]


class TensorbusError(Exception):
    """Base class of every tensorbus error."""


class SegmentError(TensorbusError, OSError):
    """A shared-memory segment could not be created, opened or mapped."""


class SegmentNotFoundError(SegmentError, FileNotFoundError):
    """No shared-memory segment has the given name."""


class SegmentNameError(SegmentError, ValueError):
    """A segment name is not one tensorbus would create."""


class LayoutMismatchError(SegmentError):
    """A segment exists but is not a ring of this layout version."""


class MessageTooLargeError(TensorbusError, ValueError):
    """A message does not fit in one ring slot."""


class RingClosedError(TensorbusError):
    """The ring was closed: nothing more can be published or received."""


class BrokerError(TensorbusError):
    """The broker refused a request; ``code`` is its error code."""

    def __init__(self, message: str, code: str = "internal"):
        super().__init__(message)
        self.code = code


class BrokerUnavailable(BrokerError, ConnectionError):
    """No broker answered, or the broker went away."""


class BrokerRestarted(BrokerUnavailable, RingClosedError):
    """The broker died and its successor could not take over this client's
    session or ring (a layout of another release, a corrupt or missing
    state): the ring was closed before it was swept, so nothing is written
    where nobody reads. Reconnect to go on."""

    def __init__(self, message: str, code: str = "restarted"):
        super().__init__(message, code)


class BackpressureError(TensorbusError, TimeoutError):
    """A reliable publisher found no credit within its timeout."""


class ReceiveTimeout(TensorbusError, TimeoutError):
    """No message arrived within the timeout."""


class ViewInUseError(TensorbusError, BufferError):
    """A zero-copy view is still exported, so its slot cannot be released."""


class CapacityError(TensorbusError):
    """A ring has no free cursor or publisher entry left."""


class ClaimLostError(TensorbusError):
    """A claim was padded by a repair that took this publisher for dead."""


class SlowConsumer(RingClosedError):
    """This subscriber fell too far behind for too long and was evicted."""


class HoldLimitError(TensorbusError):
    """A client holds views of too many arena blocks (its ``max_holds``):
    leaked views must not silently starve publishers."""


class GapError(TensorbusError):
    """Messages of a reliable topic were lost with a link between hosts
    (a peer daemon died, or stayed unreachable past its grace period).
    Raised once, where the loss happened; the next receive goes on with the
    messages after it. ``topic``, ``peer`` and ``reason`` say which."""

    def __init__(self, message: str, topic: str = "", peer: str = "", reason: str = ""):
        super().__init__(message)
        self.topic = topic
        self.peer = peer
        self.reason = reason

    @classmethod
    def from_marker(cls, body: bytes, topic: str) -> "GapError":
        """The error a bridge's gap marker (a msgpack map) stands for."""
        try:
            import msgpack

            info = msgpack.unpackb(body)
            topic, peer, reason = str(info["topic"]), str(info["peer"]), str(info["reason"])
        except Exception:  # a marker we cannot read still means loss
            peer, reason = "?", "unreadable gap marker"
        return cls(f"messages of {topic!r} were lost between hosts: {reason}", topic, peer, reason)
