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


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    {"subscriber": subscriber, "publisher": publisher}[role](*args)
