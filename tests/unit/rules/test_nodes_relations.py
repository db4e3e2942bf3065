"""Check relation presence and create relation, with the direction meaning of configuration version 1."""

from __future__ import annotations

import pytest

from nanoiot.rules.message import EntityId
from nanoiot.rules.nodes.base import InvalidConfig
from nanoiot.rules.nodes.relations import CheckRelationNode, CreateRelationNode
from tests.unit.rules.fakes import ASSET, DEVICE, TENANT, FakeContext, build, message, relations, result_of


def check(direction: str, single: bool = True, relation_type: str = "Contains") -> dict[str, object]:
    config: dict[str, object] = {"direction": direction, "relationType": relation_type,
                                 "checkForSingleEntity": single}
    if single:
        config.update(entityType=ASSET.entity_type, entityId=str(ASSET.id))
    return config


def test_check_from_means_a_relation_from_the_originator_to_the_entity(ctx: FakeContext) -> None:
    ctx.relate(DEVICE, ASSET)
    assert relations(result_of(build(CheckRelationNode, check("FROM")).on_message(message(), ctx))) == ["True"]
    assert relations(result_of(build(CheckRelationNode, check("TO")).on_message(message(), ctx))) == ["False"]


def test_check_to_means_a_relation_from_the_entity_to_the_originator(ctx: FakeContext) -> None:
    ctx.relate(ASSET, DEVICE)
    assert relations(result_of(build(CheckRelationNode, check("TO")).on_message(message(), ctx))) == ["True"]
    assert relations(result_of(build(CheckRelationNode, check("FROM")).on_message(message(), ctx))) == ["False"]


def test_check_without_single_entity_looks_for_any_relation_of_the_type(ctx: FakeContext) -> None:
    ctx.relate(ASSET, DEVICE, "Manages")
    node = build(CheckRelationNode, check("TO", single=False, relation_type="Manages"))
    assert relations(result_of(node.on_message(message(), ctx))) == ["True"]
    node = build(CheckRelationNode, check("FROM", single=False, relation_type="Manages"))
    assert relations(result_of(node.on_message(message(), ctx))) == ["False"]


def test_check_relation_needs_its_entity_when_checking_a_single_one() -> None:
    with pytest.raises(InvalidConfig, match="Entity should be specified!"):
        build(CheckRelationNode, {"direction": "FROM", "relationType": "Contains", "checkForSingleEntity": True})
    with pytest.raises(InvalidConfig, match="UUID"):
        build(CheckRelationNode, {"direction": "FROM", "relationType": "Contains", "entityType": "ASSET",
                                  "entityId": "nope"})


def test_check_relation_upgrade_from_version_0_flips_the_direction() -> None:
    assert CheckRelationNode.upgrade(0, {"direction": "FROM"}) == {"direction": "TO"}
    assert CheckRelationNode.upgrade(0, {"direction": "TO"}) == {"direction": "FROM"}
    assert CheckRelationNode.upgrade(1, {"direction": "TO"}) == {"direction": "TO"}
    with pytest.raises(ValueError):
        CheckRelationNode.upgrade(0, {})


# --- create relation -------------------------------------------------------------------------------------------------


def create(**config: object) -> dict[str, object]:
    base: dict[str, object] = {"direction": "FROM", "relationType": "Contains", "entityType": "ASSET",
                               "entityNamePattern": "${building}"}
    base.update(config)
    return base


def test_create_relation_finds_the_target_by_pattern_and_creates_the_relation(ctx: FakeContext) -> None:
    ctx.entities[("ASSET", "B1")] = ASSET
    msg = message(metadata={"building": "B1"})
    assert result_of(build(CreateRelationNode, create()).on_message(msg, ctx)) == [("Success", msg)]
    assert {(r.from_, r.to, r.type) for r in ctx.relations} == {(DEVICE, ASSET, "Contains")}


def test_create_relation_to_direction_and_pattern_in_the_type(ctx: FakeContext) -> None:
    ctx.entities[("ASSET", "B1")] = ASSET
    node = build(CreateRelationNode, create(direction="TO", relationType="Has$[kind]"))
    result_of(node.on_message(message(data={"kind": "Pump"}, metadata={"building": "B1"}), ctx))
    assert {(r.from_, r.to, r.type) for r in ctx.relations} == {(ASSET, DEVICE, "HasPump")}


def test_create_relation_that_exists_succeeds_without_a_second_one(ctx: FakeContext) -> None:
    ctx.entities[("ASSET", "B1")] = ASSET
    ctx.relate(DEVICE, ASSET)
    ctx.create_relation = lambda *a: pytest.fail("created twice")  # type: ignore[method-assign]
    assert relations(result_of(build(CreateRelationNode, create()).on_message(
        message(metadata={"building": "B1"}), ctx))) == ["Success"]


def test_create_relation_removes_current_relations_and_changes_the_originator(ctx: FakeContext) -> None:
    old = EntityId("ASSET", ASSET.id.__class__(int=99))
    ctx.relate(DEVICE, old)
    ctx.entities[("ASSET", "B1")] = ASSET
    node = build(CreateRelationNode, create(removeCurrentRelations=True, changeOriginatorToRelatedEntity=True))
    [(relation, out)] = result_of(node.on_message(message(metadata={"building": "B1"}), ctx))
    assert relation == "Success" and out.originator == ASSET
    assert {(r.from_, r.to) for r in ctx.relations} == {(DEVICE, ASSET)}


def test_create_relation_with_the_tenant(ctx: FakeContext) -> None:
    node = build(CreateRelationNode, create(entityType="TENANT", entityNamePattern=""))
    result_of(node.on_message(message(), ctx))
    assert {(r.from_, r.to) for r in ctx.relations} == {(DEVICE, EntityId("TENANT", TENANT))}


def test_create_relation_with_a_missing_target_is_a_failure(ctx: FakeContext) -> None:
    [(relation, out)] = result_of(build(CreateRelationNode, create()).on_message(
        message(metadata={"building": "B9"}), ctx))
    assert relation == "Failure" and out.error == "ASSET with name 'B9' doesn't exist!"
    assert ctx.relations == set()


def test_create_relation_refuses_bad_configurations_listing_each_problem() -> None:
    with pytest.raises(InvalidConfig) as raised:
        build(CreateRelationNode, {"direction": "UP", "entityType": "RULE_CHAIN", "relationType": ""})
    assert len(raised.value.messages) == 4


def test_create_relation_entity_creation_is_a_warning_not_a_refusal() -> None:
    assert build(CreateRelationNode, create(createEntityIfNotExists=True)).warnings


def test_create_relation_upgrade_flips_only_with_the_old_cache_key() -> None:
    assert CreateRelationNode.upgrade(0, {"direction": "FROM", "entityCacheExpiration": 300}) == {"direction": "TO"}
    assert CreateRelationNode.upgrade(0, {"direction": "FROM"}) == {"direction": "FROM"}
