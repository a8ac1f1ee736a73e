"""The daemon's logs: text lines for people, or one JSON object per line for
log collectors (``tensorbus serve --log-format json``).

Records an operator acts on carry a stable snake_case ``event`` name and
their fields as ``extra``::

    log.info("client %s joined", name, extra={"event": "client_joined", "client": name})

The JSON object of a record holds ``time`` (ISO 8601, UTC), ``level``,
``event`` (``"log"`` for a record without one), ``message`` (the text
line's message), ``logger``, then its fields. docs/operations.md lists the
events.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

__all__ = ["JsonFormatter", "event_fields", "setup_logging"]

TEXT_FORMAT = "%(asctime)s tensorbus %(levelname)s %(message)s"
# Attributes every LogRecord has: anything else on a record came from ``extra``.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def event_fields(record: logging.LogRecord) -> dict:
    """The fields a record was given through ``extra`` (``event`` included)."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        fields = event_fields(record)
        obj = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds"),
            "level": record.levelname.lower(),
            "event": fields.pop("event", "log"),
            "message": record.getMessage(),
            "logger": record.name,
        }
        for key, value in fields.items():
            obj.setdefault(key, value)  # the five above are never overwritten
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        # default=str: a field of any type still makes a line, never a crash.
        return json.dumps(obj, default=str, separators=(",", ":"))


def setup_logging(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send the ``tensorbus`` loggers' records at ``level`` and above to
    ``stream`` (stderr) as ``fmt``: "text" or "json"."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
