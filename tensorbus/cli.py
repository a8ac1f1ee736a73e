"""The ``tensorbus`` command: run the broker and talk to it.

tensorbus serve [--config FILE] [--ipc PATH] [--tcp HOST:PORT] [--log-format json] ...
tensorbus topics [PATTERN]
tensorbus stats [--watch [SECONDS]]
tensorbus pub TOPIC DATA [--count N] [--interval S]
tensorbus sub PATTERN [--count N]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from tensorbus._core.errors import TensorbusError
from tensorbus.broker.config_load import ConfigError, add_serve_flags, config_from
from tensorbus.broker.daemon import BrokerStartError, run
from tensorbus.broker.logs import setup_logging
from tensorbus.clients.client import connect

__all__ = ["main"]


def _url_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default=None,
        help="broker to talk to: ipc:///path or tcp://host:port "
        "(default: $TENSORBUS_URL, else this user's local broker)",
    )


def _parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="tensorbus",
        description="Low-latency message broker "
        "for ML clusters: shared-memory pub/sub on one host.",
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "serve",
        help="run the broker daemon in the foreground",
        description="Run the broker. Prints one line 'tensorbus ready "
        "<endpoint>...' on stdout once it accepts clients; SIGTERM or "
        "SIGINT shut it down and remove every segment it made.",
    )
    add_serve_flags(s)  # every option of broker/options.py that has a flag

    t = sub.add_parser("topics", help="list topics", description="List the broker's topics.")
    t.add_argument("pattern", nargs="?", default=None, help="only topics matching this pattern")
    t.add_argument("--json", action="store_true", help="print JSON")
    _url_arg(t)

    st = sub.add_parser(
        "stats",
        help="per-topic statistics",
        description="Per topic: publishers, subscribers, msgs/s, bytes/s, "
        "depth (slowest subscriber's lag), drops, p50/p99 delivery latency "
        "(from the messages' timestamps) over the last second.",
    )
    st.add_argument("pattern", nargs="?", default=None)
    st.add_argument(
        "--watch",
        nargs="?",
        const=1.0,
        type=float,
        metavar="SECONDS",
        help="refresh every SECONDS (default 1) until Ctrl-C",
    )
    st.add_argument("--count", type=int, default=None, help="with --watch: stop after N tables")
    st.add_argument("--json", action="store_true", help="print JSON")
    _url_arg(st)

    p = sub.add_parser(
        "pub",
        help="publish a message",
        description="Publish DATA on TOPIC (DATA '-' publishes each line of stdin).",
    )
    p.add_argument("topic")
    p.add_argument("data")
    p.add_argument("--qos", choices=["reliable", "realtime", "latest"], default=None)
    p.add_argument("--count", type=int, default=1, help="send it N times")
    p.add_argument("--interval", type=float, default=0.0, help="seconds between sends")
    _url_arg(p)

    r = sub.add_parser(
        "sub",
        help="print messages",
        description="Print the messages of "
        "every topic matching PATTERN ('*' one level, '>' the rest).",
    )
    r.add_argument("pattern")
    r.add_argument("--count", type=int, default=None, help="exit after N messages")
    r.add_argument("--timeout", type=float, default=None, help="exit after SECONDS of silence")
    r.add_argument("--json", action="store_true", help="one JSON object per message")
    _url_arg(r)

    rq = sub.add_parser(
        "request",
        help="send one request, print the reply",
        description="Send DATA as a request on TOPIC to one responder and print "
        "its reply (exit 1 with the reason if there is none).",
    )
    rq.add_argument("topic")
    rq.add_argument("data")
    rq.add_argument("--timeout", type=float, default=5.0, help="seconds per attempt")
    rq.add_argument("--retries", type=int, default=2, help="re-sends without a reply")
    _url_arg(rq)

    rp = sub.add_parser(
        "reply",
        help="answer requests with fixed data",
        description="Join queue group GROUP on TOPIC and answer each request with "
        "DATA, printing what was asked.",
    )
    rp.add_argument("topic")
    rp.add_argument("data")
    rp.add_argument("--group", default="responders", help="queue group (default responders)")
    rp.add_argument("--count", type=int, default=None, help="exit after N requests")
    _url_arg(rp)

    ps = sub.add_parser(
        "ps",
        help="run a parameter-server shard",
        description="Average the gradients of WORLD_SIZE trainers (the DDP hook "
        "tensorbus.clients.ddp.ps_hook) for shard SHARD of NUM_SHARDS of job JOB. "
        "Prints 'tensorbus ps ready' once subscribed; SIGTERM or SIGINT stop it.",
    )
    ps.add_argument("--job", required=True)
    ps.add_argument("--shard", type=int, required=True)
    ps.add_argument("--num-shards", type=int, default=1)
    ps.add_argument("--world-size", type=int, required=True)
    ps.add_argument("--mode", choices=["sync", "async"], default="sync")
    ps.add_argument(
        "--staleness",
        type=int,
        default=0,
        metavar="K",
        help="async: how many steps a trainer may run ahead of the slowest (default 0)",
    )
    ps.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="sync: fail a step missing a trainer after this long; "
        "async: leave a silent trainer out after this long (default 30)",
    )
    ps.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    _url_arg(ps)
    return top


def _serve(args: argparse.Namespace) -> int:
    try:
        config = config_from(args)
    except ConfigError as exc:
        print(f"tensorbus: {exc}", file=sys.stderr)
        return 1
    setup_logging(config.log_level, config.log_format)

    def ready(endpoints: list[str]) -> None:
        print("tensorbus ready " + " ".join(endpoints), flush=True)

    try:
        return run(config, ready)
    except (BrokerStartError, PermissionError) as exc:
        print(f"tensorbus: {exc}", file=sys.stderr)
        return 1


def _fmt_rate(x: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.1f}{suffix}{unit}"
    return f"{x:.0f}{unit}"


def _fmt_bytes(n: int) -> str:
    for scale, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {suffix}"
    return f"{n} B"


def _fmt_ns(ns: float | None) -> str:
    if ns is None:
        return "-"
    if ns >= 1e6:
        return f"{ns / 1e6:.1f}ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.1f}us"
    return f"{ns:.0f}ns"


def stats_table(stats: dict) -> str:
    """The ``tensorbus stats`` table for one stats reply."""
    rows = [("TOPIC", "QOS", "PUBS", "SUBS", "MSGS/S", "BYTES/S", "DEPTH", "DROPS", "P50", "P99")]
    for t in sorted(stats["topics"], key=lambda t: t["name"]):
        rows.append(
            (
                t["name"],
                t["qos"],
                str(t["publishers"]),
                str(t["subscribers"]),
                _fmt_rate(t["msgs_per_s"]),
                _fmt_rate(t["bytes_per_s"], "B"),
                str(t["depth"]),
                str(t["drops"]),
                _fmt_ns(t["p50_ns"]),
                _fmt_ns(t["p99_ns"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    b = stats["broker"]
    lines.append(
        f"broker pid {b['pid']}: {b['topics']} topics, {b['sessions']} clients, "
        f"rss {b['rss_kb'] / 1024:.1f} MiB, up {b['uptime_s']:.0f} s"
    )
    if "role" in b:
        standby = b.get("standby_pid")
        line = (
            f"role: {b['role']}, standby: {f'pid {standby}' if standby else 'none'}, "
            f"takeovers: {b['takeovers']}"
        )
        last = b.get("takeover")
        if last:
            line += (
                f" (last from pid {last['previous_pid']}: {last['topics']} topics, "
                f"{last['sessions']} clients in {last['ms']:.1f} ms)"
            )
        lines.append(line)
    arena = b.get("arena")
    if arena:
        lines.append(
            f"arena: {_fmt_bytes(arena['used'])} of {_fmt_bytes(arena['size'])} in use, "
            f"largest free block {_fmt_bytes(arena['largest_free'])}, "
            f"{arena['allocs']} allocations"
            + (
                f", on {_fmt_bytes(arena['page_size'])} huge pages ({arena['path']})"
                if arena.get("hugepages")
                else ""
            )
        )
    cluster = b.get("cluster") or []
    cluster_role = b.get("cluster_role", "mesh")
    if len(cluster) > 1 or cluster_role != "mesh":
        lines.append(
            f"cluster ({cluster_role}): {len(cluster)} members: {', '.join(cluster) or '-'}"
        )
    for link in b.get("links") or []:
        role = link.get("role")  # hubs and leaves name theirs; a mesh link reads as before
        kind = f"{link['kind']} ({role})" if role in ("hub", "leaf") else link["kind"]
        path = link["transport"] or "-"
        if link.get("data") == "stream":
            path += " stream"  # a plain TCP stream, not ZeroMQ (docs/bridge.md)
        lines.append(
            f"link {kind} {link['peer']}: {link['state']} ({path}) "
            f"for {link['for_s']:.0f} s, interest {','.join(link['interest']) or '-'}, "
            f"sent {link['sent']} ({_fmt_bytes(link['sent_bytes'])}), "
            f"received {link['received']} ({_fmt_bytes(link['received_bytes'])}), "
            f"dropped {link['dropped']}, gaps {link['gaps']}, reconnects {link['reconnects']}"
            + (f", hops dropped {link['hops_dropped']}" if link.get("hops_dropped") else "")
        )
        if link.get("refused"):
            lines.append(f"  refused: {link['refused']}")
    for refused in b.get("refused_links") or []:
        lines.append(f"refused link from {refused['peer']}: {refused['reason']}")
    for g in b.get("remote_groups") or []:
        lines.append(
            f"group {g['group']} on {g['topic']}: {g['members_here']} member(s) here, "
            f"served too by {', '.join(g['servers'])}"
        )
    return "\n".join(lines)


def _stats(args: argparse.Namespace) -> int:
    with connect(args.url, name="tensorbus-stats") as client:
        n = 0
        while True:
            stats = client.stats(args.pattern)
            if args.json:
                print(json.dumps(stats), flush=True)
            else:
                if args.watch and sys.stdout.isatty():
                    print("\x1b[H\x1b[2J", end="")
                print(stats_table(stats), flush=True)
            n += 1
            if not args.watch or (args.count is not None and n >= args.count):
                return 0
            time.sleep(args.watch)


def _topics(args: argparse.Namespace) -> int:
    with connect(args.url, name="tensorbus-topics") as client:
        topics = client.topics(args.pattern)
    if args.json:
        print(json.dumps(topics))
        return 0
    for t in sorted(topics, key=lambda t: t["name"]):
        print(
            f"{t['name']}\t{t['qos']}\tcapacity={t['capacity']}\tslot={t['slot_size']}\t"
            f"pubs={t['publishers']}\tsubs={t['subscribers']}"
        )
    return 0


def _pub(args: argparse.Namespace) -> int:
    with connect(args.url, name="tensorbus-pub") as client:
        pub = client.publisher(args.topic, qos=args.qos)
        lines = (
            (line.rstrip("\n").encode() for line in sys.stdin)
            if args.data == "-"
            else (args.data.encode() for _ in range(args.count))
        )
        for data in lines:
            pub.send(data)
            if args.interval:
                time.sleep(args.interval)
        pub.close()
    return 0


def _sub(args: argparse.Namespace) -> int:
    from tensorbus.clients.errors import ReceiveTimeout

    with connect(args.url, name="tensorbus-sub") as client, client.subscribe(args.pattern) as sub:
        n = 0
        while args.count is None or n < args.count:
            try:
                msg = sub.recv(timeout=args.timeout)
            except ReceiveTimeout:
                return 0
            payload = bytes(msg.data)
            if args.json:
                print(
                    json.dumps(
                        {
                            "topic": msg.topic,
                            "seq": msg.seq,
                            "timestamp_ns": msg.timestamp_ns,
                            "data": payload.decode(errors="replace"),
                        }
                    ),
                    flush=True,
                )
            else:
                print(f"{msg.topic} {payload.decode(errors='replace')}", flush=True)
            n += 1
    return 0


def _text(data) -> str:
    return bytes(data).decode(errors="replace") if not hasattr(data, "dtype") else repr(data)


def _request_cmd(args: argparse.Namespace) -> int:
    with connect(args.url, name="tensorbus-request") as client:
        reply = client.request(
            args.topic, args.data.encode(), timeout=args.timeout, retries=args.retries
        )
        print(_text(reply.data), flush=True)
    return 0


def _reply_cmd(args: argparse.Namespace) -> int:
    with connect(args.url, name="tensorbus-reply") as client:
        stream = client.requests(args.topic, group=args.group)
        print(f"tensorbus reply ready on {args.topic} (group {args.group})", flush=True)
        n = 0
        while args.count is None or n < args.count:
            req = stream.next()
            print(f"{req.topic} #{req.id}: {_text(req.data)}", flush=True)
            req.reply(args.data.encode())
            n += 1
    return 0


def _ps(args: argparse.Namespace) -> int:
    import signal

    from tensorbus.clients.ps import ParameterServer

    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s tensorbus-ps %(levelname)s %(message)s",
    )
    with ParameterServer(
        args.job,
        args.shard,
        args.num_shards,
        args.world_size,
        args.mode,
        staleness=args.staleness,
        url=args.url,
        timeout=args.timeout,
    ) as server:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: server.stop())
        print(
            f"tensorbus ps ready job={args.job} shard={args.shard}/{args.num_shards} "
            f"world_size={args.world_size} mode={args.mode}",
            flush=True,
        )
        server.serve()
        print(f"tensorbus ps stopped: {server.stats}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {
        "serve": _serve,
        "topics": _topics,
        "stats": _stats,
        "pub": _pub,
        "sub": _sub,
        "ps": _ps,
        "request": _request_cmd,
        "reply": _reply_cmd,
    }[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except TensorbusError as exc:
        print(f"tensorbus: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
