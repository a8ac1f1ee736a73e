"""The exceptions the client raises, and the map from the broker's error
codes (docs/protocol.md) to them. Each is a TensorbusError, so one except
clause catches everything tensorbus raises."""

from tensorbus._core.errors import (
    BackpressureError,
    BrokerError,
    BrokerRestarted,
    BrokerUnavailable,
    GapError,
    HoldLimitError,
    MessageTooLargeError,
    ReceiveTimeout,
    SlowConsumer,
    TensorbusError,
)

__all__ = [
    "AuthError",
    "BackpressureError",
    "BrokerError",
    "BrokerRestarted",
    "BrokerUnavailable",
    "ClientClosed",
    "GapError",
    "HoldLimitError",
    "MessageTooLargeError",
    "NotLocalError",
    "PermissionDenied",
    "ProtocolError",
    "ReceiveTimeout",
    "SlowConsumer",
    "TensorbusError",
    "TopicError",
    "error_for",
]


class ProtocolError(BrokerError):
    """A message broke the control protocol (either side)."""


class TopicError(BrokerError, ValueError):
    """A bad topic name, pattern or option, or a topic that clashes."""


class AuthError(BrokerError, PermissionError):
    """The broker did not accept this client's uid or token."""


class PermissionDenied(BrokerError, PermissionError):
    """This client's user may not publish or subscribe to that topic
    (docs/permissions.md); the sentence names the user, the op and the topic."""


class NotLocalError(BrokerError):
    """Publishing and subscribing need the broker on this host (ipc://)."""


class ClientClosed(TensorbusError):
    """The client was closed, or belongs to the parent of a forked process."""


_BY_CODE = {
    "bad_request": ProtocolError,
    "too_large": ProtocolError,
    "unsupported_version": ProtocolError,
    "unknown_op": ProtocolError,
    "no_session": ProtocolError,
    "session_lost": BrokerRestarted,
    "auth_failed": AuthError,
    "permission_denied": PermissionDenied,
    "not_local": NotLocalError,
    "bad_topic": TopicError,
    "bad_pattern": TopicError,
    "bad_option": TopicError,
    "topic_conflict": TopicError,
    "read_only_topic": TopicError,
    "no_such_topic": TopicError,
    "no_such_subscription": BrokerError,
    "capacity": BrokerError,
    "internal": BrokerError,
}


def error_for(code: str, message: str) -> BrokerError:
    """The exception for a broker error reply."""
    return _BY_CODE.get(code, BrokerError)(f"{message} [{code}]", code)
