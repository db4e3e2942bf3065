"""Filter nodes: message type switch and filter, script filter, script switch (ThingsBoard's semantics)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from nanoiot.rules.message import FAILURE, FALSE, MSG_TYPES, OTHER, TRUE, RuleMessage, switch_label
from nanoiot.rules.nodes.base import BaseNode, InvalidConfig, NodeSpec, Outputs, failure
from nanoiot.rules.nodes.scripted import ScriptedNode, wrong_type

__all__ = ["MsgTypeFilterNode", "MsgTypeSwitchNode", "ScriptFilterNode", "ScriptSwitchNode"]

_FILTER_DEFAULT_JS = "return msg.temperature > 20;"
_SWITCH_DEFAULT = ("function nextRelation(metadata, msg) {\n    return ['one','nine'];\n}\n"
                   "if(msgType == 'POST_TELEMETRY_REQUEST') {\n    return ['two'];\n}\nreturn nextRelation(metadata, msg);")


class MsgTypeSwitchNode(BaseNode):
    """Routes by message type: the type's label ("RPC Request to Device", ...), or "Other"."""

    type = "org.thingsboard.rule.engine.filter.TbMsgTypeSwitchNode"
    relations = tuple(dict.fromkeys([*MSG_TYPES.values(), OTHER, FAILURE]))
    default_config = {"version": 0}

    def decide(self, msg: RuleMessage) -> Outputs:
        return [(switch_label(msg.type), msg)]


class MsgTypeFilterNode(BaseNode):
    """True when the message type NAME is one of ``messageTypes``, else False."""

    type = "org.thingsboard.rule.engine.filter.TbMsgTypeFilterNode"
    relations = (TRUE, FALSE, FAILURE)
    default_config = {"messageTypes": ["POST_ATTRIBUTES_REQUEST", "POST_TELEMETRY_REQUEST", "TO_SERVER_RPC_REQUEST"]}

    def __init__(self, spec: NodeSpec) -> None:
        super().__init__(spec)
        types = self.config.get("messageTypes")
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise InvalidConfig("'messageTypes' must be a list of message type names")
        self.message_types = frozenset(types)

    def decide(self, msg: RuleMessage) -> Outputs:
        return [(TRUE if msg.type in self.message_types else FALSE, msg)]


def filter_outputs(msg: RuleMessage, result: Any) -> Outputs:
    """A filter script's result: a boolean picks True or False; anything else is a Failure."""
    if isinstance(result, bool):
        return [(TRUE if result else FALSE, msg)]
    return [failure(msg, wrong_type(result))]


def switch_outputs(msg: RuleMessage, result: Any) -> Outputs:
    """A switch script's result: a relation name or a list of them (each once; an empty list drops the message)."""
    if isinstance(result, str):
        return [(result, msg)]
    if isinstance(result, list):
        for item in result:
            if not isinstance(item, str):
                return [failure(msg, wrong_type(item))]
        return [(relation, msg) for relation in dict.fromkeys(result)]
    return [failure(msg, wrong_type(result))]


class ScriptFilterNode(ScriptedNode):
    """ThingsBoard's "script" filter: the script returns true or false."""

    type = "org.thingsboard.rule.engine.filter.TbJsFilterNode"
    relations = (TRUE, FALSE, FAILURE)
    default_config = {"scriptLang": "TBEL", "jsScript": _FILTER_DEFAULT_JS, "tbelScript": _FILTER_DEFAULT_JS}

    def on_message(self, msg: RuleMessage, ctx: Any) -> Deferred[Outputs]:
        return self.run_script(msg, ctx).addCallback(lambda result: filter_outputs(msg, result))


class ScriptSwitchNode(ScriptedNode):
    """ThingsBoard's "switch": the script returns the relation(s) to send the message on."""

    type = "org.thingsboard.rule.engine.filter.TbJsSwitchNode"
    relations = None
    default_config = {"scriptLang": "TBEL", "jsScript": _SWITCH_DEFAULT, "tbelScript": _SWITCH_DEFAULT}

    def on_message(self, msg: RuleMessage, ctx: Any) -> Deferred[Outputs]:
        return self.run_script(msg, ctx).addCallback(lambda result: switch_outputs(msg, result))
