"""What applications import: the pub/sub client, the parameter server and
the PyTorch DDP comm hook, built on ``tensorbus._core`` and the broker's
protocol."""

__all__: list[str] = []
