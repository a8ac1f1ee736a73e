"""R2: kill -9 of the daemon: a restart, or a standby's takeover."""

from __future__ import annotations

import os
import random
import socket
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
    FIRST_NS,
    GAPS,
    GO,
    LAST_SEQ,
    MSG_SIZE,
    NO_TOPIC,
    PID,
    READY_NS,
    READY_TIMEOUT,
    TORN,
    Board,
    Broker,
    Report,
    Workers,
    ms,
    note,
    p50_p99,
    wait_for,
)

# --------------------------------------------------------------------- R2


@dataclass
class Restart:
    """What one R2 trial saw."""

    standby: bool
    error: str = ""
    lost: int = 0
    dups: int = 0
    gaps: int = 0
    torn: int = 0
    split: bool = False
    errors: int = 0
    answer_s: float | None = None
    resume_s: float | None = None
    first_s: float | None = None
    leaked: int = 0


def r2(
    trials: int = 20,
    standby_trials: int = 20,
    rate: float = 2_000,
    seed: int | None = None,
    out=sys.stdout,
) -> Report:
    """R2: kill -9 of the daemon mid-stream, then a new daemon on the same
    socket: started after the kill (``trials``), or already waiting as
    ``tensorbus serve --standby`` (``standby_trials``).

    A publisher process streams numbered messages at ``rate``/s on a
    reliable topic to a subscriber process. After a random moment the
    daemon gets SIGKILL; the new one must take over its shared memory and
    the clients must carry on by themselves: the pair must lose and repeat
    nothing. A subscriber that joins after the restart must receive what
    the old publisher sends from then on: none within 5 s while the
    publisher kept sending is a silent split (its process is started
    before the kill and connects once a request is answered, so no Python
    start-up is in its times). Figures: the time from the kill to a
    client's request being answered (a restart includes the new daemon's
    start-up), from the kill to the new subscriber's first message, and
    from its subscribe to that message; errors raised to the clients; and
    what the last daemon left in /dev/shm once stopped."""
    rng = random.Random(seed)
    results: list[Restart] = []
    plan = [False] * trials + [True] * standby_trials
    for i, standby in enumerate(plan):
        t = _r2_trial(standby, rate, rng)
        results.append(t)
        note(
            f"r2 trial {i + 1}/{len(plan)} ({'standby' if standby else 'restart'}): "
            + (
                f"FAILED: {t.error}"
                if t.error
                else f"answered after {ms(t.answer_s)}, new subscriber's first message "
                f"after {ms(t.resume_s)}, lost {t.lost}, dups {t.dups}"
                + (", SILENT SPLIT" if t.split else "")
            )
        )
    report = Report(
        f"R2: kill -9 of the daemon mid-stream ({trials} restarts, {standby_trials} standby "
        f"takeovers; 1 publisher at {rate:,.0f} msgs/s -> 1 subscriber, reliable)"
    )
    report.add("trials", f"{len(results)}")
    failed = [t for t in results if t.error]
    report.count("trials that failed", len(failed), "failed")
    for reason in sorted({t.error for t in failed})[:3]:
        report.add("  failure", reason[-100:])
    report.count("messages lost", sum(t.lost for t in results), "lost")
    report.count("messages duplicated", sum(t.dups for t in results), "dups")
    report.count("gaps (messages skipped)", sum(t.gaps for t in results), "gaps")
    report.count("torn", sum(t.torn for t in results), "torn")
    report.count("silent splits", sum(t.split for t in results), "splits")
    report.count("errors raised to the clients", sum(t.errors for t in results), "errors")
    report.count(
        "leaked segments after the last daemon stopped", sum(t.leaked for t in results), "leaked"
    )
    for standby, label in ((False, "restart"), (True, "standby")):
        answer = [t.answer_s for t in results if t.standby == standby and t.answer_s is not None]
        resume = [t.resume_s for t in results if t.standby == standby and t.resume_s is not None]
        report.figures[f"{label}_answer_s"] = answer
        report.figures[f"{label}_resume_s"] = resume
        report.add(f"{label}: kill to a request answered, p50 / p99", p50_p99(answer))
        first = [t.first_s for t in results if t.standby == standby and t.first_s is not None]
        report.figures[f"{label}_first_s"] = first
        report.add(f"{label}: kill to a new subscriber's first message, p50 / p99", p50_p99(resume))
        report.add(f"{label}: its subscribe to its first message, p50 / p99", p50_p99(first))
    report.print(out)
    return report


def _answered(path: str, timeout: float) -> float | None:
    """When (CLOCK_MONOTONIC) a broker on socket ``path`` answered a stats
    request, trying until ``timeout``; None if none did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(path)  # a stale socket refuses at once
            except OSError:
                time.sleep(0.001)
                continue
        try:
            with tensorbus.connect(f"ipc://{path}", name="rel-probe", timeout=1.0) as client:
                client.stats(NO_TOPIC)
            return time.monotonic()
        except tensorbus.TensorbusError:
            time.sleep(0.001)
    return None


def _r2_trial(standby: bool, rate: float, rng: random.Random) -> Restart:
    topic = "rel/r2/data"
    old, pub, late = 0, 1, 2
    t = Restart(standby)
    brokers: list[Broker] = []
    with tempfile.TemporaryDirectory(prefix="tb-rel-r2-") as folder:
        path = os.path.join(folder, "run", "broker.sock")
        board = Board(os.path.join(folder, "board"), rows=3)
        try:
            with Workers(folder, board) as workers:
                brokers.append(Broker(folder, path=path))
                if standby:
                    brokers.append(Broker(folder, "--standby", path=path, wait=False))
                    if not wait_for(lambda: not brokers[1].alive(), 1.0, 0.05):
                        pass  # still waiting for the lock: as it should
                    else:
                        t.error = f"the standby daemon exited: {brokers[1].why()}"
                        return t
                with tensorbus.connect(brokers[0].url, name="rel-probe") as probe:
                    probe.create_topic(topic, qos="reliable", capacity=1024, slot_size=MSG_SIZE)
                workers.start("sub", old, url=brokers[0].url, pattern=topic)
                workers.wait_ready([old])
                workers.start("pub", pub, url=brokers[0].url, topic=topic, rate=rate)
                workers.start(
                    "sub", late, url=brokers[0].url, pattern=topic, mode="late", wait_go=True
                )
                workers.wait_ready([pub])
                if not wait_for(
                    lambda: board.get(old, COUNT) and board.get(late, PID), READY_TIMEOUT
                ):
                    raise RuntimeError("r2: the stream did not start")
                time.sleep(rng.uniform(0.1, 0.5))
                t_kill = time.monotonic()
                brokers[0].kill()
                if not standby:
                    brokers.append(Broker(folder, path=path, wait=False))
                answered = _answered(path, READY_TIMEOUT)
                if answered is None:
                    t.error = f"no daemon answered within {READY_TIMEOUT:g} s: {brokers[-1].why()}"
                    return t
                t.answer_s = answered - t_kill
                board.set(late, GO, 1)
                workers.wait_ready([late])
                sent_at_join = board.get(pub, COUNT)
                if wait_for(lambda: board.get(late, COUNT) > 0, 5.0):
                    t.resume_s = board.get(late, FIRST_NS) / 1e9 - t_kill
                    t.first_s = (board.get(late, FIRST_NS) - board.get(late, READY_NS)) / 1e9
                elif board.get(pub, COUNT) > sent_at_join:
                    t.split = True
                else:
                    t.error = "the publisher stopped after the restart"
                failed = workers.stop([pub])
                sent = board.get(pub, COUNT)
                wait_for(
                    lambda: (
                        board.get(old, COUNT) >= sent
                        and (t.split or board.get(late, LAST_SEQ) >= sent - 1)
                    ),
                    DEADLINE,
                    0.005,
                )
                t.lost = max(0, sent - board.get(old, COUNT))
                if not t.split and board.get(late, COUNT):
                    t.lost += max(0, sent - 1 - board.get(late, LAST_SEQ))
                t.dups = board.total((old, late), DUPS)
                t.gaps = board.total((old, late), GAPS)
                t.torn = board.total((old, late), TORN)
                t.errors = board.total((old, pub, late), ERRORS)
                failed += workers.stop([old, late])
                if failed and not t.error:
                    t.error = f"worker {failed[0]} failed: {workers.tail(failed[0])[-200:]}"
        finally:
            for b in brokers:
                b.stop()
            if brokers and not t.error:
                t.leaked = len(brokers[-1].leftovers())
            for b in brokers:
                b.unlink()
    return t
