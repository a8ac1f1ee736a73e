"""``tensorbus serve --log-format json``: one JSON object per stderr line."""

import json
import logging
import sys
from datetime import UTC, datetime

from tensorbus.broker.logs import JsonFormatter


def _record(msg="hello %s", args=("x",), exc_info=None, **extra):
    record = logging.LogRecord("tensorbus.broker", logging.INFO, __file__, 1, msg, args, exc_info)
    record.__dict__.update(extra)
    return record


def test_json_formatter_puts_the_event_and_its_fields_on_one_line():
    line = JsonFormatter().format(_record(event="client_joined", client="c", pid=7, where=object()))
    obj = json.loads(line)
    assert "\n" not in line
    assert obj["event"] == "client_joined" and obj["level"] == "info"
    assert obj["message"] == "hello x" and obj["logger"] == "tensorbus.broker"
    assert obj["client"] == "c" and obj["pid"] == 7
    assert isinstance(obj["where"], str)  # not JSON: written as its str(), not a crash
    when = datetime.fromisoformat(obj["time"])
    assert when.utcoffset().total_seconds() == 0
    assert abs((datetime.now(UTC) - when).total_seconds()) < 60


def test_json_formatter_names_plain_records_and_keeps_tracebacks():
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed", (), exc_info=sys.exc_info())
    obj = json.loads(JsonFormatter().format(record))
    assert obj["event"] == "log"
    assert "ValueError: boom" in obj["exception"]
