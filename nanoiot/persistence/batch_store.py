"""Bulk RPC's rows: one ``rpc_batch`` row per batch, its commands' statuses counted by ``rpc.batch_id``, and the
devices a batch may target (by id, or every device of a type the caller may see).

Built on :meth:`Repository._run` like every other query (``def thd(conn)``, one transaction, on the repository's
thread pool); the commands themselves are written by the device actors' journal, never here, except for the
batched deletion of a batch's unfinished commands after their actors dropped them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from sqlalchemy import Connection, delete, func, insert, select
from twisted.internet.defer import Deferred, succeed

from nanoiot.persistence.records import Device, RpcRecord, RpcStatus
from nanoiot.persistence.repository import (
    ACTIVE_RPC_STATUSES,
    Repository,
    _as_uuid,
    _device,
    _driver_sql,
    _dump,
    _load,
    _rpc,
    _uuid_key,
)
from nanoiot.persistence.schema import device as devices
from nanoiot.persistence.schema import rpc as rpcs
from nanoiot.persistence.schema import rpc_batch as batches

#: Ids per ``IN (...)`` list: well under SQLite's bound-parameter limit, and PostgreSQL plans them just as well.
IN_CHUNK = 900


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """One bulk RPC as stored: ``request`` is the command it sends (JSON), ``initiator`` who sent it (JSON:
    ``{"type": "USER", "id", "customerId"}``; ``customerId`` set for a customer user, who sees only its own)."""

    id: UUID
    created_time: int
    tenant_id: UUID
    total: int
    request: Any
    initiator: Any


@dataclass(frozen=True, slots=True)
class BatchSnapshot:
    """A batch and its commands as one transaction saw them: counts by status, and device id -> rpc id."""

    batch: BatchRecord
    status_counts: dict[RpcStatus, int]
    rpc_ids: dict[UUID, UUID]


def _chunks(values: Sequence[Any], size: int = IN_CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start:start + size]


def _batch(row: Any) -> BatchRecord:
    return BatchRecord(row.id, row.created_time, row.tenant_id, row.total, _load(row.request), _load(row.initiator))


class BatchStore:
    def __init__(self, repository: Repository) -> None:
        self.repository = repository

    # --- batches --------------------------------------------------------------------------------------------------

    def insert_batch(self, batch: BatchRecord) -> Deferred[BatchRecord]:
        def thd(conn: Connection) -> BatchRecord:
            conn.execute(insert(batches).values(
                id=batch.id, created_time=batch.created_time, tenant_id=batch.tenant_id, total=batch.total,
                request=_dump(batch.request), initiator=_dump(batch.initiator)))
            return batch

        return self.repository._run(thd)

    def get_batch(self, batch_id: UUID) -> Deferred[BatchRecord | None]:
        def thd(conn: Connection) -> BatchRecord | None:
            row = conn.execute(select(batches).where(batches.c.id == batch_id)).first()
            return _batch(row) if row else None

        return self.repository._run(thd)

    def snapshot(self, batch_id: UUID, with_rpc_ids: bool = True) -> Deferred[BatchSnapshot | None]:
        """The batch, its commands counted by status (``GROUP BY`` on the ``batch_id`` index) and, unless
        ``with_rpc_ids`` is False, which command each device got; None for an unknown batch. A deleted command
        has no row: it is in neither."""

        def thd(conn: Connection) -> BatchSnapshot | None:
            row = conn.execute(select(batches).where(batches.c.id == batch_id)).first()
            if row is None:
                return None
            counts = {RpcStatus(status): count for status, count in conn.execute(
                select(rpcs.c.status, func.count()).where(rpcs.c.batch_id == batch_id).group_by(rpcs.c.status))}
            ids: dict[UUID, UUID] = {}
            if with_rpc_ids:
                ids = {device_id: rpc_id for device_id, rpc_id in conn.execute(
                    select(rpcs.c.device_id, rpcs.c.id).where(rpcs.c.batch_id == batch_id).order_by(rpcs.c.seq))}
            return BatchSnapshot(_batch(row), counts, ids)

        return self.repository._run(thd)

    # --- the batch's commands -------------------------------------------------------------------------------------

    def unfinished_rpcs(self, batch_id: UUID) -> Deferred[list[RpcRecord]]:
        """The batch's commands not yet in a terminal status (QUEUED, SENT, DELIVERED, TIMEOUT)."""
        wanted = [s.value for s in ACTIVE_RPC_STATUSES]

        def thd(conn: Connection) -> list[RpcRecord]:
            query = select(rpcs).where(rpcs.c.batch_id == batch_id, rpcs.c.status.in_(wanted)).order_by(rpcs.c.seq)
            return [_rpc(row) for row in conn.execute(query)]

        return self.repository._run(thd)

    def delete_rpcs(self, rpc_ids: Sequence[UUID]) -> Deferred[int]:
        """Delete these commands in one transaction; returns how many rows went."""
        wanted = list(rpc_ids)
        if not wanted:
            return succeed(0)

        def thd(conn: Connection) -> int:
            return sum(conn.execute(delete(rpcs).where(rpcs.c.id.in_(chunk))).rowcount for chunk in _chunks(wanted))

        return self.repository._run(thd)

    # --- target devices -------------------------------------------------------------------------------------------

    def devices_by_ids(self, device_ids: Sequence[UUID]) -> Deferred[dict[UUID, Device]]:
        """The devices that exist among ``device_ids``, whoever owns them (the caller tells foreign from missing),
        in one transaction."""
        wanted = list(device_ids)
        if not wanted:
            return succeed({})

        def thd(conn: Connection) -> dict[UUID, Device]:
            found: dict[UUID, Device] = {}
            for chunk in _chunks(wanted):
                for row in conn.execute(select(devices).where(devices.c.id.in_(chunk))):
                    found[row.id] = _device(row)
            return found

        return self.repository._run(thd)

    def devices_of_type(self, tenant_id: UUID, device_type: str, customer_id: UUID | None = None,
                        limit: int | None = None) -> Deferred[list[Device]]:
        """Every device of ``device_type`` in the tenant (only ``customer_id``'s when given), oldest first; at most
        ``limit`` of them (ask for one more than allowed to learn that there are too many)."""

        def thd(conn: Connection) -> list[Device]:
            return _devices_of_type(conn, tenant_id, device_type, customer_id, limit)

        return self.repository._run(thd)


def _devices_of_type(conn: Connection, tenant_id: UUID, device_type: str, customer_id: UUID | None,
                     limit: int | None) -> list[Device]:
    """The query on the driver's cursor, rows straight to ``Device``: through SQLAlchemy's rows (a result
    processor per column, a Row per device) it was 17 % of the database thread while bulk RPCs were being queued
    (bench/throughput.py --channels bulk, one device per command)."""
    key = _uuid_key(conn)
    sql = (f"SELECT id, created_time, tenant_id, customer_id, name, type, label, additional_info, version "
           f"FROM {devices.name} WHERE tenant_id = ? AND type = ?")
    params: list[Any] = [key(tenant_id), device_type]
    if customer_id is not None:
        sql += " AND customer_id = ?"
        params.append(key(customer_id))
    sql += " ORDER BY created_time, id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    rows = conn.exec_driver_sql(_driver_sql(conn, sql), tuple(params)).fetchall()
    # A type's devices mostly share their tenant and customer: one UUID object each.
    shared: dict[Any, UUID] = {}

    def as_uuid(value: Any) -> UUID:
        found = shared.get(value)
        if found is None:
            found = shared[value] = _as_uuid(value)
        return found

    return [Device(_as_uuid(row[0]), row[1], as_uuid(row[2]), as_uuid(row[3]), row[4], row[5], row[6],
                   _load(row[7]), row[8]) for row in rows]
