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
* ``bridge`` (with ``bridge_ucx``, ``peer_wire``): links to other daemons
  and light clients.
"""

__all__ = [
    "bridge",
    "config",
    "daemon",
    "liveness",
    "paths",
    "protocol",
    "registry",
    "startup",
    "stats",
    "topics",
]
