"""Validation at the edge: every field of a REST body, query and path checked against the limits SQLite and
PostgreSQL share, answered 400 with a message naming the field, before the value reaches the database.

The REST tests run the real resource tree in memory (StubTreq) on an in-memory SQLite database: SQLite would have
stored a 300-character name that PostgreSQL refuses, so each of these was a 200 here and a 500 there before."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred

from nanoiot.errors import BadRequest, InvalidArguments
from nanoiot.persistence.catalog import DeviceCatalog
from nanoiot.persistence.records import NULL_UUID
from nanoiot.rpc.body import parse_rpc_body
from nanoiot.transports.http.device_api import DeviceApiResource
from nanoiot import validation as v
from tests.fixtures.recording import RecordingAttach
from tests.unit.test_http_device_api import body_of
from tests.unit.test_rest_rpc import Api as RpcApi
from tests.unit.test_rest_rpc import Untouched
from tests.unit.test_rules_rest import Api

LONG = "x" * 300
DEEP: Any = 1
for _ in range(40):
    DEEP = {"a": [DEEP]}


def nested(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


# --- the pure checks ------------------------------------------------------------------------------------------------

def test_text_accepts_what_both_databases_store_and_names_the_field_otherwise():
    assert v.text("name", "x" * 255) == "x" * 255
    assert v.text("label", None) is None
    for bad, why in [("x" * 256, "name: must be at most 255 characters"), (7, "name: must be a string"),
                     ("a\x00b", "name: must not contain the NUL character")]:
        with pytest.raises(BadRequest, match=why):
            v.text("name", bad)
    with pytest.raises(BadRequest, match="name: is required"):
        v.text("name", None, required=True)
    with pytest.raises(BadRequest, match="name: must not be empty"):
        v.text("name", "  ", required=True)


def test_uuid_param_names_the_parameter_and_repeats_only_the_start_of_a_long_value():
    some = uuid4()
    assert v.uuid_param("deviceId", str(some)) == some
    for bad in ["nope", "", None, 5, "1" * 10_000]:
        with pytest.raises(BadRequest, match="^deviceId: Invalid UUID string") as caught:
            v.uuid_param("deviceId", bad)
        assert len(caught.value.message) < 120


@pytest.mark.parametrize("raw, expected", [("0", 0), (" 12 ", 12), (7, 7), (3.0, 3), (2**63 - 1, 2**63 - 1)])
def test_int_param_accepts_whole_numbers_in_range(raw, expected):
    assert v.int_param("page", raw) == expected


@pytest.mark.parametrize("raw, why", [
    ("x", "page: must be a whole number"), (True, "page: must be a whole number"), (1.5, "page: must be a whole"),
    ("9" * 5000, "page: must be a whole number"), (2**63, "page: must be at most"), (-(2**63) - 1, "at least"),
])
def test_int_param_refuses_what_no_bigint_holds(raw, why):
    with pytest.raises(InvalidArguments, match=why):
        v.int_param("page", raw)


def test_json_depth_allows_32_levels_and_refuses_more_without_recursing():
    assert v.json_depth("params", nested(31)) == nested(31)  # 31 lists and the number: 32 levels in all
    assert v.json_depth("params", {"a": 1, "b": [1, 2, {"c": None}]})
    with pytest.raises(BadRequest, match="params: nested deeper than 32 levels"):
        v.json_depth("params", nested(33))
    with pytest.raises(BadRequest, match="params"):
        v.json_depth("params", nested(100_000))  # far beyond the recursion limit: still a plain 400


def test_the_rpc_body_bounds_the_nesting_of_params_and_additional_info():
    ok = parse_rpc_body({"method": "m", "params": nested(20)}, 0, 10_000, 0)
    assert ok.params == nested(20)
    for field in ("params", "additionalInfo"):
        with pytest.raises(BadRequest, match=field):
            parse_rpc_body({"method": "m", field: DEEP}, 0, 10_000, 0)
    with pytest.raises(BadRequest, match="'method' must not contain the NUL"):
        parse_rpc_body({"method": "a\x00"}, 0, 10_000, 0)


# --- REST: devices, customers, relations, rule chains ---------------------------------------------------------------

def refused(api: Any, method: str, path: str, body: Any = None, field: str = "") -> dict[str, Any]:
    status, error = api.call(method, path, body=body)
    assert status == 400, (status, error)
    assert error["status"] == 400 and error["errorCode"] in (30, 31) and field in error["message"], error
    return error


@pytest.mark.parametrize("body, query, field", [
    ({"name": LONG}, "", "name: must be at most 255 characters"),
    ({"name": "ok", "type": LONG}, "", "type: must be at most 255"),
    ({"name": "ok", "label": LONG}, "", "label: must be at most 255"),
    ({"name": "a\x00b"}, "", "name: must not contain the NUL"),
    ({"name": "ok", "additionalInfo": DEEP}, "", "additionalInfo: nested deeper"),
    ({"name": "ok"}, "?accessToken=" + LONG, "accessToken: must be at most 255"),
    ({"name": "ok", "id": {"entityType": "DEVICE", "id": "not-a-uuid"}}, "", "id: Invalid UUID string"),
    ({"name": "ok", "customerId": {"id": "nope"}}, "", "customerId: Invalid UUID string"),
])
def test_a_device_with_a_field_no_database_column_holds_is_refused_naming_the_field(body, query, field):
    api = Api()
    refused(api, "POST", "/api/device" + query, body, field)
    assert api.ok("GET", "/api/tenant/devices?pageSize=10&page=0")["totalElements"] == 0


def test_a_device_at_the_limits_is_stored_and_an_update_past_them_is_refused():
    api = Api()
    device = api.ok("POST", "/api/device?accessToken=" + "t" * 255, {"name": "n" * 255, "type": "t" * 255,
                                                                     "label": "l" * 255, "additionalInfo": nested(30)})
    assert device["name"] == "n" * 255
    refused(api, "POST", "/api/device", {"id": device["id"], "name": LONG}, "name: must be at most 255")
    assert api.ok("GET", f"/api/device/{device['id']['id']}")["name"] == "n" * 255


@pytest.mark.parametrize("path, field", [
    ("/api/device/not-a-uuid", "deviceId: Invalid UUID string"),
    ("/api/device/" + "1" * 300 + "/credentials", "deviceId: Invalid UUID string"),
    ("/api/customer/nope", "customerId: Invalid UUID string"),
    ("/api/customer/nope/devices?pageSize=10&page=0", "customerId: Invalid UUID string"),
    ("/api/tenant/devices?pageSize=10&page=" + str(2**62), "page: must be at most"),
    ("/api/tenant/devices?pageSize=10&page=" + "9" * 30, "page: must be at most"),
    ("/api/tenant/devices?pageSize=1000000&page=0", "pageSize: must be at most"),
    ("/api/tenant/devices?pageSize=0&page=0", "pageSize: must be at least 1"),
    ("/api/tenant/devices?pageSize=ten&page=0", "pageSize: must be a whole number"),
    ("/api/tenant/devices?pageSize=10&page=0&textSearch=" + LONG, "textSearch: must be at most 255"),
    ("/api/tenant/devices?pageSize=10&page=0&type=" + LONG, "type: must be at most 255"),
    ("/api/tenant/devices?deviceName=a%00b", "deviceName: must not contain the NUL"),
    ("/api/tenant/device?deviceName=" + LONG, "deviceName: must be at most 255"),
    ("/api/ruleChain/nope", "ruleChainId: Invalid UUID string"),
    ("/api/ruleChains?pageSize=10&page=-1", "page: must be at least 0"),
    ("/api/relations?fromId=nope&fromType=DEVICE", "fromId: Invalid UUID string"),
    ("/api/relations?fromId=" + str(uuid4()) + "&fromType=" + LONG, "fromType: Invalid entity type"),
])
def test_a_bad_path_or_query_parameter_is_a_400_naming_it(path, field):
    refused(Api(), "GET", path, field=field)


@pytest.mark.parametrize("path, body, field", [
    ("/api/customer", {"title": LONG}, "title: must be at most 255"),
    ("/api/customer", {"title": "ok", "id": {"id": "nope"}}, "id: Invalid UUID string"),
    ("/api/ruleChain", {"name": LONG}, "name: must be at most 255"),
    ("/api/ruleChain", {"name": "ok", "additionalInfo": DEEP}, "additionalInfo: nested deeper"),
    ("/api/ruleChain", {"name": "ok", "id": {"id": "nope"}}, "id: Invalid UUID string"),
    ("/api/ruleChain/metadata", {"ruleChainId": {"id": "nope"}}, "ruleChainId: Invalid UUID string"),
    ("/api/ruleChain/import", {"ruleChain": {"name": "x", "additionalInfo": DEEP}}, "nested deeper"),
    ("/api/relation", {"from": {"entityType": "DEVICE", "id": "nope"}, "to": {}, "type": "Contains"},
     "from.id: Invalid UUID string"),
    ("/api/relation", {"from": {}, "to": {}, "type": LONG}, "type: must be at most 255"),
    ("/api/relation", {"from": {}, "to": {}, "type": "Contains", "additionalInfo": DEEP},
     "additionalInfo: nested deeper"),
])
def test_a_bad_body_field_is_a_400_naming_it(path, body, field):
    refused(Api(), "POST", path, body, field)


# --- REST: RPC and bulk RPC (refused before the command service is called) ------------------------------------------

@pytest.mark.parametrize("method, path, body, field", [
    ("POST", "/api/rpc/twoway/not-a-uuid", {"method": "m"}, "deviceId: Invalid UUID string"),
    ("POST", "/api/plugins/rpc/oneway/" + "f" * 300, {"method": "m"}, "deviceId: Invalid UUID string"),
    ("POST", f"/api/rpc/twoway/{uuid4()}", {"method": "m", "persistent": True, "expirationTime": 2**63},
     "'expirationTime' must be at most"),
    ("POST", f"/api/rpc/twoway/{uuid4()}", {"method": "m", "retries": 2**63}, "'retries' must be at most"),
    ("POST", f"/api/rpc/twoway/{uuid4()}", {"method": LONG}, "'method' is longer than 255"),
    ("POST", f"/api/rpc/twoway/{uuid4()}", {"method": "m", "params": DEEP}, "params: nested deeper"),
    ("POST", f"/api/rpc/twoway/{uuid4()}", {"method": "m", "additionalInfo": DEEP}, "additionalInfo: nested"),
    ("GET", "/api/rpc/persistent/nope", None, "rpcId: Invalid UUID string"),
    ("DELETE", "/api/rpc/persistent/nope", None, "rpcId: Invalid UUID string"),
    ("GET", "/api/rpc/persistent/device/nope?pageSize=10&page=0", None, "deviceId: Invalid UUID string"),
    ("GET", f"/api/rpc/persistent/device/{uuid4()}?pageSize=10&page={2**63}", None, "page: must be at most"),
    ("POST", "/api/rpc/bulk", {"deviceType": LONG, "method": "m"}, "deviceType: must be at most 255"),
    ("GET", "/api/rpc/bulk/nope", None, "batchId: Invalid UUID string"),
])
def test_an_rpc_with_a_bad_field_never_reaches_the_command_service(method, path, body, field):
    api = RpcApi()
    status, error = api.call(method, path, body=body)
    assert status == 400 and field in error["message"], (status, error)
    assert api.commands.calls == []


# --- access tokens: refused without a query at every door -----------------------------------------------------------

def test_the_catalog_answers_a_token_no_device_can_have_without_asking_the_database():
    catalog = DeviceCatalog(Untouched("repository"), clock=task.Clock())  # type: ignore[arg-type]
    for token in [LONG, "", "a\x00b"]:
        found: list = []
        catalog.device_for_token(token).addCallback(found.append)
        assert found == [None]


def test_the_catalog_refuses_to_store_a_device_or_token_past_the_columns():
    catalog = DeviceCatalog(Untouched("repository"))  # type: ignore[arg-type]
    attempts: list[Deferred] = [
        catalog.create_device(uuid4(), LONG),
        catalog.create_device(uuid4(), "ok", "default", access_token=LONG),
        catalog.create_device(uuid4(), "ok", LONG),
        catalog.update_credentials(uuid4(), LONG),
    ]
    for d in attempts:
        errors: list = []
        d.addErrback(errors.append)
        assert errors and errors[0].check(BadRequest), errors


def test_the_http_device_api_answers_a_300_character_token_401_without_a_database_lookup():
    catalog = DeviceCatalog(Untouched("repository"), clock=task.Clock())  # type: ignore[arg-type]
    api = DeviceApiResource(catalog.device_for_token, RecordingAttach(), task.Clock())
    from io import BytesIO

    from twisted.web.test.requesthelper import DummyRequest

    request = DummyRequest([LONG.encode(), b"rpc"])
    request.method = b"POST"
    request.content = BytesIO(b'{"method":"getTime","params":{}}')
    request.args = {}
    api.render(request)
    assert request.finished and request.responseCode == 401 and body_of(request) == b""


def test_a_customer_with_a_nul_free_title_at_the_limit_is_stored():
    api = Api()
    customer = api.ok("POST", "/api/customer", {"title": "c" * 255})
    assert customer["title"] == "c" * 255 and customer["tenantId"]["id"] != str(NULL_UUID)


def test_json_depth_flat_values_take_the_short_path_but_keep_the_limit():
    assert v.json_depth("params", {"pin": 4, "on": True}) == {"pin": 4, "on": True}
    assert v.json_depth("params", [1, "a", None]) == [1, "a", None]
    assert v.json_depth("params", 7) == 7
    with pytest.raises(BadRequest, match="nested deeper than 0 levels"):
        v.json_depth("params", {"pin": 4}, max_depth=0)
    with pytest.raises(BadRequest, match="nested deeper than 1 levels"):
        v.json_depth("params", {"pin": {"n": 4}}, max_depth=1)
