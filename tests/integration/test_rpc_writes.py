"""The journal's RPC writes go to the driver as plain tuples (no SQLAlchemy parameter processing): every column
must still round-trip on SQLite (CHAR(32) ids, 0/1 booleans) and PostgreSQL (native uuid, boolean)."""

from __future__ import annotations

from uuid import uuid4

import pytest_twisted

from nanoiot.persistence.records import RpcRecord, RpcStatus
from nanoiot.persistence.repository import PG_INSERT_PAGE, UNCHANGED

T0 = 1_700_000_000_000


def full_record(tenant_id, device_id, oneway: bool, **fields) -> RpcRecord:
    return RpcRecord(uuid4(), T0, tenant_id, device_id, T0 + 60_000, oneway, "set%Value",
                     {"pin": 7, "text": "50 % ünïcode \u0000", "nested": [1, None, True]}, RpcStatus.QUEUED,
                     fields.pop("response", None), {"note": "x"}, 3, uuid4(), 0, 0,
                     {"type": "BULK", "id": "x"}, uuid4(), **fields)


@pytest_twisted.ensureDeferred
async def test_inserted_rows_read_back_with_every_column(repository):
    tenant = await repository.create_tenant("t")
    device, _ = await repository.create_device(tenant.id, "d")
    bare = RpcRecord(uuid4(), T0, tenant.id, device.id, T0 + 1, True, "m", None, RpcStatus.SENT)
    records = [full_record(tenant.id, device.id, False), full_record(tenant.id, device.id, True, response=[1]),
               bare]
    stored = await repository.insert_rpcs(records)
    assert [r.seq for r in stored] == sorted(r.seq for r in stored) and all(r.seq for r in stored)
    for record in stored:
        assert await repository.get_rpc(record.id) == record


@pytest_twisted.ensureDeferred
async def test_rows_sharing_their_json_and_ids_read_back_each_with_its_own_values(repository):
    """A bulk RPC's commands share one params, origin, tenant and batch object, converted once per object (by
    identity): a record with other values in between keeps its own."""
    tenant = await repository.create_tenant("t")
    device, _ = await repository.create_device(tenant.id, "d")
    params, origin, batch = {"pin": 7}, {"type": "BULK", "batchId": "b"}, uuid4()
    shared = [RpcRecord(uuid4(), T0, tenant.id, device.id, T0 + 1, True, "m", params, RpcStatus.SENT,
                        initiator=origin, batch_id=batch) for _ in range(3)]
    other = RpcRecord(uuid4(), T0, tenant.id, device.id, T0 + 1, True, "m", {"pin": 8}, RpcStatus.QUEUED,
                      additional_info=params, initiator={"type": "USER", "id": "u"}, batch_id=uuid4())
    stored = await repository.insert_rpcs([shared[0], other, *shared[1:]])
    for record in stored:
        assert await repository.get_rpc(record.id) == record


@pytest_twisted.ensureDeferred
async def test_changes_of_one_rpc_fold_into_its_last_status_with_the_response_and_attempts_they_carried(repository):
    tenant = await repository.create_tenant("t")
    device, _ = await repository.create_device(tenant.id, "d")
    one, two, three = await repository.insert_rpcs([full_record(tenant.id, device.id, False) for _ in range(3)])
    await repository.write_rpc_batch([], [
        (one.id, RpcStatus.SENT, UNCHANGED, None, None),
        (two.id, RpcStatus.SENT, UNCHANGED, None, None),
        (one.id, RpcStatus.TIMEOUT, UNCHANGED, None, 1),
        (one.id, RpcStatus.SENT, UNCHANGED, None, None),
        (one.id, RpcStatus.DELIVERED, UNCHANGED, None, None),
        (one.id, RpcStatus.SUCCESSFUL, {"answer": "50 %"}, None, None),
        (two.id, RpcStatus.FAILED, None, 0, None),
        (three.id, RpcStatus.DELIVERED, UNCHANGED, None, None),
    ], [])
    first, second, third = [await repository.get_rpc(r.id) for r in (one, two, three)]
    assert (first.status, first.response, first.attempts, first.retries) == (
        RpcStatus.SUCCESSFUL, {"answer": "50 %"}, 1, 3)
    assert (second.status, second.response, second.attempts, second.retries) == (RpcStatus.FAILED, None, 0, 0)
    assert (third.status, third.response, third.params) == (RpcStatus.DELIVERED, None, three.params)


@pytest_twisted.ensureDeferred
async def test_a_change_of_an_rpc_inserted_in_the_same_batch_is_written_with_its_insert(repository):
    tenant = await repository.create_tenant("t")
    device, _ = await repository.create_device(tenant.id, "d")
    (older,) = await repository.insert_rpcs([full_record(tenant.id, device.id, False)])
    new, deleted = full_record(tenant.id, device.id, False), full_record(tenant.id, device.id, True)
    stored = await repository.write_rpc_batch([new, deleted], [
        (new.id, RpcStatus.SENT, UNCHANGED, None, None),
        (older.id, RpcStatus.DELIVERED, UNCHANGED, None, None),
        (new.id, RpcStatus.TIMEOUT, UNCHANGED, None, 2),
        (new.id, RpcStatus.FAILED, {"error": "no answer"}, None, None),
        (deleted.id, RpcStatus.SENT, UNCHANGED, None, None),
    ], [deleted.id])
    assert [r.status for r in stored] == [RpcStatus.FAILED, RpcStatus.SENT]
    row = await repository.get_rpc(new.id)
    assert (row.status, row.response, row.attempts, row.retries, row.params) == (
        RpcStatus.FAILED, {"error": "no answer"}, 2, 3, new.params)
    assert (await repository.get_rpc(older.id)).status is RpcStatus.DELIVERED
    assert await repository.get_rpc(deleted.id) is None


@pytest_twisted.ensureDeferred
async def test_more_rows_than_one_insert_page_are_all_stored_in_order(repository):
    tenant = await repository.create_tenant("t")
    device, _ = await repository.create_device(tenant.id, "d")
    count = PG_INSERT_PAGE * 2 + 1
    records = [RpcRecord(uuid4(), T0 + i, tenant.id, device.id, T0 + 60_000, True, f"m{i}", {"i": i},
                         RpcStatus.QUEUED) for i in range(count)]
    stored = await repository.insert_rpcs(records)
    assert await repository.count_active_rpcs(device.id) == count
    for record in (stored[0], stored[PG_INSERT_PAGE], stored[-1]):
        assert await repository.get_rpc(record.id) == record


@pytest_twisted.ensureDeferred
async def test_the_sqlite_page_cache_is_the_configured_bound(tmp_path):
    from nanoiot.persistence.repository import Repository

    repository = Repository(f"sqlite:///{tmp_path / 'cache.db'}", sqlite_cache_mb=8)
    await repository.start()
    try:
        with repository._engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA cache_size").scalar() == -8 * 1024
    finally:
        await repository.stop()
