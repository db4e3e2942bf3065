"""What travels between nodes, as JSON text: device-actor messages with their reply addresses, answers, and the
cluster's own notices. Pure code: no I/O, tested on its own.

An envelope is a JSON object with ``t`` (its kind) and ``from`` (the sending node). Kinds:

- ``tell``: a device-actor message for the node holding the device (``d``: device id, ``m``: the message,
  ``hops``: how often it was passed on already);
- ``reply``: the answer to a reply address of the receiving node (``r``: correlation, ``v``: value or ``e``: error);
- ``release``: "this node takes device ``d`` over, let it go and answer ``r``";
- ``claimed``: broadcast, devices ``d`` are held by node ``from`` now;
- ``invalidate``: broadcast, devices ``d`` changed (``deleted``: they are gone): drop cached copies.
"""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

from nanoiot.actors import messages as m
from nanoiot.actors.replies import ReplyTo
from nanoiot.rpc.model import NonJsonResponse, RpcCommand, RpcFailure, RpcResult


class CodecError(ValueError):
    """A message that cannot travel (an unknown kind) or cannot be read."""


#: What reading a malformed message may raise on its way (a missing field, a number that is not an integer or is
#: infinite, an id that is not a UUID string): all reported as CodecError.
_MALFORMED = (KeyError, TypeError, ValueError, AttributeError, ArithmeticError)


def _uuid(value: Any) -> UUID | None:
    return None if value is None else UUID(value)


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def command_to_json(command: RpcCommand) -> dict[str, Any]:
    return {
        "id": str(command.rpc_id), "tenant": str(command.tenant_id), "device": str(command.device_id),
        "method": command.method, "params": command.params, "oneway": command.oneway,
        "expires": command.expiration_time, "created": command.created_time, "persistent": command.persistent,
        "retries": command.retries, "info": command.additional_info, "qos": command.qos,
        "user": _str(command.user_id), "by": command.initiator, "batch": _str(command.batch_id),
    }


def command_from_json(data: dict[str, Any]) -> RpcCommand:
    return RpcCommand(
        rpc_id=UUID(data["id"]), tenant_id=UUID(data["tenant"]), device_id=UUID(data["device"]),
        method=data["method"], params=data["params"], oneway=data["oneway"], expiration_time=data["expires"],
        created_time=data["created"], persistent=data["persistent"], retries=data["retries"],
        additional_info=data["info"], qos=data["qos"], user_id=_uuid(data["user"]),
        initiator=data.get("by"), batch_id=_uuid(data.get("batch")),
    )


def _reply_to(reply_to: ReplyTo | None) -> list[Any] | None:
    return None if reply_to is None else [reply_to.node, reply_to.correlation]


def _reply_to_from(value: Any) -> ReplyTo | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise CodecError("a reply address is [node, correlation]")
    return ReplyTo(str(value[0]), int(value[1]))


def message_to_json(message: Any) -> dict[str, Any]:
    """The device-actor messages that may be routed to another node: commands, deletions, inspections and a rule
    chain's answer to a device's call (a session's own reports never travel: the actor lives where its session is)."""
    if isinstance(message, m.SubmitRpc):
        return {"k": "submit", "c": command_to_json(message.command), "r": _reply_to(message.reply_to)}
    if isinstance(message, m.DeleteRpc):
        return {"k": "delete", "id": str(message.rpc_id), "r": _reply_to(message.reply_to)}
    if isinstance(message, m.Inspect):
        return {"k": "inspect", "r": _reply_to(message.reply_to)}
    if isinstance(message, m.DeviceRemoved):
        return {"k": "removed"}
    if isinstance(message, m.ReplyToDevice):
        return {"k": "device-reply", "s": message.session_id, "q": message.request_id,
                "b": message.body.decode("utf-8", "surrogateescape")}
    raise CodecError(f"{type(message).__name__} does not travel between nodes")


def message_from_json(data: dict[str, Any]) -> Any:
    """A routed message; anything malformed in it (a missing field, an id that is not a UUID string) is a
    CodecError, never another exception."""
    try:
        return _message_from_json(data)
    except _MALFORMED as exc:
        raise CodecError(f"malformed message: {type(exc).__name__}: {exc}") from None


def _message_from_json(data: dict[str, Any]) -> Any:
    if not isinstance(data, dict):
        raise CodecError("a message is an object")
    kind = data.get("k")
    if kind == "submit":
        return m.SubmitRpc(command_from_json(data["c"]), _reply_to_from(data["r"]))
    if kind == "delete":
        return m.DeleteRpc(UUID(data["id"]), _reply_to_from(data["r"]))
    if kind == "inspect":
        return m.Inspect(_reply_to_from(data["r"]))
    if kind == "removed":
        return m.DeviceRemoved()
    if kind == "device-reply":
        return m.ReplyToDevice(int(data["s"]), int(data["q"]), str(data["b"]).encode("utf-8", "surrogateescape"))
    raise CodecError(f"unknown message kind {kind!r}")


def value_to_json(value: Any) -> Any:
    """An answer: RpcResult (tagged, keeping a non-JSON device answer apart from a JSON string), or plain JSON."""
    if isinstance(value, RpcResult):
        response = value.response
        text = isinstance(response, NonJsonResponse)
        return {"$result": [str(response) if text else response, value.failure.value if value.failure else None,
                            value.has_response, text]}
    return {"$plain": value}


def value_from_json(data: Any) -> Any:
    try:
        return _value_from_json(data)
    except _MALFORMED as exc:
        raise CodecError(f"malformed answer: {type(exc).__name__}: {exc}") from None


def _value_from_json(data: Any) -> Any:
    if not isinstance(data, dict):
        raise CodecError("an answer is a tagged object")
    if "$result" in data:
        response, failure, has_response, text = data["$result"]
        if text:
            response = NonJsonResponse(response)
        return RpcResult(response=response, failure=RpcFailure(failure) if failure else None,
                         has_response=has_response)
    if "$plain" in data:
        return data["$plain"]
    raise CodecError("unknown answer tag")


def dumps(envelope: dict[str, Any]) -> str:
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)


def loads(text: str) -> dict[str, Any]:
    try:
        envelope = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CodecError(f"not JSON: {exc}") from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("t"), str):
        raise CodecError("an envelope is an object with a kind 't'")
    return envelope


def error_to_json(error: BaseException) -> dict[str, Any]:
    """A refusal or failure for a caller on another node: what its edge needs to render it."""
    from nanoiot.errors import NanoError

    if isinstance(error, NanoError):
        return {"status": error.http_status, "code": int(error.error_code), "message": error.message,
                "details": error.details}
    return {"status": 500, "code": 2, "message": "Internal server error", "details": {}}


def error_from_json(data: dict[str, Any]) -> BaseException:
    try:
        return _error_from_json(data)
    except _MALFORMED as exc:
        raise CodecError(f"malformed error: {type(exc).__name__}: {exc}") from None


def _error_from_json(data: dict[str, Any]) -> BaseException:
    from nanoiot.errors import ErrorCode, NanoError

    if not isinstance(data, dict):
        raise CodecError("an error is an object")

    error = NanoError(str(data.get("message") or "Internal server error"), **dict(data.get("details") or {}))
    error.http_status = int(data.get("status", 500))
    try:
        error.error_code = ErrorCode(int(data.get("code", 2)))
    except ValueError:
        error.error_code = ErrorCode.GENERAL
    return error
