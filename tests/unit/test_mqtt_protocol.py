"""The MQTT protocol in memory: StringTransport for the socket, task.Clock for time, a recording device link."""

from __future__ import annotations

from uuid import uuid4

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport

from nanoiot.persistence.records import NULL_UUID, Device
from nanoiot.port.link import NO_LINK
from nanoiot.port.session import Delivery
from nanoiot.transports.mqtt import codec
from nanoiot.transports.mqtt.protocol import MAX_HELD_FRAMES, MqttFactory
from tests.fixtures.recording import RecordingAttach, RecordingLink

TOKEN = "GOOD_TOKEN"
DEVICE = Device(uuid4(), 0, uuid4(), NULL_UUID, "dev", "default", None, None)


class Harness:
    def __init__(self, auth: Deferred | None = None, max_packet_size: int = 1024) -> None:
        self.clock = task.Clock()
        self.attach = RecordingAttach()

        def authenticate(token: str) -> Deferred:
            if auth is not None:
                return auth
            return succeed(DEVICE if token == TOKEN else None)

        self.factory = MqttFactory(authenticate, self.attach, self.clock, max_packet_size=max_packet_size,
                                   connect_timeout=10)
        self.protocol = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.level = 4

    def feed(self, data: bytes, chunk: int | None = None) -> None:
        if chunk is None:
            self.protocol.dataReceived(data)
        else:
            for i in range(0, len(data), chunk):
                self.protocol.dataReceived(data[i:i + chunk])

    def written_packets(self, level: int | None = None) -> list:
        reader = codec.FrameReader(1 << 24)
        frames = reader.feed(self.transport.value())
        self.transport.clear()
        return [codec.decode(f, level or self.level) for f in frames]

    def connect(self, level: int = 4, token: str = TOKEN, keep_alive: int = 60, **kw) -> list:
        self.level = level
        self.feed(codec.encode_connect("", protocol_level=level, username=token, keep_alive=keep_alive, **kw))
        return self.written_packets(level)

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    @property
    def sessions(self) -> list:
        return self.attach.sessions

    @property
    def link(self) -> RecordingLink:
        """The (one) device session's link."""
        [attached] = self.attach.attached
        return attached.link


def test_a_known_token_gets_a_success_connack_and_attaches_a_session():
    h = Harness()
    [connack] = h.connect()
    assert isinstance(connack, codec.ConnAck) and connack.reason_code == 0 and not connack.session_present
    [attached] = h.attach.attached
    assert attached.device is DEVICE and attached.session.device is DEVICE
    assert attached.exclusive is True  # a reconnect replaces the older connection
    assert attached.session.link is attached.link
    assert h.attach.reports == []  # attaching is not subscribing
    assert not h.closed


def test_an_mqtt5_connack_tells_the_maximum_packet_size_and_receive_maximum():
    h = Harness(max_packet_size=2048)
    [connack] = h.connect(level=5)
    assert connack.reason_code == 0
    assert connack.properties["maximum_packet_size"] == 2048
    assert connack.properties["receive_maximum"] == h.factory.receive_maximum


@pytest.mark.parametrize("level, code", [(4, codec.CONNACK_NOT_AUTHORIZED), (5, codec.REASON_NOT_AUTHORIZED)])
def test_an_unknown_token_is_refused_as_not_authorized_and_closed(level, code):
    h = Harness()
    [connack] = h.connect(level=level, token="nope")
    assert connack.reason_code == code
    assert h.closed
    assert h.sessions == []


def test_a_connect_without_a_user_name_is_refused():
    h = Harness()
    h.feed(codec.encode_connect("c", protocol_level=4))
    [connack] = h.written_packets()
    assert connack.reason_code == codec.CONNACK_NOT_AUTHORIZED
    assert h.closed


def test_an_unsupported_protocol_level_gets_return_code_1_and_is_closed():
    h = Harness()
    body = codec.encode_connect("", protocol_level=4, username=TOKEN)
    h.feed(body.replace(b"MQTT\x04", b"MQTT\x06", 1))
    [connack] = h.written_packets()
    assert connack.reason_code == codec.CONNACK_UNACCEPTABLE_PROTOCOL_VERSION
    assert h.closed


def test_a_connection_that_never_sends_connect_is_closed_after_the_connect_timeout():
    h = Harness()
    h.clock.advance(9.9)
    assert not h.closed
    h.clock.advance(0.2)
    assert h.closed


def test_a_first_packet_other_than_connect_closes_the_connection():
    h = Harness()
    h.feed(codec.encode_pingreq())
    assert h.closed
    assert h.transport.value() == b""


def test_a_silent_client_is_closed_after_one_and_a_half_keep_alives_and_activity_postpones_it():
    h = Harness()
    h.connect(keep_alive=10)
    h.clock.advance(14)
    h.feed(codec.encode_pingreq())
    assert isinstance(h.written_packets()[0], codec.PingResp)
    h.clock.advance(14)
    assert not h.closed
    h.clock.advance(1.1)
    assert h.closed
    assert h.clock.getDelayedCalls() == []


def test_keep_alive_zero_means_no_timeout():
    h = Harness()
    h.connect(keep_alive=0)
    h.clock.advance(10_000)
    assert not h.closed


@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 7])
def test_connect_subscribe_and_publish_in_any_chunking_give_the_same_answers(chunk):
    h = Harness()
    stream = (
        codec.encode_connect("", protocol_level=4, username=TOKEN)
        + codec.encode_subscribe(1, [("v1/devices/me/rpc/request/+", 1)], 4)
        + codec.encode_publish("v1/devices/me/rpc/response/3", b'{"ok":1}', 1, 9, 4)
        + codec.encode_pingreq()
    )
    h.feed(stream, chunk)
    kinds = [type(p).__name__ for p in h.written_packets()]
    assert kinds == ["ConnAck", "SubAck", "PubAck", "PingResp"]
    assert h.link.calls == [("subscribed", False), ("answered", 3, b'{"ok":1}')]


def test_packets_that_arrive_while_the_token_is_checked_are_handled_after_it():
    pending: Deferred = Deferred()
    h = Harness(auth=pending)
    h.feed(codec.encode_connect("", protocol_level=4, username=TOKEN)
           + codec.encode_subscribe(1, [("v1/devices/me/rpc/request/+", 1)], 4))
    assert h.transport.value() == b""
    pending.callback(DEVICE)
    assert [type(p).__name__ for p in h.written_packets()] == ["ConnAck", "SubAck"]
    assert h.link.calls == [("subscribed", False)]


def test_reading_goes_on_during_the_token_lookup_until_too_many_packets_are_held():
    pending: Deferred = Deferred()
    h = Harness(auth=pending)
    h.feed(codec.encode_connect("", protocol_level=4, username=TOKEN))
    assert h.transport.producerState == "producing"  # no pause (two epoll_ctl calls) for an ordinary lookup
    pings = codec.encode_pingreq()
    h.feed(pings * (MAX_HELD_FRAMES - 1))
    assert h.transport.producerState == "producing"
    h.feed(pings * 3)  # the 16th held packet stops reading; what was already read is still held
    assert h.transport.producerState == "paused"
    assert h.transport.value() == b""
    pending.callback(DEVICE)
    assert h.transport.producerState == "producing"
    packets = h.written_packets()
    assert [type(p).__name__ for p in packets] == ["ConnAck"] + ["PingResp"] * (MAX_HELD_FRAMES + 2)


def test_subscribing_to_the_rpc_topic_asks_the_actor_for_commands_and_other_topics_are_only_granted():
    h = Harness()
    h.connect()
    h.feed(codec.encode_subscribe(5, [("v1/devices/me/attributes", 1), ("v1/devices/me/rpc/request/+", 2),
                                      ("bad/#/filter", 0)], 4))
    [suback] = h.written_packets()
    assert suback.packet_id == 5
    assert suback.reason_codes == [1, 1, 0x80]
    assert h.link.calls == [("subscribed", False)]


def test_the_v2_short_subscription_switches_the_topic_family_of_commands():
    h = Harness()
    h.connect()
    h.feed(codec.encode_subscribe(1, [("v2/r/req/+", 1)], 4))
    h.written_packets()
    session = h.sessions[0]
    assert session.send_command(7, "m", {"a": 1}, 1) is Delivery.AWAITING_ACK
    [publish] = h.written_packets()
    assert publish.topic == "v2/r/req/7"
    assert publish.qos == 1


def test_a_device_subscribed_at_qos_0_gets_commands_at_qos_0_and_they_count_as_delivered():
    h = Harness()
    h.connect()
    h.feed(codec.encode_subscribe(1, [("v1/devices/me/rpc/request/+", 0)], 4))
    h.written_packets()
    session = h.sessions[0]
    assert session.send_command(7, "m", None, 1) is Delivery.DELIVERED  # no PUBACK will come
    [publish] = h.written_packets()
    assert publish.qos == 0 and session.in_flight == {}


def test_unsubscribing_from_the_rpc_topic_tells_the_actor_and_other_topics_do_not():
    h = Harness()
    h.connect()
    h.feed(codec.encode_subscribe(1, [("v1/devices/me/rpc/request/+", 1)], 4))
    h.feed(codec.encode_unsubscribe(2, ["v1/devices/me/attributes"], 4))
    h.feed(codec.encode_unsubscribe(3, ["v1/devices/me/rpc/request/+", "v1/devices/me/rpc/request/#"], 4))
    assert [type(p).__name__ for p in h.written_packets()] == ["SubAck", "UnsubAck", "UnsubAck"]
    assert h.link.calls == [("subscribed", False), ("unsubscribed",)]


def test_protobuf_short_topics_are_refused_rather_than_served_json():
    h = Harness()
    h.connect()
    h.feed(codec.encode_subscribe(1, [("v2/r/req/p/+", 1)], 4))
    [suback] = h.written_packets()
    assert suback.reason_codes == [0x80]
    assert h.link.calls == []


def test_a_command_is_published_and_its_puback_is_reported_to_the_actor():
    h = Harness()
    h.connect()
    session = h.sessions[0]
    session.send_command(0, "setGpio", {"pin": 7}, 1)
    [publish] = h.written_packets()
    assert publish.topic == "v1/devices/me/rpc/request/0"
    assert publish.payload == b'{"method":"setGpio","params":{"pin":7}}'
    h.feed(codec.encode_puback(publish.packet_id, 4))
    assert h.attach.calls(session) == [("acked", 0)]
    h.feed(codec.encode_puback(publish.packet_id, 4))  # a duplicate PUBACK is ignored
    assert h.attach.calls(session) == [("acked", 0)]


def test_a_qos0_command_counts_as_delivered_once_written():
    h = Harness()
    h.connect()
    assert h.sessions[0].send_command(1, "m", None, 0) is Delivery.DELIVERED
    [publish] = h.written_packets()
    assert publish.qos == 0


def test_a_device_call_is_handed_to_the_actor_and_answered_on_its_family():
    h = Harness()
    h.connect()
    h.feed(codec.encode_publish("v2/r/req/12", b'{"method":"getCurrentTime"}', 0, None, 4))
    assert h.link.calls == [("called", 12, b'{"method":"getCurrentTime"}')]
    h.sessions[0].send_reply(12, b"123")
    [reply] = h.written_packets()
    assert (reply.topic, reply.payload) == ("v2/r/res/12", b"123")


def test_a_publish_to_a_request_topic_without_a_numeric_id_is_ignored_but_acknowledged():
    h = Harness()
    h.connect()
    h.feed(codec.encode_publish("v1/devices/me/rpc/request/abc", b"{}", 1, 3, 4))
    assert [type(p).__name__ for p in h.written_packets()] == ["PubAck"]
    assert h.link.calls == []


def test_qos2_publishes_are_acted_on_once_and_complete_the_handshake():
    h = Harness()
    h.connect()
    publish = codec.encode_publish("v1/devices/me/rpc/response/1", b"{}", 2, 4, 4)
    h.feed(publish + publish)
    assert h.link.calls == [("answered", 1, b"{}")]
    h.feed(codec.encode_pubrel(4, 4))
    assert [type(p).__name__ for p in h.written_packets()] == ["PubRec", "PubRec", "PubComp"]


def test_an_oversized_packet_closes_only_this_connection_before_its_body_arrives():
    h = Harness(max_packet_size=1024)
    h.connect()
    header = codec.encode_publish("t/x", b"x" * 2000, 0, None, 4)[:5]
    h.feed(header)
    assert h.closed


def test_a_malformed_packet_closes_the_connection():
    h = Harness()
    h.connect()
    h.feed(b"\x82\x02\x00\x00")  # SUBSCRIBE without any topic filter
    assert h.closed


def test_losing_the_connection_detaches_the_session_and_cancels_timers():
    h = Harness()
    h.connect(keep_alive=30)
    link = h.link
    h.protocol.connectionLost(None)
    assert link.calls == [("closed",)]
    assert h.sessions[0].link is NO_LINK  # nothing more is reported on it
    assert h.clock.getDelayedCalls() == []


def test_disconnect_closes_cleanly():
    h = Harness()
    h.connect()
    h.feed(codec.encode_disconnect(4))
    assert h.closed


def test_the_actor_closing_a_replaced_mqtt5_session_says_session_taken_over():
    h = Harness()
    h.connect(level=5)
    h.sessions[0].close("replaced by a newer session of the same device")
    [disconnect] = h.written_packets(5)
    assert disconnect.reason_code == codec.REASON_SESSION_TAKEN_OVER
    assert h.closed
    h.protocol.connectionLost(None)
    assert h.link.calls == []  # the actor already detached it


def test_packet_ids_skip_those_still_in_flight_and_the_receive_window_is_respected():
    h = Harness()
    h.connect(level=5, properties={"receive_maximum": 2})
    session = h.sessions[0]
    assert session.send_command(0, "a", None, 1) is Delivery.AWAITING_ACK
    assert session.send_command(1, "b", None, 1) is Delivery.AWAITING_ACK
    assert session.send_command(2, "c", None, 1) is Delivery.NOT_SENT
    first, second = h.written_packets(5)
    assert first.packet_id != second.packet_id
    h.feed(codec.encode_puback(first.packet_id, 5))
    assert session.send_command(2, "c", None, 1) is Delivery.AWAITING_ACK


def test_a_device_that_stops_reading_gets_no_more_commands_until_its_socket_drains():
    h = Harness()
    h.connect()
    session = h.sessions[0]
    assert h.transport.producer is h.protocol  # Twisted pauses us when the write buffer fills
    h.protocol.pauseProducing()
    assert session.send_command(0, "m", None, 1) is Delivery.NOT_SENT
    assert h.written_packets() == []
    h.protocol.resumeProducing()
    assert session.send_command(0, "m", None, 1) is Delivery.AWAITING_ACK


def test_qos2_publishes_never_released_are_bounded_per_connection():
    from nanoiot.transports.mqtt.protocol import MAX_QOS2_PENDING

    h = Harness(max_packet_size=1 << 20)
    h.connect()
    stream = b"".join(codec.encode_publish("t/x", b"", 2, pid, 4) for pid in range(1, MAX_QOS2_PENDING + 2))
    h.feed(stream)
    assert h.closed


def _command_sent(h: Harness, request_id: int) -> int:
    h.sessions[0].send_command(request_id, "m", None, 1)
    [publish] = h.written_packets()
    return publish.packet_id


def test_a_puback_read_with_the_answer_that_follows_it_reaches_the_actor_as_the_answer_alone():
    h = Harness()
    h.connect()
    session = h.sessions[0]
    packet_id = _command_sent(h, 41)
    # One read: the PUBACK, then the answer (an answer implies delivery: one actor message instead of two).
    h.feed(codec.encode_puback(packet_id, 4) + codec.encode_publish("v1/devices/me/rpc/response/41", b"{}", 1, 5, 4))
    assert h.attach.calls(session) == [("answered", 41, b"{}")]
    assert session.in_flight == {}
    assert [type(p).__name__ for p in h.written_packets()] == ["PubAck"]


@pytest.mark.parametrize("then, reports", [
    (b"", [("acked", 41)]),  # alone in its read
    (codec.encode_publish("v1/devices/me/rpc/response/42", b"{}", 1, 5, 4), [("acked", 41), ("answered", 42, b"{}")]),
    (codec.encode_publish("v1/devices/me/rpc/request/7", b"{}", 0, None, 4), [("acked", 41), ("called", 7, b"{}")]),
    (codec.encode_publish("v1/devices/me/rpc/response/41", b"{}", 2, 5, 4), [("acked", 41), ("answered", 41, b"{}")]),
    (codec.encode_unsubscribe(2, ["v1/devices/me/rpc/request/+"], 4), [("acked", 41), ("unsubscribed",)]),
])
def test_a_puback_not_followed_by_its_answer_is_reported_before_whatever_comes_next(then, reports):
    h = Harness()
    h.connect()
    session = h.sessions[0]
    packet_id = _command_sent(h, 41)
    h.feed(codec.encode_puback(packet_id, 4) + then)
    assert h.attach.calls(session) == reports
