"""A PyTorch DDP communication hook that averages gradients through
tensorbus parameter servers instead of an allreduce.

    state = PSHookState("job1", rank, world_size, num_shards=2)
    ddp_model.register_comm_hook(state, ps_hook)

The contract of ``torch.distributed.algorithms.ddp_comm_hooks``: ``ps_hook``
returns a future holding a tensor shaped like ``bucket.buffer()``, already
averaged. For each chunk of the bucket (clients/ps_wire.py) the hook loans
an arena block, scales the gradient by ``1/world_size`` while copying it in
(and compresses it to fp16 or bf16 if asked, with optional error feedback),
and sends it to the chunk's shard with no further copy. A background
receiver thread reads the aggregates, copies each into ``bucket.buffer()``
(widening compressed ones) and completes the future once every chunk has
arrived, so the training thread never waits in a loop of its own. A bucket
that is one uncompressed chunk comes back whole in one arena block: the
future holds that block as it is, and DDP's own copy into the gradients is
the only one (``chunk_bytes`` at least DDP's bucket size makes every
bucket so, at the price of spreading no bucket over several shards). The hook
needs no process group for its traffic; gloo may be present for DDP itself.

If no aggregate arrives within ``timeout`` seconds, or a parameter server
reports that a trainer went silent, the future fails with a sentence and
``backward()`` raises it.
"""

from __future__ import annotations

import threading
import time

import numpy as np

import tensorbus
from tensorbus.clients.ps_wire import (
    ALL_RANKS,
    DEFAULT_CHUNK_BYTES,
    KIND_AGG,
    KIND_ERROR,
    KIND_GRAD,
    agg_pattern,
    chunk_bounds,
    decode_meta,
    encode_meta,
    grad_topic,
    nchunks_of,
    shard_of,
    validate_job,
)

__all__ = ["COMPRESSIONS", "PSHookState", "ps_hook"]

COMPRESSIONS = (None, "fp16", "bf16")


class _Pending:
    __slots__ = ("future", "buffer", "view", "left", "started", "nchunks")

    def __init__(self, future, buffer, nchunks):
        self.future = future
        self.buffer = buffer
        self.view = buffer.numpy()
        self.left = set(range(nchunks))
        self.nchunks = nchunks
        self.started = time.monotonic()


class PSHookState:
    """What ``ps_hook`` needs between calls: its own tensorbus client, the
    job, rank and world size, one publisher per shard, the receiver thread
    and the error-feedback residuals. ``close()`` when training is done."""

    __slots__ = (
        "job",
        "rank",
        "world_size",
        "num_shards",
        "compression",
        "error_feedback",
        "chunk_bytes",
        "timeout",
        "iteration",
        "client",
        "_pubs",
        "_sub",
        "_pending",
        "_lock",
        "_failed",
        "_residuals",
        "_stop",
        "_thread",
        "bytes_sent",
        "buckets_uncopied",
    )

    def __init__(
        self,
        job: str,
        rank: int,
        world_size: int,
        *,
        url: str | None = None,
        num_shards: int = 1,
        compression: str | None = None,
        error_feedback: bool = True,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        timeout: float = 60.0,
    ):
        import torch  # noqa: F401  (this module is for torch users; fail early without it)

        validate_job(job)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, not {rank}")
        if num_shards < 1:
            raise ValueError(f"num_shards must be at least 1, not {num_shards}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, not {compression!r}")
        self.job, self.rank, self.world_size = job, rank, world_size
        self.num_shards, self.compression = num_shards, compression
        self.error_feedback = error_feedback and compression is not None
        self.chunk_bytes, self.timeout = chunk_bytes, timeout
        self.iteration = 0
        self.bytes_sent = 0
        self.buckets_uncopied = 0  # buckets handed to DDP as their arena block
        self._pending: dict[tuple[int, int], _Pending] = {}
        self._lock = threading.Lock()
        self._failed: str | None = None
        self._residuals: dict[int, torch.Tensor] = {}
        # The receiver thread sleeps, never spins: the cores are the trainer's.
        self.client = tensorbus.connect(
            url, name=f"ddp-{job}-rank{rank}", timeout=timeout, spin_us=0
        )
        try:
            # Subscribed before anything is sent: no aggregate can be missed.
            self._sub = self.client.subscribe(agg_pattern(job))
            self._pubs = [
                self.client.publisher(grad_topic(job, s), timeout=timeout)
                for s in range(num_shards)
            ]
            self._wait_for_servers()
        except BaseException:
            self.client.close()
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._receive, name=f"tensorbus-ddp-{job}-{rank}", daemon=True
        )
        self._thread.start()

    def _wait_for_servers(self) -> None:
        """A gradient published before its server subscribed would be lost:
        wait until every shard's topic has a subscriber."""
        deadline = time.monotonic() + self.timeout
        while True:
            topics = {t["name"]: t for t in self.client.topics(f"grad/{self.job}/*")}
            missing = [
                s
                for s in range(self.num_shards)
                if topics.get(grad_topic(self.job, s), {}).get("subscribers", 0) < 1
            ]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise tensorbus.BrokerError(
                    f"no parameter server for job {self.job!r} shard(s) "
                    f"{', '.join(map(str, missing))} within {self.timeout:g} s: start "
                    f"`tensorbus ps --job {self.job} --shard I --num-shards {self.num_shards} "
                    f"--world-size {self.world_size}`",
                    "unavailable",
                )
            time.sleep(0.05)

    # -- sending (the training thread) -------------------------------------

    def _send(self, bucket) -> object:
        import torch

        future: torch.futures.Future = torch.futures.Future()
        if self._failed:
            future.set_exception(RuntimeError(self._failed))
            return future
        buffer = bucket.buffer()
        if buffer.dtype != torch.float32 or buffer.device.type != "cpu":
            future.set_exception(
                TypeError(
                    f"ps_hook averages float32 CPU buckets, not {buffer.dtype} on {buffer.device}"
                )
            )
            return future
        index, step, numel = bucket.index(), self.iteration, buffer.numel()
        wire = {None: "float32", "fp16": "float16", "bf16": "bfloat16"}[self.compression]
        itemsize = 4 if self.compression is None else 2
        nchunks = nchunks_of(numel, itemsize, self.chunk_bytes)
        with self._lock:
            self._pending[(step, index)] = _Pending(future, buffer, nchunks)
        flat = buffer.detach()
        scale = 1.0 / self.world_size
        if self.error_feedback:
            residual = self._residuals.get(index)
            if residual is None or residual.numel() != numel:
                residual = self._residuals[index] = torch.zeros_like(flat)
        for chunk in range(nchunks):
            start, stop = chunk_bounds(numel, nchunks, chunk)
            pub = self._pubs[shard_of(index, chunk, self.num_shards)]
            loan = pub.loan(stop - start, wire)
            part = flat[start:stop]
            if self.compression is None:
                # One pass: scale by 1/W while copying into the arena.
                np.multiply(part.numpy(), np.float32(scale), out=loan)
            else:
                target = torch.from_numpy(loan) if isinstance(loan, np.ndarray) else loan
                if self.error_feedback:
                    r = residual[start:stop]
                    r.add_(part, alpha=scale)  # what should be sent, with last step's error
                    target.copy_(r)
                    r.sub_(target.float())  # the rounding error, carried to the next step
                else:
                    target.copy_(part * scale)
            pub.send(
                loan,
                meta=encode_meta(step, index, chunk, nchunks, self.rank, KIND_GRAD, numel),
            )
            self.bytes_sent += (stop - start) * itemsize
        if bucket.is_last():
            self.iteration += 1
        return future

    # -- receiving (the background thread) ---------------------------------

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._sub.recv(timeout=0.2)
            except tensorbus.ReceiveTimeout:
                msg = None
            except tensorbus.ClientClosed:
                return
            except Exception as exc:  # the broker went away, eviction...
                self._fail(f"the parameter-server receiver stopped: {exc}")
                return
            if msg is not None:
                try:
                    self._on_aggregate(msg)
                except (ValueError, TypeError, tensorbus.TensorbusError) as exc:
                    # A shard's malformed answer: fail now, with what was
                    # wrong, rather than let the bucket wait out the timeout.
                    self._fail(f"an aggregate on {msg.topic!r} could not be used: {exc}")
                    return
            self._check_timeouts()

    def _on_aggregate(self, msg) -> None:
        try:
            meta = decode_meta(msg.meta)
        except ValueError:
            return
        if meta.kind == KIND_ERROR:
            self._fail(bytes(msg.data).decode(errors="replace"))
            return
        if meta.kind != KIND_AGG or meta.rank not in (ALL_RANKS, self.rank):
            return  # async mode: another trainer's answer
        with self._lock:
            pending = self._pending.get((meta.step, meta.bucket))
        if pending is None or meta.chunk not in pending.left:
            return
        if meta.numel != pending.view.size or meta.nchunks != pending.nchunks:
            raise ValueError(
                f"step {meta.step} bucket {meta.bucket} came back as {meta.nchunks} chunk(s) of "
                f"{meta.numel} elements, but it has {pending.view.size} in {pending.nchunks}"
            )
        start, stop = chunk_bounds(meta.numel, meta.nchunks, meta.chunk)
        target = pending.view[start:stop]
        if msg.data.shape != target.shape:
            raise ValueError(
                f"chunk {meta.chunk} of step {meta.step} bucket {meta.bucket} holds "
                f"{msg.data.shape} elements, not {target.shape}"
            )
        result = pending.buffer
        if pending.nchunks == 1 and msg.dtype == "<f4" and msg.zero_copy:
            # The whole bucket in one arena block: DDP copies it into the
            # gradients itself, so hand it over as it is (no copy here).
            # The block stays held while DDP's views of it live; DDP only
            # reads them (other trainers of this host read the same block).
            result = msg.as_torch()
            self.buckets_uncopied += 1
        else:
            if msg.dtype == "<f4":
                np.copyto(target, msg.data)
            else:  # widen fp16/bf16 (torch converts several times faster than numpy)
                pending.buffer[start:stop].copy_(msg.as_torch())
            msg.release()
        pending.left.discard(meta.chunk)
        if not pending.left:
            with self._lock:
                self._pending.pop((meta.step, meta.bucket), None)
            pending.future.set_result(result)

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [(key, p) for key, p in self._pending.items() if now - p.started > self.timeout]
        for (step, index), p in late:
            shards = sorted({shard_of(index, c, self.num_shards) for c in p.left})
            self._fail(
                f"no aggregate of step {step} bucket {index} from parameter-server shard(s) "
                f"{', '.join(map(str, shards))} of job {self.job!r} within {self.timeout:g} s "
                "(is `tensorbus ps` running, and every trainer alive?)"
            )
            return

    def _fail(self, text: str) -> None:
        """Fail every pending future, and every later call, with ``text``."""
        with self._lock:
            self._failed = self._failed or text
            pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            if not p.future.done():
                p.future.set_exception(RuntimeError(self._failed))

    def close(self) -> None:
        """Stop the receiver and close the client."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(2.0)
        self._fail("the PSHookState was closed")
        self.client.close()

    def __enter__(self) -> PSHookState:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ps_hook(state: PSHookState, bucket):
    """``(state, bucket) -> Future[Tensor]``: average ``bucket`` through the
    parameter servers of ``state.job``; register with
    ``ddp_model.register_comm_hook(state, ps_hook)``."""
    return state._send(bucket)
