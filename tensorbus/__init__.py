"""tensorbus: a low-latency message broker for distributed ML clusters.

The import root of three sub-packages:

* ``tensorbus._core``: the shared-memory data plane (Cython): segments,
  topic rings, waiting.
* ``tensorbus.broker``: the daemon and its control plane.
* ``tensorbus.clients``: what applications import.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
