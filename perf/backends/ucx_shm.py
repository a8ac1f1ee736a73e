"""Raw ucxx, both buffers in shared memory (4 KiB pages, as an arena): see
backends/ucx.py for why the memory matters to UCX on one machine."""

from backends import ucx
from backends.ucx import lat, missing  # noqa: F401

NAME = "ucx-shm"


def thr(size: int, count: int) -> tuple[int, float]:
    return ucx.thr(size, count, shm=True)
