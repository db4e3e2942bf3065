"""Flow nodes: Rule Chain (input: run another chain) and Output (return to the chain that called this one)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from twisted.internet.defer import Deferred, succeed

from nanoiot.rules.message import RuleMessage
from nanoiot.rules.nodes.base import BaseNode, InvalidConfig, NodeSpec, Outputs, failure

__all__ = ["RuleChainInputNode", "RuleChainOutputNode"]


class RuleChainInputNode(BaseNode):
    """Runs the message through another chain of the tenant; what that chain's Output nodes emit comes out here,
    each on the relation named after its Output node. ``forwardMsgToDefaultRuleChain`` (the originator's profile
    chain) is not supported: the configured chain is used."""

    type = "org.thingsboard.rule.engine.flow.TbRuleChainInputNode"
    version = 1
    relations = None
    default_config = {"ruleChainId": None, "forwardMsgToDefaultRuleChain": False}

    @classmethod
    def upgrade(cls, from_version: int, config: dict[str, Any]) -> dict[str, Any]:
        if from_version == 0:
            config.setdefault("forwardMsgToDefaultRuleChain", False)
        return config

    def __init__(self, spec: NodeSpec) -> None:
        super().__init__(spec)
        raw = self.config.get("ruleChainId")
        if not raw:
            raise InvalidConfig("Rule chain must be set!")
        try:
            self.target = UUID(str(raw))
        except ValueError:
            raise InvalidConfig(f"Failed to parse rule chain id: {raw}") from None
        if self.flag("forwardMsgToDefaultRuleChain"):
            self.warnings.append("forwardMsgToDefaultRuleChain is not supported: the configured chain is used")

    def deadline(self, msg: RuleMessage, now: int, default: float) -> float | None:
        return None  # the other chain's nodes are guarded one by one; together they may take longer

    def on_message(self, msg: RuleMessage, ctx: Any) -> Deferred[Outputs]:
        if self.target == self.spec.chain_id:
            return succeed([failure(msg, f"TbRuleChainInputNode in rule chain [{self.target}] is configured to "
                                         "forward messages back to the same rule chain it belongs to.")])
        return ctx.run_chain(self.target, msg)


class RuleChainOutputNode(BaseNode):
    """Ends the message's path here and hands it back to the calling chain, on the relation named after this
    node (at the top level, the engine returns it to whoever processed the message)."""

    type = "org.thingsboard.rule.engine.flow.TbRuleChainOutputNode"
    relations = ()
    default_config = {"version": 0}
    output = True

    def decide(self, msg: RuleMessage) -> Outputs:
        return [(self.name, msg)]
