"""The direct router in memory: two nodes, each a DirectRouter over a real NotifyRouter on an in-memory bus, with
their links on StringTransports pumped by the test and time on the reactors' clocks.

What is checked: a node announcing itself gets dialled and both directions then take the link, not the bus;
envelopes before the link, broadcasts and frames too large for a link take the bus; a dialler without the secret is
refused and nothing it sends is delivered; a lost link falls back to the bus at once and is dialled again (a few
times, with growing delays); a restarted peer's new announcement replaces the old link; a peer that stops reading
makes ``send`` refuse past the backlog bound; frames split across reads or packed in one are read, an oversized one
closes the link; a loopback address announced from another machine is not dialled; stop closes every link.
"""

from __future__ import annotations

from typing import Any, Callable
from uuid import UUID, uuid4

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from nanoiot.actors import messages as m
from nanoiot.actors.replies import ReplyTo
from nanoiot.cluster import codec
from nanoiot.cluster.direct import (
    _LENGTH, HELLO, HI, MAX_BACKLOG, MAX_FRAME, REDIAL_ATTEMPTS, DirectRouter, Link,
)
from nanoiot.cluster.router import NotifyRouter
from nanoiot.rpc.model import RpcCommand


class MemoryBus:
    """The NotifyBus surface NotifyRouter uses, on a shared dict of channels; delivery on the next clock tick."""

    def __init__(self, channels: dict[str, list[Callable[[str], None]]], clock: MemoryReactorClock) -> None:
        self.channels = channels
        self.clock = clock
        self.notified: list[tuple[str, str]] = []
        self.stopped = False

    def start(self) -> Deferred[None]:
        return succeed(None)

    def listen(self, channel: str, callback: Callable[[str], None], shared: bool = False) -> Deferred[None]:
        self.channels.setdefault(channel, []).append(callback)
        return succeed(None)

    def notify(self, channel: str, payload: str) -> bool:
        self.notified.append((channel, payload))
        for callback in list(self.channels.get(channel, [])):
            self.clock.callLater(0, callback, payload)
        return True

    def stop(self) -> Deferred[None]:
        self.stopped = True
        return succeed(None)


class Node:
    def __init__(self, name: str, port: int, channels: dict[str, Any], machine: str = "box") -> None:
        self.reactor = MemoryReactorClock()
        self.bus = MemoryBus(channels, self.reactor)
        self.router = DirectRouter(NotifyRouter(self.bus, name), self.reactor, "127.0.0.1", machine, port=port)
        self.got: list[dict[str, Any]] = []

    def start(self) -> None:
        self.router.start(self.got.append)

    def bus_sends(self) -> int:
        return sum(1 for channel, _ in self.bus.notified if channel != "nanoiot_cluster")


class Wire:
    """One TCP connection between two links: what one writes, the other reads when pumped."""

    def __init__(self, client: Link, server: Link) -> None:
        self.client, self.server = client, server
        self.client_transport, self.server_transport = StringTransport(), StringTransport()
        self.closed = False
        client.makeConnection(self.client_transport)
        server.makeConnection(self.server_transport)

    def pump(self) -> None:
        for _ in range(10):
            moved = False
            for transport, reader in ((self.client_transport, self.server),
                                      (self.server_transport, self.client)):
                data = transport.value()
                if data and not self.closed:
                    transport.clear()
                    reader.dataReceived(data)
                    moved = True
            if self.client_transport.disconnecting or self.server_transport.disconnecting:
                self.close()
                return
            if not moved:
                return

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.client.connectionLost(Failure(ConnectionError("closed")))
            self.server.connectionLost(Failure(ConnectionError("closed")))


class Pair:
    def __init__(self) -> None:
        self.channels: dict[str, Any] = {}
        self.a = Node("A", 7001, self.channels)
        self.b = Node("B", 7002, self.channels)
        self.servers = {7001: self.a, 7002: self.b}
        self.dialled = {self.a: 0, self.b: 0}

    def tick(self, seconds: float = 0) -> None:
        for _ in range(3):
            self.a.reactor.advance(seconds)
            self.b.reactor.advance(seconds)
            seconds = 0

    def connect_next(self, dialler: Node) -> Wire:
        """Connect the dialler's next outstanding dial to the node it dialled."""
        host, port, factory, timeout, _ = dialler.reactor.tcpClients[self.dialled[dialler]]
        self.dialled[dialler] += 1
        target = self.servers[port]
        server_factory = target.reactor.tcpServers[0][1]
        wire = Wire(factory.buildProtocol(None), server_factory.buildProtocol(None))
        wire.pump()
        return wire

    def fail_next(self, dialler: Node) -> None:
        host, port, factory, timeout, _ = dialler.reactor.tcpClients[self.dialled[dialler]]
        self.dialled[dialler] += 1
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError("refused")))

    def linked(self) -> Wire:
        """A starts, then B: B's announcement makes A dial it."""
        self.a.start()
        self.b.start()
        self.tick()
        assert len(self.a.reactor.tcpClients) == 1 and not self.b.reactor.tcpClients
        wire = self.connect_next(self.a)
        assert set(self.a.router.links) == {"B"} and set(self.b.router.links) == {"A"}
        return wire


def test_an_announced_node_is_dialled_and_both_directions_take_the_link() -> None:
    pair = Pair()
    wire = pair.linked()
    host, port = pair.a.reactor.tcpClients[0][:2]
    assert (host, port) == ("127.0.0.1", 7002)

    assert pair.a.router.send("B", {"t": "tell", "x": 1})
    assert pair.b.router.send("A", {"t": "reply", "r": 7})
    wire.pump()

    assert pair.b.got == [{"t": "tell", "x": 1, "from": "A"}]
    assert pair.a.got == [{"t": "reply", "r": 7, "from": "B"}]
    assert pair.a.bus_sends() == pair.b.bus_sends() == 0  # nothing node-to-node went over NOTIFY
    assert pair.a.router.sent_direct == pair.b.router.received_direct == 1


def test_before_a_link_and_for_broadcasts_the_bus_carries_the_envelopes() -> None:
    pair = Pair()
    pair.a.start()
    pair.b.start()
    assert pair.b.router.send("A", {"t": "tell", "n": 1})  # A has not dialled B yet
    pair.tick()
    assert pair.a.got == [{"t": "tell", "n": 1, "from": "B"}]
    wire = pair.connect_next(pair.a)

    assert pair.a.router.broadcast({"t": "claimed", "d": []})
    pair.tick()
    wire.pump()
    assert pair.b.got == [{"t": "claimed", "d": [], "from": "A", "b": 1}]
    assert not wire.server_transport.value() and not wire.client_transport.value()


def test_a_frame_too_large_for_a_link_takes_the_bus() -> None:
    pair = Pair()
    wire = pair.linked()
    big = "x" * (MAX_FRAME + 1)
    assert pair.a.router.send("B", {"t": "tell", "big": big})
    assert not wire.client_transport.value()
    assert pair.a.bus_sends() == 1


def test_a_dialler_without_the_secret_is_refused_and_nothing_it_sends_arrives() -> None:
    pair = Pair()
    pair.a.start()
    acceptor = pair.a.reactor.tcpServers[0][1]
    intruder = Link(pair.b.router, "A", "wrong secret")
    wire = Wire(intruder, acceptor.buildProtocol(None))
    intruder.write_envelope({"t": "tell", "d": "x"})
    wire.pump()

    assert wire.closed and pair.a.got == [] and pair.a.router.links == {}
    assert "B" not in pair.b.router.links  # the intruder's side never saw the answer


def test_a_lost_link_falls_back_to_the_bus_and_is_dialled_again() -> None:
    pair = Pair()
    wire = pair.linked()
    wire.close()
    assert pair.a.router.links == {} and pair.b.router.links == {}

    assert pair.b.router.send("A", {"t": "reply", "r": 1})  # over the bus now
    pair.tick()
    assert pair.a.got == [{"t": "reply", "r": 1, "from": "B"}]
    assert len(pair.a.reactor.tcpClients) == 1
    pair.tick(0.5)  # the first redial delay
    assert len(pair.a.reactor.tcpClients) == 2 and not pair.b.reactor.tcpClients  # only the dialler dials again
    wire = pair.connect_next(pair.a)
    assert set(pair.a.router.links) == {"B"} and set(pair.b.router.links) == {"A"}


def test_redials_stop_after_a_few_growing_delays() -> None:
    pair = Pair()
    pair.a.start()
    pair.b.start()
    pair.tick()
    pair.fail_next(pair.a)
    delays = []
    for _ in range(REDIAL_ATTEMPTS):
        (call,) = pair.a.reactor.getDelayedCalls()
        delays.append(round(call.getTime() - pair.a.reactor.seconds(), 3))
        pair.tick(delays[-1])
        pair.fail_next(pair.a)
    assert delays == [0.5 * 2 ** i for i in range(REDIAL_ATTEMPTS)]
    assert pair.a.reactor.getDelayedCalls() == []
    assert pair.a.router.send("B", {"t": "tell"})  # the bus still works
    assert pair.a.bus_sends() == 1


def test_a_restarted_peer_is_dialled_at_its_new_address() -> None:
    pair = Pair()
    old = pair.linked()
    # B restarts (same name, new secret and port): its old link has not noticed yet
    for channel, listeners in pair.channels.items():
        pair.channels[channel] = [cb for cb in listeners if cb != pair.b.router.fallback._on_payload]
    restarted = Node("B", 7003, pair.channels)
    pair.servers[7003] = restarted
    restarted.start()
    pair.b = restarted
    pair.tick()
    assert old.client_transport.disconnecting  # A dropped the link to the old B
    old.close()
    assert len(pair.a.reactor.tcpClients) == 2 and pair.a.reactor.tcpClients[1][1] == 7003
    wire = pair.connect_next(pair.a)
    assert pair.a.router.send("B", {"t": "tell", "n": 2})
    wire.pump()
    assert restarted.got == [{"t": "tell", "n": 2, "from": "A"}]


def test_a_peer_that_stops_reading_makes_send_refuse_past_the_backlog() -> None:
    pair = Pair()
    wire = pair.linked()
    link = pair.a.router.links["B"]
    link.pauseProducing()  # the socket buffer is full
    payload = "y" * (1024 * 1024)
    sent = 0
    while pair.a.router.send("B", {"t": "tell", "p": payload}):
        sent += 1
        assert sent < 100
    assert sent == MAX_BACKLOG // (1024 * 1024 + 100)
    assert pair.a.bus_sends() == 0  # refused, not sent around the link (that would reorder)
    link.resumeProducing()
    assert pair.a.router.send("B", {"t": "tell", "p": "z"})
    wire.pump()
    assert len(pair.b.got) == sent + 1


def test_frames_split_or_packed_are_read_and_an_oversized_one_closes_the_link() -> None:
    pair = Pair()
    wire = pair.linked()
    frames = b""
    for n in range(3):
        data = codec.dumps({"t": "tell", "n": n}).encode()
        frames += _LENGTH.pack(len(data)) + data
    link = pair.b.router.links["A"]
    for i in range(0, len(frames), 5):
        link.dataReceived(frames[i:i + 5])
    link.dataReceived(frames + frames[:7])
    assert [e["n"] for e in pair.b.got] == [0, 1, 2, 0, 1, 2]
    link.dataReceived(frames[7:])
    assert [e["n"] for e in pair.b.got] == [0, 1, 2, 0, 1, 2, 0, 1, 2]

    link.dataReceived(_LENGTH.pack(MAX_FRAME + 1) + b"{")
    wire.pump()
    assert wire.closed and pair.b.router.links == {}


def test_an_unreadable_frame_from_a_linked_peer_is_dropped_and_the_link_kept() -> None:
    pair = Pair()
    wire = pair.linked()
    link = pair.b.router.links["A"]
    link.dataReceived(_LENGTH.pack(3) + b"[1]")
    data = codec.dumps({"t": "tell"}).encode()
    link.dataReceived(_LENGTH.pack(len(data)) + data)
    assert pair.b.got == [{"t": "tell", "from": "A"}] and not wire.closed


@pytest.mark.parametrize("host,machine,dialled", [("127.0.0.1", "elsewhere", False), ("127.0.0.1", "box", True),
                                                  ("10.0.0.9", "elsewhere", True)])
def test_a_loopback_address_is_dialled_only_on_the_same_machine(host: str, machine: str, dialled: bool) -> None:
    pair = Pair()
    pair.a.start()
    pair.tick()
    pair.a.router._from_bus({"t": HELLO, "from": "C", "h": host, "p": 7009, "s": "s", "m": machine})
    assert bool(pair.a.reactor.tcpClients) is dialled


def test_a_bad_announcement_is_ignored_and_other_bus_envelopes_pass() -> None:
    pair = Pair()
    pair.a.start()
    pair.a.router._from_bus({"t": HELLO, "from": "C", "h": "127.0.0.1", "p": "no port", "s": "s", "m": "box"})
    pair.a.router._from_bus({"t": "invalidate", "from": "C", "d": []})
    assert pair.a.reactor.tcpClients == [] and pair.a.got == [{"t": "invalidate", "from": "C", "d": []}]


def test_stop_closes_every_link_and_the_bus() -> None:
    pair = Pair()
    wire = pair.linked()
    stopped = pair.a.router.stop()
    assert wire.client_transport.disconnecting
    wire.close()
    assert pair.a.bus.stopped and stopped.called
    assert pair.a.reactor.getDelayedCalls() == []  # no redial after a stop
    assert pair.b.router.links == {}


def dialled_by_a() -> tuple[Pair, Link, StringTransport]:
    """A has heard B's announcement and dialled it: the link A's dialler made, on a transport of its own."""
    pair = Pair()
    pair.a.start()
    pair.b.start()
    pair.tick()
    factory = pair.a.reactor.tcpClients[0][2]
    link = factory.buildProtocol(None)
    transport = StringTransport()
    link.makeConnection(transport)
    return pair, link, transport


def test_the_dialler_sends_its_name_and_the_secret_first() -> None:
    pair, link, transport = dialled_by_a()
    (size,) = _LENGTH.unpack_from(transport.value())
    first = codec.loads(transport.value()[4:4 + size].decode())
    assert first == {"t": HI, "from": "A", "s": pair.b.router.secret, "v": codec.LINK_FORMAT}
    assert "B" not in pair.a.router.links  # not until B answers


def test_a_routed_command_takes_a_compact_frame_and_arrives_read() -> None:
    pair = Pair()
    wire = pair.linked()
    device_id = UUID(int=7)
    command = RpcCommand(rpc_id=uuid4(), tenant_id=uuid4(), device_id=device_id, method="m", params={"p": 1},
                         oneway=False, expiration_time=2, created_time=1)
    message = m.SubmitRpc(command, ReplyTo("A", 4))
    assert pair.a.router.send("B", {"t": "tell", "d": device_id, "m": message, "hops": 0})
    frame = wire.client_transport.value()[_LENGTH.size:]
    assert frame.startswith(b'["S",0,')
    wire.pump()
    assert pair.b.got == [{"t": "tell", "d": device_id, "m": message, "hops": 0, "from": "A"}]


def logged_during(action: Callable[[], Any]) -> list[str]:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        action()
    finally:
        globalLogPublisher.removeObserver(events.append)
    return [formatEvent(event) for event in events]


def test_a_dialler_of_another_link_format_is_refused_with_a_reason() -> None:
    """A node from before the compact frames (its hello names no format) must not get a link: it could not read
    what this node writes on it. Both keep to the bus."""
    pair = Pair()
    pair.a.start()
    acceptor = pair.a.reactor.tcpServers[0][1]
    old = acceptor.buildProtocol(None)
    wire = Wire(Link(pair.b.router, "A", pair.a.router.secret), old)
    wire.client_transport.clear()  # what the new-format dialler wrote: replaced by an old node's hello
    hello = codec.dumps({"t": HI, "from": "B", "s": pair.a.router.secret}).encode()

    lines = logged_during(lambda: (old.dataReceived(_LENGTH.pack(len(hello)) + hello), wire.pump()))
    assert wire.closed and pair.a.router.links == {}
    assert any("link format 1" in line and "node B" in line for line in lines), lines


def test_an_acceptor_of_another_link_format_is_not_dialled_again_until_it_announces_itself() -> None:
    pair, link, transport = dialled_by_a()
    answer = codec.dumps({"t": HI, "from": "B"}).encode()  # an old node's answer: no format named

    lines = logged_during(lambda: link.dataReceived(_LENGTH.pack(len(answer)) + answer))
    assert transport.disconnecting and pair.a.router.links == {}
    assert any("link format 1" in line for line in lines), lines
    link.connectionLost(Failure(ConnectionError("closed")))
    pair.tick(60)
    assert len(pair.a.reactor.tcpClients) == 1  # no redial: it would be refused again
    assert pair.a.router.send("B", {"t": "tell", "n": 1}) and pair.a.bus_sends() == 1
    pair.b.router.fallback.broadcast(pair.b.router._hello())  # B restarted (upgraded, maybe): dialled again
    pair.tick()
    assert len(pair.a.reactor.tcpClients) == 2
