"""Change originator and script transformation, one message in, messages out."""

from __future__ import annotations

from uuid import UUID

import pytest

from nanoiot.rules.message import EntityId
from nanoiot.rules.nodes.base import InvalidConfig
from nanoiot.rules.nodes.transform import ChangeOriginatorNode, TransformNode, transform_outputs, unbind
from tests.unit.rules.fakes import ASSET, CUSTOMER, DEVICE, TENANT, FakeContext, build, message, relations, result_of

GATEWAY = EntityId("DEVICE", UUID(int=0x6A7E))


def related(direction: str = "FROM", relation_type: str = "Contains", types: list[str] | None = None,
            level: int = 1) -> dict[str, object]:
    return {"originatorSource": "RELATED",
            "relationsQuery": {"direction": direction, "maxLevel": level, "fetchLastLevelOnly": False,
                               "filters": [{"relationType": relation_type, "entityTypes": types or []}]}}


def test_related_source_takes_the_first_related_entity(ctx: FakeContext) -> None:
    ctx.relate(DEVICE, ASSET)
    msg = message(metadata={"k": "v"})
    [(relation, out)] = result_of(build(ChangeOriginatorNode, related()).on_message(msg, ctx))
    assert relation == "Success" and out.originator == ASSET
    assert (out.data, out.metadata, out.id) == (msg.data, msg.metadata, msg.id)


def test_related_source_follows_direction_type_and_entity_types(ctx: FakeContext) -> None:
    ctx.relate(ASSET, DEVICE, "Manages")
    node = build(ChangeOriginatorNode, related("TO", "Manages", ["ASSET"]))
    assert result_of(node.on_message(message(), ctx))[0][1].originator == ASSET
    node = build(ChangeOriginatorNode, related("TO", "Manages", ["CUSTOMER"]))
    assert relations(result_of(node.on_message(message(), ctx))) == ["Failure"]


def test_related_source_tries_each_filter_in_turn(ctx: FakeContext) -> None:
    ctx.relate(DEVICE, GATEWAY, "Uses")
    config = related()
    config["relationsQuery"]["filters"].append({"relationType": "Uses", "entityTypes": []})  # type: ignore[index]
    assert result_of(build(ChangeOriginatorNode, config).on_message(message(), ctx))[0][1].originator == GATEWAY


def test_nothing_related_is_a_failure_with_thingsboards_words(ctx: FakeContext) -> None:
    [(relation, out)] = result_of(build(ChangeOriginatorNode, related()).on_message(message(), ctx))
    assert relation == "Failure" and out.error == "Failed to find new originator!"


def test_entity_source_finds_by_name_pattern(ctx: FakeContext) -> None:
    ctx.entities[("DEVICE", "gw-pump-1")] = GATEWAY
    node = build(ChangeOriginatorNode, {"originatorSource": "ENTITY", "entityType": "DEVICE",
                                        "entityNamePattern": "gw-${deviceName}"})
    assert result_of(node.on_message(message(metadata={"deviceName": "pump-1"}), ctx))[0][1].originator == GATEWAY
    assert relations(result_of(node.on_message(message(metadata={"deviceName": "x"}), ctx))) == ["Failure"]


def test_customer_and_tenant_sources(ctx: FakeContext) -> None:
    ctx.customers[DEVICE] = CUSTOMER
    node = build(ChangeOriginatorNode, {"originatorSource": "CUSTOMER"})
    assert result_of(node.on_message(message(), ctx))[0][1].originator == EntityId("CUSTOMER", CUSTOMER)
    assert relations(result_of(node.on_message(message(originator=ASSET), ctx))) == ["Failure"]
    customer = EntityId("CUSTOMER", CUSTOMER)
    assert result_of(node.on_message(message(originator=customer), ctx))[0][1].originator == customer
    node = build(ChangeOriginatorNode, {"originatorSource": "TENANT"})
    assert result_of(node.on_message(message(), ctx))[0][1].originator == EntityId("TENANT", TENANT)


def test_alarm_originator_loads_with_a_warning_and_fails_every_message(ctx: FakeContext) -> None:
    node = build(ChangeOriginatorNode, {"originatorSource": "ALARM_ORIGINATOR"})
    assert node.warnings
    assert relations(result_of(node.on_message(message(), ctx))) == ["Failure"]


@pytest.mark.parametrize(("config", "error"), [
    ({"originatorSource": "SOMEWHERE"}, "originatorSource"),
    ({"originatorSource": "ENTITY", "entityNamePattern": "x"}, "Entity type should be specified"),
    ({"originatorSource": "ENTITY", "entityType": "DEVICE"}, "Name pattern should be specified"),
    ({"originatorSource": "ENTITY", "entityType": "RULE_CHAIN", "entityNamePattern": "x"}, "Unexpected entity type"),
    ({"originatorSource": "RELATED", "relationsQuery": None}, "Relations query should be specified"),
])
def test_change_originator_refuses_configurations_thingsboard_refuses(config: dict[str, object],
                                                                      error: str) -> None:
    with pytest.raises(InvalidConfig, match=error):
        build(ChangeOriginatorNode, config)


# --- script transformation ------------------------------------------------------------------------------------------


def test_transform_replaces_what_the_script_returns_and_keeps_the_rest(ctx: FakeContext) -> None:
    node = build(TransformNode, {"scriptLang": "JS", "jsScript":
                                 "metadata.seen = true; metadata.n = 2; metadata.gone = null;"
                                 "return {msg: {response: msg.method + ' ok'}, metadata: metadata};"})
    msg = message("TO_SERVER_RPC_REQUEST", data={"method": "getTime"}, metadata={"gone": "x", "requestId": "3"},
                  origin="o")
    [(relation, out)] = result_of(node.on_message(msg, ctx))
    assert relation == "Success" and out.json() == {"response": "getTime ok"}
    assert out.metadata == {"requestId": "3", "seen": "true", "n": "2"}
    assert (out.type, out.id, out.origin) == (msg.type, msg.id, "o")


def test_transform_returning_an_array_makes_several_messages_each_with_its_own_id(ctx: FakeContext) -> None:
    node = build(TransformNode, {"scriptLang": "JS", "jsScript":
                                 "return [{msg: {n: 1}}, {msg: {n: 2}, msgType: 'CUSTOM'}, {metadata: {a: 'b'}}];"})
    msg = message(metadata={"k": "v"})
    outputs = result_of(node.on_message(msg, ctx))
    assert relations(outputs) == ["Success"] * 3
    first, second, third = (out for _, out in outputs)
    assert first.json() == {"n": 1} and second.type == "CUSTOM" and third.metadata == {"a": "b"}
    assert len({msg.id, first.id, second.id, third.id}) == 4


def test_thingsboards_default_transform_script_changes_nothing(ctx: FakeContext) -> None:
    node = build(TransformNode, TransformNode.default_config)
    msg = message(data={"a": [1, 2]}, metadata={"k": "v"})
    [(_, out)] = result_of(node.on_message(msg, ctx))
    assert (out.json(), out.metadata, out.type) == ({"a": [1, 2]}, {"k": "v"}, msg.type)


def test_transform_results_that_make_no_message_are_failures() -> None:
    msg = message()
    assert transform_outputs(msg, [])[0][1].error == "Message or messages list are empty!"
    assert transform_outputs(msg, "text")[0][1].error == "Wrong result type: STRING"
    assert relations(transform_outputs(msg, [{"msg": 1}, 2])) == ["Failure"]


def test_unbind_keeps_metadata_when_the_script_returns_null_metadata() -> None:
    msg = message(metadata={"k": "v"})
    assert unbind({"metadata": None, "msgType": ""}, msg) is msg
