"""UDP (CoAP) ports that can share their port number with other processes.

``reactor.listenUDP`` cannot set socket options before ``bind``; the nodes of a cluster on one host need
SO_REUSEPORT there so that each binds the CoAP port and the kernel spreads the devices' datagrams over them (by the
sender's address, so one device keeps talking to one node while the set of nodes is unchanged).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import udp
from twisted.internet.interfaces import IListeningPort
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import DatagramProtocol

from nanoiot.transports.tcp import check_reuse_port, set_reuse_port


class SharedUDPPort(udp.Port):
    """A UDP port that sets SO_REUSEPORT before it binds when ``reuse_port`` is true."""

    reuse_port = False

    def createInternetSocket(self) -> socket.socket:
        sock = super().createInternetSocket()
        if self.reuse_port:
            set_reuse_port(sock)
        return sock


def listen_udp(reactor: Any, port: int, protocol: DatagramProtocol, interface: str = "",
               reuse_port: bool = False, max_packet_size: int = 8192) -> IListeningPort:
    """Listen like ``reactor.listenUDP``; with ``reuse_port`` the port may be shared with other processes."""
    if reuse_port:
        check_reuse_port(reactor, port, interface)
    elif not isinstance(reactor, PosixReactorBase):
        return reactor.listenUDP(port, protocol, interface=interface, maxPacketSize=max_packet_size)
    listening = SharedUDPPort(port, protocol, interface, max_packet_size, reactor)
    listening.reuse_port = reuse_port
    listening.startListening()
    return listening
