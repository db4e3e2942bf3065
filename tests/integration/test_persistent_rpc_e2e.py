"""Persistent RPC end to end: stored before the reply, delivered in order, retried, resumed after a restart."""

from __future__ import annotations

from contextlib import asynccontextmanager
from uuid import uuid4

import pytest
import pytest_twisted
from twisted.internet import defer

from nanoiot.rpc.model import SubmitStrategy
from tests.fixtures.raw_mqtt import connect_raw
from tests.fixtures.server import with_timeout
from tests.fixtures.server_context import server_running

TERMINAL = {"SUCCESSFUL", "FAILED", "EXPIRED"}


@asynccontextmanager
async def online(server, token, **options):
    """The device with ``token`` connected (and subscribed to commands) for the block, disconnected after it."""
    device = await connect_raw(server.mqtt_port, token, **options)
    try:
        yield device
    finally:
        device.close()


async def persistent(server, device_id, method, kind="twoway", **extra):
    status, body = await server.call("POST", f"/api/rpc/{kind}/{device_id}",
                                     body={"method": method, "params": {"m": method}, "persistent": True,
                                           "timeout": 60000, **extra})
    assert status == 200, body
    return body["rpcId"]


async def rpc(server, rpc_id):
    status, body = await server.call("GET", f"/api/rpc/persistent/{rpc_id}")
    assert status == 200, body
    return body


async def until_status(server, rpc_id, wanted):
    """Waits on the event bus (no polling) until the command reached ``wanted``, then reads it over REST."""
    seen = defer.Deferred()

    def listener(event):
        if str(event.record.id) == rpc_id and event.record.status.value == wanted and not seen.called:
            seen.callback(None)

    unsubscribe = server.service.events.subscribe(listener)
    try:
        if (await rpc(server, rpc_id))["status"] != wanted:
            await with_timeout(seen)
        await server.service.journal.flushed()
        return await rpc(server, rpc_id)
    finally:
        unsubscribe()


@pytest_twisted.ensureDeferred
async def test_commands_queued_while_offline_are_stored_delivered_in_order_and_their_answers_kept(tmp_path):
    async with server_running(tmp_path) as server:
        device_id, token = await server.demo_device()
        ids = [await persistent(server, device_id, f"step{i}") for i in range(4)]
        first = await rpc(server, ids[0])
        assert first["status"] == "QUEUED"
        assert first["request"]["body"] == {"method": "step0", "params": '{"m":"step0"}'}
        assert first["id"] == {"entityType": "RPC", "id": ids[0]}
        assert first["createdBy"]["entityType"] == "USER"
        assert first["initiator"] == {"type": "USER", "id": first["createdBy"]["id"]}
        async with online(server, token) as device:
            for i, rpc_id in enumerate(ids):
                request_id, body, _ = await device.next_command()
                assert body["method"] == f"step{i}"
                assert (await rpc(server, rpc_id))["request"]["requestId"] == request_id
                device.answer(request_id, {"done": i})
            for i, rpc_id in enumerate(ids):
                final = await until_status(server, rpc_id, "SUCCESSFUL")
                assert final["response"] == {"done": i}
        status, page = await server.call("GET", f"/api/rpc/persistent/device/{device_id}?pageSize=10&page=0")
        assert status == 200 and page["totalElements"] == 4
        assert [r["request"]["body"]["method"] for r in page["data"]] == [f"step{i}" for i in range(4)]
        status, page = await server.call(
            "GET", f"/api/rpc/persistent/device/{device_id}?pageSize=10&page=0&rpcStatus=QUEUED")
        assert (status, page["totalElements"]) == (200, 0)
        status, body = await server.call(
            "GET", f"/api/rpc/persistent/device/{device_id}?pageSize=10&page=0&rpcStatus=DELETED")
        assert status == 400 and "DELETED" in body["message"]


@pytest_twisted.ensureDeferred
async def test_a_one_way_persistent_command_succeeds_when_the_device_acknowledges_it(tmp_path):
    async with server_running(tmp_path) as server:
        device_id, token = await server.demo_device()
        async with online(server, token) as device:
            rpc_id = await persistent(server, device_id, "blink", kind="oneway")
            await device.next_command()
            assert (await until_status(server, rpc_id, "SUCCESSFUL"))["status"] == "SUCCESSFUL"


@pytest_twisted.ensureDeferred
async def test_an_unacknowledged_command_is_resent_until_its_retries_run_out_then_fails(tmp_path):
    async with server_running(tmp_path, rpc_ack_timeout=200, rpc_max_retries=5) as server:
        device_id, token = await server.demo_device()
        async with online(server, token, auto_ack=False) as device:
            rpc_id = await persistent(server, device_id, "stubborn", retries=2)
            final = await until_status(server, rpc_id, "FAILED")
            assert "Retry attempts set: 2" in final["response"]["error"]
            sends = [c for c in device.commands if c[1]["method"] == "stubborn"]
            assert len(sends) == 3  # the first send and two retries
            assert len({request_id for request_id, _, _ in sends}) == 1  # a resend keeps its request id


@pytest.mark.parametrize("strategy", [SubmitStrategy.SEQUENTIAL_ON_ACK_FROM_DEVICE,
                                      SubmitStrategy.SEQUENTIAL_ON_RESPONSE_FROM_DEVICE])
@pytest_twisted.ensureDeferred
async def test_a_device_that_never_answers_does_not_block_the_next_command(tmp_path, strategy):
    async with server_running(tmp_path, rpc_strategy=strategy, rpc_response_timeout=300) as server:
        device_id, token = await server.demo_device()
        async with online(server, token) as device:
            silent = await persistent(server, device_id, "ignored")
            following = await persistent(server, device_id, "next")
            request_id, body, _ = await device.next_command()
            assert body["method"] == "ignored"
            # Not answered: under SEQUENTIAL_ON_RESPONSE the response timeout fails it and releases the next one.
            request_id, body, _ = await device.next_command()
            assert body["method"] == "next"
            device.answer(request_id, {"ok": True})
            assert (await until_status(server, following, "SUCCESSFUL"))["response"] == {"ok": True}
            if strategy is SubmitStrategy.SEQUENTIAL_ON_RESPONSE_FROM_DEVICE:
                assert (await until_status(server, silent, "FAILED"))["status"] == "FAILED"


@pytest_twisted.ensureDeferred
async def test_deleting_a_queued_command_cancels_it_and_the_device_never_gets_it(tmp_path):
    async with server_running(tmp_path) as server:
        device_id, token = await server.demo_device()
        doomed = await persistent(server, device_id, "doomed")
        kept = await persistent(server, device_id, "kept")
        status, body = await server.call("DELETE", f"/api/rpc/persistent/{doomed}")
        assert (status, body) == (200, None)
        status, body = await server.call("GET", f"/api/rpc/persistent/{doomed}")
        assert status == 404 and doomed in body["message"]
        status, _ = await server.call("DELETE", f"/api/rpc/persistent/{kept}", who="customer")
        assert status == 403
        async with online(server, token) as device:
            _, body, _ = await device.next_command()
            assert body["method"] == "kept"


@pytest_twisted.ensureDeferred
async def test_repeating_a_request_uuid_returns_the_same_rpc_and_the_device_gets_it_once(tmp_path):
    async with server_running(tmp_path) as server:
        device_id, token = await server.demo_device()
        request_uuid = str(uuid4())
        first = await persistent(server, device_id, "once", requestUUID=request_uuid)
        again = await persistent(server, device_id, "once", requestUUID=request_uuid)
        assert first == again == request_uuid
        async with online(server, token) as device:
            request_id, body, _ = await device.next_command()
            device.answer(request_id, {})
            await until_status(server, first, "SUCCESSFUL")
            assert [c[1]["method"] for c in device.commands] == ["once"]
            # Still the same command after it finished: not sent again.
            assert await persistent(server, device_id, "once", requestUUID=request_uuid) == request_uuid
            assert len(device.commands) == 1


@pytest_twisted.ensureDeferred
async def test_over_the_per_device_limit_a_command_is_refused_with_429_naming_the_limit(tmp_path):
    async with server_running(tmp_path, rpc_max_persistent_per_device=2) as server:
        device_id, _ = await server.demo_device()
        await persistent(server, device_id, "a")
        await persistent(server, device_id, "b")
        status, body = await server.call("POST", f"/api/rpc/twoway/{device_id}",
                                         body={"method": "c", "persistent": True})
        assert status == 429
        assert body["limit"] == "rpc-max-persistent-per-device" and body["value"] == 2


@pytest_twisted.ensureDeferred
async def test_pending_commands_survive_a_restart_and_resume_in_order(tmp_path):
    async with server_running(tmp_path) as server:
        device_id, token = await server.demo_device()
        ids = [await persistent(server, device_id, f"r{i}") for i in range(3)]
    async with server_running(tmp_path) as server, online(server, token) as device:
        for i, rpc_id in enumerate(ids):
            request_id, body, _ = await device.next_command()
            assert body["method"] == f"r{i}"
            device.answer(request_id, {"i": i})
        for rpc_id in ids:
            assert (await until_status(server, rpc_id, "SUCCESSFUL"))["status"] == "SUCCESSFUL"


@pytest_twisted.ensureDeferred
async def test_a_command_that_expires_while_offline_ends_expired(tmp_path):
    async with server_running(tmp_path) as server:
        device_id, _ = await server.demo_device()
        rpc_id = await persistent(server, device_id, "late", timeout=100)
        assert (await until_status(server, rpc_id, "EXPIRED"))["status"] == "EXPIRED"


@pytest_twisted.ensureDeferred
async def test_every_status_change_is_published_with_the_rpc_json(tmp_path):
    async with server_running(tmp_path) as server:
        events = []
        server.service.events.subscribe(lambda event: events.append(event) if event.persistent else None)
        device_id, token = await server.demo_device()
        async with online(server, token) as device:
            rpc_id = await persistent(server, device_id, "watched")
            request_id, _, _ = await device.next_command()
            device.answer(request_id, {"v": 1})
            await until_status(server, rpc_id, "SUCCESSFUL")
        mine = [e for e in events if str(e.record.id) == rpc_id]
        assert [e.type for e in mine] == ["RPC_QUEUED", "RPC_SENT", "RPC_DELIVERED", "RPC_SUCCESSFUL"]
        assert mine[-1].record.response == {"v": 1}
        assert all(e.record.user_id is not None for e in mine)


@pytest_twisted.ensureDeferred
async def test_persistent_reads_follow_the_access_rules_of_sending(tmp_path):
    async with server_running(tmp_path) as server:
        device_id, _ = await server.demo_device()
        customer_device_id, _ = await server.demo_device("Customer Device")
        tenant_rpc = await persistent(server, device_id, "t")
        customer_rpc = await persistent(server, customer_device_id, "c")
        assert (await server.call("GET", f"/api/rpc/persistent/{tenant_rpc}", who="customer"))[0] == 403
        assert (await server.call("GET", f"/api/rpc/persistent/{customer_rpc}", who="customer"))[0] == 200
        assert (await server.call("GET", f"/api/rpc/persistent/{tenant_rpc}", who="sysadmin"))[0] == 403
        assert (await server.call("GET", f"/api/rpc/persistent/{uuid4()}"))[0] == 404
        assert (await server.call("GET", "/api/rpc/persistent/not-a-uuid"))[0] == 400
