"""Request/reply through a real broker: round trips, queue groups, retries
past a killed responder, duplicate suppression, NoResponders, timeouts,
64 MiB payloads, the asyncio twin and the CLI."""

import asyncio
import collections
import gc
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import tensorbus
import tensorbus.aio
from tensorbus.clients import reqrep as R

from conftest import read_line


def test_round_trip_bytes_and_arrays(daemon):
    with tensorbus.connect(daemon.url) as srv, tensorbus.connect(daemon.url) as cli:
        srv.respond("svc/echo", lambda req: bytes(req.data)[::-1])
        srv.respond("svc/sum", lambda req: np.asarray(req.data).sum(axis=0))
        assert bytes(cli.request("svc/echo", b"hello").data) == b"olleh"
        arr = np.arange(12.0).reshape(3, 4)
        reply = cli.request("svc/sum", arr)
        assert reply.is_tensor and np.array_equal(reply.data, arr.sum(axis=0))
        assert cli._requester.stats == {"requests": 2, "retries": 0, "late_replies": 0}


def test_a_failing_handler_raises_at_the_caller(daemon):
    def handler(req):
        raise ValueError("bad input")

    with tensorbus.connect(daemon.url) as srv, tensorbus.connect(daemon.url) as cli:
        srv.respond("svc/fail", handler)
        with pytest.raises(tensorbus.ResponderError, match="ValueError: bad input"):
            cli.request("svc/fail", b"x")


def test_no_responders_is_immediate(daemon):
    with tensorbus.connect(daemon.url) as cli:
        t0 = time.monotonic()
        with pytest.raises(tensorbus.NoResponders, match="svc/none"):
            cli.request("svc/none", b"x", timeout=5)
        assert time.monotonic() - t0 < 0.5
        with tensorbus.connect(daemon.url) as srv:
            r = srv.respond("svc/none", lambda req: b"ok")
            assert bytes(cli.request("svc/none", b"x").data) == b"ok"
            r.close()
        with pytest.raises(tensorbus.NoResponders):
            cli.request("svc/none", b"x", timeout=5)  # the group left with its member


def test_timeout_after_every_retry(daemon):
    with tensorbus.connect(daemon.url) as srv, tensorbus.connect(daemon.url) as cli:
        stream = srv.requests("svc/slow")  # reads, never answers
        t0 = time.monotonic()
        with pytest.raises(tensorbus.RequestTimeout, match="3 attempt"):
            cli.request("svc/slow", b"x", timeout=0.2, retries=2)
        assert 0.55 < time.monotonic() - t0 < 3
        ids = [stream.next(timeout=1).id]  # the first attempt; retries are duplicates
        with pytest.raises(tensorbus.ReceiveTimeout):
            stream.next(timeout=0.2)
        assert stream.stats["duplicates"] == 2 and ids == [1]


def test_duplicates_run_the_handler_once(daemon):
    calls = collections.Counter()

    def handler(req):
        calls[req.id] += 1
        return b"answer-%d" % req.id

    with tensorbus.connect(daemon.url) as srv, tensorbus.connect(daemon.url) as cli:
        srv.respond("svc/once", handler)
        token = 0xABCDEF
        cli.create_topic(R.inbox_topic(token), private=True)
        inbox = cli.subscribe(R.inbox_topic(token))
        pub = cli.publisher("svc/once")
        for attempt in range(3):  # the same id three times, as retries would
            pub.send(b"q", meta=R.encode_meta(7, token, attempt, R.KIND_REQUEST))
        replies = [inbox.recv(timeout=5) for _ in range(3)]
        assert [bytes(m.data) for m in replies] == [b"answer-7"] * 3
        assert all(R.decode_meta(m.meta).id == 7 for m in replies)
        assert calls == {7: 1}


def test_late_replies_never_reach_the_wrong_call(daemon):
    gate = threading.Event()

    def handler(req):
        if req.id == 1:
            gate.wait(5)  # answer the first request only after its caller gave up
        return b"reply-%d" % req.id

    with tensorbus.connect(daemon.url) as srv, tensorbus.connect(daemon.url) as cli:
        srv.respond("svc/late", handler)
        with pytest.raises(tensorbus.RequestTimeout):
            cli.request("svc/late", b"1", timeout=0.3, retries=0)
        gate.set()
        time.sleep(0.2)  # request 1's reply arrives now, late
        assert bytes(cli.request("svc/late", b"2").data) == b"reply-2"
        assert cli._requester.stats["late_replies"] == 1


def test_queue_group_spreads_and_answers_once(daemon, popen):
    """Four callers at once, two members that take 5 ms per request: each
    request is answered exactly once, and a busy member leaves the next
    request to the free one (first free wins, no round robin)."""
    members = [popen("responder", daemon.url, "svc/group", f"r{i}", "slow") for i in range(2)]
    for m in members:
        assert read_line(m) == "ready"
    by = collections.Counter()
    errors = []

    def caller(k):
        try:
            with tensorbus.connect(daemon.url) as cli:
                for i in range(25):
                    body = b"%d-%d" % (k, i)
                    name, _, echo = bytes(cli.request("svc/group", body, timeout=5).data).partition(
                        b":"
                    )
                    assert echo == body
                    by[name] += 1
                assert cli._requester.stats["retries"] == 0
                assert cli._requester.stats["late_replies"] == 0
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sum(by.values()) == 100 and set(by) == {b"r0", b"r1"}, by
    with tensorbus.connect(daemon.url) as cli:
        info = {t["name"]: t for t in cli.topics("svc/group")}
        assert info["svc/group"]["subscribers"] == 1  # one group cursor for both


def test_a_killed_responder_is_retried_elsewhere(daemon, popen):
    stuck = popen("responder", daemon.url, "svc/kill", "stuck", "stuck")
    assert read_line(stuck) == "ready"
    with tensorbus.connect(daemon.url) as cli:
        result = {}

        def call():
            try:
                result["reply"] = bytes(cli.request("svc/kill", b"x", timeout=1, retries=4).data)
            except Exception as exc:
                result["error"] = exc

        caller = threading.Thread(target=call)
        caller.start()
        assert read_line(stuck).startswith("got ")  # it claimed the request...
        healthy = popen("responder", daemon.url, "svc/kill", "healthy")
        assert read_line(healthy) == "ready"
        stuck.kill()  # ...and dies with it
        caller.join(10)
        assert result.get("reply") == b"healthy:x", result
        assert cli._requester.stats["retries"] >= 1


def test_64_mib_request_and_reply(daemon_factory):
    d = daemon_factory("--arena-size", "512MiB")
    with tensorbus.connect(d.url) as srv, tensorbus.connect(d.url) as cli:
        srv.respond("svc/big", lambda req: req.data[::-1].copy())
        arr = np.arange(16 << 20, dtype=np.float32)  # 64 MiB
        reply = cli.request("svc/big", arr, timeout=20)
        assert reply.zero_copy and reply.data.shape == arr.shape
        assert reply.data[0] == arr[-1] and reply.data[-1] == 0


def test_asyncio_request(daemon):
    async def main():
        async with await tensorbus.aio.connect(daemon.url) as cli:
            with pytest.raises(tensorbus.NoResponders):
                await cli.request("svc/aio", b"x")
            with tensorbus.connect(daemon.url) as srv:
                srv.respond("svc/aio", lambda req: b"async:" + bytes(req.data))
                replies = [await cli.request("svc/aio", b"%d" % i) for i in range(20)]
                assert [bytes(m.data) for m in replies] == [b"async:%d" % i for i in range(20)]

    asyncio.run(main())


def test_private_inbox_goes_with_its_client(daemon):
    with tensorbus.connect(daemon.url) as srv:
        srv.respond("svc/x", lambda req: b"ok")
        with tensorbus.connect(daemon.url) as cli:
            cli.request("svc/x", b"1")
            inbox = cli._requester.topic
            assert any(t["name"] == inbox for t in srv.topics())
        deadline = time.monotonic() + 5
        while any(t["name"] == inbox for t in srv.topics()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(t["name"] == inbox for t in srv.topics())
        with tensorbus.connect(daemon.url) as cli2:  # the responder survives its loss
            assert bytes(cli2.request("svc/x", b"2").data) == b"ok"


def test_cli_request_and_reply(daemon):
    cli = [sys.executable, "-m", "tensorbus"]
    replier = subprocess.Popen(
        [*cli, "reply", "svc/cli", "pong", "--count", "1", "--url", daemon.url],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert replier.stdout.readline().startswith("tensorbus reply ready")
        out = subprocess.run(
            [*cli, "request", "svc/cli", "ping", "--url", daemon.url],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0 and out.stdout.strip() == "pong", out
        assert replier.stdout.readline().strip().endswith("ping")
        assert replier.wait(10) == 0
        none = subprocess.run(
            [*cli, "request", "svc/cli", "ping", "--url", daemon.url],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert none.returncode == 1 and "no responder" in none.stderr
    finally:
        if replier.poll() is None:
            replier.kill()
        replier.wait()
        replier.stdout.close()


def test_closing_a_stream_another_thread_waits_in(daemon):
    with tensorbus.connect(daemon.url) as srv:
        stream = srv.requests("svc/close")
        outcome = []

        def wait():
            try:
                stream.next(timeout=10)
            except Exception as exc:
                outcome.append(type(exc).__name__)

        t = threading.Thread(target=wait)
        t.start()
        time.sleep(0.2)  # it sleeps in the wait now
        stream.close()
        t.join(5)
        assert not t.is_alive() and outcome == ["ClientClosed"], outcome


def test_a_reply_to_a_gone_requester_does_not_recreate_its_inbox(daemon):
    with tensorbus.connect(daemon.url) as srv:
        stream = srv.requests("svc/gone")
        with tensorbus.connect(daemon.url) as cli:
            token = 0x1234
            cli.create_topic(R.inbox_topic(token), private=True)
            cli.publisher("svc/gone").send(b"q", meta=R.encode_meta(1, token, 0, R.KIND_REQUEST))
        req = stream.next(timeout=5)
        time.sleep(0.2)  # the requester's session (and inbox) are gone
        req.reply(b"too late")
        assert stream.stats["undeliverable"] == 1
        assert not any(t["name"].startswith("_inbox/") for t in srv.topics())
        with pytest.raises(tensorbus.TopicError, match="reply inboxes"):
            srv.create_topic("_inbox/0000000000000001")


def test_queue_group_under_pressure_loses_and_repeats_nothing(daemon, popen):
    """Three members on a 4-slot ring: members that sleep while the others
    claim on must catch up with the shared position, never move it."""
    with tensorbus.connect(daemon.url) as c:
        c.create_topic("grp/t", capacity=4)
        readers = [popen("group_reader", daemon.url, "grp/t") for _ in range(3)]
        for r in readers:
            assert read_line(r) == "ready"
        pub = c.publisher("grp/t")
        n = 20000
        for i in range(n):
            pub.send(b"%d" % i, timeout=10)
        got = []
        for r in readers:
            line = read_line(r, 30)
            got += [int(x) for x in line.split()]
        assert sorted(got) == list(range(n))  # each exactly once
        stats = c.stats("grp/t")["topics"][0]
        assert stats["drops"] == 0


def test_private_topic_removed_under_a_queue_group(daemon):
    with tensorbus.connect(daemon.url) as srv:
        before = srv.stats()["broker"]["bells_free"]
        with tensorbus.connect(daemon.url) as owner:
            owner.create_topic("_inbox/00000000000000aa", private=True)
            stream = srv.requests("_inbox/00000000000000aa")
        stream.close()
        time.sleep(0.2)
        assert srv.stats()["broker"]["bells_free"] == before


def test_responders_keep_a_bounded_number_of_reply_publishers(daemon):
    with tensorbus.connect(daemon.url) as srv:
        srv.respond("svc/many", lambda req: b"ok")
        for _ in range(R.REPLY_PUBLISHERS + 10):
            with tensorbus.connect(daemon.url) as cli:
                assert bytes(cli.request("svc/many", b"x").data) == b"ok"
        responder = srv._streams[0]
        assert len(responder.stream._replies) <= R.REPLY_PUBLISHERS
        gc.collect()
        inbox_rings = [n for n in srv._maps.rings if n]  # mappings still held
        assert len(inbox_rings) <= R.REPLY_PUBLISHERS + 2
