"""The message (TbMsg's shape) and ThingsBoard's ${metadata} / $[data] patterns: pure functions."""

from __future__ import annotations

import pytest

from nanoiot.rules.message import MSG_TYPES, EntityId, RuleMessage, switch_label
from nanoiot.rules.patterns import process_pattern, value_text
from tests.unit.rules.fakes import DEVICE, message


def test_message_data_is_json_text_and_json_parses_it() -> None:
    msg = RuleMessage.create("POST_TELEMETRY_REQUEST", DEVICE, {"t": 21.5, "name": "ä"}, {"k": "v"})
    assert msg.data == '{"t":21.5,"name":"ä"}'
    assert msg.json() == {"t": 21.5, "name": "ä"}


def test_json_of_data_that_is_not_json_is_the_text_itself() -> None:
    assert message(data="not json {").json() == "not json {"


def test_with_changes_fields_and_keeps_the_rest_including_origin() -> None:
    origin = object()
    msg = message(origin=origin, metadata={"a": "1"})
    changed = msg.with_(data={"x": 1}, metadata={"b": "2"})
    assert changed.data == '{"x":1}' and changed.metadata == {"b": "2"}
    assert changed.origin is origin and changed.id == msg.id and changed.originator == msg.originator


def test_metadata_is_copied_so_that_messages_never_share_it() -> None:
    metadata = {"a": "1"}
    msg = message(metadata=metadata)
    metadata["a"] = "changed"
    assert msg.metadata == {"a": "1"}
    copy = msg.metadata_dict()
    copy["a"] = "2"
    assert msg.metadata == {"a": "1"}


def test_entity_id_round_trips_through_thingsboard_json() -> None:
    assert EntityId.from_json(DEVICE.to_json()) == DEVICE


@pytest.mark.parametrize(("msg_type", "label"), [
    ("RPC_CALL_FROM_SERVER_TO_DEVICE", "RPC Request to Device"),
    ("TO_SERVER_RPC_REQUEST", "RPC Request from Device"),
    ("POST_TELEMETRY_REQUEST", "Post telemetry"),
    ("RPC_QUEUED", "RPC Queued"),
    ("REST_API_REQUEST", "REST API request"),
    ("ALARM_DELETE", "Other"),
    ("PROVISION_SUCCESS", "Other"),
    ("MY_CUSTOM_TYPE", "Other"),
])
def test_switch_label_is_thingsboards_and_other_for_custom_types(msg_type: str, label: str) -> None:
    assert switch_label(msg_type) == label


def test_msg_types_cover_every_rpc_lifecycle_type() -> None:
    for status in ("QUEUED", "SENT", "DELIVERED", "SUCCESSFUL", "TIMEOUT", "EXPIRED", "FAILED", "DELETED"):
        assert f"RPC_{status}" in MSG_TYPES


# --- patterns ------------------------------------------------------------------------------------------------------


def test_metadata_patterns_are_replaced_and_unknown_ones_stay() -> None:
    msg = message(metadata={"deviceName": "pump-1", "deviceType": "pump"})
    assert process_pattern("/api/${deviceType}/${deviceName}/${missing}", msg) == "/api/pump/pump-1/${missing}"


def test_data_patterns_walk_objects_and_replace_only_values() -> None:
    msg = message(data={"a": {"b": 7, "c": {"d": 1}}, "s": "x", "f": True, "n": None, "l": [1]})
    assert process_pattern("$[a.b] $[s] $[f] $[n] $[a.c] $[l] $[nope] $[a..b]", msg) == \
        "7 x true null $[a.c] $[l] $[nope] $[a..b]"


def test_star_patterns_are_the_whole_data_and_metadata() -> None:
    msg = message(data={"a": 1}, metadata={"k": "v"})
    assert process_pattern("$[*] ${*}", msg) == '{"a":1} {"k":"v"}'
    assert process_pattern("${*}", message()) == "{}"


def test_escape_json_makes_substituted_values_safe_inside_a_json_string() -> None:
    msg = message(data={"q": 'say "hi"\n'}, metadata={"m": "back\\slash"})
    text = process_pattern('{"q": "$[q]", "m": "${m}"}', msg, escape_json=True)
    assert text == '{"q": "say \\"hi\\"\\n", "m": "back\\\\slash"}'


def test_data_patterns_are_left_alone_when_data_is_not_json() -> None:
    assert process_pattern("$[a] $[*]", message(data="raw text")) == "$[a] raw text"


def test_value_text_is_jacksons_as_text() -> None:
    assert [value_text(v) for v in ("s", 1, 2.5, True, None)] == ["s", "1", "2.5", "true", "null"]
