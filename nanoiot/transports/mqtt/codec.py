"""A sans-IO MQTT 3.1 / 3.1.1 / 5 codec: framing, decoding and encoding of every control packet.

Written by hand rather than taken from a library (see the protocol notes, section 2.1): the available codecs are
abandoned, slow, reject MQTT 3.1 and 5 (so the server cannot even answer "unsupported protocol version"), or treat
the password as text. ThingsBoard's device SDK speaks MQTT 5, so its subset is decoded in full, properties included.

Nothing here does I/O or reads a clock. The decoding side has one promise: for any input bytes, the only exceptions
it raises are ``MqttError`` subclasses, so the protocol can turn every one into "close the connection" (MQTT-4.8.0-1)
without a catch-all. The encoders trust their caller and raise ``ValueError`` on arguments that cannot be encoded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Union

__all__ = [
    # errors
    "MqttError", "MalformedPacket", "PacketTooLarge", "ProtocolViolation", "UnsupportedProtocolVersion",
    # framing
    "Frame", "FrameReader", "MAX_REMAINING_LENGTH",
    # packets
    "Will", "Connect", "ConnAck", "Publish", "PubAck", "PubRec", "PubRel", "PubComp", "Subscribe", "SubAck",
    "Unsubscribe", "UnsubAck", "PingReq", "PingResp", "Disconnect", "Auth", "Packet",
    # decoding
    "decode", "decode_connect",
    # encoding
    "encode", "encode_connect", "encode_connack", "encode_publish", "encode_puback", "encode_pubrec",
    "encode_pubrel", "encode_pubcomp", "encode_subscribe", "encode_suback", "encode_unsubscribe",
    "encode_unsuback", "encode_pingreq", "encode_pingresp", "encode_disconnect", "encode_auth",
    "encode_properties",
]

# --- constants -------------------------------------------------------------------------------------------------------

#: Control packet types (the high nibble of the first byte). Plain ints: they are compared on every packet.
CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14
AUTH = 15

PACKET_NAMES: dict[int, str] = {
    CONNECT: "CONNECT", CONNACK: "CONNACK", PUBLISH: "PUBLISH", PUBACK: "PUBACK", PUBREC: "PUBREC",
    PUBREL: "PUBREL", PUBCOMP: "PUBCOMP", SUBSCRIBE: "SUBSCRIBE", SUBACK: "SUBACK", UNSUBSCRIBE: "UNSUBSCRIBE",
    UNSUBACK: "UNSUBACK", PINGREQ: "PINGREQ", PINGRESP: "PINGRESP", DISCONNECT: "DISCONNECT", AUTH: "AUTH",
}

#: Protocol levels as carried in CONNECT.
MQTT_3_1 = 3
MQTT_3_1_1 = 4
MQTT_5 = 5

#: The largest remaining length a four-byte variable byte integer can carry (MQTT 1.5.5).
MAX_REMAINING_LENGTH = 268_435_455

#: CONNACK return codes of MQTT 3.1 / 3.1.1 (MQTT 3.2.2.3).
CONNACK_ACCEPTED = 0
CONNACK_UNACCEPTABLE_PROTOCOL_VERSION = 1
CONNACK_IDENTIFIER_REJECTED = 2
CONNACK_SERVER_UNAVAILABLE = 3
CONNACK_BAD_USERNAME_OR_PASSWORD = 4
CONNACK_NOT_AUTHORIZED = 5

#: MQTT 5 reason codes (MQTT 5, 2.4). Several share a value; the name says which packet uses it.
REASON_SUCCESS = 0x00
REASON_NORMAL_DISCONNECTION = 0x00
REASON_GRANTED_QOS_0 = 0x00
REASON_GRANTED_QOS_1 = 0x01
REASON_GRANTED_QOS_2 = 0x02
REASON_DISCONNECT_WITH_WILL_MESSAGE = 0x04
REASON_NO_MATCHING_SUBSCRIBERS = 0x10
REASON_NO_SUBSCRIPTION_EXISTED = 0x11
REASON_CONTINUE_AUTHENTICATION = 0x18
REASON_REAUTHENTICATE = 0x19
REASON_UNSPECIFIED_ERROR = 0x80
REASON_MALFORMED_PACKET = 0x81
REASON_PROTOCOL_ERROR = 0x82
REASON_IMPLEMENTATION_SPECIFIC_ERROR = 0x83
REASON_UNSUPPORTED_PROTOCOL_VERSION = 0x84
REASON_CLIENT_IDENTIFIER_NOT_VALID = 0x85
REASON_BAD_USER_NAME_OR_PASSWORD = 0x86
REASON_NOT_AUTHORIZED = 0x87
REASON_SERVER_UNAVAILABLE = 0x88
REASON_SERVER_BUSY = 0x89
REASON_BANNED = 0x8A
REASON_SERVER_SHUTTING_DOWN = 0x8B
REASON_BAD_AUTHENTICATION_METHOD = 0x8C
REASON_KEEP_ALIVE_TIMEOUT = 0x8D
REASON_SESSION_TAKEN_OVER = 0x8E
REASON_TOPIC_FILTER_INVALID = 0x8F
REASON_TOPIC_NAME_INVALID = 0x90
REASON_PACKET_IDENTIFIER_IN_USE = 0x91
REASON_PACKET_IDENTIFIER_NOT_FOUND = 0x92
REASON_RECEIVE_MAXIMUM_EXCEEDED = 0x93
REASON_TOPIC_ALIAS_INVALID = 0x94
REASON_PACKET_TOO_LARGE = 0x95
REASON_MESSAGE_RATE_TOO_HIGH = 0x96
REASON_QUOTA_EXCEEDED = 0x97
REASON_ADMINISTRATIVE_ACTION = 0x98
REASON_PAYLOAD_FORMAT_INVALID = 0x99
REASON_RETAIN_NOT_SUPPORTED = 0x9A
REASON_QOS_NOT_SUPPORTED = 0x9B
REASON_USE_ANOTHER_SERVER = 0x9C
REASON_SERVER_MOVED = 0x9D
REASON_SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
REASON_CONNECTION_RATE_EXCEEDED = 0x9F
REASON_MAXIMUM_CONNECT_TIME = 0xA0
REASON_SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
REASON_WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2

#: SUBACK failure code of MQTT 3.1.1.
SUBACK_FAILURE = 0x80


# --- errors ----------------------------------------------------------------------------------------------------------


class MqttError(Exception):
    """Base of every error the decoder raises: the connection is unusable and must be closed."""

    #: The MQTT 5 reason code to put in a DISCONNECT (or CONNACK) before closing.
    reason_code: int = REASON_UNSPECIFIED_ERROR


class MalformedPacket(MqttError):
    """The bytes do not form a packet the specification allows."""

    reason_code = REASON_MALFORMED_PACKET


class PacketTooLarge(MqttError):
    """A packet announced a size above our limit; raised before its body is buffered."""

    reason_code = REASON_PACKET_TOO_LARGE


class ProtocolViolation(MqttError):
    """Well-formed bytes that break a rule of the protocol (MQTT 5's "Protocol Error")."""

    reason_code = REASON_PROTOCOL_ERROR


class UnsupportedProtocolVersion(MqttError):
    """CONNECT named a protocol or level we do not speak; answer CONNACK rc=1 (3.1.1) or 0x84 (5), then close."""

    reason_code = REASON_UNSUPPORTED_PROTOCOL_VERSION

    def __init__(self, protocol_name: str, protocol_level: int) -> None:
        self.protocol_name = protocol_name
        self.protocol_level = protocol_level
        super().__init__(f"unsupported protocol {protocol_name!r} level {protocol_level}")


# --- framing ---------------------------------------------------------------------------------------------------------


class Frame(NamedTuple):
    """One complete control packet, split into its fixed header and its body (variable header and payload)."""

    packet_type: int
    flags: int
    body: bytes


def _valid_first_bytes() -> bytes:
    """Which first bytes a packet may start with, so that garbage is refused before any body is buffered."""
    table = bytearray(256)
    for packet_type in range(1, 16):
        for flags in range(16):
            if packet_type == PUBLISH:
                ok = (flags >> 1) & 3 != 3
            elif packet_type in (PUBREL, SUBSCRIBE, UNSUBSCRIBE):
                ok = flags == 0b0010
            else:
                ok = flags == 0
            table[packet_type << 4 | flags] = ok
    return bytes(table)


_VALID_FIRST_BYTE = _valid_first_bytes()


class FrameReader:
    """Cuts a TCP byte stream into frames: TCP splits and merges packets at will.

    Complete frames are returned as soon as their last byte arrives; a partial one stays buffered. The announced
    size is checked against ``max_packet_size`` (the whole packet, fixed header included, as MQTT 5's Maximum
    Packet Size counts it) as soon as the remaining length is known, so an oversized packet costs nothing to refuse.
    After an error the reader keeps raising it: the stream cannot be resynchronised.
    """

    __slots__ = ("max_packet_size", "_buffer", "_needed", "_error")

    def __init__(self, max_packet_size: int) -> None:
        self.max_packet_size = max_packet_size
        #: The start of a packet whose last byte has not arrived yet.
        self._buffer = bytearray()
        #: How many bytes the buffered packet needs in all, once its header is known (0: unknown yet).
        self._needed = 0
        self._error: MqttError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """Append ``data`` and return every frame it completes (frames before an error in one chunk are lost)."""
        if self._error is not None:
            raise self._error
        buf = self._buffer
        if buf:
            buf += data
            if len(buf) < self._needed:
                return []  # a big packet arriving in pieces: no re-parsing, no copying
            data = bytes(buf)
            buf.clear()
        elif type(data) is not bytes:
            data = bytes(data)
        # Slicing ``bytes`` copies each body once and the remainder (a partial packet) is kept once per feed, so
        # many packets in one chunk stay O(n).
        size = len(data)
        frames: list[Frame] = []
        append = frames.append
        valid = _VALID_FIRST_BYTE
        limit = self.max_packet_size
        new_frame = tuple.__new__
        pos = 0
        while pos < size:
            first = data[pos]
            if not valid[first]:
                raise self._fail(MalformedPacket(f"invalid fixed header byte 0x{first:02x}"))
            if pos + 1 >= size:
                self._needed = 0
                break
            byte = data[pos + 1]
            if byte < 0x80:
                remaining = byte
                header = 2
            else:
                remaining = byte & 0x7F
                shift = 7
                index = pos + 2
                while True:
                    if index - pos > 4:
                        raise self._fail(MalformedPacket("remaining length longer than four bytes"))
                    if index >= size:
                        remaining = -1  # the varint itself is incomplete
                        break
                    byte = data[index]
                    remaining |= (byte & 0x7F) << shift
                    shift += 7
                    index += 1
                    if byte < 0x80:
                        break
                if remaining < 0:
                    self._needed = 0
                    break
                header = index - pos
            total = header + remaining
            if total > limit:
                raise self._fail(PacketTooLarge(f"packet of {total} bytes exceeds the limit of {limit}"))
            end = pos + total
            if end > size:
                self._needed = total
                break
            append(new_frame(Frame, (first >> 4, first & 0x0F, data[pos + header:end])))
            pos = end
        if pos < size:
            buf += memoryview(data)[pos:]
        return frames

    def _fail(self, error: MqttError) -> MqttError:
        self._error = error
        return error


# --- packets ---------------------------------------------------------------------------------------------------------

Properties = dict[str, Any]


@dataclass(slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Connect:
    protocol_name: str
    protocol_level: int
    clean_start: bool
    keep_alive: int
    client_id: str
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class ConnAck:
    session_present: bool
    reason_code: int
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class PubAck:
    packet_id: int
    reason_code: int = 0
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class PubRec:
    packet_id: int
    reason_code: int = 0
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class PubRel:
    packet_id: int
    reason_code: int = 0
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class PubComp:
    packet_id: int
    reason_code: int = 0
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Subscribe:
    packet_id: int
    #: (topic filter, options byte): requested QoS is ``options & 3``; MQTT 5 adds no-local (4),
    #: retain-as-published (8) and retain handling (``options >> 4 & 3``).
    subscriptions: list[tuple[str, int]]
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class SubAck:
    packet_id: int
    reason_codes: list[int]
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Unsubscribe:
    packet_id: int
    topic_filters: list[str]
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class UnsubAck:
    packet_id: int
    #: Empty in MQTT 3.1.1, whose UNSUBACK has no payload.
    reason_codes: list[int] = field(default_factory=list)
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class PingReq:
    pass


@dataclass(slots=True)
class PingResp:
    pass


@dataclass(slots=True)
class Disconnect:
    reason_code: int = 0
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Auth:
    reason_code: int = 0
    properties: Properties = field(default_factory=dict)


Packet = Union[
    Connect, ConnAck, Publish, PubAck, PubRec, PubRel, PubComp, Subscribe, SubAck, Unsubscribe, UnsubAck, PingReq,
    PingResp, Disconnect, Auth,
]

# --- MQTT 5 properties -----------------------------------------------------------------------------------------------

_BYTE, _TWO, _FOUR, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
#: A pseudo packet type for the will properties inside CONNECT.
_WILL = 16

_ALL = frozenset((CONNECT, CONNACK, PUBLISH, _WILL, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, SUBACK,
                  UNSUBSCRIBE, UNSUBACK, DISCONNECT, AUTH))
_MESSAGE = frozenset((PUBLISH, _WILL))
_ACKS = frozenset((CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, DISCONNECT, AUTH))

#: id -> (name, data type, packets it may appear in). MQTT 5, table 2.2.2.2.
_PROPERTY_TABLE: dict[int, tuple[str, int, frozenset[int]]] = {
    0x01: ("payload_format_indicator", _BYTE, _MESSAGE),
    0x02: ("message_expiry_interval", _FOUR, _MESSAGE),
    0x03: ("content_type", _UTF8, _MESSAGE),
    0x08: ("response_topic", _UTF8, _MESSAGE),
    0x09: ("correlation_data", _BINARY, _MESSAGE),
    0x0B: ("subscription_identifier", _VARINT, frozenset((PUBLISH, SUBSCRIBE))),
    0x11: ("session_expiry_interval", _FOUR, frozenset((CONNECT, CONNACK, DISCONNECT))),
    0x12: ("assigned_client_identifier", _UTF8, frozenset((CONNACK,))),
    0x13: ("server_keep_alive", _TWO, frozenset((CONNACK,))),
    0x15: ("authentication_method", _UTF8, frozenset((CONNECT, CONNACK, AUTH))),
    0x16: ("authentication_data", _BINARY, frozenset((CONNECT, CONNACK, AUTH))),
    0x17: ("request_problem_information", _BYTE, frozenset((CONNECT,))),
    0x18: ("will_delay_interval", _FOUR, frozenset((_WILL,))),
    0x19: ("request_response_information", _BYTE, frozenset((CONNECT,))),
    0x1A: ("response_information", _UTF8, frozenset((CONNACK,))),
    0x1C: ("server_reference", _UTF8, frozenset((CONNACK, DISCONNECT))),
    0x1F: ("reason_string", _UTF8, _ACKS),
    0x21: ("receive_maximum", _TWO, frozenset((CONNECT, CONNACK))),
    0x22: ("topic_alias_maximum", _TWO, frozenset((CONNECT, CONNACK))),
    0x23: ("topic_alias", _TWO, frozenset((PUBLISH,))),
    0x24: ("maximum_qos", _BYTE, frozenset((CONNACK,))),
    0x25: ("retain_available", _BYTE, frozenset((CONNACK,))),
    0x26: ("user_property", _PAIR, _ALL),
    0x27: ("maximum_packet_size", _FOUR, frozenset((CONNECT, CONNACK))),
    0x28: ("wildcard_subscription_available", _BYTE, frozenset((CONNACK,))),
    0x29: ("subscription_identifier_available", _BYTE, frozenset((CONNACK,))),
    0x2A: ("shared_subscription_available", _BYTE, frozenset((CONNACK,))),
}
_PROPERTY_IDS: dict[str, int] = {name: pid for pid, (name, _, _) in _PROPERTY_TABLE.items()}
#: Properties that may repeat; they decode to a list (user properties as (name, value) pairs).
_REPEATABLE = frozenset((0x0B, 0x26))
#: Properties for which 0 is a protocol error.
_NON_ZERO = frozenset((0x0B, 0x21, 0x23, 0x27))
#: Byte properties whose only legal values are 0 and 1.
_BOOLEAN = frozenset((0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A))

PROPERTY_NAMES: tuple[str, ...] = tuple(name for name, _, _ in _PROPERTY_TABLE.values())


# --- decoding helpers ------------------------------------------------------------------------------------------------
# They index ``body`` freely: a short body raises IndexError, which ``decode`` turns into MalformedPacket. Slices do
# not raise, so every length-prefixed field checks its end explicitly.


def _u16(body: bytes, i: int) -> int:
    return body[i] << 8 | body[i + 1]


def _varint(body: bytes, i: int) -> tuple[int, int]:
    value = 0
    shift = 0
    for index in range(i, i + 4):
        byte = body[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    raise MalformedPacket("variable byte integer longer than four bytes")


def _utf8(body: bytes, i: int) -> tuple[str, int]:
    end = i + 2 + (body[i] << 8 | body[i + 1])
    if end > len(body):
        raise MalformedPacket("string runs past the end of the packet")
    text = body[i + 2:end].decode("utf-8")  # strict: rejects surrogates and overlong forms (MQTT-1.5.4-1)
    if "\x00" in text:
        raise MalformedPacket("string contains U+0000")  # MQTT-1.5.4-2
    return text, end


def _binary(body: bytes, i: int) -> tuple[bytes, int]:
    end = i + 2 + (body[i] << 8 | body[i + 1])
    if end > len(body):
        raise MalformedPacket("binary data runs past the end of the packet")
    return body[i + 2:end], end


def _properties(body: bytes, i: int, packet_type: int) -> tuple[Properties, int]:
    length = body[i]
    if length == 0:
        return {}, i + 1
    if length < 0x80:
        i += 1
    else:
        length, i = _varint(body, i)
    end = i + length
    if end > len(body):
        raise MalformedPacket("property length runs past the end of the packet")
    props: Properties = {}
    while i < end:
        pid = body[i]
        entry = _PROPERTY_TABLE.get(pid)
        if entry is None:
            raise MalformedPacket(f"unknown property id 0x{pid:02x}")
        name, kind, allowed = entry
        if packet_type not in allowed:
            raise MalformedPacket(f"property {name} is not allowed in {_context_name(packet_type)}")
        i += 1
        value: Any
        if kind == _BYTE:
            value = body[i]
            i += 1
        elif kind == _TWO:
            value = body[i] << 8 | body[i + 1]
            i += 2
        elif kind == _FOUR:
            if i + 4 > end:
                raise MalformedPacket(f"property {name} is truncated")
            value = int.from_bytes(body[i:i + 4], "big")
            i += 4
        elif kind == _VARINT:
            value, i = _varint(body, i)
        elif kind == _UTF8:
            value, i = _utf8(body, i)
        elif kind == _BINARY:
            value, i = _binary(body, i)
        else:
            key, i = _utf8(body, i)
            text, i = _utf8(body, i)
            value = (key, text)
        if i > end:
            raise MalformedPacket(f"property {name} runs past the property length")
        if pid in _NON_ZERO and value == 0:
            raise ProtocolViolation(f"property {name} must not be 0")
        if pid in _BOOLEAN and value > 1:
            raise ProtocolViolation(f"property {name} must be 0 or 1")
        if pid in _REPEATABLE:
            props.setdefault(name, []).append(value)
        elif name in props:
            raise ProtocolViolation(f"property {name} appears twice")
        else:
            props[name] = value
    return props, end


def _context_name(packet_type: int) -> str:
    return "will properties" if packet_type == _WILL else PACKET_NAMES.get(packet_type, str(packet_type))


def _packet_id(body: bytes, i: int) -> int:
    pid = body[i] << 8 | body[i + 1]
    if pid == 0:
        raise MalformedPacket("packet identifier 0")  # MQTT-2.3.1-1: must be non-zero
    return pid


def _expect_flags(packet_type: int, flags: int, expected: int) -> None:
    if flags != expected:
        raise MalformedPacket(f"{PACKET_NAMES[packet_type]} with fixed header flags 0b{flags:04b}")


def _expect_end(packet_type: int, body: bytes, i: int) -> None:
    if i != len(body):
        raise MalformedPacket(f"{PACKET_NAMES[packet_type]} has {len(body) - i} unexpected trailing bytes")


# --- decoders --------------------------------------------------------------------------------------------------------

_PROTOCOLS = {(b"MQTT", 4), (b"MQTT", 5), (b"MQIsdp", 3)}


def decode_connect(body: bytes) -> Connect:
    """Decode a CONNECT body: needs no level, since CONNECT is what announces it.

    The fixed header flags must have been checked (``FrameReader`` and ``decode`` do). An unknown protocol raises
    ``UnsupportedProtocolVersion`` before anything else is looked at, so the server can still answer with a CONNACK.
    Whether an empty client id is acceptable is the server's decision (CONNACK rc=2 / 0x85), not a decoding error.
    """
    try:
        return _decode_connect(body)
    except (IndexError, ValueError, struct.error) as exc:  # ValueError covers UnicodeDecodeError
        raise MalformedPacket(f"CONNECT: {exc}") from exc


def _decode_connect(body: bytes) -> Connect:
    name_end = 2 + _u16(body, 0)
    if name_end + 1 > len(body):
        raise MalformedPacket("CONNECT too short for its protocol name and level")
    raw_name = body[2:name_end]
    level = body[name_end]
    if (raw_name, level) not in _PROTOCOLS:
        raise UnsupportedProtocolVersion(raw_name.decode("utf-8", "replace"), level)
    flags = body[name_end + 1]
    keep_alive = _u16(body, name_end + 2)
    i = name_end + 4
    if flags & 0x01:
        raise MalformedPacket("CONNECT reserved flag is set")  # MQTT-3.1.2-3
    will_flag = flags & 0x04
    will_qos = (flags >> 3) & 3
    will_retain = bool(flags & 0x20)
    has_password = flags & 0x40
    has_username = flags & 0x80
    if will_flag:
        if will_qos == 3:
            raise MalformedPacket("will QoS 3")  # MQTT-3.1.2-14
    elif will_qos or will_retain:
        raise MalformedPacket("will QoS or retain set without a will")  # MQTT-3.1.2-11/13/15
    if has_password and not has_username and level < 5:
        raise MalformedPacket("password without user name")  # MQTT-3.1.2-22; MQTT 5 allows it
    properties: Properties = {}
    if level == 5:
        properties, i = _properties(body, i, CONNECT)
    client_id, i = _utf8(body, i)
    will = None
    if will_flag:
        will_props: Properties = {}
        if level == 5:
            will_props, i = _properties(body, i, _WILL)
        will_topic, i = _utf8(body, i)
        if not will_topic or "+" in will_topic or "#" in will_topic:
            raise MalformedPacket(f"invalid will topic {will_topic!r}")
        will_payload, i = _binary(body, i)
        will = Will(will_topic, will_payload, will_qos, will_retain, will_props)
    username = None
    if has_username:
        username, i = _utf8(body, i)
    password = None
    if has_password:
        password, i = _binary(body, i)
    _expect_end(CONNECT, body, i)
    name = "MQTT" if level != 3 else "MQIsdp"
    return Connect(name, level, bool(flags & 0x02), keep_alive, client_id, username, password, will, properties)


def _connect(flags: int, body: bytes, level: int) -> Connect:
    _expect_flags(CONNECT, flags, 0)
    return _decode_connect(body)


def _connack(flags: int, body: bytes, level: int) -> ConnAck:
    _expect_flags(CONNACK, flags, 0)
    ack_flags = body[0]
    if ack_flags & 0xFE:
        raise MalformedPacket("CONNACK reserved acknowledge flags are set")  # MQTT-3.2.2-1
    reason = body[1]
    i = 2
    props: Properties = {}
    if level == 5:
        props, i = _properties(body, i, CONNACK)
    _expect_end(CONNACK, body, i)
    return ConnAck(bool(ack_flags), reason, props)


def _publish(flags: int, body: bytes, level: int) -> Publish:
    # The hot path: written out flat, with bit tests instead of bool() calls.
    end = (body[0] << 8 | body[1]) + 2
    if end > len(body):
        raise MalformedPacket("PUBLISH topic runs past the end of the packet")
    topic = body[2:end].decode()  # strict UTF-8
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise MalformedPacket(f"invalid PUBLISH topic name {topic!r}")  # MQTT-3.3.2-2, MQTT-1.5.4-2
    qos = flags >> 1 & 3
    if qos:
        if qos == 3:
            raise MalformedPacket("PUBLISH with QoS 3")  # MQTT-3.3.1-4
        packet_id = body[end] << 8 | body[end + 1]
        if not packet_id:
            raise MalformedPacket("PUBLISH QoS>0 with packet identifier 0")
        end += 2
    elif flags & 0x08:
        raise MalformedPacket("PUBLISH QoS 0 with DUP set")  # MQTT-3.3.1-2
    else:
        packet_id = None
    if level == 5:
        if body[end]:
            props, end = _properties(body, end, PUBLISH)
        else:
            props = {}
            end += 1
        if not topic and "topic_alias" not in props:
            raise ProtocolViolation("empty PUBLISH topic without a topic alias")
    else:
        if not topic:
            raise MalformedPacket("empty PUBLISH topic name")  # MQTT-4.7.3-1
        props = {}
    return Publish(topic, body[end:], qos, flags & 0x01 == 1, flags & 0x08 == 8, packet_id, props)


def _ack_decoder(packet_type: int, cls: type, expected_flags: int) -> Any:
    """PUBACK, PUBREC, PUBREL and PUBCOMP share one layout; MQTT 5 may cut the reason code and properties."""

    def decode_ack(flags: int, body: bytes, level: int) -> Any:
        if flags != expected_flags:
            _expect_flags(packet_type, flags, expected_flags)
        packet_id = body[0] << 8 | body[1]
        if not packet_id:
            raise MalformedPacket(f"{PACKET_NAMES[packet_type]} with packet identifier 0")
        size = len(body)
        if size == 2:
            return cls(packet_id, 0, {})  # the usual form, in every version
        if level < 5:
            _expect_end(packet_type, body, 2)
        reason = body[2]
        props: Properties = {}
        i = 3
        if size > 3:
            props, i = _properties(body, 3, packet_type)
            _expect_end(packet_type, body, i)
        return cls(packet_id, reason, props)

    return decode_ack


def _subscribe(flags: int, body: bytes, level: int) -> Subscribe:
    _expect_flags(SUBSCRIBE, flags, 0b0010)
    packet_id = _packet_id(body, 0)
    i = 2
    props: Properties = {}
    if level == 5:
        props, i = _properties(body, i, SUBSCRIBE)
        if len(props.get("subscription_identifier", ())) > 1:
            raise ProtocolViolation("SUBSCRIBE with more than one subscription identifier")
    reserved = 0xC0 if level == 5 else 0xFC
    subscriptions: list[tuple[str, int]] = []
    size = len(body)
    while i < size:
        topic_filter, i = _utf8(body, i)
        options = body[i]
        i += 1
        if options & reserved:
            raise MalformedPacket(f"SUBSCRIBE options 0x{options:02x} set reserved bits")  # MQTT-3.8.3-4/5
        if options & 3 == 3:
            raise MalformedPacket("SUBSCRIBE requesting QoS 3")
        if options & 0x30 == 0x30:
            raise ProtocolViolation("SUBSCRIBE retain handling 3")
        subscriptions.append((topic_filter, options))
    if not subscriptions:
        raise ProtocolViolation("SUBSCRIBE without a topic filter")  # MQTT-3.8.3-3
    return Subscribe(packet_id, subscriptions, props)


def _suback(flags: int, body: bytes, level: int) -> SubAck:
    _expect_flags(SUBACK, flags, 0)
    packet_id = _packet_id(body, 0)
    i = 2
    props: Properties = {}
    if level == 5:
        props, i = _properties(body, i, SUBACK)
    codes = list(body[i:])
    if not codes:
        raise MalformedPacket("SUBACK without a return code")
    return SubAck(packet_id, codes, props)


def _unsubscribe(flags: int, body: bytes, level: int) -> Unsubscribe:
    _expect_flags(UNSUBSCRIBE, flags, 0b0010)
    packet_id = _packet_id(body, 0)
    i = 2
    props: Properties = {}
    if level == 5:
        props, i = _properties(body, i, UNSUBSCRIBE)
    filters: list[str] = []
    size = len(body)
    while i < size:
        topic_filter, i = _utf8(body, i)
        filters.append(topic_filter)
    if not filters:
        raise ProtocolViolation("UNSUBSCRIBE without a topic filter")  # MQTT-3.10.3-2
    return Unsubscribe(packet_id, filters, props)


def _unsuback(flags: int, body: bytes, level: int) -> UnsubAck:
    _expect_flags(UNSUBACK, flags, 0)
    packet_id = _packet_id(body, 0)
    if level < 5:
        _expect_end(UNSUBACK, body, 2)
        return UnsubAck(packet_id)
    props, i = _properties(body, 2, UNSUBACK)
    codes = list(body[i:])
    if not codes:
        raise MalformedPacket("UNSUBACK without a reason code")
    return UnsubAck(packet_id, codes, props)


def _pingreq(flags: int, body: bytes, level: int) -> PingReq:
    _expect_flags(PINGREQ, flags, 0)
    _expect_end(PINGREQ, body, 0)
    return PingReq()


def _pingresp(flags: int, body: bytes, level: int) -> PingResp:
    _expect_flags(PINGRESP, flags, 0)
    _expect_end(PINGRESP, body, 0)
    return PingResp()


def _reason_and_properties(packet_type: int, flags: int, body: bytes) -> tuple[int, Properties]:
    """DISCONNECT and AUTH (MQTT 5): the reason code and properties may both be left out."""
    _expect_flags(packet_type, flags, 0)
    if not body:
        return 0, {}
    reason = body[0]
    props: Properties = {}
    if len(body) > 1:
        props, i = _properties(body, 1, packet_type)
        _expect_end(packet_type, body, i)
    return reason, props


def _disconnect(flags: int, body: bytes, level: int) -> Disconnect:
    if level < 5:
        _expect_flags(DISCONNECT, flags, 0)
        _expect_end(DISCONNECT, body, 0)
        return Disconnect()
    reason, props = _reason_and_properties(DISCONNECT, flags, body)
    return Disconnect(reason, props)


def _auth(flags: int, body: bytes, level: int) -> Auth:
    if level < 5:
        raise MalformedPacket("AUTH is reserved before MQTT 5")
    reason, props = _reason_and_properties(AUTH, flags, body)
    return Auth(reason, props)


_DECODERS: dict[int, Any] = {
    CONNECT: _connect,
    CONNACK: _connack,
    PUBLISH: _publish,
    PUBACK: _ack_decoder(PUBACK, PubAck, 0),
    PUBREC: _ack_decoder(PUBREC, PubRec, 0),
    PUBREL: _ack_decoder(PUBREL, PubRel, 0b0010),
    PUBCOMP: _ack_decoder(PUBCOMP, PubComp, 0),
    SUBSCRIBE: _subscribe,
    SUBACK: _suback,
    UNSUBSCRIBE: _unsubscribe,
    UNSUBACK: _unsuback,
    PINGREQ: _pingreq,
    PINGRESP: _pingresp,
    DISCONNECT: _disconnect,
    AUTH: _auth,
}


def decode(frame: Frame, protocol_level: int) -> Packet:
    """Decode any packet of either direction, so the server and a load generator share one codec.

    ``protocol_level`` is the one the CONNECT announced (3, 4 or 5): it decides whether properties are present.
    """
    packet_type, flags, body = frame
    try:
        return _DECODERS[packet_type](flags, body, protocol_level)
    except (LookupError, ValueError, struct.error) as exc:
        # IndexError is a truncated packet, KeyError a reserved type; ValueError covers UnicodeDecodeError.
        if packet_type not in _DECODERS:
            raise MalformedPacket(f"reserved packet type {packet_type!r}") from None
        raise MalformedPacket(f"{PACKET_NAMES[packet_type]}: {exc}") from exc


# --- encoding helpers ------------------------------------------------------------------------------------------------

_pack_u16 = struct.Struct(">H").pack
_pack_u32 = struct.Struct(">I").pack
#: First byte, one-byte remaining length and the topic length of a small PUBLISH, in one call.
_pack_header = struct.Struct(">BBH").pack
_EMPTY_PROPERTIES = b"\x00"


def _encode_varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    if value > MAX_REMAINING_LENGTH:
        raise ValueError(f"{value} does not fit in a variable byte integer")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _encode_utf8(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > 0xFFFF:
        raise ValueError("string longer than 65535 bytes")
    return _pack_u16(len(data)) + data


def _encode_binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("binary data longer than 65535 bytes")
    return _pack_u16(len(data)) + bytes(data)


def _encode_property_value(pid: int, kind: int, value: Any) -> bytes:
    head = bytes((pid,))
    if kind == _BYTE:
        return head + bytes((value,))
    if kind == _TWO:
        return head + _pack_u16(value)
    if kind == _FOUR:
        return head + _pack_u32(value)
    if kind == _VARINT:
        return head + _encode_varint(value)
    if kind == _UTF8:
        return head + _encode_utf8(value)
    if kind == _BINARY:
        return head + _encode_binary(value)
    key, text = value
    return head + _encode_utf8(key) + _encode_utf8(text)


def _encode_props(properties: Properties | None, packet_type: int) -> bytes:
    if not properties:
        return _EMPTY_PROPERTIES
    parts: list[bytes] = []
    for name, value in properties.items():
        pid = _PROPERTY_IDS.get(name)
        if pid is None:
            raise ValueError(f"unknown MQTT 5 property {name!r}")
        _, kind, allowed = _PROPERTY_TABLE[pid]
        if packet_type not in allowed:
            raise ValueError(f"property {name} is not allowed in {_context_name(packet_type)}")
        if pid in _REPEATABLE:
            values = [value] if isinstance(value, (int, tuple)) else value
            parts.extend(_encode_property_value(pid, kind, v) for v in values)
        else:
            parts.append(_encode_property_value(pid, kind, value))
    body = b"".join(parts)
    return _encode_varint(len(body)) + body


def encode_properties(properties: Properties | None, packet_type: int) -> bytes:
    """The property block (length varint and properties) of ``packet_type``, for tests and hand-built packets."""
    return _encode_props(properties, packet_type)


def _packet(first: int, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return bytes((first,)) + _encode_varint(len(body)) + body


def _check_packet_id(packet_id: int | None) -> int:
    if packet_id is None or not 0 < packet_id <= 0xFFFF:
        raise ValueError(f"packet identifier must be 1..65535, not {packet_id!r}")
    return packet_id


# --- encoders --------------------------------------------------------------------------------------------------------


def encode_connect(
    client_id: str,
    protocol_level: int = 4,
    username: str | None = None,
    password: bytes | str | None = None,
    keep_alive: int = 60,
    clean_start: bool = True,
    properties: Properties | None = None,
    will: Will | None = None,
) -> bytes:
    """Client direction: what a device (or the load generator) sends first."""
    if protocol_level not in (3, 4, 5):
        raise ValueError(f"unsupported protocol level {protocol_level}")
    if password is not None and username is None and protocol_level < 5:
        raise ValueError("MQTT 3.1.1 has no password without a user name")
    flags = 0x02 if clean_start else 0
    parts = [_encode_utf8("MQIsdp" if protocol_level == 3 else "MQTT"), b""]
    if protocol_level == 5:
        parts.append(_encode_props(properties, CONNECT))
    parts.append(_encode_utf8(client_id))
    if will is not None:
        if will.qos not in (0, 1, 2):
            raise ValueError(f"will QoS {will.qos}")
        flags |= 0x04 | will.qos << 3 | (0x20 if will.retain else 0)
        if protocol_level == 5:
            parts.append(_encode_props(will.properties, _WILL))
        parts.append(_encode_utf8(will.topic))
        parts.append(_encode_binary(will.payload))
    if username is not None:
        flags |= 0x80
        parts.append(_encode_utf8(username))
    if password is not None:
        flags |= 0x40
        parts.append(_encode_binary(password.encode("utf-8") if isinstance(password, str) else password))
    parts[1] = bytes((protocol_level, flags)) + _pack_u16(keep_alive)
    return _packet(0x10, *parts)


def encode_connack(
    session_present: bool, reason_code: int, protocol_level: int, properties: Properties | None = None
) -> bytes:
    """Server direction. Below MQTT 5 ``reason_code`` is a 3.1.1 return code (0..5) and properties are dropped."""
    if protocol_level < 5:
        return bytes((0x20, 2, 1 if session_present else 0, reason_code))
    return _packet(0x20, bytes((1 if session_present else 0, reason_code)), _encode_props(properties, CONNACK))


def encode_publish(
    topic: str,
    payload: bytes,
    qos: int,
    packet_id: int | None,
    protocol_level: int,
    retain: bool = False,
    dup: bool = False,
    properties: Properties | None = None,
) -> bytes:
    """Either direction; the hot path of the server (one per command sent), hence written out flat."""
    data = topic.encode()
    size = len(data)
    if size > 0xFFFF:
        raise ValueError("topic longer than 65535 bytes")
    first = 0x30 | qos << 1
    if retain:
        first |= 0x01
    if dup:
        first |= 0x08
    if qos:
        if qos != 1 and qos != 2:
            raise ValueError(f"QoS {qos}")
        if packet_id is None or not 0 < packet_id <= 0xFFFF:
            raise ValueError(f"packet identifier must be 1..65535, not {packet_id!r}")
        pid = _pack_u16(packet_id)
    elif dup:
        raise ValueError("DUP must be 0 for QoS 0")
    else:
        pid = b""
    if protocol_level == 5:
        props = _encode_props(properties, PUBLISH) if properties else _EMPTY_PROPERTIES
    else:
        props = b""
    remaining = 2 + size + len(pid) + len(props) + len(payload)
    if remaining < 0x80:
        return b"".join((_pack_header(first, remaining, size), data, pid, props, payload))
    return b"".join((bytes((first,)), _encode_varint(remaining), _pack_u16(size), data, pid, props, payload))


def _encode_ack(first: int, packet_type: int, packet_id: int, protocol_level: int, reason_code: int,
                properties: Properties | None) -> bytes:
    _check_packet_id(packet_id)
    if protocol_level < 5:
        if reason_code or properties:
            raise ValueError("reason codes and properties need MQTT 5")
        return bytes((first, 2, packet_id >> 8, packet_id & 0xFF))
    if not properties:
        if not reason_code:
            return bytes((first, 2, packet_id >> 8, packet_id & 0xFF))  # MQTT 5 allows leaving out success
        return bytes((first, 3, packet_id >> 8, packet_id & 0xFF, reason_code))
    return _packet(first, _pack_u16(packet_id), bytes((reason_code,)), _encode_props(properties, packet_type))


def encode_puback(packet_id: int, protocol_level: int, reason_code: int = 0,
                  properties: Properties | None = None) -> bytes:
    """Acknowledge a QoS 1 PUBLISH; MQTT 5 success without properties is the short 4-byte form."""
    return _encode_ack(0x40, PUBACK, packet_id, protocol_level, reason_code, properties)


def encode_pubrec(packet_id: int, protocol_level: int, reason_code: int = 0,
                  properties: Properties | None = None) -> bytes:
    """First answer to a QoS 2 PUBLISH."""
    return _encode_ack(0x50, PUBREC, packet_id, protocol_level, reason_code, properties)


def encode_pubrel(packet_id: int, protocol_level: int, reason_code: int = 0,
                  properties: Properties | None = None) -> bytes:
    """Answer to PUBREC (its fixed header flags are 0b0010)."""
    return _encode_ack(0x62, PUBREL, packet_id, protocol_level, reason_code, properties)


def encode_pubcomp(packet_id: int, protocol_level: int, reason_code: int = 0,
                   properties: Properties | None = None) -> bytes:
    """Last packet of the QoS 2 exchange."""
    return _encode_ack(0x70, PUBCOMP, packet_id, protocol_level, reason_code, properties)


def encode_subscribe(packet_id: int, subscriptions: list[tuple[str, int]], protocol_level: int,
                     properties: Properties | None = None) -> bytes:
    """Client direction; each subscription is (filter, options byte), the QoS alone being the common case."""
    _check_packet_id(packet_id)
    if not subscriptions:
        raise ValueError("SUBSCRIBE needs at least one topic filter")
    parts = [_pack_u16(packet_id)]
    if protocol_level == 5:
        parts.append(_encode_props(properties, SUBSCRIBE))
    for topic_filter, options in subscriptions:
        parts.append(_encode_utf8(topic_filter))
        parts.append(bytes((options,)))
    return _packet(0x82, *parts)


def encode_suback(packet_id: int, reason_codes: list[int], protocol_level: int,
                  properties: Properties | None = None) -> bytes:
    """One code per requested filter: the granted QoS, or 0x80 (3.1.1) / a reason code >= 0x80 (5)."""
    _check_packet_id(packet_id)
    # A remaining length under 128 (one byte), as every connection's SUBACK has: built flat.
    if protocol_level == 5:
        if not properties and len(reason_codes) < 125:
            return bytes((0x90, 3 + len(reason_codes), packet_id >> 8, packet_id & 0xFF, 0, *reason_codes))
        return _packet(0x90, _pack_u16(packet_id), _encode_props(properties, SUBACK), bytes(reason_codes))
    if len(reason_codes) < 126:
        return bytes((0x90, 2 + len(reason_codes), packet_id >> 8, packet_id & 0xFF, *reason_codes))
    return _packet(0x90, _pack_u16(packet_id), bytes(reason_codes))


def encode_unsubscribe(packet_id: int, topic_filters: list[str], protocol_level: int,
                       properties: Properties | None = None) -> bytes:
    """Client direction."""
    _check_packet_id(packet_id)
    if not topic_filters:
        raise ValueError("UNSUBSCRIBE needs at least one topic filter")
    parts = [_pack_u16(packet_id)]
    if protocol_level == 5:
        parts.append(_encode_props(properties, UNSUBSCRIBE))
    parts.extend(_encode_utf8(topic_filter) for topic_filter in topic_filters)
    return _packet(0xA2, *parts)


def encode_unsuback(packet_id: int, reason_codes: list[int], protocol_level: int,
                    properties: Properties | None = None) -> bytes:
    """MQTT 3.1.1's UNSUBACK carries only the packet id: ``reason_codes`` is ignored below level 5."""
    _check_packet_id(packet_id)
    if protocol_level < 5:
        return bytes((0xB0, 2, packet_id >> 8, packet_id & 0xFF))
    return _packet(0xB0, _pack_u16(packet_id), _encode_props(properties, UNSUBACK), bytes(reason_codes))


def encode_pingreq() -> bytes:
    """Client keep-alive probe."""
    return b"\xc0\x00"


def encode_pingresp() -> bytes:
    """Answer to PINGREQ; the same at every level."""
    return b"\xd0\x00"


def encode_disconnect(protocol_level: int, reason_code: int = 0, properties: Properties | None = None) -> bytes:
    """Below MQTT 5 the server never sends DISCONNECT (it just closes); clients send ``e0 00``."""
    if protocol_level < 5 or (not reason_code and not properties):
        return b"\xe0\x00"
    if not properties:
        return bytes((0xE0, 1, reason_code))
    return _packet(0xE0, bytes((reason_code,)), _encode_props(properties, DISCONNECT))


def encode_auth(reason_code: int = 0, properties: Properties | None = None) -> bytes:
    """MQTT 5 enhanced authentication; the server does not use it, tests and clients may."""
    if not reason_code and not properties:
        return b"\xf0\x00"
    return _packet(0xF0, bytes((reason_code,)), _encode_props(properties, AUTH))


def encode(packet: Packet, protocol_level: int) -> bytes:
    """Encode any packet object: the slow general path, for tests and tools (the server calls the encoders)."""
    level = protocol_level
    if isinstance(packet, Publish):
        return encode_publish(packet.topic, packet.payload, packet.qos, packet.packet_id, level, packet.retain,
                              packet.dup, packet.properties)
    if isinstance(packet, PubAck):
        return encode_puback(packet.packet_id, level, packet.reason_code, packet.properties)
    if isinstance(packet, PubRec):
        return encode_pubrec(packet.packet_id, level, packet.reason_code, packet.properties)
    if isinstance(packet, PubRel):
        return encode_pubrel(packet.packet_id, level, packet.reason_code, packet.properties)
    if isinstance(packet, PubComp):
        return encode_pubcomp(packet.packet_id, level, packet.reason_code, packet.properties)
    if isinstance(packet, Connect):
        return encode_connect(packet.client_id, packet.protocol_level, packet.username, packet.password,
                              packet.keep_alive, packet.clean_start, packet.properties, packet.will)
    if isinstance(packet, ConnAck):
        return encode_connack(packet.session_present, packet.reason_code, level, packet.properties)
    if isinstance(packet, Subscribe):
        return encode_subscribe(packet.packet_id, packet.subscriptions, level, packet.properties)
    if isinstance(packet, SubAck):
        return encode_suback(packet.packet_id, packet.reason_codes, level, packet.properties)
    if isinstance(packet, Unsubscribe):
        return encode_unsubscribe(packet.packet_id, packet.topic_filters, level, packet.properties)
    if isinstance(packet, UnsubAck):
        return encode_unsuback(packet.packet_id, packet.reason_codes, level, packet.properties)
    if isinstance(packet, PingReq):
        return encode_pingreq()
    if isinstance(packet, PingResp):
        return encode_pingresp()
    if isinstance(packet, Disconnect):
        return encode_disconnect(level, packet.reason_code, packet.properties)
    if isinstance(packet, Auth):
        return encode_auth(packet.reason_code, packet.properties)
    raise TypeError(f"not an MQTT packet: {packet!r}")
