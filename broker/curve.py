"""CURVE encryption on the daemon's tcp sockets, from the one secret key
(``--curve-secret``, z85) the daemons of a cluster share."""

from __future__ import annotations

import zmq

__all__ = ["secure_client", "secure_server"]


def secure_server(sock, secret: str | None) -> None:
    """CURVE on a tcp socket we bind, where a key is configured."""
    if secret:
        sock.curve_secretkey = secret.encode()
        sock.curve_publickey = zmq.curve_public(secret.encode())
        sock.curve_server = True


def secure_client(sock, secret: str | None) -> None:
    """CURVE on a socket we connect to a peer sharing our key."""
    if secret:
        public, own_secret = zmq.curve_keypair()
        sock.curve_serverkey = zmq.curve_public(secret.encode())
        sock.curve_publickey = public
        sock.curve_secretkey = own_secret
