"""Topic names and subscription patterns: validation and matching.

Names are hierarchical, ``a/b/c``: 1 to 16 levels of 1 to 64 characters from
``A-Z a-z 0-9 _ - .``, at most 255 bytes in all. Names whose first level is
``$sys`` belong to the broker (e.g. ``$sys/pressure/<topic>``); clients may
subscribe to them but not publish.

Patterns use NATS's wildcards: ``*`` matches exactly one level, ``>`` (last
level only) matches one or more levels. A pattern whose first level is a
wildcard never matches a ``$sys`` topic, as in MQTT, so ``>`` means "all
user topics".
"""

import re

__all__ = [
    "MAX_LEVELS",
    "MAX_NAME_BYTES",
    "INBOX_PREFIX",
    "inbox_topic",
    "SYSTEM_PREFIX",
    "TopicNameError",
    "is_system",
    "matches",
    "validate_pattern",
    "validate_topic",
]

MAX_LEVELS = 16
MAX_LEVEL_CHARS = 64
MAX_NAME_BYTES = 255
SYSTEM_PREFIX = "$sys"
# Reply inboxes: private topics of one session, never recreated by a reply;
# another host gets one only for the replies to requests it serves
# (broker/groups.py).
INBOX_PREFIX = "_inbox/"


def inbox_topic(token: int) -> str:
    """The reply inbox of the requester whose inbox token is ``token``."""
    return f"{INBOX_PREFIX}{token:016x}"


_LEVEL = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class TopicNameError(ValueError):
    """A topic name or pattern breaks the naming rules."""


def _levels(text: object, what: str) -> list[str]:
    if not isinstance(text, str):
        raise TopicNameError(f"a {what} must be a string, not {type(text).__name__}")
    if not text:
        raise TopicNameError(f"a {what} must not be empty")
    if len(text.encode()) > MAX_NAME_BYTES:
        raise TopicNameError(f"{what} {text[:40]!r}... is longer than {MAX_NAME_BYTES} bytes")
    levels = text.split("/")
    if len(levels) > MAX_LEVELS:
        raise TopicNameError(f"{what} {text!r} has {len(levels)} levels; at most {MAX_LEVELS}")
    if any(level == "" for level in levels):
        raise TopicNameError(f"{what} {text!r} has an empty level (leading, trailing or '//')")
    return levels


def _check_level(level: str, index: int, text: str, what: str) -> None:
    if index == 0 and level == SYSTEM_PREFIX:
        return
    if not _LEVEL.fullmatch(level):
        raise TopicNameError(
            f"{what} {text!r}: level {level!r} may only use A-Z a-z 0-9 _ - . "
            f"and be 1 to {MAX_LEVEL_CHARS} characters long"
        )


def validate_topic(name: object, *, allow_system: bool = False) -> str:
    """Return ``name`` if it is a valid topic name, else raise TopicNameError."""
    levels = _levels(name, "topic name")
    for i, level in enumerate(levels):
        _check_level(level, i, name, "topic name")
    if levels[0] == SYSTEM_PREFIX and not allow_system:
        raise TopicNameError(f"topic {name!r}: names under {SYSTEM_PREFIX}/ belong to the broker")
    return name


def validate_pattern(pattern: object) -> str:
    """Return ``pattern`` if it is a valid subscription pattern."""
    levels = _levels(pattern, "pattern")
    for i, level in enumerate(levels):
        if level == "*":
            continue
        if level == ">":
            if i != len(levels) - 1:
                raise TopicNameError(f"pattern {pattern!r}: '>' may only be the last level")
            continue
        _check_level(level, i, pattern, "pattern")
    return pattern


def is_system(name: str) -> bool:
    return name == SYSTEM_PREFIX or name.startswith(SYSTEM_PREFIX + "/")


def matches(pattern: str, topic: str) -> bool:
    """Whether ``topic`` matches ``pattern`` (both already validated)."""
    p = pattern.split("/")
    t = topic.split("/")
    if t[0] == SYSTEM_PREFIX and p[0] != SYSTEM_PREFIX:
        return False
    for i, level in enumerate(p):
        if level == ">":
            return len(t) > i
        if i >= len(t):
            return False
        if level != "*" and level != t[i]:
            return False
    return len(t) == len(p)
