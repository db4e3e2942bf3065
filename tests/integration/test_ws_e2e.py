"""Live RPC events and commands over WebSocket, end to end on loopback: the real server, Autobahn's WebSocket client,
paho-mqtt as the device, treq for the REST calls.

Checked: the events of a persistent two-way command (QUEUED, SENT, DELIVERED, SUCCESSFUL) and the answer of an
``rpc`` frame; DEVICE_ONLINE and DEVICE_OFFLINE; a customer user refused (403) another customer's device; the token's
expiry closing the socket (4001) and an expired or bad token refused at the upgrade (401 JSON); a client that stops
reading while events flood closed as too slow (4008); bad frames answered 400 on a socket that stays open.

Nothing sleeps: every wait is a Deferred with a timeout, or a bounded loop of reactor turns.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable
from uuid import UUID, uuid4

import paho.mqtt.client as paho
import pytest
import pytest_twisted
import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from nanoiot.commands.events import RpcStatusChanged
from nanoiot.persistence.records import RpcRecord
from nanoiot.rpc.model import RpcStatus
from tests.fixtures.server import PahoDevice, server, with_timeout  # noqa: F401
from tests.fixtures.server_context import server_running

RPC = "v1/devices/me/rpc/request/+"


# --- a WebSocket client -----------------------------------------------------------------------------------------


class WsClientProtocol(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.client._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.client._received(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.client._closed(wasClean, code, reason)


class WsClient:
    """One WebSocket connection through Autobahn's client; frames are kept in order and awaited with ``expect``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.factory = WebSocketClientFactory(url)
        self.factory.protocol = WsClientProtocol
        self.factory.client = self
        self.protocol: WsClientProtocol | None = None
        self.opened: defer.Deferred = defer.Deferred()
        self.closed: defer.Deferred = defer.Deferred()
        self.frames: list[Any] = []  # received and not consumed by expect() yet
        self.received = 0
        self._waiters: list[tuple[Callable[[Any], bool], defer.Deferred]] = []

    def _opened(self, protocol: WsClientProtocol) -> None:
        self.protocol = protocol
        self.opened.callback(self)

    def _received(self, frame: Any) -> None:
        self.received += 1
        for waiter in self._waiters:
            predicate, d = waiter
            if predicate(frame):
                self._waiters.remove(waiter)
                d.callback(frame)
                return
        self.frames.append(frame)

    def _closed(self, clean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(AssertionError(f"WebSocket refused: {code} {reason}"))
        if not self.closed.called:
            self.closed.callback((code, reason))

    def send(self, frame: Any) -> None:
        assert self.protocol is not None
        data = frame if isinstance(frame, bytes) else json.dumps(frame).encode()
        self.protocol.sendMessage(data, isBinary=False)

    async def expect(self, predicate: Callable[[Any], bool], timeout: float = 10.0, what: str = "") -> Any:
        """The first frame (received already or to come) that satisfies ``predicate``."""
        for frame in self.frames:
            if predicate(frame):
                self.frames.remove(frame)
                return frame
        d: defer.Deferred = defer.Deferred()
        self._waiters.append((predicate, d))
        try:
            return await with_timeout(d, timeout)
        except defer.TimeoutError:
            raise AssertionError(f"no frame {what} within {timeout} s; unconsumed: {self.frames[-5:]}") from None

    async def reply(self, correlation: Any, timeout: float = 10.0) -> Any:
        return await self.expect(lambda f: "event" not in f and f.get("id") == correlation, timeout,
                                 f"answering {correlation!r}")

    async def call(self, frame: dict[str, Any], timeout: float = 10.0) -> Any:
        """Sends a frame with an ``id`` and waits for the frame answering it."""
        self.send(frame)
        return await self.reply(frame["id"], timeout)

    async def event(self, name: str, device_id: str, timeout: float = 10.0, rpc_id: str | None = None) -> Any:
        def matches(frame: Any) -> bool:
            return (frame.get("event") == name and frame.get("deviceId") == device_id
                    and (rpc_id is None or frame["rpc"]["id"]["id"] == rpc_id))

        return await self.expect(matches, timeout, f"{name} for {device_id}")

    def close(self) -> None:
        if self.protocol is not None and not self.closed.called:
            self.protocol.sendClose(1000)


async def connect_ws(http_url: str, token: str, timeout: float = 10.0) -> WsClient:
    """An open WebSocket to ``/api/ws/rpc`` of the server at ``http_url``."""
    client = WsClient(http_url.replace("http://", "ws://") + f"/api/ws/rpc?token={token}")
    connectWS(client.factory)
    await with_timeout(client.opened, timeout)
    return client


async def stop_client(client: WsClient) -> None:
    client.close()
    try:
        await with_timeout(client.closed, 10)
    except defer.TimeoutError:
        if client.protocol is not None and client.protocol.transport is not None:
            client.protocol.transport.abortConnection()


async def subscribed(client: WsClient, device_id: str) -> None:
    answer = await client.call({"cmd": "subscribe", "deviceId": device_id, "id": f"sub-{device_id}"})
    assert answer["status"] == 200, answer
    assert answer["body"]["subscribed"] == device_id


async def connected_device(server: Any, token: str) -> PahoDevice:
    device = PahoDevice(server.mqtt_port, token, paho.MQTTv311)
    try:
        code = await device.connect()
        assert int(getattr(code, "value", code)) == 0
        assert await device.subscribe(RPC) == [1]
    except BaseException:
        device.stop()
        raise
    return device


async def upgrade_refused(http_url: str, token: str) -> tuple[int, Any]:
    """A WebSocket upgrade request, as treq sends it: (status, JSON body)."""
    headers = {"Upgrade": ["websocket"], "Connection": ["Upgrade"], "Sec-WebSocket-Version": ["13"],
               "Sec-WebSocket-Key": ["dGhlIHNhbXBsZSBub25jZQ=="]}
    response = await treq.get(f"{http_url}/api/ws/rpc?token={token}", headers=headers)
    return response.code, json.loads(await response.content())


# --- the tests --------------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_events_of_a_persistent_command_and_the_answer_of_an_rpc_frame(server):
    device_id, token = await server.demo_device()
    client = await connect_ws(server.http_url, await server.jwt("tenant"))
    device = None
    try:
        await subscribed(client, device_id)
        device = await connected_device(server, token)
        online = await client.event("DEVICE_ONLINE", device_id)
        assert online["transport"] == "mqtt"

        # A persistent two-way command sent over the socket: its rpcId, then every status change.
        answer = await client.call({"cmd": "rpc", "id": "p1", "deviceId": device_id, "oneway": False,
                                    "method": "getTemperature", "params": {"unit": "C"}, "persistent": True,
                                    "timeout": 30000, "retries": 1, "additionalInfo": {"from": "ws"}})
        assert answer["status"] == 200, answer
        rpc_id = answer["body"]["rpcId"]
        queued = await client.event("RPC_QUEUED", device_id, rpc_id=rpc_id)
        assert queued["persistent"] is True
        assert queued["rpc"]["request"]["body"] == {"method": "getTemperature", "params": '{"unit":"C"}'}
        assert queued["rpc"]["additionalInfo"] == {"from": "ws"}
        assert queued["rpc"]["initiator"]["type"] == "USER"
        topic, payload, _ = await device.next_message()
        assert json.loads(payload) == {"method": "getTemperature", "params": {"unit": "C"}}
        await client.event("RPC_SENT", device_id, rpc_id=rpc_id)
        await client.event("RPC_DELIVERED", device_id, rpc_id=rpc_id)
        await device.publish(topic.replace("request", "response"), {"t": 21.5})
        done = await client.event("RPC_SUCCESSFUL", device_id, rpc_id=rpc_id)
        assert done["rpc"]["response"] == {"t": 21.5}
        status, stored = await server.call("GET", f"/api/rpc/persistent/{rpc_id}")
        assert (status, stored["status"]) == (200, "SUCCESSFUL")

        # A lightweight two-way command: the device's answer comes back with the correlation id, and its status
        # changes are events too.
        client.send({"cmd": "rpc", "id": "t1", "deviceId": device_id, "method": "getValue", "params": 7})
        topic, payload, _ = await device.next_message()
        assert json.loads(payload) == {"method": "getValue", "params": 7}
        await device.publish(topic.replace("request", "response"), [1, 2, 3])
        assert await client.reply("t1") == {"id": "t1", "status": 200, "body": [1, 2, 3]}
        light = await client.event("RPC_SUCCESSFUL", device_id)
        assert light["persistent"] is False and light["rpc"]["request"]["body"]["method"] == "getValue"

        # One-way: no answer (body null).
        answer = await client.call({"cmd": "rpc", "id": 3, "deviceId": device_id, "oneway": True,
                                    "method": "setGpio", "params": {"pin": 7}})
        assert answer == {"id": 3, "status": 200, "body": None}
        await device.next_message()

        device.stop()
        device = None
        await client.event("DEVICE_OFFLINE", device_id)

        # An offline device: the command fails as REST says it does (504, which failure it was).
        answer = await client.call({"cmd": "rpc", "id": "off", "deviceId": device_id, "method": "m",
                                    "timeout": 200})
        assert (answer["status"], answer["error"]["rpcError"]) == (504, "DEVICE_OFFLINE")
    finally:
        if device is not None:
            device.stop()
        await stop_client(client)


@pytest_twisted.ensureDeferred
async def test_a_customer_user_sees_and_commands_only_its_customers_devices(server):
    tenant_device_id, tenant_token = await server.demo_device()
    customer_device_id, customer_token = await server.demo_device("Customer Device")
    client = await connect_ws(server.http_url, await server.jwt("customer"))
    devices = []
    try:
        for frame in ({"cmd": "subscribe", "deviceId": tenant_device_id, "id": "s1"},
                      {"cmd": "rpc", "id": "r1", "deviceId": tenant_device_id, "method": "m"}):
            answer = await client.call(frame)
            assert (answer["status"], answer["error"]["errorCode"]) == (403, 20), answer
        assert (await client.call({"cmd": "subscribe", "deviceId": str(uuid4()), "id": "s2"}))["status"] == 404
        await subscribed(client, "*")
        await subscribed(client, customer_device_id)  # both: still one frame per event

        devices.append(await connected_device(server, tenant_token))
        devices.append(await connected_device(server, customer_token))
        online = await client.event("DEVICE_ONLINE", customer_device_id)
        assert online["deviceId"] == customer_device_id
        # Events are delivered in the order they happen: the tenant's device came online first and was not sent.
        assert client.received == 6 and client.frames == [], client.frames

        call = client.call({"cmd": "rpc", "id": "mine", "deviceId": customer_device_id, "method": "getState"})
        call = defer.ensureDeferred(call)
        topic, _, _ = await devices[1].next_message()
        await devices[1].publish(topic.replace("request", "response"), {"ok": True})
        assert await with_timeout(call) == {"id": "mine", "status": 200, "body": {"ok": True}}
        assert devices[0].messages.pending == []
    finally:
        for device in devices:
            device.stop()
        await stop_client(client)


@pytest_twisted.ensureDeferred
async def test_bad_frames_are_answered_400_and_the_socket_stays_open(server):
    device_id, _ = await server.demo_device()
    client = await connect_ws(server.http_url, await server.jwt("tenant"))
    try:
        cases = [
            (b"not json", None),
            (b"[1, 2, 3]", None),
            (b'{"id": "a", "cmd": "teleport"}', "a"),
            (b'{"id": "b", "cmd": "subscribe", "deviceId": "not-a-uuid"}', "b"),
            (b'{"id": "c", "cmd": "rpc", "deviceId": "%s"}' % device_id.encode(), "c"),
        ]
        for raw, correlation in cases:
            client.send(raw)
            answer = await client.reply(correlation)
            assert (answer["status"], answer["error"]["status"]) == (400, 400), (raw, answer)
            assert answer["error"]["errorCode"] in (30, 31) and answer["error"]["message"]
        await subscribed(client, device_id)
        assert not client.closed.called
    finally:
        await stop_client(client)


@pytest_twisted.ensureDeferred
async def test_the_socket_closes_with_4001_when_the_token_expires_and_an_expired_token_cannot_connect(tmp_path):
    async with server_running(tmp_path, jwt_expiration=2) as running:
        token = await running.login("tenant@nanoiot.io", "tenant")
        expires = json.loads(_claims(token))["exp"]
        client = await connect_ws(running.http_url, token)
        try:
            await subscribed(client, "*")
            code, reason = await with_timeout(client.closed, 10)
            assert (code, reason) == (4001, "token expired")
            assert time.time() >= expires - 1  # closed at the expiry, not before
        finally:
            await stop_client(client)
        status, body = await upgrade_refused(running.http_url, token)
        assert (status, body["status"], body["errorCode"]) == (401, 401, 11)
        status, body = await upgrade_refused(running.http_url, "garbage")
        assert (status, body["errorCode"]) == (401, 10)
        refused = WsClient(running.http_url.replace("http://", "ws://") + f"/api/ws/rpc?token={token}")
        connectWS(refused.factory)
        with pytest.raises(AssertionError, match="WebSocket refused"):
            await with_timeout(refused.opened, 10)


def _claims(token: str) -> str:
    import base64

    part = token.split(".")[1]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)).decode()


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_while_events_flood_is_closed_as_too_slow(tmp_path):
    async with server_running(tmp_path, ws_max_buffer=256 * 1024) as running:
        device_id, _ = await running.demo_device()
        hub = running.service.hub
        client = await connect_ws(running.http_url, await running.jwt("tenant"))
        try:
            await subscribed(client, device_id)
            assert hub.subscriber_count() == 1
            client.protocol.transport.pauseProducing()  # the client stops reading
            # The flood: status changes of commands with 100 KB of params, as the device actor publishes them, a
            # few every few ms until the server gives up on the client: once the kernel's buffers on both sides
            # are full (a few MB on loopback) and a quarter of a MB more waits (bounded: 200 MB at most).
            events = running.service.events
            blob = "x" * 100_000
            published = 0
            for _ in range(400):
                if hub.subscriber_count() == 0:
                    break
                for _ in range(5):
                    events.publish(RpcStatusChanged(_record(UUID(device_id), running, blob), False))
                    published += 1
                await deferLater(reactor, 0.005, lambda: None)
            assert hub.subscriber_count() == 0, f"still subscribed after {published} events"
            assert published > 20, "closed before the kernel's buffers could have filled"
            client.protocol.transport.resumeProducing()  # reads what was sent, up to the close frame
            code, reason = await with_timeout(client.closed, 30)
            assert (code, reason) == (4008, "too slow")
            # Everything sent before the close was read (the subscription's answer, then events), then the close.
            events_read = client.received - 1
            assert 20 < events_read <= published, (events_read, published)
        finally:
            await stop_client(client)


def _record(device_id: UUID, running: Any, blob: str) -> RpcRecord:
    tenant_id = running.service.demo.devices[0][0].tenant_id
    now = int(time.time() * 1000)
    return RpcRecord(id=uuid4(), created_time=now, tenant_id=tenant_id, device_id=device_id,
                     expiration_time=now + 60_000, oneway=False, method="upload", params={"blob": blob},
                     status=RpcStatus.QUEUED)
