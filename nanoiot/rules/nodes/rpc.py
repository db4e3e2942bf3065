"""RPC Call Request (server to device) and RPC Call Reply (answer to a device's call), ThingsBoard's way.

RPC Call Request reads the command from the message (data ``method``/``params``/``requestId``/``additionalInfo``,
metadata ``oneway``/``persistent``/``requestUUID``/``expirationTime``/``retries``), sends it through the command
service, and emits a NEW message when the command ends: same type, originator, customer, metadata and ``origin``;
Success data = the device's answer (or ``{}``), Failure data = ``{"error": "<RpcError>"}``.

Our failures, in ThingsBoard's RpcError words (``RPC_ERRORS``):

===================================  =========================  ==================================================
ours                                 ThingsBoard                why
===================================  =========================  ==================================================
RpcFailure.DEVICE_OFFLINE            NO_ACTIVE_CONNECTION       never sent to a session before it expired
RpcFailure.NOT_DELIVERED             TIMEOUT                    sent, never acknowledged, expired
RpcFailure.NO_RESPONSE               TIMEOUT                    acknowledged, not answered in time
RpcFailure.DELETED                   INTERNAL                   deleted through the API while pending
RpcFailure.REJECTED                  INTERNAL                   refused by the device's queue (full, removed)
NotFound (refused before sending)    NOT_FOUND                  no such device
PermissionDenied                     FORBIDDEN                  another tenant's device
any other error                      INTERNAL
no outcome by expiration + 5 s       TIMEOUT                    the node's own guard
===================================  =========================  ==================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, maybeDeferred, succeed
from twisted.python.failure import Failure

from nanoiot.errors import NotFound, PermissionDenied
from nanoiot.ids import uuid4
from nanoiot.rpc.model import NonJsonResponse, RpcFailure, RpcResult
from nanoiot.rules.message import FAILURE, SUCCESS, RuleMessage, compact_json
from nanoiot.rules.nodes.base import BaseNode, InvalidConfig, NodeSpec, Outputs, failure, now_ms

__all__ = ["RPC_ERRORS", "RpcCall", "RpcCallError", "RpcReplyNode", "RpcRequestNode", "parse_rpc_call"]

RPC_ERRORS: dict[RpcFailure, str] = {
    RpcFailure.DEVICE_OFFLINE: "NO_ACTIVE_CONNECTION",
    RpcFailure.NOT_DELIVERED: "TIMEOUT",
    RpcFailure.NO_RESPONSE: "TIMEOUT",
    RpcFailure.DELETED: "INTERNAL",
    RpcFailure.REJECTED: "INTERNAL",
}
#: How long after the command's expiration the node stops waiting for its outcome (the command service answers at
#: expiration; this only guards against an outcome that never comes).
OUTCOME_GRACE_S = 5.0

NOT_A_DEVICE = "Message originator is not a device entity!"


class RpcCallError(ValueError):
    """A message that does not make a command (ThingsBoard sends it down Failure unchanged)."""


@dataclass(frozen=True, slots=True)
class RpcCall:
    """The command a message asks for."""

    device_id: UUID
    method: str
    params: Any
    oneway: bool
    persistent: bool
    expiration_time: int
    retries: int | None
    request_uuid: UUID | None
    additional_info: Any
    #: The message's ``requestId`` (checked as ThingsBoard does, not used: our device actors number requests).
    request_id: int | None


def _json_argument(value: Any) -> Any:
    """``params``/``additionalInfo`` as a JSON value. ThingsBoard takes a JSON primitive's text (a string's
    content) and compact JSON of anything else, and parses that text again when it builds the device's payload:
    so a string holding JSON is that JSON (the REST API's ``"params": "{\\"pin\\":7}"``), other strings stay."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _metadata(msg: RuleMessage, key: str) -> str | None:
    value = msg.metadata.get(key)
    return value if value else None


def parse_rpc_call(msg: RuleMessage, now: int, timeout_s: int) -> RpcCall:
    """The command in ``msg``; raises RpcCallError with ThingsBoard's words when there is none."""
    if msg.originator.entity_type != "DEVICE":
        raise RpcCallError(NOT_A_DEVICE)
    data = msg.json()
    if not isinstance(data, dict):
        raise RpcCallError("Message data is not a JSON object!")
    if "method" not in data:
        raise RpcCallError("Method is not present in the message!")
    if "params" not in data:
        raise RpcCallError("Params are not present in the message!")
    method = data["method"]
    if method is None or isinstance(method, (dict, list)):
        raise RpcCallError("Method is not a string!")
    method = method if isinstance(method, str) else json.dumps(method)
    request_id = data.get("requestId")
    if request_id is not None and (isinstance(request_id, bool) or not isinstance(request_id, (int, float))):
        raise RpcCallError(f"requestId is not a number: {request_id!r}")
    try:
        expiration = _metadata(msg, "expirationTime")
        expiration_time = int(expiration) if expiration else now + timeout_s * 1000
        retries_text = _metadata(msg, "retries")
        retries = int(retries_text) if retries_text else None
        uuid_text = _metadata(msg, "requestUUID")
        request_uuid = UUID(uuid_text) if uuid_text else None
    except ValueError as e:
        raise RpcCallError(f"Invalid metadata: {e}") from None
    return RpcCall(
        device_id=msg.originator.id,
        method=method,
        params=_json_argument(data["params"]),
        oneway=(_metadata(msg, "oneway") or "").lower() == "true",
        persistent=(_metadata(msg, "persistent") or "").lower() == "true",
        expiration_time=expiration_time,
        retries=retries,
        request_uuid=request_uuid,
        additional_info=_json_argument(data.get("additionalInfo")),
        request_id=None if request_id is None else int(request_id),
    )


def answer_text(result: RpcResult) -> str:
    """The Success message's data: the device's answer as text, ``{}`` when there is none."""
    response = result.response
    if not result.has_response or response is None:
        return "{}"
    if isinstance(response, NonJsonResponse):
        return str(response) or "{}"
    return compact_json(response)


def outcome(msg: RuleMessage, now: int, result: RpcResult) -> tuple[str, RuleMessage]:
    """The new message a finished command makes (a new id; everything else but data from ``msg``)."""
    if result.failure is None:
        return SUCCESS, msg.with_(data=answer_text(result), id=uuid4(), ts=now, error=None)
    name = RPC_ERRORS.get(result.failure, "INTERNAL")
    return error_outcome(msg, now, name, f"{name} ({result.failure.value}: {result.failure.description})")


def error_outcome(msg: RuleMessage, now: int, name: str, detail: str | None = None) -> tuple[str, RuleMessage]:
    return FAILURE, msg.with_(data=compact_json({"error": name}), id=uuid4(), ts=now, error=detail or name)


def refusal_name(error: BaseException) -> str:
    """A command refused before it was sent, or one whose outcome never came, as an RpcError name."""
    if isinstance(error, NotFound):
        return "NOT_FOUND"
    if isinstance(error, PermissionDenied):
        return "FORBIDDEN"
    if isinstance(error, (TimeoutError, CancelledError)):
        return "TIMEOUT"
    return "INTERNAL"


class RpcRequestNode(BaseNode):
    """ThingsBoard's "rpc call request"."""

    type = "org.thingsboard.rule.engine.rpc.TbSendRPCRequestNode"
    default_config = {"timeoutInSeconds": 60}

    def __init__(self, spec: NodeSpec) -> None:
        super().__init__(spec)
        self.timeout_s = self.number("timeoutInSeconds", 60)
        if self.timeout_s < 0:
            raise InvalidConfig("'timeoutInSeconds' must not be negative")

    def deadline(self, msg: RuleMessage, now: int, default: float) -> float | None:
        return None  # the node guards its own wait (see on_message) and always ends with an outcome

    def on_message(self, msg: RuleMessage, ctx: Any) -> Deferred[Outputs]:
        now = now_ms(ctx)
        try:
            call = parse_rpc_call(msg, now, self.timeout_s)
        except RpcCallError as e:
            return _done([failure(msg, str(e))])
        d = maybeDeferred(ctx.send_rpc, msg, call.device_id, call.method, call.params, call.oneway,
                          call.persistent, call.expiration_time, call.retries, call.request_uuid,
                          call.additional_info, self.spec.chain_id, self.spec.id)
        wait_s = max(0.0, (call.expiration_time - now) / 1000) + OUTCOME_GRACE_S
        d.addTimeout(wait_s, ctx.clock)

        def ended(result: RpcResult) -> Outputs:
            return [outcome(msg, now_ms(ctx), result)]

        def refused(f: Failure) -> Outputs:
            name = refusal_name(f.value)
            return [error_outcome(msg, now_ms(ctx), name, f"{name}: {f.getErrorMessage()}")]

        return d.addCallbacks(ended, refused)


def _done(outputs: Outputs) -> Deferred[Outputs]:
    return succeed(outputs)


@dataclass(frozen=True, slots=True)
class RpcReply:
    device_id: UUID
    request_id: int
    session_ref: str
    body: str


class RpcReplyNode(BaseNode):
    """ThingsBoard's "rpc call reply": sends the message data, verbatim, as the answer to the device's call named
    by metadata (``requestId``, ``sessionId``, ``serviceId`` by default)."""

    type = "org.thingsboard.rule.engine.rpc.TbSendRPCReplyNode"
    default_config = {"serviceIdMetaDataAttribute": "serviceId", "sessionIdMetaDataAttribute": "sessionId",
                      "requestIdMetaDataAttribute": "requestId"}

    def __init__(self, spec: NodeSpec) -> None:
        super().__init__(spec)
        # An empty or missing name means the default one (TbSendRpcReplyNodeConfiguration's getters).
        self.keys = {k: self.text(k) or v for k, v in self.default_config.items()}

    def reply(self, msg: RuleMessage) -> RpcReply:
        """The answer ``msg`` makes; raises RpcCallError with ThingsBoard's words when it makes none."""
        service_id = _metadata(msg, self.keys["serviceIdMetaDataAttribute"])
        session_id = _metadata(msg, self.keys["sessionIdMetaDataAttribute"])
        request_id = _metadata(msg, self.keys["requestIdMetaDataAttribute"])
        if msg.originator.entity_type != "DEVICE":
            raise RpcCallError(NOT_A_DEVICE)
        if request_id is None:
            raise RpcCallError("Request id is not present in the metadata!")
        if service_id is None:
            raise RpcCallError("Service id is not present in the metadata!")
        if session_id is None:
            raise RpcCallError("Session id is not present in the metadata!")
        if not msg.data:
            raise RpcCallError("Request body is empty!")
        try:
            number = int(request_id)
        except ValueError:
            raise RpcCallError(f"Request id is not a number: {request_id!r}") from None
        return RpcReply(msg.originator.id, number, session_id, msg.data)

    def on_message(self, msg: RuleMessage, ctx: Any) -> Deferred[Outputs]:
        try:
            reply = self.reply(msg)
        except RpcCallError as e:
            return _done([failure(msg, str(e))])
        if not ctx.reply_to_device(msg, reply.device_id, reply.request_id, reply.session_ref, reply.body):
            return _done([failure(msg, "The device's session is closed: the reply was not delivered")])
        return _done([(SUCCESS, msg)])
