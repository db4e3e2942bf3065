"""The part the four script nodes share (filter, switch, transformation, log): which script, and compiling it.

ThingsBoard's rule: the active script is ``tbelScript`` when ``scriptLang`` is "TBEL", else ``jsScript``; no
``scriptLang`` (exports before 3.5) means JavaScript. A TBEL script runs here when it is also valid JavaScript
(most are: TBEL's expressions, literals and ``return`` read the same); otherwise the chain is refused at load, naming
the node.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from nanoiot.rules.message import RuleMessage
from nanoiot.rules.nodes.base import BaseNode, InvalidConfig, NodeSpec
from nanoiot.rules.scripts import Script, ScriptError, compile_script

__all__ = ["ScriptedNode", "script_source"]

JS = "JS"
TBEL = "TBEL"


def script_source(config: dict[str, Any]) -> tuple[str, Any]:
    """(language, body) of the script a configuration selects."""
    lang = config.get("scriptLang") or JS
    if lang not in (JS, TBEL):
        raise InvalidConfig(f"'scriptLang' must be JS or TBEL, not {lang!r}")
    return lang, config.get("tbelScript" if lang == TBEL else "jsScript")


class ScriptedNode(BaseNode):
    version = 0

    def __init__(self, spec: NodeSpec) -> None:
        super().__init__(spec)
        # Not merged with defaults: a missing scriptLang means JS, not the default TBEL.
        self.lang, body = script_source(spec.configuration)
        self.script: Script | None = None
        if self.uses_script(body):
            self.script = self.compile(body)

    def uses_script(self, body: Any) -> bool:
        return True

    def compile(self, body: Any) -> Script:
        try:
            return compile_script(body, self.name)
        except ScriptError as e:
            if self.lang == TBEL and body and isinstance(body, str) and body.strip():
                raise InvalidConfig(f"TBEL script is not valid JavaScript, so it cannot run here: {e.message}") \
                    from None
            raise InvalidConfig(f"{self.lang} script: {e.message}") from None

    def run_script(self, msg: RuleMessage, ctx: Any) -> Deferred[Any]:
        assert self.script is not None
        return ctx.scripts.run(self.script, msg.json(), msg.metadata, msg.type)


def wrong_type(value: Any) -> str:
    """ThingsBoard's words for a script result of the wrong kind."""
    kind = ("NULL" if value is None else "BOOLEAN" if isinstance(value, bool) else
            "NUMBER" if isinstance(value, (int, float)) else "STRING" if isinstance(value, str) else
            "ARRAY" if isinstance(value, list) else "OBJECT")
    return f"Wrong result type: {kind}"
