"""The MQTT listener: a thin Twisted protocol that frames bytes, decodes packets and calls plain methods.

NanoIoT is not a broker. A device's publishes are answers to commands or calls to the server, never routed to
other clients; subscriptions only tell us which topic family a device wants its commands on.

An authenticated connection's :class:`MqttSession` is attached exclusively (``attach(device, session, True)``: a
reconnect replaces the older connection) and reports through the :class:`~nanoiot.port.link.DeviceLink` it got back:
SUBSCRIBE -> ``subscribed``, UNSUBSCRIBE -> ``unsubscribed``, PUBACK -> ``acked``, an answer -> ``answered``, a call
-> ``called``, the connection lost -> ``closed``.

The inbound path is bounded (:mod:`nanoiot.transports.mqtt.flow`): an answer or a call goes to the actor with a
``done``, its PUBACK is written once the actor has handled it, and past the connection's window the socket is not
read until the actor catches up. Reading also stops while a rate limit throttles the device and while the device
does not read what we write (:mod:`nanoiot.transports.mqtt.limits`). Frames already read when reading stops are held
in order and handled first when it resumes: nothing the device sent is lost.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from nanoiot.errors import ServiceUnavailable
from nanoiot.persistence.records import Device
from nanoiot.port.link import NO_LINK, Attach
from nanoiot.transports.mqtt import codec
from nanoiot.transports.mqtt.deadlines import Deadlines
from nanoiot.transports.mqtt.gateway import GATEWAY_PREFIX, FindOrCreate, GatewayRouter
from nanoiot.transports.mqtt.flow import InboundWindow
from nanoiot.transports.mqtt.limits import CLOSE, MqttLimits
from nanoiot.transports.mqtt.session import MqttSession
from nanoiot.transports.mqtt.topics import allowed_filter, topic_matches, valid_topic_filter

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

#: The topic prefixes a device answers a command on (without their last "/").
_ANSWER_PREFIXES = frozenset(prefix[:-1] for prefix, kind, _ in _INBOUND if kind == "answer")


def _answers(topic: str, request_id: int) -> bool:
    """Whether ``topic`` is the device's answer to command ``request_id`` (then routed as ``answered``)."""
    prefix, _, suffix = topic.rpartition("/")
    return suffix == str(request_id) and prefix in _ANSWER_PREFIXES


#: What a SUBSCRIBE's topic filter gets (:func:`_filter_verdict`).
_GRANTED, _INVALID, _PROTOBUF, _REFUSED = range(4)


def _filter_verdict(topic_filter: str, gateways: bool) -> tuple[int, str | None]:
    """(verdict, the RPC topic family it subscribes to or None) of a topic filter."""
    if not valid_topic_filter(topic_filter):
        return _INVALID, None
    if topic_filter.startswith("v2/r/req/p") or topic_filter == _PROTO_SAMPLE[:-1] + "+":
        return _PROTOBUF, None
    if not allowed_filter(topic_filter, gateways):
        return _REFUSED, None
    for family, sample in _RPC_FAMILIES:
        if topic_matches(topic_filter, sample):
            return _GRANTED, family
    return _GRANTED, None


#: Verdicts remembered for short filters: a fleet subscribes to a handful, and checking one (valid, allowed, which
#: family) cost ~5 µs per connection. Bounded in entries and length: a client's made-up filters cost ≤ 64 KB here.
_remembered_verdict = functools.lru_cache(maxsize=256)(_filter_verdict)
_REMEMBERED_LENGTH = 256


WAIT_CONNECT, AUTHENTICATING, CONNECTED, CLOSED = range(4)

#: Packets held while a CONNECT's token is looked up before the socket stops being read.
MAX_HELD_FRAMES = 16

#: QoS 2 publishes from one device awaiting their PUBREL, at most (the set is per connection and must stay bounded).
MAX_QOS2_PENDING = 100

#: ``qos2_received`` of a connection that has had no QoS 2 publish.
_NONE_RECEIVED: frozenset[int] = frozenset()

#: Why a connected socket is not read (bits of ``MqttDeviceProtocol.stops``): its inbound window is full, a rate
#: limit throttles it, its write buffer is full (the device does not read).
STOP_WINDOW, STOP_THROTTLE, STOP_CONGESTED = 1, 2, 4


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
        #: The slot of its connect timeout or next keep-alive check in the factory's ``deadlines`` (None: none).
        self.deadline_slot: int | None = None
        #: Packets read but not handled yet, in order: those that arrived while the CONNECT's token was looked up (a
        #: client may pipeline SUBSCRIBE), and those read in the same chunk as the one that stopped reading.
        self.held: list[codec.Frame] = []
        #: During the token lookup reading stops only once MAX_HELD_FRAMES are held: pausing every socket during the
        #: lookup cost two epoll_ctl calls per connection for nothing.
        self.reading_paused = False
        #: STOP_* bits: why frames are held and the socket is not read once connected (0: read and handle).
        self.stops = 0
        #: True while held frames are being handled (a report handled at once must not re-enter that loop).
        self.running = False
        #: A command's PUBACK read in this batch of frames and not yet reported: the device's answer usually comes
        #: in the next frame, and an answer implies delivery, so the actor gets one message for both (see
        #: ``_on_puback``). Reported before any other frame, and at the end of the batch.
        self.held_ack: int | None = None
        self.window: InboundWindow | None = None
        self.throttle_call: IDelayedCall | None = None
        self.congestion_call: IDelayedCall | None = None
        #: The source address and the device this connection is counted against (released when it ends).
        self.counted_address: str | None = None
        self.counted_device: Any = None
        #: The window's ``handled`` count at the last keep-alive check that found it full (-1: it was not).
        self.handled_at_check = -1
        #: Packet ids of QoS 2 publishes awaiting their PUBREL (a set once there is one: few devices use QoS 2).
        self.qos2_received: set[int] | frozenset[int] = _NONE_RECEIVED
        #: The sub-devices this connection speaks for, once it acts as a gateway (``v1/gateway/*``).
        self.gateway: GatewayRouter | None = None

    # --- Twisted hooks --------------------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        limits = self.factory.limits
        if limits.max_connections_per_address:
            transport = self.transport
            # A TCP connection's peer host is the accepted address's (getPeer builds an address object for it).
            if isinstance(transport, tcp.Server):
                host = transport.hostname
            else:
                host = str(getattr(transport.getPeer(), "host", ""))
            if not limits.addresses.acquire(host):
                log.debug("mqtt: refused a connection from {host}: too many from that address", host=host)
                self.state = CLOSED
                self.transport.loseConnection()
                return
            self.counted_address = host
        self.reader = codec.FrameReader(self.factory.max_packet_size)
        factory = self.factory
        self.last_activity = now = factory.clock.seconds()
        factory.deadlines.set(self, now + factory.connect_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        self.last_activity = self.factory.clock.seconds()
        try:
            frames = self.reader.feed(data)  # type: ignore[union-attr]
        except codec.PacketTooLarge as exc:
            self._violation(f"packet too large: {exc}", codec.REASON_PACKET_TOO_LARGE)
            return
        except codec.MqttError as exc:
            self._violation(f"malformed packet: {exc}", codec.REASON_MALFORMED_PACKET)
            return
        if not frames:
            return
        if self.held or self.stops or self.state == AUTHENTICATING or self.running:
            self.held.extend(frames)  # behind what is already waiting, in order
            self._update_reading()
            return
        self._run(frames)

    def _run(self, frames: list[codec.Frame]) -> None:
        """Handle frames in order until one must wait (token lookup, full window, throttled): the rest are held."""
        self.running = True
        limits = self.factory.limits
        rated = limits.rated
        try:
            for index, frame in enumerate(frames):
                if self.state == CLOSED:
                    return
                if self.stops or self.state == AUTHENTICATING:
                    self.held[:0] = frames[index:]
                    break
                if rated and frame.packet_type == codec.PUBLISH and self.state == CONNECTED and not self._rate_allows():
                    if self.state != CLOSED:
                        self.held[:0] = frames[index:]
                    break
                self._handle_frame(frame)
        except codec.MqttError as exc:
            self._violation(f"malformed packet: {exc}", codec.REASON_MALFORMED_PACKET)
        finally:
            self.running = False
            if self.held_ack is not None:
                self._release_ack()
        self._update_reading()

    def _run_held(self) -> None:
        """Handle what was held (reading resumed, or the token lookup ended), then read again if nothing stops it."""
        if self.running or self.state == CLOSED:
            return  # the loop under way sees the cleared stop itself
        held, self.held = self.held, []
        if held:
            self._run(held)
        else:
            self._update_reading()

    def _update_reading(self) -> None:
        """Pause or resume reading the socket: paused while anything stops this connection, and during the token
        lookup once too many packets are held."""
        if self.state == CLOSED:
            return
        pause = bool(self.stops) or (self.state == AUTHENTICATING and len(self.held) >= MAX_HELD_FRAMES)
        if pause != self.reading_paused:
            self.reading_paused = pause
            if pause:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.state = CLOSED
        self._cancel_timer()
        self._end_flow()
        limits = self.factory.limits
        if self.counted_address is not None:
            limits.addresses.release(self.counted_address)
            self.counted_address = None
        if self.counted_device is not None:
            limits.device_sessions.release(self.counted_device)
            self.counted_device = None
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
        if self.held_ack is not None and frame.packet_type != codec.PUBLISH:
            self._release_ack()
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
        limits = self.factory.limits
        if limits.max_sessions_per_device:
            if not limits.device_sessions.acquire(device.id):
                log.info("mqtt: refused a connection of device {device_id} from {peer}: too many sessions",
                         device_id=device.id, peer=self._peer())
                code = codec.CONNACK_SERVER_UNAVAILABLE if self.level < 5 else codec.REASON_QUOTA_EXCEEDED
                self.transport.write(codec.encode_connack(False, code, self.level))
                self._close()
                return
            self.counted_device = device.id
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
        # The inbound window is made by the first PUBLISH that needs one (``_inbound``): most devices of an RPC
        # fleet publish only answers, long after connecting, and some never do.
        self.state = CONNECTED
        # We produce commands for this socket: Twisted pauses us when its write buffer fills up.
        self.transport.registerProducer(self, True)
        self.factory.connected[session.session_id] = self
        session.link = self.factory.attach(device, session, True)
        connack_props = None
        if self.level == 5:
            connack_props = {
                "maximum_packet_size": self.factory.max_packet_size,
                # How many QoS 1/2 publishes the device may have unacknowledged: our inbound window.
                "receive_maximum": min(self.factory.receive_maximum, limits.max_inflight_in, 65535),
                "retain_available": 0,
                "shared_subscription_available": 0,
                "topic_alias_maximum": 0,
            }
        self.transport.write(codec.encode_connack(False, 0, self.level, connack_props))
        self._arm_keepalive()
        self._run_held()

    def _authentication_failed(self, failure: Failure) -> None:
        if failure.check(ServiceUnavailable):  # the database is out of reach: CONNACK "server unavailable"
            log.info("mqtt: CONNECT from {peer} refused: {error}", peer=self._peer(), error=failure.getErrorMessage())
        else:
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
        gateways = self.factory.find_or_create_subdevice is not None
        for topic_filter, options in packet.subscriptions:
            qos = options & 3
            if len(topic_filter) <= _REMEMBERED_LENGTH:
                verdict, family = _remembered_verdict(topic_filter, gateways)
            else:
                verdict, family = _filter_verdict(topic_filter, gateways)
            if verdict == _INVALID or qos > 2:
                codes.append(0x80 if self.level < 5 else codec.REASON_TOPIC_FILTER_INVALID)
                continue
            if verdict == _PROTOBUF:
                # Protobuf payloads are not served: refuse rather than send JSON the device cannot parse.
                codes.append(0x80 if self.level < 5 else codec.REASON_IMPLEMENTATION_SPECIFIC_ERROR)
                continue
            if verdict == _REFUSED:
                # Not one of the device's own topics ('#', another device's, ...): ThingsBoard refuses it too.
                log.debug("mqtt: device {device_id} may not subscribe to {topic_filter}",
                          device_id=session.device.id if session else None, topic_filter=topic_filter)
                codes.append(0x80 if self.level < 5 else codec.REASON_NOT_AUTHORIZED)
                continue
            granted = min(qos, 1)
            codes.append(granted)
            if family is not None:
                subscribed_family, rpc_qos = family, granted
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
        qos = packet.qos
        packet_id = packet.packet_id
        connected = self.session is not None
        held = self.held_ack
        if held is not None:
            self.held_ack = None
            if qos == 2 or not connected or not _answers(packet.topic, held):
                self._report_ack(held)
            # else the answer that follows is routed to the actor for certain, and implies the delivery
        if not connected:
            return
        window = self.window or self._inbound()
        if qos == 2:
            # Exactly-once from the device: act only on the first copy of a packet id (PUBREC once handled).
            received = self.qos2_received
            if packet_id in received:
                window.handled_now(2, packet_id)
                return
            if len(received) >= MAX_QOS2_PENDING:
                self._violation("too many QoS 2 messages without PUBREL", codec.REASON_RECEIVE_MAXIMUM_EXCEEDED)
                return
            if received is _NONE_RECEIVED:
                received = self.qos2_received = set()
            received.add(packet_id)  # type: ignore[union-attr]
        if not self._route_publish(packet.topic, packet.payload, qos, packet_id):
            window.handled_now(qos, packet_id)
        elif window.full:
            self.stops |= STOP_WINDOW  # read nothing more until the actor has handled some

    def _route_publish(self, topic: str, payload: bytes, qos: int, packet_id: int) -> bool:
        """Hand an answer or a call to the actor, acknowledged once it is handled: True if it was handed over
        (else the message was handled here and now)."""
        session = self.session
        if session is None:
            return False
        if topic.startswith(GATEWAY_PREFIX):
            return self._route_gateway_publish(session, topic, payload, qos, packet_id)
        for prefix, kind, family in _INBOUND:
            if topic.startswith(prefix):
                suffix = topic[len(prefix):]
                if not suffix.isdigit():
                    log.debug("mqtt: device {device_id} published to {topic}: not a request id",
                              device_id=session.device.id, topic=topic)
                    return False
                request_id = int(suffix)
                done = (self.window or self._inbound()).hand_over(qos, packet_id, len(topic) + len(payload))
                if kind == "answer":
                    session.link.answered(request_id, payload, done)
                else:
                    session.calls[request_id] = family
                    session.link.called(request_id, payload, done)
                return True
        # Telemetry, attributes and other topics are accepted and acknowledged; an RPC server has no use for them.
        return False

    def _route_gateway_publish(self, session: MqttSession, topic: str, payload: bytes, qos: int,
                               packet_id: int) -> bool:
        if self.gateway is None:
            find_or_create = self.factory.find_or_create_subdevice
            if find_or_create is None:
                log.debug("mqtt: device {device_id} published to {topic}: gateways are not enabled",
                          device_id=session.device.id, topic=topic)
                return False
            self.gateway = GatewayRouter(session, find_or_create, self.factory.attach)
        done = (self.window or self._inbound()).hand_over(qos, packet_id, len(topic) + len(payload))
        self.gateway.on_publish(topic, payload, done)
        return True

    # --- the bounded inbound path ---------------------------------------------------------------------------------

    def _inbound(self) -> InboundWindow:
        """The connection's inbound window, made on first use (a connected device's first PUBLISH)."""
        limits = self.factory.limits
        window = self.window = InboundWindow(limits.max_inflight_in, limits.max_queued_bytes, self._acknowledge,
                                             self._drained)
        return window

    def _acknowledge(self, qos: int, packet_id: int) -> None:
        """The window's ``ack``: a handled message's PUBACK (QoS 1) or PUBREC (QoS 2), in receive order."""
        if self.state == CLOSED:
            return
        if qos == 1:
            self.transport.write(codec.encode_puback(packet_id, self.level))
        else:
            self.transport.write(codec.encode_pubrec(packet_id, self.level))

    def _drained(self) -> None:
        """The window's ``drained``: the actor caught up; read again if that was what stopped us."""
        if self.stops & STOP_WINDOW:
            self.stops &= ~STOP_WINDOW
            self._run_held()

    def _rate_allows(self) -> bool:
        """One PUBLISH against the device's and its tenant's rates; False: throttled (reading stops until the
        tokens are back) or closed, as --rate-limit-action says."""
        session = self.session
        if session is None:
            return True
        device = session.device
        limits = self.factory.limits
        wait = limits.take(device.id, device.tenant_id)
        if not wait:
            return True
        if limits.rate_action == CLOSE:
            self._violation(f"device {device.id} over its message rate limit", codec.REASON_MESSAGE_RATE_TOO_HIGH)
            return False
        log.debug("mqtt: device {device_id} throttled for {wait:.3f} s", device_id=device.id, wait=wait)
        self.stops |= STOP_THROTTLE
        self.throttle_call = self.factory.clock.callLater(wait, self._unthrottle)
        return False

    def _unthrottle(self) -> None:
        self.throttle_call = None
        if self.stops & STOP_THROTTLE:
            self.stops &= ~STOP_THROTTLE
            self._run_held()

    def _congestion_timed_out(self) -> None:
        self.congestion_call = None
        if self.state != CLOSED and self.stops & STOP_CONGESTED:
            log.info("mqtt: closing {peer}: it read nothing we wrote for {seconds} s", peer=self._peer(),
                     seconds=self.factory.limits.write_timeout)
            self._close()

    def _end_flow(self) -> None:
        """The connection ends: no timers, nothing held, late ``done`` calls change nothing."""
        self.held = []
        for name in ("throttle_call", "congestion_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        if self.window is not None:
            self.window.close()

    def _on_puback(self, packet: codec.PubAck) -> None:
        session = self.session
        if session is None:
            return
        request_id = session.acked(packet.packet_id)
        if request_id is not None:
            if self.running:
                self.held_ack = request_id  # the answer may come next: one actor message for both
            else:
                session.link.acked(request_id)
        elif self.gateway is not None:
            self.gateway.acked(packet.packet_id)

    def _release_ack(self) -> None:
        held, self.held_ack = self.held_ack, None
        if held is not None:
            self._report_ack(held)

    def _report_ack(self, request_id: int) -> None:
        session = self.session
        if session is not None:
            session.link.acked(request_id)

    def _on_pubrel(self, packet: codec.PubRel) -> None:
        if self.qos2_received:
            self.qos2_received.discard(packet.packet_id)  # type: ignore[union-attr]
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
        if self.state != CONNECTED or self.stops & STOP_CONGESTED:
            return
        # Whatever we read now would only add PUBACKs to a buffer the device does not empty: stop reading too.
        self.stops |= STOP_CONGESTED
        self._update_reading()
        timeout = self.factory.limits.write_timeout
        if timeout and self.congestion_call is None:
            self.congestion_call = self.factory.clock.callLater(timeout, self._congestion_timed_out)

    def resumeProducing(self) -> None:
        if self.session is not None:
            self.session.congested = False
        if self.congestion_call is not None:
            if self.congestion_call.active():
                self.congestion_call.cancel()
            self.congestion_call = None
        if self.stops & STOP_CONGESTED:
            self.stops &= ~STOP_CONGESTED
            self._run_held()

    def stopProducing(self) -> None:
        if self.session is not None:
            self.session.congested = True

    # --- timers and closing ---------------------------------------------------------------------------------------

    def deadline_passed(self) -> None:
        """The factory's ``deadlines``: the connect timeout before CONNACK, the keep-alive check after it."""
        if self.state == CONNECTED:
            self._keepalive_check()
        else:
            self._connect_timed_out()

    def _connect_timed_out(self) -> None:
        if self.state in (WAIT_CONNECT, AUTHENTICATING):
            log.info("mqtt: no CONNECT from {peer} in time", peer=self._peer())
            self._close()

    def _arm_keepalive(self) -> None:
        factory = self.factory
        if self.keep_alive:
            factory.deadlines.set(self, factory.clock.seconds() + self.keep_alive * 1.5)
        else:
            factory.deadlines.cancel(self)

    def _keepalive_check(self) -> None:
        # One deadline per connection, moved on from the last activity: cheaper than resetting it on every packet.
        if self.state != CONNECTED:
            return
        if self.reading_paused:
            # We are not reading the device (throttled, or its window is full): it may well be talking to us. But
            # a window that stayed full through a whole keep-alive period means its actor lost our reports (it
            # failed): a new connection gets a fresh window.
            window = self.window
            if self.stops & STOP_WINDOW and window is not None and window.handled == self.handled_at_check:
                log.warn("mqtt: closing {peer}: none of its messages was handled for {seconds:.0f} s",
                         peer=self._peer(), seconds=self.keep_alive * 1.5)
                self._close()
                return
            self.handled_at_check = window.handled if window is not None else -1
            self.last_activity = self.factory.clock.seconds()
        else:
            self.handled_at_check = -1
        deadline = self.last_activity + self.keep_alive * 1.5
        remaining = deadline - self.factory.clock.seconds()
        if remaining > 0:
            self.factory.deadlines.set(self, deadline)
            return
        log.info("mqtt: keep-alive expired for device {device_id}",
                 device_id=self.session.device.id if self.session else None)
        if self.level == 5:
            self.transport.write(codec.encode_disconnect(5, codec.REASON_KEEP_ALIVE_TIMEOUT))
        self._close()

    def _cancel_timer(self) -> None:
        if self.deadline_slot is not None:
            self.factory.deadlines.cancel(self)

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
        self._end_flow()
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
        limits: MqttLimits | None = None,
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
        #: Inbound window, rate and connection limits (defaults: a window of 100 messages / 1 MiB, no rates).
        self.limits = limits if limits is not None else MqttLimits(clock=clock.seconds)
        #: session id -> protocol of every authenticated connection.
        self.connected: dict[int, MqttDeviceProtocol] = {}
        #: Every connection's connect timeout or next keep-alive check, on one reactor call.
        self.deadlines = Deadlines(clock)

    def doStop(self) -> None:
        for protocol in list(self.connected.values()):
            protocol._close()
        super().doStop()
