"""The tensorbus broker daemon: control plane, topics, QoS, liveness and bridges.

It owns the shared-memory rings of ``tensorbus._core`` and never moves data
on one host itself.

* ``protocol``: the control protocol's wire format; ``topics``: the naming
  rules; ``config``: the daemon's options.
* ``registry``: topics, subscriptions, queue groups and sessions, and the
  operations on them, with no sockets and no event loop.
* ``daemon``: the event loop, the op table and session I/O; ``startup``:
  the lock and the sweep; ``liveness``: pidfds, heartbeats, pressure and
  slow consumers; ``stats``: meters; ``paths``: where the socket lives.
* ``metrics``: Prometheus metrics (``--metrics``) from snapshots the loop
  takes; ``metrics_table``: their definitions; ``metrics_totals``:
  cumulative per-topic totals from the rings' counters.
* ``bridge``: links to other daemons and light clients (accept, dial,
  heartbeats); ``peer``: one remote party and its link epochs; ``link``:
  the link channel; ``flow_out`` / ``flow_in``: cursors, batching and
  credit / backlog and gaps; ``bridge_ucx``: UCX data; ``peer_wire``: the
  link wire format; ``bridge_view``: the registry as the bridge sees it.
* ``soon``: run a function once, soon; ``curve``: CURVE on tcp sockets.
"""

__all__ = [
    "bridge",
    "bridge_ucx",
    "bridge_view",
    "config",
    "curve",
    "daemon",
    "flow_in",
    "flow_out",
    "link",
    "liveness",
    "metrics",
    "metrics_table",
    "metrics_totals",
    "paths",
    "peer",
    "peer_wire",
    "protocol",
    "registry",
    "soon",
    "startup",
    "stats",
    "topics",
]
