"""The sans-IO MQTT codec: golden bytes from real clients, round trips under every TCP chunking, and refusals.

The paho-mqtt vectors were captured once from paho-mqtt 2.2.0 (CallbackAPIVersion.VERSION2) talking to a scripted
loopback server: connect (keepalive 60, user name TOKEN_A, client id "nanoiot-test" for 3.1.1 and "" for 5),
subscribe to ``v1/devices/me/rpc/request/+`` at QoS 1, PUBACK the server's QoS 1 PUBLISH with packet id 7, publish
a 44-byte reply at QoS 1, unsubscribe, disconnect. A second run captured an MQTT 5 CONNECT with will, binary
password and properties, a QoS 2 PUBLISH with properties, and an MQTT 3.1 (MQIsdp) CONNECT. They are pasted as hex
so the test needs no socket.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nanoiot.transports.mqtt import codec
from nanoiot.transports.mqtt.codec import (
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Frame,
    FrameReader,
    MalformedPacket,
    MqttError,
    PacketTooLarge,
    PingReq,
    PingResp,
    ProtocolViolation,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    UnsupportedProtocolVersion,
    Will,
    decode,
    decode_connect,
    encode,
)

LIMIT = 256 * 1024
RPC_FILTER = "v1/devices/me/rpc/request/+"
REPLY_TOPIC = "v1/devices/me/rpc/response/1"
REPLY = b'{"temperature":22.5,"humidity":40,"ok":true}'

# ThingsBoard SDK's MQTT 5 CONNECT body (protocols.md 2.3): name "MQTT", level 5, flags 0x82 (user name, clean
# start), keep-alive 0x000a, property length 0, empty client id, user name "TOKEN_B", no password.
TB_CONNECT_BODY = bytes.fromhex("00044d5154540582000a0000000007544f4b454e5f42")

PAHO_V311 = {
    "connect": "102100044d5154540482003c000c6e616e6f696f742d746573740007544f4b454e5f41",
    "subscribe": "82200001001b76312f646576696365732f6d652f7270632f726571756573742f2b01",
    "publish": "324c001c76312f646576696365732f6d652f7270632f726573706f6e73652f3100027b2274656d7065726174757265223a"
               "32322e352c2268756d6964697479223a34302c226f6b223a747275657d",
    "puback": "40020007",
    "unsubscribe": "a21f0003001b76312f646576696365732f6d652f7270632f726571756573742f2b",
    "disconnect": "e000",
}
PAHO_V5 = {
    "connect": "101600044d5154540582003c0000000007544f4b454e5f41",
    "subscribe": "8221000100001b76312f646576696365732f6d652f7270632f726571756573742f2b01",
    "publish": "324d001c76312f646576696365732f6d652f7270632f726573706f6e73652f310002007b2274656d706572617475726522"
               "3a32322e352c2268756d6964697479223a34302c226f6b223a747275657d",
    "puback": "40020007",
    "unsubscribe": "a220000300001b76312f646576696365732f6d652f7270632f726571756573742f2b",
    "disconnect": "e000",
}
PAHO_V5_CONNECT_FULL = (
    "106900044d51545405ec001e201100000e10170121001422000a2600016100013126000162000132270001000000056465762d3112"
    "03000a746578742f706c61696e1800000005000a6465762f73746174757300076f66666c696e650007544f4b454e5f43000400ff7077"
)
PAHO_V5_PUBLISH_QOS2_PROPS = (
    "35360003742f3100012c0101020000003c0300106170706c69636174696f6e2f6a736f6e080003722f3109000201022600016b0001"
    "766869"
)
PAHO_V31_CONNECT = "101900064d514973647003c2001e00056465762d31000175000170"


def frames_of(data: bytes, limit: int = LIMIT) -> list[Frame]:
    reader = FrameReader(limit)
    frames = reader.feed(data)
    assert reader.buffered == 0
    return frames


def one_frame(hex_or_bytes: str | bytes) -> Frame:
    data = bytes.fromhex(hex_or_bytes) if isinstance(hex_or_bytes, str) else hex_or_bytes
    (frame,) = frames_of(data)
    return frame


def decode_bytes(data: bytes, level: int):
    frame = one_frame(data)
    if frame.packet_type == codec.CONNECT:
        return decode_connect(frame.body)
    return decode(frame, level)


# --- golden vectors --------------------------------------------------------------------------------------------------


def test_thingsboard_sdk_connect_decodes_as_mqtt5_with_the_token_as_user_name_and_an_empty_client_id():
    connect = decode_connect(TB_CONNECT_BODY)
    assert connect == Connect(
        protocol_name="MQTT", protocol_level=5, clean_start=True, keep_alive=10, client_id="",
        username="TOKEN_B", password=None, will=None, properties={},
    )


def test_thingsboard_sdk_connect_is_reencoded_byte_for_byte():
    packet = codec.encode_connect("", protocol_level=5, username="TOKEN_B", keep_alive=10)
    assert packet == b"\x10" + bytes((len(TB_CONNECT_BODY),)) + TB_CONNECT_BODY


@pytest.mark.parametrize(("level", "vectors", "client_id"), [(4, PAHO_V311, "nanoiot-test"), (5, PAHO_V5, "")])
def test_paho_packets_decode_to_the_expected_objects(level, vectors, client_id):
    assert decode_bytes(bytes.fromhex(vectors["connect"]), level) == Connect(
        "MQTT", level, True, 60, client_id, "TOKEN_A", None, None, {})
    assert decode_bytes(bytes.fromhex(vectors["subscribe"]), level) == Subscribe(1, [(RPC_FILTER, 1)], {})
    assert decode_bytes(bytes.fromhex(vectors["publish"]), level) == Publish(
        REPLY_TOPIC, REPLY, qos=1, retain=False, dup=False, packet_id=2, properties={})
    assert decode_bytes(bytes.fromhex(vectors["puback"]), level) == PubAck(7)
    assert decode_bytes(bytes.fromhex(vectors["unsubscribe"]), level) == Unsubscribe(3, [RPC_FILTER], {})
    assert decode_bytes(bytes.fromhex(vectors["disconnect"]), level) == Disconnect()


@pytest.mark.parametrize(("level", "vectors"), [(4, PAHO_V311), (5, PAHO_V5)])
@pytest.mark.parametrize("kind", ["connect", "subscribe", "publish", "puback", "unsubscribe", "disconnect"])
def test_paho_packets_are_reencoded_byte_for_byte(level, vectors, kind):
    data = bytes.fromhex(vectors[kind])
    assert encode(decode_bytes(data, level), level) == data


def test_paho_mqtt5_connect_with_will_binary_password_and_properties_decodes_every_field():
    connect = decode_bytes(bytes.fromhex(PAHO_V5_CONNECT_FULL), 5)
    assert connect == Connect(
        protocol_name="MQTT", protocol_level=5, clean_start=False, keep_alive=30, client_id="dev-1",
        username="TOKEN_C", password=b"\x00\xffpw",
        will=Will("dev/status", b"offline", qos=1, retain=True,
                  properties={"content_type": "text/plain", "will_delay_interval": 5}),
        properties={
            "session_expiry_interval": 3600, "request_problem_information": 1, "receive_maximum": 20,
            "topic_alias_maximum": 10, "user_property": [("a", "1"), ("b", "2")], "maximum_packet_size": 65536,
        },
    )
    assert encode(connect, 5).hex() == PAHO_V5_CONNECT_FULL


def test_paho_mqtt5_qos2_publish_with_properties_decodes_every_property():
    publish = decode_bytes(bytes.fromhex(PAHO_V5_PUBLISH_QOS2_PROPS), 5)
    assert publish == Publish(
        "t/1", b"hi", qos=2, retain=True, dup=False, packet_id=1,
        properties={
            "payload_format_indicator": 1, "message_expiry_interval": 60, "content_type": "application/json",
            "response_topic": "r/1", "correlation_data": b"\x01\x02", "user_property": [("k", "v")],
        },
    )
    assert encode(publish, 5).hex() == PAHO_V5_PUBLISH_QOS2_PROPS


def test_paho_mqtt31_connect_decodes_as_mqisdp_level_3():
    connect = decode_bytes(bytes.fromhex(PAHO_V31_CONNECT), 3)
    assert connect == Connect("MQIsdp", 3, True, 30, "dev-1", "u", b"p", None, {})
    assert encode(connect, 3).hex() == PAHO_V31_CONNECT


@pytest.mark.parametrize(("packet", "expected"), [
    (codec.encode_connack(False, 0, 4), "20020000"),
    (codec.encode_connack(True, 0, 4), "20020100"),
    (codec.encode_connack(False, codec.CONNACK_UNACCEPTABLE_PROTOCOL_VERSION, 4), "20020001"),
    (codec.encode_connack(False, codec.CONNACK_NOT_AUTHORIZED, 3), "20020005"),
    (codec.encode_connack(False, 0, 5), "2003000000"),
    (codec.encode_connack(False, 0, 5, {"maximum_packet_size": 262144, "receive_maximum": 100}),
     "200b0000082700040000210064"),
    (codec.encode_connack(False, codec.REASON_NOT_AUTHORIZED, 5), "2003008700"),
    (codec.encode_puback(7, 4), "40020007"),
    (codec.encode_puback(7, 5), "40020007"),
    (codec.encode_puback(7, 5, codec.REASON_NO_MATCHING_SUBSCRIBERS), "4003000710"),
    (codec.encode_puback(7, 5, 0x80, {"reason_string": "no"}), "4009000780051f00026e6f"),
    (codec.encode_pubrec(0x1234, 4), "50021234"),
    (codec.encode_pubrel(0x1234, 4), "62021234"),
    (codec.encode_pubcomp(0x1234, 5), "70021234"),
    (codec.encode_suback(1, [1, 0x80], 4), "900400010180"),
    (codec.encode_suback(1, [1, codec.REASON_TOPIC_FILTER_INVALID], 5), "9005000100018f"),
    (codec.encode_unsuback(3, [0], 4), "b0020003"),
    (codec.encode_unsuback(3, [0, codec.REASON_NO_SUBSCRIPTION_EXISTED], 5), "b0050003000011"),
    (codec.encode_pingreq(), "c000"),
    (codec.encode_pingresp(), "d000"),
    (codec.encode_disconnect(4), "e000"),
    (codec.encode_disconnect(5), "e000"),
    (codec.encode_disconnect(5, codec.REASON_KEEP_ALIVE_TIMEOUT), "e0018d"),
    (codec.encode_disconnect(4, codec.REASON_SESSION_TAKEN_OVER), "e000"),
    (codec.encode_disconnect(5, codec.REASON_SESSION_TAKEN_OVER, {"reason_string": "x"}), "e0068e041f000178"),
    (codec.encode_publish("a/b", b"hi", 0, None, 4), "30070003612f626869"),
    (codec.encode_publish("a/b", b"hi", 1, 10, 4, retain=True, dup=True), "3b090003612f62000a6869"),
    (codec.encode_publish("a/b", b"hi", 1, 10, 5), "320a0003612f62000a006869"),
    (codec.encode_subscribe(1, [("a/+", 1)], 4), "820800010003612f2b01"),
    (codec.encode_unsubscribe(2, ["a/+"], 5), "a2080002000003612f2b"),
], ids=lambda value: value if isinstance(value, str) else "encoded")
def test_encoders_produce_the_exact_bytes_of_the_specification(packet, expected):
    assert packet.hex() == expected


def test_a_remaining_length_above_127_uses_a_multi_byte_varint():
    packet = codec.encode_publish("t", b"x" * 200, 0, None, 4)
    assert packet[:3] == bytes((0x30, (203 & 0x7F) | 0x80, 1))
    assert decode(one_frame(packet), 4).payload == b"x" * 200


# --- round trips under every chunking --------------------------------------------------------------------------------

ALL_CONNACK_PROPS = {
    "session_expiry_interval": 0xFFFFFFFF, "receive_maximum": 100, "maximum_qos": 1, "retain_available": 0,
    "maximum_packet_size": 262144, "assigned_client_identifier": "auto-1", "topic_alias_maximum": 0,
    "reason_string": "ok", "user_property": [("k", "v"), ("k", "v2")], "wildcard_subscription_available": 1,
    "subscription_identifier_available": 0, "shared_subscription_available": 0, "server_keep_alive": 120,
    "response_information": "resp/", "server_reference": "other:1883", "authentication_method": "SCRAM",
    "authentication_data": b"\x00\x01",
}


def samples(level: int) -> list:
    """One or more packets of every type, as they come back from decoding at ``level``."""
    v5 = level == 5
    name = "MQIsdp" if level == 3 else "MQTT"
    props = (lambda p: p) if v5 else (lambda p: {})
    return [
        Connect(name, level, True, 60, "dev", "token", None, None, {}),
        Connect(name, level, False, 0, "", "token", b"\x00\xff", Will("w/t", b"\x00bye", 2, True, props(
            {"will_delay_interval": 10, "payload_format_indicator": 0, "message_expiry_interval": 5,
             "content_type": "c", "response_topic": "r", "correlation_data": b"c", "user_property": [("a", "b")]})),
            props({"session_expiry_interval": 60, "receive_maximum": 10, "maximum_packet_size": 1024,
                   "topic_alias_maximum": 5, "request_response_information": 1, "request_problem_information": 0,
                   "authentication_method": "m", "authentication_data": b"d", "user_property": [("x", "y")]})),
        ConnAck(False, 0, {}),
        ConnAck(True, 0x87 if v5 else 5, props(ALL_CONNACK_PROPS)),
        Publish("a/b", b"", 0, False, False, None, {}),
        Publish("v1/devices/me/rpc/request/42", b'{"method":"x"}' * 20, 1, True, True, 65535, props(
            {"topic_alias": 3, "subscription_identifier": [1, 268435455], "message_expiry_interval": 9})),
        Publish("ü/€/𝄞", b"\x00" * 3, 2, False, False, 1, {}),
        PubAck(1), PubAck(2, 0x10 if v5 else 0), PubAck(3, 0x80 if v5 else 0, props({"reason_string": "why"})),
        PubRec(4), PubRec(5, 0x91 if v5 else 0),
        PubRel(6), PubRel(7, 0x92 if v5 else 0, props({"user_property": [("u", "p")]})),
        PubComp(8), PubComp(9, 0x92 if v5 else 0),
        Subscribe(10, [("a/+", 0), ("b/#", 1), ("c", 2)], props({"subscription_identifier": [7]})),
        Subscribe(11, [("x", 1 | (0b101100 if v5 else 0))], {}),
        SubAck(10, [0, 1, 2, 0x80], props({"reason_string": "r"})),
        Unsubscribe(12, ["a/+", "b/#"], props({"user_property": [("k", "v")]})),
        UnsubAck(12, [0, 0x11] if v5 else [], props({"reason_string": "r"})),
        PingReq(), PingResp(),
        Disconnect(), Disconnect(0x8E if v5 else 0, props({"reason_string": "taken over",
                                                           "session_expiry_interval": 0})),
    ] + ([Auth(), Auth(0x18, {"authentication_method": "m", "authentication_data": b"\x01"})] if v5 else [])


def decode_stream(frames: list[Frame], level: int) -> list:
    return [decode_connect(f.body) if f.packet_type == codec.CONNECT else decode(f, level) for f in frames]


LEVELS = [3, 4, 5]


@pytest.mark.parametrize("level", LEVELS)
def test_every_packet_round_trips_when_fed_whole(level):
    for packet in samples(level):
        data = encode(packet, level)
        assert decode_stream(frames_of(data), level) == [packet], packet


@pytest.mark.parametrize("level", LEVELS)
def test_every_packet_round_trips_when_fed_one_byte_at_a_time(level):
    reader = FrameReader(LIMIT)
    for packet in samples(level):
        data = encode(packet, level)
        frames: list[Frame] = []
        for index in range(len(data)):
            got = reader.feed(data[index:index + 1])
            assert not got or index == len(data) - 1, "a frame came out before its last byte"
            frames += got
        assert decode_stream(frames, level) == [packet]
        assert reader.buffered == 0


@pytest.mark.parametrize("level", LEVELS)
def test_every_packet_round_trips_when_all_are_coalesced_in_one_chunk(level):
    packets = samples(level)
    data = b"".join(encode(packet, level) for packet in packets)
    assert decode_stream(frames_of(data), level) == packets


@pytest.mark.parametrize("level", LEVELS)
def test_packets_split_at_every_offset_come_out_whole(level):
    packets = samples(level)
    data = b"".join(encode(packet, level) for packet in packets)
    for cut in range(len(data) + 1):
        reader = FrameReader(LIMIT)
        frames = reader.feed(data[:cut]) + reader.feed(data[cut:])
        assert decode_stream(frames, level) == packets


def test_many_small_packets_in_one_chunk_all_come_out():
    data = codec.encode_puback(1, 4) * 50_000
    frames = frames_of(data)
    assert len(frames) == 50_000
    assert frames[0] == Frame(codec.PUBACK, 0, b"\x00\x01")


def test_a_partial_packet_stays_buffered_until_its_last_byte():
    reader = FrameReader(LIMIT)
    data = codec.encode_publish("t", b"payload", 1, 1, 4)
    assert reader.feed(data[:-1]) == []
    assert reader.buffered == len(data) - 1
    assert reader.feed(data[-1:] + data[:3]) == [one_frame(data)]
    assert reader.buffered == 3


def test_a_large_packet_arriving_in_many_pieces_comes_out_once_and_whole():
    payload = bytes(range(256)) * 1000
    data = codec.encode_publish("big", payload, 1, 9, 5)
    reader = FrameReader(LIMIT)
    frames: list[Frame] = []
    for start in range(0, len(data), 1460):
        frames += reader.feed(data[start:start + 1460])
    assert [decode(frame, 5) for frame in frames] == [Publish("big", payload, 1, packet_id=9)]
    assert reader.buffered == 0


def test_the_reader_accepts_bytearray_and_memoryview_chunks_and_returns_bytes_bodies():
    data = codec.encode_publish("t", b"abc", 0, None, 4)
    reader = FrameReader(LIMIT)
    frames = reader.feed(bytearray(data[:3])) + reader.feed(memoryview(data)[3:])
    assert frames == [Frame(codec.PUBLISH, 0, data[2:])]
    assert type(frames[0].body) is bytes


def test_mqtt5_puback_decodes_in_its_short_form_its_reason_only_form_and_its_full_form():
    assert decode(Frame(codec.PUBACK, 0, b"\x00\x07"), 5) == PubAck(7, 0, {})
    assert decode(Frame(codec.PUBACK, 0, b"\x00\x07\x10"), 5) == PubAck(7, 0x10, {})
    assert decode(Frame(codec.PUBACK, 0, b"\x00\x07\x00\x00"), 5) == PubAck(7, 0, {})


def test_mqtt5_disconnect_decodes_with_and_without_a_reason_code():
    assert decode(Frame(codec.DISCONNECT, 0, b""), 5) == Disconnect(0, {})
    assert decode(Frame(codec.DISCONNECT, 0, b"\x8d"), 5) == Disconnect(0x8D, {})


def test_a_password_without_a_user_name_is_accepted_in_mqtt5():
    data = codec.encode_connect("c", protocol_level=5, password=b"secret")
    assert decode_bytes(data, 5).password == b"secret"
    assert decode_bytes(data, 5).username is None


def test_a_v5_publish_with_an_empty_topic_and_a_topic_alias_decodes():
    data = codec.encode_publish("", b"x", 0, None, 5, properties={"topic_alias": 1})
    assert decode_bytes(data, 5) == Publish("", b"x", properties={"topic_alias": 1})


def test_the_requested_qos_is_the_low_two_bits_of_the_subscription_options():
    packet = decode(one_frame(codec.encode_subscribe(1, [("a", 0b00101110 & 0x3F)], 5)), 5)
    (topic_filter, options), = packet.subscriptions
    assert options & 3 == 2


# --- refusals --------------------------------------------------------------------------------------------------------


def test_a_remaining_length_of_268_mb_is_refused_as_soon_as_the_header_arrives():
    reader = FrameReader(LIMIT)
    assert reader.feed(b"\x30\xff") == []
    assert reader.feed(b"\xff") == []
    with pytest.raises(PacketTooLarge):
        reader.feed(b"\x7f")  # remaining length 268,435,455 and not one body byte
    assert reader.buffered <= 5


def test_a_packet_of_exactly_the_limit_is_accepted_and_one_byte_more_is_refused():
    packet = codec.encode_publish("t", b"x" * 1000, 0, None, 4)
    assert len(frames_of(packet, limit=len(packet))) == 1
    with pytest.raises(PacketTooLarge):
        FrameReader(len(packet) - 1).feed(packet[:4])


def test_a_five_byte_remaining_length_is_malformed_before_its_fifth_byte_arrives():
    with pytest.raises(MalformedPacket):
        FrameReader(LIMIT * 4096).feed(b"\x30\x80\x80\x80\x80")


def test_a_reserved_first_byte_is_refused_before_the_length_arrives():
    with pytest.raises(MalformedPacket):
        FrameReader(LIMIT).feed(b"\x00")


def test_a_reader_keeps_failing_after_an_error():
    reader = FrameReader(LIMIT)
    with pytest.raises(PacketTooLarge):
        reader.feed(b"\x30\xff\xff\x7f")
    with pytest.raises(PacketTooLarge):
        reader.feed(codec.encode_pingreq())


@pytest.mark.parametrize("first_byte", [
    0x00,  # packet type 0 is reserved
    0x11,  # CONNECT with flags
    0x80,  # SUBSCRIBE without 0b0010
    0xA0,  # UNSUBSCRIBE without 0b0010
    0x60,  # PUBREL without 0b0010
    0x42,  # PUBACK with flags
    0xC1,  # PINGREQ with flags
    0x36,  # PUBLISH QoS 3
    0x3E,  # PUBLISH QoS 3 with DUP
])
def test_a_fixed_header_with_reserved_flags_is_refused_by_the_reader(first_byte):
    with pytest.raises(MalformedPacket):
        FrameReader(LIMIT).feed(bytes((first_byte, 2, 0, 1)))


@pytest.mark.parametrize(("packet_type", "flags", "body"), [
    (codec.SUBSCRIBE, 0, b"\x00\x01\x00\x01a\x01"),
    (codec.UNSUBSCRIBE, 0, b"\x00\x01\x00\x01a"),
    (codec.PUBREL, 0, b"\x00\x01"),
    (codec.PUBACK, 2, b"\x00\x01"),
    (codec.PUBLISH, 0b0110, b"\x00\x01a\x00\x01"),
    (codec.CONNECT, 1, TB_CONNECT_BODY),
    (0, 0, b""),
])
def test_decode_checks_the_fixed_header_flags_itself(packet_type, flags, body):
    with pytest.raises(MalformedPacket):
        decode(Frame(packet_type, flags, body), 4)


@pytest.mark.parametrize("level", [4, 5])
@pytest.mark.parametrize(("first", "body"), [
    (0x32, b"\x00\x01a\x00\x00"),  # PUBLISH QoS 1 with packet id 0
    (0x34, b"\x00\x01a\x00\x00"),  # PUBLISH QoS 2 with packet id 0
    (0x40, b"\x00\x00"),  # PUBACK with packet id 0
    (0x82, b"\x00\x00\x00\x01a\x01"),  # SUBSCRIBE with packet id 0
])
def test_a_packet_identifier_of_zero_is_malformed(level, first, body):
    if level == 5 and first == 0x82:
        body = body[:2] + b"\x00" + body[2:]
    elif level == 5 and first in (0x32, 0x34):
        body += b"\x00"
    with pytest.raises(MalformedPacket):
        decode(Frame(first >> 4, first & 15, body), level)


def test_a_qos0_publish_with_dup_set_is_malformed():
    with pytest.raises(MalformedPacket):
        decode(Frame(codec.PUBLISH, 0b1000, b"\x00\x01a"), 4)


@pytest.mark.parametrize("topic", [
    b"\xc3\x28",  # invalid continuation byte
    b"\xed\xa0\x80",  # an encoded surrogate
    b"\xc0\xaf",  # overlong '/'
    b"a\x00b",  # U+0000
    b"\xff",
])
def test_a_publish_topic_that_is_not_valid_mqtt_utf8_is_malformed(topic):
    body = len(topic).to_bytes(2, "big") + topic + b"payload"
    with pytest.raises(MalformedPacket):
        decode(Frame(codec.PUBLISH, 0, body), 4)


@pytest.mark.parametrize("topic", ["a/+", "a/#", "+", "#", "a/b+"])
def test_a_wildcard_in_a_publish_topic_is_malformed(topic):
    with pytest.raises(MalformedPacket):
        decode(one_frame(codec._packet(0x30, codec._encode_utf8(topic), b"x")), 4)


def test_an_empty_publish_topic_is_malformed_in_311_and_a_protocol_error_without_alias_in_5():
    with pytest.raises(MalformedPacket):
        decode(Frame(codec.PUBLISH, 0, b"\x00\x00x"), 4)
    with pytest.raises(ProtocolViolation):
        decode(Frame(codec.PUBLISH, 0, b"\x00\x00\x00x"), 5)


@pytest.mark.parametrize(("name", "level"), [
    (b"MQTT", 6), (b"MQTT", 3), (b"MQTT", 0), (b"MQIsdp", 4), (b"MQIsdp", 5), (b"HTTP", 4), (b"", 4),
    (b"\xff\xfe", 4),
])
def test_an_unknown_protocol_name_or_level_raises_unsupported_protocol_version_with_both(name, level):
    body = len(name).to_bytes(2, "big") + name + bytes((level, 0x02, 0, 60, 0, 0))
    with pytest.raises(UnsupportedProtocolVersion) as raised:
        decode_connect(body)
    assert raised.value.protocol_level == level
    assert raised.value.protocol_name == name.decode("utf-8", "replace")
    assert raised.value.reason_code == codec.REASON_UNSUPPORTED_PROTOCOL_VERSION


def connect_body(flags: int, level: int = 4, tail: bytes = b"\x00\x01c") -> bytes:
    return b"\x00\x04MQTT" + bytes((level, flags, 0, 60)) + (b"\x00" if level == 5 else b"") + tail


@pytest.mark.parametrize(("flags", "tail"), [
    (0x03, b"\x00\x01c"),  # reserved bit
    (0x42, b"\x00\x01c\x00\x01p"),  # password without user name in 3.1.1
    (0x1E, b"\x00\x01c\x00\x01t\x00\x00"),  # will QoS 3
    (0x22, b"\x00\x01c"),  # will retain without a will
    (0x0A, b"\x00\x01c"),  # will QoS without a will
    (0x06, b"\x00\x01c\x00\x03t/+\x00\x00"),  # wildcard will topic
    (0x02, b"\x00\x01c\x00"),  # trailing byte
    (0x82, b"\x00\x01c\x00\x05ab"),  # truncated user name
    (0x82, b"\x00\x01c"),  # user name flag without a user name
])
def test_a_malformed_connect_is_refused(flags, tail):
    with pytest.raises(MalformedPacket):
        decode_connect(connect_body(flags, 4, tail))


def test_a_truncated_connect_is_malformed_not_an_index_error():
    for cut in range(len(TB_CONNECT_BODY)):
        with pytest.raises(MalformedPacket):
            decode_connect(TB_CONNECT_BODY[:cut])


def test_an_unknown_property_id_is_malformed():
    with pytest.raises(MalformedPacket, match="unknown property"):
        decode(Frame(codec.PUBLISH, 0, b"\x00\x01a\x02\x05\x00x"), 5)


def test_a_property_not_allowed_in_the_packet_is_malformed():
    # server_keep_alive (0x13) belongs to CONNACK only
    with pytest.raises(MalformedPacket, match="not allowed"):
        decode(Frame(codec.PUBLISH, 0, b"\x00\x01a\x03\x13\x00\x05x"), 5)


def test_a_repeated_single_valued_property_is_a_protocol_error():
    with pytest.raises(ProtocolViolation):
        decode(Frame(codec.PUBLISH, 0, b"\x00\x01a\x06\x23\x00\x01\x23\x00\x02x"), 5)


@pytest.mark.parametrize("props", [b"\x03\x21\x00\x00", b"\x05\x27\x00\x00\x00\x00", b"\x02\x17\x02"])
def test_a_property_value_the_spec_forbids_is_a_protocol_error(props):
    with pytest.raises(ProtocolViolation):
        decode_connect(b"\x00\x04MQTT\x05\x02\x00\x3c" + props + b"\x00\x01c")


@pytest.mark.parametrize("props", [b"\x05\x21\x00\x01", b"\x03\x02\x00\x00", b"\x04\x26\x00\x01a", b"\x80"])
def test_a_property_block_that_overruns_is_malformed(props):
    with pytest.raises(MalformedPacket):
        decode_connect(b"\x00\x04MQTT\x05\x02\x00\x3c" + props)


@pytest.mark.parametrize("level", [4, 5])
def test_a_subscribe_without_any_filter_is_refused(level):
    body = b"\x00\x01" + (b"\x00" if level == 5 else b"")
    with pytest.raises(MqttError):
        decode(Frame(codec.SUBSCRIBE, 2, body), level)


@pytest.mark.parametrize(("level", "options"), [(4, 0x03), (4, 0x04), (4, 0x81), (5, 0x03), (5, 0x40), (5, 0x30)])
def test_subscription_options_with_qos_3_or_reserved_bits_are_refused(level, options):
    body = b"\x00\x01" + (b"\x00" if level == 5 else b"") + b"\x00\x01a" + bytes((options,))
    with pytest.raises(MqttError):
        decode(Frame(codec.SUBSCRIBE, 2, body), level)


def test_an_unsubscribe_without_any_filter_is_refused():
    with pytest.raises(MqttError):
        decode(Frame(codec.UNSUBSCRIBE, 2, b"\x00\x01"), 4)


@pytest.mark.parametrize(("packet_type", "body"), [
    (codec.PUBACK, b"\x00\x01\x00"),
    (codec.PINGREQ, b"\x00"),
    (codec.DISCONNECT, b"\x00"),
    (codec.UNSUBACK, b"\x00\x01\x00"),
    (codec.CONNACK, b"\x00\x00\x00"),
])
def test_trailing_bytes_in_a_fixed_size_311_packet_are_malformed(packet_type, body):
    with pytest.raises(MalformedPacket):
        decode(Frame(packet_type, 0, body), 4)


def test_auth_is_reserved_before_mqtt5():
    with pytest.raises(MalformedPacket):
        decode(Frame(codec.AUTH, 0, b""), 4)


def test_errors_carry_the_mqtt5_reason_code_to_disconnect_with():
    assert MalformedPacket().reason_code == codec.REASON_MALFORMED_PACKET == 0x81
    assert PacketTooLarge().reason_code == codec.REASON_PACKET_TOO_LARGE == 0x95
    assert ProtocolViolation().reason_code == codec.REASON_PROTOCOL_ERROR == 0x82
    assert issubclass(UnsupportedProtocolVersion, MqttError)


def test_the_reason_code_constants_have_the_values_of_the_specification():
    assert [codec.CONNACK_ACCEPTED, codec.CONNACK_UNACCEPTABLE_PROTOCOL_VERSION, codec.CONNACK_IDENTIFIER_REJECTED,
            codec.CONNACK_SERVER_UNAVAILABLE, codec.CONNACK_BAD_USERNAME_OR_PASSWORD,
            codec.CONNACK_NOT_AUTHORIZED] == [0, 1, 2, 3, 4, 5]
    assert (codec.REASON_SUCCESS, codec.REASON_UNSPECIFIED_ERROR, codec.REASON_MALFORMED_PACKET,
            codec.REASON_PROTOCOL_ERROR, codec.REASON_UNSUPPORTED_PROTOCOL_VERSION,
            codec.REASON_BAD_USER_NAME_OR_PASSWORD, codec.REASON_NOT_AUTHORIZED, codec.REASON_KEEP_ALIVE_TIMEOUT,
            codec.REASON_SESSION_TAKEN_OVER, codec.REASON_TOPIC_FILTER_INVALID, codec.REASON_TOPIC_NAME_INVALID,
            codec.REASON_PACKET_TOO_LARGE, codec.REASON_QUOTA_EXCEEDED) == (
        0x00, 0x80, 0x81, 0x82, 0x84, 0x86, 0x87, 0x8D, 0x8E, 0x8F, 0x90, 0x95, 0x97)


def test_the_property_table_names_every_mqtt5_property_once():
    assert len(set(codec.PROPERTY_NAMES)) == len(codec.PROPERTY_NAMES) == 27


@pytest.mark.parametrize(("call", "args"), [
    (codec.encode_publish, ("t", b"", 1, None, 4)),
    (codec.encode_publish, ("t", b"", 1, 0, 4)),
    (codec.encode_publish, ("t", b"", 3, 1, 4)),
    (codec.encode_publish, ("t", b"", 0, None, 4, False, True)),
    (codec.encode_publish, ("t", b"", 0, None, 5, False, False, {"no_such_property": 1})),
    (codec.encode_publish, ("t", b"", 0, None, 5, False, False, {"server_keep_alive": 1})),
    (codec.encode_puback, (0, 4)),
    (codec.encode_puback, (1, 4, 0x80)),
    (codec.encode_subscribe, (1, [], 4)),
    (codec.encode_connect, ("c", 6)),
])
def test_encoders_refuse_arguments_that_cannot_be_encoded(call, args):
    with pytest.raises(ValueError):
        call(*args)


# --- fuzzing ---------------------------------------------------------------------------------------------------------


def feed_and_decode(chunks: list[bytes], level: int, limit: int = 4096) -> None:
    """Drive the reader and decoder like the server does; anything but an MqttError fails the test."""
    reader = FrameReader(limit)
    try:
        for chunk in chunks:
            for frame in reader.feed(chunk):
                if frame.packet_type == codec.CONNECT:
                    decode_connect(frame.body)
                else:
                    decode(frame, level)
    except MqttError:
        pass


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


_levels = st.sampled_from([3, 4, 5])
_cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=8)
_FUZZ = settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)


@_FUZZ
@given(st.binary(max_size=400), _cuts, _levels)
@example(b"\x30\xff\xff\xff\xff\x01", [], 4)
@example(b"\x10\x04\x00\x02MQ", [1, 2, 3], 4)
def test_arbitrary_bytes_in_arbitrary_chunks_raise_nothing_but_mqtt_errors(data, cuts, level):
    feed_and_decode(chunked(data, cuts), level)


_first_bytes = st.sampled_from([b for b in range(256) if codec._VALID_FIRST_BYTE[b]])


@_FUZZ
@given(_first_bytes, st.binary(max_size=120), _levels)
def test_arbitrary_bodies_behind_a_valid_fixed_header_raise_nothing_but_mqtt_errors(first, body, level):
    feed_and_decode([bytes((first, len(body))) + body], level)


@_FUZZ
@given(st.sampled_from([3, 4, 5]), st.binary(max_size=200))
def test_arbitrary_connect_bodies_after_a_valid_protocol_header_raise_nothing_but_mqtt_errors(level, rest):
    name = b"\x00\x06MQIsdp" if level == 3 else b"\x00\x04MQTT"
    try:
        decode_connect(name + bytes((level,)) + rest)
    except MqttError:
        pass


_golden = [bytes.fromhex(h) for h in (*PAHO_V311.values(), *PAHO_V5.values(), PAHO_V5_CONNECT_FULL,
                                       PAHO_V5_PUBLISH_QOS2_PROPS, PAHO_V31_CONNECT)]
_golden += [encode(p, level) for level in LEVELS for p in samples(level)]


@_FUZZ
@given(st.sampled_from(_golden), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1,
                                           max_size=4), st.integers(0, 10_000), _levels, _cuts)
def test_mutated_real_packets_raise_nothing_but_mqtt_errors(packet, edits, cut, level, cuts):
    data = bytearray(packet)
    for position, value in edits:
        data[position % len(data)] = value
    data = bytes(data[:max(1, cut % (len(data) + 1))]) if cut % 3 == 0 else bytes(data)
    feed_and_decode(chunked(data, cuts), level, limit=LIMIT)


_topic_chars = st.characters(exclude_categories=("Cs",), exclude_characters="\x00+#")


@_FUZZ
@given(
    topic=st.text(_topic_chars, min_size=1, max_size=60),
    payload=st.binary(max_size=600),
    qos=st.integers(0, 2),
    packet_id=st.integers(1, 65535),
    retain=st.booleans(),
    dup=st.booleans(),
    level=_levels,
    properties=st.fixed_dictionaries({}, optional={
        "message_expiry_interval": st.integers(0, 2**32 - 1),
        "content_type": st.text(_topic_chars, max_size=10),
        "correlation_data": st.binary(max_size=10),
        "user_property": st.lists(st.tuples(st.text(_topic_chars, max_size=5), st.text(_topic_chars, max_size=5)),
                                  min_size=1, max_size=3),
        "subscription_identifier": st.lists(st.integers(1, 268_435_455), min_size=1, max_size=3),
    }),
    cuts=_cuts,
)
def test_any_publish_round_trips_at_every_level_under_any_chunking(topic, payload, qos, packet_id, retain, dup,
                                                                    level, properties, cuts):
    if level < 5:
        properties = {}
    expected = Publish(topic, payload, qos, retain, dup and qos > 0, packet_id if qos else None, properties)
    data = encode(expected, level)
    reader = FrameReader(LIMIT)
    frames = [frame for chunk in chunked(data, cuts) for frame in reader.feed(chunk)]
    assert [decode(frame, level) for frame in frames] == [expected]


@pytest.mark.parametrize("level", [3, 4, 5])
def test_suback_is_the_generic_encoding_at_every_length_and_packet_id(level):
    # Short SUBACKs (every connection's) are built flat; they must not differ from the generic form.
    for count in (1, 2, 123, 124, 125, 126, 127, 300):
        codes = [(0, 1, 2, 0x80)[i % 4] for i in range(count)]
        for packet_id in (1, 255, 256, 65535):
            props = codec._encode_props(None, codec.SUBACK) if level == 5 else b""
            expected = codec._packet(0x90, codec._pack_u16(packet_id), props, bytes(codes))
            assert codec.encode_suback(packet_id, codes, level) == expected
            frame, = codec.FrameReader(1 << 16).feed(expected)
            assert codec.decode(frame, level).reason_codes == codes
    with pytest.raises(ValueError):
        codec.encode_suback(0, [0], level)
