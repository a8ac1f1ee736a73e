"""Regressions found in review: a topic attached while another thread waits
in recv, queue-group members that slept through many claims, an overtaken
realtime send, a private topic removed under its queue group, and the reply
publishers a long-lived responder keeps."""

import gc
import threading
import time

import numpy as np

import tensorbus
from tensorbus._core import Arena, Ring
from tensorbus.clients import reqrep as R

from conftest import read_line


def test_attach_while_another_thread_waits(daemon):
    with tensorbus.connect(daemon.url) as c:
        sub = c.subscribe("w/>")
        got = []

        def wait():
            got.append(bytes(sub.recv(timeout=10).data))

        t = threading.Thread(target=wait)
        t.start()
        time.sleep(0.2)  # it sleeps on the ring set's arrays now
        for i in range(20):  # each new topic rebuilds those arrays (attach notice)
            c.publisher(f"w/t{i}")
        c.publisher("w/last").send(b"done")
        t.join(10)
        assert got == [b"done"]


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


def test_realtime_arena_sends_without_readers_leave_nothing():
    arena = Arena.create("16MiB", instance="rv")
    try:
        holder = arena.holder(1)
        ring = Ring.create(capacity=2, slot_size=4096, policy="overwrite", instance="rv",
                           holder=holder)  # fmt: skip
        try:
            pub = ring.publisher()
            pub.inline_max = 0
            for _ in range(50):
                pub.send(np.ones(1000))
            ring.reclaim()
            # Nothing reads the ring: every block went back (overtaken sends,
            # never written, cancel theirs instead of leaking them).
            assert arena.stats()["used"] == 0
            assert arena.stats()["allocs"] == arena.stats()["frees"]
        finally:
            ring.unlink()
    finally:
        arena.unlink()


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
