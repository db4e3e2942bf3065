"""Server-side RPC over REST: ThingsBoard's v1 (``/api/plugins/rpc``) and v2 (``/api/rpc``) endpoints.

Status codes follow ThingsBoard exactly; on a failure we also say which failure it was in a JSON body, since an
empty 504 is the first thing its users complain about.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from uuid import UUID

from twisted.internet.defer import Deferred, ensureDeferred

from nanoiot.actors import messages as m
from nanoiot.errors import Conflict, ErrorCode, InvalidArguments, NotFound, PermissionDenied
from nanoiot.events import RpcStatusEvent
from nanoiot.persistence.records import Authority, Device, RpcRecord, RpcStatus
from nanoiot.rpc.body import RpcBody, parse_rpc_body
from nanoiot.rpc.model import RpcCommand, RpcFailure, RpcResult
from nanoiot.actors.device import NonJsonResponse
from nanoiot.web.access import check_device_access, parse_uuid, require_authority
from nanoiot.web.paging import page_link
from nanoiot.web.shapes import page_json, rpc_json
from nanoiot.web.context import WebContext
from nanoiot.web.routing import NO_BODY, ApiRequest, Response, Router

KINDS = ("oneway", "twoway")
RPC_SORTS = ("createdTime", "expirationTime", "request", "response")


class RpcApi:
    def __init__(self, context: WebContext) -> None:
        self.context = context

    def register(self, router: Router) -> None:
        router.add("POST", "/api/rpc/{kind}/{deviceId}", self.send_v2)
        router.add("POST", "/api/plugins/rpc/{kind}/{deviceId}", self.send_v1)
        router.add("GET", "/api/rpc/persistent/{rpcId}", self.get_persistent)
        router.add("DELETE", "/api/rpc/persistent/{rpcId}", self.delete_persistent)
        router.add("GET", "/api/rpc/persistent/device/{deviceId}", self.list_persistent)

    # --- persistent RPCs ------------------------------------------------------------------------------------------

    async def _persistent(self, request: ApiRequest) -> tuple[RpcRecord, Device]:
        require_authority(request.user, Authority.TENANT_ADMIN, Authority.CUSTOMER_USER)
        rpc_id = parse_uuid(request.params["rpcId"])
        record = await self.context.repository.get_rpc(rpc_id)
        if record is None:
            raise NotFound(f"Rpc with id [{rpc_id}] is not found")
        device = await self.context.catalog.get_device(record.device_id)
        if device is None or device.tenant_id != request.user.tenant_id:
            raise NotFound(f"Rpc with id [{rpc_id}] is not found") if device is None else PermissionDenied()
        # Access as for sending: a customer user reaches its own customer's devices only.
        check_device_access(request.user, device)
        return record, device

    async def get_persistent(self, request: ApiRequest) -> dict[str, Any]:
        record, _ = await self._persistent(request)
        return rpc_json(record)

    async def delete_persistent(self, request: ApiRequest) -> Response:
        require_authority(request.user, Authority.TENANT_ADMIN)
        record, device = await self._persistent(request)
        cancelled = False
        if not record.status.is_terminal:
            message = m.DeleteRpc(record.id)
            self.context.directory.tell(device, message)
            cancelled = await message.reply
        if cancelled:
            # The actor removed it from the queue and journalled the deletion; answer once that is durable.
            await self.context.journal.flushed()
        else:
            await self.context.repository.delete_rpc(record.id)
            self.context.publish(RpcStatusEvent(replace(record, status=RpcStatus.DELETED), True))
        return Response(body=NO_BODY)

    async def list_persistent(self, request: ApiRequest) -> dict[str, Any]:
        require_authority(request.user, Authority.TENANT_ADMIN, Authority.CUSTOMER_USER)
        device_id = parse_uuid(request.params["deviceId"])
        device = check_device_access(request.user, await self.context.catalog.get_device(device_id))
        status = None
        raw_status = request.query("rpcStatus")
        if raw_status:
            try:
                status = RpcStatus(raw_status.upper())
            except ValueError:
                names = ", ".join(s.value for s in RpcStatus if s is not RpcStatus.DELETED)
                raise InvalidArguments(f"Invalid rpcStatus '{raw_status}': use one of {names}") from None
            if status is RpcStatus.DELETED:
                raise InvalidArguments("RPCs with status DELETED are not kept: they cannot be listed")
        link = page_link(request, RPC_SORTS)
        page = await self.context.repository.list_device_rpcs(device.id, link, status)
        return page_json(page, rpc_json)

    def send_v1(self, request: ApiRequest) -> Deferred:
        return self._send(request, v1=True)

    def send_v2(self, request: ApiRequest) -> Deferred:
        return self._send(request, v1=False)

    def _send(self, request: ApiRequest, v1: bool) -> Deferred:
        # The hot path of the REST API: plain calls and one Deferred (the actor's reply) while the device is in
        # memory; a coroutine only when the database has to be asked (BENCHMARKS.md, "RPC through REST").
        kind = request.params["kind"]
        if kind not in KINDS:
            raise NotFound(f"Unknown RPC type '{kind}': use oneway or twoway")
        device_id = parse_uuid(request.params["deviceId"])
        config = self.context.config
        now = request.now()
        raw = request.json_body()
        body = parse_rpc_body(raw, now, config.rpc_default_timeout, config.rpc_min_timeout)
        device = self.context.catalog.cached_device(device_id)
        idempotent = body.persistent and isinstance(raw.get("requestUUID"), str)
        if device is None or idempotent:
            return ensureDeferred(self._send_after_lookup(request, v1, kind, device_id, body, idempotent, now))
        return self._submit(request, v1, kind, check_device_access(request.user, device), body, now)

    async def _send_after_lookup(self, request: ApiRequest, v1: bool, kind: str, device_id: UUID, body: RpcBody,
                                 idempotent: bool, now: int) -> Response:
        device = check_device_access(request.user, await self.context.catalog.get_device(device_id))
        if idempotent:
            known = await self.context.repository.get_rpc(body.request_uuid)
            if known is not None:
                # The same requestUUID again: the command is already held; it is not sent twice.
                if known.device_id != device.id:
                    raise Conflict(f"requestUUID {body.request_uuid} is already used by another command")
                return Response(body={"rpcId": str(known.id)})
        return await self._submit(request, v1, kind, device, body, now)

    def _submit(self, request: ApiRequest, v1: bool, kind: str, device: Device, body: RpcBody,
                now: int) -> Deferred:
        command = RpcCommand(
            rpc_id=body.request_uuid,
            tenant_id=device.tenant_id,
            device_id=device.id,
            method=body.method,
            params=body.params,
            oneway=kind == "oneway",
            expiration_time=body.expiration_time,
            created_time=now,
            persistent=body.persistent,
            retries=body.retries,
            additional_info=body.additional_info,
            qos=body.qos,
            user_id=request.user.user_id,
        )
        message = m.SubmitRpc(command)
        self.context.directory.tell(device, message)
        return message.reply.addCallback(self._answer, request, command, v1)

    def _answer(self, result: RpcResult, request: ApiRequest, command: RpcCommand, v1: bool) -> Response:
        if command.persistent and result.ok:
            return Response(body=result.response)
        return self._render(request, command, result, v1)

    def _render(self, request: ApiRequest, command: RpcCommand, result: RpcResult, v1: bool) -> Response:
        if result.ok:
            response = result.response
            if command.oneway or not result.has_response or response is None:
                return Response(body=NO_BODY)
            if isinstance(response, NonJsonResponse):
                if response == "":
                    return Response(body=NO_BODY)
                return Response(406, self._error_body(
                    request, 406, "Device answered with a payload that is not JSON", "NON_JSON_RESPONSE",
                    ErrorCode.BAD_REQUEST_PARAMS, response=str(response)))
            return Response(body=response)
        failure = result.failure
        assert failure is not None
        if failure is RpcFailure.REJECTED:
            details = result.response or {}
            return Response(429, self._error_body(
                request, 429, f"Too many pending commands for this device (limit {details.get('value')})",
                failure.value, ErrorCode.TOO_MANY_REQUESTS, limit=details.get("limit"), value=details.get("value")))
        if v1:
            status = 409 if failure is RpcFailure.DEVICE_OFFLINE else 408
        else:
            status = 504
        return Response(status, self._error_body(request, status, failure.description, failure.value,
                                                 ErrorCode.GENERAL, rpcId=str(command.rpc_id)))

    @staticmethod
    def _error_body(request: ApiRequest, status: int, message: str, rpc_error: str, code: ErrorCode,
                    **extra: Any) -> dict[str, Any]:
        body = {"status": status, "message": message, "errorCode": int(code), "rpcError": rpc_error,
                "timestamp": request.now()}
        body.update(extra)
        return body
