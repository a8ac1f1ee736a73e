"""The ``bus`` backend's throughput with the daemon's arena on huge pages
(``tensorbus serve --arena-hugepages``): the publisher's copy into the
arena (np.copyto) runs on 2 MiB pages instead of 4 KiB shm pages. Needs a
hugetlbfs mount (``$TENSORBUS_PERF_HUGEPAGES``, else the first one) with
enough free pages: docs/operations.md."""

from backends import bus

NAME = "bus-huge"


def missing() -> str | None:
    return bus.hugepages_missing()


def lat(size: int, count: int, warmup: int) -> list[int]:
    return bus.lat(size, count, warmup, hugepages=True)


def thr(size: int, count: int) -> tuple[int, float]:
    return bus.thr(size, count, hugepages=True)
