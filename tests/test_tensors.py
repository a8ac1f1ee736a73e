"""Tensors through a real broker: dtypes and shapes, inline and through the
arena, loans, holds, release, exhaustion, and the death of a process that
holds views or an unsent loan."""

import gc
import hashlib
import os
import time

import numpy as np
import pytest

import tensorbus

from conftest import read_line

DTYPES = [
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
]
SHAPES = [(), (0,), (7,), (3, 4), (2, 3, 4), (2, 1, 3, 2), (1, 2, 3, 2, 2)]


def sample(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "b":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    if np.dtype(dtype).kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def arena_used(client):
    return client.stats()["broker"]["arena"]["used"]


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.mark.parametrize("path", ["inline", "arena"])
def test_every_dtype_and_shape_round_trips(daemon, path):
    with tensorbus.connect(daemon.url) as c, c.subscribe("t") as sub:
        pub = c.publisher("t", inline_max=None if path == "inline" else 0)
        sent = []
        for dtype in DTYPES:
            for shape in SHAPES:
                arr = sample(dtype, shape)
                pub.send(arr)
                sent.append(arr)
        for arr in sent:
            msg = sub.recv(timeout=5)
            got = msg.data
            assert isinstance(got, np.ndarray)
            assert got.dtype == arr.dtype and got.shape == arr.shape
            assert np.array_equal(got, arr)
            assert not got.flags.writeable
            assert msg.zero_copy == (path == "arena")
            assert msg.is_tensor
        del msg, got
        gc.collect()
        assert wait_for(lambda: arena_used(c) == 0)


def test_bytes_stay_bytes_at_any_size(daemon):
    with tensorbus.connect(daemon.url) as c, c.subscribe("b") as sub:
        pub = c.publisher("b")
        small, big = b"x" * 100, os.urandom(3 << 20)
        pub.send(small)
        pub.send(big)
        pub.send(bytearray(b"buffer"))
        m1, m2, m3 = (sub.recv(timeout=5) for _ in range(3))
        assert isinstance(m1.data, memoryview) and bytes(m1.data) == small
        assert isinstance(m2.data, memoryview) and m2.data.readonly and m2.zero_copy
        assert bytes(m2) == big and len(m2) == len(big)
        assert bytes(m3.data) == b"buffer" and not m3.is_tensor


def test_meta_travels_with_the_tensor(daemon):
    with tensorbus.connect(daemon.url) as c, c.subscribe("m") as sub:
        pub = c.publisher("m")
        pub.send(np.zeros(4), meta=b"step=7")
        pub.send(np.zeros(100_000), meta=bytes(range(32)))
        assert sub.recv(timeout=5).meta[:6] == b"step=7"
        assert sub.recv(timeout=5).meta == bytes(range(32))
        with pytest.raises(ValueError, match="at most 32"):
            pub.send(np.zeros(4), meta=b"x" * 33)


def test_loan_is_sent_without_a_copy(daemon):
    with tensorbus.connect(daemon.url) as c, c.subscribe("l") as sub:
        pub = c.publisher("l")
        arr = pub.loan((256, 1024), "float32")
        assert arr.flags.writeable and arr.shape == (256, 1024)
        arr[:] = np.arange(1024, dtype=np.float32)
        used = arena_used(c)
        assert used >= arr.nbytes
        pub.send(arr)
        msg = sub.recv(timeout=5)
        assert msg.zero_copy and np.array_equal(msg.data, arr)
        # Same block: the arena did not grow, nothing was copied.
        assert arena_used(c) == used
        # Sending it again copies (the loan belongs to the ring now).
        pub.send(arr)
        again = sub.recv(timeout=5)
        assert np.array_equal(again.data, arr)
        assert arena_used(c) == 2 * used
        del msg, again, arr
        gc.collect()
        assert wait_for(lambda: arena_used(c) == 0)


def test_unsent_loan_returns_its_block(daemon):
    with tensorbus.connect(daemon.url) as c:
        pub = c.publisher("u")
        arr = pub.loan(1 << 20, "uint8")
        assert arena_used(c) >= 1 << 20
        del arr
        gc.collect()
        assert arena_used(c) == 0


def test_non_contiguous_arrays_are_copied_once(daemon):
    with tensorbus.connect(daemon.url) as c, c.subscribe("nc") as sub:
        pub = c.publisher("nc")
        base = sample(np.float64, (300, 400))
        for arr in (base[:, ::3], base.T, base[::2, 1:7]):
            pub.send(arr)
            got = sub.recv(timeout=5).data
            assert got.flags.c_contiguous and np.array_equal(got, arr)


def test_a_one_gib_tensor(daemon_factory):
    d = daemon_factory("--arena-size", "1280MiB")
    with tensorbus.connect(d.url) as c, c.subscribe("huge") as sub:
        pub = c.publisher("huge", timeout=30)
        arr = pub.loan(1 << 28, "float32")  # 1 GiB, filled in place
        arr[::4096] = np.arange(arr.size // 4096, dtype=np.float32)
        arr[-1] = 42.0
        pub.send(arr)
        msg = sub.recv(timeout=30)
        got = msg.data
        assert got.nbytes == 1 << 30 and got.dtype == np.float32
        assert np.array_equal(got[::4096], np.arange(arr.size // 4096, dtype=np.float32))
        assert got[-1] == 42.0
        del arr, got, msg
        gc.collect()
        # And a 1 GiB copy-in of an ordinary array.
        src = np.full(1 << 27, 3, dtype=np.int64)
        pub.send(src)
        msg = sub.recv(timeout=30)
        assert msg.data.shape == src.shape and int(msg.data[12345]) == 3
        assert hashlib.sha256(msg.data[-1000:]).digest() == hashlib.sha256(src[-1000:]).digest()


def test_views_survive_later_sends(daemon_factory, popen):
    """Two subscribers hold views while the publisher keeps sending into a
    small arena: no held block is ever reused under them."""
    d = daemon_factory("--arena-size", "8MiB")
    holders = [popen("holder", d.url, "v", "6") for _ in range(2)]
    for h in holders:
        assert read_line(h) == "ready"
    with tensorbus.connect(d.url) as c:
        pub = c.publisher("v", timeout=10)
        for i in range(6):
            pub.send(np.full(64 * 1024, i, dtype=np.float64))  # 512 KiB each
        for h in holders:
            assert read_line(h, 20) == "held"
        # The holders pin 6 blocks; churn the rest of the arena many times.
        with c.subscribe("churn") as sub:
            churn = c.publisher("churn", timeout=10)
            for i in range(200):
                churn.send(np.full(64 * 1024, -i, dtype=np.float64))
                sub.recv(timeout=5)
    for h in holders:
        h.stdin.write("check\n")
        h.stdin.flush()
        assert read_line(h, 20) == "intact"


def test_release_and_views(daemon):
    with tensorbus.connect(daemon.url) as c, c.subscribe("r") as sub:
        pub = c.publisher("r")
        pub.send(np.ones(1 << 18))
        with sub.recv(timeout=5) as msg:
            assert arena_used(c) > 0
        gc.collect()
        assert arena_used(c) == 0  # the with block released it

        pub.send(np.ones(1 << 18))
        msg = sub.recv(timeout=5)
        view = msg.data[10:20]
        msg.release()
        with pytest.raises(tensorbus.TensorbusError, match="released"):
            msg.data  # noqa: B018
        assert arena_used(c) > 0  # the slice still views the block
        assert view.sum() == 10
        del view
        gc.collect()
        assert arena_used(c) == 0


def test_as_torch_shares_memory(daemon):
    torch = pytest.importorskip("torch")
    with tensorbus.connect(daemon.url) as c, c.subscribe("tt") as sub:
        pub = c.publisher("tt")
        src = torch.randn(512, 256)
        pub.send(src)
        msg = sub.recv(timeout=5)
        t = msg.as_torch()
        assert t.dtype == torch.float32 and t.shape == (512, 256)
        assert torch.equal(t, src)
        assert t.data_ptr() == msg.data.__array_interface__["data"][0]  # no copy
        # bfloat16 in, bfloat16 out (numpy has none: data is its uint16 bits).
        bf = torch.randn(64, 1000).to(torch.bfloat16)
        pub.send(bf)
        m2 = sub.recv(timeout=5)
        assert m2.dtype == "bfloat16" and m2.data.dtype == np.uint16
        assert torch.equal(m2.as_torch(), bf)
        # A non-contiguous tensor and a small one.
        pub.send(src.t())
        assert torch.equal(sub.recv(timeout=5).as_torch(), src.t())
        pub.send(torch.arange(5, dtype=torch.int64))
        assert torch.equal(sub.recv(timeout=5).as_torch(), torch.arange(5))
        # A bfloat16 loan, filled through torch.
        loaned = pub.loan((8, 8), torch.bfloat16)
        loaned.fill_(1.5)
        pub.send(loaned)
        assert torch.equal(sub.recv(timeout=5).as_torch(), torch.full((8, 8), 1.5).bfloat16())


def test_dlpack_objects_are_accepted(daemon):
    class OnlyDLPack:
        def __init__(self, arr):
            self.arr = arr

        def __dlpack__(self, **kw):
            return self.arr.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.arr.__dlpack_device__()

    with tensorbus.connect(daemon.url) as c, c.subscribe("dl") as sub:
        pub = c.publisher("dl")
        arr = sample(np.int32, (50, 60))
        pub.send(OnlyDLPack(arr))
        msg = sub.recv(timeout=5)
        assert np.array_equal(msg.data, arr)
        assert np.array_equal(np.from_dlpack(msg), arr)
        with pytest.raises(TypeError, match="cannot send arrays of dtype"):
            pub.send(np.array(["a", "b"]))


def test_arena_exhaustion_and_oversize(daemon_factory):
    d = daemon_factory("--arena-size", "4MiB")
    with tensorbus.connect(d.url) as c, c.subscribe("x/>") as sub:
        reliable = c.publisher("x/rel", timeout=0.3)
        with pytest.raises(tensorbus.MessageTooLargeError, match="can never fit"):
            reliable.send(np.zeros(5 << 20, dtype=np.uint8))
        held = []
        reliable.send(np.zeros(2 << 20, dtype=np.uint8))
        reliable.send(np.zeros(1 << 20, dtype=np.uint8))
        held = [sub.recv(timeout=5).data for _ in range(2)]
        t0 = time.monotonic()
        with pytest.raises(tensorbus.BackpressureError, match="arena has no free block"):
            reliable.send(np.zeros(2 << 20, dtype=np.uint8))
        assert time.monotonic() - t0 >= 0.25  # it waited for space
        realtime = c.publisher("x/rt", qos="realtime")
        t0 = time.monotonic()
        assert realtime.send(np.zeros(2 << 20, dtype=np.uint8)) == -1  # dropped, not waited
        assert time.monotonic() - t0 < 0.25 and realtime.dropped == 1
        with pytest.raises(tensorbus.BackpressureError, match="do not wait"):
            realtime.loan(2 << 20, "uint8")
        # Space comes back as soon as the views go: a waiting send succeeds.
        held.clear()
        gc.collect()
        reliable.send(np.zeros(2 << 20, dtype=np.uint8))
        assert sub.recv(timeout=5).nbytes == 2 << 20


def test_hold_limit(daemon):
    with tensorbus.connect(daemon.url, max_holds=2) as c, c.subscribe("h") as sub:
        pub = c.publisher("h")
        for i in range(3):
            pub.send(np.full(10_000, i))
        a, b = sub.recv(timeout=5), sub.recv(timeout=5)
        with pytest.raises(tensorbus.HoldLimitError, match="max_holds"):
            sub.recv(timeout=5)
        a.release()
        gc.collect()
        m = sub.recv(timeout=5)  # the refused message was not lost
        assert m.data[0] == 2
        del b


def test_killed_holder_returns_its_blocks(daemon_factory, popen):
    d = daemon_factory("--arena-size", "8MiB")
    h = popen("holder", d.url, "k", "3", "hold")
    assert read_line(h) == "ready"
    with tensorbus.connect(d.url) as c:
        pub = c.publisher("k", timeout=10)
        for i in range(3):
            pub.send(np.full(1 << 18, i, dtype=np.float64))  # 2 MiB each
        assert read_line(h, 20) == "held"
        assert arena_used(c) == 6 << 20
        h.kill()
        h.wait(5)
        assert wait_for(lambda: arena_used(c) == 0), c.stats()["broker"]["arena"]
        pub.send(np.zeros(1 << 20, dtype=np.float64))  # the whole arena is usable again


def test_killed_loaner_returns_its_loan(daemon_factory, popen):
    d = daemon_factory("--arena-size", "8MiB")
    p = popen("loaner", d.url, "ln", str(4 << 20))
    assert read_line(p) == "ready"
    with tensorbus.connect(d.url) as c:
        assert arena_used(c) == 4 << 20
        p.kill()
        p.wait(5)
        assert wait_for(lambda: arena_used(c) == 0)


def test_realtime_overwrite_does_not_leak(daemon):
    with tensorbus.connect(daemon.url) as c, c.subscribe("rt") as sub:
        pub = c.publisher("rt", qos="realtime", capacity=8)
        for i in range(100):
            pub.send(np.full(20_000, i, dtype=np.int64))
        got = []
        while True:
            try:
                got.append(int(sub.recv(timeout=0.2).data[0]))
            except tensorbus.ReceiveTimeout:
                break
        assert got == sorted(got) and got[-1] == 99 and len(got) <= 8
        gc.collect()
        assert wait_for(lambda: arena_used(c) == 0)


def test_latest_keeps_the_newest_tensor_for_new_subscribers(daemon):
    with tensorbus.connect(daemon.url) as c:
        pub = c.publisher("params", qos="latest")
        for i in range(20):
            pub.send(np.full(50_000, i, dtype=np.float32))
        with c.subscribe("params") as sub:
            msg = sub.recv(timeout=5)
            assert msg.zero_copy and msg.data[0] == 19
        del msg
        gc.collect()
        assert arena_used(c) > 0  # the newest value stays for the next joiner
        assert arena_used(c) <= 2 * (1 << 18)


def test_a_client_without_a_holder_slot_copies(daemon):
    clients = [tensorbus.connect(daemon.url) for _ in range(63)]  # every holder slot
    try:
        with tensorbus.connect(daemon.url) as late, late.subscribe("ns") as sub:
            assert late._maps.holder is None
            pub = clients[0].publisher("ns")
            arr = sample(np.float32, (300, 300))
            pub.send(arr)
            msg = sub.recv(timeout=5)
            assert not msg.zero_copy and np.array_equal(msg.data, arr)
            small = late.publisher("ns-small")
            small.send(np.arange(10))  # inline still works
            with pytest.raises(tensorbus.MessageTooLargeError, match="holder slot"):
                small.send(arr)
    finally:
        for c in clients:
            c.close()


def test_hold_limit_ends_a_batch_without_loss(daemon):
    with tensorbus.connect(daemon.url, max_holds=2) as c, c.subscribe("hb") as sub:
        pub = c.publisher("hb")
        for i in range(4):
            pub.send(np.full(10_000, i))
        batch = sub.recv_batch(10, 5)
        assert [int(m.data[0]) for m in batch] == [0, 1]
        with pytest.raises(tensorbus.HoldLimitError):
            sub.recv_batch(10, 5)
        batch = None
        gc.collect()
        assert [int(m.data[0]) for m in sub.recv_batch(10, 5)] == [2, 3]


@pytest.mark.parametrize("qos", ["reliable", "realtime"])
def test_tensor_stress_across_processes(daemon_factory, popen, qos):
    """Two publishers and two subscribers, mixed sizes through a small arena
    (blocks reused all the time), loans and copies, subscribers holding
    views: every array intact, reliable in order and complete, and every
    block back in the arena at the end."""
    d = daemon_factory("--arena-size", "24MiB")
    count = 400
    subs = [popen("tensor_subscriber", d.url, "st/>", str(2 * count), qos) for _ in range(2)]
    for s in subs:
        assert read_line(s) == "ready"
    pubs = [popen("tensor_publisher", d.url, f"st/{k}", str(count), qos) for k in range(2)]
    for p in pubs:
        assert read_line(p) == "ready"
        assert read_line(p, 60) == "done"
    for s in subs:
        line = read_line(s, 60)
        assert line.startswith("ok"), line
        if qos == "reliable":
            assert line == f"ok {2 * count}"
    for p in [*pubs, *subs]:
        p.wait(10)
    with tensorbus.connect(d.url) as c:
        # Realtime topics keep nothing; reliable ones drop their last
        # references once every subscriber has gone.
        assert wait_for(lambda: arena_used(c) == 0), c.stats()["broker"]["arena"]
