"""Log, Rule Chain input/output, and the pass-through nodes (device profile, save time series / attributes)."""

from __future__ import annotations

from uuid import UUID

import pytest
from twisted.internet.defer import succeed

from nanoiot.rules.nodes.base import InvalidConfig
from nanoiot.rules.nodes.flow import RuleChainInputNode, RuleChainOutputNode
from nanoiot.rules.nodes.log import DEFAULT_SCRIPT, LogNode, standard_text
from nanoiot.rules.nodes.profile import AttributesNode, DeviceProfileNode, TimeseriesNode
from tests.unit.rules.fakes import CHAIN, FakeContext, build, message, relations, result_of

OTHER_CHAIN = UUID("00000000-0000-0000-0000-0000000000c2")


def test_log_with_the_default_script_writes_thingsboards_text_without_running_a_script(ctx: FakeContext) -> None:
    node = build(LogNode, {"scriptLang": "TBEL", "jsScript": DEFAULT_SCRIPT, "tbelScript": DEFAULT_SCRIPT})
    assert node.script is None
    msg = message(data={"a": 1}, metadata={"k": "v"})
    assert result_of(node.on_message(msg, ctx)) == [("Success", msg)]
    assert ctx.lines == ['\nIncoming message:\n{"a":1}\nIncoming metadata:\n{"k":"v"}']


def test_log_of_a_3x_export_with_only_the_default_js_script_is_standard_too() -> None:
    assert build(LogNode, {"jsScript": DEFAULT_SCRIPT}).script is None


def test_standard_text_is_what_the_default_script_would_return(inline_scripts: object) -> None:
    node = build(LogNode, {"scriptLang": "JS", "jsScript": DEFAULT_SCRIPT + " "})  # not standard: runs
    ctx = FakeContext(scripts=inline_scripts)
    msg = message(data={"a": [1, "x"]}, metadata={"k": "v"})
    result_of(node.on_message(msg, ctx))
    assert ctx.lines == [standard_text(msg)]


def test_log_with_a_custom_script_logs_its_string(ctx: FakeContext) -> None:
    node = build(LogNode, {"scriptLang": "JS", "jsScript": "return 'device ' + metadata.deviceName;"})
    result_of(node.on_message(message(metadata={"deviceName": "p1"}), ctx))
    assert ctx.lines == ["device p1"]


def test_log_script_that_returns_no_string_is_a_failure(ctx: FakeContext) -> None:
    node = build(LogNode, {"scriptLang": "JS", "jsScript": "return 42;"})
    assert relations(result_of(node.on_message(message(), ctx))) == ["Failure"]
    assert ctx.lines == []


# --- flow ----------------------------------------------------------------------------------------------------------


def test_rule_chain_input_runs_the_other_chain_and_emits_its_outputs(ctx: FakeContext) -> None:
    seen = []

    def other_chain(msg: object) -> object:
        seen.append(msg)
        return succeed([("Done", msg)])

    ctx.chains[OTHER_CHAIN] = other_chain
    node = build(RuleChainInputNode, {"ruleChainId": str(OTHER_CHAIN)})
    msg = message()
    assert result_of(node.on_message(msg, ctx)) == [("Done", msg)]
    assert seen == [msg]


def test_rule_chain_input_to_its_own_chain_is_a_failure(ctx: FakeContext) -> None:
    node = build(RuleChainInputNode, {"ruleChainId": str(CHAIN)}, chain_id=CHAIN)
    assert relations(result_of(node.on_message(message(), ctx))) == ["Failure"]


def test_rule_chain_input_needs_a_chain_id() -> None:
    with pytest.raises(InvalidConfig, match="Rule chain must be set!"):
        build(RuleChainInputNode, {})
    with pytest.raises(InvalidConfig, match="Failed to parse rule chain id"):
        build(RuleChainInputNode, {"ruleChainId": "root"})


def test_rule_chain_input_upgrade_adds_forward_to_default_chain() -> None:
    assert RuleChainInputNode.upgrade(0, {"ruleChainId": "x"}) == {"ruleChainId": "x",
                                                                  "forwardMsgToDefaultRuleChain": False}


def test_output_node_emits_the_message_on_its_own_name() -> None:
    msg = message()
    assert build(RuleChainOutputNode, {}, name="Answered").decide(msg) == [("Answered", msg)]


# --- pass-throughs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("node_class", [DeviceProfileNode, TimeseriesNode, AttributesNode])
def test_pass_through_nodes_send_every_message_on_with_success_and_say_so(node_class: type,
                                                                          ctx: FakeContext) -> None:
    node = build(node_class, {})
    msg = message("RPC_CALL_FROM_SERVER_TO_DEVICE")
    assert result_of(node.on_message(msg, ctx)) == [("Success", msg)]
    assert node.warnings


def test_device_profile_upgrade_from_version_0() -> None:
    assert DeviceProfileNode.upgrade(0, {"persistAlarmRulesState": False, "fetchAlarmRulesStateOnStart": True}) == \
        {"persistAlarmRulesState": False, "fetchAlarmRulesStateOnStart": False}
