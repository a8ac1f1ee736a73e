"""Request/reply across hosts (broker/groups.py): a responder group on one
daemon serves requests made on another, NoResponders is cluster-wide, a free
local member is preferred, and a lost daemon's requests go elsewhere."""

import asyncio
import signal
import threading
import time

import numpy as np
import pytest
from daemons import TRANSPORTS, broker_stats, tcp_of, wait_for

import tensorbus
import tensorbus.aio
from tensorbus.cli import stats_table

pytestmark = pytest.mark.timeout(90)

COMMON = ("--tcp", "127.0.0.1:*", "--heartbeat", "0.2", "--link-grace", "1")
COMMON += ("--arena-size", "64MiB")


def served_at(d, topic: str) -> list:
    """The daemons that serve ``topic`` for requesters at ``d``."""
    groups = broker_stats(d)["remote_groups"]
    return [name for g in groups if g["topic"] == topic for name in g["servers"]]


def pair(daemon_factory, tmp_path, transport="tcp", *extra):
    a = daemon_factory(*COMMON, "--transport", transport, *extra, path=tmp_path / "a")
    b = daemon_factory(
        *COMMON, "--transport", transport, *extra, "--peer", tcp_of(a), path=tmp_path / "b"
    )
    wait_for(
        lambda: any(link["state"] == "up" for link in broker_stats(a)["links"]), what="the link"
    )
    return a, b


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_group_on_one_daemon_serves_requests_made_on_another(daemon_factory, tmp_path, transport):
    a, b = pair(daemon_factory, tmp_path, transport)
    with tensorbus.connect(b.url) as srv, tensorbus.connect(a.url) as cli:
        with pytest.raises(tensorbus.NoResponders):
            cli.request("svc/echo", b"x", timeout=5)  # nobody anywhere: at once
        srv.respond("svc/echo", lambda req: bytes(req.data)[::-1])
        srv.respond("svc/sum", lambda req: np.asarray(req.data).sum(axis=0))
        wait_for(lambda: served_at(a, "svc/echo") and served_at(a, "svc/sum"), what="B serving")
        table = stats_table(cli.stats())
        assert f"group responders on svc/echo: 0 member(s) here, served too by {tcp_of(b)}" in table
        for k in range(20):
            assert bytes(cli.request("svc/echo", b"hello %d" % k).data) == (b"hello %d" % k)[::-1]
        arr = np.arange(12.0).reshape(3, 4)
        reply = cli.request("svc/sum", arr)
        assert reply.is_tensor and np.array_equal(reply.data, arr.sum(axis=0))
        big = np.arange(1 << 20, dtype=np.float32)  # 4 MiB: through the arena and a body
        assert float(cli.request("svc/sum", big).data) == float(big.sum())
        assert cli._requester.stats["retries"] == 0
        # A requester's inbox is no interest of other daemons: replies find
        # their way by the link's inboxes message.
        assert not any(
            p.startswith("_inbox/") for link in broker_stats(b)["links"] for p in link["interest"]
        )
    # The responders left: their group leaves A, and requests fail at once again.
    wait_for(lambda: not served_at(a, "svc/echo"), what="B's group gone from A")
    with tensorbus.connect(a.url) as cli, pytest.raises(tensorbus.NoResponders):
        cli.request("svc/echo", b"x", timeout=5)


def test_a_free_local_member_is_preferred(daemon_factory, tmp_path):
    a, b = pair(daemon_factory, tmp_path, "tcp", "--local-first-us", "200000")
    with (
        tensorbus.connect(a.url) as here,
        tensorbus.connect(b.url) as there,
        tensorbus.connect(a.url) as cli,
    ):
        here.respond("svc/who", lambda req: b"A", group="g")
        there.respond("svc/who", lambda req: b"B", group="g")
        wait_for(lambda: served_at(a, "svc/who"), what="B serving at A")
        answers = [bytes(cli.request("svc/who", b"?").data) for _ in range(20)]
        assert answers == [b"A"] * 20
        # Every local member busy: after the head start, B takes requests.
        busy = threading.Event()

        def slow(req):
            busy.set()
            time.sleep(3)
            return b"A-slow"

        here.close()
        with tensorbus.connect(a.url) as here2:
            here2.respond("svc/who", slow, group="g")
            other = tensorbus.connect(a.url)
            t = threading.Thread(target=lambda: other.request("svc/who", b"1", timeout=5))
            t.start()  # A's free member takes it (the head start) and stays busy
            assert busy.wait(5)
            assert bytes(cli.request("svc/who", b"?", timeout=2).data) == b"B"
            t.join(10)
            other.close()


def test_a_lost_daemon_s_requests_go_to_another(daemon_factory, tmp_path):
    a = daemon_factory(*COMMON, "--transport", "tcp", path=tmp_path / "a")
    b = daemon_factory(*COMMON, "--transport", "tcp", "--peer", tcp_of(a), path=tmp_path / "b")
    c = daemon_factory(*COMMON, "--transport", "tcp", "--peer", tcp_of(a), path=tmp_path / "c")
    with (
        tensorbus.connect(b.url) as sb,
        tensorbus.connect(c.url) as sc,
        tensorbus.connect(a.url) as cli,
    ):
        sb.respond("svc/x", lambda req: b"B")
        sc.respond("svc/x", lambda req: b"C")
        wait_for(lambda: len(served_at(a, "svc/x")) == 2, what="B and C serving at A")
        got = {bytes(cli.request("svc/x", b"?").data) for _ in range(20)}
        assert got == {b"B", b"C"}  # spread over the serving daemons
        b.stop(signal.SIGKILL)
        # Every request is answered: by C, after a retry for one sent to B.
        for _ in range(10):
            assert bytes(cli.request("svc/x", b"?", timeout=1, retries=3).data) == b"C"
        wait_for(lambda: len(served_at(a, "svc/x")) == 1, what="B out of the group")
        c.stop(signal.SIGKILL)
        wait_for(lambda: not served_at(a, "svc/x"), what="C out of the group")
        with pytest.raises(tensorbus.NoResponders):
            cli.request("svc/x", b"?", timeout=1)


def test_asyncio_requester_across_daemons(daemon_factory, tmp_path):
    a, b = pair(daemon_factory, tmp_path)

    async def main():
        srv = await tensorbus.aio.connect(b.url)
        cli = await tensorbus.aio.connect(a.url)
        try:
            await srv.respond("svc/aio", lambda req: bytes(req.data) + b"!")
            wait_for(lambda: served_at(a, "svc/aio"), what="B serving")
            for k in range(5):
                reply = await cli.request("svc/aio", b"%d" % k)
                assert bytes(reply.data) == b"%d!" % k
        finally:
            await cli.close()
            await srv.close()

    asyncio.run(main())


def test_a_light_client_requests_from_a_group_here_and_across_daemons(daemon_factory, tmp_path):
    a, b = pair(daemon_factory, tmp_path)
    with (
        tensorbus.connect(a.url) as here,
        tensorbus.connect(b.url) as there,
        tensorbus.connect(tcp_of(a), name="light") as light,
    ):
        assert not light.local
        with pytest.raises(tensorbus.NoResponders):
            light.request("svc/light", b"x", timeout=5)
        there.respond("svc/light", lambda req: b"B:" + bytes(req.data))
        wait_for(lambda: served_at(a, "svc/light"), what="B serving at A")
        for k in range(5):
            assert bytes(light.request("svc/light", b"%d" % k).data) == b"B:%d" % k
        here.respond("svc/near", lambda req: np.asarray(req.data) * 2)
        reply = light.request("svc/near", np.arange(4.0))
        assert np.array_equal(reply.data, np.arange(4.0) * 2)

    async def asyncio_light():
        cli = await tensorbus.aio.connect(tcp_of(a), name="light-aio")
        try:
            with pytest.raises(tensorbus.NoResponders):
                await cli.request("svc/none", b"x", timeout=5)
            with tensorbus.connect(b.url) as there:
                there.respond("svc/aio-light", lambda req: bytes(req.data) * 2)
                wait_for(lambda: served_at(a, "svc/aio-light"), what="B serving at A")
                reply = await cli.request("svc/aio-light", b"ab")
                assert bytes(reply.data) == b"abab"
        finally:
            await cli.close()

    asyncio.run(asyncio_light())


def test_retries_go_to_the_same_daemon_so_the_handler_runs_once(daemon_factory, tmp_path):
    a = daemon_factory(*COMMON, "--transport", "tcp", path=tmp_path / "a")
    b = daemon_factory(*COMMON, "--transport", "tcp", "--peer", tcp_of(a), path=tmp_path / "b")
    c = daemon_factory(*COMMON, "--transport", "tcp", "--peer", tcp_of(a), path=tmp_path / "c")
    runs = []

    def slow(where):
        def handler(req):
            runs.append((where, req.id, req.attempt))
            time.sleep(0.5)  # longer than the caller's timeout: it retries
            return where

        return handler

    with (
        tensorbus.connect(b.url) as sb,
        tensorbus.connect(c.url) as sc,
        tensorbus.connect(a.url) as cli,
    ):
        sb.respond("svc/slow", slow(b"B"))
        sc.respond("svc/slow", slow(b"C"))
        wait_for(lambda: len(served_at(a, "svc/slow")) == 2, what="B and C serving at A")
        for _ in range(4):
            reply = cli.request("svc/slow", b"x", timeout=0.2, retries=6)
            assert bytes(reply.data) in (b"B", b"C")
        assert cli._requester.stats["retries"] >= 4  # every call retried...
        assert len(runs) == 4, runs  # ...but each ran its handler once, where it first went
        assert {where for where, _, _ in runs} == {b"B", b"C"}  # spread over both


def test_requests_relay_leaf_hub_hub_leaf_and_back(daemon_factory, tmp_path):
    h1 = daemon_factory(*COMMON, "--transport", "tcp", "--hub", path=tmp_path / "h1")
    h2 = daemon_factory(
        *COMMON, "--transport", "tcp", "--hub", "--peer", tcp_of(h1), path=tmp_path / "h2"
    )
    l1 = daemon_factory(
        *COMMON, "--transport", "tcp", "--leaf-of", tcp_of(h1), path=tmp_path / "l1"
    )
    l2 = daemon_factory(
        *COMMON, "--transport", "tcp", "--leaf-of", tcp_of(h2), path=tmp_path / "l2"
    )
    l3 = daemon_factory(
        *COMMON, "--transport", "tcp", "--leaf-of", tcp_of(h1), path=tmp_path / "l3"
    )
    with (
        tensorbus.connect(l2.url) as far,
        tensorbus.connect(l1.url) as cli,
        tensorbus.connect(tcp_of(l3), name="light") as light,
    ):
        with pytest.raises(tensorbus.NoResponders):
            cli.request("svc/far", b"x", timeout=5)
        far.respond("svc/far", lambda req: b"L2:" + bytes(req.data))
        # L2 serves; H2 tells H1, H1 tells its leaves: three announcements.
        wait_for(lambda: served_at(l1, "svc/far"), what="the group known at L1")
        wait_for(lambda: served_at(l3, "svc/far"), what="the group known at L3")
        assert served_at(l1, "svc/far") == [tcp_of(h1)]
        for k in range(10):
            assert bytes(cli.request("svc/far", b"%d" % k).data) == b"L2:%d" % k
            assert bytes(light.request("svc/far", b"%d" % k).data) == b"L2:%d" % k
        assert cli._requester.stats["retries"] == 0
        # Each request crossed each link once: no hub sent one back.
        for hub in (h1, h2):
            assert all(x.get("hops_dropped", 0) == 0 for x in broker_stats(hub)["links"])
        far.close()
        wait_for(lambda: not served_at(l1, "svc/far"), what="the group gone at L1")
        with pytest.raises(tensorbus.NoResponders):
            cli.request("svc/far", b"x", timeout=5)


def test_a_leaf_s_requests_survive_its_hub_killed(daemon_factory, tmp_path):
    h1 = daemon_factory(*COMMON, "--transport", "tcp", "--hub", path=tmp_path / "h1")
    h2 = daemon_factory(
        *COMMON, "--transport", "tcp", "--hub", "--peer", tcp_of(h1), path=tmp_path / "h2"
    )
    both = ("--leaf-of", tcp_of(h1), "--leaf-of", tcp_of(h2))
    l1 = daemon_factory(*COMMON, "--transport", "tcp", *both, path=tmp_path / "l1")
    l2 = daemon_factory(
        *COMMON, "--transport", "tcp", "--leaf-of", tcp_of(h2), path=tmp_path / "l2"
    )
    with tensorbus.connect(l2.url) as far, tensorbus.connect(l1.url) as cli:
        far.respond("svc/ha", lambda req: b"ok:" + bytes(req.data))
        wait_for(lambda: served_at(l1, "svc/ha"), what="the group known at L1")
        assert served_at(l1, "svc/ha") == [tcp_of(h1)]  # L1 went through its first hub
        assert bytes(cli.request("svc/ha", b"0").data) == b"ok:0"
        h1.stop(signal.SIGKILL)
        # L1 fails over to H2, which serves the group again. Between the two
        # links no server is known: NoResponders, at once, is the answer then.
        deadline = time.monotonic() + 20
        while True:
            try:
                reply = cli.request("svc/ha", b"1", timeout=1, retries=3)
                break
            except tensorbus.NoResponders:
                assert time.monotonic() < deadline, "L1 never found the group again"
                time.sleep(0.05)
        assert bytes(reply.data) == b"ok:1"
        for k in range(2, 6):
            assert bytes(cli.request("svc/ha", b"%d" % k, timeout=1).data) == b"ok:%d" % k
        assert served_at(l1, "svc/ha") == [tcp_of(h2)]
