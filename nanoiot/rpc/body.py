"""The REST RPC request body, parsed and validated as pure code (ThingsBoard's fields and defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from nanoiot.errors import BadRequest
from nanoiot.ids import uuid7
from nanoiot.validation import json_depth, shown

_MISSING = object()

#: Limits both databases hold (the method column; BIGINT times; INTEGER retries), checked at the edge so that one
#: client's out-of-range value is its own 400 and never fails a write shared with other tenants' commands.
MAX_METHOD_LENGTH = 255
MAX_EXPIRATION_TIME = 2**53  # epoch ms: far beyond any real date, and exact in JSON numbers of every client
MAX_TIMEOUT_MS = 2**40
MAX_RETRIES = 2**31 - 1


# Not frozen (nothing changes a body once parsed): a frozen dataclass's __init__ sets every field through
# object.__setattr__, 0.98 µs against 0.42 as parse_rpc_body makes it, once per REST RPC and per bulk command.
@dataclass(slots=True)
class RpcBody:
    method: str
    params: Any
    timeout: int
    expiration_time: int
    persistent: bool
    retries: int | None
    additional_info: Any
    request_uuid: UUID
    qos: int | None


def _whole_number(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if type(value) is int:  # the common case, as the checks below would take it
        return value
    if isinstance(value, float) and not math.isfinite(value):  # 1e400 parses as inf: int() would raise
        raise BadRequest(f"Invalid request body: '{key}' must be a whole number")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise BadRequest(f"Invalid request body: '{key}' must be a whole number")
    return int(value)


def parse_rpc_body(
    raw: Any,
    now: int,
    default_timeout: int,
    min_timeout: int,
    new_uuid: Any = uuid7,
) -> RpcBody:
    """``expirationTime`` is used as given; otherwise ``now + max(min_timeout, timeout)`` (ThingsBoard's rule)."""
    if not isinstance(raw, dict):
        raise BadRequest("Invalid request body: expected a JSON object")
    method = raw.get("method", _MISSING)
    if method is _MISSING or method is None:
        raise BadRequest("Invalid request body: 'method' is required")
    if isinstance(method, (dict, list)):
        raise BadRequest("Invalid request body: 'method' must be a string")
    method = method if isinstance(method, str) else str(method).lower() if isinstance(method, bool) else str(method)
    if not method:
        raise BadRequest("Invalid request body: 'method' must not be empty")
    if len(method) > MAX_METHOD_LENGTH:
        raise BadRequest(f"Invalid request body: 'method' is longer than {MAX_METHOD_LENGTH} characters")
    if "\x00" in method:
        raise BadRequest("Invalid request body: 'method' must not contain the NUL character")
    # ``_whole_number`` only for the fields given: most bodies give none of them.
    timeout = _whole_number(raw, "timeout") if "timeout" in raw else None
    if timeout is None:
        timeout = default_timeout
    if timeout < 0:
        raise BadRequest("Invalid request body: 'timeout' must not be negative")
    if timeout > MAX_TIMEOUT_MS:
        raise BadRequest(f"Invalid request body: 'timeout' must be at most {MAX_TIMEOUT_MS} ms")
    expiration_time = _whole_number(raw, "expirationTime") if "expirationTime" in raw else None
    if expiration_time is None:
        expiration_time = now + max(min_timeout, timeout)
    elif expiration_time <= now:
        # Would end as DEVICE_OFFLINE (or EXPIRED) at once, even for an online device: say what is wrong instead.
        raise BadRequest(f"Invalid request body: 'expirationTime' {expiration_time} is not in the future "
                         f"(server time {now})")
    elif expiration_time > MAX_EXPIRATION_TIME:
        raise BadRequest(f"Invalid request body: 'expirationTime' must be at most {MAX_EXPIRATION_TIME}")
    persistent = raw.get("persistent", False)
    if not isinstance(persistent, bool):
        raise BadRequest("Invalid request body: 'persistent' must be true or false")
    retries = _whole_number(raw, "retries") if "retries" in raw else None
    if retries is not None and retries < 0:
        raise BadRequest("Invalid request body: 'retries' must not be negative")
    if retries is not None and retries > MAX_RETRIES:
        raise BadRequest(f"Invalid request body: 'retries' must be at most {MAX_RETRIES}")
    qos = _whole_number(raw, "qos") if "qos" in raw else None
    if qos is not None and qos not in (0, 1):
        raise BadRequest("Invalid request body: 'qos' must be 0 or 1")
    raw_uuid = raw.get("requestUUID")
    if raw_uuid is None:
        request_uuid = new_uuid()
    else:
        try:
            request_uuid = UUID(str(raw_uuid))
        except ValueError:
            raise BadRequest(f"Invalid UUID string: {shown(raw_uuid)}") from None
    # Stored as JSON text (persistent commands) and read back by every client: bounded nesting, as the edge's.
    params = json_depth("params", raw.get("params"))
    additional_info = json_depth("additionalInfo", raw.get("additionalInfo"))
    return RpcBody(
        method=method,
        params=params,
        timeout=timeout,
        expiration_time=expiration_time,
        persistent=persistent,
        retries=retries,
        additional_info=additional_info,
        request_uuid=request_uuid,
        qos=qos,
    )
