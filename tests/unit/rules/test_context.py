"""The context nodes see, and the fakes the other tests rely on (fakes are tested too)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from twisted.internet.defer import Deferred

from nanoiot.rules.context import NodeContext, RuleContext
from tests.unit.rules.fakes import ASSET, DEVICE, TENANT, FakeContext, ThreadedCalls, message, result_of


def test_the_fake_context_is_a_rule_context() -> None:
    assert isinstance(FakeContext(), RuleContext)


def test_node_context_delegates_every_call_to_the_servers_context() -> None:
    rules = FakeContext()
    ctx = NodeContext(rules, scripts="the runner")  # type: ignore[arg-type]
    assert (ctx.clock, ctx.tenant_id, ctx.scripts, ctx.rules) == (rules.clock, TENANT, "the runner", rules)
    msg = message()
    ctx.send_rpc(msg, DEVICE.id, "m", {}, False, False, 0, None, None, None, UUID(int=1), UUID(int=2))
    assert rules.rpcs[0].method == "m"
    assert ctx.reply_to_device(msg, DEVICE.id, 1, "s", "{}") and rules.replies
    result_of(ctx.create_relation(DEVICE, ASSET, "Contains"))
    assert result_of(ctx.relation_exists(DEVICE, ASSET, "Contains", "ASSET"))
    assert result_of(ctx.find_related(ASSET, "TO", "Contains", 1, [])) == [DEVICE]
    result_of(ctx.remove_relations(DEVICE, "FROM", "Contains"))
    assert not result_of(ctx.relation_exists(DEVICE, None, "Contains", None))
    rules.entities[("ASSET", "B1")] = ASSET
    assert result_of(ctx.find_entity_by_name("ASSET", "B1")) == ASSET
    assert result_of(ctx.customer_of(DEVICE)) is None
    assert result_of(ctx.http_request("GET", "http://h", {}, None, 1.0))[0] == 200
    rules.chains[UUID(int=3)] = lambda m: Deferred()
    assert not ctx.run_chain(UUID(int=3), msg).called
    ctx.log("line")
    assert rules.lines == ["line"]


def test_fake_find_related_follows_levels_and_types() -> None:
    ctx = FakeContext()
    building = ASSET
    floor = DEVICE.__class__("ASSET", UUID(int=0xF1))
    ctx.relate(building, floor)
    ctx.relate(floor, DEVICE)
    assert result_of(ctx.find_related(building, "FROM", "Contains", 2, [])) == [floor, DEVICE]
    assert result_of(ctx.find_related(building, "FROM", "Contains", 2, ["DEVICE"])) == [DEVICE]
    assert result_of(ctx.find_related(DEVICE, "TO", "", 1, [])) == [floor]


def test_threaded_calls_runs_what_threads_hand_over_until_done() -> None:
    reactor = ThreadedCalls()
    d: Deferred[Any] = Deferred()
    reactor.callFromThread(d.callback, 5)
    assert reactor.wait(d) == 5
