"""CoalescingServer on the real reactor and real loopback sockets: one send per turn, Twisted's buffer when the
kernel is full, and closing, resets and producers behaving as with Twisted's own transport.

These pin the private Twisted attributes nanoiot.transports.tcp relies on (FileDescriptor's buffers, doWrite,
the reactor's _disconnectSelectable): an upgrade that changes them fails here.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import ClientCreator

from nanoiot.transports.tcp import CoalescingServer, listen_tcp


class Recorder(protocol.Protocol):
    """Server side: remembers its transport and how the connection ended."""

    def __init__(self, factory: "RecorderFactory") -> None:
        self.factory = factory
        self.lost: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.factory.connected.put(self)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(reason.value)  # the exception itself: a Failure would errback the Deferred


class RecorderFactory(protocol.Factory):
    def __init__(self) -> None:
        self.connected: defer.DeferredQueue = defer.DeferredQueue()

    def buildProtocol(self, addr: Any) -> Recorder:
        return Recorder(self)


class Collector(protocol.Protocol):
    """Client side: collects bytes; fires ``got`` once ``expected`` bytes are in, ``closed`` on disconnect."""

    def __init__(self, expected: int = 0) -> None:
        self.expected = expected
        self.data = bytearray()
        self.got: defer.Deferred = defer.Deferred()
        self.closed: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.expected and len(self.data) >= self.expected and not self.got.called:
            self.got.callback(bytes(self.data))

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(reason.value)


async def connected_pair(expected: int = 0, port: Any = None) -> tuple[Any, Recorder, Collector]:
    """A CoalescingPort (a new one, or ``port`` again) and one connection to it: (port, server side, client)."""
    if port is None:
        port = listen_tcp(reactor, 0, RecorderFactory(), 50, "127.0.0.1")
    client = await ClientCreator(reactor, Collector, expected).connectTCP("127.0.0.1", port.getHost().port)
    server = await port.factory.connected.get()
    return port, server, client


def next_turn() -> defer.Deferred:
    return task.deferLater(reactor, 0, lambda: None)


def count_sends(transport: CoalescingServer) -> list[int]:
    sizes: list[int] = []
    original = transport.writeSomeData

    def counting(data: Any) -> Any:
        result = original(data)
        sizes.append(len(data))
        return result

    transport.writeSomeData = counting  # type: ignore[method-assign]
    return sizes


@pytest_twisted.ensureDeferred
async def test_writes_of_one_turn_go_out_in_one_send_without_registering_for_writes() -> None:
    port, server, client = await connected_pair(expected=9)
    try:
        transport = server.transport
        assert isinstance(transport, CoalescingServer)
        sends = count_sends(transport)
        transport.write(b"abc")
        transport.writeSequence([b"de", b"f"])
        transport.write(b"ghi")
        assert transport.fileno() not in reactor._writes  # nothing registered with epoll
        assert await client.got == b"abcdefghi"
        assert sends == [9]
        assert transport.fileno() not in reactor._writes
    finally:
        server.transport.loseConnection()
        await server.lost
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_reader_that_does_not_read_gets_twisteds_buffer_then_everything_in_order() -> None:
    size = 16 * 1024 * 1024  # far more than the loopback socket buffers hold
    payload = bytes(range(256)) * (size // 256)
    port, server, client = await connected_pair(expected=size)
    try:
        client.transport.pauseProducing()  # the client stops reading
        flusher = port.flusher
        before = flusher.fallbacks
        transport = server.transport
        transport.write(payload)
        await next_turn()
        assert flusher.fallbacks == before + 1
        assert transport.fileno() in reactor._writes  # waiting for the poller now
        transport.write(b"tail")  # buffered behind the rest, not sent early
        client.expected = size + 4
        client.transport.resumeProducing()
        received = await client.got
        assert received == payload + b"tail"
        await next_turn()
        assert transport.fileno() not in reactor._writes  # drained: unregistered again
    finally:
        server.transport.loseConnection()
        await server.lost
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_lose_connection_sends_what_is_buffered_then_closes_cleanly() -> None:
    port, server, client = await connected_pair()
    try:
        server.transport.write(b"last words")
        server.transport.loseConnection()
        assert isinstance(await server.lost, ConnectionDone)
        await client.closed
        assert bytes(client.data) == b"last words"
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_lose_connection_with_nothing_buffered_closes() -> None:
    port, server, client = await connected_pair()
    try:
        server.transport.loseConnection()
        assert isinstance(await server.lost, ConnectionDone)
        await client.closed
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_abort_drops_what_is_buffered() -> None:
    port, server, client = await connected_pair()
    try:
        server.transport.write(b"never sent")
        server.transport.abortConnection()
        assert isinstance(await server.lost, (ConnectionLost, ConnectionDone))
        await client.closed
        assert bytes(client.data) == b""
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_writing_to_a_reset_connection_ends_it_without_an_error_escaping() -> None:
    port, server, client = await connected_pair()
    try:
        # The client resets the connection (SO_LINGER 0: RST instead of FIN).
        client.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.transport.abortConnection()
        await client.closed
        # Whichever the server notices first (the read of the RST or the failing send), it ends once, quietly.
        for _ in range(3):
            server.transport.write(b"x" * 65536)
        assert isinstance(await server.lost, (ConnectionLost, ConnectionDone))
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_streaming_producer_is_paused_and_resumed_by_the_buffer() -> None:
    size = 16 * 1024 * 1024
    port, server, client = await connected_pair(expected=size)
    events: list[str] = []

    class Producer:
        def pauseProducing(self) -> None:
            events.append("pause")

        def resumeProducing(self) -> None:
            events.append("resume")

        def stopProducing(self) -> None:
            events.append("stop")

    try:
        client.transport.pauseProducing()
        transport = server.transport
        transport.registerProducer(Producer(), True)
        transport.write(b"\0" * size)  # above the transport's bufferSize: the producer is paused at once
        assert events == ["pause"]
        client.transport.resumeProducing()
        await client.got
        await next_turn()
        assert events == ["pause", "resume"]
        transport.unregisterProducer()
    finally:
        server.transport.loseConnection()
        await server.lost
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_host_and_peer_addresses_are_built_once() -> None:
    port, server, client = await connected_pair()
    try:
        first = server.transport.getHost()
        assert first.port == port.getHost().port and first.host == "127.0.0.1"
        assert server.transport.getHost() is first
        peer = server.transport.getPeer()
        assert peer.port == client.transport.getHost().port and server.transport.getPeer() is peer
    finally:
        server.transport.loseConnection()
        await server.lost
        await port.stopListening()


class Prefixed(Recorder):
    """A protocol with a log prefix of its own (per instance), as ILoggingContext allows."""

    def logPrefix(self) -> str:
        return f"prefixed-{id(self)}"


class PrefixedFactory(RecorderFactory):
    def buildProtocol(self, addr: Any) -> Recorder:
        return Prefixed(self)


@pytest_twisted.ensureDeferred
async def test_log_prefix_and_repr_are_twisteds_whether_the_protocol_keeps_protocols_prefix_or_not() -> None:
    # CoalescingServer builds them without tcp.Server.__init__: the same strings, as Twisted's logs show them.
    for factory in (RecorderFactory(), PrefixedFactory()):
        port = listen_tcp(reactor, 0, factory, 50, "127.0.0.1")
        try:
            for _ in range(2):
                port, server, client = await connected_pair(port=port)
                transport = server.transport
                assert isinstance(transport, CoalescingServer)
                expected = server.logPrefix() if isinstance(server, Prefixed) else "Recorder"
                assert transport.logPrefix() == f"{expected},{transport.sessionno},127.0.0.1"
                assert repr(transport) == f"<{type(server).__name__} #{transport.sessionno} on {port.getHost().port}>"
                transport.loseConnection()
                await server.lost
                assert repr(transport).startswith(f"<{type(server).__name__} #")  # still, once it is lost
        finally:
            await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_connection_whose_flush_fails_is_dropped_and_the_others_are_still_sent() -> None:
    port, broken, _ = await connected_pair()
    _, healthy, client = await connected_pair(expected=2, port=port)
    try:
        def explode() -> None:
            raise RuntimeError("a bug in a write path")

        broken.transport.doWrite = explode  # type: ignore[method-assign]
        broken.transport.write(b"lost")  # queued first: its failure must not stop the flush of the next
        healthy.transport.write(b"ok")
        assert await client.got.addTimeout(5, reactor) == b"ok"
        assert isinstance(await broken.lost.addTimeout(5, reactor), ConnectionLost)
    finally:
        healthy.transport.loseConnection()
        await healthy.lost
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_accepted_connections_send_without_nagles_delay() -> None:
    import socket

    port, server, client = await connected_pair()
    try:
        sock = server.transport.getHandle()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        client.transport.loseConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_ports_given_one_flusher_share_it() -> None:
    from nanoiot.transports.tcp import TurnFlusher

    shared = TurnFlusher(reactor)
    first = listen_tcp(reactor, 0, RecorderFactory(), 50, "127.0.0.1", flusher=shared)
    second = listen_tcp(reactor, 0, RecorderFactory(), 50, "127.0.0.1", flusher=shared)
    alone = listen_tcp(reactor, 0, RecorderFactory(), 50, "127.0.0.1")
    try:
        assert first.flusher is shared and second.flusher is shared
        assert alone.flusher is not shared  # nothing kept on the reactor: a port without one gets its own
        assert not hasattr(reactor, "_nanoiot_flusher")
    finally:
        for port in (first, second, alone):
            await port.stopListening()
