"""perf.py's ``--plot``: one PNG per run, drawn with matplotlib's Agg backend
(no display needed). perf.py imports this module only when ``--plot`` is
given, so a measurement never loads matplotlib.

* lat: each backend's round-trip CDF on a log x axis, p50 and p99 marked;
* thr: one bar per backend (GB/s from 64 KiB up, msgs/s below), with the
  table's ratio written on each bar;
* ddp: one bar per backend, the step time, with the table's ratio.
"""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
from progress import short  # noqa: E402

LARGE = 64 << 10  # from this size on, bytes per second say more than messages
FIGSIZE = (9, 5.5)
DPI = 120


def size_text(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def _save(fig, ax, path: str, title: str, machine: str) -> None:
    ax.set_title(f"{title}\n{machine}", fontsize=10)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def lat_cdf(path: str, records: list[dict], samples: dict, machine: str) -> None:
    """The CDF of each backend's round trips (``samples[name]``, ns)."""
    fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
    for r in records:
        us = np.sort(np.asarray(samples[r["backend"]], dtype=np.float64)) / 1e3
        fraction = np.arange(1, len(us) + 1) / len(us)
        (line,) = ax.plot(
            us,
            fraction,
            drawstyle="steps-post",
            label=f"{r['backend']}: p50 {short(r['p50_us'])} us, p99 {short(r['p99_us'])} us",
        )
        ax.plot([r["p50_us"], r["p99_us"]], [0.5, 0.99], "o", color=line.get_color())
    for level, name in ((0.5, "p50"), (0.99, "p99")):
        ax.axhline(level, color="grey", linestyle=":", linewidth=0.8)
        ax.annotate(name, (0, level), xycoords=("axes fraction", "data"), xytext=(3, 3),
                    textcoords="offset points", color="grey", fontsize=8)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("round trip, us (log scale)")
    ax.set_ylabel("fraction of round trips at most x")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    base = records[0]
    title = f"round trip, {size_text(base['size'])} ({base['samples']} samples per backend)"
    _save(fig, ax, path, title, machine)


def _bars(ax, names, values, unit, ratios) -> None:
    bars = ax.bar(names, values, color=[f"C{i}" for i in range(len(names))])
    for bar, value, ratio in zip(bars, values, ratios, strict=True):
        ax.annotate(
            f"{short(value)} {unit}\n{ratio:#.3g}x",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    positive = [v for v in values if v > 0]
    if positive and max(positive) > 50 * min(positive):
        ax.set_yscale("log")  # else the small bars vanish beside a large one
    else:
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: short(y)))  # no "1e6" offset
    ax.margins(y=0.15)
    ax.grid(True, axis="y", which="both", alpha=0.3)


def thr_bars(path: str, records: list[dict], machine: str) -> None:
    """Each backend's one-way rate, with the table's ratio (first / backend)."""
    base = records[0]
    large = base["size"] >= LARGE
    key, unit = ("gb_per_s", "GB/s") if large else ("msgs_per_s", "msgs/s")
    names = [r["backend"] for r in records]
    values = [r[key] for r in records]
    fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
    _bars(ax, names, values, unit, [base[key] / v for v in values])
    ax.set_ylabel(f"{unit}, higher is faster")
    ax.set_xlabel(
        f"ratio on each bar: {base['backend']} / backend (above 1: {base['backend']} is faster)"
    )
    title = f"one way, {size_text(base['size'])} messages (median of {base['runs']} runs)"
    _save(fig, ax, path, title, machine)


def ddp_bars(path: str, records: list[dict], machine: str) -> None:
    """Each backend's DDP step time, with the table's ratio (backend / first)."""
    base = records[0]
    names = [r["backend"] for r in records]
    values = [r["step_ms"] for r in records]
    fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
    _bars(ax, names, values, "ms", [v / base["step_ms"] for v in values])
    ax.set_ylabel("step time, ms, lower is faster")
    ax.set_xlabel(f"ratio on each bar: backend / {base['backend']} (below 1: faster)")
    title = (
        f"DDP step, 2 trainers, MLP of {base['params'] / 1e6:.1f} M parameters "
        f"(median of {base['runs']} runs)"
    )
    _save(fig, ax, path, title, machine)
