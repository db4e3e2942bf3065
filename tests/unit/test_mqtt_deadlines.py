"""Connect timeouts and keep-alive checks of every MQTT connection on one reactor call, and SUBSCRIBE verdicts
remembered per filter (task.Clock, StringTransport)."""

from __future__ import annotations

from uuid import uuid4

from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport

from nanoiot.persistence.records import NULL_UUID, Device
from nanoiot.transports.mqtt import codec
from nanoiot.transports.mqtt.deadlines import Deadlines
from nanoiot.transports.mqtt.protocol import MqttFactory
from tests.fixtures.recording import RecordingAttach

TOKEN = "GOOD_TOKEN"
DEVICE = Device(uuid4(), 0, uuid4(), NULL_UUID, "dev", "default", None, None)


class Owner:
    def __init__(self, deadlines: Deadlines, name: str, log: list, fail: bool = False) -> None:
        self.deadlines = deadlines
        self.deadline_slot: int | None = None
        self.name = name
        self.log = log
        self.fail = fail
        #: When set, the deadline it sets again when told (as a keep-alive check that found activity does).
        self.again: float | None = None

    def deadline_passed(self) -> None:
        self.log.append((self.name, self.deadlines.clock.seconds()))
        if self.again is not None:
            at, self.again = self.again, None
            self.deadlines.set(self, at)
        if self.fail:
            raise RuntimeError("a bug in one connection")


def test_a_deadline_fires_at_its_time_never_before_and_one_call_serves_every_owner():
    clock = task.Clock()
    deadlines = Deadlines(clock)
    log: list = []
    owners = [Owner(deadlines, f"o{i}", log) for i in range(100)]
    for owner in owners:
        deadlines.set(owner, 10.0)
    assert len(clock.getDelayedCalls()) == 1 and len(deadlines) == 100
    clock.advance(9.99)
    assert log == []
    clock.advance(0.01)
    assert [name for name, _ in log] == [f"o{i}" for i in range(100)]  # in the order they were set
    assert clock.getDelayedCalls() == [] and len(deadlines) == 0


def test_a_deadline_between_slots_fires_at_most_one_resolution_late():
    clock = task.Clock()
    deadlines = Deadlines(clock, resolution=1.0)
    log: list = []
    deadlines.set(Owner(deadlines, "a", log), 3.2)
    clock.advance(3.5)
    assert log == []
    clock.advance(0.5)
    assert log == [("a", 4.0)]


def test_moving_and_cancelling_deadlines_leaves_no_reactor_call_behind():
    clock = task.Clock()
    deadlines = Deadlines(clock)
    log: list = []
    a, b = Owner(deadlines, "a", log), Owner(deadlines, "b", log)
    deadlines.set(a, 10)
    deadlines.set(b, 20)
    deadlines.set(a, 30)  # moved past b
    clock.advance(20)
    assert log == [("b", 20)]
    deadlines.set(b, 5 + 20)  # an earlier slot than the one armed: armed for it
    clock.advance(5)
    assert log == [("b", 20), ("b", 25)]
    deadlines.cancel(a)
    assert clock.getDelayedCalls() == [] and a.deadline_slot is None
    clock.advance(100)
    assert log == [("b", 20), ("b", 25)]


def test_an_owner_may_set_its_next_deadline_when_told_and_a_failing_one_does_not_stop_the_others():
    clock = task.Clock()
    deadlines = Deadlines(clock)
    log: list = []
    first, broken, last = Owner(deadlines, "first", log), Owner(deadlines, "broken", log, fail=True), \
        Owner(deadlines, "last", log)
    first.again = 15.0
    for owner in (first, broken, last):
        deadlines.set(owner, 5)
    clock.advance(5)
    assert [name for name, _ in log] == ["first", "broken", "last"]
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(10)
    assert log[-1] == ("first", 15)
    assert clock.getDelayedCalls() == []


class Fleet:
    """Many MQTT connections of one factory, on StringTransports."""

    def __init__(self, auth: Deferred | None = None) -> None:
        self.clock = task.Clock()
        self.attach = RecordingAttach()
        self.factory = MqttFactory(lambda token: auth if auth is not None else succeed(DEVICE), self.attach,
                                   self.clock, connect_timeout=10)

    def open(self) -> tuple:
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport


def test_many_connections_waiting_for_connect_share_one_reactor_call_and_all_time_out():
    fleet = Fleet()
    connections = []
    for second in range(3):
        connections += [fleet.open() for _ in range(50)]
        fleet.clock.advance(0.4)
    assert len(fleet.clock.getDelayedCalls()) == 1
    fleet.clock.advance(10 - 1.2)  # the first 50 are due at 10 s
    assert all(transport.disconnecting for _, transport in connections[:50])
    assert not any(transport.disconnecting for _, transport in connections[50:])
    fleet.clock.advance(1)  # the others (due at 10.4 and 10.8 s) at the next whole second
    assert all(transport.disconnecting for _, transport in connections)
    assert fleet.clock.getDelayedCalls() == []


def test_a_connect_timeout_also_covers_a_token_lookup_that_never_ends():
    fleet = Fleet(auth=Deferred())
    protocol, transport = fleet.open()
    protocol.dataReceived(codec.encode_connect("", protocol_level=4, username=TOKEN))
    fleet.clock.advance(10)
    assert transport.disconnecting


def test_keep_alives_of_many_connections_on_one_call_and_only_silent_ones_are_closed():
    fleet = Fleet()
    connections = [fleet.open() for _ in range(20)]
    for protocol, _ in connections:
        protocol.dataReceived(codec.encode_connect("", protocol_level=4, username=TOKEN, keep_alive=10))
    assert len(fleet.clock.getDelayedCalls()) == 1
    fleet.clock.advance(14)
    for protocol, _ in connections[:10]:
        protocol.dataReceived(codec.encode_pingreq())  # these ten are alive
    fleet.clock.advance(1)
    assert [transport.disconnecting for _, transport in connections] == [False] * 10 + [True] * 10
    fleet.clock.advance(13)  # 28 s: the ten pinged at 14 s are due at 14 + 15
    assert not any(transport.disconnecting for _, transport in connections[:10])
    fleet.clock.advance(1)
    assert all(transport.disconnecting for _, transport in connections)
    assert fleet.clock.getDelayedCalls() == []


def test_a_lost_connection_takes_its_deadline_with_it():
    fleet = Fleet()
    protocol, _ = fleet.open()
    other, other_transport = fleet.open()
    protocol.dataReceived(codec.encode_connect("", protocol_level=4, username=TOKEN, keep_alive=30))
    protocol.connectionLost(None)
    other.connectionLost(None)
    assert fleet.clock.getDelayedCalls() == [] and len(fleet.factory.deadlines) == 0


# --- SUBSCRIBE verdicts are remembered per filter (and per gateway setting), never for long filters --------------

def suback_codes(fleet: Fleet, filters: list[str]) -> list[int]:
    protocol, transport = fleet.open()
    protocol.dataReceived(codec.encode_connect("", protocol_level=4, username=TOKEN)
                          + codec.encode_subscribe(7, [(f, 1) for f in filters], 4))
    frames = codec.FrameReader(1 << 24).feed(transport.value())
    [suback] = [codec.decode(f, 4) for f in frames if f.packet_type == codec.SUBACK]
    return suback.reason_codes


def test_the_same_filter_gets_the_same_verdict_each_time_and_the_gateway_setting_is_part_of_it():
    without, with_gateways = Fleet(), Fleet()
    with_gateways.factory.find_or_create_subdevice = lambda *args: Deferred()
    filters = ["v1/devices/me/rpc/request/+", "v1/gateway/rpc", "#", "v2/r/req/p/+", "a/#/b"]
    for _ in range(3):
        assert suback_codes(without, filters) == [1, 0x80, 0x80, 0x80, 0x80]
        assert suback_codes(with_gateways, filters) == [1, 1, 0x80, 0x80, 0x80]
    long_filter = "v1/devices/me/" + "x" * 300
    assert suback_codes(without, [long_filter, "v1/devices/me/rpc/request/+"]) == [0x80, 1]
