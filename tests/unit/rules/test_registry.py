"""Node types: ThingsBoard's FQCNs built in, and plugins from the entry-point group ``nanoiot.rule_nodes`` (a fake
entry point stands in for an installed package, by monkeypatching ``importlib.metadata.entry_points``)."""

from __future__ import annotations

import importlib.metadata
import sys
import types
from typing import Any

import pytest
from twisted.internet.defer import succeed

from nanoiot.rules.chain import ChainProblems, load_chain
from nanoiot.rules.engine import RuleEngine
from nanoiot.rules.message import RuleMessage
from nanoiot.rules.nodes import BUILTIN_NODES
from nanoiot.rules.nodes.base import NodeSpec
from nanoiot.rules.registry import ENTRY_POINT_GROUP, NodeRegistry, NodeTypeError
from tests.unit.rules.fakes import FakeContext, chain_export, message, node_entry, result_of

PLUGIN_MODULE = "nanoiot_test_plugin_nodes"


class TagNode:
    """A plugin node: adds its configured tag to the metadata; version 2 renamed ``label`` to ``tag``."""

    version = 2
    relations = ("Success", "Failure")

    def __init__(self, spec: NodeSpec) -> None:
        if "tag" not in spec.configuration:
            raise ValueError("'tag' must be set")
        self.tag = spec.configuration["tag"]

    @staticmethod
    def upgrade(from_version: int, config: dict[str, Any]) -> dict[str, Any]:
        if from_version < 2 and "label" in config:
            config["tag"] = config.pop("label")
        return config

    def on_message(self, msg: RuleMessage, ctx: Any) -> Any:
        return succeed([("Success", msg.with_(metadata={**msg.metadata, "tag": self.tag}))])


@pytest.fixture
def plugin_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType(PLUGIN_MODULE)
    module.TagNode = TagNode  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, PLUGIN_MODULE, module)
    entry_points = [
        importlib.metadata.EntryPoint("acme.Tag", f"{PLUGIN_MODULE}:TagNode", ENTRY_POINT_GROUP),
        importlib.metadata.EntryPoint("acme.Broken", f"{PLUGIN_MODULE}:Missing", ENTRY_POINT_GROUP),
    ]
    real = importlib.metadata.entry_points

    def fake(**params: Any) -> Any:
        if params.get("group") == ENTRY_POINT_GROUP:
            return entry_points
        return real(**params)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)


def test_every_builtin_is_registered_under_its_thingsboard_class_name() -> None:
    registry = NodeRegistry(entry_points=False)
    for node_class in BUILTIN_NODES:
        assert node_class.type.startswith("org.thingsboard.rule.engine.")
        assert registry.get(node_class.type) is node_class
    assert len({c.type for c in BUILTIN_NODES}) == len(BUILTIN_NODES) == 17


def test_an_unknown_type_is_a_node_type_error() -> None:
    with pytest.raises(NodeTypeError, match="unknown node type 'x.Y'"):
        NodeRegistry(entry_points=False).get("x.Y")


def test_register_replaces_a_builtin() -> None:
    registry = NodeRegistry(entry_points=False)
    registry.register(BUILTIN_NODES[0].type, TagNode)
    assert registry.get(BUILTIN_NODES[0].type) is TagNode


@pytest.mark.usefixtures("plugin_entry_points")
def test_entry_point_nodes_are_used_by_their_entry_point_name() -> None:
    registry = NodeRegistry()
    assert "acme.Tag" in registry and "acme.Tag" in registry.types()
    chain = load_chain(chain_export([node_entry("acme.Tag", "Tag it", {"label": "blue"}, configurationVersion=1)],
                                    []), registry)
    assert chain.export["metadata"]["nodes"][0]["configuration"] == {"tag": "blue"}
    assert chain.export["metadata"]["nodes"][0]["configurationVersion"] == 2
    ctx = FakeContext()
    seen: list[RuleMessage] = []
    registry.register("test.Sink", lambda spec: types.SimpleNamespace(
        on_message=lambda msg, ctx: seen.append(msg) or []))
    chain = load_chain(chain_export([node_entry("acme.Tag", "Tag it", {"tag": "red"}), node_entry("test.Sink", "s")],
                                    [(0, 1, "success")]), registry)
    result_of(RuleEngine(ctx, None).process(chain, message(), ctx))
    assert seen[0].metadata["tag"] == "red"


@pytest.mark.usefixtures("plugin_entry_points")
def test_load_chain_without_a_registry_finds_entry_point_nodes() -> None:
    assert load_chain(chain_export([node_entry("acme.Tag", "t", {"tag": "x"})], [])).nodes[0].node.tag == "x"


@pytest.mark.usefixtures("plugin_entry_points")
def test_a_plugin_that_fails_to_load_or_build_is_a_problem_naming_the_node() -> None:
    with pytest.raises(ChainProblems) as raised:
        load_chain(chain_export([node_entry("acme.Broken", "Broken one"), node_entry("acme.Tag", "No tag")], []))
    first, second = raised.value.problems
    assert (first.index, first.name) == (0, "Broken one") and "failed to load" in first.message
    assert (second.index, second.name) == (1, "No tag")
    assert second.message == "cannot be built: ValueError: 'tag' must be set"
