"""The MQTT inbound path in memory (StringTransport for the socket, task.Clock for time): a device's messages are
read, handled and acknowledged in step, rate limits throttle or close, connections are counted per address and per
device, and a device that does not read stops being read."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport

from nanoiot.actors.device import ActorSettings
from nanoiot.actors.directory import DeviceDirectory
from nanoiot.limits import parse_rates
from nanoiot.persistence.records import NULL_UUID, Device
from nanoiot.rpc.queue import QueueSettings
from nanoiot.transports.mqtt import codec
from nanoiot.transports.mqtt.flow import InboundWindow
from nanoiot.transports.mqtt.limits import MqttLimits
from nanoiot.transports.mqtt.protocol import MqttFactory
from nanoiot.transports.testing import RecordingAttach, RecordingLink
from tests.fixtures.actors import actors_on_clock

TENANT = uuid4()
DEVICES = {f"T{i}": Device(uuid4(), 0, TENANT, NULL_UUID, f"dev{i}", "default", None, None) for i in range(3)}
ANSWER = "v1/devices/me/rpc/response/{}"


class Fleet:
    """One MqttFactory with its limits; ``connect`` opens a connection for a token, as a device would."""

    def __init__(self, hold: bool = True, attach: Any = None, clock: task.Clock | None = None,
                 **limits: Any) -> None:
        self.clock = clock or task.Clock()
        self.attach = attach or RecordingAttach(hold=hold)
        self.limits = MqttLimits(clock=self.clock.seconds, **limits)

        def authenticate(token: str) -> Deferred:
            return succeed(DEVICES.get(token))

        self.factory = MqttFactory(authenticate, self.attach, self.clock, limits=self.limits)

    def open(self, host: str = "10.0.0.1") -> Connection:
        return Connection(self, host)

    def connect(self, token: str = "T0", level: int = 4, host: str = "10.0.0.1") -> Connection:
        connection = self.open(host)
        connection.connect(token, level)
        return connection


class Connection:
    def __init__(self, fleet: Fleet, host: str) -> None:
        from twisted.internet.address import IPv4Address

        self.fleet = fleet
        self.protocol = fleet.factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        self.protocol.makeConnection(self.transport)
        self.level = 4
        self.packets: list[Any] = []

    def connect(self, token: str, level: int = 4) -> Any:
        self.level = level
        self.feed(codec.encode_connect("", protocol_level=level, username=token, keep_alive=60))
        [connack] = self.read()
        return connack

    def feed(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def read(self) -> list[Any]:
        frames = codec.FrameReader(1 << 24).feed(self.transport.value())
        self.transport.clear()
        packets = [codec.decode(f, self.level) for f in frames]
        self.packets.extend(packets)
        return packets

    def pubacks(self) -> list[int]:
        return [p.packet_id for p in self.read() if isinstance(p, codec.PubAck)]

    @property
    def link(self) -> RecordingLink:
        return self.fleet.attach.link(self.protocol.session)

    @property
    def paused(self) -> bool:
        return self.transport.producerState == "paused"

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def lose(self) -> None:
        self.protocol.connectionLost(None)


def answers(first: int, count: int, qos: int = 1, level: int = 4, size: int = 8) -> bytes:
    """``count`` QoS ``qos`` answers to commands first.., with packet ids first.. (one chunk, as TCP may bring)."""
    return b"".join(codec.encode_publish(ANSWER.format(n), b"x" * size, qos, n if qos else None, level)
                    for n in range(first, first + count))


# --- the window on its own -----------------------------------------------------------------------------------------


def test_the_window_acknowledges_in_receive_order_even_when_handled_out_of_order():
    acks: list[tuple[int, int]] = []
    drained: list[bool] = []
    window = InboundWindow(4, 1000, lambda qos, pid: acks.append((qos, pid)), lambda: drained.append(True))
    first, second = window.hand_over(1, 1, 10), window.hand_over(2, 2, 10)
    window.handled_now(1, 3)  # handled at once, but behind 1 and 2
    assert acks == [] and window.messages == 2 and window.bytes == 20
    second()
    assert acks == []  # 1 is not handled yet
    first()
    assert acks == [(1, 1), (2, 2), (1, 3)]
    assert window.messages == 0 and window.waiting == 0 and drained
    first()  # a second call changes nothing
    assert acks == [(1, 1), (2, 2), (1, 3)] and window.messages == 0


def test_the_window_is_full_at_either_bound_and_a_closed_window_ignores_late_handling():
    acks: list[int] = []
    window = InboundWindow(3, 100, lambda qos, pid: acks.append(pid), lambda: None)
    done = window.hand_over(1, 1, 100)
    assert window.full  # bytes
    done()
    assert not window.full and acks == [1]
    dones = [window.hand_over(1, n, 1) for n in (2, 3, 4)]
    assert window.full  # messages
    window.close()
    for d in dones:
        d()
    assert acks == [1]


# --- a flooding device is paused and resumed ----------------------------------------------------------------------


def test_a_flooding_device_is_paused_and_resumed_and_nothing_is_lost_or_acknowledged_before_it_is_handled():
    fleet = Fleet(max_inflight_in=4)
    device = fleet.connect()
    device.feed(answers(1, 20))  # 20 QoS 1 answers in one read
    link = device.link
    assert [c[1] for c in link.calls] == [1, 2, 3, 4]  # the window's worth went to the actor, the rest is held
    assert device.pubacks() == []  # nothing acknowledged before it is handled
    assert device.paused  # and the socket is not read meanwhile
    acknowledged: list[int] = []
    while link.held:
        link.handle(1)
        acknowledged += device.pubacks()
        assert acknowledged == list(range(1, len(acknowledged) + 1))  # PUBACKs in receive order
        handed = len(link.calls)
        assert handed - len(acknowledged) <= 4  # never more than the window in the actor's hands
    assert [c[1] for c in link.calls] == list(range(1, 21))  # every answer reached the actor, once, in order
    assert acknowledged == list(range(1, 21))
    assert not device.paused  # drained: reading again
    device.feed(answers(21, 1))
    assert [c[1] for c in link.calls][-1] == 21


def test_reading_resumes_only_once_the_window_is_half_empty():
    fleet = Fleet(max_inflight_in=4)
    device = fleet.connect()
    device.feed(answers(1, 4))
    assert device.paused
    device.link.handle(1)
    assert device.paused  # 3 of 4 still in the actor's hands
    device.link.handle(1)
    assert not device.paused
    assert device.pubacks() == [1, 2]


def test_bytes_bound_the_window_too():
    fleet = Fleet(max_inflight_in=100, max_queued_bytes=1000)
    device = fleet.connect()
    device.feed(answers(1, 5, size=400))
    assert len(device.link.calls) == 3 and device.paused  # 3 x ~430 bytes pass 1000
    device.link.handle()
    assert len(device.link.calls) == 5
    device.link.handle()
    assert device.pubacks() == [1, 2, 3, 4, 5]


def test_packets_that_arrive_while_paused_are_held_behind_the_earlier_ones():
    fleet = Fleet(max_inflight_in=2)
    device = fleet.connect()
    device.feed(answers(1, 3))
    device.feed(answers(4, 2))  # a socket that was already being read when it was paused
    device.link.handle()
    device.link.handle()
    device.link.handle()
    assert [c[1] for c in device.link.calls] == [1, 2, 3, 4, 5]
    assert device.pubacks() == [1, 2, 3, 4, 5]


def test_telemetry_is_acknowledged_at_once_unless_an_unhandled_message_is_ahead_of_it():
    fleet = Fleet()
    device = fleet.connect()
    device.feed(codec.encode_publish("v1/devices/me/telemetry", b"{}", 1, 7, 4))
    assert device.pubacks() == [7]
    device.feed(answers(1, 1) + codec.encode_publish("v1/devices/me/telemetry", b"{}", 1, 8, 4))
    assert device.pubacks() == []
    device.link.handle()
    assert device.pubacks() == [1, 8]


def test_qos0_messages_count_against_the_window_too():
    fleet = Fleet(max_inflight_in=3)
    device = fleet.connect()
    device.feed(answers(1, 10, qos=0))
    assert len(device.link.calls) == 3 and device.paused
    while device.link.held:
        device.link.handle(1)
    assert [c[1] for c in device.link.calls] == list(range(1, 11))
    assert device.read() == []  # QoS 0: nothing to acknowledge


def test_a_qos2_message_gets_its_pubrec_once_handled():
    fleet = Fleet()
    device = fleet.connect()
    publish = codec.encode_publish(ANSWER.format(1), b"{}", 2, 5, 4)
    device.feed(publish + publish)  # a duplicate before the first is handled
    assert device.read() == []
    device.link.handle()
    assert [(type(p).__name__, p.packet_id) for p in device.read()] == [("PubRec", 5), ("PubRec", 5)]
    assert len(device.link.calls) == 1


def test_a_connection_gets_its_window_with_its_first_publish_and_a_pubrel_before_any_qos2_is_answered():
    fleet = Fleet(max_inflight_in=2)
    device = fleet.connect()
    device.feed(codec.encode_subscribe(1, [("v1/devices/me/rpc/request/+", 1)], 4))
    device.feed(codec.encode_pubrel(7, 4))  # no QoS 2 publish yet: still completed
    assert [type(p).__name__ for p in device.read()] == ["SubAck", "PubComp"]
    assert device.protocol.window is None  # connected and subscribed, nothing published: no window yet
    device.feed(answers(1, 3))
    window = device.protocol.window
    assert window is not None and window.messages == 2 and device.paused  # made by the first, bounding as ever
    device.link.handle()
    assert device.pubacks() == [1, 2]
    device.link.handle()
    assert device.pubacks() == [3] and device.protocol.window is window and not device.paused


def test_a_device_call_is_acknowledged_once_handled():
    fleet = Fleet()
    device = fleet.connect()
    device.feed(codec.encode_publish("v1/devices/me/rpc/request/3", b'{"method":"m"}', 1, 9, 4))
    assert device.link.calls == [("called", 3, b'{"method":"m"}')] and device.pubacks() == []
    device.link.handle()
    assert device.pubacks() == [9]


def test_a_connection_that_ends_with_messages_unhandled_writes_nothing_more():
    fleet = Fleet(max_inflight_in=2)
    device = fleet.connect()
    device.feed(answers(1, 5))
    link = device.link
    device.lose()
    link.handle()
    assert device.pubacks() == []
    assert device.protocol.held == []


def test_the_real_actor_handles_the_answer_before_the_puback_is_written(monkeypatch):
    with actors_on_clock(monkeypatch) as clock:
        directory = DeviceDirectory(clock, ActorSettings(queue=QueueSettings(), idle_timeout=5.0))
        fleet = Fleet(attach=directory.attach, clock=clock, max_inflight_in=8)
        device = fleet.connect()
        clock.advance(0)
        device.feed(answers(1, 20))
        assert device.pubacks() == []  # the actor has not run yet
        acknowledged: list[int] = []
        for _ in range(20):
            clock.advance(0)
            acknowledged += device.pubacks()
        assert acknowledged == list(range(1, 21))
        assert not device.paused
        device.lose()
        clock.advance(0)


# --- rate limits ---------------------------------------------------------------------------------------------------


def test_a_device_over_its_rate_is_throttled_until_its_tokens_are_back_and_loses_nothing():
    fleet = Fleet(hold=False, device_rates=parse_rates("2:1"))
    device = fleet.connect()
    device.feed(answers(1, 5))
    assert device.pubacks() == [1, 2]
    assert device.paused and not device.closed
    fleet.clock.advance(0.5)  # one token back
    assert device.pubacks() == [3] and device.paused
    fleet.clock.advance(1.0)
    assert device.pubacks() == [4, 5]
    assert [c[1] for c in device.link.calls] == [1, 2, 3, 4, 5]
    assert not device.paused


def test_a_tenant_rate_is_shared_by_its_devices():
    fleet = Fleet(hold=False, tenant_rates=parse_rates("3:10"))
    a, b = fleet.connect("T0"), fleet.connect("T1")
    a.feed(answers(1, 2))
    b.feed(answers(1, 2))
    assert a.pubacks() == [1, 2] and b.pubacks() == [1]
    assert b.paused and not a.paused
    fleet.clock.advance(10 / 3)
    assert b.pubacks() == [2]


@pytest.mark.parametrize("level", [4, 5])
def test_with_the_close_action_a_device_over_its_rate_is_closed(level):
    fleet = Fleet(hold=False, device_rates=parse_rates("2:1"), rate_action="close")
    device = fleet.connect(level=level)
    device.feed(answers(1, 3, level=level))
    packets = device.read()
    assert [p.packet_id for p in packets if isinstance(p, codec.PubAck)] == [1, 2]
    assert device.closed
    if level == 5:
        assert isinstance(packets[-1], codec.Disconnect)
        assert packets[-1].reason_code == codec.REASON_MESSAGE_RATE_TOO_HIGH


def test_a_throttled_device_is_not_taken_for_dead_by_the_keep_alive():
    fleet = Fleet(hold=False, device_rates=parse_rates("1:100"))
    device = fleet.connect()
    device.feed(answers(1, 2))
    assert device.paused
    fleet.clock.advance(95)  # keep-alive 60 s x 1.5 has passed, but we were the ones not reading
    assert not device.closed
    fleet.clock.advance(10)
    assert device.pubacks() == [1, 2]


def test_without_rates_nothing_is_throttled():
    fleet = Fleet(hold=False)
    device = fleet.connect()
    device.feed(answers(1, 500))
    assert device.pubacks() == list(range(1, 501)) and not device.paused


# --- connection limits ---------------------------------------------------------------------------------------------


def test_connections_per_address_are_limited_and_freed_when_one_ends():
    fleet = Fleet(max_connections_per_address=2)
    first, second = fleet.open("10.0.0.1"), fleet.open("10.0.0.1")
    third = fleet.open("10.0.0.1")
    assert not first.closed and not second.closed
    assert third.closed
    assert not fleet.open("10.0.0.2").closed  # another address has its own count
    first.lose()
    third.lose()  # a refused connection does not free someone else's place
    assert not fleet.open("10.0.0.1").closed
    assert fleet.open("10.0.0.1").closed


@pytest.mark.parametrize("level, code", [(4, codec.CONNACK_SERVER_UNAVAILABLE), (5, codec.REASON_QUOTA_EXCEEDED)])
def test_sessions_per_device_are_limited(level, code):
    fleet = Fleet(max_sessions_per_device=2)
    fleet.connect("T0", level)
    second = fleet.connect("T0", level)
    refused = fleet.open()
    connack = refused.connect("T0", level)
    assert connack.reason_code == code and refused.closed
    assert fleet.connect("T1", level).packets[0].reason_code == 0  # another device
    second.lose()
    assert fleet.connect("T0", level).packets[0].reason_code == 0


# --- a device that does not read -----------------------------------------------------------------------------------


def test_a_device_whose_write_buffer_is_full_is_not_read_and_is_closed_after_the_write_timeout():
    fleet = Fleet(hold=False, write_timeout=30)
    device = fleet.connect()
    device.protocol.pauseProducing()  # what Twisted does when the socket's write buffer passes its bound
    assert device.paused
    device.feed(answers(1, 3))
    assert device.pubacks() == []  # held: nothing more is added to a buffer the device does not empty
    device.protocol.resumeProducing()
    assert device.pubacks() == [1, 2, 3] and not device.paused
    device.protocol.pauseProducing()
    fleet.clock.advance(29)
    assert not device.closed
    fleet.clock.advance(1)
    assert device.closed


# --- subscriptions outside the device's own topics -----------------------------------------------------------------

REFUSED = ["#", "+/devices/me/rpc/request/+", "v1/devices/other/rpc/request/+", "v1/devices/me/#", "$SYS/#",
           "v1/devices/+/rpc/request/+", "v1/devices/me/rpc/request/#"]
ALLOWED = ["v1/devices/me/rpc/request/+", "v1/devices/me/attributes", "v1/devices/me/attributes/response/+",
           "v1/devices/me/rpc/response/+", "v2/r/req/+", "v2/a", "v2/r/res/+"]


@pytest.mark.parametrize("level, refused", [(4, 0x80), (5, codec.REASON_NOT_AUTHORIZED)])
def test_subscriptions_outside_the_devices_own_topics_are_refused_per_filter(level, refused):
    fleet = Fleet(hold=False)
    device = fleet.connect(level=level)
    filters = [(f, 1) for pair in zip(REFUSED, ALLOWED) for f in pair]
    device.feed(codec.encode_subscribe(3, filters, level))
    [suback] = device.read()
    expected = [code for _ in zip(REFUSED, ALLOWED) for code in (refused, 1)]
    assert suback.reason_codes == expected
    assert device.link.calls == [("subscribed", False)]  # the allowed RPC filter still works
    assert not device.closed


def test_a_window_that_stays_full_for_a_whole_keep_alive_period_closes_the_connection():
    fleet = Fleet(max_inflight_in=2)
    device = fleet.connect()  # keep-alive 60 s: checked every 90 s
    device.feed(answers(1, 3))
    assert device.paused
    fleet.clock.advance(90)  # the first check finds the window full: it may just be busy
    assert not device.closed
    fleet.clock.advance(90)  # nothing handled since: the actor lost the reports
    assert device.closed


def test_a_window_that_moves_keeps_the_connection():
    fleet = Fleet(max_inflight_in=2)
    device = fleet.connect()
    device.feed(answers(1, 5))
    fleet.clock.advance(90)
    device.link.handle(1)  # slow, but moving
    assert device.paused  # 1 of 2 handed... then the held third filled it again
    fleet.clock.advance(90)
    assert not device.closed


def test_a_gateway_answer_is_acknowledged_once_the_sub_devices_actor_handled_it():
    fleet = Fleet()
    sub_device = DEVICES["T2"]
    fleet.factory.find_or_create_subdevice = lambda gateway, name, kind: succeed(sub_device)
    gateway = fleet.connect("T0")
    gateway.feed(codec.encode_publish("v1/gateway/connect", b'{"device":"dev2"}', 1, 1, 4))
    assert gateway.pubacks() == [1]  # the lookup is done (it answered at once)
    [sub] = [a for a in fleet.attach.attached if a.device is sub_device]
    gateway.feed(codec.encode_publish("v1/gateway/rpc", b'{"device":"dev2","id":4,"data":{"ok":1}}', 1, 2, 4))
    assert sub.link.of("answered") == [("answered", 4, b'{"ok":1}')]
    assert gateway.pubacks() == []
    sub.link.handle()
    assert gateway.pubacks() == [2]
