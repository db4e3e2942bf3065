"""JavaScript in embedded V8: compiling (a syntax check, nothing runs), running off the reactor thread with a time
and memory limit per call, and script nodes in a chain that never stall. Results come back through a reactor
stand-in (ThreadedCalls) that the test thread drains, waiting on a queue with a timeout."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from nanoiot.rules.chain import ChainProblems, load_chain
from nanoiot.rules.engine import RuleEngine
from nanoiot.rules.message import RuleMessage
from nanoiot.rules.nodes.base import NodeSpec
from nanoiot.rules.registry import NodeRegistry
from nanoiot.rules.scripts import (
    InlineScriptRunner,
    ScriptError,
    ScriptMemoryError,
    ScriptRunner,
    ScriptTimeout,
    check_syntax,
    compile_script,
)
from tests.unit.rules.fakes import FakeContext, ThreadedCalls, chain_export, message, node_entry

FILTER = "org.thingsboard.rule.engine.filter.TbJsFilterNode"
SWITCH = "org.thingsboard.rule.engine.filter.TbJsSwitchNode"
TRANSFORM = "org.thingsboard.rule.engine.transform.TbTransformMsgNode"
LOOP_FOREVER = "if (msg.loop) { while (true) {} } return true;"
ALLOCATE_FOREVER = "var a = []; while (true) { a.push(new Array(100000).fill(1.5)); }"


@pytest.fixture
def reactor() -> ThreadedCalls:
    return ThreadedCalls()


@pytest.fixture
def runner(reactor: ThreadedCalls) -> Iterator[ScriptRunner]:
    runner = ScriptRunner(reactor, timeout_ms=300, threads=2)
    yield runner
    runner.stop()


def run(reactor: ThreadedCalls, runner: ScriptRunner, body: str, msg: Any = None, metadata: Any = None,
        msg_type: str = "POST_TELEMETRY_REQUEST") -> Any:
    return reactor.wait(runner.run(compile_script(body, "test node"), msg or {}, metadata or {}, msg_type))


# --- compiling ---------------------------------------------------------------------------------------------------


def test_compile_checks_syntax_and_names_the_node() -> None:
    assert compile_script("return msg.a > 1;", "n").body == "return msg.a > 1;"
    with pytest.raises(ScriptError) as raised:
        compile_script("return msg.a >;", "Check temperature")
    assert raised.value.node_name == "Check temperature"
    assert str(raised.value) == "SyntaxError: Unexpected token ';' (script line 1) (node 'Check temperature')"


def test_compiling_runs_nothing() -> None:
    assert check_syntax("while (true) {}") is None
    assert check_syntax("throw new Error('never thrown');") is None


def test_a_blank_script_does_not_compile() -> None:
    with pytest.raises(ScriptError, match="script is empty"):
        compile_script(" \n", "n")


def test_compiled_scripts_have_distinct_ids() -> None:
    assert compile_script("return 1;", "a").id != compile_script("return 1;", "a").id


# --- running -------------------------------------------------------------------------------------------------------


def test_a_script_gets_msg_metadata_and_type_and_its_result_is_json(reactor: ThreadedCalls,
                                                                   runner: ScriptRunner) -> None:
    result = run(reactor, runner, "return {m: msg.a, k: metadata.k, t: msgType, list: [1, 'x', null]};",
                 {"a": 5}, {"k": "v"}, "CUSTOM")
    assert result == {"m": 5, "k": "v", "t": "CUSTOM", "list": [1, "x", None]}


def test_scripts_run_off_the_calling_thread(reactor: ThreadedCalls, runner: ScriptRunner) -> None:
    d = runner.run(compile_script("return 1;", "n"), {}, {}, "T")
    assert not d.called  # nothing ran on this thread
    assert reactor.wait(d) == 1
    assert any("nanoiot-scripts" in t.name for t in threading.enumerate())


def test_undefined_is_none(reactor: ThreadedCalls, runner: ScriptRunner) -> None:
    assert run(reactor, runner, "var x = 1;") is None


def test_a_script_that_throws_fails_with_its_error_and_line(reactor: ThreadedCalls, runner: ScriptRunner) -> None:
    result = run(reactor, runner, "var a = 1;\nthrow new Error('bad input ' + a);")
    assert isinstance(result, Failure) and result.check(ScriptError) and not result.check(ScriptTimeout)
    assert result.value.message == "Error: bad input 1 (script line 2)"


def test_a_script_that_loops_forever_is_stopped_by_the_time_limit(reactor: ThreadedCalls,
                                                                  runner: ScriptRunner) -> None:
    result = run(reactor, runner, "while (true) {}")
    assert isinstance(result, Failure) and result.check(ScriptTimeout)
    assert run(reactor, runner, "return 'still working';") == "still working"


def test_work_a_script_leaves_queued_counts_against_its_time_limit(reactor: ThreadedCalls,
                                                                   runner: ScriptRunner) -> None:
    result = run(reactor, runner, "Promise.resolve().then(function () { while (true) {} }); return true;")
    assert isinstance(result, Failure) and result.check(ScriptTimeout)
    assert run(reactor, runner, "return 2;") == 2


def test_a_script_that_allocates_forever_is_stopped_by_the_memory_limit(reactor: ThreadedCalls) -> None:
    runner = ScriptRunner(reactor, timeout_ms=5000, max_memory_bytes=16 * 2**20, threads=1)
    try:
        result = run(reactor, runner, ALLOCATE_FOREVER)
        assert isinstance(result, Failure) and result.check(ScriptMemoryError)
        assert run(reactor, runner, "return [1, 2].length;") == 2  # a fresh isolate
    finally:
        runner.stop()


def test_scripts_cannot_schedule_work_for_later(reactor: ThreadedCalls, runner: ScriptRunner) -> None:
    assert run(reactor, runner, "return [typeof setTimeout, typeof clearTimeout, typeof Atomics.waitAsync];") == \
        ["undefined", "undefined", "undefined"]


def test_a_script_cannot_replace_the_runners_entry_point(reactor: ThreadedCalls, runner: ScriptRunner) -> None:
    run(reactor, runner, "try { __nanoiot = null; } catch (e) {} return 1;")
    run(reactor, runner, "'use strict'; try { __nanoiot.run = null; } catch (e) {} return 1;")
    assert run(reactor, runner, "return 3;") == 3


def test_calls_beyond_max_pending_fail_at_once(reactor: ThreadedCalls) -> None:
    runner = ScriptRunner(reactor, timeout_ms=300, threads=1, max_pending=1)
    try:
        script = compile_script("return 1;", "n")
        first = runner.run(script, {}, {}, "T")
        second = runner.run(script, {}, {}, "T")
        assert isinstance(reactor.wait(second), Failure)
        assert reactor.wait(first) == 1
        assert runner.pending == 0
    finally:
        runner.stop()


def test_a_stopped_runner_runs_nothing(reactor: ThreadedCalls) -> None:
    runner = ScriptRunner(reactor)
    runner.stop()
    assert isinstance(reactor.wait(runner.run(compile_script("return 1;", "n"), {}, {}, "T")), Failure)


def test_the_runner_is_a_service(reactor: ThreadedCalls) -> None:
    runner = ScriptRunner(reactor)
    runner.startService()
    assert runner.running
    runner.stopService()
    assert not runner.running


def test_the_inline_runner_applies_the_same_limits() -> None:
    runner = InlineScriptRunner(timeout_ms=200)
    try:
        result: list[Any] = []
        runner.run(compile_script("while (true) {}", "n"), {}, {}, "T").addErrback(result.append)
        assert result[0].check(ScriptTimeout)
    finally:
        runner.stop()


# --- script nodes in a chain, with the threaded runner ---------------------------------------------------------------


class Collect:
    def __init__(self, spec: NodeSpec, seen: list[tuple[str, RuleMessage]]) -> None:
        self.name, self.seen = spec.name, seen

    def on_message(self, msg: RuleMessage, ctx: Any) -> list[tuple[str, RuleMessage]]:
        self.seen.append((self.name, msg))
        return []


@pytest.fixture
def seen() -> list[tuple[str, RuleMessage]]:
    return []


@pytest.fixture
def registry(seen: list[tuple[str, RuleMessage]]) -> NodeRegistry:
    registry = NodeRegistry(entry_points=False)
    registry.register("test.Collect", lambda spec: Collect(spec, seen))
    return registry


def js(type_name: str, name: str, body: str, lang: str = "JS") -> dict[str, Any]:
    return node_entry(type_name, name, {"scriptLang": lang, "jsScript": body, "tbelScript": body})


def collect(name: str) -> dict[str, Any]:
    return node_entry("test.Collect", name)


def test_a_looping_script_goes_to_failure_while_another_message_completes(reactor: ThreadedCalls,
                                                                          registry: NodeRegistry,
                                                                          seen: list[Any]) -> None:
    # A generous limit: the other message has all that time to get through, even on a busy machine.
    runner = ScriptRunner(reactor, timeout_ms=2000, threads=2)
    try:
        _looping_and_quick(reactor, runner, registry, seen)
    finally:
        runner.stop()


def _looping_and_quick(reactor: ThreadedCalls, runner: ScriptRunner, registry: NodeRegistry,
                       seen: list[Any]) -> None:
    chain = load_chain(chain_export([js(FILTER, "filter", LOOP_FOREVER), collect("true"), collect("failure")],
                                    [(0, 1, "True"), (0, 2, "Failure")]), registry)
    ctx = FakeContext(scripts=runner)
    engine = RuleEngine(ctx, runner)
    looping: Deferred[Any] = engine.process(chain, message(data={"loop": True}), ctx)
    quick: Deferred[Any] = engine.process(chain, message(data={"loop": False}), ctx)
    reactor.run_until(lambda: quick.called)
    assert not looping.called  # the quick message did not wait for the looping one
    assert [name for name, _ in seen] == ["true"]
    reactor.run_until(lambda: looping.called)
    assert [name for name, _ in seen] == ["true", "failure"]
    assert "ScriptTimeout" in seen[-1][1].error
    assert engine.stats.node_errors == 1


def test_switch_and_transform_scripts_in_a_chain(reactor: ThreadedCalls, runner: ScriptRunner,
                                                 registry: NodeRegistry, seen: list[Any]) -> None:
    chain = load_chain(chain_export([
        js(SWITCH, "route", "return msg.targets;"),
        js(TRANSFORM, "split", "return msg.items.map(function (i) { return {msg: {item: i}}; });"),
        collect("each"), collect("audit"),
    ], [(0, 1, "split"), (0, 3, "AUDIT"), (1, 2, "Success")]), registry)
    ctx = FakeContext(scripts=runner)
    d = RuleEngine(ctx, runner).process(chain, message(data={"targets": ["split", "audit"], "items": [1, 2, 3]}), ctx)
    reactor.run_until(lambda: d.called)
    assert sorted(name for name, _ in seen) == ["audit", "each", "each", "each"]
    assert sorted(m.json()["item"] for name, m in seen if name == "each") == [1, 2, 3]


def test_tbel_that_is_valid_javascript_runs_in_a_chain(reactor: ThreadedCalls, runner: ScriptRunner,
                                                       registry: NodeRegistry, seen: list[Any]) -> None:
    chain = load_chain(chain_export([js(FILTER, "hot", "return msg.temperature > 20;", "TBEL"), collect("hot")],
                                    [(0, 1, "True")]), registry)
    ctx = FakeContext(scripts=runner)
    d = RuleEngine(ctx, runner).process(chain, message(data={"temperature": 25}), ctx)
    reactor.run_until(lambda: d.called)
    assert [name for name, _ in seen] == ["hot"]


def test_tbel_that_is_not_javascript_is_refused_at_load_naming_the_node() -> None:
    export = chain_export([js(FILTER, "Sum check", "var sum = 0; foreach (x : msg.values) { sum += x; } "
                                                   "return sum > 10;", "TBEL")], [])
    with pytest.raises(ChainProblems) as raised:
        load_chain(export)
    [problem] = raised.value.problems
    assert (problem.index, problem.name) == (0, "Sum check")
    assert problem.message.startswith("configuration is invalid: TBEL script is not valid JavaScript")
