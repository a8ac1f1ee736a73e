"""The parameter server: shard ``i`` of ``S`` averages the gradients of
``world_size`` trainers for the chunks assigned to it (clients/ps_wire.py).

Trainers scale their gradients by ``1/world_size`` while copying them into
arena loans, so the server only adds. It adds in rank order with
``np.add(..., out=)`` straight into an arena loan of its own, publishes it
with no copy, and every trainer reads the same bytes.

* ``sync``: each (step, bucket, chunk) waits for all ``world_size``
  contributions, then the sum goes to every trainer: what an allreduce
  gives. A trainer that sends nothing for ``timeout`` seconds makes the
  server publish an error for that step, so the others fail with a sentence
  instead of hanging.
* ``async`` with staleness ``K``: each contribution is answered, for its
  sender only, with the mean of the latest contribution of every live
  trainer, as soon as no live trainer is more than ``K`` steps behind the
  sender. A trainer silent for ``timeout`` seconds is dropped from the
  mean, and the others go on without it.

The server holds its inputs as arena views (no copy in), keeps float32
scratch for half-precision sums, and allocates nothing else per step once
warm. It never spins: it sleeps in ``recv`` between messages.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

import tensorbus
from tensorbus.clients.ps_wire import (
    ALL_RANKS,
    KIND_AGG,
    KIND_ERROR,
    KIND_GRAD,
    agg_topic,
    decode_meta,
    encode_meta,
    grad_topic,
    validate_job,
)

__all__ = ["MODES", "ParameterServer"]

log = logging.getLogger("tensorbus.ps")

MODES = ("sync", "async")
POLL_S = 0.2  # how often a quiet server checks for stalled steps and silent trainers


@dataclass
class _Step:
    """The contributions to one (step, bucket, chunk) so far (sync mode)."""

    msgs: list
    nchunks: int
    numel: int
    first_seen: float
    count: int = 0


@dataclass
class _Latest:
    """Async mode: each rank's latest contribution to one chunk of a layout."""

    msgs: dict = field(default_factory=dict)  # rank -> (step, Message, Meta)


class ParameterServer:
    """Shard ``shard`` of ``num_shards`` for job ``job``.

    ``serve()`` runs until ``stop()`` (from another thread or a signal
    handler) or until ``max_aggregates`` sums were published."""

    def __init__(
        self,
        job: str,
        shard: int,
        num_shards: int,
        world_size: int,
        mode: str = "sync",
        *,
        staleness: int = 0,
        url: str | None = None,
        timeout: float = 30.0,
        name: str | None = None,
    ):
        validate_job(job)
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in 0..{num_shards - 1}, not {shard}")
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, not {world_size}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, not {staleness}")
        self.job, self.shard, self.num_shards = job, shard, num_shards
        self.world_size, self.mode, self.staleness = world_size, mode, staleness
        self.timeout = timeout
        # It holds every input of a step until the step is complete (W per
        # chunk in flight): no per-client cap below the arena's own size.
        # It never spins (it shares the cores with the trainers).
        self.client = tensorbus.connect(
            url, name=name or f"ps-{job}-{shard}", max_holds=1 << 20, spin_us=0
        )
        self._sub = self.client.subscribe(grad_topic(job, shard))
        self._pub = self.client.publisher(agg_topic(job, shard), timeout=timeout)
        self._stop = threading.Event()
        self._steps: dict[tuple, _Step] = {}
        self._latest: dict[tuple, _Latest] = {}
        self._waiting: list[tuple] = []  # async: (rank, step, bucket, chunk) not yet answered
        self._rank_step = dict.fromkeys(range(world_size), -1)  # async: newest step per rank
        self._rank_seen = dict.fromkeys(range(world_size), time.monotonic())
        self._dead: set[int] = set()
        self._scratch: dict[tuple, np.ndarray] = {}  # (numel, which) -> float32 buffer
        self.stats = {
            "contributions": 0,
            "aggregates": 0,
            "errors": 0,
            "max_lead": 0,  # async: most steps a sender was ahead of the slowest live rank
            "dropped_ranks": 0,
        }

    # -- running -------------------------------------------------------------

    def serve(self, max_aggregates: int | None = None) -> None:
        """Aggregate until :meth:`stop` (or ``max_aggregates`` published)."""
        while not self._stop.is_set():
            if max_aggregates is not None and self.stats["aggregates"] >= max_aggregates:
                return
            try:
                msg = self._sub.recv(timeout=POLL_S)
            except tensorbus.ReceiveTimeout:
                msg = None
            except tensorbus.HoldLimitError as exc:  # cannot happen below the arena's size
                log.error("job %s shard %d: %s", self.job, self.shard, exc)
                msg = None
            try:
                if msg is not None:
                    self._on_message(msg)
                self._check_time()
            except tensorbus.TensorbusError as exc:  # a trainer gone mid-send, a full arena...
                log.error("job %s shard %d: %s", self.job, self.shard, exc)
                self.stats["errors"] += 1

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        self._steps.clear()
        self._latest.clear()
        self.client.close()

    def __enter__(self) -> ParameterServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- messages ------------------------------------------------------------

    def _on_message(self, msg) -> None:
        try:
            meta = decode_meta(msg.meta)
        except ValueError as exc:
            log.warning("ignored a message on %s: %s", msg.topic, exc)
            return
        if meta.kind != KIND_GRAD or not 0 <= meta.rank < self.world_size:
            log.warning("ignored a message of kind %d from rank %d", meta.kind, meta.rank)
            return
        self.stats["contributions"] += 1
        if self.mode == "sync":
            self._sync(meta, msg)
        else:
            self._async(meta, msg)

    def _sync(self, meta, msg) -> None:
        key = (meta.step, meta.bucket, meta.chunk)
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = _Step(
                [None] * self.world_size, meta.nchunks, meta.numel, time.monotonic()
            )
        if step.msgs[meta.rank] is not None:
            log.warning("duplicate contribution of rank %d to %s ignored", meta.rank, key)
            return
        step.msgs[meta.rank] = msg
        step.count += 1
        if step.count == self.world_size:
            del self._steps[key]
            self._publish(step.msgs, meta, ALL_RANKS, 1.0)
            for m in step.msgs:
                m.release()

    def _async(self, meta, msg) -> None:
        rank = meta.rank
        now = time.monotonic()
        self._rank_seen[rank] = now
        if rank in self._dead:
            log.warning("rank %d is back after being dropped", rank)
            self._dead.discard(rank)
        self._rank_step[rank] = max(self._rank_step[rank], meta.step)
        # Keyed by layout too: DDP rebuilds its buckets after the first step,
        # and contributions of different layouts cannot be averaged.
        key = (meta.bucket, meta.chunk, meta.nchunks, meta.numel)
        if key not in self._latest:
            # A new layout of this bucket (DDP rebuilt it): this rank's inputs
            # in the old ones are no longer wanted; let their blocks go.
            layout = (meta.nchunks, meta.numel)
            for old in [k for k in self._latest if k[0] == meta.bucket and k[2:] != layout]:
                self._latest[old].msgs.pop(rank, None)
                if not self._latest[old].msgs and not any(w[2] == old for w in self._waiting):
                    del self._latest[old]
        latest = self._latest.setdefault(key, _Latest())
        latest.msgs[rank] = (meta.step, msg, meta)
        self._waiting.append((rank, meta.step, key))
        self._answer_async()

    def _answer_async(self) -> None:
        live = [r for r in range(self.world_size) if r not in self._dead]
        slowest = min((self._rank_step[r] for r in live), default=0)
        keep = []
        for rank, step, key in self._waiting:
            if step - slowest > self.staleness and rank not in self._dead:
                keep.append((rank, step, key))  # too far ahead: wait for the slowest
                continue
            latest = self._latest[key]
            present = [latest.msgs[r] for r in live if r in latest.msgs] or [latest.msgs[rank]]
            self.stats["max_lead"] = max(self.stats["max_lead"], step - slowest)
            _, _, meta = latest.msgs[rank]
            # Contributions are scaled by 1/world_size; rescale if some are missing
            # (a dropped rank, or one that has not sent this layout yet).
            scale = self.world_size / len(present) if len(present) != self.world_size else 1.0
            self._publish([m for _, m, _ in present], meta._replace(step=step), rank, scale)
        self._waiting = keep

    # -- the sum -------------------------------------------------------------

    def _publish(self, msgs: list, meta, target: int, scale: float) -> None:
        arrays = [m.data for m in msgs]
        tag = msgs[0].dtype
        if any(
            m.dtype != tag or a.shape != arrays[0].shape for m, a in zip(msgs, arrays, strict=True)
        ):
            self._error(meta, "trainers sent different dtypes or sizes for the same chunk")
            return
        n = arrays[0].size
        if tag == "<f4":
            out = self._pub.loan(n, "float32")
            if len(arrays) == 1:
                np.copyto(out, arrays[0])
            else:
                np.add(arrays[0], arrays[1], out=out)
            for a in arrays[2:]:
                np.add(out, a, out=out)
            if scale != 1.0:
                out *= np.float32(scale)
        else:
            out = self._sum_wide(msgs, arrays, tag, n, scale)
        del arrays
        self._pub.send(
            out,
            meta=encode_meta(
                meta.step, meta.bucket, meta.chunk, meta.nchunks, target, KIND_AGG, meta.numel
            ),
        )
        self.stats["aggregates"] += 1

    def _buffer(self, n: int, which: int) -> np.ndarray:
        """Reused float32 scratch of ``n`` elements (``which``: 0 sum, 1 staging)."""
        buf = self._scratch.get((n, which))
        if buf is None:
            buf = self._scratch[(n, which)] = np.empty(n, dtype=np.float32)
        return buf

    def _sum_wide(self, msgs: list, arrays: list, tag: str, n: int, scale: float):
        """Sum half-precision contributions in float32
        scratch, then narrow into a loan of the wire dtype. torch converts
        half floats several times faster than numpy: used when present."""
        acc = self._buffer(n, 0)
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None:
            acc_t, tmp_t = torch.from_numpy(acc), torch.from_numpy(self._buffer(n, 1))
            for i, m in enumerate(msgs):
                src = m.as_torch()  # a view of the arena block (read, never written)
                if i == 0:
                    acc_t.copy_(src)
                else:
                    tmp_t.copy_(src)
                    acc_t.add_(tmp_t)
            if scale != 1.0:
                acc_t.mul_(scale)
            wire = {"<f2": torch.float16, "bfloat16": torch.bfloat16}
            out = self._pub.loan(n, wire.get(tag, torch.float32))
            (out if isinstance(out, torch.Tensor) else torch.from_numpy(out)).copy_(acc_t)
            return out
        if tag == "bfloat16":
            raise tensorbus.TensorbusError("bfloat16 gradients need torch on the parameter server")
        for i, a in enumerate(arrays):
            if i == 0:
                np.copyto(acc, a, casting="same_kind")
            else:
                np.add(acc, a, out=acc, dtype=np.float32)
        if scale != 1.0:
            acc *= np.float32(scale)
        out = self._pub.loan(n, np.dtype(tag))
        np.copyto(out, acc, casting="same_kind")
        return out

    def _error(self, meta, text: str) -> None:
        log.error("job %s shard %d: %s", self.job, self.shard, text)
        self.stats["errors"] += 1
        self._pub.send(
            text.encode(),
            meta=encode_meta(
                meta.step, meta.bucket, meta.chunk, meta.nchunks, ALL_RANKS, KIND_ERROR, meta.numel
            ),
        )

    # -- time ----------------------------------------------------------------

    def _check_time(self) -> None:
        now = time.monotonic()
        if self.mode == "sync":
            for key, step in list(self._steps.items()):
                if now - step.first_seen > self.timeout:
                    missing = [r for r, m in enumerate(step.msgs) if m is None]
                    del self._steps[key]
                    for m in step.msgs:
                        if m is not None:
                            m.release()
                    meta = decode_meta(next(m for m in step.msgs if m is not None).meta)
                    self._error(
                        meta,
                        f"parameter server {self.job}/{self.shard}: rank(s) "
                        f"{', '.join(map(str, missing))} sent no gradient for step {key[0]} "
                        f"bucket {key[1]} within {self.timeout:g} s (dead or stalled?)",
                    )
        else:
            changed = False
            waiting = {rank for rank, _, _ in self._waiting}  # these wait on us, not silent
            for rank, seen in self._rank_seen.items():
                if (
                    self._waiting
                    and rank not in self._dead
                    and rank not in waiting
                    and now - seen > self.timeout
                ):
                    log.warning("rank %d silent for %.0f s: left out of the mean", rank, now - seen)
                    self._dead.add(rank)
                    self.stats["dropped_ranks"] += 1
                    changed = True
            if changed:
                self._answer_async()
