"""SO_REUSEPORT on real loopback sockets: two listeners share one TCP or UDP port and the kernel spreads the
connections (datagrams) over both; without the option the second bind fails, as it always did."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import ClientCreator, DatagramProtocol

from nanoiot.transports.tcp import listen_tcp
from nanoiot.transports.udp import listen_udp

HOST = "127.0.0.1"
TIMEOUT = 10


class Tally:
    """Counts arrivals per listener and fires ``done`` once ``expected`` have arrived in all."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.counts: dict[str, int] = {}
        self.done: defer.Deferred = defer.Deferred()

    def arrived(self, listener: str) -> None:
        self.counts[listener] = self.counts.get(listener, 0) + 1
        if sum(self.counts.values()) == self.expected:
            self.done.callback(dict(self.counts))


class CountingFactory(protocol.Factory):
    def __init__(self, name: str, tally: Tally) -> None:
        self.name, self.tally = name, tally
        self.protocols: list[protocol.Protocol] = []

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        self.tally.arrived(self.name)
        built = protocol.Protocol()
        self.protocols.append(built)
        return built


class CountingDatagrams(DatagramProtocol):
    def __init__(self, name: str, tally: Tally) -> None:
        self.name, self.tally = name, tally

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.tally.arrived(self.name)


@pytest_twisted.ensureDeferred
async def test_two_tcp_listeners_share_a_port_and_both_get_connections() -> None:
    connections = 200
    tally = Tally(connections)
    first = listen_tcp(reactor, 0, CountingFactory("first", tally), 256, HOST, reuse_port=True)
    port = first.getHost().port
    second = listen_tcp(reactor, port, CountingFactory("second", tally), 256, HOST, reuse_port=True)
    clients: list[protocol.Protocol] = []
    try:
        assert second.getHost().port == port
        creator = ClientCreator(reactor, protocol.Protocol)
        clients = list(await defer.gatherResults(
            [creator.connectTCP(HOST, port) for _ in range(connections)], consumeErrors=True
        ))
        counts = await tally.done.addTimeout(TIMEOUT, reactor)
        assert counts["first"] > 0 and counts["second"] > 0, counts
    finally:
        for client in clients:
            client.transport.abortConnection()
        await first.stopListening()
        await second.stopListening()


@pytest_twisted.ensureDeferred
async def test_without_reuse_port_the_second_tcp_listener_cannot_bind() -> None:
    first = listen_tcp(reactor, 0, protocol.Factory(), 50, HOST)
    try:
        with pytest.raises(CannotListenError):
            listen_tcp(reactor, first.getHost().port, protocol.Factory(), 50, HOST)
    finally:
        await first.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_port_is_shared_only_when_every_listener_asks_for_it() -> None:
    first = listen_tcp(reactor, 0, protocol.Factory(), 50, HOST, reuse_port=True)
    try:
        with pytest.raises(CannotListenError):
            listen_tcp(reactor, first.getHost().port, protocol.Factory(), 50, HOST)
    finally:
        await first.stopListening()


@pytest_twisted.ensureDeferred
async def test_two_udp_listeners_share_a_port_and_both_get_datagrams() -> None:
    senders_count = 100
    tally = Tally(senders_count)
    first = listen_udp(reactor, 0, CountingDatagrams("first", tally), HOST, reuse_port=True)
    port = first.getHost().port
    second = listen_udp(reactor, port, CountingDatagrams("second", tally), HOST, reuse_port=True)
    # One sender per source port: the kernel picks a listener by the sender's address.
    senders = [reactor.listenUDP(0, DatagramProtocol(), interface=HOST) for _ in range(senders_count)]
    try:
        assert second.getHost().port == port
        for sender in senders:
            sender.write(b"ping", (HOST, port))
        counts = await tally.done.addTimeout(TIMEOUT, reactor)
        assert counts["first"] > 0 and counts["second"] > 0, counts
    finally:
        for listening in (*senders, first, second):
            await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_without_reuse_port_the_second_udp_listener_cannot_bind() -> None:
    first = listen_udp(reactor, 0, DatagramProtocol(), HOST)
    try:
        with pytest.raises(CannotListenError):
            listen_udp(reactor, first.getHost().port, DatagramProtocol(), HOST)
    finally:
        await first.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_udp_listener_without_reuse_port_receives_as_listen_udp_did() -> None:
    tally = Tally(1)
    listening = listen_udp(reactor, 0, CountingDatagrams("only", tally), HOST)
    sender = reactor.listenUDP(0, DatagramProtocol(), interface=HOST)
    try:
        sender.write(b"ping", (HOST, listening.getHost().port))
        assert await tally.done.addTimeout(TIMEOUT, reactor) == {"only": 1}
    finally:
        await sender.stopListening()
        await listening.stopListening()
