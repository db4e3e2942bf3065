"""Server-side logic that answers device-to-server ("client-side") calls.

Built in: ``getCurrentTime`` and ``getSessionLimits`` (ThingsBoard's reply shape). An unknown method gets an error
answer at once rather than a 60 s timeout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime

from nanoiot.persistence.records import Device

#: A handler receives the calling device, the params and a context, and returns a value or a Deferred of one.
Handler = Callable[["CallContext", Any], Any]


@dataclass(frozen=True, slots=True)
class CallContext:
    device: Device
    transport: str
    clock: IReactorTime
    limits: dict[str, Any]


def get_current_time(context: CallContext, params: Any) -> int:
    return int(context.clock.seconds() * 1000)


def get_session_limits(context: CallContext, params: Any) -> dict[str, Any]:
    return dict(context.limits)


class ServerMethods:
    """The table of methods devices may call; later issues add entry points and configuration."""

    def __init__(self, handlers: dict[str, Handler] | None = None) -> None:
        self._handlers: dict[str, Handler] = {
            "getCurrentTime": get_current_time,
            "getSessionLimits": get_session_limits,
        }
        if handlers:
            self._handlers.update(handlers)

    def register(self, name: str, handler: Handler) -> None:
        self._handlers[name] = handler

    def call(self, context: CallContext, payload: bytes) -> Deferred:
        """Answer one call; the Deferred always fires with a JSON-able value (errors become ``{"error": ...}``)."""
        try:
            request = json.loads(payload)
            method = request["method"]
            if not isinstance(method, str) or not isinstance(request, dict):
                raise TypeError
        except (ValueError, TypeError, KeyError):
            d: Deferred = Deferred()
            d.callback({"error": "Invalid request: expected a JSON object with a string 'method'"})
            return d
        handler = self._handlers.get(method)
        if handler is None:
            d = Deferred()
            d.callback({"error": f"Unsupported method: {method}"})
            return d
        result = maybeDeferred(handler, context, request.get("params"))
        return result.addErrback(lambda failure: {"error": f"{method} failed: {failure.getErrorMessage()}"})
