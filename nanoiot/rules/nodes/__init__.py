"""The built-in rule nodes, one module per family; ``BUILTIN_NODES`` lists them for the registry."""

from __future__ import annotations

from nanoiot.rules.nodes.base import BaseNode
from nanoiot.rules.nodes.filters import MsgTypeFilterNode, MsgTypeSwitchNode, ScriptFilterNode, ScriptSwitchNode
from nanoiot.rules.nodes.flow import RuleChainInputNode, RuleChainOutputNode
from nanoiot.rules.nodes.log import LogNode
from nanoiot.rules.nodes.profile import AttributesNode, DeviceProfileNode, TimeseriesNode
from nanoiot.rules.nodes.relations import CheckRelationNode, CreateRelationNode
from nanoiot.rules.nodes.rest import RestApiCallNode
from nanoiot.rules.nodes.rpc import RpcReplyNode, RpcRequestNode
from nanoiot.rules.nodes.transform import ChangeOriginatorNode, TransformNode

BUILTIN_NODES: tuple[type[BaseNode], ...] = (
    MsgTypeSwitchNode,
    MsgTypeFilterNode,
    ScriptFilterNode,
    ScriptSwitchNode,
    CheckRelationNode,
    RpcRequestNode,
    RpcReplyNode,
    ChangeOriginatorNode,
    TransformNode,
    CreateRelationNode,
    RuleChainInputNode,
    RuleChainOutputNode,
    RestApiCallNode,
    LogNode,
    DeviceProfileNode,
    TimeseriesNode,
    AttributesNode,
)

__all__ = ["BUILTIN_NODES"]
