"""Loading ThingsBoard's own exports: the TB 4.x default root chain, a TB 3.x export (legacy debugMode,
configurationVersion 0, Device Profile node first, version-0 configurations upgraded), and broken files refused
with every problem listed. The files are in tests/unit/rules/data/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from nanoiot.rpc.model import RpcResult
from nanoiot.rules.chain import ChainProblems, Problem, default_root_chain, load_chain, load_chain_file
from nanoiot.rules.engine import RuleEngine
from nanoiot.rules.nodes.rest import KNOWN_KEYS
from tests.unit.rules.fakes import ASSET, DEVICE, FakeContext, chain_export, message, node_entry, result_of

DATA = Path(__file__).parent / "data"
INPUT = "org.thingsboard.rule.engine.flow.TbRuleChainInputNode"


def read(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text())


# --- TB 4.x default root chain ---------------------------------------------------------------------------------------


def test_the_packaged_default_root_chain_is_thingsboards_file() -> None:
    assert default_root_chain() == read("tb4_root_rule_chain.json")


def test_tb4_default_root_chain_loads_as_exported() -> None:
    chain = load_chain_file(str(DATA / "tb4_root_rule_chain.json"))
    assert (chain.name, chain.root, chain.first, chain.type) == ("Root Rule Chain", True, 2, "CORE")
    assert [spec.name for spec in chain.nodes] == ["Save Timeseries", "Save Client Attributes", "Message Type Switch",
                                                  "Log RPC from Device", "Log Other", "RPC Call Request"]
    assert chain.targets(2, "RPC Request to Device") == [5]
    assert chain.targets(2, "rpc request to device") == [5]
    assert chain.connections[2][0] == ("other", 4)
    # Node versions ThingsBoard wrote are kept; the pass-throughs' configurations are not touched.
    assert chain.export["metadata"]["nodes"][1]["configurationVersion"] == 3
    assert chain.export["metadata"]["nodes"][1]["configuration"] == read("tb4_root_rule_chain.json")[
        "metadata"]["nodes"][1]["configuration"]
    assert {w.index for w in chain.warnings} == {0, 1}  # the save nodes do nothing here


def test_node_ids_are_stable_for_one_chain_id() -> None:
    chain_id = UUID(int=77)
    first = load_chain(default_root_chain(), chain_id=chain_id)
    again = load_chain(default_root_chain(), chain_id=chain_id)
    assert first.id == chain_id and [s.id for s in first.nodes] == [s.id for s in again.nodes]
    assert len({s.id for s in first.nodes}) == 6


# --- TB 3.x export -------------------------------------------------------------------------------------------------


@pytest.fixture
def tb3() -> Any:
    return load_chain_file(str(DATA / "tb3_root_export.json"))


def node(chain: Any, name: str) -> dict[str, Any]:
    return next(n for n in chain.export["metadata"]["nodes"] if n["name"] == name)


def test_tb3_export_starts_at_the_device_profile_node(tb3: Any) -> None:
    assert tb3.first == 6 and tb3.nodes[6].type == "org.thingsboard.rule.engine.profile.TbDeviceProfileNode"
    assert tb3.targets(6, "Success") == [2]
    assert tb3.root is False


def test_tb3_debug_mode_becomes_debug_settings(tb3: Any) -> None:
    assert node(tb3, "RPC Call Request")["debugSettings"] == {"failuresEnabled": True, "allEnabled": True}
    assert all("debugMode" not in n for n in tb3.export["metadata"]["nodes"])
    assert "debugSettings" not in node(tb3, "Log Other")


def test_tb3_check_relation_version_0_direction_is_flipped(tb3: Any) -> None:
    check = node(tb3, "Is in building")
    assert check["configurationVersion"] == 1 and check["configuration"]["direction"] == "TO"
    assert read("tb3_root_export.json")["metadata"]["nodes"][7]["configuration"]["direction"] == "FROM"


def test_tb3_rest_api_call_version_0_is_upgraded_to_4(tb3: Any) -> None:
    rest = node(tb3, "Audit RPC")
    assert rest["configurationVersion"] == 4
    config = rest["configuration"]
    assert config["parseToPlainText"] is False and "trimDoubleQuotes" not in config
    assert set(config) <= KNOWN_KEYS and config["maxInMemoryBufferSizeInKb"] == 256
    assert config["requestBodyTemplate"] is None and "queryParams" not in config


def test_tb3_nodes_without_versions_keep_their_configuration(tb3: Any) -> None:
    assert node(tb3, "RPC Call Request")["configuration"] == {"timeoutInSeconds": 60}
    assert "configurationVersion" not in node(tb3, "RPC Call Request")
    assert node(tb3, "Device Profile Node")["configurationVersion"] == 1


def test_tb3_export_runs_a_rest_call_through_device_profile_switch_rpc_and_audit(tb3: Any) -> None:
    ctx = FakeContext()
    engine = RuleEngine(ctx, None)
    msg = message("RPC_CALL_FROM_SERVER_TO_DEVICE", data={"method": "setGpio", "params": "{}"},
                  metadata={"deviceName": "pump 1", "expirationTime": str(int(ctx.clock.seconds() * 1000) + 5000)})
    d = engine.process(tb3, msg, ctx)
    [sent] = ctx.rpcs
    assert sent.method == "setGpio" and sent.rule_node_id == tb3.nodes[5].id
    sent.answer.callback(RpcResult(response={"done": True}, has_response=True))
    assert result_of(d) == []
    [(method, url, headers, body, _)] = ctx.http_calls
    assert (method, url, headers["X-Device"], body) == ("POST", "http://audit.local/rpc/pump%201?outcome=ok",
                                                        "pump 1", b'{"done":true}')


def test_tb3_export_answers_a_device_call_through_transform_and_reply(tb3: Any, inline_scripts: Any) -> None:
    ctx = FakeContext(scripts=inline_scripts)
    engine = RuleEngine(ctx, inline_scripts)
    msg = message("TO_SERVER_RPC_REQUEST", data={"method": "getResponse", "params": {}},
                  metadata={"requestId": "4", "sessionId": "sess-1", "serviceId": "node-1"})
    result_of(engine.process(tb3, msg, ctx))
    assert ctx.replies == [(DEVICE.id, 4, "sess-1", '{"response":"requestReceived"}')]
    assert len(ctx.lines) == 1  # and "Log RPC from Device" logged it (copied to both connections)


def test_tb3_check_relation_after_the_flip_reads_from_the_asset_to_the_originator(tb3: Any) -> None:
    ctx = FakeContext()
    ctx.relate(ASSET, DEVICE)  # v0 "FROM" (from the entity) is v1 "TO"
    result_of(RuleEngine(ctx, None).process(tb3, message("ATTRIBUTES_UPDATED"), ctx))
    assert len(ctx.lines) == 1  # True -> Log Other


# --- legacy and unusual exports --------------------------------------------------------------------------------------


def test_legacy_rule_chain_connections_become_input_nodes() -> None:
    target = "5f1a6b1e-9f31-11ea-a2a4-6f2e0c9a3b01"
    export = chain_export([node_entry("org.thingsboard.rule.engine.filter.TbMsgTypeSwitchNode", "Switch")], [])
    export["metadata"]["ruleChainConnections"] = [{"fromIndex": 0, "targetRuleChainId": {"entityType": "RULE_CHAIN",
                                                                                          "id": target},
                                                   "additionalInfo": {"layoutX": 1, "layoutY": 2},
                                                   "type": "RPC Request to Device"}]
    chain = load_chain(export)
    assert chain.nodes[1].type == INPUT and chain.nodes[1].name == "Rule Chain Input"
    assert chain.nodes[1].node.target == UUID(target)
    assert chain.targets(0, "RPC Request to Device") == [1]
    assert chain.export["metadata"]["ruleChainConnections"] is None
    assert chain.export["metadata"]["nodes"][1]["configuration"]["forwardMsgToDefaultRuleChain"] is False


def test_an_unknown_relation_label_is_a_warning_because_thingsboard_allows_it() -> None:
    export = chain_export([node_entry("org.thingsboard.rule.engine.rpc.TbSendRPCRequestNode", "RPC", {}),
                           node_entry("org.thingsboard.rule.engine.filter.TbMsgTypeSwitchNode", "Switch")],
                          [(0, 1, "Maybe")])
    chain = load_chain(export)
    assert [str(w) for w in chain.warnings] == [
        "node 0 ('RPC'): relation 'Maybe' is never emitted by this node type (it emits Success, Failure)"]


def test_a_missing_configuration_takes_the_default_with_a_warning() -> None:
    export = chain_export([{"type": "org.thingsboard.rule.engine.rpc.TbSendRPCRequestNode", "name": "RPC"}], [])
    chain = load_chain(export)
    assert chain.nodes[0].configuration == {"timeoutInSeconds": 60} and chain.warnings


def test_a_failed_upgrade_keeps_the_configuration_with_a_warning() -> None:
    config = {"relationType": "Contains", "checkForSingleEntity": False}  # version 0 without a direction to flip
    export = chain_export([node_entry("org.thingsboard.rule.engine.filter.TbCheckRelationNode", "Check", config)],
                          [])
    chain = load_chain(export)
    [warning] = chain.warnings
    assert warning.index == 0 and "configuration upgrade from version 0 failed" in warning.message
    assert chain.export["metadata"]["nodes"][0]["configuration"] == config
    assert chain.export["metadata"]["nodes"][0]["configurationVersion"] == 1
    assert chain.nodes[0].node.direction == "FROM"  # missing keys come from the default configuration


def test_a_chain_without_nodes_loads_and_does_nothing() -> None:
    chain = load_chain(chain_export([], [], first=None))
    assert chain.first is None and chain.nodes == []


# --- refusals -------------------------------------------------------------------------------------------------------


def test_a_broken_file_is_refused_with_every_problem_listed() -> None:
    with pytest.raises(ChainProblems) as raised:
        load_chain_file(str(DATA / "broken_chain.json"))
    problems = raised.value.problems
    text = str(raised.value)
    assert len(text.splitlines()) == len(problems) == 6
    assert Problem(1, "Send Email", "unknown node type 'org.thingsboard.rule.engine.action.TbSendEmailNode'") \
        in problems
    assert Problem(2, None, "the node's name is missing") in problems
    [tbel] = [p for p in problems if p.index == 3]
    assert tbel.name == "TBEL only" and "TBEL script is not valid JavaScript" in tbel.message
    assert any("toIndex is out of range (the chain has 5 nodes)" in p.message and p.index == 0 for p in problems)
    assert any("Can't create the relation to yourself." in p.message and p.index == 4 for p in problems)
    assert "firstNodeIndex 9 is out of range (the chain has 5 nodes)" in text
    assert "node 3 ('TBEL only'): configuration is invalid: TBEL script is not valid JavaScript" in text


def test_circular_connections_are_refused_naming_the_cycle() -> None:
    switch = "org.thingsboard.rule.engine.filter.TbMsgTypeSwitchNode"
    export = chain_export([node_entry(switch, f"s{i}") for i in range(3)], [(0, 1, "Other"), (1, 2, "Other"),
                                                                           (2, 1, "Other")])
    with pytest.raises(ChainProblems) as raised:
        load_chain(export)
    [problem] = raised.value.problems
    assert "Can't create circling relations in rule chain: 1 -> 2 -> 1" in problem.message


@pytest.mark.parametrize(("export", "expected"), [
    ([], "a rule chain export must be a JSON object"),
    ({"metadata": {}}, "'ruleChain' is missing"),
    ({"ruleChain": {"name": " "}, "metadata": {}}, "the rule chain's name is missing"),
    ({"ruleChain": {"name": "E", "type": "EDGE"}, "metadata": {}}, "only CORE chains run here"),
    ({"ruleChain": {"name": "X"}, "metadata": {"nodes": {}, "connections": 3}}, "'metadata.nodes' must be a list"),
])
def test_malformed_exports_are_refused(export: Any, expected: str) -> None:
    with pytest.raises(ChainProblems, match=expected):
        load_chain(export)


def test_a_file_that_is_not_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "chain.json"
    path.write_text("{not json")
    with pytest.raises(ChainProblems, match="cannot be read as JSON"):
        load_chain_file(str(path))


def test_configuration_problems_of_one_node_are_each_listed() -> None:
    export = chain_export([node_entry("org.thingsboard.rule.engine.rest.TbRestApiCallNode", "REST",
                                      {"requestMethod": "FETCH", "enableProxy": True, "configurationVersion": 4},
                                      configurationVersion=4)], [])
    with pytest.raises(ChainProblems) as raised:
        load_chain(export)
    assert len(raised.value.problems) == 2 and all(p.name == "REST" for p in raised.value.problems)
