"""How a command ended, in one vocabulary that every edge renders in its own words.

The device actor reports an :class:`~nanoiot.rpc.model.RpcResult`; :func:`failure_error` turns a failed one into
the :class:`~nanoiot.errors.NanoError` that REST and WebSocket clients get (status, ThingsBoard error code, our
``rpcError``), and :func:`device_error_text` into the ``{"error": ...}`` text a device gets for a forwarded call.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from nanoiot.errors import ErrorCode, NanoError, TooManyRequests
from nanoiot.rpc.model import NonJsonResponse, RpcFailure, RpcResult

#: The answer of a command that has none (one-way, or a device that answered nothing): REST sends no body.
NO_ANSWER: Any = object()


class CommandFailed(NanoError):
    """A command that ended without an answer. ThingsBoard's status codes (v2: 504; v1: 409 offline, else 408),
    and ``rpcError`` saying which failure it was, since an empty 504 is what its users complain about most."""

    error_code = ErrorCode.GENERAL

    def __init__(self, failure: RpcFailure, rpc_id: UUID, http_status: int) -> None:
        super().__init__(failure.description, rpcError=failure.value, rpcId=str(rpc_id))
        self.failure = failure
        self.http_status = http_status


class NonJsonAnswer(NanoError):
    http_status = 406
    error_code = ErrorCode.BAD_REQUEST_PARAMS
    default_message = "Device answered with a payload that is not JSON"


def failure_error(result: RpcResult, rpc_id: UUID, v1: bool = False) -> NanoError:
    failure = result.failure
    assert failure is not None
    if failure is RpcFailure.REJECTED:
        details = result.response or {}
        return TooManyRequests(f"Too many pending commands for this device (limit {details.get('value')})",
                               rpcError=failure.value, limit=details.get("limit"), value=details.get("value"))
    if v1:
        status = 409 if failure is RpcFailure.DEVICE_OFFLINE else 408
    else:
        status = 504
    return CommandFailed(failure, rpc_id, status)


def answer_of(result: RpcResult, oneway: bool) -> Any:
    """What a successful command answered: the device's JSON, or NO_ANSWER; raises NonJsonAnswer for text."""
    response = result.response
    if oneway or not result.has_response or response is None:
        return NO_ANSWER
    if isinstance(response, NonJsonResponse):
        if response == "":
            return NO_ANSWER
        raise NonJsonAnswer(rpcError="NON_JSON_RESPONSE", response=str(response))
    return response


def device_error_text(result: RpcResult) -> str:
    """A failed command as a device reads it in a forwarded call's answer."""
    assert result.failure is not None
    return f"{result.failure.value}: {result.failure.description}"
