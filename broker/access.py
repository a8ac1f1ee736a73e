"""Who a session is and what it may do: the daemon's side of
broker/permissions.py.

A session is all-powerful (``None`` as its user) when it comes from the
daemon's own uid on ipc, or presents the daemon's own token (or any tcp
hello, where the daemon has neither a token nor token users). Otherwise it
is a configured :class:`~tensorbus.broker.permissions.User`, found by its
uid on ipc or its token on tcp, and each op that touches a topic asks here
first. A refusal is a ``permission_denied`` error naming the user, the op
and the topic, and a warning in the log.
"""

from __future__ import annotations

import hmac
import logging
import os

from tensorbus.broker import protocol as P
from tensorbus.broker.permissions import User, find_by_token, find_by_uid
from tensorbus.broker.topics import INBOX_PREFIX

__all__ = ["Access", "denied"]

log = logging.getLogger("tensorbus.broker")


def denied(user: User, op: str, topic: object, who: str = "") -> P.ProtocolViolation:
    """The refusal of ``op`` on ``topic`` to ``user``, logged."""
    where = f" ({who})" if who else ""
    sentence = f"{user}{where} may not {op} {topic!r}"
    log.warning("permission denied: %s", sentence, extra={"event": "permission_denied"})
    return P.ProtocolViolation("permission_denied", sentence)


class Access:
    """The users of one daemon and the user of each live session."""

    def __init__(self, users: list[User], token: str | None):
        self.users = users
        self.token = token
        self.by_session: dict[tuple, User] = {}  # restricted sessions only

    def admits_uid(self, uid: int) -> bool:
        """Whether an ipc peer of ``uid`` may speak to this daemon at all."""
        return uid == os.getuid() or find_by_uid(self.users, uid) is not None

    def identify(self, transport: str, uid: int | None, token: str) -> User | None:
        """Who a hello comes from (None: all-powerful); raises
        ``auth_failed`` for a tcp hello without a token this daemon knows."""
        if transport == "ipc":
            return None if uid == os.getuid() else find_by_uid(self.users, uid)
        if self.token and hmac.compare_digest(token.encode(), self.token.encode()):
            return None
        user = find_by_token(self.users, token) if token else None
        tokens_needed = bool(self.token) or any(u.token for u in self.users)
        if user is None and tokens_needed:
            log.warning(
                "tcp client refused: bad or missing token",
                extra={"event": "auth_failed", "transport": transport},
            )
            raise P.ProtocolViolation("auth_failed", "missing or wrong token")
        return user

    def bind(self, session_key, user: User | None) -> None:
        """The session ``session_key`` is ``user`` from now on."""
        self.by_session.pop(session_key, None)
        if user is not None:
            self.by_session[session_key] = user

    def user_of(self, session_key) -> User | None:
        return self.by_session.get(session_key)

    def forget(self, session_key) -> None:
        self.by_session.pop(session_key, None)

    # -- the checks --------------------------------------------------------

    def check_publish(self, session, op: str, topic: object, private: bool = False) -> None:
        """``open_publisher`` or ``create_topic`` of ``topic``: a private
        reply inbox is always the session's own to create."""
        user = self.by_session.get(session.key)
        if user is None or not isinstance(topic, str):
            return  # all-powerful, or a bad name the registry refuses
        if private and topic.startswith(INBOX_PREFIX):
            return
        if not user.may_publish(topic):
            raise denied(user, op, topic, session.name)

    def check_subscribe(self, session, subject: object, owned: bool = False) -> None:
        """``subscribe`` to ``subject`` (a pattern checked as a subject, or a
        queue group's topic); ``owned``: it is the session's own private
        topic (its reply inbox), always readable."""
        user = self.by_session.get(session.key)
        if user is None or owned or not isinstance(subject, str):
            return
        if not user.may_subscribe(subject):
            raise denied(user, "subscribe to", subject, session.name)

    def reader(self, session, owns):
        """What the registry asks before it gives a subscription of
        ``session`` a cursor on a topic (``owns(name)``: the session's own
        private topic); None for an all-powerful session."""
        user = self.by_session.get(session.key)
        if user is None:
            return None
        return lambda name: owns(name) or user.may_subscribe(name)
