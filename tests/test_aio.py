"""The asyncio client against a real daemon."""

import asyncio
import time

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


# -- what the asyncio client shares with the sync one (issue 13, part 4) -----


def test_async_respond_serves_in_a_task_with_sync_and_async_handlers(daemon):
    async def main():
        async with await tensorbus.aio.connect(daemon.url, spin_us=0) as srv:
            assert srv._maps.waiter is not None  # spin_us reaches the client's wait policy

            async def double(req):
                await asyncio.sleep(0)
                return np.asarray(req.data) * 2

            responder = await srv.respond("aio/double", double, group="g")
            failing = await srv.respond("aio/fail", lambda req: 1 / 0)
            async with await tensorbus.aio.connect(daemon.url) as cli:
                for i in range(10):
                    reply = await cli.request("aio/double", np.full(4, i, dtype=np.int32))
                    assert np.array_equal(reply.data, np.full(4, 2 * i, dtype=np.int32))
                with pytest.raises(tensorbus.ResponderError, match="ZeroDivisionError"):
                    await cli.request("aio/fail", b"x")
                # A sync client is served by the asyncio responder too.
                loop = asyncio.get_running_loop()

                def sync_call():
                    with tensorbus.connect(daemon.url) as sync:
                        return np.asarray(sync.request("aio/double", np.ones(3)).data)

                assert np.array_equal(await loop.run_in_executor(None, sync_call), np.full(3, 2.0))
                assert responder.stream.stats["requests"] == 11
                await responder.close()
                await failing.close()
                with pytest.raises(tensorbus.NoResponders):
                    await cli.request("aio/double", b"x")

    asyncio.run(main())


def test_async_requests_iterates_and_dedups_retries(daemon):
    async def main():
        async with await tensorbus.aio.connect(daemon.url) as srv:
            stream = await srv.requests("aio/echo")  # joined: requesters see a responder
            served = []

            async def serve():
                async for req in stream:
                    served.append(req.id)
                    if req.id == 1 and req.attempt == 0:
                        await asyncio.sleep(0.6)  # slower than the caller's timeout: it retries
                    await req.reply(b"echo:" + bytes(req.data))
                    with pytest.raises(tensorbus.TensorbusError, match="already answered"):
                        await req.reply(b"twice")
                    if len(served) == 3:
                        await stream.close()

            task = asyncio.create_task(serve())
            loop = asyncio.get_running_loop()

            def calls():
                with tensorbus.connect(daemon.url) as sync:
                    first = sync.request("aio/echo", b"a", timeout=0.4, retries=3)
                    return [bytes(first.data)] + [
                        bytes(sync.request("aio/echo", d).data) for d in (b"b", b"c")
                    ]

            assert await loop.run_in_executor(None, calls) == [b"echo:a", b"echo:b", b"echo:c"]
            await asyncio.wait_for(task, 10)
            assert served == [1, 2, 3]  # the retry of id 1 was not yielded again
            assert stream.stats["duplicates"] >= 1
            with pytest.raises(tensorbus.ReceiveTimeout):
                s2 = await srv.requests("aio/other")
                await s2.next(timeout=0.1)

    asyncio.run(main())


def test_async_client_speaks_curve_to_a_tcp_broker(daemon_factory, tmp_path):
    import zmq

    public, secret = zmq.curve_keypair()
    key_file = tmp_path / "curve.key"
    key_file.write_text(secret.decode())
    d = daemon_factory("--tcp", "127.0.0.1:*", "--curve-secret-file", str(key_file))
    tcp = next(e for e in d.endpoints if e.startswith("tcp://"))

    async def main():
        async with await tensorbus.aio.connect(tcp, curve_server_key=public.decode()) as c:
            assert not c.local
            assert "broker" in await c.stats()
        with pytest.raises(tensorbus.BrokerUnavailable):
            await tensorbus.aio.connect(tcp, timeout=1)

    asyncio.run(main())


def test_async_light_client_publishes_and_subscribes_over_tcp(daemon_factory, tmp_path):
    d = daemon_factory("--tcp", "127.0.0.1:*", "--transport", "tcp")
    tcp = next(e for e in d.endpoints if e.startswith("tcp://"))

    async def main():
        async with await tensorbus.aio.connect(tcp) as remote:
            assert not remote.local
            rsub = await remote.subscribe("metrics/>")
            rpub = await remote.publisher("cmd/go")
            with pytest.raises(tensorbus.NotLocalError):
                remote.requests("cmd/go")
            with pytest.raises(tensorbus.NoResponders):  # asked of the broker
                await remote.request("cmd/go", b"x")
            loop = asyncio.get_running_loop()
            ready = asyncio.Event()

            def local_side():
                with tensorbus.connect(d.url) as local:
                    lsub = local.subscribe("cmd/>")
                    lpub = local.publisher("metrics/loss")
                    loop.call_soon_threadsafe(ready.set)
                    time.sleep(0.3)  # the remote interest reaches the broker
                    for i in range(300):
                        lpub.send(b"%d" % i)
                    lpub.send(np.arange(1 << 18, dtype=np.float32))  # 1 MiB: a body in chunks
                    m = lsub.recv(timeout=10)
                    return m.topic, bytes(m.data), np.asarray(lsub.recv(timeout=10).data).copy()

            local = loop.run_in_executor(None, local_side)
            await ready.wait()
            got = []
            async for msg in rsub:
                got.append(msg)
                if len(got) == 301:
                    break
            assert [int(bytes(m.data)) for m in got[:300]] == list(range(300))
            assert np.array_equal(got[300].data, np.arange(1 << 18, dtype=np.float32))
            await asyncio.sleep(0.2)
            await rpub.send(b"go")
            await rpub.send(np.ones((512, 512), dtype=np.float32), meta=b"m")
            topic, data, big = await local
            assert (topic, data) == ("cmd/go", b"go")
            assert np.array_equal(big, np.ones((512, 512), dtype=np.float32))
            assert await rsub.recv_batch(10, max_wait=0.1) == []
            assert rsub.topics == ["metrics/loss"]

    asyncio.run(main())
