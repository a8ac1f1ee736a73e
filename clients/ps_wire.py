"""What trainers and parameter servers say to each other, as pure functions:
topic names, the 32-byte meta every gradient and aggregate carries, how a
bucket is cut into chunks and the chunks spread over shards.

Topics are per shard, not per bucket (DDP rebuilds its buckets after the
first step): trainers publish on ``grad/<job>/<shard>``, shard ``i``
publishes means on ``agg/<job>/<i>``, and every trainer subscribes to
``agg/<job>/*``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from tensorbus.broker.topics import validate_topic
from tensorbus.clients.meta import MetaCodec

__all__ = [
    "ALL_RANKS",
    "DEFAULT_CHUNK_BYTES",
    "KIND_AGG",
    "KIND_ERROR",
    "KIND_GRAD",
    "Meta",
    "agg_pattern",
    "agg_topic",
    "chunk_bounds",
    "decode_meta",
    "encode_meta",
    "grad_topic",
    "nchunks_of",
    "shard_of",
    "validate_job",
]

KIND_GRAD = 0  # a trainer's contribution (already scaled by 1/world_size)
KIND_AGG = 1  # the parameter server's mean
KIND_ERROR = 2  # the parameter server gave up on a step: data is the sentence
ALL_RANKS = 0xFFFF  # an aggregate for every trainer (sync); else for one rank (async)
DEFAULT_CHUNK_BYTES = 4 << 20  # buckets larger than this are cut and spread over shards


class Meta(NamedTuple):
    step: int  # the trainer's iteration
    bucket: int  # DDP bucket index
    chunk: int
    nchunks: int
    rank: int  # sender (gradients), or target (aggregates; ALL_RANKS for all)
    kind: int
    numel: int  # elements of the whole bucket


# The descriptor's 32 bytes of meta (clients/meta.py).
_CODEC = MetaCodec("<QIIIHBxQ", Meta, (KIND_GRAD, KIND_AGG, KIND_ERROR), "parameter-server")


def encode_meta(
    step: int, bucket: int, chunk: int, nchunks: int, rank: int, kind: int, numel: int
) -> bytes:
    return _CODEC.encode(step, bucket, chunk, nchunks, rank, kind, numel)


def decode_meta(raw: bytes | None) -> Meta:
    """ValueError with a sentence for anything that is not our meta."""
    meta = _CODEC.decode(raw)
    if not 0 <= meta.chunk < max(meta.nchunks, 1):
        raise ValueError(f"chunk {meta.chunk} of {meta.nchunks}")
    return meta


def validate_job(job: str) -> str:
    """A job name is one topic level: letters, digits, '.', '_', '-'."""
    if not isinstance(job, str) or not job or "/" in job:
        raise ValueError(f"a job name is one topic level (no '/'), not {job!r}")
    validate_topic(f"grad/{job}/0")
    return job


def grad_topic(job: str, shard: int) -> str:
    return f"grad/{job}/{shard}"


def agg_topic(job: str, shard: int) -> str:
    return f"agg/{job}/{shard}"


def agg_pattern(job: str) -> str:
    return f"agg/{job}/*"


def nchunks_of(numel: int, itemsize: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """How many chunks a bucket of ``numel`` elements is cut into."""
    return max(1, math.ceil(numel * itemsize / max(chunk_bytes, itemsize)))


def chunk_bounds(numel: int, nchunks: int, chunk: int) -> tuple[int, int]:
    """Element range ``[start, stop)`` of ``chunk``: equal parts, the first
    ``numel % nchunks`` one element longer."""
    base, extra = divmod(numel, nchunks)
    start = chunk * base + min(chunk, extra)
    return start, start + base + (1 if chunk < extra else 0)


def shard_of(bucket: int, chunk: int, num_shards: int) -> int:
    """The shard that aggregates ``chunk`` of ``bucket``: a small bucket goes
    by its index; a large one's chunks go round the shards from there, so
    every shard gets an even share (BytePS-style partitioning)."""
    return (bucket + chunk) % num_shards
