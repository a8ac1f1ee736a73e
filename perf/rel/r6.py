"""R6: a soak: RSS drift and losses over minutes."""

from __future__ import annotations

import os
import sys
import tempfile
import time

import tensorbus
from rel.harness import (
    COUNT,
    DUPS,
    GAPS,
    MSG_SIZE,
    STALLS,
    TORN,
    Board,
    Broker,
    Report,
    Workers,
    note,
    wait_for,
)
from tensorbus.broker.stats import private_rss_kb

# --------------------------------------------------------------------- R6


def r6(seconds: float = 600.0, rate: float = 100_000, out=sys.stdout) -> Report:
    """R6: a soak. One publisher at ``rate`` msgs/s to one subscriber on a
    reliable topic for ``seconds``; the RSS (less shared memory) of the
    daemon, the publisher and the subscriber sampled every second. Drift:
    the last sample against the first after a warm-up (a tenth of the run,
    at most 5 s), in %; target within 5 % each. Then the publisher stops and
    every message it sent must reach the subscriber, in order, intact."""
    topic = "rel/r6/data"
    sub, pub = 0, 1
    names = ("daemon", "publisher", "subscriber")
    warm = min(5.0, seconds / 10)
    with (
        tempfile.TemporaryDirectory(prefix="tb-rel-r6-") as folder,
        Broker(folder) as broker,
        tensorbus.connect(broker.url, name="rel-probe") as probe,
    ):
        probe.create_topic(topic, qos="reliable", capacity=4096, slot_size=MSG_SIZE)
        board = Board(os.path.join(folder, "board"), rows=2)
        with Workers(folder, board) as workers:
            workers.start("sub", sub, url=broker.url, pattern=topic)
            workers.wait_ready([sub])
            workers.start("pub", pub, url=broker.url, topic=topic, rate=rate)
            workers.wait_ready([pub])
            pids = (broker.pid, workers.procs[pub].pid, workers.procs[sub].pid)
            samples: list[tuple[float, list[int]]] = []
            t0 = time.monotonic()
            tick, last_note = t0, t0
            while tick - t0 < seconds:
                tick += 1.0
                time.sleep(max(0.0, tick - time.monotonic()))
                rss = [private_rss_kb(pid) for pid in pids]
                if None in rss:
                    gone = names[rss.index(None)]
                    raise RuntimeError(f"r6: the {gone} died after {tick - t0:.0f} s")
                samples.append((tick - t0, rss))
                if tick - last_note >= 60 or tick - t0 >= seconds:
                    last_note = tick
                    note(
                        f"r6 {tick - t0:.0f}/{seconds:g} s: sent {board.get(pub, COUNT):,}, "
                        f"received {board.get(sub, COUNT):,}, RSS "
                        + ", ".join(
                            f"{n} {k / 1024:.1f} MiB" for n, k in zip(names, rss, strict=True)
                        )
                    )
            elapsed = time.monotonic() - t0
            failed = workers.stop([pub])
            sent = board.get(pub, COUNT)
            wait_for(lambda: board.get(sub, COUNT) >= sent, 30.0, 0.01)
            failed += workers.stop([sub])
            if failed:
                raise RuntimeError(f"r6: worker {failed[0]} failed:\n{workers.tail(failed[0])}")
            received = board.get(sub, COUNT)
            torn, gaps, dups = (board.get(sub, c) for c in (TORN, GAPS, DUPS))
            stalls = board.get(pub, STALLS)
    report = Report(
        f"R6: soak, 1 publisher -> 1 subscriber, reliable, {rate:,.0f} msgs/s for {seconds:g} s"
    )
    report.add("messages sent", f"{sent:,} ({sent / elapsed:,.0f}/s)")
    report.add("messages received", f"{received:,}")
    report.count("lost", max(0, sent - received), "lost")
    report.count("gaps (messages skipped)", gaps, "gaps")
    report.count("duplicates", dups, "dups")
    report.count("torn", torn, "torn")
    report.add("publisher's sends that waited 1 s for credit", f"{stalls:,}")
    steady = [rss for at, rss in samples if at >= warm] or [samples[-1][1]]
    report.figures.update(sent=sent, received=received, samples=samples, warm_s=warm)
    for i, name in enumerate(names):
        first, last = steady[0][i], steady[-1][i]
        top = max(rss[i] for rss in steady)
        drift = 100.0 * (last - first) / max(first, 1)
        report.figures[f"{name}_drift_percent"] = drift
        report.add(
            f"{name} RSS first / last / max",
            f"{first / 1024:.1f} / {last / 1024:.1f} / {top / 1024:.1f} MiB",
        )
        report.add(f"{name} RSS drift", f"{drift:+.1f} %", "within 5 %", abs(drift) <= 5.0)
    report.add("samples (after a warm-up of)", f"{len(steady)} ({warm:g} s)")
    report.print(out)
    return report
