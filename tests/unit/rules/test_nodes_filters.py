"""Filter nodes, one message in, messages out: message type switch and filter, script filter, script switch.

Script nodes run their JavaScript in the InlineScriptRunner (the real sandbox, on the test thread)."""

from __future__ import annotations

import pytest

from nanoiot.rules.nodes.base import InvalidConfig
from nanoiot.rules.nodes.filters import (
    MsgTypeFilterNode,
    MsgTypeSwitchNode,
    ScriptFilterNode,
    ScriptSwitchNode,
    filter_outputs,
    switch_outputs,
)
from tests.unit.rules.fakes import FakeContext, build, message, relations, result_of


def test_type_switch_sends_each_type_on_its_label() -> None:
    node = build(MsgTypeSwitchNode, {"version": 0})
    rpc = message("RPC_CALL_FROM_SERVER_TO_DEVICE")
    assert node.decide(rpc) == [("RPC Request to Device", rpc)]
    assert relations(node.decide(message("TO_SERVER_RPC_REQUEST"))) == ["RPC Request from Device"]
    assert relations(node.decide(message("SOMETHING_CUSTOM"))) == ["Other"]


def test_type_switch_declares_every_label_plus_other_and_failure() -> None:
    assert {"RPC Request to Device", "RPC Queued", "Other", "Failure"} <= set(MsgTypeSwitchNode.relations)


def test_type_filter_is_true_for_listed_type_names(ctx: FakeContext) -> None:
    node = build(MsgTypeFilterNode, {"messageTypes": ["TO_SERVER_RPC_REQUEST"]})
    assert relations(result_of(node.on_message(message("TO_SERVER_RPC_REQUEST"), ctx))) == ["True"]
    assert relations(result_of(node.on_message(message("POST_TELEMETRY_REQUEST"), ctx))) == ["False"]


def test_type_filter_defaults_to_thingsboards_three_types() -> None:
    node = build(MsgTypeFilterNode, {})
    assert relations(node.decide(message("POST_ATTRIBUTES_REQUEST"))) == ["True"]
    assert relations(node.decide(message("RPC_CALL_FROM_SERVER_TO_DEVICE"))) == ["False"]


def test_type_filter_refuses_a_type_list_that_is_not_one() -> None:
    with pytest.raises(InvalidConfig):
        build(MsgTypeFilterNode, {"messageTypes": "TO_SERVER_RPC_REQUEST"})


# --- script filter --------------------------------------------------------------------------------------------------


def js(script: str, lang: str = "JS") -> dict[str, str]:
    return {"scriptLang": lang, "jsScript": script, "tbelScript": script}


def test_script_filter_true_and_false(ctx: FakeContext) -> None:
    node = build(ScriptFilterNode, js("return msg.temperature > 20;"))
    assert relations(result_of(node.on_message(message(data={"temperature": 25}), ctx))) == ["True"]
    assert relations(result_of(node.on_message(message(data={"temperature": 15}), ctx))) == ["False"]


def test_script_filter_sees_metadata_and_message_type(ctx: FakeContext) -> None:
    node = build(ScriptFilterNode, js("return metadata.deviceType == 'pump' && msgType == 'TO_SERVER_RPC_REQUEST';"))
    msg = message("TO_SERVER_RPC_REQUEST", metadata={"deviceType": "pump"})
    assert relations(result_of(node.on_message(msg, ctx))) == ["True"]


def test_script_filter_result_that_is_not_boolean_is_a_failure() -> None:
    msg = message()
    [(relation, out)] = filter_outputs(msg, "yes")
    assert relation == "Failure" and out.error == "Wrong result type: STRING"


def test_script_filter_that_throws_fails_its_deferred_with_the_js_error(ctx: FakeContext) -> None:
    node = build(ScriptFilterNode, js("throw new Error('no temperature');"))
    with pytest.raises(Exception, match="no temperature"):
        result_of(node.on_message(message(), ctx))


def test_script_filter_without_script_lang_is_javascript() -> None:
    node = build(ScriptFilterNode, {"jsScript": "return true;"})
    assert node.lang == "JS"


def test_tbel_filter_that_is_valid_javascript_runs(ctx: FakeContext) -> None:
    node = build(ScriptFilterNode, {"scriptLang": "TBEL", "tbelScript": "return msg.temperature > 20;",
                                    "jsScript": "this is not used"})
    assert relations(result_of(node.on_message(message(data={"temperature": 30}), ctx))) == ["True"]


def test_tbel_filter_that_is_not_javascript_is_refused_naming_tbel() -> None:
    with pytest.raises(InvalidConfig, match="TBEL script is not valid JavaScript"):
        build(ScriptFilterNode, {"scriptLang": "TBEL", "tbelScript": "foreach (x : msg.list) { x }"})


def test_blank_or_missing_script_is_refused() -> None:
    with pytest.raises(InvalidConfig, match="script is empty"):
        build(ScriptFilterNode, {"scriptLang": "JS", "jsScript": "  "})
    with pytest.raises(InvalidConfig, match="script is empty"):
        build(ScriptFilterNode, {})  # no scriptLang: JavaScript, and there is no jsScript


# --- script switch --------------------------------------------------------------------------------------------------


def test_script_switch_sends_the_message_on_every_relation_returned(ctx: FakeContext) -> None:
    node = build(ScriptSwitchNode, js("return ['one', 'nine', 'one'];"))
    msg = message()
    assert result_of(node.on_message(msg, ctx)) == [("one", msg), ("nine", msg)]


def test_script_switch_accepts_a_single_relation_name(ctx: FakeContext) -> None:
    node = build(ScriptSwitchNode, js("if (msgType == 'POST_TELEMETRY_REQUEST') { return 'two'; } return 'x';"))
    assert relations(result_of(node.on_message(message(), ctx))) == ["two"]


def test_script_switch_with_thingsboards_default_tbel_script_runs(ctx: FakeContext) -> None:
    node = build(ScriptSwitchNode, ScriptSwitchNode.default_config)  # TBEL, and valid JavaScript
    assert relations(result_of(node.on_message(message(), ctx))) == ["two"]
    assert relations(result_of(node.on_message(message("OTHER"), ctx))) == ["one", "nine"]


def test_script_switch_empty_list_drops_the_message_and_wrong_types_fail() -> None:
    msg = message()
    assert switch_outputs(msg, []) == []
    assert relations(switch_outputs(msg, 5)) == ["Failure"]
    assert relations(switch_outputs(msg, ["a", 1])) == ["Failure"]
