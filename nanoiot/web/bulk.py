"""Bulk RPC over REST: ``POST /api/rpc/bulk``, ``GET``/``DELETE /api/rpc/bulk/{batchId}``.

A thin edge over :class:`nanoiot.commands.bulk.BulkRpc`: parse and validate, call the use case, render JSON.
"""

from __future__ import annotations

from typing import Any

from nanoiot.commands.bulk import BatchStatus, BulkRpc, parse_bulk_request
from nanoiot.errors import ServiceUnavailable
from nanoiot.persistence.records import Authority
from nanoiot.web.access import require_authority
from nanoiot.web.context import WebContext
from nanoiot.web.routing import ApiRequest, Router
from nanoiot.web.rpc import initiator_of
from nanoiot.validation import text, uuid_param


class BulkApi:
    def __init__(self, context: WebContext) -> None:
        self.context = context

    def register(self, router: Router) -> None:
        router.add("POST", "/api/rpc/bulk", self.send)
        router.add("GET", "/api/rpc/bulk/{batchId}", self.get)
        router.add("DELETE", "/api/rpc/bulk/{batchId}", self.delete)

    @property
    def bulk(self) -> BulkRpc:
        bulk = getattr(self.context, "bulk", None)
        if bulk is None:
            raise ServiceUnavailable("Bulk RPC is not available on this server")
        return bulk

    async def send(self, request: ApiRequest) -> dict[str, Any]:
        initiator = initiator_of(request.user)  # a system administrator commands no device: 403
        config = self.context.config
        raw = request.json_body()
        if isinstance(raw, dict):
            text("deviceType", raw.get("deviceType"))  # the rest as parse_bulk_request checks it
        parsed = parse_bulk_request(raw, request.now(), config.rpc_default_timeout,
                                    config.rpc_min_timeout, config.rpc_bulk_max_devices)
        batch = await self.bulk.start(initiator, parsed)
        return {"batchId": str(batch.id), "total": batch.total}

    async def get(self, request: ApiRequest) -> dict[str, Any]:
        require_authority(request.user, Authority.TENANT_ADMIN, Authority.CUSTOMER_USER)
        batch_id = uuid_param("batchId", request.params["batchId"])
        with_rpc_ids = (request.query("rpcIds") or "true").lower() != "false"
        return batch_status_json(await self.bulk.status(initiator_of(request.user), batch_id, with_rpc_ids))

    async def delete(self, request: ApiRequest) -> dict[str, Any]:
        require_authority(request.user, Authority.TENANT_ADMIN)
        batch_id = uuid_param("batchId", request.params["batchId"])
        return {"deleted": await self.bulk.delete(initiator_of(request.user), batch_id)}


def batch_status_json(status: BatchStatus) -> dict[str, Any]:
    batch = status.batch
    return {
        "batchId": str(batch.id),
        "createdTime": batch.created_time,
        "total": batch.total,
        "statusCounts": status.status_counts,
        "rpcIds": {str(device_id): str(rpc_id) for device_id, rpc_id in status.rpc_ids.items()},
        "initiator": batch.initiator,
        "request": batch.request,
        "queueing": status.queueing,
        "notYetQueued": status.not_yet_queued,
        "rejected": {str(device_id): reason for device_id, reason in status.rejected.items()},
        "rejectedCount": status.rejected_count,
    }
