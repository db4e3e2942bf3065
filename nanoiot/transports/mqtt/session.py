"""An MQTT device session: the protocol state a device actor talks to (topic families, packet ids, in-flight
commands), with no socket of its own — it writes through the callable it is given, and reports to its actor through
``link`` (what ``attach`` returned; ``NO_LINK`` before that and once the session ended)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from nanoiot.port.link import NO_LINK, DeviceLink
from nanoiot.port.session import Delivery, next_session_id
from nanoiot.transports.mqtt import codec
from nanoiot.jsontext import compact

if TYPE_CHECKING:
    from nanoiot.transports.mqtt.gateway import GatewaySubSession

#: Server-to-device request topic prefix, device answer prefix, by the family a device subscribed with.
REQUEST_PREFIX = {"v1": "v1/devices/me/rpc/request/", "v2": "v2/r/req/", "v2j": "v2/r/req/j/"}
RESPONSE_PREFIX = {"v1": "v1/devices/me/rpc/response/", "v2": "v2/r/res/", "v2j": "v2/r/res/j/"}


class MqttSession:
    __slots__ = (
        "session_id", "device", "link", "protocol_level", "rpc_family", "rpc_qos", "_write", "_close",
        "_next_packet_id", "in_flight", "receive_maximum", "max_packet_size", "calls", "gateway_in_flight",
        "congested",
    )
    transport = "mqtt"

    def __init__(
        self,
        device: Any,
        protocol_level: int,
        write: Callable[[bytes], None],
        close: Callable[[str], None],
        receive_maximum: int = 65535,
        max_packet_size: int | None = None,
    ) -> None:
        self.session_id = next_session_id()
        self.device = device
        self.link: DeviceLink = NO_LINK
        self.protocol_level = protocol_level
        self.rpc_family = "v1"
        #: The QoS granted to the command subscription: MQTT delivers at the lower of it and the command's.
        self.rpc_qos = 1
        self._write = write
        self._close = close
        self._next_packet_id = 0
        #: packet id -> request id of a QoS 1 command waiting for its PUBACK.
        self.in_flight: dict[int, int] = {}
        self.receive_maximum = receive_maximum
        #: True while the socket's write buffer is full (a device that does not read): commands wait in the
        #: actor's bounded queue instead of piling up in memory here.
        self.congested = False
        self.max_packet_size = max_packet_size
        #: request id of a device-to-server call -> the topic family to answer on.
        self.calls: dict[int, str] = {}
        #: packet id -> (sub-device session, request id) of a QoS 1 command this connection, as a gateway, carries
        #: for one of its sub-devices; None once that sub-device left (the id stays taken until its PUBACK).
        self.gateway_in_flight: dict[int, tuple[GatewaySubSession, int] | None] = {}

    def allocate_packet_id(self) -> int | None:
        """A packet id free on this connection: the device's own commands and its sub-devices' share one space
        and one receive window."""
        in_flight, gateway = self.in_flight, self.gateway_in_flight
        if len(in_flight) + len(gateway) >= min(self.receive_maximum, 65535):
            return None
        while True:
            self._next_packet_id = self._next_packet_id % 65535 + 1
            if self._next_packet_id not in in_flight and self._next_packet_id not in gateway:
                return self._next_packet_id

    # --- DeviceSession --------------------------------------------------------------------------------------------

    def send_command(self, request_id: int, method: str, params: Any, qos: int) -> Delivery:
        payload = compact({"method": method, "params": params})
        topic = REQUEST_PREFIX[self.rpc_family] + str(request_id)
        return self.publish_tracked(topic, payload, min(qos, self.rpc_qos), self.in_flight, request_id)

    def publish_tracked(self, topic: str, payload: bytes, qos: int, in_flight: dict[int, Any], entry: Any) -> Delivery:
        """Write one command PUBLISH; at QoS 1 remember ``entry`` under its packet id in ``in_flight`` (this
        session's own map, or ``gateway_in_flight`` for a sub-device's command) until the PUBACK."""
        if self.congested:
            return Delivery.NOT_SENT  # the ack timer retries once the device reads again
        packet_id = None
        if qos:
            packet_id = self.allocate_packet_id()
            if packet_id is None:
                return Delivery.NOT_SENT  # the device's receive window is full; the ack timer will retry
        data = codec.encode_publish(topic, payload, qos, packet_id, self.protocol_level)
        if self.max_packet_size is not None and len(data) > self.max_packet_size:
            return Delivery.NOT_SENT
        if packet_id is not None:
            in_flight[packet_id] = entry
        self._write(data)
        return Delivery.AWAITING_ACK if qos else Delivery.DELIVERED

    def send_reply(self, request_id: int, body: bytes) -> None:
        family = self.calls.pop(request_id, "v1")
        topic = RESPONSE_PREFIX[family] + str(request_id)
        self._write(codec.encode_publish(topic, body, 0, None, self.protocol_level))

    def close(self, reason: str) -> None:
        self._close(reason)

    # --- helpers for the protocol ---------------------------------------------------------------------------------

    def acked(self, packet_id: int) -> int | None:
        return self.in_flight.pop(packet_id, None)
