"""TCP ports whose connections send their bytes at the end of the reactor turn instead of waiting for EPOLLOUT.

Twisted buffers every ``transport.write`` and registers the socket for write readiness (``epoll_ctl``), sends on
the next poll, then unregisters it (``epoll_ctl`` again): three system calls and a trip through the poller per
write. A REST RPC writes twice (the MQTT PUBLISH to the device, the HTTP response) and the profile put those
``epoll_ctl`` calls at 11-12 % of the server's CPU (BENCHMARKS.md). Here a write still only buffers, but the
connection is put on a list that is flushed once, by ``callLater(0)``, when the reactor has handled everything the
current poll returned: every write of that turn to one socket goes out in one ``send``, and the poller hears about
the socket only if the kernel would not take it all (a slow reader): then the connection falls back to Twisted's
own path until its buffer is empty. asyncio does much the same (it sends at once when nothing is buffered).

This relies on ``FileDescriptor``'s buffer attributes and ``doWrite`` and on the reactor's ``_disconnectSelectable``
(written against Twisted 26.10; setup.cfg keeps Twisted below 27): ``tests/integration/test_tcp_flush.py`` pins
the behaviour on the real reactor and real sockets.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.address import IPv6Address
from twisted.internet.error import CannotListenError, ConnectionLost
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorTime
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

log = Logger(namespace="nanoiot.tcp")


class TurnFlusher:
    """Connections that wrote during this reactor turn, flushed together once the turn's events are handled."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.pending: list[TurnWrites] = []
        self.scheduled = False
        #: Flushes that could not send everything and handed the rest to the poller (slow readers).
        self.fallbacks = 0

    def queue(self, connection: TurnWrites) -> None:
        self.pending.append(connection)
        if not self.scheduled:
            self.scheduled = True
            self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        self.scheduled = False
        pending, self.pending = self.pending, []
        for connection in pending:
            try:
                if connection.flush_now():
                    self.fallbacks += 1
            except Exception:
                # What the reactor does when a doWrite raises: that connection goes, the others are still sent.
                log.failure("flushing {connection} failed", connection=connection)
                connection._flush_queued = False
                connection.reactor._disconnectSelectable(connection, ConnectionLost(), False)


class TurnWrites:
    """The write side of a connection (before ``tcp.Connection`` in the bases) whose writes are sent by the turn's
    :class:`TurnFlusher`: every write of a turn in one ``send``, no write-readiness poll unless a send fell short."""

    _flush_queued = False
    #: True while the socket is registered for write readiness (a send did not take everything).
    _polling_writes = False

    def turn_flusher(self) -> TurnFlusher:
        raise NotImplementedError

    def startWriting(self) -> None:
        # Called by write(), writeSequence(), loseConnection() and loseWriteConnection(): there is something to do
        # on the write side; do it at the end of this turn.
        if self._polling_writes or self._flush_queued:
            return
        self._flush_queued = True
        self.turn_flusher().queue(self)  # type: ignore[arg-type]

    def stopWriting(self) -> None:
        if self._polling_writes:
            self._polling_writes = False
            super().stopWriting()  # type: ignore[misc]

    def flush_now(self) -> bool:
        """Send what is buffered; True if the rest had to wait for the poller."""
        self._flush_queued = False
        if self._polling_writes or not self.connected or self._aborting:  # type: ignore[attr-defined]
            return False
        why = self.doWrite()  # type: ignore[attr-defined]
        if why is not None:
            # Closed (loseConnection once drained) or a socket error: what the reactor does after doWrite.
            self.reactor._disconnectSelectable(self, why, False)  # type: ignore[attr-defined]
            return False
        if self._tempDataLen or self.offset < len(self.dataBuffer):  # type: ignore[attr-defined]
            self._polling_writes = True
            super().startWriting()  # type: ignore[misc]
            return True
        return False


class CoalescingServer(TurnWrites, tcp.Server):
    """A server-side connection whose writes are sent by the turn's :class:`TurnFlusher`."""

    _host: Any = None
    _peer: Any = None

    # TCP_NODELAY is set on the listening socket (CoalescingPort) and inherited by every accepted one.

    def __init__(self, sock: socket.socket, protocol: Any, client: tuple[Any, ...], server: CoalescingPort,
                 sessionno: int, reactor: Any) -> None:
        # tcp.Server.__init__, minus work per connection: the log prefix of a protocol class that keeps
        # Protocol's (its class name) is asked once per class, not through ILoggingContext for every instance,
        # and the repr is built when asked for. A connect storm's accept path ran this once per connection.
        tcp.Connection.__init__(self, sock, protocol, reactor)
        if len(client) != 2:
            self._addressType = IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        prefix = server.protocol_prefixes.get(protocol.__class__)
        if prefix is None:
            prefix = self._getLogPrefix(protocol)
            if getattr(protocol.__class__, "logPrefix", None) is Protocol.logPrefix:  # the class name: the same
                server.protocol_prefixes[protocol.__class__] = prefix  # for every instance
        self.logstr = f"{prefix},{sessionno},{self.hostname}"
        self._protocol_class = protocol.__class__  # for the repr, which Twisted's logs may ask for once it is lost
        self.startReading()
        self.connected = 1

    def __repr__(self) -> str:
        return f"<{self._protocol_class.__name__} #{self.sessionno} on {self.server._realPortNumber}>"

    def turn_flusher(self) -> TurnFlusher:
        return self.server.flusher

    def getHost(self) -> Any:
        # twisted.web asks for both addresses on every request; they cannot change, so build them once
        # (getHost is a getsockname system call each time).
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def getPeer(self) -> Any:
        if self._peer is None:
            self._peer = super().getPeer()
        return self._peer


def set_reuse_port(sock: socket.socket) -> None:
    """Let several processes bind one port, the kernel spreading connections (or datagrams) over them.

    Used by ``--reuse-port``: the nodes of a cluster on one host share the device ports without a proxy in front.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


def check_reuse_port(reactor: Any, port: int, interface: str) -> None:
    """Fail as a bind would, with a reason, where SO_REUSEPORT cannot be had (no such option, or no POSIX reactor)."""
    if not hasattr(socket, "SO_REUSEPORT") or not isinstance(reactor, PosixReactorBase):
        raise CannotListenError(interface, port, OSError("SO_REUSEPORT is not available on this platform or reactor"))


class CoalescingPort(tcp.Port):
    transport = CoalescingServer
    #: Set SO_REUSEPORT before bind (Twisted sets SO_REUSEADDR in this same method).
    reuse_port = False
    #: Sends what every connection of this port wrote during a turn (shared by the ports of one service).
    flusher: TurnFlusher

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: protocol class -> its log prefix (``tcp.Server`` asked each new protocol instance for it).
        self.protocol_prefixes: dict[type, str] = {}

    def createInternetSocket(self) -> socket.socket:
        sock = super().createInternetSocket()
        # Writes are already coalesced per reactor turn: Nagle's algorithm would only hold a command back until
        # the device's delayed ACK (~40 ms per command under sequential delivery). Set here, on the listening
        # socket, accepted connections inherit it (Linux, the BSDs): no setsockopt per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.reuse_port:
            set_reuse_port(sock)
        return sock


def listen_tcp(reactor: Any, port: int, factory: IProtocolFactory, backlog: int, interface: str,
               reuse_port: bool = False, flusher: TurnFlusher | None = None) -> IListeningPort:
    """Listen like ``reactor.listenTCP``, with :class:`CoalescingServer` connections on a POSIX reactor.

    With ``reuse_port`` the port may be shared with other processes that also asked for it (SO_REUSEPORT).
    ``flusher``: give the ports of one service the same one, so that a turn's writes go out in one pass.
    """
    if reuse_port:
        check_reuse_port(reactor, port, interface)
    elif not isinstance(reactor, PosixReactorBase):
        return reactor.listenTCP(port, factory, backlog=backlog, interface=interface)
    listening = CoalescingPort(port, factory, backlog, interface, reactor)
    listening.reuse_port = reuse_port
    listening.flusher = flusher if flusher is not None else TurnFlusher(reactor)
    listening.startListening()
    return listening
