"""What applications import: the pub/sub client (sync and asyncio), built on
``tensorbus._core`` and the broker's protocol."""

from tensorbus.clients.client import Client, Message, Publisher, Subscriber, connect

__all__ = ["Client", "Message", "Publisher", "Subscriber", "connect"]
