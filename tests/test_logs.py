"""``tensorbus serve --log-format json``: one JSON object per stderr line,
with the events an operator needs (docs/operations.md lists them)."""

import json
import logging
import os
import signal
import sys
import time
from datetime import UTC, datetime

import pytest

import tensorbus
from tensorbus.broker.logs import JsonFormatter

from conftest import read_line


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


def _stop_and_read_events(daemon) -> list[dict]:
    """Stop ``daemon`` and parse its stderr: every line must be a JSON object."""
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.proc.wait(15)
    lines = daemon.proc.stderr.read().splitlines()
    events = [json.loads(line) for line in lines]
    for e in events:
        assert {"time", "level", "event", "message", "logger"} <= set(e), e
    return events


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _one(events, event, **fields):
    found = [
        e for e in events if e["event"] == event and all(e.get(k) == v for k, v in fields.items())
    ]
    assert len(found) == 1, f"{event} {fields}: {found or [e['event'] for e in events]}"
    return found[0]


def test_json_logs_tell_joins_leaves_deaths_and_evictions(daemon_factory, popen):
    d = daemon_factory(
        "--log-format", "json", "--log-level", "info", "--slow-consumer-grace", "0.3"
    )
    with tensorbus.connect(d.url, name="joiner") as c:
        c.topics()
    victim = popen("subscriber", d.url, "quiet/>", "1", "stall")
    assert read_line(victim) == "ready"
    victim.kill()  # SIGKILL: no bye
    with tensorbus.connect(d.url, name="watcher") as w:
        _wait_for(lambda: w.stats()["broker"]["sessions"] == 1)  # the watcher alone
        sub = w.subscribe("slow/x")
        pub = w.publisher("slow/x", capacity=4)
        for _ in range(5):
            pub.send(b"x", timeout=5)  # the fifth waits for the eviction
        with pytest.raises(tensorbus.SlowConsumer):
            for _ in range(10):
                sub.recv(timeout=2)
    events = _stop_and_read_events(d)

    joined = _one(events, "client_joined", client="joiner")
    assert joined["pid"] == os.getpid() and joined["transport"] == "ipc"
    assert joined["level"] == "info"
    left = _one(events, "client_left", client="joiner")
    assert left["reason"] == "bye" and left["pid"] == os.getpid()
    _one(events, "client_joined", pid=victim.pid)
    died = _one(events, "client_died", pid=victim.pid)
    assert died["reason"] in ("process exited", "process gone") and died["transport"] == "ipc"
    evicted = _one(events, "subscriber_evicted", client="watcher")
    assert evicted["topic"] == "slow/x" and evicted["qos"] == "reliable"
    assert evicted["behind_s"] >= 0.3 and "slow consumer" in evicted["reason"]
    assert evicted["level"] == "warning"
    assert _one(events, "broker_started")["endpoints"] == [d.url]
    order = [e["event"] for e in events]
    assert order.index("client_joined") < order.index("client_left") < order.index("client_died")


def test_json_logs_tell_links_up_and_down(daemon_factory, tmp_path):
    common = ("--transport", "tcp", "--heartbeat", "0.2")
    json_logs = ("--log-format", "json", "--log-level", "info")
    a = daemon_factory("--tcp", "127.0.0.1:*", *common, *json_logs, path=tmp_path / "a")
    tcp = next(e for e in a.endpoints if e.startswith("tcp://"))
    b = daemon_factory("--peer", tcp, *common, path=tmp_path / "b")

    def state():
        with tensorbus.connect(a.url, name="probe") as c:
            return [link["state"] for link in c.stats()["broker"]["links"]]

    _wait_for(lambda: state() == ["up"])
    b.stop()
    _wait_for(lambda: state() in ([], ["down"]))
    events = _stop_and_read_events(a)
    up = _one(events, "link_up")
    assert up["kind"] == "peer" and up["transport"] == "tcp" and up["reconnects"] == 0
    down = _one(events, "link_down", peer=up["peer"])
    assert down["kind"] == "peer" and down["reason"] and down["level"] == "warning"
