"""What both clients do when their broker dies: the policy, without I/O.

The data plane does not need the daemon: publishers and subscribers go on
in the shared-memory rings while it is gone, and a successor (a restart,
or a ``--standby`` that got the socket's lock) takes the rings over
(broker/state.py). A client only has to notice the death, find the
successor and resume its session by id; its rings, cursors, bells and
holder slot are the same ones, so nothing is remapped.

* **Noticing**: a pidfd of the broker's process (``hello`` names it) is
  readable the moment it dies. Nothing on the send or receive path looks
  at it: the sync client watches it from a thread, the asyncio client
  from its loop, and a control request polls it beside its socket.
* **Finding the successor**: retry with exponential backoff and jitter
  (:class:`Backoff`) while nothing listens on the socket, within the
  ``reconnect=`` budget of ``connect()``; 0 turns it off (today's errors).
* **A call in flight** when the broker died is sent again if it is
  idempotent (:data:`IDEMPOTENT_OPS`); otherwise it raises
  :func:`in_flight_error`, since it may or may not have been done.
"""

from __future__ import annotations

import os
import random
import select

from tensorbus.clients.errors import BrokerUnavailable

__all__ = [
    "DEFAULT_RECONNECT_S",
    "IDEMPOTENT_OPS",
    "Backoff",
    "BrokerWatch",
    "attempt_s",
    "gave_up",
    "in_flight_error",
    "no_retry",
    "reconnect_budget",
    "shut_down",
]

# How long a client looks for a successor by default (NATS: 60 tries, 2 s apart).
DEFAULT_RECONNECT_S = 30.0


def attempt_s(left: float) -> float:
    """How long one hello (or link) of a resume or a redial waits for its
    answer, with ``left`` seconds of the budget to go: 50 ms to 1 s."""
    return max(0.05, min(1.0, left))


# Requests that do the same thing however often they are sent.
IDEMPOTENT_OPS = frozenset(("create_topic", "list_topics", "stats", "heartbeat", "bye"))


def reconnect_budget(reconnect: bool | float | None) -> float:
    """Seconds to look for a successor: True -> the default, False/None/0 -> off."""
    if reconnect is True:
        return DEFAULT_RECONNECT_S
    if reconnect is None or reconnect is False:
        return 0.0
    try:
        seconds = float(reconnect)
    except (TypeError, ValueError):
        raise TypeError(f"reconnect must be True, False or seconds, not {reconnect!r}") from None
    if not seconds >= 0:
        raise ValueError(f"reconnect must be >= 0 seconds, not {reconnect!r}")
    return seconds


class Backoff:
    """Delays between tries: 2 ms doubling to 250 ms, each drawn from the
    upper half of its step, so clients of one broker do not retry in step."""

    __slots__ = ("delay",)

    FIRST = 0.002
    CAP = 0.25

    def __init__(self) -> None:
        self.delay = self.FIRST

    def next(self) -> float:
        d = self.delay
        self.delay = min(self.CAP, d * 2)
        return random.uniform(d / 2, d)


class BrokerWatch:
    """A pidfd of the broker's process: readable once it has exited.
    Where none can be had (another pid namespace), :meth:`dead` asks the
    kernel whether the pid still exists."""

    __slots__ = ("fd", "pid")

    def __init__(self, pid: int):
        self.pid = pid
        try:
            self.fd = os.pidfd_open(pid)
        except (OSError, AttributeError):
            self.fd = -1

    def dead(self) -> bool:
        if self.fd >= 0:
            return bool(select.select([self.fd], [], [], 0)[0])
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def in_flight_error(op: str, url: str) -> BrokerUnavailable:
    return BrokerUnavailable(
        f"the broker at {url} died while {op!r} was in flight; the client resumed its "
        f"session with a successor, but cannot tell whether {op!r} was done: check, then retry",
        "unavailable",
    )


def gave_up(url: str, budget: float) -> BrokerUnavailable:
    if not budget:
        return BrokerUnavailable(
            f"the broker at {url} died (this client was connected with reconnect=0)",
            "unavailable",
        )
    return BrokerUnavailable(
        f"the broker at {url} died and no successor took over within {budget:g} s "
        "(connect(reconnect=...)); start `tensorbus serve` again, or run a --standby",
        "unavailable",
    )


def shut_down(url: str, reason: str) -> BrokerUnavailable:
    return BrokerUnavailable(f"the broker at {url} shut down: {reason}", "unavailable")


def no_retry(url: str, shutdown_reason: str | None, budget: float) -> BrokerUnavailable | None:
    """Why a lost broker is not looked for again: it said it shut down, or
    the client was connected with ``reconnect=0``. None: look for its
    successor."""
    if shutdown_reason is not None:
        return shut_down(url, shutdown_reason)
    if not budget:
        return gave_up(url, 0)
    return None
