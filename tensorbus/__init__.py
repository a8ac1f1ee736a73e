"""tensorbus: a low-latency message broker for distributed ML clusters.

The import root of three sub-packages:

* ``tensorbus._core``: the shared-memory data plane (Cython): segments,
  topic rings, doorbells, waiting.
* ``tensorbus.broker``: the daemon and its control protocol.
* ``tensorbus.clients``: what applications import.

The names most programs need are re-exported here::

    import tensorbus
    with tensorbus.connect() as client:
        pub = client.publisher("grad/job1/0")
        pub.send(b"...")

The asyncio client is ``tensorbus.aio`` (``await tensorbus.aio.connect()``),
imported on first use so that sync programs never load asyncio's side.
"""

__version__ = "0.1.0"

from tensorbus.clients.client import Client, Message, Publisher, Subscriber, connect  # noqa: E402
from tensorbus.clients.errors import (  # noqa: E402
    AuthError,
    BackpressureError,
    BrokerError,
    BrokerRestarted,
    BrokerUnavailable,
    ClientClosed,
    GapError,
    HoldLimitError,
    MessageTooLargeError,
    NotLocalError,
    PermissionDenied,
    ProtocolError,
    ReceiveTimeout,
    SlowConsumer,
    TensorbusError,
    TopicError,
)
from tensorbus.clients.reqrep import (  # noqa: E402
    NoResponders,
    Request,
    RequestTimeout,
    ResponderError,
)

__all__ = [
    "AuthError",
    "BackpressureError",
    "BrokerError",
    "BrokerRestarted",
    "BrokerUnavailable",
    "Client",
    "ClientClosed",
    "GapError",
    "HoldLimitError",
    "Message",
    "MessageTooLargeError",
    "NoResponders",
    "NotLocalError",
    "PermissionDenied",
    "ProtocolError",
    "Publisher",
    "ReceiveTimeout",
    "Request",
    "RequestTimeout",
    "ResponderError",
    "SlowConsumer",
    "Subscriber",
    "TensorbusError",
    "TopicError",
    "__version__",
    "connect",
]


def __getattr__(name: str):
    # PEP 562: ``tensorbus.aio`` after a plain ``import tensorbus``, loaded
    # only when first touched.
    if name == "aio":
        import importlib

        return importlib.import_module("tensorbus.aio")
    raise AttributeError(f"module 'tensorbus' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, "aio"])
