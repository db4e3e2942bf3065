"""MQTT limits on loopback, the real server and paho-mqtt as the device: subscriptions outside the device's own
topics are refused, and a flood against a small inbound window completes with every message handled."""

from __future__ import annotations

import json

import paho.mqtt.client as paho
import pytest
import pytest_twisted
from twisted.internet import defer

from tests.fixtures.server import PahoDevice, with_timeout
from tests.fixtures.server_context import server_running


@pytest.mark.parametrize("protocol, refused", [(paho.MQTTv311, 0x80), (paho.MQTTv5, 0x87)])
@pytest_twisted.ensureDeferred
async def test_subscribing_to_everything_is_refused_and_the_devices_own_topics_are_granted(tmp_path, protocol,
                                                                                           refused):
    async with server_running(tmp_path) as server:
        _, token = await server.demo_device()
        device = PahoDevice(server.mqtt_port, token, protocol)
        try:
            await device.connect()
            assert await device.subscribe("#") == [refused]
            assert await device.subscribe("v1/devices/+/rpc/request/+") == [refused]
            assert await device.subscribe("v1/devices/me/rpc/request/+") == [1]
            assert device.client.is_connected()  # a refused filter does not cost the connection
        finally:
            device.stop()


@pytest_twisted.ensureDeferred
async def test_a_flood_against_a_small_window_completes_with_every_message_handled(tmp_path):
    count = 600
    async with server_running(tmp_path, mqtt_max_inflight_in=4) as server:
        _, token = await server.demo_device()
        device = PahoDevice(server.mqtt_port, token)
        device.client.max_inflight_messages_set(200)  # the server's window, not paho's, is what bounds this flood
        device.client.max_queued_messages_set(0)
        try:
            await device.connect()
            assert await device.subscribe("v1/devices/me/rpc/response/+") == [1]
            # Device-to-server calls: each is handled by the device's actor, which answers on rpc/response/{id}.
            published = []
            for n in range(count):
                method = "getSessionLimits" if n == 0 else "getCurrentTime"
                published.append(defer.ensureDeferred(
                    device.publish(f"v1/devices/me/rpc/request/{n}", {"method": method, "params": {}})))
            await with_timeout(defer.gatherResults(published), 60)  # every PUBACK came
            answers = {}
            while len(answers) < count:
                topic, payload, _ = await device.next_message(30)
                answers[int(topic.rsplit("/", 1)[1])] = json.loads(payload)
            assert sorted(answers) == list(range(count))  # every call was handled, none twice
            assert answers[0]["maxInflightMessages"] == 4  # the bound, as getSessionLimits reports it
            assert all(isinstance(answers[n], int) for n in range(1, count))
        finally:
            device.stop()
