"""MQTT gateways in memory: StringTransport for the gateway's socket, task.Clock for time, recording device links."""

from __future__ import annotations

import json
from uuid import uuid4

from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport

from nanoiot.persistence.records import NULL_UUID, Device
from nanoiot.port.link import NO_LINK
from nanoiot.port.session import Delivery
from nanoiot.transports.mqtt import codec
from nanoiot.transports.mqtt.protocol import MqttFactory
from tests.fixtures.recording import RecordingAttach

TOKEN = "GATEWAY_TOKEN"
TENANT = uuid4()
GATEWAY = Device(uuid4(), 0, TENANT, NULL_UUID, "gw", "gateway", None, None)


class GatewayHarness:
    """A gateway connection with a fake catalog: sub-devices are 'created' on first lookup."""

    def __init__(self, lookups_wait: bool = False, gateways: bool = True) -> None:
        self.clock = task.Clock()
        #: Every session attached (the gateway's own first), each with its own recording link.
        self.attach = RecordingAttach()
        self.devices: dict[str, Device] = {}
        self.lookups: list[tuple[Device, str, str]] = []
        self.waiting: dict[str, Deferred] = {}
        self.lookups_wait = lookups_wait

        def authenticate(token: str) -> Deferred:
            return succeed(GATEWAY if token == TOKEN else None)

        def find_or_create(gateway: Device, name: str, device_type: str) -> Deferred:
            self.lookups.append((gateway, name, device_type))
            if self.lookups_wait:
                self.waiting[name] = Deferred()
                return self.waiting[name]
            return succeed(self.device(name, device_type))

        self.factory = MqttFactory(authenticate, self.attach, self.clock, max_packet_size=4096, connect_timeout=10,
                                   find_or_create_subdevice=find_or_create if gateways else None)
        self.protocol = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.level = 4
        self.next_pid = 100

    def device(self, name: str, device_type: str = "default") -> Device:
        if name not in self.devices:
            self.devices[name] = Device(uuid4(), 0, TENANT, NULL_UUID, name, device_type, None, None)
        return self.devices[name]

    def connect(self, level: int = 4, **kw) -> None:
        self.level = level
        self.protocol.dataReceived(codec.encode_connect("", protocol_level=level, username=TOKEN, keep_alive=0,
                                                        **kw))
        [connack] = self.written()
        assert connack.reason_code == 0

    def written(self) -> list:
        frames = codec.FrameReader(1 << 24).feed(self.transport.value())
        self.transport.clear()
        return [codec.decode(f, self.level) for f in frames]

    def publish(self, topic: str, payload, qos: int = 1) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.next_pid += 1
        self.protocol.dataReceived(codec.encode_publish(topic, data, qos, self.next_pid if qos else None,
                                                        self.level))

    def connect_sub(self, name: str, device_type: str | None = None):
        body = {"device": name} if device_type is None else {"device": name, "type": device_type}
        self.publish("v1/gateway/connect", body)
        assert [type(p).__name__ for p in self.written()] == ["PubAck"]
        return self.sub_session(name)

    def sub_session(self, name: str):
        return [s for s in self.sessions if s.device.name == name][-1]

    @property
    def gateway_session(self):
        return self.sessions[0]

    @property
    def sessions(self) -> list:
        return self.attach.sessions

    def attached_to(self, name: str) -> list:
        """Every attach of the device called ``name`` (the gateway's own under its name, "gw")."""
        return [a for a in self.attach.attached if a.device.name == name]

    def calls(self, name: str) -> list[tuple]:
        """What the sessions of the device called ``name`` reported, as (session id, call), in order."""
        ids = {a.session.session_id for a in self.attached_to(name)}
        return [(sid, call) for sid, call in self.attach.reports if sid in ids]


def test_connecting_a_sub_device_attaches_a_gateway_session_to_its_actor_and_subscribes_it_to_commands():
    h = GatewayHarness()
    h.connect()
    sub = h.connect_sub("Sensor A", "thermometer")
    assert h.lookups == [(GATEWAY, "Sensor A", "thermometer")]
    assert sub.transport == "mqtt-gateway"
    assert sub.device is h.devices["Sensor A"]
    assert sub.session_id != h.gateway_session.session_id
    [attached] = h.attached_to("Sensor A")
    assert attached.session is sub and attached.exclusive is True and attached.device is h.devices["Sensor A"]
    assert sub.link is attached.link
    assert h.calls("Sensor A") == [(sub.session_id, ("subscribed", False))]
    # The gateway's own actor hears nothing about its sub-devices.
    assert h.calls("gw") == []


def test_a_connect_without_a_type_creates_a_default_device_and_a_repeated_connect_changes_nothing():
    h = GatewayHarness()
    h.connect()
    h.connect_sub("Sensor A")
    h.publish("v1/gateway/connect", {"device": "Sensor A", "type": "other"})
    h.written()
    assert h.lookups == [(GATEWAY, "Sensor A", "default")]
    assert len(h.attached_to("Sensor A")) == 1


def test_a_command_for_a_sub_device_is_published_on_the_gateway_rpc_topic_in_thingsboard_shape():
    h = GatewayHarness()
    h.connect()
    sub = h.connect_sub("Sensor A")
    assert sub.send_command(42, "setState", {"on": True}, 1) is Delivery.AWAITING_ACK
    [publish] = h.written()
    assert publish.topic == "v1/gateway/rpc"
    assert publish.qos == 1 and publish.packet_id is not None
    assert json.loads(publish.payload) == {"device": "Sensor A",
                                           "data": {"id": 42, "method": "setState", "params": {"on": True}}}


def test_a_qos0_sub_device_command_counts_as_delivered_once_written():
    h = GatewayHarness()
    h.connect()
    sub = h.connect_sub("Sensor A")
    assert sub.send_command(1, "m", None, 0) is Delivery.DELIVERED
    [publish] = h.written()
    assert publish.qos == 0 and publish.topic == "v1/gateway/rpc"


def test_the_gateways_puback_of_a_sub_device_command_is_reported_to_the_sub_device_actor_once():
    h = GatewayHarness()
    h.connect()
    sub = h.connect_sub("Sensor A")
    sub.send_command(7, "m", None, 1)
    [publish] = h.written()
    h.protocol.dataReceived(codec.encode_puback(publish.packet_id, 4))
    assert h.attach.calls(sub) == [("subscribed", False), ("acked", 7)]
    assert h.calls("gw") == []
    h.protocol.dataReceived(codec.encode_puback(publish.packet_id, 4))  # a duplicate is ignored
    assert h.attach.calls(sub) == [("subscribed", False), ("acked", 7)]


def test_gateway_and_sub_device_commands_share_one_packet_id_space_and_one_receive_window():
    h = GatewayHarness()
    h.connect(level=5, properties={"receive_maximum": 2})
    sub = h.connect_sub("Sensor A")
    own = h.gateway_session
    assert own.send_command(1, "own", None, 1) is Delivery.AWAITING_ACK
    assert sub.send_command(2, "sub", None, 1) is Delivery.AWAITING_ACK
    assert sub.send_command(3, "sub", None, 1) is Delivery.NOT_SENT  # the gateway's window is full
    first, second = h.written()
    assert first.packet_id != second.packet_id
    h.protocol.dataReceived(codec.encode_puback(first.packet_id, 5))
    assert h.attach.calls(own) == [("acked", 1)]
    assert h.attach.link(sub).of("acked") == []
    assert sub.send_command(3, "sub", None, 1) is Delivery.AWAITING_ACK


def test_a_gateway_answer_is_routed_to_the_sub_device_actor_with_data_as_the_payload():
    h = GatewayHarness()
    h.connect()
    sub = h.connect_sub("Sensor A")
    h.publish("v1/gateway/rpc", {"device": "Sensor A", "id": 42, "data": {"success": True, "t": 21.5}})
    assert [type(p).__name__ for p in h.written()] == ["PubAck"]
    [(name, request_id, payload)] = h.attach.link(sub).of("answered")
    assert (name, request_id) == ("answered", 42)
    assert json.loads(payload) == {"success": True, "t": 21.5}
    assert h.calls("gw") == []


def test_answers_for_two_sub_devices_go_to_their_own_actors():
    h = GatewayHarness()
    h.connect()
    a = h.connect_sub("A")
    b = h.connect_sub("B")
    h.publish("v1/gateway/rpc", {"device": "B", "id": 2, "data": "b"})
    h.publish("v1/gateway/rpc", {"device": "A", "id": 1, "data": [1]})
    assert h.attach.link(a).of("answered") == [("answered", 1, b"[1]")]
    assert h.attach.link(b).of("answered") == [("answered", 2, b'"b"')]
    assert [(sid, call) for sid, call in h.attach.reports if call[0] == "answered"] == [
        (b.session_id, ("answered", 2, b'"b"')), (a.session_id, ("answered", 1, b"[1]"))]


def test_bad_gateway_publishes_are_acknowledged_and_ignored_without_closing_the_connection():
    h = GatewayHarness()
    h.connect()
    sub = h.connect_sub("Sensor A")
    bad = [
        ("v1/gateway/connect", b"not json {"),
        ("v1/gateway/connect", b"[1, 2]"),
        ("v1/gateway/connect", {"type": "no device"}),
        ("v1/gateway/connect", {"device": ""}),
        ("v1/gateway/disconnect", {"device": 5}),
        ("v1/gateway/rpc", b"\xff\xfe"),
        ("v1/gateway/rpc", {"id": 1, "data": {}}),
        ("v1/gateway/rpc", {"device": "Sensor A", "data": {}}),
        ("v1/gateway/rpc", {"device": "Sensor A", "id": "x", "data": {}}),
        ("v1/gateway/rpc", {"device": "Unknown", "id": 1, "data": {}}),
    ]
    for topic, payload in bad:
        h.publish(topic, payload)
        assert [type(p).__name__ for p in h.written()] == ["PubAck"], (topic, payload)
    assert not h.transport.disconnecting
    assert h.lookups == [(GATEWAY, "Sensor A", "default")]
    assert h.attach.calls(sub) == [("subscribed", False)]  # no answer, no close
    assert h.calls("gw") == []


def test_other_gateway_topics_are_acknowledged_and_ignored():
    h = GatewayHarness()
    h.connect()
    h.publish("v1/gateway/telemetry", {"Sensor A": [{"t": 1}]})
    assert [type(p).__name__ for p in h.written()] == ["PubAck"]
    assert h.lookups == []


def test_disconnecting_a_sub_device_detaches_its_session_and_stops_its_commands():
    h = GatewayHarness()
    h.connect()
    sub = h.connect_sub("Sensor A")
    h.publish("v1/gateway/disconnect", {"device": "Sensor A"})
    h.written()
    assert h.attach.calls(sub) == [("subscribed", False), ("closed",)]
    assert sub.link is NO_LINK
    assert sub.send_command(1, "m", None, 1) is Delivery.NOT_SENT
    assert h.transport.value() == b""
    # Connecting it again gives a new session.
    again = h.connect_sub("Sensor A")
    assert again.session_id != sub.session_id


def test_a_puback_after_the_sub_device_left_frees_the_packet_id_but_reports_nothing():
    h = GatewayHarness()
    h.connect()
    sub = h.connect_sub("Sensor A")
    sub.send_command(5, "m", None, 1)
    [publish] = h.written()
    h.publish("v1/gateway/disconnect", {"device": "Sensor A"})
    h.written()
    assert publish.packet_id in h.gateway_session.gateway_in_flight  # still taken until acknowledged
    h.protocol.dataReceived(codec.encode_puback(publish.packet_id, 4))
    assert h.attach.calls(sub) == [("subscribed", False), ("closed",)]  # no ack after the close
    assert h.calls("gw") == []
    assert h.gateway_session.gateway_in_flight == {}


def test_a_disconnect_while_the_sub_device_is_looked_up_wins():
    h = GatewayHarness(lookups_wait=True)
    h.connect()
    h.publish("v1/gateway/connect", {"device": "Sensor A"})
    h.publish("v1/gateway/disconnect", {"device": "Sensor A"})
    h.waiting["Sensor A"].callback(h.device("Sensor A"))
    assert h.attached_to("Sensor A") == []


def test_closing_the_gateway_connection_detaches_every_sub_device_and_its_own_session():
    h = GatewayHarness()
    h.connect()
    a = h.connect_sub("A")
    b = h.connect_sub("B")
    h.protocol.connectionLost(None)
    assert h.attach.calls(a) == [("subscribed", False), ("closed",)]
    assert h.attach.calls(b) == [("subscribed", False), ("closed",)]
    assert h.attach.calls(h.gateway_session) == [("closed",)]
    assert a.link is NO_LINK and b.link is NO_LINK and h.gateway_session.link is NO_LINK
    assert a.send_command(1, "m", None, 1) is Delivery.NOT_SENT


def test_a_sub_device_found_after_the_gateway_closed_is_not_attached():
    h = GatewayHarness(lookups_wait=True)
    h.connect()
    h.publish("v1/gateway/connect", {"device": "Sensor A"})
    h.protocol.connectionLost(None)
    h.waiting["Sensor A"].callback(h.device("Sensor A"))
    assert h.attached_to("Sensor A") == []


def test_a_failed_lookup_is_logged_and_a_later_connect_tries_again():
    h = GatewayHarness(lookups_wait=True)
    h.connect()
    h.publish("v1/gateway/connect", {"device": "Sensor A"})
    h.waiting["Sensor A"].errback(RuntimeError("database down"))
    h.publish("v1/gateway/connect", {"device": "Sensor A"})
    h.waiting["Sensor A"].callback(h.device("Sensor A"))
    assert len(h.lookups) == 2
    [attached] = h.attached_to("Sensor A")
    assert attached.link.calls == [("subscribed", False)]
    assert not h.transport.disconnecting


def test_the_actor_closing_a_sub_session_removes_it_from_the_gateway_without_closing_the_gateway():
    h = GatewayHarness()
    h.connect()
    sub = h.connect_sub("Sensor A")
    sub.close("replaced by a newer session of the same device")
    assert not h.transport.disconnecting
    assert sub.send_command(1, "m", None, 1) is Delivery.NOT_SENT
    assert sub.link is NO_LINK
    h.protocol.connectionLost(None)
    assert h.attach.calls(sub) == [("subscribed", False)]  # the actor already dropped it: no close


def test_the_gateway_subscribes_to_its_rpc_topic_at_qos1_without_asking_for_its_own_commands():
    h = GatewayHarness()
    h.connect()
    h.protocol.dataReceived(codec.encode_subscribe(1, [("v1/gateway/rpc", 1)], 4))
    [suback] = h.written()
    assert suback.reason_codes == [1]
    assert h.calls("gw") == []


def test_without_a_sub_device_finder_gateway_publishes_are_only_acknowledged():
    h = GatewayHarness(gateways=False)
    h.connect()
    h.publish("v1/gateway/connect", {"device": "Sensor A"})
    assert [type(p).__name__ for p in h.written()] == ["PubAck"]
    assert h.lookups == [] and len(h.sessions) == 1
    assert not h.transport.disconnecting
