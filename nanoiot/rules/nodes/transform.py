"""Transformation nodes: change originator, script transformation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed

from nanoiot.ids import uuid4
from nanoiot.rules.message import SUCCESS, EntityId, RuleMessage, compact_json
from nanoiot.rules.nodes.base import BaseNode, InvalidConfig, NodeSpec, Outputs, failure
from nanoiot.rules.nodes.scripted import ScriptedNode, wrong_type
from nanoiot.rules.patterns import process_pattern

__all__ = ["ChangeOriginatorNode", "TransformNode", "transform_outputs"]

NOT_FOUND = "Failed to find new originator!"
SOURCES = ("CUSTOMER", "TENANT", "RELATED", "ALARM_ORIGINATOR", "ENTITY")
#: Entity types "Entity by name pattern" may look up (EntitiesByNameAndTypeLoader).
NAMED_TYPES = ("DEVICE", "ASSET", "ENTITY_VIEW", "EDGE", "USER")
DIRECTIONS = ("FROM", "TO")

_TRANSFORM_DEFAULT = "return {msg: msg, metadata: metadata, msgType: msgType};"


def relation_filters(query: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    """(relation type, entity types) of a relations query's filters; no filter means any relation."""
    filters = query.get("filters") or []
    out = []
    for f in filters:
        if not isinstance(f, Mapping):
            raise InvalidConfig("relationsQuery.filters must be objects")
        types = f.get("entityTypes") or []
        if not isinstance(types, list):
            raise InvalidConfig("relationsQuery.filters[].entityTypes must be a list")
        out.append((f.get("relationType") or "", [str(t) for t in types]))
    return out or [("", [])]


class ChangeOriginatorNode(BaseNode):
    """The same message from another originator: the originator's customer, the tenant, the first related entity,
    or an entity found by name pattern."""

    type = "org.thingsboard.rule.engine.transform.TbChangeOriginatorNode"
    default_config = {
        "originatorSource": "CUSTOMER",
        "relationsQuery": {"direction": "FROM", "maxLevel": 1,
                           "filters": [{"relationType": "Contains", "entityTypes": [], "negate": False}],
                           "fetchLastLevelOnly": False},
        "entityType": None,
        "entityNamePattern": None,
    }

    def __init__(self, spec: NodeSpec) -> None:
        super().__init__(spec)
        self.source = self.config.get("originatorSource")
        if self.source not in SOURCES:
            raise InvalidConfig(f"'originatorSource' must be one of {', '.join(SOURCES)}")
        if self.source == "RELATED":
            query = self.config.get("relationsQuery")
            if not isinstance(query, Mapping):
                raise InvalidConfig("Relations query should be specified if 'Related entity' source is selected.")
            self.direction = query.get("direction") or "FROM"
            if self.direction not in DIRECTIONS:
                raise InvalidConfig("relationsQuery.direction must be FROM or TO")
            self.max_level = int(query.get("maxLevel") or 1)
            self.filters = relation_filters(query)
        if self.source == "ENTITY":
            entity_type = self.config.get("entityType")
            if not entity_type:
                raise InvalidConfig("Entity type should be specified if 'Entity by name pattern' source is selected.")
            if entity_type not in NAMED_TYPES:
                raise InvalidConfig(f"Unexpected entity type {entity_type!r}: only {', '.join(NAMED_TYPES)}")
            if not self.config.get("entityNamePattern"):
                raise InvalidConfig("Name pattern should be specified if 'Entity by name pattern' source is "
                                    "selected.")
            self.entity_type = entity_type
        if self.source == "ALARM_ORIGINATOR":
            self.warnings.append("originator source ALARM_ORIGINATOR needs alarms, which this server does not have: "
                                 "every message goes down Failure")

    def on_message(self, msg: RuleMessage, ctx: Any) -> Deferred[Outputs]:
        return self.find(msg, ctx).addCallback(lambda found: self.outputs(msg, found))

    @staticmethod
    def outputs(msg: RuleMessage, new_originator: EntityId | None) -> Outputs:
        if new_originator is None:
            return [failure(msg, NOT_FOUND)]
        return [(SUCCESS, msg.with_(originator=new_originator))]

    def find(self, msg: RuleMessage, ctx: Any) -> Deferred[EntityId | None]:
        originator = msg.originator
        if self.source == "CUSTOMER":
            if originator.entity_type == "CUSTOMER":
                return succeed(originator)
            return ctx.customer_of(originator).addCallback(
                lambda customer: None if customer is None or customer.int == 0 else EntityId("CUSTOMER", customer))
        if self.source == "TENANT":
            return succeed(EntityId("TENANT", ctx.tenant_id))
        if self.source == "RELATED":
            return self._first_related(ctx, originator, 0)
        if self.source == "ENTITY":
            return ctx.find_entity_by_name(self.entity_type, process_pattern(self.config["entityNamePattern"], msg))
        return succeed(None)  # ALARM_ORIGINATOR: no alarms here

    def _first_related(self, ctx: Any, originator: EntityId, i: int) -> Deferred[EntityId | None]:
        """The first entity of the first filter that finds any (ThingsBoard ORs the filters of one query)."""
        relation_type, entity_types = self.filters[i]
        d = ctx.find_related(originator, self.direction, relation_type, self.max_level, entity_types)

        def next_filter(found: list[EntityId]) -> Any:
            if found:
                return found[0]
            if i + 1 < len(self.filters):
                return self._first_related(ctx, originator, i + 1)
            return None

        return d.addCallback(next_filter)


def _metadata_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return compact_json(value)


def unbind(result: Any, msg: RuleMessage) -> RuleMessage:
    """One ``{msg?, metadata?, msgType?}`` a transformation script returned, as a message (ThingsBoard's
    unbindMsg): missing parts keep the original's; metadata values become strings, nulls are dropped."""
    if not isinstance(result, dict):
        raise TypeError(wrong_type(result))
    changes: dict[str, Any] = {}
    if "msg" in result:
        changes["data"] = compact_json(result["msg"])
    metadata = result.get("metadata")
    if isinstance(metadata, dict):
        changes["metadata"] = {str(k): text for k, v in metadata.items()
                               if (text := _metadata_value(v)) is not None}
    msg_type = result.get("msgType")
    if isinstance(msg_type, str) and msg_type:
        changes["type"] = msg_type
    return msg.with_(**changes) if changes else msg


def transform_outputs(msg: RuleMessage, result: Any) -> Outputs:
    """A transformation script's result: an object (one message) or an array of them (one message each, each with
    its own id); an empty array or anything else is a Failure."""
    try:
        if isinstance(result, list):
            if not result:
                return [failure(msg, "Message or messages list are empty!")]
            if len(result) == 1:
                return [(SUCCESS, unbind(result[0], msg))]
            return [(SUCCESS, unbind(item, msg).with_(id=uuid4())) for item in result]
        return [(SUCCESS, unbind(result, msg))]
    except TypeError as e:
        return [failure(msg, str(e))]


class TransformNode(ScriptedNode):
    """ThingsBoard's "script" transformation."""

    type = "org.thingsboard.rule.engine.transform.TbTransformMsgNode"
    default_config = {"scriptLang": "TBEL", "jsScript": _TRANSFORM_DEFAULT, "tbelScript": _TRANSFORM_DEFAULT}

    def on_message(self, msg: RuleMessage, ctx: Any) -> Deferred[Outputs]:
        return self.run_script(msg, ctx).addCallback(lambda result: transform_outputs(msg, result))

