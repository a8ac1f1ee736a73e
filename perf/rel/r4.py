"""R4: one stalled subscriber among eight."""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np

import tensorbus
from rel.harness import (
    COUNT,
    DEADLINE,
    MAX_WAIT_NS,
    MSG_SIZE,
    TORN,
    Board,
    Broker,
    MiB,
    Report,
    Workers,
    ms,
    note,
    wait_for,
)
from tensorbus.broker.stats import private_rss_kb

# --------------------------------------------------------------------- R4


def r4(
    seconds: float = 10.0,
    rate: float = 5_000,
    subscribers: int = 8,
    grace: float = 1.0,
    qos: str = "reliable",
    out=sys.stdout,
) -> Report:
    """R4: one stalled subscriber among ``subscribers`` (it subscribes and
    never reads), beside a run with no staller, in the same invocation.

    The topic is reliable by default: that is where a staller can hurt.
    On a realtime topic the publisher never waits, so a staller is only
    lapped (its drops counted) and cannot touch the others by construction.
    On a reliable topic the publisher waits for the slowest cursor, so
    without eviction one staller would hold every reader forever (by
    design: every message, in order); the broker's ``--slow-consumer-grace``
    evicts it after ``grace`` seconds of a full ring. The case measures
    what that costs the other readers. The publisher is paced at ``rate``
    as a loop making one message per send would be: a wait delays it, and
    it carries on at ``rate`` afterwards (no burst of what it missed). The
    cost is then the publisher's longest wait (about the grace, shown),
    and the readers' latency, publish timestamp to receive, p50/p99 beside
    the no-staller run: target p99 within 2x. Memory must stay bounded: the
    daemon's RSS (less shared memory) and its /dev/shm use are sampled all
    along. ``qos="realtime"`` runs the same on a realtime topic (there the
    staller is evicted for dropping).
    """
    runs = {}
    for staller in (False, True):
        runs[staller] = _r4_run(seconds, rate, subscribers, grace, qos, staller)
        note(
            f"r4 run {'with' if staller else 'without'} a staller: p99 "
            f"{runs[staller]['p99_us']:,.0f} us, {runs[staller]['received']:,} received"
        )
    base, stalled = runs[False], runs[True]
    readers = subscribers - 1
    report = Report(
        f"R4: one stalled subscriber of {subscribers} ({qos}, {rate:,.0f} msgs/s for "
        f"{seconds:g} s, --slow-consumer-grace {grace:g}); the other {readers} readers"
    )
    for label, run in (("without staller", base), ("with staller", stalled)):
        report.add(
            f"latency p50 / p99, {label}",
            f"{run['p50_us']:,.0f} / {run['p99_us']:,.0f} us",
        )
    ratio = stalled["p99_us"] / max(base["p99_us"], 1e-9)
    report.figures.update(without=base, with_staller=stalled, p99_ratio=ratio)
    report.add("p99 with / without staller", f"{ratio:.2f}x", "<= 2x", ratio <= 2.0)
    for label, run in (("without staller", base), ("with staller", stalled)):
        report.add(f"publisher's longest send, {label}", ms(run["max_wait_s"]))
    report.count(
        "messages the readers lost (reliable)" if qos == "reliable" else "readers' gaps",
        base["lost"] + stalled["lost"],
        "lost",
    )
    report.count("torn messages", base["torn"] + stalled["torn"], "torn")
    if qos == "reliable":
        report.add("staller evicted", f"{stalled['evictions']}", "1", stalled["evictions"] == 1)
    else:  # a subscriber that never reads never counts its drops: nothing to evict it for
        report.add("staller evicted", f"{stalled['evictions']}")
    report.add("drops counted on the topic", f"{base['drops']:,} / {stalled['drops']:,}")
    for label, run in (("without staller", base), ("with staller", stalled)):
        report.add(
            f"daemon RSS min / max, {label}",
            f"{run['rss_min_kb'] / 1024:.1f} / {run['rss_max_kb'] / 1024:.1f} MiB",
        )
    bounded = stalled["rss_max_kb"] <= 1.1 * base["rss_max_kb"] + 1024
    report.add(
        "daemon RSS max, with / without staller",
        f"{stalled['rss_max_kb'] / max(base['rss_max_kb'], 1):.2f}x",
        "<= 1.1x + 1 MiB",
        bounded,
    )
    shm_same = stalled["shm_max"] == stalled["shm_min"]
    report.add(
        "daemon /dev/shm min / max, with staller",
        f"{stalled['shm_min'] / MiB:.1f} / {stalled['shm_max'] / MiB:.1f} MiB",
        "constant",
        shm_same,
    )
    report.print(out)
    return report


def _r4_run(
    seconds: float, rate: float, subscribers: int, grace: float, qos: str, staller: bool
) -> dict:
    """One R4 run: ``subscribers - 1`` latency readers, the staller or not."""
    topic = "rel/r4/data"
    readers = list(range(subscribers - 1))
    stall_row, pub = subscribers - 1, subscribers
    with (
        tempfile.TemporaryDirectory(prefix="tb-rel-r4-") as folder,
        Broker(folder, "--slow-consumer-grace", str(grace)) as broker,
        tensorbus.connect(broker.url, name="rel-probe") as probe,
    ):
        probe.create_topic(topic, qos=qos, capacity=1024, slot_size=MSG_SIZE)
        board = Board(os.path.join(folder, "board"), rows=subscribers + 1)
        with Workers(folder, board) as workers:
            for row in readers:
                npy = os.path.join(folder, f"lat-{row}.npy")
                workers.start("sub", row, url=broker.url, pattern=topic, mode="latency", out=npy)
            if staller:
                workers.start("sub", stall_row, url=broker.url, pattern=topic, mode="stall")
            workers.wait_ready(readers + ([stall_row] if staller else []))
            workers.start("pub", pub, url=broker.url, topic=topic, rate=rate, catch_up=False)
            workers.wait_ready([pub])
            rss, shm = [], []
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                rss.append(private_rss_kb(broker.pid) or 0)
                shm.append(broker.shm_bytes())
                time.sleep(0.2)
            failed = workers.stop([pub])
            sent = board.get(pub, COUNT)
            wait_for(lambda: all(board.get(r, COUNT) >= sent for r in readers), DEADLINE, 0.01)
            stats = probe.stats(topic)
            failed += workers.stop(readers + ([stall_row] if staller else []))
            if failed:
                raise RuntimeError(f"r4: worker {failed[0]} failed:\n{workers.tail(failed[0])}")
            lat = np.concatenate([np.load(os.path.join(folder, f"lat-{r}.npy")) for r in readers])
            return {
                "sent": sent,
                "received": board.total(readers, COUNT),
                "lost": sum(max(0, sent - board.get(r, COUNT)) for r in readers),
                "torn": board.total(readers, TORN),
                "p50_us": float(np.percentile(lat, 50)) / 1e3,
                "p99_us": float(np.percentile(lat, 99)) / 1e3,
                "max_wait_s": board.get(pub, MAX_WAIT_NS) / 1e9,
                "evictions": stats["broker"]["evictions"],
                "drops": stats["topics"][0]["drops"],
                "rss_min_kb": min(rss),
                "rss_max_kb": max(rss),
                "shm_min": min(shm),
                "shm_max": max(shm),
            }
