"""End to end on loopback: the real server, treq as the REST client, paho-mqtt as the device."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from uuid import uuid4

import paho.mqtt.client as paho
import pytest
import pytest_twisted
from twisted.internet import defer

from nanoiot.passwords import hash_password
from nanoiot.persistence.records import Authority
from tests.fixtures.server import PahoDevice, server, with_timeout  # noqa: F401
from tests.fixtures.server_context import server_running

RPC = "v1/devices/me/rpc/request/+"


async def connected_device(server, token, protocol=paho.MQTTv311, topic=RPC):
    """A paho device with ``token``, connected and subscribed to ``topic``; the caller stops it."""
    device = PahoDevice(server.mqtt_port, token, protocol)
    try:
        code = await device.connect()
        assert int(getattr(code, "value", code)) == 0
        granted = await device.subscribe(topic)
        assert granted == [1]
    except BaseException:
        device.stop()
        raise
    return device


@asynccontextmanager
async def online(server, token, protocol=paho.MQTTv311, topic=RPC):
    """:func:`connected_device` for the block, stopped after it."""
    device = await connected_device(server, token, protocol, topic)
    try:
        yield device
    finally:
        device.stop()


def rpc_call(server, path, body):
    """A REST RPC POST started now and awaited later (``with_timeout``), once the device has seen the command."""
    return defer.ensureDeferred(server.call("POST", path, body=body))


async def create_device(server, name):
    status, body = await server.call("POST", "/api/device", body={"name": name, "type": "thermostat"})
    assert status == 200, body
    device_id = body["id"]["id"]
    status, credentials = await server.call("GET", f"/api/device/{device_id}/credentials")
    assert status == 200
    assert credentials["credentialsType"] == "ACCESS_TOKEN"
    return device_id, credentials["credentialsId"]


@pytest_twisted.ensureDeferred
async def test_a_device_created_over_rest_answers_a_two_way_call_over_mqtt(server):
    device_id, token = await create_device(server, "Thermostat 1")
    async with online(server, token) as device:
        call = rpc_call(server, f"/api/rpc/twoway/{device_id}", {"method": "getTemperature", "params": {"unit": "C"}})
        topic, payload, qos = await device.next_message()
        prefix, request_id = topic.rsplit("/", 1)
        assert prefix == "v1/devices/me/rpc/request" and request_id.isdigit()
        assert json.loads(payload) == {"method": "getTemperature", "params": {"unit": "C"}}
        assert qos == 1
        await device.publish(f"v1/devices/me/rpc/response/{request_id}", {"temperature": 21.5})
        status, body = await with_timeout(call)
        assert (status, body) == (200, {"temperature": 21.5})


@pytest_twisted.ensureDeferred
async def test_the_v1_two_way_endpoint_returns_the_device_answer(server):
    device_id, token = await server.demo_device()
    async with online(server, token) as device:
        call = rpc_call(server, f"/api/plugins/rpc/twoway/{device_id}", {"method": "getValue", "params": 7})
        topic, payload, _ = await device.next_message()
        request_id = topic.rsplit("/", 1)[1]
        assert json.loads(payload) == {"method": "getValue", "params": 7}
        await device.publish(f"v1/devices/me/rpc/response/{request_id}", [1, 2, 3])
        assert await with_timeout(call) == (200, [1, 2, 3])


@pytest.mark.parametrize("path", ["/api/rpc/oneway", "/api/plugins/rpc/oneway"])
@pytest_twisted.ensureDeferred
async def test_a_one_way_call_returns_an_empty_200_once_the_device_acknowledged_it(server, path):
    device_id, token = await server.demo_device()
    async with online(server, token) as device:
        status, body = await server.call("POST", f"{path}/{device_id}",
                                         body={"method": "setGpio", "params": {"pin": 7, "value": 1}})
        assert (status, body) == (200, None)
        topic, payload, _ = await device.next_message()
        assert json.loads(payload) == {"method": "setGpio", "params": {"pin": 7, "value": 1}}


@pytest_twisted.ensureDeferred
async def test_a_device_on_the_v2_short_topics_gets_commands_there_and_answers_there(server):
    device_id, token = await server.demo_device()
    async with online(server, token, topic="v2/r/req/+") as device:
        call = rpc_call(server, f"/api/rpc/twoway/{device_id}", {"method": "ping"})
        topic, payload, _ = await device.next_message()
        assert topic.startswith("v2/r/req/")
        assert json.loads(payload) == {"method": "ping", "params": None}
        await device.publish("v2/r/res/" + topic.rsplit("/", 1)[1], {"pong": True})
        assert await with_timeout(call) == (200, {"pong": True})


@pytest_twisted.ensureDeferred
async def test_an_mqtt5_device_with_an_empty_client_id_is_served(server):
    device_id, token = await server.demo_device()
    async with online(server, token, protocol=paho.MQTTv5) as device:
        call = rpc_call(server, f"/api/rpc/twoway/{device_id}", {"method": "v5"})
        topic, _, _ = await device.next_message()
        await device.publish(topic.replace("request", "response"), {"ok": 5})
        assert await with_timeout(call) == (200, {"ok": 5})


@pytest_twisted.ensureDeferred
async def test_a_non_json_answer_gives_406_with_the_raw_text(server):
    device_id, token = await server.demo_device()
    async with online(server, token) as device:
        call = rpc_call(server, f"/api/rpc/twoway/{device_id}", {"method": "m"})
        topic, _, _ = await device.next_message()
        await device.publish(topic.replace("request", "response"), b"not json {")
        status, body = await with_timeout(call)
        assert status == 406
        assert body["rpcError"] == "NON_JSON_RESPONSE"
        assert body["response"] == "not json {"


@pytest_twisted.ensureDeferred
async def test_an_offline_device_gives_504_on_v2_and_409_on_v1_saying_it_was_offline(server):
    device_id, _ = await server.demo_device()
    status, body = await server.call("POST", f"/api/rpc/twoway/{device_id}", body={"method": "m", "timeout": 200})
    assert status == 504
    assert body["rpcError"] == "DEVICE_OFFLINE"
    status, body = await server.call("POST", f"/api/plugins/rpc/oneway/{device_id}",
                                     body={"method": "m", "timeout": 200})
    assert status == 409
    assert body["rpcError"] == "DEVICE_OFFLINE"


@pytest_twisted.ensureDeferred
async def test_a_device_that_never_answers_gives_504_on_v2_and_408_on_v1_saying_it_did_not_answer(server):
    device_id, token = await server.demo_device()
    async with online(server, token):
        status, body = await server.call("POST", f"/api/rpc/twoway/{device_id}",
                                         body={"method": "m", "timeout": 300})
        assert (status, body["rpcError"]) == (504, "NO_RESPONSE")
        status, body = await server.call("POST", f"/api/plugins/rpc/twoway/{device_id}",
                                         body={"method": "m", "timeout": 300})
        assert (status, body["rpcError"]) == (408, "NO_RESPONSE")


@pytest_twisted.ensureDeferred
async def test_bad_requests_get_the_right_status_and_a_json_body(server):
    device_id, _ = await server.demo_device()
    customer_device_id, _ = await server.demo_device("Customer Device")
    cases = [
        ("tenant", f"/api/rpc/twoway/{device_id}", b"{not json", 400, 31),
        ("tenant", f"/api/rpc/twoway/{device_id}", b'{"params": {}}', 400, 31),
        ("tenant", "/api/rpc/twoway/not-a-uuid", b'{"method": "m"}', 400, 31),
        ("tenant", f"/api/rpc/threeway/{device_id}", b'{"method": "m"}', 404, 32),
        ("tenant", f"/api/rpc/twoway/{uuid4()}", b'{"method": "m"}', 404, 32),
        (None, f"/api/rpc/twoway/{device_id}", b'{"method": "m"}', 401, 10),
        ("sysadmin", f"/api/rpc/twoway/{device_id}", b'{"method": "m"}', 403, 20),
        ("customer", f"/api/rpc/twoway/{device_id}", b'{"method": "m"}', 403, 20),
    ]
    for who, path, raw, status, code in cases:
        got_status, body = await server.call("POST", path, who=who, raw=raw)
        assert got_status == status, (who, path, raw, body)
        assert body["status"] == status and body["errorCode"] == code, body
        assert isinstance(body["message"], str) and body["message"]
    # The customer's own device is reachable for the customer user (it is offline: 504, not 403).
    got_status, body = await server.call("POST", f"/api/rpc/oneway/{customer_device_id}", who="customer",
                                         body={"method": "m", "timeout": 100})
    assert got_status == 504


@pytest_twisted.ensureDeferred
async def test_a_device_of_another_tenant_is_forbidden(server):
    repository = server.service.repository
    other = await repository.create_tenant("Other Tenant")
    await repository.create_user("other@nanoiot.io", await hash_password("other"), Authority.TENANT_ADMIN,
                                 other.id, server.service.demo.devices[0][0].customer_id)
    device_id, _ = await server.demo_device()
    status, body = await server.call("POST", f"/api/rpc/twoway/{device_id}", who="other", body={"method": "m"})
    assert (status, body["errorCode"]) == (403, 20)


@pytest_twisted.ensureDeferred
async def test_a_body_over_the_size_limit_gives_413(tmp_path):
    async with server_running(tmp_path, "small.db", max_payload_size=1024) as small:
        device_id, _ = await small.demo_device()
        status, body = await small.call("POST", f"/api/rpc/twoway/{device_id}",
                                        body={"method": "m", "params": "x" * 2000})
        assert status == 413
        assert "1024" in body["message"]


@pytest_twisted.ensureDeferred
async def test_an_unknown_access_token_is_refused_with_not_authorized(server):
    device = PahoDevice(server.mqtt_port, "no-such-token")
    try:
        code = await device.connect()
        assert int(getattr(code, "value", code)) in (5, 135)
    finally:
        device.stop()


@pytest_twisted.ensureDeferred
async def test_a_device_calling_the_server_gets_an_answer_and_its_request_is_never_routed_back(server):
    _, token = await server.demo_device()
    async with online(server, token) as device:
        assert await device.subscribe("v1/devices/me/rpc/response/+") == [1]
        await device.publish("v1/devices/me/rpc/request/42", {"method": "getCurrentTime", "params": {}})
        topic, payload, _ = await device.next_message()
        assert topic == "v1/devices/me/rpc/response/42"
        assert isinstance(json.loads(payload), int)
        await device.publish("v1/devices/me/rpc/request/43", {"method": "noSuchMethod", "params": {}})
        topic, payload, _ = await device.next_message()
        assert topic == "v1/devices/me/rpc/response/43"
        assert "noSuchMethod" in json.loads(payload)["error"]


@pytest_twisted.ensureDeferred
async def test_a_reconnect_of_the_same_device_replaces_the_old_session(server):
    device_id, token = await server.demo_device()
    async with online(server, token) as first, online(server, token) as second:
        await with_timeout(first.disconnected)
        call = rpc_call(server, f"/api/rpc/twoway/{device_id}", {"method": "who"})
        topic, _, _ = await second.next_message()
        await second.publish(topic.replace("request", "response"), {"session": 2})
        assert await with_timeout(call) == (200, {"session": 2})
        assert first.messages.pending == []


@pytest_twisted.ensureDeferred
async def test_commands_queued_while_offline_are_delivered_in_order_on_subscribe(server):
    device_id, token = await server.demo_device()
    queued = defer.DeferredQueue()
    unsubscribe = server.service.events.subscribe(
        lambda event: queued.put(event) if event.status.value == "QUEUED" else None)
    calls = []
    try:
        for i in range(5):
            # One at a time: each command is queued in the device actor before the next is sent.
            calls.append(rpc_call(server, f"/api/rpc/oneway/{device_id}", {"method": f"step{i}", "timeout": 10000}))
            await with_timeout(queued.get())
    finally:
        unsubscribe()
    async with online(server, token) as device:
        methods = []
        for _ in range(5):
            _, payload, _ = await device.next_message()
            methods.append(json.loads(payload)["method"])
        assert methods == [f"step{i}" for i in range(5)]
        for call in calls:
            assert await with_timeout(call) == (200, None)
