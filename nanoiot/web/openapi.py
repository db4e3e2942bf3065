"""The OpenAPI 3.1 document of the REST API, served at ``GET /api/openapi.json``.

Built from the Python description below rather than kept as a file, so that the shared shapes (ThingsBoard's error
body, entity ids, pages) are written once. ``tests/unit/test_openapi.py`` checks that its paths and methods are
exactly the router's routes (a route without documentation fails CI), and ``tests/integration/test_schemathesis.py``
drives the live server from it (no 5xx, responses as documented).

The HTTP device API (``/api/v1/{accessToken}/...``) is ThingsBoard's device protocol, documented in the README
and served by its own resource, not by the router: it is not part of this document.
"""

from __future__ import annotations

import copy
from typing import Any

from nanoiot import __version__
from nanoiot.web.routing import ApiRequest, Router

JSON = "application/json"

# --- schemas ---------------------------------------------------------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: tuple[str, ...] = (), **properties: Any) -> dict[str, Any]:
    """An object with these properties (others allowed: ThingsBoard adds fields between versions)."""
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


STRING, INTEGER, BOOLEAN, ANY = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {}
UUID_STRING = {"type": "string", "format": "uuid"}


def _page_of(item: str) -> dict[str, Any]:
    return _obj(("data", "totalPages", "totalElements", "hasNext"), data={"type": "array", "items": _ref(item)},
                totalPages=INTEGER, totalElements=INTEGER, hasNext=BOOLEAN)


SCHEMAS: dict[str, Any] = {
    "Error": _obj(
        ("status", "message", "errorCode", "timestamp"),
        status={"type": "integer", "description": "the HTTP status again"},
        message={"type": "string", "description": "what was wrong, naming the field or parameter"},
        errorCode={"type": "integer", "description": "ThingsBoard's error code: 2 general, 10 authentication, "
                   "11 token expired, 20 permission denied, 30 invalid arguments, 31 bad request parameters, "
                   "32 not found, 33 too many requests, 35 version conflict, 46 database"},
        timestamp={"type": "integer", "description": "server time, ms since the epoch"},
        errorId={"type": "string", "description": "on a 500: the id the server's log line carries too"},
    ),
    "EntityId": _obj(("id",), entityType=STRING, id=UUID_STRING),
    "Device": _obj(("id", "name", "type", "tenantId", "customerId"), id=_ref("EntityId"), createdTime=INTEGER,
                   tenantId=_ref("EntityId"), customerId=_ref("EntityId"), name=STRING, type=STRING,
                   label=_nullable(STRING), version=_nullable(INTEGER), additionalInfo=ANY),
    "DeviceInfo": _obj(("id", "name", "type", "tenantId", "customerId", "active"), id=_ref("EntityId"),
                       createdTime=INTEGER, tenantId=_ref("EntityId"), customerId=_ref("EntityId"), name=STRING,
                       type=STRING, label=_nullable(STRING), version=_nullable(INTEGER), additionalInfo=ANY,
                       customerTitle=_nullable(STRING), deviceProfileName=STRING,
                       active={"type": "boolean", "description": "a session of the device is open on this node"}),
    "DeviceSave": _obj(("name",), id=ANY, name={"type": "string", "minLength": 1}, type=_nullable(STRING),
                       label=_nullable(STRING), customerId=ANY, additionalInfo=ANY),
    "DeviceCredentials": _obj(("deviceId", "credentialsType", "credentialsId"), deviceId=_ref("EntityId"),
                              credentialsType=STRING, credentialsId=STRING, credentialsValue=_nullable(STRING)),
    "Customer": _obj(("id", "title", "tenantId"), id=_ref("EntityId"), createdTime=INTEGER,
                     tenantId=_ref("EntityId"), title=STRING),
    "CustomerSave": _obj(("title",), id=ANY, title={"type": "string", "minLength": 1}),
    "User": _obj(("id", "email", "authority"), id=_ref("EntityId"), tenantId=_ref("EntityId"),
                 customerId=_ref("EntityId"), email=STRING,
                 authority={"type": "string", "enum": ["SYS_ADMIN", "TENANT_ADMIN", "CUSTOMER_USER"]}),
    "UserSave": _obj(("email",), id=ANY, email={"type": "string", "minLength": 1},
                     authority={"type": "string", "enum": ["TENANT_ADMIN", "CUSTOMER_USER"]}, tenantId=ANY,
                     customerId=ANY, firstName=_nullable(STRING), lastName=_nullable(STRING)),
    "ChangePasswordRequest": _obj(("currentPassword", "newPassword"), currentPassword=STRING, newPassword=STRING),
    "ActivateRequest": _obj(("activateToken", "password"), activateToken=STRING, password=STRING),
    "Tenant": _obj(("id", "title"), id=_ref("EntityId"), createdTime=INTEGER, title=STRING, name=STRING),
    "TenantSave": _obj(("title",), id=ANY, title={"type": "string", "minLength": 1, "maxLength": 255}),
    "LoginRequest": _obj(("username", "password"), username=STRING, password=STRING),
    "RefreshRequest": _obj(("refreshToken",), refreshToken=STRING),
    "JwtPair": _obj(("token", "refreshToken"), token=STRING, refreshToken=STRING),
    "RpcRequest": _obj(
        ("method",), method={"type": "string", "minLength": 1}, params=ANY,
        timeout={"type": "integer", "description": "ms; at least --rpc-min-timeout"},
        expirationTime={"type": "integer", "description": "ms since the epoch; instead of timeout"},
        persistent={"type": "boolean", "description": "stored, answered with its rpcId at once"},
        retries=INTEGER, additionalInfo=ANY, requestUUID=UUID_STRING),
    "RpcId": _obj(("rpcId",), rpcId=UUID_STRING),
    "Rpc": _obj(("id", "deviceId", "status"), id=_ref("EntityId"), createdTime=INTEGER, tenantId=_ref("EntityId"),
                deviceId=_ref("EntityId"), expirationTime=INTEGER, request=_obj(), response=ANY,
                status={"type": "string", "enum": ["QUEUED", "SENT", "DELIVERED", "SUCCESSFUL", "TIMEOUT",
                                                   "EXPIRED", "FAILED", "DELETED"]},
                additionalInfo=ANY),
    "BulkRequest": _obj((), method={"type": "string", "minLength": 1}, params=ANY,
                        deviceIds={"type": "array", "items": UUID_STRING}, deviceType=STRING, customerId=UUID_STRING,
                        timeout=INTEGER, expirationTime=INTEGER, retries=INTEGER, oneway=BOOLEAN,
                        requestUUID=UUID_STRING),
    "BulkStarted": _obj(("batchId", "total"), batchId=UUID_STRING, total=INTEGER),
    "BatchStatus": _obj(("batchId", "total", "statusCounts"), batchId=UUID_STRING, createdTime=INTEGER,
                        total=INTEGER, statusCounts={"type": "object"}, rpcIds={"type": "object"},
                        rejected={"type": "object"}, rejectedCount=INTEGER),
    "Deleted": _obj(("deleted",), deleted=ANY),
    "ClusterNode": _obj(("nodeId", "alive"), nodeId=STRING, address=STRING, startedTime=INTEGER,
                        lastHeartbeat=INTEGER, connectedDevices=INTEGER, alive=BOOLEAN),
    "Relation": _obj(("from", "to", "type"), **{"from": _ref("EntityId"), "to": _ref("EntityId")}, type=STRING,
                     typeGroup=STRING, additionalInfo=ANY),
    "RuleChain": _obj(("id", "name", "type"), id=_ref("EntityId"), createdTime=INTEGER, tenantId=_ref("EntityId"),
                      name=STRING, type=STRING, root=BOOLEAN, debugMode=BOOLEAN, version=_nullable(INTEGER)),
    "RuleChainSave": _obj(("name",), id=ANY, name={"type": "string", "minLength": 1},
                          type={"type": "string", "enum": ["CORE", "EDGE"]}, debugMode=BOOLEAN, root=BOOLEAN,
                          configuration=ANY, additionalInfo=ANY, version=INTEGER),
    "RuleChainMetaData": _obj(("ruleChainId",), ruleChainId=_ref("EntityId"), version=_nullable(INTEGER),
                              firstNodeIndex=_nullable(INTEGER), nodes={"type": "array"},
                              connections={"type": "array"}),
    "RuleChainExport": _obj(("ruleChain",), ruleChain=_obj(), metadata=_obj()),
    "Health": _obj(("status",), status={"type": "string", "enum": ["UP", "DOWN"]},
                   components={"type": "object", "additionalProperties": _obj(
                       ("status",), status={"type": "string", "enum": ["UP", "DOWN"]}, details={"type": "object"})}),
    "DevicePage": _page_of("Device"),
    "DeviceInfoPage": _page_of("DeviceInfo"),
    "TenantPage": _page_of("Tenant"),
    "RpcPage": _page_of("Rpc"),
    "RuleChainPage": _page_of("RuleChain"),
}

# --- parameters ------------------------------------------------------------------------------------------------------


def _path(name: str, schema: dict[str, Any] = UUID_STRING, description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


def _query(name: str, schema: dict[str, Any] = STRING, required: bool = False,
           description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


def _paging(sorts: tuple[str, ...]) -> list[dict[str, Any]]:
    return [
        _query("pageSize", {"type": "integer", "minimum": 1}, True, "items per page"),
        _query("page", {"type": "integer", "minimum": 0}, True, "page number, from 0"),
        _query("textSearch", description="case-insensitive text the name contains"),
        _query("sortProperty", {"type": "string", "enum": list(sorts)}),
        _query("sortOrder", {"type": "string", "enum": ["ASC", "DESC"]}),
    ]


def _entity_query(prefix: str, required: bool = False) -> list[dict[str, Any]]:
    return [_query(f"{prefix}Id", UUID_STRING, required), _query(f"{prefix}Type", STRING, required,
                                                                  "ThingsBoard entity type, e.g. DEVICE")]


DEVICE_ID = _path("deviceId")
CUSTOMER_ID = _path("customerId")
RULE_CHAIN_ID = _path("ruleChainId")
KIND = _path("kind", {"type": "string", "enum": ["oneway", "twoway"]},
             "oneway: answered once delivered; twoway: answered with the device's reply")

# --- operations ------------------------------------------------------------------------------------------------------


def _op(summary: str, tag: str, *, ok: Any = None, empty: bool = False, body: str | None = None,
        params: list[dict[str, Any]] | None = None, public: bool = False, ok_media: str = JSON,
        description: str = "") -> dict[str, Any]:
    """One operation. ``ok``: the 200 schema (a schema name or a schema); ``empty``: 200 has no body (or, with
    ``ok``, may have none); errors are ThingsBoard's error body whatever their status."""
    responses: dict[str, Any] = {}
    if ok is None:
        responses["200"] = {"description": "done (no body)"}
    else:
        schema = _ref(ok) if isinstance(ok, str) else ok
        responses["200"] = {"description": "done" + (" (no body when there is nothing to answer)" if empty else ""),
                            "content": {ok_media: {"schema": schema}}}
    responses["default"] = {"description": "an error, in ThingsBoard's error body",
                            "content": {JSON: {"schema": _ref("Error")}}}
    operation: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if description:
        operation["description"] = description
    if params:
        operation["parameters"] = params
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {JSON: {"schema": _ref(body)}}}
    if public:
        operation["security"] = []
    return operation


_PAGE_DEVICES = ("createdTime", "name", "label", "type")
_RPC_STATUS = {"type": "string", "enum": ["QUEUED", "SENT", "DELIVERED", "SUCCESSFUL", "TIMEOUT", "EXPIRED",
                                          "FAILED"]}

#: path -> method -> operation
OPERATIONS: dict[str, dict[str, Any]] = {
    "/api/auth/login": {
        "post": _op("Log in: a JWT pair", "auth", ok="JwtPair", body="LoginRequest", public=True),
        "get": _op("Wrong method (ThingsBoard answers 401)", "auth", public=True, ok={}),
    },
    "/api/auth/token": {"post": _op("Refresh a JWT pair", "auth", ok="JwtPair", body="RefreshRequest", public=True)},
    "/api/auth/user": {"get": _op("The current user", "auth", ok="User")},
    "/api/auth/changePassword": {
        "post": _op("Change the caller's password: a new JWT pair (the caller's older tokens stop working)", "auth",
                    ok="JwtPair", body="ChangePasswordRequest")},
    "/api/device": {"post": _op("Create a device, or update it when the body has its id", "devices", ok="Device",
                                body="DeviceSave", params=[_query("accessToken", description="its token")])},
    "/api/device/{deviceId}": {
        "get": _op("A device", "devices", ok="Device", params=[DEVICE_ID]),
        "delete": _op("Delete a device (tenant administrators)", "devices", params=[DEVICE_ID]),
    },
    "/api/device/{deviceId}/credentials": {
        "get": _op("A device's credentials (its access token)", "devices", ok="DeviceCredentials",
                   params=[DEVICE_ID])},
    "/api/tenant/devices": {
        "get": _op("The tenant's devices, a page (or one device by deviceName)", "devices",
                   ok={"anyOf": [_ref("DevicePage"), _ref("Device")]},
                   params=[*_paging(_PAGE_DEVICES), _query("type"), _query("deviceName")])},
    "/api/device/info/{deviceId}": {
        "get": _op("A device with its customer's title and whether it is connected", "devices", ok="DeviceInfo",
                   params=[DEVICE_ID])},
    "/api/tenant/deviceInfos": {
        "get": _op("The tenant's devices with presence, a page", "devices", ok="DeviceInfoPage",
                   params=[*_paging(_PAGE_DEVICES), _query("type")])},
    "/api/customer/{customerId}/deviceInfos": {
        "get": _op("A customer's devices with presence, a page", "devices", ok="DeviceInfoPage",
                   params=[CUSTOMER_ID, *_paging(_PAGE_DEVICES)])},
    "/api/tenant/device": {"get": _op("The tenant's device of that name", "devices", ok="Device",
                                      params=[_query("deviceName", required=True)])},
    "/api/customer/{customerId}/devices": {
        "get": _op("A customer's devices, a page", "devices", ok="DevicePage",
                   params=[CUSTOMER_ID, *_paging(_PAGE_DEVICES)])},
    "/api/customer/{customerId}/device/{deviceId}": {
        "post": _op("Assign a device to a customer", "devices", ok="Device", params=[CUSTOMER_ID, DEVICE_ID])},
    "/api/customer/device/{deviceId}": {
        "delete": _op("Unassign a device from its customer", "devices", ok="Device", params=[DEVICE_ID])},
    "/api/customer": {"post": _op("Create a customer, or rename it when the body has its id", "customers",
                                  ok="Customer", body="CustomerSave")},
    "/api/customer/{customerId}": {"get": _op("A customer", "customers", ok="Customer", params=[CUSTOMER_ID])},
    "/api/rpc/{kind}/{deviceId}": {
        "post": _op("Send a command to a device (ThingsBoard's RPC v2)", "rpc", ok={}, empty=True, body="RpcRequest",
                    params=[KIND, DEVICE_ID],
                    description="twoway: the device's answer; oneway: no body once delivered; persistent: "
                                "{\"rpcId\"} at once. 504 when the device did not answer in time (the body says "
                                "why), 429 when too many commands are pending for the device.")},
    "/api/plugins/rpc/{kind}/{deviceId}": {
        "post": _op("Send a command to a device (ThingsBoard's RPC v1)", "rpc", ok={}, empty=True,
                    body="RpcRequest", params=[KIND, DEVICE_ID],
                    description="As v2, but 409 when the device is offline and 408 when it did not answer.")},
    "/api/rpc/persistent/{rpcId}": {
        "get": _op("A persistent command", "rpc", ok="Rpc", params=[_path("rpcId")]),
        "delete": _op("Delete a persistent command", "rpc", params=[_path("rpcId")]),
    },
    "/api/rpc/persistent/device/{deviceId}": {
        "get": _op("A device's persistent commands, a page", "rpc", ok="RpcPage",
                   params=[DEVICE_ID, *_paging(("createdTime", "expirationTime", "request", "response")),
                           _query("rpcStatus", _RPC_STATUS)])},
    "/api/rpc/bulk": {"post": _op("Send one command to many devices", "rpc", ok="BulkStarted", body="BulkRequest")},
    "/api/rpc/bulk/{batchId}": {
        "get": _op("A bulk command's progress", "rpc", ok="BatchStatus",
                   params=[_path("batchId"), _query("rpcIds", {"type": "string", "enum": ["true", "false"]})]),
        "delete": _op("Delete a bulk command's commands", "rpc", ok="Deleted", params=[_path("batchId")]),
    },
    "/api/cluster/nodes": {"get": _op("The cluster's nodes (404 on a single server)", "operations",
                                      ok={"type": "array", "items": _ref("ClusterNode")})},
    "/api/ruleChain": {"post": _op("Create or update a rule chain", "rules", ok="RuleChain", body="RuleChainSave")},
    "/api/ruleChain/metadata": {"post": _op("Save a rule chain's nodes and connections", "rules",
                                            ok="RuleChainMetaData", body="RuleChainMetaData")},
    "/api/ruleChain/import": {"post": _op("Import a rule chain export", "rules", ok="RuleChain",
                                          body="RuleChainExport")},
    "/api/ruleChains": {"get": _op("The tenant's rule chains, a page", "rules", ok="RuleChainPage",
                                   params=[*_paging(("createdTime", "name", "root", "type")),
                                           _query("type", {"type": "string", "enum": ["CORE", "EDGE"]})])},
    "/api/ruleChain/{ruleChainId}": {
        "get": _op("A rule chain", "rules", ok="RuleChain", params=[RULE_CHAIN_ID]),
        "delete": _op("Delete a rule chain (not the root)", "rules", params=[RULE_CHAIN_ID]),
    },
    "/api/ruleChain/{ruleChainId}/metadata": {
        "get": _op("A rule chain's nodes and connections", "rules", ok="RuleChainMetaData",
                   params=[RULE_CHAIN_ID])},
    "/api/ruleChain/{ruleChainId}/root": {
        "post": _op("Make a rule chain the tenant's root chain", "rules", ok="RuleChain", params=[RULE_CHAIN_ID])},
    "/api/relation": {
        "post": _op("Create or update a relation", "relations", ok="Relation", body="Relation"),
        "get": _op("One relation", "relations", ok="Relation",
                   params=[*_entity_query("from", True), *_entity_query("to", True),
                           _query("relationType", required=True), _query("relationTypeGroup")]),
        "delete": _op("Delete one relation", "relations",
                      params=[*_entity_query("from", True), *_entity_query("to", True),
                              _query("relationType", required=True), _query("relationTypeGroup")]),
    },
    "/api/relations": {
        "get": _op("Relations from (fromId/fromType) or to (toId/toType) an entity", "relations",
                   ok={"type": "array", "items": _ref("Relation")},
                   params=[*_entity_query("from"), *_entity_query("to"), _query("relationType"),
                           _query("relationTypeGroup")]),
        "delete": _op("Delete every COMMON relation of an entity", "relations",
                      params=[_query("entityId", UUID_STRING, True), _query("entityType", STRING, True)]),
    },
    "/api/tenant": {"post": _op("Create a tenant, or rename it when the body has its id (system administrators)",
                                "tenants", ok="Tenant", body="TenantSave")},
    "/api/tenants": {"get": _op("Every tenant, a page (system administrators)", "tenants", ok="TenantPage",
                                params=_paging(("createdTime", "title")))},
    "/api/tenant/{tenantId}": {
        "get": _op("A tenant", "tenants", ok="Tenant", params=[_path("tenantId")]),
        "delete": _op("Delete a tenant and everything of it (system administrators)", "tenants",
                      params=[_path("tenantId")]),
    },
    "/api/user": {"post": _op("Create a tenant administrator or customer user (no password until activated), or "
                              "update one when the body has its id", "users", ok="User", body="UserSave",
                              params=[_query("sendActivationMail", BOOLEAN, description="accepted, ignored")])},
    "/api/user/{userId}": {
        "get": _op("A user", "users", ok="User", params=[_path("userId")]),
        "delete": _op("Delete a user (its tokens stop working at once)", "users", params=[_path("userId")]),
    },
    "/api/user/{userId}/userCredentialsEnabled": {
        "post": _op("Enable or disable a user", "users", params=[
            _path("userId"), _query("userCredentialsEnabled", {"type": "string", "enum": ["true", "false"]}, True)])},
    "/api/user/{userId}/activationLink": {
        "get": _op("The link a new user sets a password with", "users", ok={"type": "string"}, ok_media="text/plain",
                   params=[_path("userId")])},
    "/api/noauth/activate": {"post": _op("Set a new user's password with its activation token: a JWT pair", "users",
                                         ok="JwtPair", body="ActivateRequest", public=True)},
    "/api/health": {"get": _op("Readiness (as /api/health/ready)", "operations", ok="Health", public=True)},
    "/api/health/live": {"get": _op("Liveness: the process answers (the database is not checked)", "operations",
                                    ok="Health", public=True)},
    "/api/health/ready": {
        "get": _op("Readiness: the database answers (and in a cluster, the node has joined): 200 UP, else "
                   "503 DOWN with Retry-After", "operations", ok="Health", public=True)},
    "/api/openapi.json": {"get": _op("This document", "operations", ok={"type": "object"}, public=True)},
}


def _describe_server_errors() -> None:
    """The 5xx answers that are part of the contract, not failures: readiness answers 503 with a Health body, and
    a command the device did not answer in time is ThingsBoard's 504."""
    for path in ("/api/health", "/api/health/ready"):
        OPERATIONS[path]["get"]["responses"]["503"] = {
            "description": "DOWN: the database or the cluster is not ready; see Retry-After",
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
            "content": {JSON: {"schema": _ref("Health")}}}
    OPERATIONS["/api/rpc/{kind}/{deviceId}"]["post"]["responses"]["504"] = {
        "description": "the device did not take or answer the command in time; rpcError says which",
        "content": {JSON: {"schema": _ref("Error")}}}


_describe_server_errors()


def build_document(server_url: str | None = None) -> dict[str, Any]:
    """The whole document (a fresh copy: callers may change it)."""
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "NanoIoT REST API",
            "version": __version__,
            "description": "Device commands (RPC) and the entities they need, as ThingsBoard's REST API. Send "
                           "the JWT from POST /api/auth/login as `X-Authorization: Bearer <token>`. Every error "
                           "is ThingsBoard's error body. The HTTP device API (/api/v1/{accessToken}/...) and "
                           "/metrics (Prometheus) are outside this document.",
        },
        "paths": copy.deepcopy(OPERATIONS),
        "components": {
            "schemas": copy.deepcopy(SCHEMAS),
            "securitySchemes": {
                "bearer": {"type": "apiKey", "in": "header", "name": "X-Authorization",
                           "description": "`Bearer <JWT>` (ThingsBoard's header; `Authorization` works too)"},
            },
        },
        "security": [{"bearer": []}],
    }
    if server_url:
        document["servers"] = [{"url": server_url}]
    return document


def documented_routes(document: dict[str, Any]) -> set[tuple[str, str]]:
    """(METHOD, path template) of every operation in ``document``."""
    return {(method.upper(), path) for path, item in document["paths"].items() for method in item}


class OpenApiDocument:
    """``GET /api/openapi.json``: built once."""

    def __init__(self) -> None:
        self.document = build_document()

    def register(self, router: Router) -> None:
        router.add("GET", "/api/openapi.json", self.serve, authenticated=False)

    def serve(self, request: ApiRequest) -> dict[str, Any]:
        return self.document
