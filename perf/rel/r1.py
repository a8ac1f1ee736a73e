"""R1: kill -9 of a random client mid-stream."""

from __future__ import annotations

import contextlib
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass

import tensorbus
from rel.harness import (
    COUNT,
    DEADLINE,
    DUPS,
    ERRORS,
    GAPS,
    MSG_SIZE,
    REACHED_NS,
    READY_TIMEOUT,
    TARGET_PID,
    TARGET_SEQ,
    TORN,
    Board,
    Broker,
    Report,
    Workers,
    encode,
    holdings,
    ms,
    note,
    p50_p99,
    percentile,
    wait_for,
)

# --------------------------------------------------------------------- R1


@dataclass
class Trial:
    """What one R1 trial saw."""

    victim: str
    recovery_s: float | None = None
    deadlock: bool = False
    crashed: int = 0
    torn: int = 0
    gaps: int = 0
    dups: int = 0
    lost: int = 0
    left: str = ""
    records: int = 0
    errors: int = 0


def r1(
    trials: int = 100,
    subscribers: int = 3,
    rate: float = 20_000,
    capacity: int = 64,
    seed: int | None = None,
    out=sys.stdout,
) -> Report:
    """R1: kill -9 of a random client mid-stream, ``trials`` times, on one daemon.

    Each trial: a reliable topic of its own (``capacity`` slots), then
    ``subscribers`` subscriber processes and a publisher streaming numbered
    64-byte messages at ``rate``/s; after a random moment one of them,
    chosen at random, gets SIGKILL. Progress after the kill:

    * a subscriber killed: the publisher must get ``capacity`` + 1 messages
      past what it had sent at the kill (a dead cursor left in place would
      block it there) and the survivors must receive that far;
    * the publisher killed: a new publisher (this process) opens the topic
      and every survivor must receive its first message (a half-done claim
      of the dead one left unpadded would hold them back).

    Recovery time: from the kill to the last survivor's progress (so it
    includes the time to stream those ``capacity`` + 1 messages at ``rate``,
    or to open the new publisher); none within DEADLINE seconds is a
    deadlock. Then the publisher stops, the
    survivors must receive every message it sent (lost), and stop. Torn,
    gaps and duplicates are checked on every message received. After each
    trial the broker's sessions, doorbells and holder slots must return to
    what they were, and the topic must have no publisher or subscriber
    left; after the last, the stopped daemon must have left no segment.
    """
    rng = random.Random(seed)
    results: list[Trial] = []
    with tempfile.TemporaryDirectory(prefix="tb-rel-r1-") as folder:
        broker = Broker(folder)
        try:
            with tensorbus.connect(broker.url, name="rel-probe") as probe:
                base = holdings(probe)
                for trial in range(trials):
                    t = _r1_trial(broker, probe, folder, trial, subscribers, rate, capacity, rng)
                    _r1_settle(probe, f"rel/r1/t{trial}", base, t)
                    if not broker.alive():
                        raise RuntimeError(f"the daemon died in trial {trial}: {broker.why()}")
                    results.append(t)
                    note(
                        f"r1 trial {trial + 1}/{trials}: killed the {t.victim}, "
                        + (
                            "DEADLOCK"
                            if t.deadlock
                            else f"survivors moved on after {ms(t.recovery_s)}"
                        )
                        + (f"; LEFT {t.left}" if t.left else "")
                        + (f"; {t.records} dead publisher record(s) kept" if t.records else "")
                    )
        finally:
            broker.stop()
        leaked = broker.leftovers()
    report = Report(
        f"R1: kill -9 of a random client mid-stream ({trials} trials, 1 publisher at "
        f"{rate:,.0f} msgs/s + {subscribers} subscribers, reliable, {capacity} slots)"
    )
    pubs = sum(t.victim == "publisher" for t in results)
    report.add("trials", f"{len(results)} ({pubs} publishers, {len(results) - pubs} subscribers)")
    report.count(
        "deadlocks (no progress within 10 s)", sum(t.deadlock for t in results), "deadlocks"
    )
    report.count(
        "survivors that crashed or hung at stop", sum(t.crashed for t in results), "crashed"
    )
    report.count("torn messages", sum(t.torn for t in results), "torn")
    report.count("gaps (messages skipped)", sum(t.gaps for t in results), "gaps")
    report.count("duplicates", sum(t.dups for t in results), "dups")
    report.count("lost (sent, never received)", sum(t.lost for t in results), "lost")
    report.count("errors raised to the survivors", sum(t.errors for t in results), "errors")
    report.count(
        "trials leaving sessions or cursors behind", sum(bool(t.left) for t in results), "left"
    )
    report.count(
        "dead publishers' records left in the ring", sum(t.records for t in results), "records"
    )
    report.count("leaked segments after the daemon stopped", len(leaked), "leaked")
    for kind in ("subscriber", "publisher"):
        times = [t.recovery_s for t in results if t.victim == kind and t.recovery_s is not None]
        report.figures[f"recovery_{kind}_s"] = times
        report.add(f"recovery after a killed {kind}, p50 / p99", p50_p99(times))
    times = [t.recovery_s for t in results if t.recovery_s is not None]
    report.figures["recovery_s"] = times
    report.add(
        "recovery, median of all",
        ms(percentile(times, 0.5)) if times else "-",
        "< 10 s",
        len(times) == len(results),
    )
    report.print(out)
    return report


def _r1_settle(probe: tensorbus.Client, topic: str, base: tuple, t: Trial) -> None:
    """After a trial: the broker's sessions, doorbells and holder slots must
    return to ``base`` and the topic lose every subscriber (within DEADLINE),
    and its publisher records (``stats``: publishers) must all be freed."""

    def counts() -> tuple:
        s = probe.stats(topic)
        b = s["broker"]
        return (b["sessions"], b["bells_free"], b["holders_free"]), s["topics"][0]

    if not wait_for(lambda: counts()[0] == base and counts()[1]["subscribers"] == 0, DEADLINE):
        held, row = counts()
        t.left = f"sessions/bells/holders {held} (were {base}), subscribers {row['subscribers']}"
    wait_for(lambda: counts()[1]["publishers"] == 0, 1.0, 0.01)
    t.records = counts()[1]["publishers"]


def _r1_trial(
    broker: Broker,
    probe: tensorbus.Client,
    folder: str,
    trial: int,
    subscribers: int,
    rate: float,
    capacity: int,
    rng: random.Random,
) -> Trial:
    topic = f"rel/r1/t{trial}"
    probe.create_topic(topic, qos="reliable", capacity=capacity, slot_size=MSG_SIZE)
    board = Board(os.path.join(folder, f"board-{trial}"), rows=subscribers + 1)
    subs, pub = list(range(subscribers)), subscribers
    with Workers(folder, board) as workers:
        for row in subs:
            workers.start("sub", row, url=broker.url, pattern=topic)
        workers.wait_ready(subs)
        workers.start("pub", pub, url=broker.url, topic=topic, rate=rate)
        workers.wait_ready([pub])
        if not wait_for(lambda: all(board.get(r, COUNT) for r in subs), READY_TIMEOUT):
            raise RuntimeError(f"trial {trial}: the stream did not start")
        time.sleep(rng.uniform(0.0, 0.3))
        victim = rng.randrange(subscribers + 1)
        sent = board.get(pub, COUNT)
        t_kill = time.monotonic_ns()
        workers.kill(victim)
        t = Trial("publisher" if victim == pub else "subscriber")
        survivors = [r for r in (*subs, pub) if r != victim]
        extra = 0
        if victim == pub:
            for row in survivors:
                board.set(row, TARGET_SEQ, 0)
                board.set(row, TARGET_PID, os.getpid())
            extra = _publish_until(probe, topic, board, survivors, t_kill + int(DEADLINE * 1e9))
        else:
            for row in survivors:
                board.set(row, TARGET_SEQ, sent + capacity + 1)
                board.set(row, TARGET_PID, workers.procs[pub].pid)
            wait_for(lambda: all(board.get(r, REACHED_NS) for r in survivors), DEADLINE)
        reached = [board.get(r, REACHED_NS) for r in survivors]
        t.deadlock = not all(reached)
        if not t.deadlock:
            t.recovery_s = (max(reached) - t_kill) / 1e9
        # The end: the publisher stops, the survivors read all it sent, then stop.
        t.crashed += len(workers.stop([pub])) if victim != pub else 0
        expected = board.get(pub, COUNT) + extra  # a killed publisher: maybe 1 more
        readers = [r for r in survivors if r != pub]
        wait_for(lambda: all(board.get(r, COUNT) >= expected for r in readers), DEADLINE, 0.005)
        t.lost = sum(max(0, expected - board.get(r, COUNT)) for r in readers)
        t.crashed += len(workers.stop(readers))
        every = [*subs, pub]
        t.torn = board.total(every, TORN)
        t.gaps = board.total(every, GAPS)
        t.dups = board.total(every, DUPS)
        t.errors = board.total(survivors, ERRORS)
    return t


def _publish_until(
    probe: tensorbus.Client, topic: str, board: Board, rows: list[int], deadline_ns: int
) -> int:
    """After a publisher's kill: publish numbered messages from this process
    (one a millisecond) until every subscriber of ``rows`` received one, or
    the deadline. Returns how many were sent."""
    pid, seq = os.getpid(), 0
    with probe.publisher(topic, timeout=0.05) as pub:
        while time.monotonic_ns() < deadline_ns:
            with contextlib.suppress(tensorbus.BackpressureError):
                pub.send(encode(seq, pid))
                seq += 1
            if all(board.get(r, REACHED_NS) for r in rows):
                break
            time.sleep(0.001)
    return seq
