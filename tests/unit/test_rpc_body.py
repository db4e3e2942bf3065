"""The REST RPC body: ThingsBoard's fields, defaults and the expiry rule, and clear errors for bad input."""

from uuid import UUID

import pytest

from nanoiot.errors import BadRequest
from nanoiot.rpc.body import parse_rpc_body

NOW = 1_700_000_000_000
FIXED = UUID("11111111-2222-3333-4444-555555555555")


def parse(raw, **kw):
    return parse_rpc_body(raw, NOW, 10_000, 5_000, new_uuid=lambda: FIXED, **kw)


def test_defaults_follow_thingsboard():
    body = parse({"method": "setGpio"})
    assert body.method == "setGpio"
    assert body.params is None
    assert body.timeout == 10_000
    assert body.expiration_time == NOW + 10_000
    assert body.persistent is False
    assert body.retries is None
    assert body.request_uuid == FIXED
    assert body.qos is None


def test_timeout_below_the_minimum_is_raised_to_the_minimum():
    assert parse({"method": "m", "timeout": 1000}).expiration_time == NOW + 5_000


def test_expiration_time_is_used_as_given_even_below_the_minimum():
    assert parse({"method": "m", "timeout": 60000, "expirationTime": NOW + 10}).expiration_time == NOW + 10


@pytest.mark.parametrize("params", [{"pin": 7}, [1, 2], 3, 2.5, True, "abc", None])
def test_params_of_any_json_type_pass_through_unchanged(params):
    assert parse({"method": "m", "params": params}).params == params


def test_request_uuid_becomes_the_rpc_id():
    assert parse({"method": "m", "requestUUID": str(FIXED)}).request_uuid == FIXED


def test_numeric_method_is_turned_into_text_like_thingsboard():
    assert parse({"method": 42}).method == "42"


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ([], "JSON object"),
        ("x", "JSON object"),
        ({}, "'method' is required"),
        ({"method": None}, "'method' is required"),
        ({"method": {"a": 1}}, "'method' must be a string"),
        ({"method": ""}, "must not be empty"),
        ({"method": "m", "timeout": "soon"}, "'timeout' must be a whole number"),
        ({"method": "m", "timeout": -1}, "must not be negative"),
        ({"method": "m", "expirationTime": 1.5}, "'expirationTime' must be a whole number"),
        ({"method": "m", "persistent": "yes"}, "'persistent' must be true or false"),
        ({"method": "m", "retries": -2}, "'retries' must not be negative"),
        ({"method": "m", "qos": 2}, "'qos' must be 0 or 1"),
        ({"method": "m", "requestUUID": "nope"}, "Invalid UUID string: nope"),
        ({"method": "x" * 256}, "'method' is longer than 255 characters"),
        ({"method": "m", "timeout": 2**40 + 1}, "'timeout' must be at most"),
        ({"method": "m", "expirationTime": NOW}, "'expirationTime' 1700000000000 is not in the future"),
        ({"method": "m", "expirationTime": NOW - 1}, "is not in the future"),
        ({"method": "m", "expirationTime": 2**63}, "'expirationTime' must be at most"),
        ({"method": "m", "retries": 2**31}, "'retries' must be at most"),
    ],
)
def test_bad_bodies_are_rejected_with_a_message_naming_the_field(raw, fragment):
    with pytest.raises(BadRequest) as caught:
        parse(raw)
    assert fragment in caught.value.message
    assert caught.value.http_status == 400
