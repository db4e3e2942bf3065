"""Live events across a cluster: a WebSocket subscriber on node 2 sees the events of a device connected to node 1,
and commands it through an ``rpc`` frame (two ``twistd nanoiot --cluster`` nodes on one PostgreSQL database, the
harness of tests/fixtures/cluster.py; devices are paho-mqtt clients, the WebSocket client is Autobahn's).

Node 1 relays its events only once it heard node 2's interest (announced when node 2's first subscription is made,
renewed with each heartbeat): the test first sends commands until their events come back, then checks presence and
the whole life of a persistent command. Nothing sleeps: every wait is an event or a bounded poll.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import pytest_twisted

from tests.fixtures.cluster import MqttDevice, new_database, running_cluster
from tests.fixtures.processes import bounded, wait_until
from tests.integration.test_ws_e2e import WsClient, connect_ws, stop_client, subscribed

pytestmark = [pytest.mark.postgres, pytest.mark.cluster]


@pytest.fixture
def cluster_database(postgres_server: str) -> str:
    return new_database(postgres_server)


def rpc_events(client: WsClient, device_id: str) -> list[Any]:
    return [f for f in client.frames if f.get("deviceId") == device_id and f.get("event", "").startswith("RPC_")]


@pytest_twisted.ensureDeferred
async def test_a_subscriber_on_node_2_sees_and_commands_a_device_on_node_1(tmp_path, cluster_database):
    async with running_cluster(tmp_path, cluster_database, size=2) as cluster:
        n1, n2 = cluster.nodes
        device_id, token = await cluster.create_device("ws", via=n1)
        device = MqttDevice(token, [n1.mqtt_port])  # answers every command with {"method", "params"}
        client = await connect_ws(n2.http_url, await cluster.login("tenant"))
        try:
            await device.connect()
            await subscribed(client, "*")

            # Commands from node 2 reach the device on node 1 at once; their events come back once node 1 heard
            # node 2's interest.
            probes = itertools.count(1)

            async def events_flow() -> bool:
                number = next(probes)
                answer = await client.call({"cmd": "rpc", "id": f"probe-{number}", "deviceId": device_id,
                                            "method": "probe", "params": {"n": number}})
                assert answer == {"id": f"probe-{number}", "status": 200,
                                  "body": {"method": "probe", "params": {"n": number}}}, answer
                return bool(rpc_events(client, device_id))

            await wait_until(events_flow, 15, "node 1 to relay the events of its device", interval=0.1)
            assert rpc_events(client, device_id)[0]["rpc"]["request"]["body"]["method"] == "probe"
            client.frames.clear()

            # Presence, from node 1.
            await device.disconnect()
            offline = await client.event("DEVICE_OFFLINE", device_id)
            assert offline["node"] == n1.node_id
            await device.connect()
            online = await client.event("DEVICE_ONLINE", device_id)
            assert online["node"] == n1.node_id

            # A persistent two-way command sent at node 2: its id, and every status change published on node 1.
            answer = await client.call({"cmd": "rpc", "id": "p", "deviceId": device_id, "method": "readSensor",
                                        "params": {"s": 1}, "persistent": True, "timeout": 60000})
            assert answer["status"] == 200, answer
            rpc_id = answer["body"]["rpcId"]
            for status in ("QUEUED", "SENT", "DELIVERED", "SUCCESSFUL"):
                frame = await client.event(f"RPC_{status}", device_id, rpc_id=rpc_id, timeout=15)
                assert frame["persistent"] is True
            assert frame["rpc"]["response"] == {"method": "readSensor", "params": {"s": 1}}
            await bounded(device.when(lambda: device.errors == []), 1, "the device to have no errors")
        finally:
            await stop_client(client)
            await device.stop()
