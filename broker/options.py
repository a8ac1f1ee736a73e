"""Every option of ``tensorbus serve``, listed once.

The flags of ``tensorbus serve`` (broker/config_load.py adds them to its
parser), the keys its ``--config`` TOML file may hold (checked by the same
module) and the config reference in docs/operations.md are all made from
:data:`OPTIONS`, so they cannot drift. To add an option: one entry here, a
field of the same name (or ``field=``) in broker/config.py with the same
default, then regenerate the reference::

    python -m tensorbus.broker.options --update docs/operations.md

(``--markdown`` prints it; tests/test_options.py fails while the doc differs.)
"""

from __future__ import annotations

import argparse
import sys

from tensorbus.broker.option_kinds import (
    ADDRESS,
    BOOLEAN,
    FLAG,
    INTEGER,
    NUMBER,
    SECRET_FILE,
    SIZE,
    STRING,
    STRINGS,
    SWITCH_OR_PATH,
    TABLES,
    TOML,
    Option,
)

__all__ = ["DOC_BEGIN", "DOC_END", "OPTIONS", "by_key", "markdown", "update_doc"]

LOG_LEVELS = ("debug", "info", "warning", "error")

OPTIONS: tuple[Option, ...] = (
    Option(
        "config",
        STRING,
        None,
        "TOML file of options: any key of this table; flags given as well win",
        where=FLAG,
        field=None,
        metavar="FILE",
    ),
    Option(
        "ipc",
        STRING,
        None,
        "path of the ipc socket",
        field="ipc_path",
        metavar="PATH",
        default_doc="$XDG_RUNTIME_DIR/tensorbus/broker.sock, else /tmp/tensorbus-$UID/broker.sock",
        aliases=("ipc_path",),
    ),
    Option(
        "tcp",
        STRING,
        None,
        "also serve the control protocol on HOST:PORT (PORT * for any free port): "
        "tools such as topics and stats, light clients, peer daemons; "
        "a non-loopback HOST needs a token or insecure",
        metavar="HOST:PORT",
        default_doc="none: ipc only",
    ),
    Option(
        "token_file",
        SECRET_FILE,
        None,
        "file holding the token tcp clients must present, read at start "
        "(without one: the token key, else $TENSORBUS_TOKEN)",
        field="token",
        metavar="FILE",
    ),
    Option(
        "token",
        STRING,
        None,
        "the token itself, if no token_file is given (a file keeps it out of the config)",
        where=TOML,
        env="TENSORBUS_TOKEN",
    ),
    Option(
        "insecure",
        BOOLEAN,
        False,
        "allow a non-loopback tcp address without a token",
    ),
    Option(
        "standby",
        BOOLEAN,
        False,
        "wait as a hot standby for the broker that serves this socket: when it dies "
        "(the kernel releases its lock) take over its state and serve at once",
    ),
    Option(
        "capacity",
        INTEGER,
        256,
        "default slots per topic ring (a power of two)",
        field="default_capacity",
        metavar="SLOTS",
        aliases=("default_capacity",),
    ),
    Option(
        "slot_size",
        INTEGER,
        4096,
        "default largest message in bytes",
        field="default_slot_size",
        metavar="BYTES",
        aliases=("default_slot_size",),
    ),
    Option(
        "latest_capacity",
        INTEGER,
        8,
        "default slots per ring of a latest topic (a power of two, at least 4)",
        where=TOML,
    ),
    Option("max_subscribers", INTEGER, 64, "subscriptions per topic", metavar="N"),
    Option("max_publishers", INTEGER, 64, "publishers per topic", where=TOML),
    Option(
        "max_subscriptions", INTEGER, 4096, "subscriptions on this host (doorbells)", metavar="N"
    ),
    Option("max_topics", INTEGER, 4096, "topics on this broker", metavar="N"),
    Option(
        "arena_size",
        SIZE,
        None,
        "shared memory for large messages and tensors, e.g. 4GiB",
        metavar="SIZE",
        default_doc="1GiB, or a quarter of /dev/shm if smaller",
    ),
    Option(
        "arena_hugepages",
        SWITCH_OR_PATH,
        None,
        "put the arena on huge pages: a file in DIR (alone: the first hugetlbfs mount), "
        "its size rounded up to whole pages, all reserved at start "
        "(docs/operations.md: reserving huge pages)",
        metavar="DIR",
        default_doc="off: POSIX shm",
    ),
    Option(
        "slow_consumer_grace",
        NUMBER,
        0.0,
        "evict a subscriber that stays too far behind this many seconds "
        "(reliable: ring full; realtime: still dropping); 0 = never",
        metavar="SECONDS",
    ),
    Option(
        "heartbeat",
        NUMBER,
        2.0,
        "heartbeat period in seconds, asked of tcp clients and kept on links",
        field="heartbeat_s",
        metavar="SECONDS",
        aliases=("heartbeat_s",),
    ),
    Option(
        "monitor_interval",
        NUMBER,
        0.2,
        "seconds between the checks of dead clients and slow consumers",
        where=TOML,
    ),
    Option(
        "peers",
        STRINGS,
        [],
        "other daemons to bridge topics with (their tcp addresses); any one member of a "
        "cluster is enough, gossip names the rest; the flag repeats",
        flag="--peer",
        metavar="tcp://HOST:PORT",
    ),
    Option(
        "hub",
        BOOLEAN,
        False,
        "be a hub: link only to other hubs (--peer, gossip) and to leaves, and relay "
        "between them (docs/bridge.md: hubs and leaves)",
    ),
    Option(
        "leaf_of",
        STRINGS,
        [],
        "be a leaf of these hubs: one link at a time, to the first that answers, the next "
        "on loss; accepts no daemon links; the flag repeats",
        flag="--leaf-of",
        metavar="tcp://HOST:PORT",
    ),
    Option(
        "transport",
        STRING,
        "auto",
        "how bridges carry data: ucx (ucxx), tcp (a TCP stream; ZeroMQ under CURVE), "
        "or auto (ucx where ucxx imports)",
        choices=("ucx", "tcp", "auto"),
        metavar="NAME",
    ),
    Option(
        "link_port",
        INTEGER,
        0,
        "port peers attach their link channel on, beside tcp; 0 = any free port",
        metavar="PORT",
    ),
    Option(
        "stream_port",
        INTEGER,
        0,
        "port peers' tcp data streams connect to, beside the link channel; 0 = any free port",
        metavar="PORT",
    ),
    Option(
        "link_grace",
        NUMBER,
        10.0,
        "keep a lost peer's cursors this many seconds before dropping them",
        field="link_grace_s",
        metavar="SECONDS",
        aliases=("link_grace_s",),
    ),
    Option(
        "bridge_batch",
        STRINGS,
        [],
        "how bridges batch topics, first match wins: PATTERN=off (each message alone) or "
        "PATTERN=SIZE[/MICROSECONDS] (a batch goes at this size, or once a message in it "
        "has waited this long); others: 64KiB/100",
        metavar="RULE",
    ),
    Option(
        "bridge_spin_us",
        NUMBER,
        20.0,
        "a bridge that just sent a stream (more than one message in a turn) spins this long "
        "for more before it sleeps, only while the host has a spare core (the clients' "
        "spinner table); 0: never spins",
        metavar="MICROSECONDS",
    ),
    Option(
        "local_first_us",
        NUMBER,
        500.0,
        "a request that other daemons' responders could serve is left this long to a "
        "member of the group on this host first (docs/reqrep.md, across hosts); "
        "with no member here it goes at once",
        metavar="MICROSECONDS",
    ),
    Option(
        "curve_secret_file",
        SECRET_FILE,
        None,
        "file holding the cluster's CURVE secret key (z85; docs/bridge.md): "
        "encrypts tcp between daemons and clients",
        field="curve_secret",
        metavar="FILE",
    ),
    Option(
        "curve_secret",
        STRING,
        None,
        "the CURVE secret key itself, if no curve_secret_file is given",
        where=TOML,
    ),
    Option(
        "ipc_group",
        STRING,
        None,
        "share the ipc socket, its directory and the segments with GROUP (0750/0660), "
        "so that [[users]] with a uid in it can connect (docs/permissions.md)",
        metavar="GROUP",
        default_doc="private to this uid",
    ),
    Option(
        "users",
        TABLES,
        [],
        "restricted users: [[users]] tables with name, token, token_file or uid, "
        "publish and subscribe allow/deny patterns, allow_responses (docs/permissions.md)",
        where=TOML,
    ),
    Option(
        "metrics",
        ADDRESS,
        None,
        "serve Prometheus metrics at http://HOST:PORT/metrics; a bare PORT means "
        "127.0.0.1 (docs/metrics.md lists them)",
        metavar="HOST:PORT",
        default_doc="no metrics",
    ),
    Option(
        "metrics_max_topics",
        INTEGER,
        100,
        'topics with a metrics label of their own; the rest sum into topic="other"',
        metavar="N",
    ),
    Option(
        "log_level",
        STRING,
        "warning",
        "the least severe log records shown",
        choices=LOG_LEVELS,
        metavar="LEVEL",
    ),
    Option(
        "log_format",
        STRING,
        "text",
        "how log records are written: text lines, or json, one JSON object per line "
        "(docs/operations.md)",
        choices=("text", "json"),
        metavar="FORMAT",
    ),
)


def by_key() -> dict[str, Option]:
    """Option by every TOML key it answers to (its name and aliases)."""
    keys = {}
    for option in OPTIONS:
        if option.is_key:
            for key in (option.name, *option.aliases):
                keys[key] = option
    return keys


# -- the config reference ---------------------------------------------------

DOC_BEGIN = "<!-- options: generated by python -m tensorbus.broker.options; do not edit -->"
DOC_END = "<!-- options: end -->"


def _toml_literal(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    return repr(value)


def _default(option: Option) -> str:
    if option.default is None:
        return option.default_doc or "none"
    return f"`{_toml_literal(option.default)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    """The config reference: one table row per option."""
    rows = [
        "| TOML key | flag | type | default | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for o in OPTIONS:
        key = f"`{o.name}`" if o.is_key else "(flag only)"
        if o.is_flag:
            arg = "" if o.kind is BOOLEAN else " " + (o.metavar or o.name.upper())
            if o.kind.const is not None:
                arg = f"[={o.metavar or o.name.upper()}]"
            flag = f"`{o.flag_name}{arg}`"
        else:
            flag = "(TOML only)"
        kind = o.kind.name
        if o.choices:
            kind = " \\| ".join(f'`"{c}"`' for c in o.choices)
        meaning = o.help[0].upper() + o.help[1:] + "."
        if o.aliases:
            meaning += " Also read as " + ", ".join(f"`{a}`" for a in o.aliases) + "."
        if o.env:
            meaning += f" Else `${o.env}`."
        rows.append(f"| {key} | {_cell(flag)} | {kind} | {_cell(_default(o))} | {_cell(meaning)} |")
    return "\n".join(rows) + "\n"


def update_doc(text: str) -> str:
    """``text`` (a markdown document) with the part between DOC_BEGIN and
    DOC_END replaced by :func:`markdown`; ValueError without the markers."""
    start, end = text.find(DOC_BEGIN), text.find(DOC_END)
    if start < 0 or end < start:
        raise ValueError(f"the document has no {DOC_BEGIN!r} ... {DOC_END!r} section")
    return text[: start + len(DOC_BEGIN)] + "\n\n" + markdown() + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    """``python -m tensorbus.broker.options --markdown | --update FILE``."""
    parser = argparse.ArgumentParser(
        prog="python -m tensorbus.broker.options",
        description="The config reference of tensorbus serve, made from its option table.",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--markdown", action="store_true", help="print the reference table")
    what.add_argument("--update", metavar="FILE", help="rewrite the reference section of FILE")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown())
        return 0
    with open(args.update, encoding="utf-8") as f:
        text = f.read()
    with open(args.update, "w", encoding="utf-8") as f:
        f.write(update_doc(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
