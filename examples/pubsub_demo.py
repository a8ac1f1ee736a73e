"""A small pub/sub story on one machine, with the live stats view.

Starts a broker daemon on a private socket, a subscriber on ``demo/>``, a
reliable gradient-like stream, a realtime telemetry stream and a "latest"
stream of 4 MiB parameter tensors (loaned from the arena, sent with no
copy, viewed in place by the subscriber), shows
``tensorbus stats --watch`` for a few seconds, then stops everything it
started (the daemon unlinks every segment on SIGTERM).

    python examples/pubsub_demo.py [--seconds 4]
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

import tensorbus


def publish(url: str, topic: str, qos: str, rate: float, seconds: float) -> None:
    with tensorbus.connect(url, name=f"demo-pub-{topic}") as client:
        pub = client.publisher(topic, qos=qos, capacity=1024)
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            if qos == "latest":
                params = pub.loan((1024, 1024), "float32")  # 4 MiB in the arena
                params.fill(i)
                pub.send(params)  # no copy
                time.sleep(1 / rate)
            else:
                pub.send(i.to_bytes(8, "little") * 32)  # 256 B
                if i % 100 == 99:
                    time.sleep(100 / rate)
            i += 1


def subscribe(url: str, seconds: float) -> None:
    with tensorbus.connect(url, name="demo-sub") as client, client.subscribe("demo/>") as sub:
        end = time.monotonic() + seconds
        counts: dict[str, int] = {}
        while time.monotonic() < end:
            for msg in sub.recv_batch(256, max_wait=0.1):
                counts[msg.topic] = counts.get(msg.topic, 0) + 1
                if msg.is_tensor:  # a view of the arena block: checked in place
                    assert msg.data[0, 0] == msg.data[-1, -1]
                # Give the arena block back now: the loop variable would
                # otherwise hold the last message through the next wait.
                msg.release()
        print("subscriber received:", counts, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    run_dir = tempfile.mkdtemp(prefix="tensorbus-demo-")
    os.chmod(run_dir, 0o700)
    sock = os.path.join(run_dir, "broker.sock")
    cli = [sys.executable, "-m", "tensorbus"]
    daemon = subprocess.Popen(
        [*cli, "serve", "--ipc", sock, "--arena-size", "256MiB"], stdout=subprocess.PIPE, text=True
    )
    children = [daemon]
    try:
        ready = daemon.stdout.readline().strip()
        print(ready, flush=True)
        url = ready.split()[2]
        me = [sys.executable, __file__]
        children.append(subprocess.Popen([*me, "--child", "subscribe", url, str(args.seconds)]))
        time.sleep(0.3)
        children.append(
            subprocess.Popen(
                [
                    *me,
                    "--child",
                    "publish",
                    url,
                    "demo/grad/0",
                    "reliable",
                    "50000",
                    str(args.seconds - 0.5),
                ]
            )
        )
        children.append(
            subprocess.Popen(
                [
                    *me,
                    "--child",
                    "publish",
                    url,
                    "demo/telemetry",
                    "realtime",
                    "5000",
                    str(args.seconds - 0.5),
                ]
            )
        )
        children.append(
            subprocess.Popen(
                [
                    *me,
                    "--child",
                    "publish",
                    url,
                    "demo/params/0",
                    "latest",
                    "200",
                    str(args.seconds - 0.5),
                ]
            )
        )
        time.sleep(1.0)
        subprocess.run(
            [
                *cli,
                "stats",
                "--url",
                url,
                "--watch",
                "1",
                "--count",
                str(max(1, int(args.seconds) - 1)),
            ],
            check=False,
        )
        for child in children[1:]:
            child.wait(timeout=args.seconds + 30)
        return 0
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(10)
                except subprocess.TimeoutExpired:
                    child.kill()
        left = [n for n in os.listdir("/dev/shm") if f"-d{daemon.pid}-" in n]
        print(f"daemon stopped (exit {daemon.returncode}); segments left: {len(left)}")
        subprocess.run(["rm", "-rf", run_dir], check=False)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        role, *rest = sys.argv[2:]
        if role == "publish":
            publish(rest[0], rest[1], rest[2], float(rest[3]), float(rest[4]))
        else:
            subscribe(rest[0], float(rest[1]))
        sys.exit(0)
    sys.exit(main())
