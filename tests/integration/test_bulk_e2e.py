"""Bulk RPC end to end, on SQLite and PostgreSQL: a real server, REST calls over loopback, devices over MQTT.

Nothing sleeps: waits are on the event bus (every status change of every command is published there) or on the
server's own Deferreds, each bounded by a timeout.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID, uuid4

import pytest_twisted
from sqlalchemy import Connection, insert
from twisted.internet import defer

from nanoiot.commands.events import RpcStatusChanged
from nanoiot.persistence import schema
from nanoiot.persistence.records import NULL_UUID
from nanoiot.rpc.model import RpcStatus
from tests.fixtures.raw_mqtt import RawDevice
from tests.fixtures.server import make_config, start_server, with_timeout

FLEET = 1000
COUNTED = ("QUEUED", "SENT", "DELIVERED", "SUCCESSFUL", "TIMEOUT", "EXPIRED", "FAILED")


@asynccontextmanager
async def server_on(database_url: str, tmp_path: Any, **overrides: Any):
    server = await start_server(make_config(database_url, jwt_key_file=str(tmp_path / "k"), **overrides))
    try:
        yield server
    finally:
        await server.service.stopService()


async def provision(server: Any, count: int, device_type: str, customer_id: UUID = NULL_UUID,
                    tenant_id: UUID | None = None, prefix: str | None = None) -> list[tuple[str, str]]:
    """(device id, token) of ``count`` new devices of the demo tenant, written in one transaction (the REST API
    one by one would be the slow part of the test)."""
    if tenant_id is None:
        tenant_id = (await server.service.repository.get_user_by_email("tenant@nanoiot.io")).tenant_id
    prefix = prefix or f"{device_type}-{uuid4().hex[:6]}"
    now = int(time.time() * 1000)
    devices, credentials, out = [], [], []
    for i in range(count):
        device_id, token = uuid4(), f"{prefix}-{i}"
        devices.append(dict(id=device_id, created_time=now + i, tenant_id=tenant_id, customer_id=customer_id,
                            name=f"{prefix}-{i}", type=device_type, label=None, additional_info=None, version=1))
        credentials.append(dict(id=uuid4(), created_time=now, device_id=device_id, credentials_type="ACCESS_TOKEN",
                                credentials_id=token, credentials_value=None, version=1))
        out.append((str(device_id), token))

    def thd(conn: Connection) -> None:
        conn.execute(insert(schema.device), devices)
        conn.execute(insert(schema.device_credentials), credentials)

    await server.service.repository._run(thd)
    return out


class EchoDevice(RawDevice):
    """Acknowledges (auto_ack) and answers every command with its params."""

    def dataReceived(self, data: bytes) -> None:
        seen = len(self.commands)
        super().dataReceived(data)
        for request_id, body, _ in self.commands[seen:]:
            self.answer(request_id, {"echo": body.get("params")})


async def connect_fleet(port: int, tokens: list[str], wave: int = 100) -> list[EchoDevice]:
    fleet: list[EchoDevice] = []
    for start in range(0, len(tokens), wave):
        connecting = [defer.ensureDeferred(connect_echo(port, token)) for token in tokens[start:start + wave]]
        fleet.extend(await with_timeout(defer.gatherResults(connecting, consumeErrors=True), 60))
    return fleet


async def connect_echo(port: int, token: str) -> EchoDevice:
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from nanoiot.transports.mqtt import codec

    device = EchoDevice(token)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), device)
    connack = await device.next_packet(codec.ConnAck)
    assert connack.reason_code == 0
    await device.subscribe()
    return device


class Successes:
    """Counts SUCCESSFUL commands per batch from the event bus."""

    def __init__(self, server: Any) -> None:
        self.done: dict[UUID, set[UUID]] = {}
        self.waiting: dict[UUID, tuple[int, defer.Deferred]] = {}
        self.unsubscribe = server.service.events.subscribe(self.on_event)

    def on_event(self, event: Any) -> None:
        if not isinstance(event, RpcStatusChanged) or event.record.batch_id is None:
            return
        if event.record.status is RpcStatus.SUCCESSFUL:
            batch_id = event.record.batch_id
            done = self.done.setdefault(batch_id, set())
            done.add(event.record.id)
            wanted = self.waiting.get(batch_id)
            if wanted is not None and len(done) >= wanted[0]:
                del self.waiting[batch_id]
                wanted[1].callback(None)

    def until(self, batch_id: UUID, count: int) -> defer.Deferred:
        if len(self.done.get(batch_id, ())) >= count:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self.waiting[batch_id] = (count, d)
        return d


async def bulk(server: Any, who: str = "tenant", **body: Any) -> str:
    status, answer = await server.call("POST", "/api/rpc/bulk", who=who,
                                       body={"method": "setState", "params": {"on": True}, "timeout": 60000, **body})
    assert status == 200, answer
    return answer["batchId"]


async def batch_view(server: Any, batch_id: str, who: str = "tenant") -> dict[str, Any]:
    status, view = await server.call("GET", f"/api/rpc/bulk/{batch_id}", who=who)
    assert status == 200, view
    return view


async def queued(server: Any, batch_id: str) -> None:
    await with_timeout(server.service.bulk.queued(UUID(batch_id)), 60)
    await server.service.journal.flushed()


# --- the whole path -------------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_bulk_rpc_to_a_thousand_connected_devices_ends_with_every_command_successful(database_url, tmp_path):
    async with server_on(database_url, tmp_path, rpc_ack_timeout=30000) as server:
        devices = await provision(server, FLEET, "fleet")
        other = await provision(server, 3, "other")
        fleet = await connect_fleet(server.mqtt_port, [token for _, token in devices + other])
        successes = Successes(server)
        try:
            batch_id = await bulk(server, deviceType="fleet", params={"level": 3})
            await with_timeout(successes.until(UUID(batch_id), FLEET), 120)
            await server.service.journal.flushed()
            view = await batch_view(server, batch_id)
            assert view["batchId"] == batch_id and view["total"] == FLEET and not view["queueing"]
            assert view["statusCounts"] == {**{s: 0 for s in COUNTED}, "SUCCESSFUL": FLEET, "DELETED": 0}
            assert set(view["rpcIds"]) == {device_id for device_id, _ in devices}
            assert len(set(view["rpcIds"].values())) == FLEET
            user = (await server.service.repository.get_user_by_email("tenant@nanoiot.io")).id
            assert view["initiator"] == {"type": "USER", "id": str(user), "customerId": None}
            assert view["request"]["method"] == "setState" and view["request"]["deviceType"] == "fleet"
            assert isinstance(view["createdTime"], int) and (view["rejected"], view["rejectedCount"]) == ({}, 0)
            # Each device of the type got exactly one command, the others none.
            got = [[body for _, body, _ in d.commands] for d in fleet]
            assert got[:FLEET] == [[{"method": "setState", "params": {"level": 3}}]] * FLEET
            assert got[FLEET:] == [[]] * 3
            # Each command is an ordinary persistent RPC of its device, recorded as part of the batch.
            device_id, rpc_id = next(iter(view["rpcIds"].items()))
            status, rpc = await server.call("GET", f"/api/rpc/persistent/{rpc_id}")
            assert status == 200 and rpc["status"] == "SUCCESSFUL" and rpc["response"] == {"echo": {"level": 3}}
            assert rpc["deviceId"]["id"] == device_id
            assert rpc["initiator"] == {"type": "BULK", "batchId": batch_id, "userId": str(user)}
            # Without the rpcIds (a large batch's status is cheaper so).
            status, small = await server.call("GET", f"/api/rpc/bulk/{batch_id}?rpcIds=false")
            assert status == 200 and small["rpcIds"] == {} and small["statusCounts"]["SUCCESSFUL"] == FLEET
        finally:
            successes.unsubscribe()
            for device in fleet:
                device.close()


@pytest_twisted.ensureDeferred
async def test_a_customer_users_device_type_batch_reaches_its_customers_devices_only(database_url, tmp_path):
    async with server_on(database_url, tmp_path) as server:
        customer = (await server.service.repository.get_user_by_email("customer@nanoiot.io")).customer_id
        tenants = await provision(server, 3, "meter")
        customers = await provision(server, 2, "meter", customer_id=customer)
        batch_id = await bulk(server, who="customer", deviceType="meter")
        await queued(server, batch_id)
        view = await batch_view(server, batch_id, who="customer")
        assert view["total"] == 2 and view["statusCounts"]["QUEUED"] == 2
        assert set(view["rpcIds"]) == {device_id for device_id, _ in customers}
        assert view["initiator"]["customerId"] == str(customer)
        assert (await batch_view(server, batch_id, who="tenant"))["total"] == 2  # the tenant sees its batches
        # The customer user sees no batch of the tenant admin, and commands none of the tenant's own devices.
        admins = await bulk(server, deviceType="meter")
        status, body = await server.call("GET", f"/api/rpc/bulk/{admins}", who="customer")
        assert status == 403, body
        status, body = await server.call("POST", "/api/rpc/bulk", who="customer", body={
            "method": "m", "deviceIds": [customers[0][0], tenants[0][0]]})
        assert status == 403 and body["forbidden"] == [tenants[0][0]] and tenants[0][0] in body["message"]
        status, body = await server.call("DELETE", f"/api/rpc/bulk/{batch_id}", who="customer")
        assert status == 403  # deleting is the tenant admin's, as for one persistent RPC


@pytest_twisted.ensureDeferred
async def test_deleting_a_batch_to_offline_devices_deletes_their_commands_and_they_never_get_them(
        database_url, tmp_path):
    async with server_on(database_url, tmp_path) as server:
        devices = await provision(server, 5, "lamp")
        kept = await bulk(server, deviceIds=[devices[0][0]], method="kept")
        doomed = await bulk(server, deviceIds=[device_id for device_id, _ in devices], method="doomed")
        await queued(server, doomed)
        assert (await batch_view(server, doomed))["statusCounts"]["QUEUED"] == 5
        status, body = await server.call("DELETE", f"/api/rpc/bulk/{doomed}")
        assert (status, body) == (200, {"deleted": 5})
        view = await batch_view(server, doomed)
        assert view["statusCounts"] == {**{s: 0 for s in COUNTED}, "DELETED": 5}
        assert view["rpcIds"] == {} and view["total"] == 5
        for rpc_id in (await batch_view(server, kept))["rpcIds"].values():
            status, _ = await server.call("GET", f"/api/rpc/persistent/{rpc_id}")
            assert status == 200  # another batch's command is untouched
        status, body = await server.call("DELETE", f"/api/rpc/bulk/{doomed}")
        assert (status, body) == (200, {"deleted": 0})
        # Online now: the first device gets the other batch's command, and then a new one; the deleted never.
        fleet = await connect_fleet(server.mqtt_port, [token for _, token in devices])
        try:
            _, first, _ = await fleet[0].next_command()
            assert first["method"] == "kept"
            await bulk(server, deviceIds=[device_id for device_id, _ in devices], method="after")
            for device in fleet:  # per device in order: a deleted command still queued would come first
                _, body, _ = await device.next_command()
                assert body["method"] == "after"
            assert [[body["method"] for _, body, _ in d.commands] for d in fleet] == \
                [["kept", "after"]] + [["after"]] * 4
        finally:
            for device in fleet:
                device.close()


@pytest_twisted.ensureDeferred
async def test_bulk_requests_are_validated(database_url, tmp_path):
    async with server_on(database_url, tmp_path, rpc_bulk_max_devices=3) as server:
        devices = await provision(server, 4, "probe")
        ids = [device_id for device_id, _ in devices]
        other_tenant = await server.service.repository.create_tenant("Other")
        foreign = await provision(server, 1, "probe", tenant_id=other_tenant.id, prefix="foreign")

        async def post(body: Any, who: str = "tenant") -> tuple[int, Any]:
            return await server.call("POST", "/api/rpc/bulk", who=who, body=body)

        cases = [
            ({"method": "m"}, 400, "exactly one of 'deviceIds'"),
            ({"method": "m", "deviceIds": ids[:1], "deviceType": "probe"}, 400, "exactly one of 'deviceIds'"),
            ({"method": "m", "deviceIds": []}, 400, "non-empty list"),
            ({"method": "m", "deviceIds": ["not-a-uuid"]}, 400, "not UUIDs: not-a-uuid"),
            ({"method": "m", "deviceIds": ids}, 400, "4 devices, more than a bulk RPC may target (3"),
            ({"method": "m", "deviceType": "probe"}, 400, "More than 3 devices of type 'probe'"),
            ({"deviceIds": ids[:1]}, 400, "'method' is required"),
            ({"method": "m", "deviceIds": ids[:1], "persistent": False}, 400, "always persistent"),
            ({"method": "m", "deviceType": "nothing-of-this-type"}, 404, "No device of type"),
        ]
        for body, code, message in cases:
            status, answer = await post(body)
            assert (status, message in answer["message"]) == (code, True), (body, answer)
        missing = str(uuid4())
        status, answer = await post({"method": "m", "deviceIds": [ids[0], missing]})
        assert status == 404 and answer["notFound"] == [missing] and missing in answer["message"]
        status, answer = await post({"method": "m", "deviceIds": [ids[0], foreign[0][0]]})
        assert status == 403 and answer["forbidden"] == [foreign[0][0]]
        status, answer = await post({"method": "m", "deviceIds": ids[:1]}, who="sysadmin")
        assert status == 403
        status, answer = await server.call("POST", "/api/rpc/bulk", raw=b"{not json")
        assert status == 400
        # Refused batches are not stored: nothing was queued anywhere.
        assert await server.service.repository.count_active_rpcs() == 0
        for method, path, code in [("GET", f"/api/rpc/bulk/{uuid4()}", 404), ("GET", "/api/rpc/bulk/nope", 400),
                                   ("DELETE", f"/api/rpc/bulk/{uuid4()}", 404)]:
            status, answer = await server.call(method, path)
            assert status == code, (method, path, answer)
        status, _ = await server.call("GET", f"/api/rpc/bulk/{uuid4()}", who="sysadmin")
        assert status == 403
        status, _ = await server.call("GET", f"/api/rpc/bulk/{uuid4()}", who=None)
        assert status == 401
