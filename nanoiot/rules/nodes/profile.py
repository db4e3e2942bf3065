"""Nodes that pass messages on unchanged: this server keeps no alarms, telemetry or attributes.

ThingsBoard's default root chains contain them (Device Profile Node in 3.2-4.2, Save Timeseries and Save Client
Attributes in all), so a chain exported from ThingsBoard loads and routes here as it does there, with Success.
The chain's warnings say which nodes do nothing.
"""

from __future__ import annotations

from typing import Any

from nanoiot.rules.message import FAILURE, SUCCESS, RuleMessage
from nanoiot.rules.nodes.base import BaseNode, NodeSpec, Outputs

__all__ = ["AttributesNode", "DeviceProfileNode", "PassThroughNode", "TimeseriesNode"]


class PassThroughNode(BaseNode):
    """Sends every message on, unchanged, with Success."""

    #: What the node does in ThingsBoard and not here (for the chain's warnings).
    not_done = ""

    def __init__(self, spec: NodeSpec) -> None:
        super().__init__(spec)
        if self.not_done:
            self.warnings.append(f"passes every message on with Success: {self.not_done}")

    def decide(self, msg: RuleMessage) -> Outputs:
        return [(SUCCESS, msg)]


class DeviceProfileNode(PassThroughNode):
    """ThingsBoard's "device profile" (deprecated there since 4.2)."""

    type = "org.thingsboard.rule.engine.profile.TbDeviceProfileNode"
    version = 1
    relations = ("Alarm Created", "Alarm Updated", "Alarm Severity Updated", "Alarm Cleared", SUCCESS, FAILURE)
    default_config = {"persistAlarmRulesState": False, "fetchAlarmRulesStateOnStart": False}
    not_done = "device profile alarm rules are not evaluated here"

    @classmethod
    def upgrade(cls, from_version: int, config: dict[str, Any]) -> dict[str, Any]:
        if from_version == 0 and "persistAlarmRulesState" in config and not config["persistAlarmRulesState"]:
            config["fetchAlarmRulesStateOnStart"] = False
        return config


class TimeseriesNode(PassThroughNode):
    """ThingsBoard's "save time series"."""

    type = "org.thingsboard.rule.engine.telemetry.TbMsgTimeseriesNode"
    version = None  # configuration kept exactly as exported
    not_done = "time series are not stored here"


class AttributesNode(PassThroughNode):
    """ThingsBoard's "save attributes"."""

    type = "org.thingsboard.rule.engine.telemetry.TbMsgAttributesNode"
    version = None
    not_done = "attributes are not stored here"
