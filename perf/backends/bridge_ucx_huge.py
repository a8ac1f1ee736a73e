"""``bridge-ucx`` with both daemons' arenas on huge pages
(``--arena-hugepages``): UCX reads and writes the arena blocks on 2 MiB
pages. Needs a hugetlbfs mount (``$TENSORBUS_PERF_HUGEPAGES``, else the
first one) with free pages for two arenas: docs/operations.md."""

from backends import bridged
from backends.bus import hugepages_missing
from backends.ucx import missing as ucx_missing

NAME = "bridge-ucx-huge"


def missing() -> str | None:
    return ucx_missing() or hugepages_missing()


def lat(size: int, count: int, warmup: int) -> list[int]:
    return bridged.lat("ucx", size, count, warmup, hugepages=True)


def thr(size: int, count: int) -> tuple[int, float]:
    return bridged.thr("ucx", size, count, hugepages=True)
