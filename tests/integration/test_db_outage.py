"""A PostgreSQL outage against the real server: the test's own PostgreSQL (never the suite's shared one) is stopped
under a running server with connected devices, then started again.

While it is down: what needs the database answers 503 with Retry-After and no internals, a persistent command is
refused rather than acknowledged unstored, a connected device still gets lightweight commands, a device whose token
the server knows may connect, a token it never saw is refused with CONNACK "server unavailable". Once it is back:
the server finds it by itself and the commands queued before the outage reach the device that connected during it,
on the same connection."""

from __future__ import annotations

import json

import pytest_twisted
import treq
from twisted.internet import defer, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet import reactor

from nanoiot.transports.mqtt import codec
from tests.fixtures.processes import bounded, wait_until
from tests.fixtures.raw_mqtt import RawDevice, connect_raw
from tests.fixtures.server import PahoDevice, RunningServer, make_config, start_server, with_timeout

RETRY_AFTER = 4


async def persistent(server: RunningServer, device_id: str, method: str) -> str:
    status, body = await server.call("POST", f"/api/rpc/twoway/{device_id}", body={
        "method": method, "params": {"m": method}, "persistent": True, "timeout": 120000})
    assert status == 200, body
    return body["rpcId"]


async def stored_status(server: RunningServer, rpc_id: str) -> str:
    status, body = await server.call("GET", f"/api/rpc/persistent/{rpc_id}")
    assert status == 200, body
    return body["status"]


async def refused_connack(port: int, token: str) -> int:
    device = RawDevice(token)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), device)
    connack = await device.next_packet(codec.ConnAck)
    await bounded(device.closed, 10, "the refused connection to be closed")
    return connack.reason_code


@pytest_twisted.ensureDeferred
async def test_a_postgresql_outage_is_503_for_the_database_only_and_queued_commands_flow_once_it_is_back(
        tmp_path, private_postgres):
    url = private_postgres.url("nanoiot")
    config = make_config(url, jwt_key_file=str(tmp_path / "k"), db_retry_after=RETRY_AFTER, db_probe_interval=0.2,
                         rpc_ack_timeout=10000)
    server = await start_server(config)
    paho = None
    late = None
    try:
        a_id, a_token = await server.demo_device("Demo Device")
        b_id, b_token = await server.demo_device("Customer Device")
        # Device A is connected throughout; device B is offline and has two commands waiting for it.
        paho = PahoDevice(server.mqtt_port, a_token)
        assert int(getattr(await paho.connect(), "value", 0)) == 0
        await paho.subscribe("v1/devices/me/rpc/request/+")
        queued = [await persistent(server, b_id, f"queued{i}") for i in range(2)]
        assert [await stored_status(server, rpc_id) for rpc_id in queued] == ["QUEUED", "QUEUED"]

        await threads.deferToThread(private_postgres.halt)

        # A persistent command: 503 with Retry-After, nothing of the database in the body, no rpcId.
        jwt = await server.jwt("tenant")
        response = await treq.post(f"{server.http_url}/api/rpc/twoway/{b_id}", headers={
            "X-Authorization": [f"Bearer {jwt}"], "Content-Type": ["application/json"]},
            data=json.dumps({"method": "during", "persistent": True, "timeout": 60000}).encode())
        text = (await response.content()).decode()
        assert response.code == 503, text
        assert response.headers.getRawHeaders("retry-after") == [str(RETRY_AFTER)]
        body = json.loads(text)
        assert body["status"] == 503 and body["errorCode"] == 46 and "rpcId" not in body
        for leak in (str(private_postgres.port), "127.0.0.1", "psycopg2", "connection", "SELECT", "INSERT"):
            assert leak not in text, (leak, text)
        # Reading a stored command needs the database too.
        status, body = await server.call("GET", f"/api/rpc/persistent/{queued[0]}")
        assert status == 503, body
        assert not server.service.repository.healthy

        # A lightweight two-way command to the connected device A still goes through and gets its answer.
        call = defer.ensureDeferred(server.call("POST", f"/api/rpc/twoway/{a_id}",
                                                body={"method": "light", "params": 1, "timeout": 10000}))
        topic, payload, _ = await paho.next_message()
        assert json.loads(payload)["method"] == "light"
        await paho.publish(f"v1/devices/me/rpc/response/{topic.rsplit('/', 1)[1]}", {"still": "works"})
        assert await with_timeout(call) == (200, {"still": "works"})

        # A token the server never saw cannot be checked: CONNACK 3 "server unavailable" (not 5 "not authorized").
        assert await refused_connack(server.mqtt_port, "NEVER_SEEN_TOKEN") == codec.CONNACK_SERVER_UNAVAILABLE
        # The same over the HTTP device API: 503 with Retry-After, not 401.
        response = await treq.get(f"{server.http_url}/api/v1/NEVER_SEEN_TOKEN/rpc?timeout=1000")
        assert response.code == 503, await response.text()
        assert response.headers.getRawHeaders("retry-after") == [str(RETRY_AFTER)]
        # Device B, whose token the server knows, connects and subscribes during the outage: it is accepted, and
        # its commands wait for their SENT status to be stored before they are written to it.
        late = await connect_raw(server.mqtt_port, b_token)

        await threads.deferToThread(private_postgres.resume)

        # The server finds the database by itself; B gets its queued commands on the same connection, in order.
        received = [await late.next_command(timeout=20) for _ in queued]
        assert [body["method"] for _, body, _ in received] == ["queued0", "queued1"]
        assert not late.closed.called
        for request_id, body, _ in received:
            late.answer(request_id, {"done": body["method"]})
        for rpc_id in queued:
            await wait_until(lambda rpc_id=rpc_id: _is(server, rpc_id, "SUCCESSFUL"), 20,
                             f"command {rpc_id} to be stored as SUCCESSFUL")
        assert server.service.repository.healthy
        # And persistent commands are taken again.
        assert await stored_status(server, await persistent(server, a_id, "after")) in ("QUEUED", "SENT",
                                                                                         "DELIVERED")
    finally:
        if late is not None:
            late.close()
        if paho is not None:
            paho.stop()
        await server.service.stopService()


async def _is(server: RunningServer, rpc_id: str, wanted: str) -> bool:
    return await stored_status(server, rpc_id) == wanted
