"""One error vocabulary for every edge (REST, MQTT, CoAP).

Each failure is an exception type carrying the HTTP status and ThingsBoard error code it renders as, so that the
web layer, the transports and the actors never invent their own mapping.
"""

from __future__ import annotations

import enum
import math
import uuid
from typing import Any


class ErrorCode(enum.IntEnum):
    """ThingsBoard's ``ThingsboardErrorCode`` values (as clients already parse them)."""

    GENERAL = 2
    AUTHENTICATION = 10
    JWT_TOKEN_EXPIRED = 11
    CREDENTIALS_EXPIRED = 15
    PERMISSION_DENIED = 20
    INVALID_ARGUMENTS = 30
    BAD_REQUEST_PARAMS = 31
    ITEM_NOT_FOUND = 32
    TOO_MANY_REQUESTS = 33
    TOO_MANY_UPDATES = 34
    VERSION_CONFLICT = 35
    DATABASE = 46


class NanoError(Exception):
    """Base of every failure that is reported to a client."""

    http_status: int = 500
    error_code: ErrorCode = ErrorCode.GENERAL
    default_message: str = "Internal server error"
    #: Seconds a client should wait before trying again (sent as ``Retry-After`` with 429 and 503).
    retry_after: float | None = None

    def __init__(self, message: str | None = None, retry_after: float | None = None, **details: Any) -> None:
        self.message = message or self.default_message
        self.details = details
        if retry_after is not None:
            self.retry_after = retry_after
        super().__init__(self.message)

    def headers(self) -> dict[bytes, bytes]:
        """Headers an HTTP answer of this error carries."""
        if self.retry_after is None:
            return {}
        return {b"retry-after": b"%d" % max(1, math.ceil(self.retry_after))}

    def to_json(self, timestamp_ms: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": self.http_status,
            "message": self.message,
            "errorCode": int(self.error_code),
            "timestamp": timestamp_ms,
        }
        body.update(self.details)
        return body


class BadRequest(NanoError):
    http_status = 400
    error_code = ErrorCode.BAD_REQUEST_PARAMS
    default_message = "Invalid request body"


class InvalidArguments(NanoError):
    http_status = 400
    error_code = ErrorCode.INVALID_ARGUMENTS
    default_message = "Invalid arguments"


class AuthenticationFailed(NanoError):
    http_status = 401
    error_code = ErrorCode.AUTHENTICATION
    default_message = "Authentication failed"


class TokenExpired(NanoError):
    http_status = 401
    error_code = ErrorCode.JWT_TOKEN_EXPIRED
    default_message = "Token has expired"


class PermissionDenied(NanoError):
    http_status = 403
    error_code = ErrorCode.PERMISSION_DENIED
    default_message = "You don't have permission to perform this operation!"


class NotFound(NanoError):
    http_status = 404
    error_code = ErrorCode.ITEM_NOT_FOUND
    default_message = "Requested item wasn't found!"


class MethodNotAllowed(NanoError):
    http_status = 405
    error_code = ErrorCode.BAD_REQUEST_PARAMS
    default_message = "Request method not supported"


class Conflict(NanoError):
    http_status = 409
    error_code = ErrorCode.VERSION_CONFLICT
    default_message = "Conflict"


class PayloadTooLarge(NanoError):
    http_status = 413
    error_code = ErrorCode.BAD_REQUEST_PARAMS
    default_message = "Payload size exceeds the limit"


class TooManyRequests(NanoError):
    http_status = 429
    error_code = ErrorCode.TOO_MANY_REQUESTS
    default_message = "Too many requests"


class DatabaseError(NanoError):
    http_status = 500
    error_code = ErrorCode.DATABASE
    default_message = "Database error"


class InternalError(NanoError):
    """An unexpected failure: the client gets an error id to quote, the log line the same id and the traceback;
    never SQL, parameters, host names or a traceback in the body."""

    def __init__(self, error_id: str) -> None:
        super().__init__(f"Internal server error (error id {error_id})", errorId=error_id)


class ServiceUnavailable(NanoError):
    http_status = 503
    error_code = ErrorCode.GENERAL
    default_message = "Service unavailable"


class RouteLost(ServiceUnavailable):
    """The node holding the device stopped (or went silent) before it answered: what it did with the call is not
    known. A persistent command is idempotent (its id is fixed), so the command service tries it once more."""

    default_message = "The node holding the device did not answer"


def unexpected(failure: Any, log: Any, what: str, **fields: Any) -> NanoError:
    """The error a client is shown for ``failure``: itself if it is one of ours, else an :class:`InternalError`
    whose id the log line (with the traceback) also carries. Unexpected failures are always logged here."""
    error = getattr(failure, "value", failure)
    if isinstance(error, NanoError):
        return error
    error_id = uuid.uuid4().hex[:12]
    log.failure(what + " (error id {error_id})", failure, error_id=error_id, **fields)
    return InternalError(error_id)


class ConfigError(Exception):
    """Bad start-up configuration: reported as one line and a non-zero exit, never a traceback."""
