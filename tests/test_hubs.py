"""Hubs and leaves (broker/hubs.py, docs/bridge.md "Hubs and leaves"):
hubs relay between their leaves and the other hubs, each message crosses a
link at most once, interest propagates both ways, a leaf fails over to the
next hub, links whose roles do not join are refused with a sentence, and a
message that went round is dropped by its hop count."""

import collections
import os
import signal
import threading
import time

import numpy as np
import pytest
from daemons import TRANSPORTS, broker_stats, free_port, tcp_of, wait_for

import tensorbus
from tensorbus._core import FLAG_BRIDGED, FLAG_FROM_HUB, FLAG_GAP, FLAG_HOPS, BellTable, RingSet
from tensorbus._core import Subscriber as CoreSubscriber
from tensorbus._core.link_codec import EMPTY, BatchReader, BatchWriter, InState, OutState
from tensorbus.broker import hubs
from tensorbus.broker import peer_wire as W
from tensorbus.broker.batching import DEFAULT
from tensorbus.cli import stats_table

pytestmark = pytest.mark.timeout(120)

COMMON = ("--tcp", "127.0.0.1:*", "--transport", "tcp", "--heartbeat", "0.2")
COMMON += ("--link-grace", "1", "--arena-size", "32MiB")


def link_to(d, other) -> dict | None:
    """``d``'s link entry for daemon ``other`` (by its advertised url)."""
    url = tcp_of(other)
    return next((x for x in broker_stats(d)["links"] if x["peer"] == url), None)


def up_to(d, other) -> bool:
    link = link_to(d, other)
    return link is not None and link["state"] == "up"


def interest_of(d, other) -> list:
    link = link_to(d, other)
    return link["interest"] if link is not None else []


# -- eight daemons: two hubs, six leaves -------------------------------------


def test_two_hubs_six_leaves_relay_once_in_order_and_fail_over(daemon_factory, tmp_path):
    h1 = daemon_factory(*COMMON, "--hub", path=tmp_path / "h1")
    h2 = daemon_factory(*COMMON, "--hub", "--peer", tcp_of(h1), path=tmp_path / "h2")
    first = ("--leaf-of", tcp_of(h1), "--leaf-of", tcp_of(h2))
    second = ("--leaf-of", tcp_of(h2), "--leaf-of", tcp_of(h1))
    leaves = [
        daemon_factory(*COMMON, *(first if k < 3 else second), path=tmp_path / f"l{k}", wait=False)
        for k in range(6)
    ]
    for leaf in leaves:
        leaf.ready()
    wait_for(lambda: up_to(h1, h2), what="the hubs' link")
    # Each leaf links to one hub (its first, unless that one was slow to
    # answer under load): exactly one up link each.
    home = {}
    for leaf in leaves:
        wait_for(lambda leaf=leaf: up_to(h1, leaf) or up_to(h2, leaf), what="a leaf on a hub")
        home[leaf] = h1 if up_to(h1, leaf) else h2
        assert sum(x["state"] == "up" for x in broker_stats(leaf)["links"]) == 1
    # Gossip names hubs only: no leaf is a member, no leaf dialed another.
    assert broker_stats(h1)["cluster"] == sorted([tcp_of(h1), tcp_of(h2)])
    assert [x["peer"] for x in broker_stats(leaves[0])["links"]] == [tcp_of(h1), tcp_of(h2)]
    assert broker_stats(leaves[0])["cluster_role"] == "leaf"

    # Publishers on L1 and L4; subscribers on L0, L3 and L5, and on the
    # publishers' own leaves (a hub must not send a leaf its own back).
    l0, l1, l2, l3, l4, l5 = leaves
    subs_at = (l0, l1, l3, l4, l5)
    clients = {d: tensorbus.connect(d.url) for d in leaves}
    try:
        subs = {d: clients[d].subscribe("t/x") for d in subs_at}
        # Interest reaches every hop: each subscriber's hub, the other hub,
        # and each publisher's link to its hub.
        for d in subs_at:
            wait_for(lambda d=d: "t/x" in interest_of(home[d], d), what="a subscriber's hub")
            far = h2 if home[d] is h1 else h1
            wait_for(lambda d=d, far=far: "t/x" in interest_of(far, home[d]), what="the far hub")
        for d in (l1, l4):
            wait_for(lambda d=d: "t/x" in interest_of(d, home[d]), what="a publisher hears it")
        n = 150
        pubs = {d: clients[d].publisher("t/x") for d in (l1, l4)}
        for k in range(n):
            for d, origin in ((l1, b"a"), (l4, b"b")):
                pubs[d].send(b"%s%d" % (origin, k))
        for d in subs_at:
            got = collections.defaultdict(list)
            for _ in range(2 * n):
                data = bytes(subs[d].recv(timeout=10).data)
                got[data[:1]].append(int(data[1:]))
            assert got == {b"a": list(range(n)), b"b": list(range(n))}  # order, once each
        for d in subs_at:
            with pytest.raises(tensorbus.ReceiveTimeout):
                subs[d].recv(timeout=0.3)  # no duplicates behind them
        for hub in (h1, h2):
            assert all(x["hops_dropped"] == 0 for x in broker_stats(hub)["links"])

        # Withdrawal: all but L0 unsubscribe; their hubs stop asking for t/x,
        # and a hub left with no reader of it withdraws it from the other.
        for d in (l1, l3, l4, l5):
            subs[d].close()
        for d in (l1, l3, l4, l5):
            wait_for(lambda d=d: "t/x" not in interest_of(home[d], d), what="interest gone")
        for hub, other in ((h1, h2), (h2, h1)):
            if home[l0] is not other:  # no reader of t/x left under ``other``
                wait_for(
                    lambda hub=hub, other=other: "t/x" not in interest_of(hub, other),
                    what="a far leaf's withdrawal at the other hub",
                )
        assert "t/x" in interest_of(home[l0], l0)  # L0 still reads it

        # Failover: L0's hub dies; its leaves link to the other hub. A
        # reliable subscriber on L0 of a stream from a leaf of the other hub
        # either misses nothing or raises GapError.
        doomed = home[l0]
        survivor = h2 if doomed is h1 else h1
        publisher_leaf = next(d for d in (l4, l3, l5, l1, l2) if home[d] is survivor)
        sub_y = clients[l0].subscribe("t/y")
        wait_for(
            lambda: "t/y" in interest_of(publisher_leaf, survivor), what="L0's interest far off"
        )
        total = 300
        sent = threading.Event()

        def publish_y():
            with tensorbus.connect(publisher_leaf.url) as c:
                pub = c.publisher("t/y", timeout=20)
                for k in range(total):
                    pub.send(b"%d" % k)
                    time.sleep(0.004)
            sent.set()

        thread = threading.Thread(target=publish_y, daemon=True)
        thread.start()
        seen, gaps = [], 0
        killed = False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not killed and len(seen) >= 50:
                doomed.stop(signal.SIGKILL)
                killed = True
            try:
                m = sub_y.recv(timeout=3 if sent.is_set() else 5)
            except tensorbus.GapError:
                gaps += 1
                continue
            except tensorbus.ReceiveTimeout:
                if sent.is_set():
                    break
                continue
            seen.append(int(bytes(m.data)))
        thread.join(10)
        print(f"failover: {len(seen)} of {total} received, {gaps} GapError(s)")
        assert killed and sent.is_set()
        assert seen == sorted(set(seen)), "order kept, no duplicates"
        assert seen[-1] == total - 1, "the stream goes on through the other hub"
        if len(seen) < total:
            assert gaps >= 1, f"{total - len(seen)} message(s) lost without a GapError"
        for leaf in leaves:
            wait_for(lambda leaf=leaf: up_to(leaf, survivor), what="every leaf on the survivor")
    finally:
        for c in clients.values():
            c.close()


# -- bodies through a hub, and a hub's gap markers -----------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bodies_relay_without_echo_and_a_hubs_gap_marker_reaches_leaves(
    daemon_factory, tmp_path, transport
):
    """Tensors too large for a batch cross as bodies (the Python path) and
    are relayed by the hub; the publishing leaf, which reads the topic too,
    gets no copy back. Then the publishing leaf dies: the hub marks a gap
    in what it fed, and relays the marker to the other leaf."""
    common = (*COMMON, "--transport", transport)  # the last --transport wins
    hub = daemon_factory(*common, "--hub", path=tmp_path / "h")
    a = daemon_factory(*common, "--leaf-of", tcp_of(hub), path=tmp_path / "a")
    b = daemon_factory(*common, "--leaf-of", tcp_of(hub), path=tmp_path / "b")
    with tensorbus.connect(a.url) as ca, tensorbus.connect(b.url) as cb:
        sub_a, sub_b = ca.subscribe("params/big"), cb.subscribe("params/big")
        wait_for(lambda: "params/big" in interest_of(a, hub), what="B's interest at A")
        wait_for(lambda: "params/big" in interest_of(hub, a), what="A's interest at the hub")
        assert link_to(hub, a)["transport"] == transport
        pub = ca.publisher("params/big")
        big = np.arange(256 << 10, dtype=np.float32)  # 1 MiB: a body, not inline
        for k in range(3):
            big[0] = k
            pub.send(big)
        for sub in (sub_a, sub_b):
            for k in range(3):
                m = sub.recv(timeout=10)
                assert m.data[0] == k and np.array_equal(m.data[1:], big[1:])
                del m
        with pytest.raises(tensorbus.ReceiveTimeout):
            sub_a.recv(timeout=0.5)  # none of its own came back through the hub
        a.stop(signal.SIGKILL)
        with pytest.raises(tensorbus.GapError):
            sub_b.recv(timeout=10)  # the hub's marker, relayed
        assert all(x["hops_dropped"] == 0 for x in broker_stats(hub)["links"])


# -- refusals ------------------------------------------------------------------


def test_links_whose_roles_do_not_join_are_refused_with_a_sentence(daemon_factory, tmp_path):
    port = free_port()
    mesh = daemon_factory(*COMMON[2:], "--tcp", f"127.0.0.1:{port}", path=tmp_path / "m")
    leaf = daemon_factory(*COMMON, "--leaf-of", tcp_of(mesh), path=tmp_path / "l")
    hub = daemon_factory(*COMMON, "--hub", path=tmp_path / "h")
    other = daemon_factory(
        *COMMON, "--peer", tcp_of(hub), "--peer", tcp_of(leaf), path=tmp_path / "o"
    )
    # A --leaf-of naming a mesh daemon: the leaf's link says why ...
    refused = wait_for(lambda: (link_to(leaf, mesh) or {}).get("refused"), what="a refusal")
    assert "is not a hub" in refused and "--leaf-of" in refused
    # ... and so do the mesh daemon's recent refusals.
    reasons = [r["reason"] for r in broker_stats(mesh)["refused_links"]]
    assert any("is not a hub" in r for r in reasons)
    # A mesh daemon naming a hub (they disagree on membership) and a leaf.
    refused = wait_for(lambda: (link_to(other, hub) or {}).get("refused"), what="mesh vs hub")
    assert "disagree on membership" in refused
    assert any("disagree" in r["reason"] for r in broker_stats(hub)["refused_links"])
    refused = wait_for(lambda: (link_to(other, leaf) or {}).get("refused"), what="mesh vs leaf")
    assert "accepts no daemon links" in refused
    assert not any(x["state"] == "up" for x in broker_stats(other)["links"])
    # `tensorbus stats` prints them on both sides.
    for d, line in ((leaf, "  refused: "), (mesh, "refused link from ")):
        with tensorbus.connect(d.url, name="probe") as c:
            table = stats_table(c.stats())
        assert any(x.startswith(line) and "is not a hub" in x for x in table.splitlines())
    # A fix on the other side heals it: a hub on the mesh daemon's address.
    mesh.stop()
    fixed = daemon_factory(*COMMON[2:], "--tcp", f"127.0.0.1:{port}", "--hub", path=tmp_path / "m2")
    wait_for(lambda: up_to(leaf, fixed), timeout=20, what="the leaf linked to the new hub")
    assert link_to(leaf, fixed)["refused"] is None


def test_hub_and_leaf_of_together_are_refused_at_start():
    from tensorbus.broker.config import BrokerConfig
    from tensorbus.broker.config_load import _check_roles

    with pytest.raises(Exception, match="exclude each other"):
        _check_roles({"hub": True, "leaf_of": ["tcp://a:1"]})
    with pytest.raises(Exception, match="tcp://HOST:PORT"):
        _check_roles({"leaf_of": ["a:1"]})
    assert hubs.role_of(BrokerConfig(hub=True)) == "hub"
    assert hubs.role_of(BrokerConfig(leaf_of=["tcp://a:1"])) == "leaf"
    assert hubs.role_of(BrokerConfig()) == "mesh"


# -- pure rules --------------------------------------------------------------


def test_roles_join_only_leaf_to_hub_hub_to_hub_and_mesh_to_mesh():
    joins = {
        (a, b)
        for a in hubs.ROLES
        for b in hubs.ROLES
        if hubs.refusal(a, b, "tcp://d:1", "tcp://a:2") is None
    }
    assert joins == {("leaf", "hub"), ("hub", "hub"), ("mesh", "mesh")}
    assert "tcp://a:2 is a leaf" in hubs.refusal("hub", "leaf", "tcp://d:1", "tcp://a:2")


def test_relay_rules_per_link():
    hub_to_hub = hubs.link_rules("hub", "peer", "hub")
    assert hub_to_hub.read_skip == FLAG_FROM_HUB  # split horizon
    assert hub_to_hub.write_add & FLAG_FROM_HUB and hub_to_hub.write_keep & FLAG_GAP
    hub_to_leaf = hubs.link_rules("hub", "peer", "leaf")
    assert hub_to_leaf.read_skip == 0 and hub_to_leaf.echo and hub_to_leaf.read_keep & FLAG_GAP
    leaf = hubs.link_rules("leaf", "peer", "hub")
    assert leaf.read_skip == FLAG_BRIDGED | FLAG_GAP  # only its own go up
    mesh = hubs.link_rules("mesh", "peer", "mesh")
    assert mesh.read_skip == FLAG_BRIDGED | FLAG_GAP and mesh.write_add == FLAG_BRIDGED
    client = hubs.link_rules("hub", "client", None)
    assert client.hop_step == 0 and client.write_add == 0


def test_the_hop_count_rule_in_python():
    keep, add = 0xFF | FLAG_HOPS, FLAG_BRIDGED
    assert hubs.arrived_flags(0x05, keep, add, 1, hubs.MAX_HOPS) == 0x05 | add | 0x100
    assert hubs.arrived_flags(0x0205, keep, add, 1, 3) == 0x05 | add | 0x300
    assert hubs.arrived_flags(0x0305, keep, add, 1, 3) is None  # a fourth link
    assert hubs.arrived_flags(0x0F05, keep, add, 1, 3) is None  # out of range
    assert hubs.arrived_flags(0x0F05, 0xFF, 0, 0, 3) == 0x05  # a light client: local


# -- the core codec: hop count and echo publisher -----------------------------


@pytest.fixture
def bells(tmp_path):
    table = BellTable.create(4, str(tmp_path), instance=f"hubs{os.getpid()}")
    yield table
    table.segment.unlink()


def test_the_codec_counts_hops_and_drops_past_the_limit(make_ring, bells):
    ring = make_ring(capacity=16, slot_size=256, bells=bells)
    cursor, generation = ring.join_cursor(os.getpid(), bell=1)
    sub = CoreSubscriber(ring, cursor=cursor, generation=generation)
    pub = ring.publisher()
    pub.inline_max = 200
    topics = {3: InState(3, pub, collections.deque())}
    batch = b"".join(
        W.encode_batch_entry(W.BYTES, flags, 3, seq, 2) + b"m%d" % seq
        for seq, flags in enumerate((0x0001, 0x0201, 0x0301, 0xFF01, 0x0002))
    )
    writer = BatchWriter(0xFF | FLAG_HOPS | FLAG_GAP, FLAG_BRIDGED, 1, hubs.MAX_HOPS)
    assert writer.publish(batch, 0, topics) == len(batch)
    assert writer.hops_dropped == 2  # three links before this one, and 15
    assert topics[3].fresh_msgs == 5  # all credited
    got = []
    for _ in range(3):
        data = sub.recv(timeout=1)
        got.append((data, sub.last_flags))
    assert got == [
        (b"m0", 0x0001 | FLAG_BRIDGED | 0x100),
        (b"m1", 0x0001 | FLAG_BRIDGED | 0x300),
        (b"m4", 0x0002 | FLAG_BRIDGED | 0x100),
    ]


def test_the_reader_never_sends_a_leaf_its_own_messages(make_ring, bells):
    ring = make_ring(capacity=16, slot_size=256, bells=bells)
    rs = RingSet(bells, 0, raise_gaps=False)
    cursor, generation = ring.join_cursor(os.getpid(), bell=1)
    rs.add("t", CoreSubscriber(ring, cursor=cursor, generation=generation))
    from_leaf, local = ring.publisher(), ring.publisher()
    from_leaf.send(b"echo", flags=FLAG_BRIDGED | 0x100)
    local.send(b"here", flags=0)
    from_leaf.send(b"echo2", flags=FLAG_BRIDGED | 0x100)
    t = OutState(1, True, 100, 1 << 20, DEFAULT.nbytes, DEFAULT.ns)
    t.announced = True
    assert t.echo_publisher == -1
    t.echo_publisher = from_leaf.index
    rules = hubs.link_rules("hub", "peer", "leaf")
    reader = BatchReader(rules.read_keep, rules.read_skip, 64 << 10)
    batch = bytearray()
    assert reader.take(rs, {"t": t}, batch, 1 << 16) == EMPTY
    (entry,) = W.decode_batch(bytes(batch))
    assert bytes(entry.payload) == b"here" and t.sent == 1
