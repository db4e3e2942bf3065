"""Server-side logic that answers device-to-server ("client-side") calls.

Built in: ``getCurrentTime`` and ``getSessionLimits`` (ThingsBoard's reply shape). An unknown method gets an error
answer at once rather than a 60 s timeout.

Users add their own methods, each a callable ``handler(context, params)`` returning a JSON-able value or a Deferred
of one (an ``RpcResult`` is also accepted: the answer it carries, or ``{"error": ...}``):

- as setuptools entry points in the group ``nanoiot.rpc_methods`` (the entry point's name is the method name), e.g.
  ``[project.entry-points."nanoiot.rpc_methods"] forwardToValve = "mypkg.methods:forward_to_valve"``;
- with ``--rpc-methods``: comma-separated ``[name=]module:callable`` (the name defaults to the callable's).

A later source replaces an earlier method of the same name: built-ins, methods given in code, entry points, then
``--rpc-methods``. A handler may send commands to other devices of its tenant with ``context.send_rpc``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Any, Callable
from uuid import UUID

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from nanoiot.errors import ConfigError, NanoError
from nanoiot.jsontext import compact
from nanoiot.persistence.records import Device
from nanoiot.rpc.model import RpcResult
from nanoiot.rpc.payload import loads as payload_json

#: A handler receives the calling device, the params and a context, and returns a value or a Deferred of one.
Handler = Callable[["CallContext", Any], Any]

#: What the service offers handlers to reach other devices:
#: (calling device, target device id, method, params, oneway, timeout_ms) -> Deferred[RpcResult].
RpcSender = Callable[[Device, UUID, str, Any, bool, int], Deferred]

ENTRY_POINT_GROUP = "nanoiot.rpc_methods"

log = Logger(namespace="nanoiot.rpc")


@dataclass(frozen=True, slots=True)
class CallContext:
    device: Device
    transport: str
    clock: IReactorTime
    limits: dict[str, Any]
    #: Set by the service; None where no server is running (some unit tests).
    rpc_sender: RpcSender | None = None

    def send_rpc(self, device_id: UUID | str, method: str, params: Any = None, oneway: bool = False,
                 timeout_ms: int = 10000) -> Deferred:
        """Send a command to another device of the calling device's tenant, as the REST API would.

        Fires with an ``RpcResult`` (``ok``, ``response``, ``failure``); errbacks with ``NotFound`` for an unknown
        device and ``PermissionDenied`` for a device of another tenant.
        """
        if self.rpc_sender is None:
            return fail(RuntimeError("sending commands to devices is not available here"))
        return maybeDeferred(self.rpc_sender, self.device, device_id, method, params, oneway, timeout_ms)


def get_current_time(context: CallContext, params: Any) -> int:
    return int(context.clock.seconds() * 1000)


def get_session_limits(context: CallContext, params: Any) -> dict[str, Any]:
    return dict(context.limits)


class ServerMethods:
    """The table of methods devices may call: the built-ins, then whatever is registered on top."""

    def __init__(self, handlers: dict[str, Handler] | None = None) -> None:
        self._handlers: dict[str, Handler] = {
            "getCurrentTime": get_current_time,
            "getSessionLimits": get_session_limits,
        }
        if handlers:
            self.update(handlers)

    def register(self, name: str, handler: Handler) -> None:
        if not callable(handler):
            raise TypeError(f"server method {name!r}: {handler!r} is not callable")
        self._handlers[name] = handler

    def update(self, handlers: dict[str, Handler]) -> None:
        for name, handler in handlers.items():
            self.register(name, handler)

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def __contains__(self, name: str) -> bool:
        return name in self._handlers

    def call(self, context: CallContext, payload: bytes) -> Deferred:
        """Answer one call; the Deferred always fires with a JSON-able value (errors become ``{"error": ...}``)."""
        try:
            request = payload_json(payload)
            method = request["method"]
            if not isinstance(method, str) or not isinstance(request, dict):
                raise TypeError
        except (ValueError, TypeError, KeyError, RecursionError):
            d: Deferred = Deferred()
            d.callback({"error": "Invalid request: expected a JSON object with a string 'method'"})
            return d
        handler = self._handlers.get(method)
        if handler is None:
            d = Deferred()
            d.callback({"error": f"Unsupported method: {method}"})
            return d
        result = maybeDeferred(handler, context, request.get("params"))
        result.addCallback(_answer, method)
        return result.addErrback(_failed, method, context)


def _answer(value: Any, method: str) -> Any:
    """What the device gets: the handler's value, the answer of a forwarded command, never something unsendable."""
    if isinstance(value, RpcResult):
        if value.ok:
            value = value.response
        else:
            assert value.failure is not None
            value = {"error": f"{value.failure.value}: {value.failure.description}"}
    try:
        compact(value)  # json.dumps's check, with the encoder built once
    except (TypeError, ValueError) as exc:
        return {"error": f"{method} failed: its result is not JSON ({exc})"}
    return value


def _failed(failure: Failure, method: str, context: CallContext) -> dict[str, str]:
    if not failure.check(NanoError):  # an expected refusal is the answer; anything else is a bug worth a trace
        log.failure("server method {method} failed for device {device_id}", failure, method=method,
                    device_id=context.device.id)
    return {"error": f"{method} failed: {failure.getErrorMessage()}"}


# --- loading user methods --------------------------------------------------------------------------------------------


def load_entry_point_methods(group: str = ENTRY_POINT_GROUP) -> dict[str, Handler]:
    """Every method installed packages declare in the entry point ``group``: name -> handler.

    A broken entry point is a ``ConfigError`` (one line, the server does not start) rather than a method that
    silently answers "Unsupported method".
    """
    handlers: dict[str, Handler] = {}
    for entry_point in importlib.metadata.entry_points(group=group):
        where = f"entry point {entry_point.name} = {entry_point.value} (group {group})"
        try:
            handler = entry_point.load()
        except Exception as exc:
            raise ConfigError(f"{where}: cannot be loaded: {exc}") from None
        if not callable(handler):
            raise ConfigError(f"{where}: is not callable")
        handlers[entry_point.name] = handler
    return handlers


def parse_method_specs(text: str) -> list[tuple[str, str, str]]:
    """``--rpc-methods``: comma-separated ``[name=]module:callable`` -> [(method name, module, attribute)].

    Raises ``ValueError`` naming the first bad entry. The attribute may be dotted (``module:Class.method``); the
    method name defaults to its last part.
    """
    specs: list[tuple[str, str, str]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, has_name, target = item.partition("=")
        if not has_name:
            name, target = "", item
        name = name.strip()
        module, has_colon, attribute = target.strip().partition(":")
        module, attribute = module.strip(), attribute.strip()
        if (not has_colon or (has_name and not name) or not _dotted(module) or not _dotted(attribute)):
            raise ValueError(f"{item!r} is not [name=]module:callable")
        specs.append((name or attribute.rsplit(".", 1)[-1], module, attribute))
    return specs


def load_configured_methods(text: str, option: str = "--rpc-methods") -> dict[str, Handler]:
    """Import the callables ``--rpc-methods`` names; any problem is a one-line ``ConfigError``."""
    try:
        specs = parse_method_specs(text)
    except ValueError as exc:
        raise ConfigError(f"{option}: {exc}") from None
    handlers: dict[str, Handler] = {}
    for name, module_name, attribute in specs:
        target = f"{module_name}:{attribute}"
        try:
            obj: Any = importlib.import_module(module_name)
        except Exception as exc:
            raise ConfigError(f"{option}: {name}={target}: cannot import {module_name}: {exc}") from None
        try:
            for part in attribute.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{option}: {name}={target}: {module_name} has no {attribute}") from None
        if not callable(obj):
            raise ConfigError(f"{option}: {name}={target}: is not callable")
        handlers[name] = obj
    return handlers


def _dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))
