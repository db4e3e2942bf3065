"""TLS listeners (HTTPS, MQTT over TLS) through Twisted's endpoint descriptions, so that what an operator may
know from other Twisted servers (``ssl:8883:privateKey=...:certKey=...``) is exactly what runs here."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import quoteStringArgument, serverFromString


def tls_description(port: int, interface: str, cert: str, key: str = "", chain: str = "",
                    backlog: int = 50) -> str:
    """The ``ssl:`` endpoint description of one TLS port (paths quoted: a colon in a path is not a separator)."""
    parts = [f"ssl:port={port}", f"interface={quoteStringArgument(interface)}", f"backlog={backlog}",
             f"certKey={quoteStringArgument(cert)}", f"privateKey={quoteStringArgument(key or cert)}"]
    if chain:
        parts.append(f"extraCertChain={quoteStringArgument(chain)}")
    return ":".join(parts)


def listen_tls(reactor: Any, port: int, factory: Any, interface: str, cert: str, key: str = "", chain: str = "",
               backlog: int = 50) -> Deferred:
    """Listen with TLS; fires with the IListeningPort."""
    return serverFromString(reactor, tls_description(port, interface, cert, key, chain, backlog)).listen(factory)
