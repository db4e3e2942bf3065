"""The MQTT listener: a thin Twisted protocol that frames bytes, decodes packets and calls plain methods.

NanoIoT is not a broker. A device's publishes are answers to commands or calls to the server, never routed to
other clients; subscriptions only tell us which topic family a device wants its commands on.

An authenticated connection's :class:`MqttSession` is attached exclusively (``attach(device, session, True)``: a
reconnect replaces the older connection) and reports through the :class:`~nanoiot.port.link.DeviceLink` it got back:
SUBSCRIBE -> ``subscribed``, UNSUBSCRIBE -> ``unsubscribed``, PUBACK -> ``acked``, an answer -> ``answered``, a call
-> ``called``, the connection lost -> ``closed``.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from nanoiot.persistence.records import Device
from nanoiot.port.link import NO_LINK, Attach
from nanoiot.transports.mqtt import codec
from nanoiot.transports.mqtt.gateway import GATEWAY_PREFIX, FindOrCreate, GatewayRouter
from nanoiot.transports.mqtt.session import MqttSession
from nanoiot.transports.mqtt.topics import topic_matches, valid_topic_filter

log = Logger(namespace="nanoiot.mqtt")

#: A sample request topic per family: a subscription whose filter matches it asks for commands on that family.
_RPC_FAMILIES = (("v1", "v1/devices/me/rpc/request/0"), ("v2", "v2/r/req/0"), ("v2j", "v2/r/req/j/0"))
_PROTO_SAMPLE = "v2/r/req/p/0"

#: Device publish topic prefixes: (prefix, kind, family).
_INBOUND = (
    ("v1/devices/me/rpc/response/", "answer", "v1"),
    ("v1/devices/me/rpc/request/", "call", "v1"),
    ("v2/r/res/j/", "answer", "v2j"),
    ("v2/r/req/j/", "call", "v2j"),
    ("v2/r/res/", "answer", "v2"),
    ("v2/r/req/", "call", "v2"),
)

WAIT_CONNECT, AUTHENTICATING, CONNECTED, CLOSED = range(4)

#: Packets held while a CONNECT's token is looked up before the socket stops being read.
MAX_HELD_FRAMES = 16

#: QoS 2 publishes from one device awaiting their PUBREL, at most (the set is per connection and must stay bounded).
MAX_QOS2_PENDING = 100


@implementer(IPushProducer)
class MqttDeviceProtocol(Protocol):
    factory: MqttFactory

    def __init__(self) -> None:
        self.state = WAIT_CONNECT
        self.reader: codec.FrameReader | None = None
        self.session: MqttSession | None = None
        self.level = 4
        self.keep_alive = 0
        self.last_activity = 0.0
        self.timer: IDelayedCall | None = None
        #: Packets that arrived while the CONNECT's token was being looked up (a client may pipeline SUBSCRIBE).
        self.held: list[codec.Frame] = []
        #: Reading stops only once MAX_HELD_FRAMES are held: pausing every socket during the lookup cost two
        #: epoll_ctl calls per connection for nothing.
        self.reading_paused = False
        self.qos2_received: set[int] = set()
        #: The sub-devices this connection speaks for, once it acts as a gateway (``v1/gateway/*``).
        self.gateway: GatewayRouter | None = None

    # --- Twisted hooks --------------------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.reader = codec.FrameReader(self.factory.max_packet_size)
        clock = self.factory.clock
        self.last_activity = clock.seconds()
        self.timer = clock.callLater(self.factory.connect_timeout, self._connect_timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        self.last_activity = self.factory.clock.seconds()
        try:
            frames = self.reader.feed(data)  # type: ignore[union-attr]
            for frame in frames:
                if self.state == CLOSED:
                    return
                if self.state == AUTHENTICATING:
                    self.held.append(frame)
                    if len(self.held) == MAX_HELD_FRAMES:
                        # A client that keeps sending before its CONNACK waits until it has one.
                        self.transport.pauseProducing()
                        self.reading_paused = True
                else:
                    self._handle_frame(frame)
        except codec.PacketTooLarge as exc:
            self._violation(f"packet too large: {exc}", codec.REASON_PACKET_TOO_LARGE)
        except codec.MqttError as exc:
            self._violation(f"malformed packet: {exc}", codec.REASON_MALFORMED_PACKET)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.state = CLOSED
        self._cancel_timer()
        if self.gateway is not None:
            self.gateway.close()
        session = self.session
        if session is not None:
            self.session = None
            self.factory.connected.pop(session.session_id, None)
            link, session.link = session.link, NO_LINK
            link.closed()

    # --- packets --------------------------------------------------------------------------------------------------

    def _handle_frame(self, frame: codec.Frame) -> None:
        if self.state == WAIT_CONNECT:
            if frame.packet_type != codec.CONNECT:
                self._violation("first packet must be CONNECT", codec.REASON_PROTOCOL_ERROR)
                return
            self._on_connect(frame)
            return
        if frame.packet_type == codec.CONNECT:
            self._violation("second CONNECT", codec.REASON_PROTOCOL_ERROR)
            return
        packet = codec.decode(frame, self.level)
        handler = _PACKET_HANDLERS.get(type(packet))
        if handler is None:
            self._violation(f"unexpected {type(packet).__name__}", codec.REASON_PROTOCOL_ERROR)
            return
        handler(self, packet)

    def _on_connect(self, frame: codec.Frame) -> None:
        try:
            connect = codec.decode_connect(frame.body)
        except codec.UnsupportedProtocolVersion as exc:
            log.info("mqtt: unsupported protocol version from {peer}: {error}", peer=self._peer(), error=str(exc))
            self.transport.write(codec.encode_connack(False, codec.CONNACK_UNACCEPTABLE_PROTOCOL_VERSION, 4))
            self._close()
            return
        self.level = connect.protocol_level
        self.keep_alive = connect.keep_alive
        token = connect.username
        if not token:
            self._refuse_connect()
            return
        self.state = AUTHENTICATING
        d = self.factory.authenticate(token)
        d.addCallbacks(self._authenticated, self._authentication_failed, callbackArgs=(connect,))

    def _authenticated(self, device: Device | None, connect: codec.Connect) -> None:
        if self.state == CLOSED:
            return
        if device is None:
            self._refuse_connect()
            return
        props = connect.properties or {}
        session = MqttSession(
            device,
            self.level,
            self.transport.write,
            self._close_for_actor,
            receive_maximum=props.get("receive_maximum", 65535),
            max_packet_size=props.get("maximum_packet_size"),
        )
        self.session = session
        self.state = CONNECTED
        # We produce commands for this socket: Twisted pauses us when its write buffer fills up.
        self.transport.registerProducer(self, True)
        self.factory.connected[session.session_id] = self
        session.link = self.factory.attach(device, session, True)
        connack_props = None
        if self.level == 5:
            connack_props = {
                "maximum_packet_size": self.factory.max_packet_size,
                "receive_maximum": self.factory.receive_maximum,
                "retain_available": 0,
                "shared_subscription_available": 0,
                "topic_alias_maximum": 0,
            }
        self.transport.write(codec.encode_connack(False, 0, self.level, connack_props))
        self._arm_keepalive()
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resumeProducing()
        held, self.held = self.held, []
        try:
            for frame in held:
                if self.state != CONNECTED:
                    break
                self._handle_frame(frame)
        except codec.MqttError as exc:
            self._violation(f"malformed packet: {exc}", codec.REASON_MALFORMED_PACKET)

    def _authentication_failed(self, failure: Failure) -> None:
        log.failure("mqtt: token lookup failed for {peer}", failure, peer=self._peer())
        if self.state != CLOSED:
            code = codec.CONNACK_SERVER_UNAVAILABLE if self.level < 5 else codec.REASON_SERVER_UNAVAILABLE
            self.transport.write(codec.encode_connack(False, code, self.level))
            self._close()

    def _refuse_connect(self) -> None:
        log.info("mqtt: unknown access token from {peer}", peer=self._peer())
        code = codec.CONNACK_NOT_AUTHORIZED if self.level < 5 else codec.REASON_NOT_AUTHORIZED
        self.transport.write(codec.encode_connack(False, code, self.level))
        self._close()

    def _on_subscribe(self, packet: codec.Subscribe) -> None:
        session = self.session
        codes: list[int] = []
        subscribed_family: str | None = None
        for topic_filter, options in packet.subscriptions:
            qos = options & 3
            if not valid_topic_filter(topic_filter) or qos > 2:
                codes.append(0x80 if self.level < 5 else codec.REASON_TOPIC_FILTER_INVALID)
                continue
            if topic_filter.startswith("v2/r/req/p") or topic_filter == _PROTO_SAMPLE[:-1] + "+":
                # Protobuf payloads are not served: refuse rather than send JSON the device cannot parse.
                codes.append(0x80 if self.level < 5 else codec.REASON_IMPLEMENTATION_SPECIFIC_ERROR)
                continue
            granted = min(qos, 1)
            codes.append(granted)
            for family, sample in _RPC_FAMILIES:
                if topic_matches(topic_filter, sample):
                    subscribed_family, rpc_qos = family, granted
                    break
        self.transport.write(codec.encode_suback(packet.packet_id, codes, self.level))
        if subscribed_family is not None and session is not None:
            session.rpc_family = subscribed_family
            session.rpc_qos = rpc_qos
            session.link.subscribed()

    def _on_unsubscribe(self, packet: codec.Unsubscribe) -> None:
        session = self.session
        self.transport.write(codec.encode_unsuback(packet.packet_id, [0] * len(packet.topic_filters), self.level))
        if session is None:
            return
        for topic_filter in packet.topic_filters:
            if any(topic_matches(topic_filter, sample) for _, sample in _RPC_FAMILIES):
                session.link.unsubscribed()
                break

    def _on_publish(self, packet: codec.Publish) -> None:
        if packet.qos == 2:
            # Exactly-once from the device: answer PUBREC, and act only on the first copy of a packet id.
            self.transport.write(codec.encode_pubrec(packet.packet_id, self.level))
            if packet.packet_id in self.qos2_received:
                return
            if len(self.qos2_received) >= MAX_QOS2_PENDING:
                self._violation("too many QoS 2 messages without PUBREL", codec.REASON_RECEIVE_MAXIMUM_EXCEEDED)
                return
            self.qos2_received.add(packet.packet_id)
        self._route_publish(packet.topic, packet.payload)
        if packet.qos == 1:
            self.transport.write(codec.encode_puback(packet.packet_id, self.level))

    def _route_publish(self, topic: str, payload: bytes) -> None:
        session = self.session
        if session is None:
            return
        if topic.startswith(GATEWAY_PREFIX):
            self._route_gateway_publish(session, topic, payload)
            return
        for prefix, kind, family in _INBOUND:
            if topic.startswith(prefix):
                suffix = topic[len(prefix):]
                if not suffix.isdigit():
                    log.debug("mqtt: device {device_id} published to {topic}: not a request id",
                              device_id=session.device.id, topic=topic)
                    return
                request_id = int(suffix)
                if kind == "answer":
                    session.link.answered(request_id, payload)
                else:
                    session.calls[request_id] = family
                    session.link.called(request_id, payload)
                return
        # Telemetry, attributes and other topics are accepted and acknowledged; an RPC server has no use for them.

    def _route_gateway_publish(self, session: MqttSession, topic: str, payload: bytes) -> None:
        if self.gateway is None:
            find_or_create = self.factory.find_or_create_subdevice
            if find_or_create is None:
                log.debug("mqtt: device {device_id} published to {topic}: gateways are not enabled",
                          device_id=session.device.id, topic=topic)
                return
            self.gateway = GatewayRouter(session, find_or_create, self.factory.attach)
        self.gateway.on_publish(topic, payload)

    def _on_puback(self, packet: codec.PubAck) -> None:
        session = self.session
        if session is None:
            return
        request_id = session.acked(packet.packet_id)
        if request_id is not None:
            session.link.acked(request_id)
        elif self.gateway is not None:
            self.gateway.acked(packet.packet_id)

    def _on_pubrel(self, packet: codec.PubRel) -> None:
        self.qos2_received.discard(packet.packet_id)
        self.transport.write(codec.encode_pubcomp(packet.packet_id, self.level))

    def _on_pingreq(self, packet: codec.PingReq) -> None:
        self.transport.write(codec.encode_pingresp())

    def _on_disconnect(self, packet: codec.Disconnect) -> None:
        self._close()

    def _ignore(self, packet: Any) -> None:
        """PUBREC/PUBCOMP for QoS 2 commands we never send, AUTH we do not use."""

    # --- IPushProducer: the socket's write buffer tells us when the device stops reading ------------------------

    def pauseProducing(self) -> None:
        if self.session is not None:
            self.session.congested = True

    def resumeProducing(self) -> None:
        if self.session is not None:
            self.session.congested = False

    def stopProducing(self) -> None:
        if self.session is not None:
            self.session.congested = True

    # --- timers and closing ---------------------------------------------------------------------------------------

    def _connect_timed_out(self) -> None:
        self.timer = None
        if self.state in (WAIT_CONNECT, AUTHENTICATING):
            log.info("mqtt: no CONNECT from {peer} in time", peer=self._peer())
            self._close()

    def _arm_keepalive(self) -> None:
        self._cancel_timer()
        if self.keep_alive:
            self.timer = self.factory.clock.callLater(self.keep_alive * 1.5, self._keepalive_check)

    def _keepalive_check(self) -> None:
        # One timer per connection, re-armed from the last activity: cheaper than resetting it on every packet.
        self.timer = None
        if self.state != CONNECTED:
            return
        deadline = self.last_activity + self.keep_alive * 1.5
        remaining = deadline - self.factory.clock.seconds()
        if remaining > 0:
            self.timer = self.factory.clock.callLater(remaining, self._keepalive_check)
            return
        log.info("mqtt: keep-alive expired for device {device_id}",
                 device_id=self.session.device.id if self.session else None)
        if self.level == 5:
            self.transport.write(codec.encode_disconnect(5, codec.REASON_KEEP_ALIVE_TIMEOUT))
        self._close()

    def _cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _violation(self, why: str, reason_code: int) -> None:
        log.info("mqtt: closing {peer}: {why}", peer=self._peer(), why=why)
        if self.level == 5 and self.state == CONNECTED:
            self.transport.write(codec.encode_disconnect(5, reason_code))
        self._close()

    def _close_for_actor(self, reason: str) -> None:
        """The actor closes a session (replaced, device deleted): tell MQTT 5 devices why."""
        if self.state == CLOSED:
            return
        if self.level == 5:
            code = codec.REASON_SESSION_TAKEN_OVER if "replaced" in reason else codec.REASON_ADMINISTRATIVE_ACTION
            self.transport.write(codec.encode_disconnect(5, code))
        # The actor already knows: do not tell it again on connectionLost.
        if self.session is not None:
            self.factory.connected.pop(self.session.session_id, None)
            self.session.link = NO_LINK
        self._close()

    def _close(self) -> None:
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self._cancel_timer()
        if self.gateway is not None:
            self.gateway.close()  # its sub-devices are offline now, not once the socket is finally gone
        self.transport.loseConnection()

    def _peer(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"




_PACKET_HANDLERS: dict[type, Callable[[MqttDeviceProtocol, Any], None]] = {
    codec.Subscribe: MqttDeviceProtocol._on_subscribe,
    codec.Unsubscribe: MqttDeviceProtocol._on_unsubscribe,
    codec.Publish: MqttDeviceProtocol._on_publish,
    codec.PubAck: MqttDeviceProtocol._on_puback,
    codec.PubRel: MqttDeviceProtocol._on_pubrel,
    codec.PubRec: MqttDeviceProtocol._ignore,
    codec.PubComp: MqttDeviceProtocol._ignore,
    codec.PingReq: MqttDeviceProtocol._on_pingreq,
    codec.Disconnect: MqttDeviceProtocol._on_disconnect,
    codec.Auth: MqttDeviceProtocol._ignore,
}


class MqttFactory(Factory):
    protocol = MqttDeviceProtocol

    def __init__(
        self,
        authenticate: Callable[[str], Deferred],
        attach: Attach,
        clock: IReactorTime,
        max_packet_size: int = 256 * 1024,
        connect_timeout: float = 10.0,
        receive_maximum: int = 100,
        find_or_create_subdevice: FindOrCreate | None = None,
    ) -> None:
        self.authenticate = authenticate
        #: (device, session, exclusive) -> the session's link: device sessions attach exclusively.
        self.attach = attach
        self.clock = clock
        self.max_packet_size = max_packet_size
        self.connect_timeout = connect_timeout
        self.receive_maximum = receive_maximum
        #: (gateway device, name, type) -> Deferred[Device]: finds or creates a gateway's sub-device. None: devices
        #: cannot act as gateways, and ``v1/gateway/*`` publishes are acknowledged and ignored.
        self.find_or_create_subdevice = find_or_create_subdevice
        #: session id -> protocol of every authenticated connection.
        self.connected: dict[int, MqttDeviceProtocol] = {}

    def doStop(self) -> None:
        for protocol in list(self.connected.values()):
            protocol._close()
        super().doStop()
