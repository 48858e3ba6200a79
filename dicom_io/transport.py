"""An application entity whose sockets send without Nagle's delay.

Nagle's algorithm holds back the small C-STORE response PDU until the peer's
delayed ACK arrives, about 40-50 ms per instance on Linux, which caps a single
association at some twenty instances a second. Every socket the project opens
(listener and SCU) therefore sets ``TCP_NODELAY``.
"""

from __future__ import annotations

import socket
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import (
    AddressInformation,
    AssociationServer,
    AssociationSocket,
    ThreadedAssociationServer,
)


def set_nodelay(sock: socket.socket) -> None:
    """Set ``TCP_NODELAY`` on a TCP socket (no-op for non-TCP sockets)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _NoDelayServerMixin:
    """Accepts connections with ``TCP_NODELAY`` set."""

    def get_request(self) -> tuple[socket.socket, Any]:
        client_socket, address = super().get_request()  # type: ignore[misc]
        set_nodelay(client_socket)
        return client_socket, address


class NoDelayAssociationServer(_NoDelayServerMixin, AssociationServer):
    """Blocking association server with ``TCP_NODELAY`` on accepted sockets."""


class NoDelayThreadedAssociationServer(_NoDelayServerMixin, ThreadedAssociationServer):
    """Threaded association server with ``TCP_NODELAY`` on accepted sockets."""


class NoDelayAE(AE):
    """A pynetdicom ``AE`` whose requestor and acceptor sockets set ``TCP_NODELAY``."""

    def _create_socket(
        self, assoc: Any, address: AddressInformation, tls_args: Any
    ) -> AssociationSocket:
        sock = super()._create_socket(assoc, address, tls_args)
        if sock.socket is not None:
            set_nodelay(sock.socket)
        return sock

    def make_server(self, address: Any, *args: Any, server_class: Any = None, **kwargs: Any) -> Any:
        if server_class is None or server_class is AssociationServer:
            server_class = NoDelayAssociationServer
        elif server_class is ThreadedAssociationServer:
            server_class = NoDelayThreadedAssociationServer
        return super().make_server(address, *args, server_class=server_class, **kwargs)
