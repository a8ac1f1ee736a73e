"""The shared-memory data plane: segments, topic rings and waiting.

Nothing here imports asyncio, sockets or any other tensorbus package.
"""

from tensorbus._core.errors import (
    BackpressureError,
    CapacityError,
    ClaimLostError,
    LayoutMismatchError,
    MessageTooLargeError,
    ReceiveTimeout,
    RingClosedError,
    SegmentError,
    SegmentNameError,
    SegmentNotFoundError,
    TensorbusError,
    ViewInUseError,
)
from tensorbus._core.ring import POLICIES, Publisher, Ring, Subscriber
from tensorbus._core.segment import Segment, check_segment_name, segment_name
from tensorbus._core.wait import SpinRegistry, Waiter

__all__ = [
    "BackpressureError",
    "CapacityError",
    "ClaimLostError",
    "LayoutMismatchError",
    "MessageTooLargeError",
    "POLICIES",
    "Publisher",
    "ReceiveTimeout",
    "Ring",
    "RingClosedError",
    "Segment",
    "SegmentError",
    "SegmentNameError",
    "SegmentNotFoundError",
    "SpinRegistry",
    "Subscriber",
    "TensorbusError",
    "ViewInUseError",
    "Waiter",
    "check_segment_name",
    "segment_name",
]
