"""A cluster from one seed (broker/gossip.py): daemons that each name one
member in --peer join the full mesh, carry messages over the links gossip
made, and drop a member that leaves after --link-grace."""

import signal
import time

import pytest
from daemons import broker_stats, free_port, tcp_of, wait_for

import tensorbus
from tensorbus.broker import peer_wire as W

pytestmark = pytest.mark.timeout(90)

COMMON = ("--tcp", "127.0.0.1:*", "--transport", "tcp", "--heartbeat", "0.2")
COMMON += ("--link-grace", "1", "--arena-size", "64MiB")


def up_links(d) -> int:
    return sum(1 for link in broker_stats(d)["links"] if link["state"] == "up")


def test_four_daemons_join_the_mesh_from_one_seed_and_drop_a_leaver(daemon_factory, tmp_path):
    a = daemon_factory(*COMMON, path=tmp_path / "a")
    b = daemon_factory(*COMMON, "--peer", tcp_of(a), path=tmp_path / "b")
    c = daemon_factory(*COMMON, "--peer", tcp_of(a), path=tmp_path / "c")
    d = daemon_factory(*COMMON, "--peer", tcp_of(b), path=tmp_path / "d")  # A only through B
    everyone = [a, b, c, d]
    urls = sorted(tcp_of(x) for x in everyone)
    for x in everyone:
        wait_for(lambda x=x: broker_stats(x)["cluster"] == urls, what="the whole cluster")
        wait_for(lambda x=x: up_links(x) == 3, what="a link to every other member")
    # C and D never named each other: the link gossip made carries the data.
    with tensorbus.connect(c.url) as cc, tensorbus.connect(d.url) as cd:
        sub = cc.subscribe("grad/d")
        wait_for(
            lambda: any(
                "grad/d" in link["interest"] and link["peer"] == tcp_of(c)
                for link in broker_stats(d)["links"]
            ),
            what="C's interest at D",
        )
        pub = cd.publisher("grad/d")
        for k in range(50):
            pub.send(b"%d" % k)
        assert [int(bytes(sub.recv(timeout=5).data)) for _ in range(50)] == list(range(50))
        with pytest.raises(tensorbus.ReceiveTimeout):
            sub.recv(timeout=0.3)  # each message crossed once: one link per pair
    # B leaves for good: after the grace, the others list it no more.
    b.stop(signal.SIGKILL)
    rest = sorted(tcp_of(x) for x in (a, c, d))
    for x in (a, c, d):
        wait_for(lambda x=x: broker_stats(x)["cluster"] == rest, what="B out of the cluster")
    # A and C forget it (it dialed A; C learned it); D named it, so keeps dialing it.
    for x in (a, c):
        wait_for(
            lambda x=x: tcp_of(b) not in [link["peer"] for link in broker_stats(x)["links"]],
            what="B forgotten",
        )
    assert up_links(c) == 2 and up_links(a) == 2


def test_daemons_started_at_once_each_naming_another_form_one_mesh(daemon_factory, tmp_path):
    """Every daemon learns of the others while they dial it: each pair ends
    with exactly one link, whoever dialed first."""
    ports = [free_port() for _ in range(4)]
    common = COMMON[2:]  # all but --tcp
    started = []
    for k, port in enumerate(ports):
        seed = ("--peer", f"tcp://127.0.0.1:{ports[k - 1]}") if k else ()
        started.append(
            daemon_factory(
                "--tcp", f"127.0.0.1:{port}", *common, *seed, path=tmp_path / f"d{k}", wait=False
            )
        )
    for d in started:
        d.ready()
    urls = sorted(f"tcp://127.0.0.1:{port}" for port in ports)
    for d in started:
        wait_for(lambda d=d: broker_stats(d)["cluster"] == urls, what="the whole cluster")
        wait_for(lambda d=d: up_links(d) == 3, what="one link to every other member")
    time.sleep(1.0)  # any duplicate link would have shown up by now
    for d in started:
        peers = [link["peer"] for link in broker_stats(d)["links"] if link["state"] == "up"]
        assert len(peers) == len(set(peers)) == 3


def test_a_members_message_is_checked():
    ok = W.encode_control("members", urls=["tcp://10.0.0.1:5555"])
    assert W.decode_control(ok) == ("members", {"urls": ["tcp://10.0.0.1:5555"]})
    for urls in (["ipc:///tmp/x"], [5], ["tcp://" + "x" * 300], ["tcp://h:1"] * 5000):
        with pytest.raises(W.WireError, match="members is a list"):
            W.decode_control(W.encode_control("members", urls=urls))
