"""Hypothesis: the loader raises only ChainProblems whatever it is given, patterns never raise, and the engine ends
every message of any acyclic chain, leaving no timer behind."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import succeed

from nanoiot.rules.chain import ChainProblems, default_root_chain, load_chain
from nanoiot.rules.engine import RuleEngine
from nanoiot.rules.message import RuleMessage
from nanoiot.rules.nodes.base import NodeSpec
from nanoiot.rules.patterns import process_pattern
from nanoiot.rules.registry import NodeRegistry
from tests.unit.rules.fakes import FakeContext, chain_export, message, node_entry, result_of

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 20) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)

FUZZ_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ_SETTINGS
@given(json_values)
def test_the_loader_raises_only_chain_problems_for_any_json(export: Any) -> None:
    try:
        load_chain(export)
    except ChainProblems as e:
        assert e.problems and all(str(p) for p in e.problems)


@FUZZ_SETTINGS
@given(st.data())
def test_the_loader_raises_only_chain_problems_for_a_damaged_root_chain(data: st.DataObject) -> None:
    export = default_root_chain()
    metadata = export["metadata"]
    edits = data.draw(st.lists(st.sampled_from(["first", "from", "to", "label", "type", "name", "config", "drop"]),
                               max_size=4))
    for edit in edits:
        nodes, connections = metadata["nodes"], metadata["connections"]
        if edit == "first":
            metadata["firstNodeIndex"] = data.draw(json_values)
        elif edit in ("from", "to", "label") and connections:
            key = {"from": "fromIndex", "to": "toIndex", "label": "type"}[edit]
            data.draw(st.sampled_from(connections))[key] = data.draw(json_values)
        elif edit in ("type", "name", "config") and nodes:
            key = {"type": "type", "name": "name", "config": "configuration"}[edit]
            data.draw(st.sampled_from(nodes))[key] = data.draw(json_values)
        elif edit == "drop" and nodes:
            nodes.pop(data.draw(st.integers(0, len(nodes) - 1)))
    original = copy.deepcopy(export)
    try:
        chain = load_chain(export)
    except ChainProblems as e:
        assert e.problems
    else:
        assert chain.first is None or 0 <= chain.first < len(chain.nodes)
    assert export == original  # the caller's export is never changed


@FUZZ_SETTINGS
@given(st.text(max_size=40), st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=4), json_values,
       st.booleans())
def test_patterns_never_raise(pattern: str, metadata: dict[str, str], data: Any, escape: bool) -> None:
    msg = RuleMessage.create("T", message().originator, data if data is not None else {}, metadata)
    assert isinstance(process_pattern(pattern, msg, escape_json=escape), str)


class Emit:
    def __init__(self, spec: NodeSpec) -> None:
        self.relations = spec.configuration["emit"]

    def on_message(self, msg: RuleMessage, ctx: Any) -> Any:
        return succeed([(r, msg) for r in self.relations])


@st.composite
def acyclic_chains(draw: st.DrawFn) -> dict[str, Any]:
    labels = ["Success", "Failure", "Other", "SUCCESS"]
    count = draw(st.integers(1, 8))
    nodes = [node_entry("test.Emit", f"n{i}", {"emit": draw(st.lists(st.sampled_from(labels), max_size=3))})
             for i in range(count)]
    connections = [(f, t, draw(st.sampled_from(labels)))
                   for f in range(count) for t in range(f + 1, count) if draw(st.booleans())]
    return chain_export(nodes, connections)


@FUZZ_SETTINGS
@given(acyclic_chains())
def test_every_message_of_an_acyclic_chain_ends(export: dict[str, Any]) -> None:
    registry = NodeRegistry(entry_points=False)
    registry.register("test.Emit", Emit)
    chain = load_chain(export, registry)
    ctx = FakeContext()
    engine = RuleEngine(ctx, None, max_hops=10_000)
    assert result_of(engine.process(chain, message(), ctx)) == []
    stats = engine.stats
    assert stats.node_errors == stats.timeouts == stats.hops_exceeded == 0
    assert ctx.clock.getDelayedCalls() == []
