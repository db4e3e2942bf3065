"""End to end on loopback: paho-mqtt as a ThingsBoard gateway, and server methods that command other devices."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from twisted.internet import defer

from nanoiot.commands.server_methods import CallContext
from tests.fixtures.server import PahoDevice, make_config, server, start_server, with_timeout  # noqa: F401
from tests.integration.test_mqtt_rpc_e2e import connected_device, create_device


def watch_sub_devices(server) -> defer.DeferredQueue:
    """Sub-devices as the server finds or creates them: the event to wait on instead of polling REST."""
    found: defer.DeferredQueue = defer.DeferredQueue()
    factory = server.service.mqtt_factory
    original = factory.find_or_create_subdevice

    def spy(gateway, name, device_type):
        return original(gateway, name, device_type).addCallback(lambda device: (found.put(device), device)[1])

    factory.find_or_create_subdevice = spy
    return found


async def connected_gateway(server, name: str = "Gateway 1") -> PahoDevice:
    _, token = await create_device(server, name)
    gateway = await connected_device(server, token, topic="v1/gateway/rpc")
    return gateway


@pytest_twisted.ensureDeferred
async def test_a_sub_device_is_created_on_connect_and_answers_a_rest_call_through_its_gateway(server):
    found = watch_sub_devices(server)
    gateway = await connected_gateway(server)
    try:
        await gateway.publish("v1/gateway/connect", {"device": "Meter-7", "type": "power-meter"})
        sub = await with_timeout(found.get())
        status, body = await server.call("GET", "/api/tenant/devices?deviceName=Meter-7")
        assert status == 200, body
        sub_id = body["id"]["id"]
        assert sub_id == str(sub.id)
        assert body["type"] == "power-meter"
        status, credentials = await server.call("GET", f"/api/device/{sub_id}/credentials")
        assert status == 200 and credentials["credentialsId"]  # a token was generated, as for any device

        call = defer.ensureDeferred(server.call("POST", f"/api/rpc/twoway/{sub_id}",
                                                body={"method": "getPower", "params": {"phase": 2}}))
        topic, payload, qos = await gateway.next_message()
        assert (topic, qos) == ("v1/gateway/rpc", 1)
        command = json.loads(payload)
        assert command["device"] == "Meter-7"
        assert command["data"]["method"] == "getPower" and command["data"]["params"] == {"phase": 2}
        assert isinstance(command["data"]["id"], int)
        await gateway.publish("v1/gateway/rpc", {"device": "Meter-7", "id": command["data"]["id"],
                                                 "data": {"watts": 230}})
        assert await with_timeout(call) == (200, {"watts": 230})

        # The gateway's PUBACK delivers a one-way command (ThingsBoard ignores it; we do not).
        status, body = await server.call("POST", f"/api/rpc/oneway/{sub_id}", body={"method": "reset"})
        assert (status, body) == (200, None)
        topic, payload, _ = await gateway.next_message()
        assert json.loads(payload)["data"]["method"] == "reset"
    finally:
        gateway.stop()


@pytest_twisted.ensureDeferred
async def test_a_known_sub_device_is_reused_and_a_disconnected_one_is_offline(server):
    found = watch_sub_devices(server)
    existing_id, _ = await create_device(server, "Pump-1")
    gateway = await connected_gateway(server)
    try:
        await gateway.publish("v1/gateway/connect", {"device": "Pump-1"})
        sub = await with_timeout(found.get())
        assert str(sub.id) == existing_id
        await gateway.publish("v1/gateway/disconnect", {"device": "Pump-1"})
        status, body = await server.call("POST", f"/api/rpc/twoway/{existing_id}",
                                         body={"method": "m", "timeout": 300})
        assert (status, body["rpcError"]) == (504, "DEVICE_OFFLINE")
    finally:
        gateway.stop()


@pytest_twisted.ensureDeferred
async def test_bad_gateway_messages_do_not_cost_the_gateway_its_connection(server):
    found = watch_sub_devices(server)
    gateway = await connected_gateway(server)
    try:
        await gateway.publish("v1/gateway/connect", b"{not json")
        await gateway.publish("v1/gateway/rpc", {"id": 1, "data": {}})
        await gateway.publish("v1/gateway/connect", {"device": "Still-Works"})
        sub = await with_timeout(found.get())
        assert sub.name == "Still-Works"
        assert not gateway.disconnected.called
    finally:
        gateway.stop()


# --- server methods that command other devices -----------------------------------------------------------------------


def forward_command(context: CallContext, params: Any) -> Any:
    """A user server method (loaded through --rpc-methods): pass a command on to a related device."""
    return context.send_rpc(params["deviceId"], params["method"], params.get("params"), timeout_ms=5000)


@pytest_twisted.async_yield_fixture
async def forwarding_server(tmp_path: Any) -> Any:
    config = make_config(f"sqlite:///{tmp_path / 'nanoiot.db'}", jwt_key_file=str(tmp_path / "k"),
                         rpc_methods=f"forward={__name__}:forward_command")
    running = await start_server(config)
    yield running
    await running.service.stopService()


async def call_server(device: PahoDevice, request_id: int, body: Any) -> Any:
    await device.publish(f"v1/devices/me/rpc/request/{request_id}", body)
    topic, payload, _ = await device.next_message()
    assert topic == f"v1/devices/me/rpc/response/{request_id}"
    return json.loads(payload)


@pytest_twisted.ensureDeferred
async def test_a_user_method_forwards_a_device_call_to_another_device_and_returns_its_answer(forwarding_server):
    server = forwarding_server
    valve_id, valve_token = await create_device(server, "Valve")
    valve = await connected_device(server, valve_token)
    _, caller_token = await server.demo_device()
    caller = await connected_device(server, caller_token, topic="v1/devices/me/rpc/response/+")
    try:
        answer = defer.ensureDeferred(call_server(caller, 5, {"method": "forward", "params": {
            "deviceId": valve_id, "method": "open", "params": {"percent": 50}}}))
        topic, payload, _ = await valve.next_message()
        assert json.loads(payload) == {"method": "open", "params": {"percent": 50}}
        await valve.publish(topic.replace("request", "response"), {"opened": 50})
        assert await with_timeout(answer) == {"opened": 50}
    finally:
        valve.stop()
        caller.stop()


@pytest_twisted.ensureDeferred
async def test_a_user_method_cannot_command_a_device_of_another_tenant(forwarding_server):
    server = forwarding_server
    other_tenant = await server.service.repository.create_tenant("Other Tenant")
    stranger, _ = await server.service.catalog.create_device(other_tenant.id, "Stranger")
    _, caller_token = await server.demo_device()
    caller = await connected_device(server, caller_token, topic="v1/devices/me/rpc/response/+")
    try:
        answer = await call_server(caller, 6, {"method": "forward", "params": {
            "deviceId": str(stranger.id), "method": "open"}})
        assert answer["error"].startswith("forward failed: You don't have permission")
        answer = await call_server(caller, 7, {"method": "unknownMethod"})
        assert answer == {"error": "Unsupported method: unknownMethod"}
    finally:
        caller.stop()
