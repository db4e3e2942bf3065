"""Log: writes a line about the message (through ``ctx.log``) and passes it on.

ThingsBoard's default script (the one in every default chain) is not run: its text is built directly, as
ThingsBoard itself does (TbLogNode.isStandard), so that the default root chain costs no script call.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed

from nanoiot.rules.message import SUCCESS, RuleMessage, compact_json
from nanoiot.rules.nodes.base import Outputs, failure
from nanoiot.rules.nodes.scripted import ScriptedNode, wrong_type

__all__ = ["LogNode", "standard_text"]

DEFAULT_SCRIPT = ("return '\\nIncoming message:\\n' + JSON.stringify(msg) + "
                  "'\\nIncoming metadata:\\n' + JSON.stringify(metadata);")


def standard_text(msg: RuleMessage) -> str:
    """What the default script writes (data as it is, metadata as JSON)."""
    return f"\nIncoming message:\n{msg.data}\nIncoming metadata:\n{compact_json(dict(msg.metadata))}"


class LogNode(ScriptedNode):
    """ThingsBoard's "log"."""

    type = "org.thingsboard.rule.engine.action.TbLogNode"
    default_config = {"scriptLang": "TBEL", "jsScript": DEFAULT_SCRIPT, "tbelScript": DEFAULT_SCRIPT}

    def uses_script(self, body: Any) -> bool:
        return body != DEFAULT_SCRIPT

    def on_message(self, msg: RuleMessage, ctx: Any) -> Deferred[Outputs]:
        if self.script is None:
            ctx.log(standard_text(msg))
            return succeed([(SUCCESS, msg)])

        def logged(text: Any) -> Outputs:
            if not isinstance(text, str):
                return [failure(msg, wrong_type(text))]
            ctx.log(text)
            return [(SUCCESS, msg)]

        return self.run_script(msg, ctx).addCallback(logged)
