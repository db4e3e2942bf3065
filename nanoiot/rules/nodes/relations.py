"""Relation nodes: check relation presence (a filter in ThingsBoard's palette) and create relation.

Direction, as of configuration version 1 of both nodes: "FROM" means a relation from the originator to the other
entity, "TO" one from the other entity to the originator. Version 0 meant the opposite; the upgrades flip it (check
relation always, create relation only when the old ``entityCacheExpiration`` key is present, as ThingsBoard does).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from twisted.internet.defer import Deferred, succeed

from nanoiot.rules.message import FAILURE, FALSE, SUCCESS, TRUE, EntityId, RuleMessage
from nanoiot.rules.nodes.base import BaseNode, InvalidConfig, NodeSpec, Outputs, failure
from nanoiot.rules.patterns import process_pattern

__all__ = ["CheckRelationNode", "CreateRelationNode", "flip_direction"]

DIRECTIONS = ("FROM", "TO")
#: Target types of create relation (TbAbstractRelationActionNode.supportedEntityTypes).
TARGET_TYPES = ("TENANT", "DEVICE", "ASSET", "CUSTOMER", "ENTITY_VIEW", "DASHBOARD", "EDGE", "USER")


def flip_direction(config: dict[str, Any]) -> dict[str, Any]:
    """The v0 -> v1 upgrade: FROM <-> TO (raises when there is no valid direction to flip)."""
    direction = config.get("direction")
    if direction not in DIRECTIONS:
        raise ValueError(f"property to update: 'direction' has invalid value {direction!r}")
    config["direction"] = "TO" if direction == "FROM" else "FROM"
    return config


def ends(direction: str, originator: EntityId, other: EntityId) -> tuple[EntityId, EntityId]:
    """(from, to) of the relation between the originator and another entity, for a v1 direction."""
    return (originator, other) if direction == "FROM" else (other, originator)


class CheckRelationNode(BaseNode):
    """True if the originator has the relation (to one configured entity, or to any), else False."""

    type = "org.thingsboard.rule.engine.filter.TbCheckRelationNode"
    version = 1
    relations = (TRUE, FALSE, FAILURE)
    default_config = {"checkForSingleEntity": True, "direction": "FROM", "entityType": None, "entityId": None,
                      "relationType": "Contains"}

    @classmethod
    def upgrade(cls, from_version: int, config: dict[str, Any]) -> dict[str, Any]:
        if from_version == 0:
            return flip_direction(config)
        return config

    def __init__(self, spec: NodeSpec) -> None:
        super().__init__(spec)
        self.direction = self.config.get("direction")
        if self.direction not in DIRECTIONS:
            raise InvalidConfig("'direction' must be FROM or TO")
        self.relation_type = self.text("relationType", required=True)
        self.single: EntityId | None = None
        if self.flag("checkForSingleEntity", True):
            entity_type, entity_id = self.config.get("entityType"), self.config.get("entityId")
            if not entity_type or not entity_id:
                raise InvalidConfig("Entity should be specified!")
            try:
                self.single = EntityId(str(entity_type), UUID(str(entity_id)))
            except ValueError:
                raise InvalidConfig(f"'entityId' is not a UUID: {entity_id!r}") from None

    def on_message(self, msg: RuleMessage, ctx: Any) -> Deferred[Outputs]:
        if self.single is not None:
            from_, to = ends(self.direction, msg.originator, self.single)
            d = ctx.relation_exists(from_, to, self.relation_type, to.entity_type)
        else:
            d = ctx.find_related(msg.originator, self.direction, self.relation_type, 1, [])
            d.addCallback(bool)
        return d.addCallback(lambda present: [(TRUE if present else FALSE, msg)])


class CreateRelationNode(BaseNode):
    """Finds the target entity (by name pattern, or the tenant) and makes sure the relation with the originator
    exists; optionally removes the originator's current relations of that type first, and optionally sends the
    message on as the target's. Entities are never created here: ``createEntityIfNotExists`` only finds."""

    type = "org.thingsboard.rule.engine.action.TbCreateRelationNode"
    version = 1
    default_config = {"direction": "FROM", "relationType": "Contains", "entityType": None, "entityNamePattern": "",
                      "entityTypePattern": None, "createEntityIfNotExists": False,
                      "changeOriginatorToRelatedEntity": False, "removeCurrentRelations": False}

    @classmethod
    def upgrade(cls, from_version: int, config: dict[str, Any]) -> dict[str, Any]:
        if from_version == 0 and "entityCacheExpiration" in config:
            del config["entityCacheExpiration"]
            return flip_direction(config)
        return config

    def __init__(self, spec: NodeSpec) -> None:
        super().__init__(spec)
        problems = []
        self.direction = self.config.get("direction")
        if self.direction not in DIRECTIONS:
            problems.append("'direction' must be FROM or TO")
        self.entity_type = self.config.get("entityType")
        if self.entity_type not in TARGET_TYPES:
            problems.append(f"Unsupported entity type {self.entity_type!r}! Only {', '.join(TARGET_TYPES)} types "
                            "are allowed.")
        if self.entity_type != "TENANT" and not self.config.get("entityNamePattern"):
            problems.append("'entityNamePattern' must be set")
        if not self.config.get("relationType"):
            problems.append("'relationType' must be set")
        if problems:
            raise InvalidConfig(*problems)
        self.remove_current = self.flag("removeCurrentRelations")
        self.change_originator = self.flag("changeOriginatorToRelatedEntity")
        if self.flag("createEntityIfNotExists"):
            self.warnings.append("createEntityIfNotExists is not supported: a missing target entity is a Failure")

    def target(self, msg: RuleMessage, ctx: Any) -> Deferred[EntityId | None]:
        if self.entity_type == "TENANT":
            return succeed(EntityId("TENANT", ctx.tenant_id))
        return ctx.find_entity_by_name(self.entity_type, process_pattern(self.config["entityNamePattern"], msg))

    def on_message(self, msg: RuleMessage, ctx: Any) -> Deferred[Outputs]:
        relation_type = process_pattern(self.config["relationType"], msg)
        name = process_pattern(str(self.config.get("entityNamePattern") or ""), msg)

        def found(target: EntityId | None) -> Any:
            if target is None:
                return [failure(msg, f"{self.entity_type} with name '{name}' doesn't exist!")]
            d: Deferred[Any] = succeed(None)
            if self.remove_current:
                d = ctx.remove_relations(msg.originator, self.direction, relation_type)
            from_, to = ends(self.direction, msg.originator, target)
            d.addCallback(lambda _: ctx.relation_exists(from_, to, relation_type, to.entity_type))
            d.addCallback(lambda exists: None if exists else ctx.create_relation(from_, to, relation_type))
            d.addCallback(lambda _: [(SUCCESS, msg.with_(originator=target) if self.change_originator else msg)])
            return d

        return self.target(msg, ctx).addCallback(found)
