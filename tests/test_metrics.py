"""``tensorbus serve --metrics``: real daemons, real traffic, real scrapes."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from daemons import free_port
from prometheus_client.parser import text_string_to_metric_families

import tensorbus
from tensorbus.broker import metrics
from tensorbus.broker.metrics_table import LATENCY_LE_NS, METRICS, markdown_table
from tensorbus.broker.metrics_totals import TopicTotals

pytestmark = pytest.mark.timeout(90)

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def scrape(port: int) -> dict:
    """{(sample name, sorted labels): value} of one real scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def scrape_until(port: int, ready, timeout: float = 10.0) -> dict:
    """Scrape until ``ready(samples)``: the snapshot is refreshed once a second."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def test_a_scrape_matches_the_traffic_sent(daemon_factory):
    port = free_port()
    d = daemon_factory("--metrics", f"127.0.0.1:{port}")
    n, size = 50, 100
    with tensorbus.connect(d.url) as c:
        sub = c.subscribe("m/x")
        pub = c.publisher("m/x")
        for _ in range(n):
            pub.send(b"x" * size)
        got = 0
        while got < n:
            got += len(sub.recv_batch(n - got, max_wait=2.0))
        # A realtime topic whose subscriber is lapped: drops, reason "lapped".
        rt_sub = c.subscribe("m/rt")
        rt_pub = c.publisher("m/rt", qos="realtime", capacity=4)
        for _ in range(20):
            rt_pub.send(b"y")
        rt_sub.recv_batch(20, max_wait=0.5)

        def settled(s):
            return (
                value(s, "tensorbus_delivered_messages_total", topic="m/x") == n
                and (
                    value(s, "tensorbus_dropped_messages_total", topic="m/rt", reason="lapped") or 0
                )
                > 0
            )

        s = scrape_until(port, settled)
        assert value(s, "tensorbus_published_messages_total", topic="m/x") == n
        assert value(s, "tensorbus_published_bytes_total", topic="m/x") == n * size
        assert value(s, "tensorbus_delivered_messages_total", topic="m/x") == n
        assert value(s, "tensorbus_dropped_messages_total", topic="m/x", reason="lapped") == 0
        assert value(s, "tensorbus_dropped_messages_total", topic="m/rt", reason="lapped") > 0
        count = value(s, "tensorbus_delivery_latency_seconds_count", topic="m/x")
        assert 0 < count <= n
        inf = value(s, "tensorbus_delivery_latency_seconds_bucket", topic="m/x", le="+Inf")
        assert inf == count
        assert value(s, "tensorbus_delivery_latency_seconds_sum", topic="m/x") > 0
        assert value(s, "tensorbus_topic_subscribers", topic="m/x") == 1
        assert value(s, "tensorbus_topic_publishers", topic="m/x") == 1
        assert value(s, "tensorbus_topic_depth_messages", topic="m/x") == 0
        assert value(s, "tensorbus_topic_credit_messages", topic="m/x") == 256
        assert value(s, "tensorbus_sessions", transport="ipc") == 1
        assert value(s, "tensorbus_arena_size_bytes") == 64 << 20
        assert value(s, "tensorbus_arena_holders_free") == 61  # of 63: the bridge, this client
        assert value(s, "tensorbus_links_up", kind="peer") == 0

        # Every metric defined is scraped, and nothing else of ours is.
        scraped = {name for name, _ in s}
        for m in METRICS:
            names = (
                {m.name + "_bucket", m.name + "_count", m.name + "_sum"}
                if m.kind == "histogram"
                else {m.name}
            )
            assert names <= scraped, m.name
        families = {
            f.name
            for f in text_string_to_metric_families(
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
                .read()
                .decode()
            )
        }
        ours = {f for f in families if f.startswith("tensorbus_")}
        assert ours == {m.name.removesuffix("_total") for m in METRICS}

        # The Grafana dashboard names only metrics this scrape has.
        for name in dashboard_metric_names():
            assert name in scraped, f"docs/grafana-dashboard.json: no metric {name!r}"

    # A client that left is still counted: no counter goes down.
    after = scrape_until(port, lambda s: value(s, "tensorbus_sessions", transport="ipc") == 0)
    assert value(after, "tensorbus_published_messages_total", topic="m/x") == n
    assert value(after, "tensorbus_delivered_messages_total", topic="m/x") == n
    assert value(after, "tensorbus_topic_subscribers", topic="m/x") == 0


def test_topics_beyond_the_limit_fold_into_other(daemon_factory, tmp_path):
    port = free_port()
    config = tmp_path / "serve.toml"
    config.write_text(f"metrics = {port}\n")  # the TOML key; a bare port is loopback
    d = daemon_factory("--config", str(config), "--metrics-max-topics", "2")
    with tensorbus.connect(d.url) as c:
        pubs = [c.publisher(f"f/{i}") for i in range(4)]
        for i, pub in enumerate(pubs):
            for _ in range(i + 1):
                pub.send(b"z" * 10)
        s = scrape_until(
            port, lambda s: value(s, "tensorbus_published_messages_total", topic="other") == 7
        )
    assert value(s, "tensorbus_published_messages_total", topic="f/0") == 1
    assert value(s, "tensorbus_published_messages_total", topic="f/1") == 2
    assert value(s, "tensorbus_published_messages_total", topic="other") == 3 + 4
    assert value(s, "tensorbus_published_bytes_total", topic="other") == 70
    assert value(s, "tensorbus_topic_publishers", topic="other") == 2
    topics = {dict(labels).get("topic") for name, labels in s if name.endswith("_total")}
    assert topics - {None} == {"f/0", "f/1", "other"}


def serve(tmp_path, *args):
    return subprocess.run(
        [sys.executable, "-m", "tensorbus", "serve", "--ipc", str(tmp_path / "b.sock"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_metrics_address_in_use_is_an_error_at_start(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = serve(tmp_path, "--arena-size", "16MiB", "--metrics", f"127.0.0.1:{port}")
    assert proc.returncode == 1
    assert "tensorbus ready" not in proc.stdout
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in proc.stderr
    assert not os.path.exists(tmp_path / "b.sock")  # nothing left behind
    bad = serve(tmp_path, "--metrics", "localhost:http")
    assert bad.returncode == 1
    assert "--metrics must be HOST:PORT or PORT, not 'localhost:http'" in bad.stderr


def test_latency_buckets_are_exact_sums_of_the_core_buckets():
    for le, last in zip(LATENCY_LE_NS, metrics._LAST_CORE_BUCKET, strict=True):
        assert metrics.core_bucket_bounds_ns(last)[1] == le
        assert metrics.core_bucket_bounds_ns(last + 1)[0] == le
    # The core's rule (_core/ring.pyx record_latency): 1500 ns is in the
    # bucket [1024, 1536), 1600 ns in [1536, 2048): both below le=2.048e-06.
    hist = [0] * 48
    hist[8] = 3  # 2e + h - 12 for e = 10, h = 0
    hist[9] = 1  # h = 1
    hist[47] = 2  # 0.805 s or slower
    buckets, total = metrics.latency_buckets(hist)
    as_dict = dict(buckets)
    assert as_dict["1.024e-06"] == 0 and as_dict["2.048e-06"] == 4
    assert as_dict["0.805306368"] == 4 and as_dict["+Inf"] == 6
    assert [b[0] for b in buckets][-1] == "+Inf"
    assert 1.6 < total < 1.7  # two at 0.805 s, four near 1.5 us


def test_totals_never_go_down_when_entries_are_reused():
    t = TopicTotals()
    lat = (0,) * 48
    t.update((5, [(0, 1, True, 0, 5, 0, lat)], [(0, 100, True, 5, 50, 0)]), 8)
    assert (t.published, t.bytes, t.delivered) == (5, 50, 5)
    # Cursor 0 freed and joined again (generation 2), still holding the old
    # counts (not yet zeroed); record 0 taken by pid 200, zeroed, 2 sent.
    t.update((7, [(0, 2, True, 0, 5, 0, lat)], [(0, 200, True, 2, 20, 0)]), 8)
    assert (t.published, t.bytes, t.delivered) == (7, 70, 5)
    # Now zeroed and counting: the new cursor received 2.
    wrapped = (1,) + (0,) * 47
    t.update((7, [(0, 2, True, 0, 2, 0, wrapped)], [(0, 200, False, 2, 20, 0)]), 8)
    assert (t.delivered, t.latency[0], t.publishers) == (7, 1, 0)
    # A u32 latency bucket wraps: growth is modulo 2^32.
    t.latency[0] = 0
    t.cursors_seen[0] = (2, 2, 0, (0xFFFFFFFF,) + (0,) * 47)
    t.update((7, [(0, 2, True, 0, 2, 0, wrapped)], []), 8)
    assert t.latency[0] == 2


def test_docs_list_every_metric():
    with open(os.path.join(DOCS, "metrics.md")) as f:
        text = f.read()
    table = text.split("<!-- metrics: begin -->\n", 1)[1].split("<!-- metrics: end -->", 1)[0]
    assert table == markdown_table(), (
        "docs/metrics.md is out of date: paste the output of "
        "python -c 'from tensorbus.broker.metrics_table import markdown_table; "
        'print(markdown_table(), end="")\''
    )


def _exprs(node):
    if isinstance(node, dict):
        for key, v in node.items():
            if key in ("expr", "query") and isinstance(v, str):
                yield v
            else:
                yield from _exprs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _exprs(v)


def dashboard_metric_names() -> set[str]:
    """The metric names in docs/grafana-dashboard.json's PromQL."""
    with open(os.path.join(DOCS, "grafana-dashboard.json")) as f:
        dashboard = json.load(f)
    names = set()
    for expr in _exprs(dashboard):
        values = re.fullmatch(r"label_values\((\w+),\s*\w+\)", expr)
        if values:
            names.add(values.group(1))
            continue
        bare = re.sub(r'"[^"]*"', "", expr)  # label values
        bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", bare)  # matchers, ranges
        bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", bare)  # label lists
        for token in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*(?![A-Za-z0-9_:]|\s*\()", bare):
            if token not in ("and", "or", "unless", "bool", "offset"):
                names.add(token)
    return names


def test_the_grafana_dashboard_loads_and_names_metrics():
    names = dashboard_metric_names()
    assert names, "no PromQL found in docs/grafana-dashboard.json"
    # Checked against a real scrape in test_a_scrape_matches_the_traffic_sent;
    # here, against the definitions (histograms scrape as _bucket/_sum/_count).
    defined = {m.name for m in METRICS}
    for m in METRICS:
        if m.kind == "histogram":
            defined |= {m.name + "_bucket", m.name + "_sum", m.name + "_count"}
    unknown = {n for n in names if n not in defined and not n.startswith("process_")}
    assert not unknown, f"docs/grafana-dashboard.json names unknown metrics: {sorted(unknown)}"
