"""Server-side RPC over REST: ThingsBoard's v1 (``/api/plugins/rpc``) and v2 (``/api/rpc``) endpoints.

A thin edge over the command service: parse and validate the request, call the service, render its outcome in
ThingsBoard's status codes (``commands.outcomes``: on a failure we also say which failure it was in a JSON body,
since an empty 504 is the first thing its users complain about).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from twisted.internet.defer import Deferred

from nanoiot.commands.outcomes import NO_ANSWER, answer_of, failure_error
from nanoiot.commands.service import Initiator
from nanoiot.errors import InvalidArguments, NotFound, PermissionDenied
from nanoiot.persistence.records import Authority, RpcStatus
from nanoiot.rpc.body import parse_rpc_body
from nanoiot.rpc.model import RpcResult
from nanoiot.web.access import SYSADMIN_DENIED, require_authority
from nanoiot.web.context import WebContext
from nanoiot.web.paging import page_link
from nanoiot.web.routing import NO_BODY, ApiRequest, Response, Router
from nanoiot.web.shapes import page_json, rpc_json
from nanoiot.web.tokens import Principal
from nanoiot.validation import shown, uuid_param

KINDS = ("oneway", "twoway")
RPC_SORTS = ("createdTime", "expirationTime", "request", "response")


def initiator_of(principal: Principal) -> Initiator:
    """A REST user as the command service sees it (a system administrator commands no device)."""
    if principal.authority is Authority.SYS_ADMIN:
        raise PermissionDenied(SYSADMIN_DENIED)
    customer = principal.customer_id if principal.authority is Authority.CUSTOMER_USER else None
    return Initiator(principal.tenant_id, customer, principal.user_id)


#: Callers remembered by ``RpcApi._initiator`` at most (then it starts again).
MAX_INITIATORS = 10_000
#: Device ids (path text -> UUID) remembered by ``RpcApi._device_id`` at most (then it starts again).
MAX_DEVICE_IDS = 10_000


class RpcApi:
    def __init__(self, context: WebContext) -> None:
        self.context = context
        #: id(principal) -> (principal, its Initiator): a verified token's Principal is one object (the token
        #: cache's), so the same caller's commands share one Initiator, and its origin JSON (CommandService).
        self._initiators: dict[int, tuple[Principal, Initiator]] = {}
        #: The path's device id text -> its UUID: parsing one (``UUID(text)``) is pure Python, per RPC otherwise.
        self._device_ids: dict[str, UUID] = {}

    def _device_id(self, text: str) -> UUID:
        device_id = self._device_ids.get(text)
        if device_id is None:
            device_id = uuid_param("deviceId", text)  # a 400 naming the field: never remembered
            if len(self._device_ids) >= MAX_DEVICE_IDS:
                self._device_ids.clear()
            self._device_ids[text] = device_id
        return device_id

    def _initiator(self, principal: Principal) -> Initiator:
        cached = self._initiators.get(id(principal))
        if cached is not None and cached[0] is principal:
            return cached[1]
        initiator = initiator_of(principal)
        if len(self._initiators) >= MAX_INITIATORS:
            self._initiators.clear()
        self._initiators[id(principal)] = (principal, initiator)
        return initiator

    def register(self, router: Router) -> None:
        router.add("POST", "/api/rpc/{kind}/{deviceId}", self.send_v2)
        router.add("POST", "/api/plugins/rpc/{kind}/{deviceId}", self.send_v1)
        router.add("GET", "/api/rpc/persistent/{rpcId}", self.get_persistent)
        router.add("DELETE", "/api/rpc/persistent/{rpcId}", self.delete_persistent)
        router.add("GET", "/api/rpc/persistent/device/{deviceId}", self.list_persistent)

    # --- persistent RPCs ------------------------------------------------------------------------------------------

    async def get_persistent(self, request: ApiRequest) -> dict[str, Any]:
        require_authority(request.user, Authority.TENANT_ADMIN, Authority.CUSTOMER_USER)
        rpc_id = uuid_param("rpcId", request.params["rpcId"])
        record = await self.context.commands.get(initiator_of(request.user), rpc_id)
        return rpc_json(record)

    async def delete_persistent(self, request: ApiRequest) -> Response:
        require_authority(request.user, Authority.TENANT_ADMIN)
        await self.context.commands.delete(initiator_of(request.user), uuid_param("rpcId", request.params["rpcId"]))
        return Response(body=NO_BODY)

    async def list_persistent(self, request: ApiRequest) -> dict[str, Any]:
        require_authority(request.user, Authority.TENANT_ADMIN, Authority.CUSTOMER_USER)
        device_id = uuid_param("deviceId", request.params["deviceId"])
        status = None
        raw_status = request.query("rpcStatus")
        if raw_status:
            try:
                status = RpcStatus(raw_status.upper())
            except ValueError:
                names = ", ".join(s.value for s in RpcStatus if s is not RpcStatus.DELETED)
                raise InvalidArguments(f"Invalid rpcStatus '{shown(raw_status)}': use one of {names}") from None
        link = page_link(request, RPC_SORTS)
        page = await self.context.commands.list(initiator_of(request.user), device_id, link, status)
        return page_json(page, rpc_json)

    def send_v1(self, request: ApiRequest) -> Deferred:
        return self._send(request, v1=True)

    def send_v2(self, request: ApiRequest) -> Deferred:
        return self._send(request, v1=False)

    def _send(self, request: ApiRequest, v1: bool) -> Deferred:
        # The hot path of the REST API: plain calls and one Deferred while the device is in memory.
        kind = request.params["kind"]
        if kind not in KINDS:
            raise NotFound(f"Unknown RPC type '{shown(kind)}': use oneway or twoway")
        device_id = self._device_id(request.params["deviceId"])
        config = self.context.config
        raw = request.json_body()
        body = parse_rpc_body(raw, request.now(), config.rpc_default_timeout, config.rpc_min_timeout)
        oneway = kind == "oneway"
        idempotent = isinstance(raw.get("requestUUID"), str)
        d = self.context.commands.submit(self._initiator(request.user), device_id, body, oneway, idempotent)
        return d.addCallback(_render, body.persistent, body.request_uuid, oneway, v1)


def _render(result: RpcResult, persistent: bool, rpc_id: Any, oneway: bool, v1: bool) -> Any:
    """The answer as the router writes a plain value: a 200 with its JSON (NO_BODY: an empty 200). An answer is
    parsed JSON (or a NonJsonResponse string), never a Response: no Response object per RPC."""
    if not result.ok:
        raise failure_error(result, rpc_id, v1)
    if persistent:
        return result.response
    answer = answer_of(result, oneway)
    return NO_BODY if answer is NO_ANSWER else answer
