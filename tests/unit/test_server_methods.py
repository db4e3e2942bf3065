"""Server methods: built-ins, user methods from entry points and --rpc-methods, and what a device gets back."""

from __future__ import annotations

import importlib.metadata
import json
import sys
import types
from uuid import uuid4

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed

from nanoiot.config import Config
from nanoiot.errors import ConfigError, PermissionDenied
from nanoiot.persistence.records import NULL_UUID, Device
from nanoiot.rpc.model import RpcFailure, RpcResult
from nanoiot.commands.server_methods import (
    ENTRY_POINT_GROUP,
    CallContext,
    ServerMethods,
    load_configured_methods,
    load_entry_point_methods,
    parse_method_specs,
)

DEVICE = Device(uuid4(), 0, uuid4(), NULL_UUID, "dev", "default", None, None)


def context(sender=None, clock=None) -> CallContext:
    return CallContext(DEVICE, "mqtt", clock or task.Clock(), {"maxPayloadSize": 1}, sender)


def call(methods: ServerMethods, payload, ctx: CallContext | None = None):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    results: list = []
    methods.call(ctx or context(), data).addCallback(results.append)
    return results


def answer(methods: ServerMethods, payload, ctx: CallContext | None = None):
    [result] = call(methods, payload, ctx)
    return result


# --- calling methods -------------------------------------------------------------------------------------------------


def test_the_built_in_methods_answer_the_time_and_the_session_limits():
    clock = task.Clock()
    clock.advance(12.5)
    methods = ServerMethods()
    assert answer(methods, {"method": "getCurrentTime"}, context(clock=clock)) == 12500
    assert answer(methods, {"method": "getSessionLimits", "params": {}}) == {"maxPayloadSize": 1}


def test_an_unknown_method_is_answered_with_an_error_at_once():
    assert answer(ServerMethods(), {"method": "nope"}) == {"error": "Unsupported method: nope"}


@pytest.mark.parametrize("payload", [b"not json", b"[1]", b'"x"', b'{"params": 1}', b'{"method": 5}'])
def test_a_request_that_is_not_an_object_with_a_string_method_is_answered_with_an_error(payload):
    assert "error" in answer(ServerMethods(), payload)


def test_a_registered_handler_gets_the_context_and_the_params_and_its_value_is_the_answer():
    seen: list = []
    methods = ServerMethods()
    methods.register("echo", lambda ctx, params: seen.append((ctx.device, params)) or {"echo": params})
    assert answer(methods, {"method": "echo", "params": {"a": 1}}) == {"echo": {"a": 1}}
    assert seen == [(DEVICE, {"a": 1})]


def test_a_handler_returning_a_deferred_is_answered_when_it_fires():
    pending: Deferred = Deferred()
    methods = ServerMethods({"later": lambda ctx, params: pending})
    results = call(methods, {"method": "later"})
    assert results == []
    pending.callback([1, 2])
    assert results == [[1, 2]]


def test_an_error_in_a_handler_becomes_an_error_answer():
    def broken(ctx, params):
        raise ValueError("pin out of range")

    methods = ServerMethods({"broken": broken, "failsLater": lambda ctx, params: _failed(KeyError("k"))})
    assert answer(methods, {"method": "broken"}) == {"error": "broken failed: pin out of range"}
    assert answer(methods, {"method": "failsLater"})["error"].startswith("failsLater failed:")


def _failed(exc: Exception) -> Deferred:
    d: Deferred = Deferred()
    d.errback(exc)
    return d


def test_a_result_that_is_not_json_becomes_an_error_answer():
    methods = ServerMethods({"odd": lambda ctx, params: {1, 2}})
    assert answer(methods, {"method": "odd"})["error"].startswith("odd failed: its result is not JSON")


def test_a_handler_may_return_the_result_of_a_forwarded_command():
    ok = RpcResult(response={"t": 21.5}, has_response=True)
    offline = RpcResult(failure=RpcFailure.DEVICE_OFFLINE)
    methods = ServerMethods({"ok": lambda ctx, p: ok, "offline": lambda ctx, p: succeed(offline)})
    assert answer(methods, {"method": "ok"}) == {"t": 21.5}
    assert answer(methods, {"method": "offline"})["error"].startswith("DEVICE_OFFLINE")


def test_send_rpc_hands_the_calling_device_and_the_command_to_the_service():
    sent: list = []
    target = uuid4()

    def sender(caller, device_id, method, params, oneway, timeout_ms):
        sent.append((caller, device_id, method, params, oneway, timeout_ms))
        return succeed(RpcResult(response={"open": True}, has_response=True))

    def forward(ctx, params):
        return ctx.send_rpc(target, "openValve", params, timeout_ms=3000).addCallback(lambda r: r.response)

    methods = ServerMethods({"forward": forward})
    assert answer(methods, {"method": "forward", "params": {"v": 1}}, context(sender)) == {"open": True}
    assert sent == [(DEVICE, target, "openValve", {"v": 1}, False, 3000)]


def test_a_refused_forward_is_an_error_answer_and_without_a_server_send_rpc_fails():
    def sender(*args):
        raise PermissionDenied()

    methods = ServerMethods({"forward": lambda ctx, params: ctx.send_rpc(uuid4(), "m")})
    assert answer(methods, {"method": "forward"}, context(sender))["error"].startswith("forward failed: You don't")
    assert "not available" in answer(methods, {"method": "forward"}, context(None))["error"]


def test_registering_something_that_is_not_callable_is_refused():
    with pytest.raises(TypeError):
        ServerMethods().register("x", 42)  # type: ignore[arg-type]


# --- entry points ----------------------------------------------------------------------------------------------------


@pytest.fixture
def methods_module(monkeypatch):
    """A module ``nanoiot_test_methods`` with a few handlers, importable by name."""
    module = types.ModuleType("nanoiot_test_methods")
    module.ping = lambda ctx, params: "pong"  # type: ignore[attr-defined]
    module.double = lambda ctx, params: params * 2  # type: ignore[attr-defined]
    module.NOT_CALLABLE = 7  # type: ignore[attr-defined]

    class Valves:
        @staticmethod
        def close(ctx, params):
            return "closed"

    module.Valves = Valves  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nanoiot_test_methods", module)
    return module


def fake_entry_points(monkeypatch, *entries: tuple[str, str]) -> list:
    asked: list = []
    points = [importlib.metadata.EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in entries]

    def entry_points(**kw):
        asked.append(kw)
        return [p for p in points if p.group == kw.get("group")]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return asked


def test_entry_points_in_the_group_become_methods_named_after_them(monkeypatch, methods_module):
    asked = fake_entry_points(monkeypatch, ("ping", "nanoiot_test_methods:ping"),
                              ("closeValve", "nanoiot_test_methods:Valves.close"))
    handlers = load_entry_point_methods()
    assert asked == [{"group": "nanoiot.rpc_methods"}]
    assert sorted(handlers) == ["closeValve", "ping"]
    methods = ServerMethods()
    methods.update(handlers)
    assert answer(methods, {"method": "ping"}) == "pong"
    assert answer(methods, {"method": "closeValve"}) == "closed"


@pytest.mark.parametrize("value", ["nanoiot_no_such_module:f", "nanoiot_test_methods:missing",
                                   "nanoiot_test_methods:NOT_CALLABLE"])
def test_a_broken_entry_point_is_a_one_line_config_error(monkeypatch, methods_module, value):
    fake_entry_points(monkeypatch, ("bad", value))
    with pytest.raises(ConfigError) as info:
        load_entry_point_methods()
    assert "bad" in str(info.value) and "\n" not in str(info.value)


def test_without_entry_points_nothing_is_added(monkeypatch):
    fake_entry_points(monkeypatch)
    assert load_entry_point_methods() == {}


# --- --rpc-methods ---------------------------------------------------------------------------------------------------


def test_the_rpc_methods_option_names_callables_with_an_optional_method_name():
    assert parse_method_specs("") == []
    assert parse_method_specs(" twice = pkg.mod:double , pkg:Valves.close,") == [
        ("twice", "pkg.mod", "double"), ("close", "pkg", "Valves.close")]


@pytest.mark.parametrize("spec", ["module", "=m:f", "m:", ":f", "a b:f", "m:f-g", "x=m:1f"])
def test_a_malformed_rpc_methods_entry_is_refused_by_the_configuration(spec):
    with pytest.raises(ConfigError) as info:
        Config.from_sources({"rpc-methods": spec}, environ={})
    assert "--rpc-methods" in str(info.value)


def test_the_rpc_methods_option_comes_from_the_environment_too():
    config = Config.from_sources({}, environ={"NANOIOT_RPC_METHODS": "twice=nanoiot_test_methods:double"})
    assert config.rpc_methods == "twice=nanoiot_test_methods:double"
    assert Config.from_sources({}, environ={}).rpc_methods == ""


def test_configured_methods_are_imported_by_name(methods_module):
    handlers = load_configured_methods("twice=nanoiot_test_methods:double,nanoiot_test_methods:ping")
    methods = ServerMethods(handlers)
    assert answer(methods, {"method": "twice", "params": 21}) == 42
    assert answer(methods, {"method": "ping"}) == "pong"


@pytest.mark.parametrize("spec, says", [
    ("x=nanoiot_no_such_module:f", "cannot import"),
    ("x=nanoiot_test_methods:missing", "has no missing"),
    ("x=nanoiot_test_methods:NOT_CALLABLE", "is not callable"),
    ("x=", "is not [name=]module:callable"),
])
def test_a_configured_method_that_cannot_be_loaded_is_a_one_line_config_error(methods_module, spec, says):
    with pytest.raises(ConfigError) as info:
        load_configured_methods(spec)
    message = str(info.value)
    assert message.startswith("--rpc-methods: ") and says in message and "\n" not in message


def test_a_configured_method_replaces_a_built_in_of_the_same_name(methods_module):
    methods = ServerMethods()
    methods.update(load_configured_methods("getCurrentTime=nanoiot_test_methods:ping"))
    assert answer(methods, {"method": "getCurrentTime"}) == "pong"
