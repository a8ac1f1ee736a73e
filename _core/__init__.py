"""The shared-memory data plane: segments, topic rings, the tensor arena and
waiting.

Nothing here imports asyncio, sockets or any other tensorbus package.
"""

from tensorbus._core.arena import Arena, Hold, Holder, Loan, parse_size
from tensorbus._core.bells import BellTable
from tensorbus._core.errors import (
    BackpressureError,
    CapacityError,
    ClaimLostError,
    GapError,
    HoldLimitError,
    LayoutMismatchError,
    MessageTooLargeError,
    ReceiveTimeout,
    RingClosedError,
    SegmentError,
    SegmentNameError,
    SegmentNotFoundError,
    SlowConsumer,
    TensorbusError,
    ViewInUseError,
)
from tensorbus._core.message import Message
from tensorbus._core.publisher import Publisher
from tensorbus._core.ring import MAX_CAPACITY, MAX_SLOT_SIZE, POLICIES, Ring
from tensorbus._core.ringset import RingSet
from tensorbus._core.segment import Segment, check_segment_name, segment_name
from tensorbus._core.slot_flags import FLAG_BRIDGED, FLAG_FROM_HUB, FLAG_GAP, FLAG_HOPS, HOPS_SHIFT
from tensorbus._core.subscriber import Subscriber
from tensorbus._core.wait import SpinRegistry, Waiter

__all__ = [
    "Arena",
    "FLAG_BRIDGED",
    "FLAG_FROM_HUB",
    "FLAG_GAP",
    "FLAG_HOPS",
    "HOPS_SHIFT",
    "BackpressureError",
    "BellTable",
    "MAX_CAPACITY",
    "MAX_SLOT_SIZE",
    "Message",
    "CapacityError",
    "ClaimLostError",
    "GapError",
    "Hold",
    "HoldLimitError",
    "Holder",
    "LayoutMismatchError",
    "Loan",
    "MessageTooLargeError",
    "POLICIES",
    "Publisher",
    "ReceiveTimeout",
    "Ring",
    "RingClosedError",
    "RingSet",
    "Segment",
    "SegmentError",
    "SegmentNameError",
    "SegmentNotFoundError",
    "SlowConsumer",
    "SpinRegistry",
    "Subscriber",
    "TensorbusError",
    "ViewInUseError",
    "Waiter",
    "check_segment_name",
    "parse_size",
    "segment_name",
]
