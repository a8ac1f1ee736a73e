"""The asyncio client: ``client = await tensorbus.aio.connect()``."""

from tensorbus.clients.aio import AsyncClient, AsyncPublisher, AsyncSubscriber, connect

__all__ = ["AsyncClient", "AsyncPublisher", "AsyncSubscriber", "connect"]
