"""The parameter server and the DDP hook: the wire functions, the server
against plain numpy trainers, and real DDP (gloo, two spawned ranks)
compared step by step with DDP's own allreduce."""

import threading
import time

import numpy as np
import pytest

import tensorbus
from tensorbus.clients import ps_wire as W
from tensorbus.clients.ps import ParameterServer

from conftest import read_line
from ddp_jobs import ddp_procs, free_port, outcome, servers, stop_server, train

pytestmark = pytest.mark.timeout(120)


# -- the wire ----------------------------------------------------------------


def test_meta_round_trip_and_errors():
    raw = W.encode_meta(7, 3, 1, 4, 1, W.KIND_GRAD, 123456)
    assert len(raw) == 32
    assert W.decode_meta(raw) == W.Meta(7, 3, 1, 4, 1, W.KIND_GRAD, 123456)
    with pytest.raises(ValueError, match="without parameter-server meta"):
        W.decode_meta(b"short")
    with pytest.raises(ValueError, match="kind"):
        W.decode_meta(W.encode_meta(0, 0, 0, 1, 0, 9, 1))
    with pytest.raises(ValueError, match="chunk 5 of 2"):
        W.decode_meta(W.encode_meta(0, 0, 5, 2, 0, W.KIND_GRAD, 1))
    with pytest.raises(ValueError, match="one topic level"):
        W.validate_job("a/b")


@pytest.mark.parametrize("numel", [1, 7, 1000, 1_000_003])
def test_chunks_cover_the_bucket(numel):
    n = W.nchunks_of(numel, 4, 64 * 1024)
    bounds = [W.chunk_bounds(numel, n, c) for c in range(n)]
    assert bounds[0][0] == 0 and bounds[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_chunks_spread_evenly_over_shards():
    counts = [0, 0, 0]
    for chunk in range(30):
        counts[W.shard_of(2, chunk, 3)] += 1
    assert counts == [10, 10, 10]
    assert {W.shard_of(b, 0, 3) for b in range(3)} == {0, 1, 2}  # small buckets by index


# -- the server against numpy trainers ----------------------------------------


def _contribute(client, job, shard, rank, step, data, nchunks=1, chunk=0, bucket=0):
    pub = client.publisher(W.grad_topic(job, shard))
    pub.send(
        data,
        meta=W.encode_meta(step, bucket, chunk, nchunks, rank, W.KIND_GRAD, data.size),
    )


@pytest.fixture
def server_thread():
    servers = []

    def start(*args, **kwargs):
        server = ParameterServer(*args, **kwargs)
        thread = threading.Thread(target=server.serve, daemon=True)
        thread.start()
        servers.append((server, thread))
        return server

    yield start
    for server, thread in servers:
        server.stop()
        thread.join(5)
        server.close()


def test_sync_server_sums_in_rank_order(daemon, server_thread):
    server = server_thread("j", 0, 1, 3, url=daemon.url)
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal(50_000).astype(np.float32) / 3 for _ in range(3)]
    with tensorbus.connect(daemon.url) as c, c.subscribe(W.agg_pattern("j")) as sub:
        for rank in (2, 0, 1):  # any arrival order
            _contribute(c, "j", 0, rank, 0, parts[rank])
        msg = sub.recv(timeout=10)
        meta = W.decode_meta(msg.meta)
        assert meta.kind == W.KIND_AGG and meta.rank == W.ALL_RANKS and meta.step == 0
        expect = parts[0] + parts[1]
        expect += parts[2]
        assert np.array_equal(msg.data, expect)  # bitwise: the same order every time
        assert msg.zero_copy
    assert server.stats["aggregates"] == 1


def test_sync_server_reports_a_missing_trainer(daemon, server_thread):
    server_thread("j2", 0, 1, 2, url=daemon.url, timeout=0.5)
    with tensorbus.connect(daemon.url) as c, c.subscribe(W.agg_pattern("j2")) as sub:
        _contribute(c, "j2", 0, 0, 0, np.ones(10, dtype=np.float32))
        msg = sub.recv(timeout=10)
        meta = W.decode_meta(msg.meta)
        assert meta.kind == W.KIND_ERROR
        assert "rank(s) 1 sent no gradient for step 0" in bytes(msg.data).decode()


def test_async_server_bounds_staleness(daemon, server_thread):
    server = server_thread("ja", 0, 1, 2, "async", staleness=1, url=daemon.url, timeout=30)
    with tensorbus.connect(daemon.url) as c, c.subscribe(W.agg_pattern("ja")) as sub:
        for step in range(3):  # rank 0 runs ahead
            _contribute(c, "ja", 0, 0, step, np.full(8, step + 1, dtype=np.float32))
        _contribute(c, "ja", 0, 1, 0, np.full(8, 10, dtype=np.float32))
        got = []
        while True:
            try:
                got.append(sub.recv(timeout=0.5))
            except tensorbus.ReceiveTimeout:
                break
        answered = sorted((W.decode_meta(m.meta).rank, W.decode_meta(m.meta).step) for m in got)
        # Rank 0's step 2 waits: rank 1 is 2 steps behind it (staleness 1).
        assert answered == [(0, 0), (0, 1), (1, 0)]
        _contribute(c, "ja", 0, 1, 1, np.full(8, 20, dtype=np.float32))
        later = [sub.recv(timeout=5) for _ in range(2)]
        answered = sorted((W.decode_meta(m.meta).rank, W.decode_meta(m.meta).step) for m in later)
        assert answered == [(0, 2), (1, 1)]
        # The mean of the latest of each: rank 0's step 2 (3) and rank 1's step 1 (20).
        assert all(np.all(m.data == 23) for m in later)
    assert server.stats["max_lead"] <= 1


class _Bucket:
    """What ps_hook reads of DDP's GradBucket."""

    def __init__(self, tensor):
        self.tensor = tensor

    def buffer(self):
        return self.tensor

    def index(self):
        return 0

    def is_last(self):
        return True


@pytest.mark.parametrize("answer", ["short", "ok"])
def test_a_malformed_aggregate_fails_the_bucket_with_a_sentence(daemon, answer):
    """A shard that answers a bucket with the wrong number of elements
    fails the trainer's future at once, saying so; a right answer in one
    arena block completes it uncopied."""
    torch = pytest.importorskip("torch")
    from tensorbus.clients.ddp import PSHookState

    numel = 50_000  # 200 KB: one chunk, in an arena block
    with tensorbus.connect(daemon.url, name="bad-shard") as shard:
        grads = shard.subscribe(W.grad_topic("bad", 0))
        state = PSHookState("bad", 0, 1, url=daemon.url, timeout=30, chunk_bytes=1 << 20)
        try:
            future = state._send(_Bucket(torch.ones(numel)))
            got = grads.recv(timeout=10)
            meta = W.decode_meta(got.meta)
            body = np.full(numel - 1 if answer == "short" else numel, 7, dtype=np.float32)
            agg = W.encode_meta(meta.step, 0, 0, 1, W.ALL_RANKS, W.KIND_AGG, body.size)
            shard.publisher(W.agg_topic("bad", 0)).send(body, meta=agg)
            if answer == "short":
                with pytest.raises(RuntimeError, match="1 chunk.s. of 49999 elements"):
                    future.wait()
            else:
                assert torch.equal(future.wait(), torch.full((numel,), 7.0))
                assert state.buckets_uncopied == 1
        finally:
            state.close()


# -- real DDP -----------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """Parameters after each step with DDP's own allreduce (no hook)."""
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("baseline")
    with ddp_procs() as start:
        return train(start, tmp, "allreduce")


@pytest.mark.parametrize("shards", [1, 2])
def test_ps_hook_gives_the_allreduce_result(daemon, procs_ddp, tmp_path, baseline, shards):
    import torch

    servers(procs_ddp, daemon.url, f"s{shards}", shards)
    got = train(procs_ddp, tmp_path, "hook", "--url", daemon.url, "--job", f"s{shards}",
                "--shards", str(shards))  # fmt: skip
    assert len(got["params"]) == len(baseline["params"]) == 6
    for step, (a, b) in enumerate(zip(got["params"], baseline["params"], strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"step {step}")
    # A bucket of one chunk in an arena block went to DDP as it came (the
    # large one, in 64 KiB chunks, was copied together), same result.
    assert got["uncopied"] > 0


@pytest.mark.parametrize("compression", ["fp16", "bf16"])
def test_compressed_hooks_stay_close(daemon, procs_ddp, tmp_path, baseline, compression):
    import torch

    servers(procs_ddp, daemon.url, compression, 2)
    got = train(procs_ddp, tmp_path, compression, "--url", daemon.url, "--job", compression,
                "--shards", "2", "--compression", compression)  # fmt: skip
    tol = 1e-2 if compression == "fp16" else 5e-2
    for a, b in zip(got["params"], baseline["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert got["losses"][-1] < got["losses"][0]


def test_async_mode_trains_within_its_staleness(daemon, procs_ddp, tmp_path):
    (server,) = servers(procs_ddp, daemon.url, "as", 1, "--mode", "async", "--staleness", "2")
    got = train(procs_ddp, tmp_path, "async", "--url", daemon.url, "--job", "as", steps=10)
    assert got["losses"][-1] < got["losses"][0]
    stats = stop_server(server)
    assert stats["aggregates"] > 0 and stats["max_lead"] <= 2


def _rank0_with_rank1_stalled(procs_ddp, tmp_path, url, job, steps, timeout) -> str:
    """Train rank 0 while rank 1 stops before step 2; rank 0's outcome."""
    port, out = free_port(), str(tmp_path / f"{job}.pt")
    common = ["--port", str(port), "--out", out, "--url", url, "--job", job,
              "--steps", str(steps), "--timeout", str(timeout)]  # fmt: skip
    ok = procs_ddp("--rank", "0", *common)
    stalled = procs_ddp("--rank", "1", "--stall-at", "2", *common)
    for r in (ok, stalled):
        assert read_line(r, 60) == "ready"
    return outcome(ok)


def test_async_mode_goes_on_without_a_stalled_trainer(daemon, procs_ddp, tmp_path):
    (server,) = servers(procs_ddp, daemon.url, "ad", 1, "--mode", "async", "--staleness", "1",
                         "--timeout", "1")  # fmt: skip
    line = _rank0_with_rank1_stalled(procs_ddp, tmp_path, daemon.url, "ad", 8, 20)
    assert line.startswith("done"), line
    assert stop_server(server)["dropped_ranks"] == 1


def test_a_killed_server_fails_the_trainers_clearly(daemon, procs_ddp, tmp_path):
    (server,) = servers(procs_ddp, daemon.url, "k", 1)
    ranks, _ = train(procs_ddp, tmp_path, "k", "--url", daemon.url, "--job", "k",
                      "--timeout", "2", "--steps", "200", wait=False)  # fmt: skip
    for r in ranks:
        assert read_line(r, 60) == "ready"
    assert read_line(ranks[0], 60).startswith("step")
    server.kill()
    t0 = time.monotonic()
    for r in ranks:
        line = outcome(r)
        assert line.startswith("error") and "parameter-server shard(s) 0" in line, line
    assert time.monotonic() - t0 < 15


def test_a_stalled_trainer_fails_the_other_clearly(daemon, procs_ddp, tmp_path):
    servers(procs_ddp, daemon.url, "st", 1, "--timeout", "1")
    line = _rank0_with_rank1_stalled(procs_ddp, tmp_path, daemon.url, "st", 5, 10)
    assert line.startswith("error") and "rank(s) 1 sent no gradient for step 2" in line, line
