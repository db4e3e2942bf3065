"""Secrets stay out of the logs, even at debug level with the access log on: a password given at activation and
login, a device token in the HTTP device API's path, in ``?accessToken=`` and as an MQTT CONNECT user name, and a JWT
in the WebSocket's ``?token=``."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlparse

import paho.mqtt.client as paho
import pytest_twisted
import treq
from twisted.logger import globalLogPublisher

from nanoiot.web.log_masking import mask_path, mask_uri
from tests.fixtures.server import PahoDevice
from tests.fixtures.server_context import server_running

PASSWORD = "Pa55-word-never-logged-7781"
DEVICE_TOKEN = "TOKEN_NEVER_LOGGED_4242"
WRONG_TOKEN = "WRONG_TOKEN_NEVER_LOGGED_9999"


def test_device_tokens_and_secret_query_values_are_masked_in_uris() -> None:
    assert mask_uri(b"/api/v1/ABC123/rpc?timeout=20000") == b"/api/v1/***/rpc?timeout=20000"
    assert mask_uri(b"/api/v1/ABC123") == b"/api/v1/***"
    assert mask_uri(b"/api/ws/rpc?token=eyJ.x.y&a=1") == b"/api/ws/rpc?token=***&a=1"
    assert mask_uri(b"/api/device?accessToken=SECRET") == b"/api/device?accessToken=***"
    assert mask_uri(b"/api/noauth/activate?activateToken=eyJ") == b"/api/noauth/activate?activateToken=***"
    assert mask_uri(b"/api/device/123?pageSize=1") == b"/api/device/123?pageSize=1"
    assert mask_path("api/v1/ABC123/rpc") == "api/v1/***/rpc"


@pytest_twisted.ensureDeferred
async def test_no_password_device_token_or_jwt_reaches_the_log_at_debug_level(tmp_path):
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        seen.append(repr(event))

    globalLogPublisher.addObserver(observe)
    try:
        async with server_running(tmp_path, log_level="debug") as server:
            admin = await server.jwt("tenant")
            headers = {"X-Authorization": [f"Bearer {admin}"], "Content-Type": ["application/json"]}
            # A user activated and logged in with PASSWORD; a device created with DEVICE_TOKEN.
            body = json.dumps({"email": "secret@nanoiot.io", "authority": "TENANT_ADMIN"}).encode()
            user = await (await treq.post(f"{server.http_url}/api/user", body, headers=headers)).json()
            link = await (await treq.get(f"{server.http_url}/api/user/{user['id']['id']}/activationLink",
                                         headers=headers)).text()
            activate = parse_qs(urlparse(link).query)["activateToken"][0]
            response = await treq.post(f"{server.http_url}/api/noauth/activate", json={"activateToken": activate,
                                                                                       "password": PASSWORD})
            assert response.code == 200
            response = await treq.post(f"{server.http_url}/api/auth/login",
                                       json={"username": "secret@nanoiot.io", "password": PASSWORD})
            jwt = (await response.json())["token"]
            response = await treq.post(f"{server.http_url}/api/device?accessToken={DEVICE_TOKEN}",
                                       json.dumps({"name": "secretive"}).encode(), headers=headers)
            assert response.code == 200
            # The device answers over HTTP (a request id nobody asked: still a logged request) and over MQTT.
            response = await treq.post(f"{server.http_url}/api/v1/{DEVICE_TOKEN}/rpc/12345", b"{}")
            await response.content()
            device = PahoDevice(server.mqtt_port, DEVICE_TOKEN)
            assert (await device.connect()).value == 0
            device.stop()
            wrong = PahoDevice(server.mqtt_port, WRONG_TOKEN, protocol=paho.MQTTv311)
            await wrong.connect()
            wrong.stop()
            response = await treq.get(f"{server.http_url}/api/ws/rpc?token={jwt}")  # no upgrade: a 400, logged
            await response.content()
    finally:
        globalLogPublisher.removeObserver(observe)

    text = "\n".join(seen)
    assert "/api/v1/***/rpc/12345" in text  # the access log was on and saw the device's request
    for secret in (PASSWORD, DEVICE_TOKEN, WRONG_TOKEN, jwt, activate):
        assert secret not in text, f"{secret[:12]}... was logged"
