"""The asyncio client against a real daemon."""

import asyncio

import numpy as np
import pytest

import tensorbus
import tensorbus.aio

pytestmark = pytest.mark.timeout(60)


def test_asyncio_end_to_end(daemon):
    async def main():
        async with await tensorbus.aio.connect(daemon.url) as c:
            sub = await c.subscribe("aio/>")
            pub = await c.publisher("aio/a", capacity=8)

            async def produce():
                for i in range(50):  # more than the ring holds: send awaits credit
                    await pub.send(i.to_bytes(2, "little"))
                late = await c.publisher("aio/b")
                await late.send(b"late")

            task = asyncio.create_task(produce())
            got = []
            async for msg in sub:
                got.append((msg.topic, bytes(msg.data)))
                if len(got) == 51:
                    break
            await task
            assert [int.from_bytes(d, "little") for t, d in got if t == "aio/a"] == list(range(50))
            assert ("aio/b", b"late") in got
            with pytest.raises(tensorbus.ReceiveTimeout):
                await sub.recv(timeout=0.1)
            batch_pub = await c.publisher("aio/c")
            for i in range(5):
                await batch_pub.send(bytes([i]))
            batch = await sub.recv_batch(10, 1.0)
            assert [m.data[0] for m in batch] == [0, 1, 2, 3, 4]

    asyncio.run(main())


def test_asyncio_and_sync_clients_interoperate(daemon):
    async def main():
        async with await tensorbus.aio.connect(daemon.url) as c:
            sub = await c.subscribe("mix/x")
            loop = asyncio.get_running_loop()

            def publish():
                with tensorbus.connect(daemon.url) as sync:
                    sync.publisher("mix/x").send(b"from a thread")

            await loop.run_in_executor(None, publish)
            msg = await sub.recv(timeout=3)
            assert bytes(msg.data) == b"from a thread"

    asyncio.run(main())


def test_async_tensors_and_loans(daemon):
    async def main():
        async with await tensorbus.aio.connect(daemon.url) as c:
            sub = await c.subscribe("at")
            pub = await c.publisher("at")
            arr = np.arange(100_000, dtype=np.float32).reshape(100, 1000)
            await pub.send(arr, meta=b"m")
            loaned = await pub.loan((10,), "int64")
            loaned[:] = 5
            await pub.send(loaned)
            m1 = await sub.recv(timeout=5)
            m2 = await sub.recv(timeout=5)
            assert m1.zero_copy and np.array_equal(m1.data, arr) and m1.meta[:1] == b"m"
            assert np.array_equal(m2.data, np.full(10, 5))

    asyncio.run(main())


def test_async_send_of_a_large_array_copies_once_while_waiting(daemon):
    async def main():
        async with await tensorbus.aio.connect(daemon.url) as c:
            sub = await c.subscribe("big")
            pub = await c.publisher("big", capacity=2)
            arr = np.arange(1 << 18, dtype=np.float32)  # 1 MiB: through the arena
            for _ in range(2):
                await pub.send(arr)  # fills the ring
            allocs = (await c.stats())["broker"]["arena"]["allocs"]

            async def drain_later():
                await asyncio.sleep(0.3)  # the third send retries meanwhile
                return [await sub.recv(timeout=5) for _ in range(3)]

            reader = asyncio.create_task(drain_later())
            await pub.send(arr, timeout=5)
            got = await reader
            assert all(np.array_equal(m.data, arr) for m in got)
            # The first try copied in once; the retries sent one loan (one more).
            assert (await c.stats())["broker"]["arena"]["allocs"] - allocs <= 2

    asyncio.run(main())
