"""MQTT gateways: one device connection that speaks for many sub-devices (ThingsBoard's ``v1/gateway/*`` API).

A gateway is an ordinary device connected over MQTT. It announces a sub-device with ``v1/gateway/connect``
``{"device": "Name", "type": "..."}``; the server finds that device by name in the gateway's tenant (creating it on
first sight) and attaches a :class:`GatewaySubSession` to the sub-device's actor (exclusively, with the gateway's
``attach``: a newer gateway session of the same device replaces it) and reports it subscribed to commands at once, as
ThingsBoard does. Commands for the sub-device are published to the gateway on ``v1/gateway/rpc`` as
``{"device": "Name", "data": {"id", "method", "params"}}``; the gateway answers on the same topic with
``{"device": "Name", "id": N, "data": <json>}``. ``v1/gateway/disconnect`` ``{"device": "Name"}`` detaches the
sub-device, and so does the gateway's connection closing.

Unlike ThingsBoard, a sub-device's QoS 1 command counts as delivered on the gateway's PUBACK: the packet ids come
from the gateway connection's own allocator, so both kinds of commands share one id space and one receive window.
Gateway publishes that cannot be understood are logged once and ignored (still acknowledged); they never close the
gateway's connection, which carries every other sub-device too.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from nanoiot.persistence.records import Device
from nanoiot.port.link import NO_LINK, Attach, DeviceLink, Done
from nanoiot.port.session import Delivery, next_session_id

if TYPE_CHECKING:
    from nanoiot.transports.mqtt.session import MqttSession

log = Logger(namespace="nanoiot.mqtt.gateway")

GATEWAY_PREFIX = "v1/gateway/"
CONNECT_TOPIC = "v1/gateway/connect"
DISCONNECT_TOPIC = "v1/gateway/disconnect"
RPC_TOPIC = "v1/gateway/rpc"
DEFAULT_DEVICE_TYPE = "default"

#: (gateway device, sub-device name, sub-device type) -> Deferred firing with the sub-device.
FindOrCreate = Callable[[Device, str, str], Deferred]


class GatewaySubSession:
    """A sub-device's session: it has no socket, it writes through its gateway's connection."""

    __slots__ = ("session_id", "device", "name", "link", "_router")
    transport = "mqtt-gateway"

    def __init__(self, router: GatewayRouter, device: Device, name: str) -> None:
        self.session_id = next_session_id()
        self.device = device
        #: The name the gateway knows the device by (the device's name when it was connected).
        self.name = name
        #: What ``attach`` returned; ``NO_LINK`` before that and once the sub-device is detached.
        self.link: DeviceLink = NO_LINK
        self._router = router

    # --- DeviceSession --------------------------------------------------------------------------------------------

    def send_command(self, request_id: int, method: str, params: Any, qos: int) -> Delivery:
        return self._router.send_command(self, request_id, method, params, qos)

    def send_reply(self, request_id: int, body: bytes) -> None:
        # Sub-devices cannot call the server through their gateway (as in ThingsBoard): nothing ever asks this.
        log.debug("gateway sub-device {name}: no reply path for call {request_id}", name=self.name,
                  request_id=request_id)

    def close(self, reason: str) -> None:
        self._router.sub_session_closed(self, reason)


class GatewayRouter:
    """The gateway side of one MQTT connection: its sub-device sessions by name, and its ``v1/gateway/*`` topics."""

    def __init__(self, session: MqttSession, find_or_create: FindOrCreate, attach: Attach) -> None:
        #: The gateway's own session: its write path, packet ids and receive window are shared by every sub-device.
        self.session = session
        self.find_or_create = find_or_create
        self.attach = attach
        #: name -> the connected sub-device's session.
        self.subs: dict[str, GatewaySubSession] = {}
        #: name -> a marker of the lookup under way for it; a disconnect (or a newer connect) replaces it.
        self.pending: dict[str, object] = {}
        self.closed = False

    @property
    def gateway(self) -> Device:
        return self.session.device

    # --- publishes from the gateway -------------------------------------------------------------------------------

    def on_publish(self, topic: str, payload: bytes, done: Done = None) -> None:
        """One PUBLISH on a ``v1/gateway/`` topic. Never raises: a bad message is logged and dropped.

        ``done`` is called once the message is handled: an answer once its sub-device's actor has it, a connect
        once the sub-device is looked up, anything else at once (the gateway's PUBACK waits for it)."""
        done = done or _nothing
        if topic == CONNECT_TOPIC:
            handler: Callable[[dict[str, Any], str, Callable[[], None]], None] = self._on_connect
        elif topic == DISCONNECT_TOPIC:
            handler = self._on_disconnect
        elif topic == RPC_TOPIC:
            handler = self._on_rpc_answer
        else:
            done()
            return  # telemetry, attributes, claims: accepted and acknowledged, of no use to an RPC server
        message = self._parse(topic, payload)
        if message is None:
            done()
            return
        try:
            handler(message, message["device"], done)
        except Exception:
            done()
            raise

    def _parse(self, topic: str, payload: bytes) -> dict[str, Any] | None:
        try:
            message = json.loads(payload)
        except ValueError:
            self._ignored(topic, "not JSON")
            return None
        if not isinstance(message, dict):
            self._ignored(topic, "not a JSON object")
            return None
        name = message.get("device")
        if not isinstance(name, str) or not name:
            self._ignored(topic, 'no "device" name')
            return None
        return message

    def _ignored(self, topic: str, why: str) -> None:
        log.info("mqtt gateway {device_id}: ignored a publish to {topic}: {why}", device_id=self.gateway.id,
                 topic=topic, why=why)

    def _on_connect(self, message: dict[str, Any], name: str, done: Callable[[], None]) -> None:
        if name in self.subs or name in self.pending:
            done()
            return  # already connected, or being connected: a repeated connect changes nothing
        device_type = message.get("type")
        if not isinstance(device_type, str) or not device_type:
            device_type = DEFAULT_DEVICE_TYPE
        marker = object()
        self.pending[name] = marker
        try:
            d = self.find_or_create(self.gateway, name, device_type)
        except Exception:
            self.pending.pop(name, None)
            log.failure("mqtt gateway {device_id}: looking up sub-device {name} failed", device_id=self.gateway.id,
                        name=name)
            done()
            return
        d.addCallbacks(self._found, self._lookup_failed, callbackArgs=(name, marker), errbackArgs=(name, marker))
        # Lookups of one gateway are bounded by its inbound window: its PUBACK waits for the lookup.
        d.addBoth(_then, done)

    def _found(self, device: Device | None, name: str, marker: object) -> None:
        if self.closed or self.pending.get(name) is not marker:
            return  # the gateway left, or disconnected the sub-device, while it was looked up
        del self.pending[name]
        if device is None:
            log.info("mqtt gateway {device_id}: sub-device {name} could not be found or created",
                     device_id=self.gateway.id, name=name)
            return
        if device.id == self.gateway.id:
            log.info("mqtt gateway {device_id}: a gateway cannot connect itself as a sub-device",
                     device_id=self.gateway.id)
            return
        sub = GatewaySubSession(self, device, name)
        self.subs[name] = sub
        sub.link = self.attach(device, sub, True)
        # ThingsBoard subscribes a gateway's sub-devices to commands at once: the gateway already asked for them.
        sub.link.subscribed()

    def _lookup_failed(self, failure: Failure, name: str, marker: object) -> None:
        if self.pending.get(name) is marker:
            del self.pending[name]
        log.failure("mqtt gateway {device_id}: looking up sub-device {name} failed", failure,
                    device_id=self.gateway.id, name=name)

    def _on_disconnect(self, message: dict[str, Any], name: str, done: Callable[[], None]) -> None:
        done()
        self.pending.pop(name, None)
        sub = self.subs.pop(name, None)
        if sub is not None:
            self._forget_in_flight(sub)
            _detach(sub)

    def _on_rpc_answer(self, message: dict[str, Any], name: str, done: Callable[[], None]) -> None:
        sub = self.subs.get(name)
        if sub is None:
            done()
            self._ignored(RPC_TOPIC, f"sub-device {name!r} is not connected")
            return
        request_id = message.get("id")
        if isinstance(request_id, str) and request_id.isdigit():
            request_id = int(request_id)
        if not isinstance(request_id, int) or isinstance(request_id, bool):
            done()
            self._ignored(RPC_TOPIC, 'no numeric "id"')
            return
        # ThingsBoard re-serialises "data" as the answer; a missing "data" is an empty answer, i.e. JSON null.
        body = json.dumps(message.get("data"), separators=(",", ":")).encode()
        sub.link.answered(request_id, body, done)

    # --- commands to sub-devices ----------------------------------------------------------------------------------

    def send_command(self, sub: GatewaySubSession, request_id: int, method: str, params: Any, qos: int) -> Delivery:
        if self.closed or self.subs.get(sub.name) is not sub:
            return Delivery.NOT_SENT
        payload = json.dumps({"device": sub.name, "data": {"id": request_id, "method": method, "params": params}},
                             separators=(",", ":")).encode()
        session = self.session
        return session.publish_tracked(RPC_TOPIC, payload, qos, session.gateway_in_flight, (sub, request_id))

    def acked(self, packet_id: int) -> bool:
        """A PUBACK the gateway's own session did not claim: report it to the sub-device it was for."""
        gateway_in_flight = self.session.gateway_in_flight
        if packet_id not in gateway_in_flight:
            return False
        entry = gateway_in_flight.pop(packet_id)
        if entry is not None:
            sub, request_id = entry
            sub.link.acked(request_id)
        return True

    # --- endings --------------------------------------------------------------------------------------------------

    def sub_session_closed(self, sub: GatewaySubSession, reason: str) -> None:
        """The sub-device's actor dropped the session (another gateway took the device over, it was deleted)."""
        sub.link = NO_LINK  # the actor already forgot it: report nothing more
        if self.subs.get(sub.name) is sub:
            del self.subs[sub.name]
        self._forget_in_flight(sub)
        log.info("mqtt gateway {device_id}: sub-device {name} closed: {reason}", device_id=self.gateway.id,
                 name=sub.name, reason=reason)

    def close(self) -> None:
        """The gateway's connection ended: every sub-device it carried is offline."""
        if self.closed:
            return
        self.closed = True
        self.pending.clear()
        subs, self.subs = list(self.subs.values()), {}
        for sub in subs:
            _detach(sub)
        self.session.gateway_in_flight.clear()

    def _forget_in_flight(self, sub: GatewaySubSession) -> None:
        # The packet ids stay taken until the gateway acknowledges them, but the PUBACK no longer reports anything.
        gateway_in_flight = self.session.gateway_in_flight
        for packet_id, entry in gateway_in_flight.items():
            if entry is not None and entry[0] is sub:
                gateway_in_flight[packet_id] = None


def _nothing() -> None:
    pass


def _then(result: Any, done: Callable[[], None]) -> Any:
    done()
    return result


def _detach(sub: GatewaySubSession) -> None:
    """The sub-device went offline: tell its actor once, then drop the link."""
    link, sub.link = sub.link, NO_LINK
    link.closed()
