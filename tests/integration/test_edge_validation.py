"""The same bad inputs against a real server on SQLite and on PostgreSQL: each is a 400 naming the field (401 for a
device token no device can have), never a 500, and both databases accept exactly the same inputs.

Found when the server was probed: PostgreSQL refused a 300-character name or accessToken with a 500 carrying the
SQL statement (``StringDataRightTruncation``) while SQLite stored it; an id or page out of BIGINT range was a 500
on both."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote
from uuid import uuid4

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from nanoiot.transports.mqtt import codec
from tests.fixtures.raw_mqtt import RawDevice
from tests.fixtures.server import make_config, start_server

LONG = "x" * 300
DEEP: Any = 0
for _ in range(40):
    DEEP = {"a": [DEEP]}


def bad_inputs(device_id: str) -> list[tuple[str, str, Any, str]]:
    """(method, path, JSON body, what the 400's message must name)."""
    rpc = f"/api/rpc/twoway/{device_id}"
    return [
        ("POST", "/api/device", {"name": LONG}, "name: must be at most 255"),
        ("POST", "/api/device", {"name": "n", "type": LONG}, "type: must be at most 255"),
        ("POST", "/api/device", {"name": "n", "label": LONG}, "label: must be at most 255"),
        ("POST", "/api/device", {"name": "a\x00b"}, "name: must not contain the NUL"),
        ("POST", "/api/device?accessToken=" + LONG, {"name": "n"}, "accessToken: must be at most 255"),
        ("POST", "/api/device", {"id": {"id": device_id}, "name": LONG}, "name: must be at most 255"),
        ("POST", "/api/device", {"name": "n", "additionalInfo": DEEP}, "additionalInfo: nested deeper"),
        ("GET", "/api/device/" + "1" * 300, None, "deviceId: Invalid UUID string"),
        ("GET", f"/api/tenant/devices?pageSize=10&page={2**62}", None, "page: must be at most"),
        ("GET", f"/api/tenant/devices?pageSize={2**63}&page=0", None, "pageSize: must be at most"),
        ("GET", "/api/tenant/devices?pageSize=10&page=0&textSearch=a%00", None, "textSearch: must not contain"),
        ("GET", "/api/tenant/device?deviceName=" + LONG, None, "deviceName: must be at most 255"),
        ("GET", "/api/tenant/devices?deviceName=a%00b", None, "deviceName: must not contain"),
        ("POST", "/api/customer", {"title": LONG}, "title: must be at most 255"),
        ("GET", "/api/customer/nope", None, "customerId: Invalid UUID string"),
        ("POST", "/api/ruleChain", {"name": LONG}, "name: must be at most 255"),
        ("GET", f"/api/ruleChains?pageSize=10&page={2**63}", None, "page: must be at most"),
        ("POST", "/api/relation", {"from": {"entityType": "DEVICE", "id": device_id},
                                   "to": {"entityType": "DEVICE", "id": device_id}, "type": LONG},
         "type: must be at most 255"),
        ("GET", f"/api/relations?fromId={device_id}x&fromType=DEVICE", None, "fromId: Invalid UUID string"),
        ("POST", rpc, {"method": "m", "persistent": True, "expirationTime": 2**63}, "'expirationTime' must be at most"),
        ("POST", rpc, {"method": "m", "persistent": True, "retries": 2**63}, "'retries' must be at most"),
        ("POST", rpc, {"method": "m", "persistent": True, "timeout": 2**70}, "'timeout' must be at most"),
        ("POST", rpc, {"method": LONG, "persistent": True}, "'method' is longer than 255"),
        ("POST", rpc, {"method": "m\x00", "persistent": True}, "'method' must not contain the NUL"),
        ("POST", rpc, {"method": "m", "persistent": True, "params": DEEP}, "params: nested deeper"),
        ("GET", f"/api/rpc/persistent/device/{device_id}?pageSize=10&page={2**63}", None, "page: must be at most"),
        ("GET", "/api/rpc/persistent/" + "f" * 33, None, "rpcId: Invalid UUID string"),
        ("POST", "/api/rpc/bulk", {"deviceType": LONG, "method": "m"}, "deviceType: must be at most 255"),
    ]


async def mqtt_connack(port: int, username: str) -> int:
    device = RawDevice(username)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), device)
    try:
        return (await device.next_packet(codec.ConnAck)).reason_code
    finally:
        device.close()


@pytest_twisted.ensureDeferred
async def test_bad_inputs_are_a_400_naming_the_field_on_both_databases_and_never_a_500(database_url, tmp_path):
    server = await start_server(make_config(database_url, jwt_key_file=str(tmp_path / "k")))
    try:
        device_id, token = await server.demo_device()
        answers = []
        for method, path, body, field in bad_inputs(device_id):
            status, error = await server.call(method, path, body=body)
            answers.append((method, path[:60], status, error.get("message") if isinstance(error, dict) else error))
            assert status == 400 and field in error["message"], answers[-1]
            assert "SELECT" not in error["message"] and "INSERT" not in error["message"]
        status, error = await server.call("POST", "/api/device", raw=b"[" * 10_000 + b"]" * 10_000)
        assert status == 400, error
        # Nothing of the above was stored: the device kept its name, no device or customer was added.
        status, page = await server.call("GET", "/api/tenant/devices?pageSize=100&page=0")
        assert status == 200 and sorted(d["name"] for d in page["data"]) == ["Customer Device", "Demo Device"]
        # A device token no device can have: 401 from the HTTP device API, a refused CONNECT over MQTT.
        response = await treq.post(f"{server.http_url}/api/v1/{quote(LONG)}/rpc", json={"method": "getTime"})
        assert response.code == 401
        assert await mqtt_connack(server.mqtt_port, LONG) != 0
        assert await mqtt_connack(server.mqtt_port, token) == 0
    finally:
        await server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_both_databases_accept_the_same_values_at_the_limits(database_url, tmp_path):
    server = await start_server(make_config(database_url, jwt_key_file=str(tmp_path / "k")))
    try:
        token = "t" * 255
        status, device = await server.call("POST", f"/api/device?accessToken={token}", body={
            "name": "n" * 255, "type": "t" * 255, "label": "l" * 255, "additionalInfo": {"é": ["\u2603" * 1000]}})
        assert status == 200, device
        status, credentials = await server.call("GET", f"/api/device/{device['id']['id']}/credentials")
        assert status == 200 and credentials["credentialsId"] == token
        assert await mqtt_connack(server.mqtt_port, token) == 0
        status, found = await server.call("GET", "/api/tenant/device?deviceName=" + "n" * 255)
        assert status == 200 and found["label"] == "l" * 255
        status, page = await server.call("GET", f"/api/tenant/devices?pageSize=10000&page={2**31 - 1}")
        assert status == 200 and page["data"] == []
        status, answer = await server.call("POST", f"/api/rpc/twoway/{device['id']['id']}", body={
            "method": "m" * 255, "persistent": True, "expirationTime": 2**53, "retries": 2**31 - 1,
            "params": {"deep": [[[[[[[[[[1]]]]]]]]]]}})
        assert status == 200, answer
        status, stored = await server.call("GET", f"/api/rpc/persistent/{answer['rpcId']}")
        assert status == 200 and stored["expirationTime"] == 2**53
        status, customer = await server.call("POST", "/api/customer", body={"title": "c" * 255})
        assert status == 200, customer
        status, _ = await server.call("GET", f"/api/rpc/persistent/{uuid4()}")
        assert status == 404
    finally:
        await server.service.stopService()
