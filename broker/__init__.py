"""The tensorbus broker daemon: control plane, topics, QoS and liveness.

It owns the shared-memory rings of ``tensorbus._core`` and never moves data
on one host itself. ``protocol`` is the wire format, ``topics`` the naming
rules, ``daemon`` the server."""

__all__ = ["daemon", "paths", "protocol", "stats", "topics"]
