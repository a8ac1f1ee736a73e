"""The daemon's options, one dataclass: the typed result of the option table
(broker/options.py), which documents each and holds the same defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BrokerConfig"]


@dataclass
class BrokerConfig:
    """Every daemon option; broker/options.py documents each (its ``field``)."""

    ipc_path: str | None = None  # None: the per-user default
    tcp: str | None = None  # "HOST:PORT"
    token: str | None = None
    insecure: bool = False
    standby: bool = False  # wait on the socket's lock, then take over (broker/state.py)
    default_capacity: int = 256
    default_slot_size: int = 4096
    latest_capacity: int = 8
    max_subscribers: int = 64  # cursors per topic ring
    max_publishers: int = 64
    max_subscriptions: int = 4096  # doorbells: concurrent subscriptions on this host
    max_topics: int = 4096
    arena_size: int | None = None  # bytes; None: default_arena_size()
    # The arena's data on huge pages (broker/hugepages.py): "auto" (the
    # first hugetlbfs mount) or a directory on hugetlbfs; None: POSIX shm.
    arena_hugepages: str | None = None
    slow_consumer_grace: float = 0.0  # seconds; 0 disables eviction
    heartbeat_s: float = 2.0
    monitor_interval: float = 0.2
    # Bridges (docs/bridge.md): daemons to link to ("tcp://host:port"), the
    # data transport, the port links attach on (0: any; announced at link
    # time), how long a lost peer's cursors are kept, and a CURVE secret
    # key (z85) shared by the daemons of a cluster: encryption for tcp.
    peers: list = field(default_factory=list)
    transport: str = "auto"  # "ucx", "tcp" or "auto" (ucx where ucxx imports)
    link_port: int = 0
    stream_port: int = 0
    link_grace_s: float = 10.0
    # Hubs and leaves (broker/hubs.py): a hub relays between hubs and its
    # leaves; a leaf links to one of its listed hubs at a time.
    hub: bool = False
    leaf_of: list = field(default_factory=list)
    # How bridges batch topics: "PATTERN=off" or "PATTERN=SIZE[/US]" rules
    # (broker/batching.py); unmatched topics: 64 KiB and 100 µs.
    bridge_batch: list = field(default_factory=list)
    bridge_spin_us: float = 20.0  # a bridge spins this long before it sleeps (spare core only)
    local_first_us: float = 500.0  # a request waits this long for a local member, then may cross
    curve_secret: str | None = None
    log_level: str = "warning"  # the cli configures logging from these two
    log_format: str = "text"  # "text" or "json"
    # Prometheus metrics (docs/metrics.md): "HOST:PORT" or a bare port
    # (loopback) to serve /metrics on; topics with a label of their own.
    metrics: str | None = None
    metrics_max_topics: int = 100
    # Permissions (docs/permissions.md): the [[users]] of the TOML config,
    # parsed (broker/permissions.py User records); none: the owner's uid and
    # the token may do everything, as before. ``ipc_group``: share the ipc
    # socket and the segments with this group, so users of other uids in it
    # can connect.
    users: list = field(default_factory=list)
    ipc_group: str | None = None
