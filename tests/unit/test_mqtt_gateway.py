"""MQTT gateways in memory: StringTransport for the gateway's socket, task.Clock for time, recording actor refs."""

from __future__ import annotations

import json
from uuid import uuid4

from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport

from nanoiot.actors import messages as m
from nanoiot.persistence.records import NULL_UUID, Device
from nanoiot.transports.mqtt import codec
from nanoiot.transports.mqtt.protocol import MqttFactory
from nanoiot.transports.session import Delivery
from tests.fixtures.recording import RecordingRef

TOKEN = "GATEWAY_TOKEN"
TENANT = uuid4()
GATEWAY = Device(uuid4(), 0, TENANT, NULL_UUID, "gw", "gateway", None, None)


class GatewayHarness:
    """A gateway connection with a fake catalog: sub-devices are 'created' on first lookup."""

    def __init__(self, lookups_wait: bool = False, gateways: bool = True) -> None:
        self.clock = task.Clock()
        #: device name -> its actor ref; the gateway's own actor is under its name.
        self.refs: dict[str, RecordingRef] = {}
        self.devices: dict[str, Device] = {}
        self.lookups: list[tuple[Device, str, str]] = []
        self.waiting: dict[str, Deferred] = {}
        self.sessions: list = []
        self.lookups_wait = lookups_wait

        def authenticate(token: str) -> Deferred:
            return succeed(GATEWAY if token == TOKEN else None)

        def attach(device: Device, session) -> RecordingRef:
            self.sessions.append(session)
            ref = self.refs.setdefault(device.name, RecordingRef(device.name))
            ref.tell(m.AttachSession(session))
            return ref

        def find_or_create(gateway: Device, name: str, device_type: str) -> Deferred:
            self.lookups.append((gateway, name, device_type))
            if self.lookups_wait:
                self.waiting[name] = Deferred()
                return self.waiting[name]
            return succeed(self.device(name, device_type))

        self.factory = MqttFactory(authenticate, attach, self.clock, max_packet_size=4096, connect_timeout=10,
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


def test_connecting_a_sub_device_attaches_a_gateway_session_to_its_actor_and_subscribes_it_to_commands():
    h = GatewayHarness()
    h.connect()
    sub = h.connect_sub("Sensor A", "thermometer")
    assert h.lookups == [(GATEWAY, "Sensor A", "thermometer")]
    assert sub.transport == "mqtt-gateway"
    assert sub.device is h.devices["Sensor A"]
    assert sub.session_id != h.gateway_session.session_id
    ref = h.refs["Sensor A"]
    [attach] = ref.of(m.AttachSession)
    assert attach.session is sub and attach.exclusive
    assert [s.session_id for s in ref.of(m.SubscribeCommands)] == [sub.session_id]
    # The gateway's own actor hears nothing about its sub-devices.
    assert h.refs["gw"].of(m.SubscribeCommands) == []


def test_a_connect_without_a_type_creates_a_default_device_and_a_repeated_connect_changes_nothing():
    h = GatewayHarness()
    h.connect()
    h.connect_sub("Sensor A")
    h.publish("v1/gateway/connect", {"device": "Sensor A", "type": "other"})
    h.written()
    assert h.lookups == [(GATEWAY, "Sensor A", "default")]
    assert len(h.refs["Sensor A"].of(m.AttachSession)) == 1


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
    [acked] = h.refs["Sensor A"].of(m.CommandAcked)
    assert (acked.session_id, acked.request_id) == (sub.session_id, 7)
    assert h.refs["gw"].of(m.CommandAcked) == []
    h.protocol.dataReceived(codec.encode_puback(publish.packet_id, 4))  # a duplicate is ignored
    assert len(h.refs["Sensor A"].of(m.CommandAcked)) == 1


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
    assert [a.request_id for a in h.refs["gw"].of(m.CommandAcked)] == [1]
    assert h.refs["Sensor A"].of(m.CommandAcked) == []
    assert sub.send_command(3, "sub", None, 1) is Delivery.AWAITING_ACK


def test_a_gateway_answer_is_routed_to_the_sub_device_actor_with_data_as_the_payload():
    h = GatewayHarness()
    h.connect()
    sub = h.connect_sub("Sensor A")
    h.publish("v1/gateway/rpc", {"device": "Sensor A", "id": 42, "data": {"success": True, "t": 21.5}})
    assert [type(p).__name__ for p in h.written()] == ["PubAck"]
    [answer] = h.refs["Sensor A"].of(m.CommandAnswered)
    assert (answer.session_id, answer.request_id) == (sub.session_id, 42)
    assert json.loads(answer.payload) == {"success": True, "t": 21.5}
    assert h.refs["gw"].of(m.CommandAnswered) == []


def test_answers_for_two_sub_devices_go_to_their_own_actors():
    h = GatewayHarness()
    h.connect()
    a = h.connect_sub("A")
    b = h.connect_sub("B")
    h.publish("v1/gateway/rpc", {"device": "B", "id": 2, "data": "b"})
    h.publish("v1/gateway/rpc", {"device": "A", "id": 1, "data": [1]})
    assert [(x.session_id, x.request_id, x.payload) for x in h.refs["A"].of(m.CommandAnswered)] == \
        [(a.session_id, 1, b"[1]")]
    assert [(x.session_id, x.request_id, x.payload) for x in h.refs["B"].of(m.CommandAnswered)] == \
        [(b.session_id, 2, b'"b"')]


def test_bad_gateway_publishes_are_acknowledged_and_ignored_without_closing_the_connection():
    h = GatewayHarness()
    h.connect()
    h.connect_sub("Sensor A")
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
    assert h.refs["Sensor A"].of(m.CommandAnswered) == []
    assert h.refs["Sensor A"].of(m.DetachSession) == []


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
    assert [d.session_id for d in h.refs["Sensor A"].of(m.DetachSession)] == [sub.session_id]
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
    assert h.refs["Sensor A"].of(m.CommandAcked) == []
    assert h.gateway_session.gateway_in_flight == {}


def test_a_disconnect_while_the_sub_device_is_looked_up_wins():
    h = GatewayHarness(lookups_wait=True)
    h.connect()
    h.publish("v1/gateway/connect", {"device": "Sensor A"})
    h.publish("v1/gateway/disconnect", {"device": "Sensor A"})
    h.waiting["Sensor A"].callback(h.device("Sensor A"))
    assert "Sensor A" not in h.refs


def test_closing_the_gateway_connection_detaches_every_sub_device_and_its_own_session():
    h = GatewayHarness()
    h.connect()
    a = h.connect_sub("A")
    b = h.connect_sub("B")
    h.protocol.connectionLost(None)
    assert [d.session_id for d in h.refs["A"].of(m.DetachSession)] == [a.session_id]
    assert [d.session_id for d in h.refs["B"].of(m.DetachSession)] == [b.session_id]
    assert [d.session_id for d in h.refs["gw"].of(m.DetachSession)] == [h.gateway_session.session_id]
    assert a.send_command(1, "m", None, 1) is Delivery.NOT_SENT


def test_a_sub_device_found_after_the_gateway_closed_is_not_attached():
    h = GatewayHarness(lookups_wait=True)
    h.connect()
    h.publish("v1/gateway/connect", {"device": "Sensor A"})
    h.protocol.connectionLost(None)
    h.waiting["Sensor A"].callback(h.device("Sensor A"))
    assert "Sensor A" not in h.refs


def test_a_failed_lookup_is_logged_and_a_later_connect_tries_again():
    h = GatewayHarness(lookups_wait=True)
    h.connect()
    h.publish("v1/gateway/connect", {"device": "Sensor A"})
    h.waiting["Sensor A"].errback(RuntimeError("database down"))
    h.publish("v1/gateway/connect", {"device": "Sensor A"})
    h.waiting["Sensor A"].callback(h.device("Sensor A"))
    assert len(h.lookups) == 2
    assert len(h.refs["Sensor A"].of(m.SubscribeCommands)) == 1
    assert not h.transport.disconnecting


def test_the_actor_closing_a_sub_session_removes_it_from_the_gateway_without_closing_the_gateway():
    h = GatewayHarness()
    h.connect()
    sub = h.connect_sub("Sensor A")
    sub.close("replaced by a newer session of the same device")
    assert not h.transport.disconnecting
    assert sub.send_command(1, "m", None, 1) is Delivery.NOT_SENT
    h.protocol.connectionLost(None)
    assert h.refs["Sensor A"].of(m.DetachSession) == []  # the actor already dropped it


def test_the_gateway_subscribes_to_its_rpc_topic_at_qos1_without_asking_for_its_own_commands():
    h = GatewayHarness()
    h.connect()
    h.protocol.dataReceived(codec.encode_subscribe(1, [("v1/gateway/rpc", 1)], 4))
    [suback] = h.written()
    assert suback.reason_codes == [1]
    assert h.refs["gw"].of(m.SubscribeCommands) == []


def test_without_a_sub_device_finder_gateway_publishes_are_only_acknowledged():
    h = GatewayHarness(gateways=False)
    h.connect()
    h.publish("v1/gateway/connect", {"device": "Sensor A"})
    assert [type(p).__name__ for p in h.written()] == ["PubAck"]
    assert h.lookups == [] and len(h.sessions) == 1
    assert not h.transport.disconnecting
