"""The engine's routing and guards, on small chains of test nodes and on ThingsBoard's default root chain, with a
fake context on task.Clock."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed

from nanoiot.rpc.model import RpcFailure, RpcResult
from nanoiot.rules.chain import RuleChain, default_root_chain, load_chain
from nanoiot.rules.engine import RuleEngine
from nanoiot.rules.message import RuleMessage
from nanoiot.rules.nodes.base import NodeSpec
from nanoiot.rules.registry import NodeRegistry
from tests.unit.rules.fakes import DEVICE, TENANT, FakeContext, chain_export, message, node_entry, result_of

CHAIN_A = UUID("00000000-0000-0000-0000-00000000aaaa")
CHAIN_B = UUID("00000000-0000-0000-0000-00000000bbbb")


class Recorder:
    """Test nodes' shared memory: which node saw which message."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, RuleMessage]] = []
        self.hanging: list[Deferred[Any]] = []
        self.cancelled = 0

    def names(self) -> list[str]:
        return [name for name, _ in self.seen]


class EmitNode:
    """Records the message, then emits it on each configured relation (default Success)."""

    def __init__(self, spec: NodeSpec, recorder: Recorder) -> None:
        self.name = spec.name
        self.relations_out = spec.configuration.get("emit", ["Success"])
        self.recorder = recorder

    def on_message(self, msg: RuleMessage, ctx: Any) -> Deferred[list[tuple[str, RuleMessage]]]:
        self.recorder.seen.append((self.name, msg))
        return succeed([(r, msg) for r in self.relations_out])


class PlainNode(EmitNode):
    """Returns the list itself, not a Deferred (allowed for plugins)."""

    def on_message(self, msg: RuleMessage, ctx: Any) -> Any:  # type: ignore[override]
        self.recorder.seen.append((self.name, msg))
        return [("Success", msg)]


class RaiseNode(EmitNode):
    def on_message(self, msg: RuleMessage, ctx: Any) -> Any:
        self.recorder.seen.append((self.name, msg))
        raise RuntimeError("node exploded")


class FailNode(EmitNode):
    def on_message(self, msg: RuleMessage, ctx: Any) -> Any:
        self.recorder.seen.append((self.name, msg))
        return fail(ValueError("deferred failed"))


class HangNode(EmitNode):
    def on_message(self, msg: RuleMessage, ctx: Any) -> Any:
        self.recorder.seen.append((self.name, msg))

        def cancelled(d: Deferred[Any]) -> None:
            self.recorder.cancelled += 1

        d: Deferred[Any] = Deferred(cancelled)
        self.recorder.hanging.append(d)
        return d


class GarbageNode(EmitNode):
    def on_message(self, msg: RuleMessage, ctx: Any) -> Any:
        return succeed("not a list of pairs")


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def registry(recorder: Recorder) -> NodeRegistry:
    registry = NodeRegistry(entry_points=False)
    for type_name, node_class in [("test.Emit", EmitNode), ("test.Plain", PlainNode), ("test.Raise", RaiseNode),
                                  ("test.Fail", FailNode), ("test.Hang", HangNode), ("test.Garbage", GarbageNode)]:
        registry.register(type_name, lambda spec, cls=node_class: cls(spec, recorder))
    return registry


@pytest.fixture
def engine(ctx: FakeContext) -> RuleEngine:
    return RuleEngine(ctx, ctx.scripts, node_timeout=10.0, max_hops=64)


def emit(name: str, *relations: str) -> dict[str, Any]:
    return node_entry("test.Emit", name, {"emit": list(relations) or ["Success"]})


def run(engine: RuleEngine, chain: RuleChain, ctx: FakeContext, msg: RuleMessage | None = None) -> Any:
    return result_of(engine.process(chain, msg or message(), ctx))


# --- routing --------------------------------------------------------------------------------------------------------


def test_relations_match_connection_labels_ignoring_case(engine: RuleEngine, ctx: FakeContext,
                                                         registry: NodeRegistry, recorder: Recorder) -> None:
    chain = load_chain(chain_export([emit("start", "SUCCESS"), emit("next")], [(0, 1, "success")]), registry)
    run(engine, chain, ctx)
    assert recorder.names() == ["start", "next"]


def test_several_connections_with_one_label_copy_the_message(engine: RuleEngine, ctx: FakeContext,
                                                             registry: NodeRegistry, recorder: Recorder) -> None:
    chain = load_chain(chain_export([emit("start"), emit("a"), emit("b"), emit("c")],
                                    [(0, 1, "Success"), (0, 2, "Success"), (0, 3, "Other")]), registry)
    msg = message(origin="o")
    run(engine, chain, ctx, msg)
    assert sorted(recorder.names()) == ["a", "b", "start"]
    copies = [m for name, m in recorder.seen if name in ("a", "b")]
    assert len({m.id for m in copies}) == 2 and msg.id not in {m.id for m in copies}
    assert all(m.data == msg.data and m.origin == "o" for m in copies)


def test_a_message_on_two_relations_takes_each_connection(engine: RuleEngine, ctx: FakeContext,
                                                          registry: NodeRegistry, recorder: Recorder) -> None:
    chain = load_chain(chain_export([emit("start", "one", "two", "ONE"), emit("x"), emit("y")],
                                    [(0, 1, "One"), (0, 2, "two")]), registry)
    run(engine, chain, ctx)
    assert sorted(recorder.names()) == ["start", "x", "y"]


def test_a_relation_without_connection_ends_the_message_quietly(engine: RuleEngine, ctx: FakeContext,
                                                               registry: NodeRegistry) -> None:
    chain = load_chain(chain_export([emit("start", "Nowhere")], []), registry)
    assert run(engine, chain, ctx) == []
    assert engine.stats.dropped == 1 and engine.stats.failures_unhandled == 0


def test_failure_with_no_connection_is_counted_and_never_raised(engine: RuleEngine, ctx: FakeContext,
                                                                registry: NodeRegistry) -> None:
    chain = load_chain(chain_export([emit("start", "Failure")], []), registry)
    assert run(engine, chain, ctx) == []
    assert engine.stats.failures_unhandled == 1


def test_a_node_that_raises_sends_the_message_down_failure(engine: RuleEngine, ctx: FakeContext,
                                                           registry: NodeRegistry, recorder: Recorder) -> None:
    chain = load_chain(chain_export([node_entry("test.Raise", "boom"), emit("on failure")],
                                    [(0, 1, "Failure")]), registry)
    msg = message()
    run(engine, chain, ctx, msg)
    [(_name, out)] = [s for s in recorder.seen if s[0] == "on failure"]
    assert out.data == msg.data and out.error == "RuntimeError: node exploded"
    assert engine.stats.node_errors == 1


def test_a_node_whose_deferred_fails_sends_the_message_down_failure(engine: RuleEngine, ctx: FakeContext,
                                                                    registry: NodeRegistry,
                                                                    recorder: Recorder) -> None:
    chain = load_chain(chain_export([node_entry("test.Fail", "fails"), emit("on failure")],
                                    [(0, 1, "failure")]), registry)
    run(engine, chain, ctx)
    assert recorder.seen[-1][1].error == "ValueError: deferred failed"


def test_a_node_that_raises_without_failure_connection_is_counted(engine: RuleEngine, ctx: FakeContext,
                                                                  registry: NodeRegistry) -> None:
    chain = load_chain(chain_export([node_entry("test.Raise", "boom")], []), registry)
    assert run(engine, chain, ctx) == []
    assert (engine.stats.node_errors, engine.stats.failures_unhandled) == (1, 1)


def test_a_node_that_does_not_answer_times_out_to_failure_and_is_cancelled(engine: RuleEngine, ctx: FakeContext,
                                                                          registry: NodeRegistry,
                                                                          recorder: Recorder) -> None:
    chain = load_chain(chain_export([node_entry("test.Hang", "slow"), emit("on failure"), emit("on success")],
                                    [(0, 1, "Failure"), (0, 2, "Success")]), registry)
    d = engine.process(chain, message(), ctx)
    ctx.clock.advance(9.9)
    assert not d.called
    ctx.clock.advance(0.2)
    assert result_of(d) == []
    assert recorder.names() == ["slow", "on failure"]
    assert recorder.seen[-1][1].error == "node did not answer within 10 s"
    assert engine.stats.timeouts == 1 and recorder.cancelled == 1
    assert ctx.clock.getDelayedCalls() == []


def test_an_answer_that_comes_with_the_cancellation_is_ignored(engine: RuleEngine, ctx: FakeContext,
                                                               registry: NodeRegistry, recorder: Recorder) -> None:
    registry.register("test.AnswersOnCancel", lambda spec: _AnswersOnCancel(spec, recorder))
    chain = load_chain(chain_export([node_entry("test.AnswersOnCancel", "slow"), emit("on success"),
                                     emit("on failure")], [(0, 1, "Success"), (0, 2, "Failure")]), registry)
    d = engine.process(chain, message(), ctx)
    ctx.clock.advance(11)
    assert d.called and recorder.names() == ["on failure"]


class _AnswersOnCancel(EmitNode):
    """Its Deferred answers Success when cancelled (as a node might that gives what it has so far)."""

    def on_message(self, msg: RuleMessage, ctx: Any) -> Any:
        return Deferred(lambda d: d.callback([("Success", msg)]))


def test_an_answered_node_leaves_no_timer(engine: RuleEngine, ctx: FakeContext, registry: NodeRegistry,
                                          recorder: Recorder) -> None:
    chain = load_chain(chain_export([node_entry("test.Hang", "slow"), emit("next")], [(0, 1, "Success")]), registry)
    d = engine.process(chain, message(), ctx)
    recorder.hanging[0].callback([("Success", message())])
    assert d.called and ctx.clock.getDelayedCalls() == []


def test_nodes_may_return_plain_lists_but_not_anything_else(engine: RuleEngine, ctx: FakeContext,
                                                            registry: NodeRegistry, recorder: Recorder) -> None:
    chain = load_chain(chain_export([node_entry("test.Plain", "plain"), node_entry("test.Garbage", "bad"),
                                     emit("on failure")], [(0, 1, "Success"), (1, 2, "Failure")]), registry)
    run(engine, chain, ctx)
    assert recorder.names() == ["plain", "on failure"]
    assert "not a list" in recorder.seen[-1][1].error


# --- loop guard ---------------------------------------------------------------------------------------------------


def test_max_hops_stops_a_message_that_went_through_too_many_nodes(ctx: FakeContext, registry: NodeRegistry,
                                                                   recorder: Recorder) -> None:
    engine = RuleEngine(ctx, None, max_hops=3)
    chain = load_chain(chain_export([emit(f"n{i}") for i in range(5)], [(i, i + 1, "Success") for i in range(4)]),
                       registry)
    assert run(engine, chain, ctx) == []
    assert recorder.names() == ["n0", "n1", "n2"]
    assert engine.stats.hops_exceeded == 1


def test_max_hops_stops_chains_that_call_each_other_forever(ctx: FakeContext, registry: NodeRegistry) -> None:
    engine = RuleEngine(ctx, None, max_hops=20)
    a = load_chain(chain_export([node_entry("org.thingsboard.rule.engine.flow.TbRuleChainInputNode", "to B",
                                            {"ruleChainId": str(CHAIN_B)})], []), registry, chain_id=CHAIN_A)
    b = load_chain(chain_export([node_entry("org.thingsboard.rule.engine.flow.TbRuleChainInputNode", "to A",
                                            {"ruleChainId": str(CHAIN_A)})], []), registry, chain_id=CHAIN_B)
    ctx.chains = {CHAIN_A: lambda m: engine.process(a, m, ctx), CHAIN_B: lambda m: engine.process(b, m, ctx)}
    assert run(engine, a, ctx) == []
    assert engine.stats.hops_exceeded == 1 and engine.stats.node_runs == 20


def test_a_long_chain_of_synchronous_nodes_does_not_grow_the_stack(ctx: FakeContext, registry: NodeRegistry,
                                                                   recorder: Recorder) -> None:
    engine = RuleEngine(ctx, None, max_hops=5000)
    count = 3000
    chain = load_chain(chain_export([emit(f"n{i}") for i in range(count)],
                                    [(i, i + 1, "Success") for i in range(count - 1)]), registry)
    run(engine, chain, ctx)
    assert len(recorder.seen) == count


# --- chains calling chains -----------------------------------------------------------------------------------------


def test_output_nodes_return_to_the_calling_chains_input_node(engine: RuleEngine, ctx: FakeContext,
                                                               registry: NodeRegistry, recorder: Recorder) -> None:
    output = "org.thingsboard.rule.engine.flow.TbRuleChainOutputNode"
    inner = load_chain(chain_export([emit("check", "ok", "bad"), node_entry(output, "Accepted"),
                                     node_entry(output, "Rejected")], [(0, 1, "ok"), (0, 2, "bad")]),
                       registry, chain_id=CHAIN_B)
    outer = load_chain(chain_export([node_entry("org.thingsboard.rule.engine.flow.TbRuleChainInputNode", "inner",
                                                {"ruleChainId": str(CHAIN_B)}), emit("after accepted")],
                                    [(0, 1, "accepted")]), registry, chain_id=CHAIN_A)
    ctx.chains[CHAIN_B] = lambda m: engine.process(inner, m, ctx)
    assert [name for name, _ in result_of(engine.process(inner, message(), ctx))] == ["Accepted", "Rejected"]
    run(engine, outer, ctx)
    assert recorder.names()[-1] == "after accepted"
    assert engine.stats.outputs == 4


def test_the_context_factory_gives_each_tenant_its_context(ctx: FakeContext, registry: NodeRegistry,
                                                           recorder: Recorder) -> None:
    asked = []
    engine = RuleEngine(lambda tenant: asked.append(tenant) or ctx, None)
    chain = load_chain(chain_export([emit("start")], []), registry)
    result_of(engine.process(chain, message(), tenant_id=TENANT))
    assert asked == [TENANT] and recorder.names() == ["start"]


# --- ThingsBoard's default root chain --------------------------------------------------------------------------------


@pytest.fixture
def root() -> RuleChain:
    return load_chain(default_root_chain())


def rest_call() -> RuleMessage:
    return message("RPC_CALL_FROM_SERVER_TO_DEVICE", data={"method": "setGpio", "params": '{"pin":7}',
                                                           "additionalInfo": None},
                   metadata={"oneway": "false", "persistent": "false", "expirationTime": "1700000010000",
                             "requestUUID": "7d1e2b3c-0000-4000-8000-000000000001"}, origin="caller")


def test_root_chain_sends_a_rest_call_to_the_device_through_rpc_call_request(engine: RuleEngine, ctx: FakeContext,
                                                                             root: RuleChain) -> None:
    d = engine.process(root, rest_call(), ctx)
    [sent] = ctx.rpcs
    assert (sent.device_id, sent.method, sent.params, sent.msg.origin) == (DEVICE.id, "setGpio", {"pin": 7},
                                                                          "caller")
    assert sent.rule_chain_id == root.id and sent.rule_node_id == root.nodes[5].id
    assert not d.called
    sent.answer.callback(RpcResult(response={"ok": 1}, has_response=True))
    assert result_of(d) == []
    assert engine.stats.dropped == 1  # the outcome's Success has no connection in the default chain


def test_root_chain_failure_outcome_has_no_connection_and_is_counted(engine: RuleEngine, ctx: FakeContext,
                                                                     root: RuleChain) -> None:
    d = engine.process(root, rest_call(), ctx)
    ctx.rpcs[0].answer.callback(RpcResult(failure=RpcFailure.DEVICE_OFFLINE))
    assert result_of(d) == [] and engine.stats.failures_unhandled == 1


def test_root_chain_logs_a_call_from_a_device_and_answers_nothing(engine: RuleEngine, ctx: FakeContext,
                                                                  root: RuleChain) -> None:
    run(engine, root, ctx, message("TO_SERVER_RPC_REQUEST", data={"method": "getTime", "params": {}},
                                   metadata={"requestId": "1", "sessionId": "s", "serviceId": "n"}))
    assert len(ctx.lines) == 1 and '"method":"getTime"' in ctx.lines[0]
    assert ctx.replies == [] and ctx.rpcs == []


def test_root_chain_passes_telemetry_through_the_save_nodes(engine: RuleEngine, ctx: FakeContext,
                                                            root: RuleChain) -> None:
    run(engine, root, ctx, message("POST_TELEMETRY_REQUEST", data={"t": 1}))
    run(engine, root, ctx, message("MY_CUSTOM_TYPE", data={"id": 1}))
    # Telemetry "saved" (nothing) and the custom type logged by "Log Other": both end on a Success with no
    # connection.
    assert engine.stats.dropped == 2 and len(ctx.lines) == 1
    assert json.loads(ctx.lines[0].split("\n")[2]) == {"id": 1}


def test_root_chain_drops_types_whose_label_has_no_connection(engine: RuleEngine, ctx: FakeContext,
                                                              root: RuleChain) -> None:
    run(engine, root, ctx, message("RPC_QUEUED", data={"id": 1}))  # "RPC Queued" goes nowhere in the default chain
    assert engine.stats.dropped == 1 and ctx.lines == []


def test_engine_with_a_task_clock_of_its_own_uses_it_for_deadlines(ctx: FakeContext, registry: NodeRegistry) -> None:
    clock = task.Clock()
    engine = RuleEngine(ctx, None, clock=clock, node_timeout=1.0)
    chain = load_chain(chain_export([node_entry("test.Hang", "slow")], []), registry)
    d = engine.process(chain, message(), ctx)
    ctx.clock.advance(5)
    assert not d.called
    clock.advance(1)
    assert d.called
