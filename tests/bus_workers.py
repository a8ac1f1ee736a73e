"""Worker processes for the broker tests, run as ``python bus_workers.py
ROLE URL ...``. Each prints ``ready`` once set up, then its results."""

import hashlib
import sys
import time

import tensorbus


def subscriber(url, pattern, count, mode="read"):
    """Receive ``count`` messages and print their digest; ``mode=stall``
    subscribes and never reads (to be killed)."""
    with tensorbus.connect(url) as client, client.subscribe(pattern) as sub:
        print("ready", flush=True)
        if mode == "stall":
            time.sleep(600)
        digest = hashlib.sha256()
        last = {}
        for _ in range(int(count)):
            msg = sub.recv(timeout=20)
            if msg.seq != last.get(msg.topic, -1) + 1:
                print(f"gap {msg.topic} {last.get(msg.topic)} -> {msg.seq}", flush=True)
                return
            last[msg.topic] = msg.seq
            digest.update(bytes(msg.data))
        print(digest.hexdigest(), flush=True)


def publisher(url, topic, count, size, mode="send"):
    """Publish ``count`` numbered messages of ``size`` bytes; ``mode=forever``
    keeps publishing until killed."""
    with tensorbus.connect(url) as client:
        pub = client.publisher(topic, capacity=64)
        print("ready", flush=True)
        i = 0
        while mode == "forever" or i < int(count):
            pub.send(i.to_bytes(8, "little") * (int(size) // 8), timeout=30)
            i += 1
        print("done", flush=True)


def holder(url, pattern, count, mode="check"):
    """Receive ``count`` tensors and keep every view. Print their digests,
    then (``check``) wait for a line on stdin and print whether the held
    views are unchanged, or (``hold``) hold them until killed."""
    with tensorbus.connect(url) as client, client.subscribe(pattern) as sub:
        print("ready", flush=True)
        held = [sub.recv(timeout=20).data for _ in range(int(count))]
        digests = [hashlib.sha256(a.tobytes()).hexdigest() for a in held]
        print("held", flush=True)
        if mode == "hold":
            time.sleep(600)
        sys.stdin.readline()
        again = [hashlib.sha256(a.tobytes()).hexdigest() for a in held]
        print("intact" if again == digests else "overwritten", flush=True)


def loaner(url, topic, nbytes):
    """Loan a block of ``nbytes`` and never send it (to be killed)."""
    with tensorbus.connect(url) as client:
        pub = client.publisher(topic)
        arr = pub.loan(int(nbytes), "uint8")
        arr[:] = 1
        print("ready", flush=True)
        time.sleep(600)


TENSOR_SIZES = (96, 70_000, 1 << 20, 3 << 20)  # inline, then arena blocks of 3 orders


def tensor_publisher(url, topic, count, qos="reliable"):
    """Publish ``count`` int64 arrays filled with their index, cycling through
    TENSOR_SIZES bytes (every other one loaned)."""
    import numpy as np

    with tensorbus.connect(url) as client:
        pub = client.publisher(topic, qos=qos, capacity=16, timeout=30)
        print("ready", flush=True)
        for i in range(int(count)):
            n = TENSOR_SIZES[i % len(TENSOR_SIZES)] // 8
            if i % 2 and qos == "reliable":
                arr = pub.loan(n, "int64")
                arr.fill(i)
            else:
                arr = np.full(n, i, dtype=np.int64)
            pub.send(arr)
        print("done", flush=True)


def tensor_subscriber(url, pattern, count, qos="reliable"):
    """Check ``count`` arrays of tensor_publisher (every element its index;
    reliable: every index, in order), keeping the last few held."""
    import collections

    with tensorbus.connect(url) as client, client.subscribe(pattern) as sub:
        print("ready", flush=True)
        kept = collections.deque(maxlen=3)
        last, got = collections.defaultdict(lambda: -1), 0
        while got < int(count):
            try:
                msg = sub.recv(timeout=5 if qos == "reliable" else 1)
            except tensorbus.ReceiveTimeout:
                break
            a = msg.data
            i = int(a[0])
            if not (a == i).all() or a.nbytes != TENSOR_SIZES[i % len(TENSOR_SIZES)]:
                print(f"corrupt {i}", flush=True)
                return
            if (qos == "reliable" and i != last[msg.topic] + 1) or i <= last[msg.topic]:
                print(f"order {msg.topic} {last[msg.topic]} -> {i}", flush=True)
                return
            last[msg.topic] = i
            got += 1
            kept.append(a)
        for a in kept:  # held all along: still intact
            if not (a == a[0]).all():
                print("overwritten", flush=True)
                return
        print(f"ok {got}", flush=True)


def responder(url, topic, name, mode="echo"):
    """A queue-group member: ``echo`` answers ``<name>:<data>`` (``slow``:
    after 5 ms of work); ``stuck``
    prints ``got <id>`` for its first request and never answers (to be
    killed)."""
    with tensorbus.connect(url) as client:
        stream = client.requests(topic)
        print("ready", flush=True)
        while True:
            req = stream.next()
            if mode == "stuck":
                print(f"got {req.id}", flush=True)
                time.sleep(600)
            if mode == "slow":
                time.sleep(0.005)  # busy: the next request goes to a free member
            req.reply(f"{name}:".encode() + bytes(req.data))


def group_reader(url, topic, group="g"):
    """A queue-group member that reads until 2 s of silence, then prints
    every number it claimed."""
    with tensorbus.connect(url) as client, client.subscribe(topic, group=group) as sub:
        print("ready", flush=True)
        got = []
        while True:
            try:
                got.append(int(bytes(sub.recv(timeout=2).data)))
            except tensorbus.ReceiveTimeout:
                break
        print(" ".join(map(str, got)), flush=True)


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    roles = {
        "subscriber": subscriber,
        "publisher": publisher,
        "holder": holder,
        "loaner": loaner,
        "tensor_publisher": tensor_publisher,
        "tensor_subscriber": tensor_subscriber,
        "responder": responder,
        "group_reader": group_reader,
    }
    roles[role](*args)
