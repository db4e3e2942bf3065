"""Server-side RPC over REST: ThingsBoard's v1 (``/api/plugins/rpc``) and v2 (``/api/rpc``) endpoints.

Status codes follow ThingsBoard exactly; on a failure we also say which failure it was in a JSON body, since an
empty 504 is the first thing its users complain about.
"""

from __future__ import annotations

from typing import Any

from nanoiot.actors import messages as m
from nanoiot.errors import ErrorCode, NotFound
from nanoiot.rpc.body import parse_rpc_body
from nanoiot.rpc.model import RpcCommand, RpcFailure, RpcResult
from nanoiot.actors.device import NonJsonResponse
from nanoiot.web.access import check_device_access, parse_uuid
from nanoiot.web.context import WebContext
from nanoiot.web.routing import NO_BODY, ApiRequest, Response, Router

KINDS = ("oneway", "twoway")


class RpcApi:
    def __init__(self, context: WebContext) -> None:
        self.context = context

    def register(self, router: Router) -> None:
        router.add("POST", "/api/rpc/{kind}/{deviceId}", self.send_v2)
        router.add("POST", "/api/plugins/rpc/{kind}/{deviceId}", self.send_v1)

    async def send_v1(self, request: ApiRequest) -> Response:
        return await self._send(request, v1=True)

    async def send_v2(self, request: ApiRequest) -> Response:
        return await self._send(request, v1=False)

    async def _send(self, request: ApiRequest, v1: bool) -> Response:
        kind = request.params["kind"]
        if kind not in KINDS:
            raise NotFound(f"Unknown RPC type '{kind}': use oneway or twoway")
        device_id = parse_uuid(request.params["deviceId"])
        config = self.context.config
        now = request.now()
        body = parse_rpc_body(request.json_body(), now, config.rpc_default_timeout, config.rpc_min_timeout)
        device = check_device_access(request.user, await self.context.catalog.get_device(device_id))
        if body.persistent:
            from nanoiot.errors import BadRequest

            raise BadRequest("Persistent RPC is not available in this version of NanoIoT")
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
        result: RpcResult = await message.reply
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
