"""One tenant's bad input never fails another tenant's commands (issue 11), on SQLite and on PostgreSQL.

Found when the server was probed: a persistent RPC from tenant B with ``"expirationTime": 2**63`` joined the
journal's batch, the batch failed, and tenant A's submits in the same moments got 500 (209 of 400 on SQLite), while
status changes of commands A's device had acknowledged were dropped (and redelivered after a restart). Now B's
out-of-range values are a 400 at the edge, and a row the database still refuses fails only its own write.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from uuid import UUID, uuid4

import pytest_twisted
from twisted.internet import defer, reactor

from nanoiot.commands.events import RpcStatusChanged
from nanoiot.passwords import hash_password
from nanoiot.persistence.errors import RowRefused
from nanoiot.persistence.journal import RpcJournal
from nanoiot.persistence.records import NULL_UUID, Authority, RpcRecord, RpcStatus
from tests.fixtures.raw_mqtt import connect_raw
from tests.fixtures.server import make_config, start_server, with_timeout

COMMANDS = 30
BEYOND_BIGINT = 2**63
DEEP: Any = []
for _ in range(40):
    DEEP = [DEEP]


def rpc_record(tenant_id: Any, device_id: Any, status: RpcStatus = RpcStatus.QUEUED, **fields: Any) -> RpcRecord:
    values = dict(expiration_time=2_000_000_000_000, oneway=False, method="m", params={"p": 1})
    values.update(fields)
    return RpcRecord(uuid4(), 1_700_000_000_000, tenant_id, device_id, status=status, **values)  # type: ignore


async def settled(ds: list[defer.Deferred]) -> list[Any]:
    """Each Deferred's result or Failure (none left unhandled)."""
    return [value for _, value in await defer.DeferredList(ds, consumeErrors=True)]


@pytest_twisted.ensureDeferred
async def test_a_row_the_database_refuses_fails_only_its_own_write_and_the_rest_of_its_batch_is_stored(repository):
    tenant_a, tenant_b, device_a, device_b = uuid4(), uuid4(), uuid4(), uuid4()
    acknowledged = [rpc_record(tenant_a, device_a, RpcStatus.SENT) for _ in range(3)]
    await repository.insert_rpcs(acknowledged)
    journal = RpcJournal(repository, reactor)
    new_a = [rpc_record(tenant_a, device_a) for _ in range(5)]
    beyond = rpc_record(tenant_b, device_b, expiration_time=BEYOND_BIGINT)  # no BIGINT holds it
    duplicate = replace(rpc_record(tenant_b, device_b), id=acknowledged[0].id)  # a primary key already taken
    # Everything recorded in one reactor turn: one batch, as under load.
    waiters = [journal.insert(new_a[0]), journal.insert(beyond), journal.insert(new_a[1])]
    waiters += [journal.change(r.id, RpcStatus.DELIVERED) for r in acknowledged]
    waiters += [journal.insert(duplicate), journal.change(beyond.id, RpcStatus.SENT)]
    waiters += [journal.insert(r) for r in new_a[2:]]
    outcomes = await settled(waiters)
    failed = [i for i, value in enumerate(outcomes) if value is not None]
    assert failed == [1, 6, 7], outcomes  # beyond, duplicate and beyond's own later change: nothing else
    assert all(outcomes[i].check(RowRefused) and outcomes[i].value.http_status == 400 for i in failed)
    assert "SQL" not in outcomes[1].value.message and "INSERT" not in outcomes[1].value.message
    for r in new_a:
        assert (await repository.get_rpc(r.id)).status is RpcStatus.QUEUED
    for r in acknowledged:
        assert (await repository.get_rpc(r.id)).status is RpcStatus.DELIVERED  # no acknowledged change dropped
    assert await repository.get_rpc(beyond.id) is None
    assert journal.pending == 0


async def second_tenant(server: Any) -> str:
    """Tenant B, its administrator (log in as "tenantb") and one device of its own; returns the device id."""
    repository = server.service.repository
    tenant = await repository.create_tenant("Tenant B")
    await repository.create_user("tenantb@nanoiot.io", await hash_password("tenantb"), Authority.TENANT_ADMIN,
                                 tenant.id, NULL_UUID)
    device, _ = await server.service.catalog.create_device(tenant.id, "B's device")
    return str(device.id)


@pytest_twisted.ensureDeferred
async def test_two_tenants_at_once_one_with_out_of_range_values_the_other_never_refused_nothing_lost(
        database_url, tmp_path):
    server = await start_server(make_config(database_url, jwt_key_file=str(tmp_path / "k"), rpc_ack_timeout=30000))
    try:
        a_device, a_token = await server.demo_device()
        b_device = await second_tenant(server)
        for who in ("tenant", "tenantb"):
            await server.jwt(who)  # logged in before the burst (logins are throttled)
        service = server.service
        device = await connect_raw(server.mqtt_port, a_token)

        async def answer_every_command() -> None:
            for _ in range(COMMANDS):
                request_id, body, _ = await device.next_command()
                device.answer(request_id, {"done": body["method"]})

        # Beyond the edge: every status change of A's commands shares the journal's batch with a row the database
        # refuses (as a value the edge did not catch would), recorded in the same reactor turn.
        refused_rows: list[defer.Deferred] = []
        a_ids: set[str] = set()
        successful: set[str] = set()
        all_done: defer.Deferred = defer.Deferred()

        def on_change(event: Any) -> None:
            if str(event.record.device_id) != a_device:
                return
            refused_rows.append(service.journal.insert(rpc_record(event.record.tenant_id, event.record.device_id,
                                                                  expiration_time=BEYOND_BIGINT)))
            if event.record.status is RpcStatus.SUCCESSFUL:
                successful.add(str(event.record.id))
                if len(successful) == COMMANDS and not all_done.called:
                    all_done.callback(None)

        unsubscribe = service.events.subscribe(on_change, (RpcStatusChanged,))
        answering = defer.ensureDeferred(answer_every_command())
        a_calls = [defer.ensureDeferred(server.call("POST", f"/api/rpc/twoway/{a_device}", body={
            "method": f"a{i}", "params": {"i": i}, "persistent": True, "timeout": 60000})) for i in range(COMMANDS)]
        bad_fields = [{"expirationTime": BEYOND_BIGINT}, {"retries": BEYOND_BIGINT}, {"timeout": 2**70},
                      {"method": "b" * 300}, {"params": {"deep": DEEP}}]
        b_calls = [defer.ensureDeferred(server.call("POST", f"/api/rpc/twoway/{b_device}", who="tenantb", body={
            "method": "b", "persistent": True, "timeout": 60000, **bad_fields[i % len(bad_fields)]}))
            for i in range(COMMANDS)]
        a_results = await defer.gatherResults(a_calls)
        b_results = await defer.gatherResults(b_calls)
        # A: never refused, every command stored before its rpcId was returned.
        assert [status for status, _ in a_results] == [200] * COMMANDS, a_results
        a_ids.update(body["rpcId"] for _, body in a_results)
        # B: refused at the edge, each answer naming the field.
        for i, (status, body) in enumerate(b_results):
            named = next(iter(bad_fields[i % len(bad_fields)]))
            assert status == 400 and named in body["message"], (status, body)
        await with_timeout(answering, 30)
        await with_timeout(all_done, 30)
        unsubscribe()
        await service.journal.flushed()
        assert successful == a_ids
        outcomes = await settled(refused_rows)
        assert refused_rows and all(o is not None and o.check(RowRefused) for o in outcomes)
        # Nothing acknowledged was lost: every command is stored as answered, none is left for a restart to resend.
        for rpc_id in a_ids:
            stored = await service.repository.get_rpc(UUID(rpc_id))
            assert stored.status is RpcStatus.SUCCESSFUL and stored.response == {"done": stored.method}
        assert await service.repository.count_active_rpcs(device_id=UUID(a_device)) == 0
        device.close()
    finally:
        await server.service.stopService()
