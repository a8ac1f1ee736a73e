"""Users and their topic permissions, on NATS's model (docs/permissions.md).

A user is known by a tcp token or, on ipc, by a uid. Each has publish and
subscribe permissions: ``allow`` and ``deny`` lists of topic patterns,
where deny wins and a missing ``allow`` allows nothing (a user with no
``publish`` table may not publish). ``allow_responses`` lets a responder
publish replies to any requester's ``_inbox/...`` topic.

Everything here is pure: :func:`load_users` turns the ``[[users]]`` tables
of a TOML file into :class:`User` records (or raises :class:`ConfigError`
with a sentence naming the file, the entry and the key), and the ``may_*``
methods answer one question each. The daemon decides who is who
(broker/daemon.py) and where to ask.
"""

from __future__ import annotations

import hmac
import os
import stat
from dataclasses import dataclass

from tensorbus.broker.topics import INBOX_PREFIX, TopicNameError, matches, validate_pattern

__all__ = [
    "ConfigError",
    "Rules",
    "User",
    "find_by_token",
    "find_by_uid",
    "load_users",
    "read_token_file",
    "subject_matches",
]

USER_KEYS = frozenset(
    ("name", "token", "token_file", "uid", "publish", "subscribe", "allow_responses")
)
RULE_KEYS = frozenset(("allow", "deny"))


class ConfigError(ValueError):
    """A bad ``[[users]]`` entry or token file: the daemon refuses to start."""


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether ``pattern`` matches ``subject``, where ``subject`` may itself
    be a subscription pattern: its ``*`` and ``>`` are plain levels here, as
    NATS checks a subscription against its permissions. So ``metrics/>``
    matches ``metrics/*`` but ``metrics/loss`` does not."""
    return matches(pattern, subject)


@dataclass(frozen=True)
class Rules:
    """One direction's allow and deny patterns (deny wins)."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def permits(self, subject: str) -> bool:
        if any(subject_matches(p, subject) for p in self.deny):
            return False
        return any(subject_matches(p, subject) for p in self.allow)


@dataclass(frozen=True)
class User:
    name: str
    token: str | None = None
    uid: int | None = None
    publish: Rules = Rules()
    subscribe: Rules = Rules()
    allow_responses: bool = False

    def may_publish(self, topic: str) -> bool:
        """Publish on (or create) ``topic``; replies to an inbox with
        ``allow_responses``."""
        if self.allow_responses and topic.startswith(INBOX_PREFIX):
            return True
        return self.publish.permits(topic)

    def may_subscribe(self, subject: str) -> bool:
        """Subscribe to ``subject``: a topic name, or a pattern checked as a
        subject (NATS's rule). A wildcard subscription that is allowed still
        gets only the topics this also allows, one by one."""
        return self.subscribe.permits(subject)

    def __str__(self) -> str:
        return f"user {self.name!r}"


def find_by_token(users: list[User], token: str) -> User | None:
    """The user whose token this is (compared in constant time)."""
    found = None
    for user in users:
        if user.token is not None and hmac.compare_digest(user.token.encode(), token.encode()):
            found = user  # no early exit: the time does not tell which user
    return found


def find_by_uid(users: list[User], uid: int) -> User | None:
    return next((u for u in users if u.uid == uid), None)


def read_token_file(path: str, what: str) -> str:
    """The token in ``path``; refused (ConfigError) when it cannot be read,
    is empty, or is readable by group or others, as ssh refuses a private key."""
    try:
        with open(path) as f:
            mode = os.fstat(f.fileno()).st_mode
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}: cannot read token file {path}: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{what}: token file {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it"
        )
    if not token:
        raise ConfigError(f"{what}: token file {path} is empty")
    return token


def load_users(entries: object, source: str) -> list[User]:
    """The users of the ``[[users]]`` tables ``entries`` of config file
    ``source``; raises ConfigError naming the file, the entry and the key."""
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: 'users' must be a list of [[users]] tables")
    users: list[User] = []
    for index, entry in enumerate(entries):
        users.append(_user(entry, f"{source}: [[users]] entry {index}", index))
    _check_unique(users, source)
    return users


def _user(entry: object, where: str, index: int) -> User:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} is not a table")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: key 'name' must be a non-empty string")
    where = f"{where} ({name!r})"
    unknown = sorted(set(entry) - USER_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(USER_KEYS))})"
        )
    if "token" in entry and "token_file" in entry:
        raise ConfigError(f"{where}: keys 'token' and 'token_file' exclude each other")
    token = entry.get("token")
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ConfigError(f"{where}: key 'token' must be a non-empty string")
    if "token_file" in entry:
        path = entry["token_file"]
        if not isinstance(path, str):
            raise ConfigError(f"{where}: key 'token_file' must be a path string")
        token = read_token_file(path, f"{where}, key 'token_file'")
    uid = entry.get("uid")
    if uid is not None and (type(uid) is not int or uid < 0):
        raise ConfigError(f"{where}: key 'uid' must be a non-negative integer")
    if token is None and uid is None:
        raise ConfigError(f"{where}: give it a 'token', a 'token_file' or a 'uid'")
    responses = entry.get("allow_responses", False)
    if not isinstance(responses, bool):
        raise ConfigError(f"{where}: key 'allow_responses' must be true or false")
    return User(
        name=name,
        token=token.strip() if token is not None else None,
        uid=uid,
        publish=_rules(entry.get("publish"), f"{where}, key 'publish'"),
        subscribe=_rules(entry.get("subscribe"), f"{where}, key 'subscribe'"),
        allow_responses=responses,
    )


def _rules(table: object, where: str) -> Rules:
    if table is None:
        return Rules()
    if not isinstance(table, dict):
        raise ConfigError(f'{where} must be a table such as {{ allow = [">"] }}')
    unknown = sorted(set(table) - RULE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: allow, deny)")
    lists = {}
    for key in ("allow", "deny"):
        patterns = table.get(key, [])
        if not isinstance(patterns, list):
            raise ConfigError(f"{where}.{key} must be a list of topic patterns")
        for pattern in patterns:
            try:
                validate_pattern(pattern)
            except TopicNameError as exc:
                raise ConfigError(f"{where}.{key}: {exc}") from None
        lists[key] = tuple(patterns)
    return Rules(**lists)


def _check_unique(users: list[User], source: str) -> None:
    """Two users may not share a name, a token or a uid: whoever presents
    it must be one user."""
    for key in ("name", "token", "uid"):
        seen: dict = {}
        for index, user in enumerate(users):
            value = getattr(user, key)
            if value is None:
                continue
            if value in seen:
                first = seen[value]
                raise ConfigError(
                    f"{source}: [[users]] entries {first} ({users[first].name!r}) and "
                    f"{index} ({user.name!r}) have the same {key}: each {key} names one user"
                )
            seen[value] = index
