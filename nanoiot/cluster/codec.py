"""What travels between nodes, as JSON text: device-actor messages with their reply addresses, answers, and the
cluster's own notices. Pure code: no I/O, tested on its own.

An envelope is a JSON object with ``t`` (its kind) and ``from`` (the sending node). Kinds:

- ``tell``: a device-actor message for the node holding the device (``d``: device id, ``m``: the message,
  ``hops``: how often it was passed on already);
- ``reply``: the answer to a reply address of the receiving node (``r``: correlation, ``v``: value or ``e``: error);
- ``release``: "this node takes device ``d`` over, let it go and answer ``r``";
- ``claimed``: broadcast, devices ``d`` are held by node ``from`` now;
- ``invalidate``: broadcast, devices ``d`` changed (``deleted``: they are gone): drop cached copies.

Inside a node a ``tell`` envelope holds its device id (a UUID) and its message themselves: :func:`dumps` writes
them as the JSON above, so the bus, and nodes of the previous version on it, read the same text as before.
On a direct link (:mod:`nanoiot.cluster.direct`) a ``tell`` of a command, the hot path of a routed call, travels
as a positional JSON array instead (:func:`encode_frame` / :func:`decode_frame`, :data:`LINK_FORMAT`): no keys to
write and read, UUIDs as 32 hex digits, the command's device id not repeated. Anything else on a link is the
envelope object as on the bus. Both nodes of a link say their format in its handshake: a link between nodes of
different formats is refused and they keep to the bus.
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


#: The version of what a direct link carries (:func:`encode_frame`); 1 (links before it) sent every envelope as
#: an object. Carried in the link's handshake: nodes of different versions do not link.
LINK_FORMAT = 2
#: The first element of a compact frame: a ``tell`` of a SubmitRpc.
_TELL_SUBMIT = "S"
#: How many parsed ids a link's reader keeps (tenants, users, devices recur; a command's own id never does).
UUID_CACHE_SIZE = 4096


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


#: What :func:`message_to_json` writes: the device-actor messages that may travel to another node.
TRAVELS = (m.SubmitRpc, m.DeleteRpc, m.Inspect, m.DeviceRemoved, m.ReplyToDevice)


def outgoing_message(message: Any) -> Any:
    """A message to put in a ``tell`` envelope as it is (written when the envelope leaves the node); CodecError if
    it cannot travel."""
    if not isinstance(message, TRAVELS):
        raise CodecError(f"{type(message).__name__} does not travel between nodes")
    return message


def incoming_message(data: Any) -> Any:
    """A ``tell``'s message: read already (a direct link's compact frame) or its JSON (the bus, or a link's
    envelope object)."""
    return data if isinstance(data, TRAVELS) else message_from_json(data)


def incoming_device(data: Any) -> UUID:
    """A ``tell``'s device id: a UUID already (a compact frame) or its text."""
    if isinstance(data, UUID):
        return data
    try:
        return UUID(data)
    except _MALFORMED as exc:
        raise CodecError(f"malformed device id: {type(exc).__name__}: {exc}") from None


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


def _to_json(value: Any) -> Any:
    """What an envelope may hold besides JSON: a ``tell``'s device id and message (see the module docstring)."""
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, TRAVELS):
        return message_to_json(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=_to_json)


def dumps(envelope: dict[str, Any]) -> str:
    return _ENCODER.encode(envelope)


# --- direct link frames ---------------------------------------------------------------------------------------------

def encode_frame(envelope: dict[str, Any]) -> bytes:
    """An envelope as a direct link's frame (a compact one leaves ``from`` out: the reader takes the link's)."""
    message = envelope.get("m")
    if type(message) is m.SubmitRpc and envelope.get("t") == "tell" and type(envelope.get("d")) is UUID \
            and _fits_compact(envelope.get("hops", 0), message):
        return _ENCODER.encode(_tell_submit(envelope["d"], envelope.get("hops", 0), message)).encode(
            "utf-8", "surrogatepass")
    return dumps(envelope).encode("utf-8", "surrogatepass")


def _fits_compact(hops: Any, message: m.SubmitRpc) -> bool:
    """Whether the compact reader takes this command as it is (it checks each field's type); one that it would
    refuse (a float expiry, say) travels as an object, read as leniently as before."""
    c, reply_to = message.command, message.reply_to
    return (type(hops) is int and type(c.method) is str and type(c.oneway) is bool and type(c.persistent) is bool
            and type(c.expiration_time) is int and type(c.created_time) is int
            and (c.retries is None or type(c.retries) is int) and (c.qos is None or type(c.qos) is int)
            and (reply_to is None or type(reply_to.node) is str and type(reply_to.correlation) is int))


def _tell_submit(device_id: UUID, hops: int, message: m.SubmitRpc) -> list[Any]:
    c, reply_to = message.command, message.reply_to
    return [_TELL_SUBMIT, hops, device_id.hex, c.rpc_id.hex, c.tenant_id.hex,
            None if c.device_id == device_id else c.device_id.hex,
            c.method, c.params, c.oneway, c.expiration_time, c.created_time, c.persistent, c.retries,
            c.additional_info, c.qos, None if c.user_id is None else c.user_id.hex, c.initiator,
            None if c.batch_id is None else c.batch_id.hex,
            None if reply_to is None else reply_to.node, None if reply_to is None else reply_to.correlation]


def decode_frame(frame: bytes, uuids: dict[str, UUID] | None = None) -> dict[str, Any]:
    """A direct link's frame as an envelope (a compact one's message read already); CodecError if malformed.
    ``uuids``: the reader's cache of ids parsed before (at most :data:`UUID_CACHE_SIZE`), kept by the caller."""
    try:
        data = json.loads(frame)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CodecError(f"not JSON: {exc}") from None
    if type(data) is list:
        try:
            return _tell_submit_from(data, {} if uuids is None else uuids)
        except _MALFORMED as exc:
            raise CodecError(f"malformed frame: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("t"), str):
        raise CodecError("an envelope is an object with a kind 't'")
    return data


def _known_uuid(text: str, uuids: dict[str, UUID]) -> UUID:
    """An id that recurs (a tenant, user or device), parsed once (a UUID is immutable: sharing it is safe)."""
    found = uuids.get(text)
    if found is None:
        found = UUID(hex=text)
        if len(uuids) >= UUID_CACHE_SIZE:
            uuids.clear()
        uuids[text] = found
    return found


def _tell_submit_from(data: list[Any], uuids: dict[str, UUID]) -> dict[str, Any]:
    if len(data) != 20 or data[0] != _TELL_SUBMIT:
        raise CodecError("unknown compact frame")
    (_, hops, device, rpc_id, tenant, command_device, method, params, oneway, expires, created, persistent, retries,
     info, qos, user, initiator, batch, node, correlation) = data
    if not (type(hops) is int and type(method) is str and type(oneway) is bool and type(persistent) is bool
            and type(expires) is int and type(created) is int and (retries is None or type(retries) is int)
            and (qos is None or type(qos) is int)):
        raise CodecError("a compact command has a field of the wrong type")
    if node is None:
        reply_to = None
    elif type(node) is str and type(correlation) is int:
        reply_to = ReplyTo(node, correlation)
    else:
        raise CodecError("a reply address is [node, correlation]")
    device_id = _known_uuid(device, uuids)
    command = RpcCommand(
        rpc_id=UUID(hex=rpc_id), tenant_id=_known_uuid(tenant, uuids),
        device_id=device_id if command_device is None else _known_uuid(command_device, uuids), method=method,
        params=params, oneway=oneway, expiration_time=expires, created_time=created, persistent=persistent,
        retries=retries, additional_info=info, qos=qos, user_id=None if user is None else _known_uuid(user, uuids),
        initiator=initiator,
        batch_id=None if batch is None else UUID(hex=batch))
    return {"t": "tell", "d": device_id, "m": m.SubmitRpc(command, reply_to), "hops": hops}


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
