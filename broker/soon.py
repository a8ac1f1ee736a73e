"""Run a function once, soon, however many times it is asked for meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["Soon"]


class Soon:
    """``soon()`` schedules ``fn()`` on the running loop (after ``delay``
    seconds; 0: in the next turn) unless it is scheduled already. ``fn``
    may ask again while it runs: that schedules one more call."""

    __slots__ = ("fn", "delay", "pending")

    def __init__(self, fn: Callable[[], object], delay: float = 0.0):
        self.fn = fn
        self.delay = delay
        self.pending = False

    def __call__(self) -> None:
        if not self.pending:
            self.pending = True
            loop = asyncio.get_running_loop()
            if self.delay:
                loop.call_later(self.delay, self._run)
            else:
                loop.call_soon(self._run)

    def _run(self) -> None:
        self.pending = False
        self.fn()
