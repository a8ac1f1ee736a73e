"""The tensorbus broker daemon: control plane, topics, QoS, bridges, CLI.

It owns the shared-memory rings of ``tensorbus._core`` and never moves data
on one host itself."""

__all__: list[str] = []
