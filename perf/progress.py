"""Progress of a benchmark: one line per backend and repeat as each run ends,
so that a long demo is never silent, and a bar redrawn in place while a run
goes on where the output is a terminal.

Everything goes to stderr, flushed: stdout keeps only the tables, for
whoever redirects it to a file.
"""

import sys
import time
from contextlib import contextmanager

BAR_WIDTH = 24


def short(x: float) -> str:
    """Three significant digits and no exponent: 0.512, 1.4, 3,810, 11.7 M."""
    if abs(x) >= 1e6:
        return f"{x / 1e6:.3g} M"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


class Progress:
    """``runs`` runs of ``mode`` (backends x repeat); call :meth:`start`
    before each and :meth:`finish` after it."""

    def __init__(self, mode: str, runs: int, repeat: int, stream=None):
        self.mode, self.runs, self.repeat = mode, runs, repeat
        self.stream = stream if stream is not None else sys.stderr
        # Without a terminal, a \r bar would leave a mess in a log file.
        self.live = self.stream.isatty()
        self.finished = 0
        self.name, self.rep, self.started = "", 0, 0.0

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def start(self, name: str, rep: int) -> None:
        """Run ``rep`` (from 1) of backend ``name`` begins."""
        self.name, self.rep, self.started = name, rep, time.monotonic()
        if self.live:
            filled = BAR_WIDTH * self.finished // max(self.runs, 1)
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            self._write(
                f"\r\033[K[{bar}] {self.finished}/{self.runs} "
                f"{self.mode} {name} (run {rep}/{self.repeat}) ..."
            )

    @contextmanager
    def running(self, name: str, rep: int):
        """:meth:`start`, and on an error the bar's line is ended, so that
        the traceback starts on a line of its own."""
        self.start(name, rep)
        try:
            yield self
        except BaseException:
            if self.live:
                self._write("\n")
            raise

    def finish(self, summary: str) -> None:
        """The run begun last ended; ``summary`` says what it measured."""
        seconds = time.monotonic() - self.started
        self.finished += 1
        clear = "\r\033[K" if self.live else ""
        self._write(
            f"{clear}[{self.mode} {self.rep}/{self.repeat}] {self.name}: {summary}, "
            f"{seconds:.1f} s\n"
        )
