"""Who may call what: every REST route of ``build_router`` and every WebSocket command, for every kind of caller,
against every kind of target, with the exact status each gets.

Callers (:data:`ROLES`): nobody (no token), an expired token, a token signed with a foreign key, a deleted user's
token, the system administrator, the administrator of tenant A and of tenant B, the customer user of customer A (who
owns the "assigned" device) and of another customer of tenant A.

Targets (:data:`TARGETS`), for routes that name an entity: tenant A's device of customer A ("assigned"), tenant A's
unassigned device ("unassigned"), tenant B's device ("other"); for a route about another kind of entity, the
entity of the same standing (the customer, user, command, rule chain, batch or tenant on that side).

ThingsBoard's semantics, kept: the system administrator is refused every device and command (403); another tenant's
entity is 403 (it exists; not 404); a customer user reaches its customer's devices only (403 otherwise); an entity that
does not exist is 404. A route added to the router without an entry in :data:`MATRIX` fails
:func:`test_every_route_has_an_entry_in_the_matrix`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, quote, urlparse

import jwt as pyjwt
import pytest_twisted
import treq
from twisted.internet import reactor

from nanoiot.service import NanoService
from nanoiot.web.rule_chains import default_root_id
from nanoiot.web.site import build_router
from tests.fixtures.server import RunningServer, make_config, with_timeout
from tests.fixtures.server_context import server_running
from tests.integration.test_ws_e2e import WsClient

ROLES = ("anonymous", "expired", "foreign_key", "deleted_user", "sys_admin", "tenant_admin", "other_tenant_admin",
         "customer_user", "other_customer_user")
UNAUTHENTICATED = ROLES[:4]
TARGETS = ("assigned", "unassigned", "other")


@dataclass
class World:
    """Everything the matrix calls on: two tenants, their admins and customers, devices, commands, tokens."""

    server: RunningServer
    jwts: dict[str, str | None]
    tenant: dict[str, str]  # target -> tenant id
    device: dict[str, str]  # target -> device id
    customer: dict[str, str]  # target -> customer id (assigned: A, unassigned: A2, other: B)
    user: dict[str, str]  # target -> user id (assigned: customer user A, unassigned: tenant admin A, other: admin B)
    rpc: dict[str, str]  # target -> a persistent command's id on that target's device
    batch: dict[str, str]  # target -> a bulk RPC's id
    chain: dict[str, str]  # target -> the tenant's root rule chain id
    owner: dict[str, str]  # target -> the jwt of the administrator owning that target

    async def call(self, method: str, path: str, jwt: str | None, body: Any = None) -> tuple[int, Any]:
        headers = {"Content-Type": ["application/json"]}
        if jwt is not None:
            headers["X-Authorization"] = [f"Bearer {jwt}"]
        data = json.dumps(body).encode() if body is not None else None
        response = await treq.request(method, f"{self.server.http_url}{path}", data=data, headers=headers)
        text = await response.content()
        try:
            return response.code, (json.loads(text) if text else None)
        except ValueError:
            return response.code, text.decode("utf-8", "replace")

    async def ok(self, method: str, path: str, jwt: str | None, body: Any = None) -> Any:
        status, answer = await self.call(method, path, jwt, body)
        assert status == 200, (method, path, status, answer)
        return answer

    # --- fresh entities for calls that change or remove what they target ------------------------------------------

    async def fresh_device(self, target: str) -> str:
        device = await self.ok("POST", "/api/device", self.owner[target], {"name": f"d-{uuid.uuid4()}"})
        device_id = device["id"]["id"]
        if target == "assigned":
            await self.ok("POST", f"/api/customer/{self.customer['assigned']}/device/{device_id}", self.owner[target])
        return device_id

    async def fresh_rpc(self, target: str) -> str:
        answer = await self.ok("POST", f"/api/rpc/oneway/{self.device[target]}", self.owner[target], PERSISTENT)
        return answer["rpcId"]

    async def fresh_user(self, target: str) -> str:
        body: dict[str, Any] = {"email": f"{uuid.uuid4().hex[:12]}@fresh.example", "authority": "TENANT_ADMIN"}
        if target == "assigned":
            body.update(authority="CUSTOMER_USER", customerId={"entityType": "CUSTOMER",
                                                                "id": self.customer["assigned"]})
        return (await self.ok("POST", "/api/user", self.owner[target], body))["id"]["id"]

    async def fresh_chain(self, target: str) -> str:
        return (await self.ok("POST", "/api/ruleChain", self.owner[target], {"name": f"c-{uuid.uuid4()}"}))["id"]["id"]

    async def fresh_batch(self, target: str) -> str:
        body = dict(PERSISTENT, deviceIds=[self.device[target]])
        jwt = self.jwts["customer_user"] if target == "assigned" else self.owner[target]
        return (await self.ok("POST", "/api/rpc/bulk", jwt, body))["batchId"]

    async def fresh_tenant(self, target: str) -> str:
        return (await self.ok("POST", "/api/tenant", self.jwts["sys_admin"], {"title": f"t-{uuid.uuid4()}"}))["id"]["id"]

    async def fresh_relation(self, target: str) -> str:
        """A relation from the target's device to itself; returns the query naming it."""
        device = self.device[target]
        body = {"from": {"entityType": "DEVICE", "id": device}, "to": {"entityType": "DEVICE", "id": device},
                "type": "Contains"}
        await self.ok("POST", "/api/relation", self.owner[target], body)
        return relation_query(device)


PERSISTENT = {"method": "matrix", "params": {}, "persistent": True, "timeout": 600000}


def relation_query(device: str) -> str:
    return f"fromId={device}&fromType=DEVICE&toId={device}&toType=DEVICE&relationType=Contains"


#: A call: (method, path, body) for a target (None for routes without one), maybe creating what it needs.
Request = Callable[[World, Any], Awaitable[tuple[str, str, Any]]]


@dataclass
class Entry:
    request: Request
    #: role -> status, or role -> {target: status} for a targeted route (roles left out: 401).
    expected: dict[str, Any]
    targeted: bool = False


def req(method: str, path: str, body: Any = None) -> Request:
    """A fixed call with ``{device}``, ``{customer}``, ``{user}``, ``{rpc}``, ``{batch}``, ``{chain}``, ``{tenant}``
    filled from the target's entities."""

    async def make(world: World, target: Any) -> tuple[str, str, Any]:
        t = target or "unassigned"
        fields = {name: getattr(world, name)[t] for name in
                  ("device", "customer", "user", "rpc", "batch", "chain", "tenant")}
        filled = json.loads(json.dumps(body).replace("{device}", fields["device"])) if body is not None else None
        return method, path.format(**fields), filled

    return make


def fresh(method: str, path: str, kind: str, body: Any = None) -> Request:
    """A call on a new entity of ``kind`` (device, rpc, user, chain, batch, tenant, relation) for each cell."""

    async def make(world: World, target: Any) -> tuple[str, str, Any]:
        made = await getattr(world, f"fresh_{kind}")(target or "unassigned")
        fields = {"device": world.device[target or "unassigned"], "customer": world.customer[target or "unassigned"],
                  kind: made}
        return method, path.format(**fields), body

    return make


def same_for_all(status: int) -> dict[str, Any]:
    """A route that asks for no token: every caller gets the same answer."""
    return {role: status for role in ROLES}


def roles(sys: Any = 403, ta: Any = 403, tb: Any = 403, cu: Any = 403, cu2: Any = 403) -> dict[str, Any]:
    """Authenticated callers' statuses (the four refused kinds get 401). A tuple is (assigned, unassigned, other)."""

    def spread(value: Any) -> Any:
        return dict(zip(TARGETS, value)) if isinstance(value, tuple) else value

    return {"sys_admin": spread(sys), "tenant_admin": spread(ta), "other_tenant_admin": spread(tb),
            "customer_user": spread(cu), "other_customer_user": spread(cu2)}


# Statuses of a device-scoped route (assigned, unassigned, other) for each caller, as ThingsBoard answers them.
TA_DEVICE = (200, 200, 403)
TB_DEVICE = (403, 403, 200)
CU_DEVICE = (200, 403, 403)
NONE = 403

def named(method: str, path: str, field: str, extra: dict[str, Any] | None = None) -> Request:
    """A call with a new name each time (a creation; a login of an account never throttled)."""

    async def make(world: World, target: Any) -> tuple[str, str, Any]:
        return method, path, dict(extra or {}, **{field: f"m-{uuid.uuid4()}"})

    return make


async def chain_metadata(world: World, target: Any) -> tuple[str, str, Any]:
    chain = await world.fresh_chain(target)
    return "POST", "/api/ruleChain/metadata", {"ruleChainId": {"entityType": "RULE_CHAIN", "id": chain},
                                               "firstNodeIndex": None, "nodes": [], "connections": []}


async def chain_import(world: World, target: Any) -> tuple[str, str, Any]:
    return "POST", "/api/ruleChain/import", {"ruleChain": {"name": f"i-{uuid.uuid4()}"},
                                             "metadata": {"firstNodeIndex": None, "nodes": [], "connections": []}}


async def new_user(world: World, target: Any) -> tuple[str, str, Any]:
    """A user on the target's side: a customer user of customer A, a tenant administrator of tenant A or B."""
    body: dict[str, Any] = {"email": f"{uuid.uuid4().hex[:12]}@new.example", "authority": "TENANT_ADMIN",
                            "tenantId": {"entityType": "TENANT", "id": world.tenant[target]}}
    if target == "assigned":
        body.update(authority="CUSTOMER_USER", customerId={"entityType": "CUSTOMER", "id": world.customer[target]})
    return "POST", "/api/user", body


MATRIX: dict[tuple[str, str], Entry] = {
    # --- auth -----------------------------------------------------------------------------------------------------
    ("POST", "/api/auth/login"): Entry(named("POST", "/api/auth/login", "username", {"password": "wrong1"}),
                                       same_for_all(401)),
    ("GET", "/api/auth/login"): Entry(req("GET", "/api/auth/login"), same_for_all(401)),
    ("POST", "/api/auth/token"): Entry(req("POST", "/api/auth/token", {"refreshToken": "not-a-token"}),
                                       same_for_all(401)),
    ("GET", "/api/auth/user"): Entry(req("GET", "/api/auth/user"), roles(200, 200, 200, 200, 200)),
    ("POST", "/api/auth/changePassword"): Entry(req("POST", "/api/auth/changePassword",
                                                    {"currentPassword": "not-it", "newPassword": "whatever1"}),
                                                roles(400, 400, 400, 400, 400)),
    # --- devices and customers ------------------------------------------------------------------------------------
    ("POST", "/api/device"): Entry(named("POST", "/api/device", "name"), roles(403, 200, 200, 200, 200)),
    ("GET", "/api/device/{deviceId}"): Entry(req("GET", "/api/device/{device}"),
                                             roles(NONE, TA_DEVICE, TB_DEVICE, CU_DEVICE, NONE), targeted=True),
    ("DELETE", "/api/device/{deviceId}"): Entry(fresh("DELETE", "/api/device/{device}", "device"),
                                                roles(NONE, TA_DEVICE, TB_DEVICE, NONE, NONE), targeted=True),
    ("GET", "/api/device/{deviceId}/credentials"): Entry(req("GET", "/api/device/{device}/credentials"),
                                                         roles(NONE, TA_DEVICE, TB_DEVICE, CU_DEVICE, NONE),
                                                         targeted=True),
    ("GET", "/api/tenant/devices"): Entry(req("GET", "/api/tenant/devices?pageSize=10&page=0"),
                                          roles(403, 200, 200, 403, 403)),
    ("GET", "/api/tenant/deviceInfos"): Entry(req("GET", "/api/tenant/deviceInfos?pageSize=10&page=0"),
                                              roles(403, 200, 200, 403, 403)),
    ("GET", "/api/device/info/{deviceId}"): Entry(req("GET", "/api/device/info/{device}"),
                                                  roles(NONE, TA_DEVICE, TB_DEVICE, CU_DEVICE, NONE), targeted=True),
    ("GET", "/api/customer/{customerId}/deviceInfos"): Entry(
        req("GET", "/api/customer/{customer}/deviceInfos?pageSize=5&page=0"),
        roles(NONE, TA_DEVICE, TB_DEVICE, CU_DEVICE, (403, 200, 403)), targeted=True),
    ("GET", "/api/tenant/device"): Entry(req("GET", "/api/tenant/device?deviceName=Demo%20Device"),
                                         roles(403, 200, 404, 403, 403)),
    ("GET", "/api/customer/{customerId}/devices"): Entry(req("GET", "/api/customer/{customer}/devices?pageSize=5&page=0"),
                                                         roles(NONE, TA_DEVICE, TB_DEVICE, CU_DEVICE, (403, 200, 403)),
                                                         targeted=True),
    ("POST", "/api/customer/{customerId}/device/{deviceId}"): Entry(
        fresh("POST", "/api/customer/{customer}/device/{device}", "device"),
        roles(NONE, TA_DEVICE, TB_DEVICE, NONE, NONE), targeted=True),
    ("DELETE", "/api/customer/device/{deviceId}"): Entry(fresh("DELETE", "/api/customer/device/{device}", "device"),
                                                         roles(NONE, (200, 400, 403), (403, 403, 400), NONE, NONE),
                                                         targeted=True),
    ("POST", "/api/customer"): Entry(named("POST", "/api/customer", "title"), roles(403, 200, 200, 403, 403)),
    ("GET", "/api/customer/{customerId}"): Entry(req("GET", "/api/customer/{customer}"),
                                                 roles(NONE, TA_DEVICE, TB_DEVICE, CU_DEVICE, (403, 200, 403)),
                                                 targeted=True),
    # --- commands -------------------------------------------------------------------------------------------------
    ("POST", "/api/rpc/bulk"): Entry(req("POST", "/api/rpc/bulk", dict(PERSISTENT, deviceIds=["{device}"])),
                                     roles(NONE, TA_DEVICE, TB_DEVICE, CU_DEVICE, NONE), targeted=True),
    ("GET", "/api/rpc/bulk/{batchId}"): Entry(req("GET", "/api/rpc/bulk/{batch}"),
                                              roles(NONE, TA_DEVICE, TB_DEVICE, CU_DEVICE, NONE), targeted=True),
    ("DELETE", "/api/rpc/bulk/{batchId}"): Entry(fresh("DELETE", "/api/rpc/bulk/{batch}", "batch"),
                                                 roles(NONE, TA_DEVICE, TB_DEVICE, NONE, NONE), targeted=True),
    ("POST", "/api/rpc/{kind}/{deviceId}"): Entry(req("POST", "/api/rpc/oneway/{device}", PERSISTENT),
                                                  roles(NONE, TA_DEVICE, TB_DEVICE, CU_DEVICE, NONE), targeted=True),
    ("POST", "/api/plugins/rpc/{kind}/{deviceId}"): Entry(req("POST", "/api/plugins/rpc/oneway/{device}", PERSISTENT),
                                                          roles(NONE, TA_DEVICE, TB_DEVICE, CU_DEVICE, NONE),
                                                          targeted=True),
    ("GET", "/api/rpc/persistent/{rpcId}"): Entry(req("GET", "/api/rpc/persistent/{rpc}"),
                                                  roles(NONE, TA_DEVICE, TB_DEVICE, CU_DEVICE, NONE), targeted=True),
    ("DELETE", "/api/rpc/persistent/{rpcId}"): Entry(fresh("DELETE", "/api/rpc/persistent/{rpc}", "rpc"),
                                                     roles(NONE, TA_DEVICE, TB_DEVICE, NONE, NONE), targeted=True),
    ("GET", "/api/rpc/persistent/device/{deviceId}"): Entry(
        req("GET", "/api/rpc/persistent/device/{device}?pageSize=5&page=0"),
        roles(NONE, TA_DEVICE, TB_DEVICE, CU_DEVICE, NONE), targeted=True),
    ("GET", "/api/cluster/nodes"): Entry(req("GET", "/api/cluster/nodes"), roles(404, 404, 404, 403, 403)),
    # --- rule chains and relations --------------------------------------------------------------------------------
    ("POST", "/api/ruleChain"): Entry(named("POST", "/api/ruleChain", "name"), roles(403, 200, 200, 403, 403)),
    ("POST", "/api/ruleChain/metadata"): Entry(chain_metadata, roles(NONE, TA_DEVICE, TB_DEVICE, NONE, NONE),
                                               targeted=True),
    ("POST", "/api/ruleChain/import"): Entry(chain_import, roles(403, 200, 200, 403, 403)),
    ("GET", "/api/ruleChains"): Entry(req("GET", "/api/ruleChains?pageSize=5&page=0"), roles(403, 200, 200, 403, 403)),
    ("GET", "/api/ruleChain/{ruleChainId}"): Entry(req("GET", "/api/ruleChain/{chain}"),
                                                   roles(NONE, TA_DEVICE, TB_DEVICE, NONE, NONE), targeted=True),
    ("GET", "/api/ruleChain/{ruleChainId}/metadata"): Entry(req("GET", "/api/ruleChain/{chain}/metadata"),
                                                            roles(NONE, TA_DEVICE, TB_DEVICE, NONE, NONE),
                                                            targeted=True),
    ("POST", "/api/ruleChain/{ruleChainId}/root"): Entry(req("POST", "/api/ruleChain/{chain}/root"),
                                                         roles(NONE, TA_DEVICE, TB_DEVICE, NONE, NONE), targeted=True),
    ("DELETE", "/api/ruleChain/{ruleChainId}"): Entry(fresh("DELETE", "/api/ruleChain/{chain}", "chain"),
                                                      roles(NONE, TA_DEVICE, TB_DEVICE, NONE, NONE), targeted=True),
    ("POST", "/api/relation"): Entry(req("POST", "/api/relation", {"from": {"entityType": "DEVICE", "id": "{device}"},
                                                                   "to": {"entityType": "DEVICE", "id": "{device}"},
                                                                   "type": "Contains"}),
                                     roles(NONE, TA_DEVICE, TB_DEVICE, NONE, NONE), targeted=True),
    ("GET", "/api/relation"): Entry(fresh("GET", "/api/relation?{relation}", "relation"),
                                    roles(NONE, TA_DEVICE, TB_DEVICE, NONE, NONE), targeted=True),
    ("DELETE", "/api/relation"): Entry(fresh("DELETE", "/api/relation?{relation}", "relation"),
                                       roles(NONE, TA_DEVICE, TB_DEVICE, NONE, NONE), targeted=True),
    ("GET", "/api/relations"): Entry(req("GET", "/api/relations?fromId={device}&fromType=DEVICE"),
                                     roles(NONE, TA_DEVICE, TB_DEVICE, NONE, NONE), targeted=True),
    ("DELETE", "/api/relations"): Entry(req("DELETE", "/api/relations?entityId={device}&entityType=DEVICE"),
                                        roles(NONE, TA_DEVICE, TB_DEVICE, NONE, NONE), targeted=True),
    # --- operations -----------------------------------------------------------------------------------------------
    ("GET", "/api/health"): Entry(req("GET", "/api/health"), same_for_all(200)),
    ("GET", "/api/health/live"): Entry(req("GET", "/api/health/live"), same_for_all(200)),
    ("GET", "/api/health/ready"): Entry(req("GET", "/api/health/ready"), same_for_all(200)),
    ("GET", "/api/openapi.json"): Entry(req("GET", "/api/openapi.json"), same_for_all(200)),
    # --- tenants and users ----------------------------------------------------------------------------------------
    ("POST", "/api/tenant"): Entry(req("POST", "/api/tenant", {"title": "made by the matrix"}),
                                   roles(200, 403, 403, 403, 403)),
    ("GET", "/api/tenants"): Entry(req("GET", "/api/tenants?pageSize=5&page=0"), roles(200, 403, 403, 403, 403)),
    ("GET", "/api/tenant/{tenantId}"): Entry(req("GET", "/api/tenant/{tenant}"),
                                             roles(200, TA_DEVICE, TB_DEVICE, NONE, NONE), targeted=True),
    ("DELETE", "/api/tenant/{tenantId}"): Entry(fresh("DELETE", "/api/tenant/{tenant}", "tenant"),
                                                roles(200, NONE, NONE, NONE, NONE), targeted=True),
    ("POST", "/api/user"): Entry(new_user, roles((403, 200, 200), (200, 200, 200), (404, 200, 200), NONE, NONE),
                                 targeted=True),
    ("GET", "/api/user/{userId}"): Entry(req("GET", "/api/user/{user}"),
                                         roles((403, 200, 200), TA_DEVICE, TB_DEVICE, (200, 403, 403), NONE),
                                         targeted=True),
    ("DELETE", "/api/user/{userId}"): Entry(fresh("DELETE", "/api/user/{user}", "user"),
                                            roles((403, 200, 200), TA_DEVICE, TB_DEVICE, NONE, NONE), targeted=True),
    ("POST", "/api/user/{userId}/userCredentialsEnabled"): Entry(
        fresh("POST", "/api/user/{user}/userCredentialsEnabled?userCredentialsEnabled=false", "user"),
        roles((403, 200, 200), TA_DEVICE, TB_DEVICE, NONE, NONE), targeted=True),
    ("GET", "/api/user/{userId}/activationLink"): Entry(fresh("GET", "/api/user/{user}/activationLink", "user"),
                                                        roles((403, 200, 200), TA_DEVICE, TB_DEVICE, NONE, NONE),
                                                        targeted=True),
    ("POST", "/api/noauth/activate"): Entry(req("POST", "/api/noauth/activate", {"activateToken": "x",
                                                                               "password": "long-enough"}),
                                            same_for_all(401)),
}


def _template_regex(template: str) -> str:
    import re

    return "^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template) + "$"


def test_every_route_has_an_entry_in_the_matrix() -> None:
    """A new route must say who may call it: add it to MATRIX (and no entry may outlive its route)."""
    service = NanoService(make_config("sqlite://"), reactor)
    routes = {(r.method.decode(), r.pattern.pattern) for r in build_router(service.web_context).routes}
    known = {(method, _template_regex(template)) for method, template in MATRIX}
    assert sorted(routes - known) == [], "routes without an entry in MATRIX"
    assert sorted(known - routes) == [], "MATRIX entries without a route"


# --- building the world -----------------------------------------------------------------------------------------------

async def activated_user(world: World, creator: str, body: dict[str, Any]) -> tuple[str, str]:
    """(user id, access token) of a user created by ``creator`` and activated through its link."""
    user = await world.ok("POST", "/api/user", creator, body)
    link = await world.ok("GET", f"/api/user/{user['id']['id']}/activationLink", creator)
    token = parse_qs(urlparse(link).query)["activateToken"][0]
    pair = await world.ok("POST", "/api/noauth/activate", None, {"activateToken": token, "password": "matrix-pw"})
    return user["id"]["id"], pair["token"]


def resigned(token: str, key: bytes, **changes: Any) -> str:
    claims = pyjwt.decode(token, options={"verify_signature": False})
    claims.update(changes)
    return pyjwt.encode(claims, key, algorithm="HS512")


async def build_world(server: RunningServer) -> World:
    world = World(server, {}, {}, {}, {}, {}, {}, {}, {}, {})
    jwts = world.jwts
    for role, who in (("sys_admin", "sysadmin"), ("tenant_admin", "tenant"), ("customer_user", "customer")):
        jwts[role] = await server.jwt(who)
    me_ta = await world.ok("GET", "/api/auth/user", jwts["tenant_admin"])
    me_cu = await world.ok("GET", "/api/auth/user", jwts["customer_user"])
    tenant_a, customer_a = me_ta["tenantId"]["id"], me_cu["customerId"]["id"]
    assigned, _ = await server.demo_device("Customer Device")
    unassigned, _ = await server.demo_device("Demo Device")
    customer_a2 = (await world.ok("POST", "/api/customer", jwts["tenant_admin"], {"title": "A2"}))["id"]["id"]
    cu2_id, jwts["other_customer_user"] = await activated_user(world, jwts["tenant_admin"], {
        "email": "cu2@a.example", "authority": "CUSTOMER_USER", "customerId": {"entityType": "CUSTOMER",
                                                                               "id": customer_a2}})
    tenant_b = (await world.ok("POST", "/api/tenant", jwts["sys_admin"], {"title": "Tenant B"}))["id"]["id"]
    tb_id, jwts["other_tenant_admin"] = await activated_user(world, jwts["sys_admin"], {
        "email": "admin@b.example", "authority": "TENANT_ADMIN", "tenantId": {"entityType": "TENANT", "id": tenant_b}})
    device_b = (await world.ok("POST", "/api/device", jwts["other_tenant_admin"], {"name": "b"}))["id"]["id"]
    customer_b = (await world.ok("POST", "/api/customer", jwts["other_tenant_admin"], {"title": "B1"}))["id"]["id"]
    gone_id, jwts["deleted_user"] = await activated_user(world, jwts["tenant_admin"], {
        "email": "gone@a.example", "authority": "TENANT_ADMIN"})
    await world.ok("GET", "/api/auth/user", jwts["deleted_user"])
    await world.ok("DELETE", f"/api/user/{gone_id}", jwts["tenant_admin"])
    key = server.service.tokens.key
    now = int(time.time())
    jwts["expired"] = resigned(jwts["tenant_admin"], key, iat=now - 200, exp=now - 100)
    jwts["foreign_key"] = resigned(jwts["tenant_admin"], b"someone-else's-key-" * 4)
    jwts["anonymous"] = None

    world.tenant = {"assigned": tenant_a, "unassigned": tenant_a, "other": tenant_b}
    world.device = {"assigned": assigned, "unassigned": unassigned, "other": device_b}
    world.customer = {"assigned": customer_a, "unassigned": customer_a2, "other": customer_b}
    world.user = {"assigned": me_cu["id"]["id"], "unassigned": me_ta["id"]["id"], "other": tb_id}
    world.owner = {"assigned": jwts["tenant_admin"], "unassigned": jwts["tenant_admin"],
                   "other": jwts["other_tenant_admin"]}
    world.chain = {t: str(default_root_id(uuid.UUID(world.tenant[t]))) for t in TARGETS}
    for t in ("unassigned", "other"):  # stored (as it is once changed), so that the other tenant sees it exists
        metadata = await world.ok("GET", f"/api/ruleChain/{world.chain[t]}/metadata", world.owner[t])
        await world.ok("POST", "/api/ruleChain/metadata", world.owner[t], metadata)
    world.rpc = {t: await world.fresh_rpc(t) for t in TARGETS}
    world.batch = {t: await world.fresh_batch(t) for t in TARGETS}
    return world


def expected_status(entry: Entry, role: str, target: Any) -> int:
    value = entry.expected.get(role, 401)
    return value[target] if isinstance(value, dict) else value


@pytest_twisted.ensureDeferred
async def test_every_route_answers_every_caller_and_target_with_its_exact_status(tmp_path):
    async with server_running(tmp_path, login_rate_limit_per_address="10000:60") as server:
        world = await build_world(server)
        wrong = []
        cells = 0
        for (method, template), entry in MATRIX.items():
            for role in ROLES:
                for target in (TARGETS if entry.targeted else (None,)):
                    call_method, path, body = await entry.request(world, target)
                    status, answer = await world.call(call_method, path, world.jwts[role], body)
                    cells += 1
                    wanted = expected_status(entry, role, target)
                    if status != wanted:
                        wrong.append(f"{method} {template} as {role} on {target}: {status} (expected {wanted}) "
                                     f"{str(answer)[:120]}")
        assert wrong == [], f"{len(wrong)} of {cells} cells differ:\n" + "\n".join(wrong)


# --- WebSocket ------------------------------------------------------------------------------------------------------

#: Per command, per authenticated caller: statuses on (assigned, unassigned, other) devices; "*" is every device
#: the caller may see.
WS_MATRIX: dict[str, dict[str, tuple[int, int, int]]] = {
    "subscribe": {"sys_admin": (403, 403, 403), "tenant_admin": TA_DEVICE, "other_tenant_admin": TB_DEVICE,
                  "customer_user": CU_DEVICE, "other_customer_user": (403, 403, 403)},
    "rpc": {"sys_admin": (403, 403, 403), "tenant_admin": TA_DEVICE, "other_tenant_admin": TB_DEVICE,
            "customer_user": CU_DEVICE, "other_customer_user": (403, 403, 403)},
    "unsubscribe": {"sys_admin": (403, 403, 403), "tenant_admin": (200, 200, 200),
                    "other_tenant_admin": (200, 200, 200), "customer_user": (200, 200, 200),
                    "other_customer_user": (200, 200, 200)},
}
WS_ALL = {"sys_admin": 403, "tenant_admin": 200, "other_tenant_admin": 200, "customer_user": 200,
          "other_customer_user": 200}


@pytest_twisted.ensureDeferred
async def test_every_websocket_command_answers_every_caller_and_target_with_its_exact_status(tmp_path):
    async with server_running(tmp_path, login_rate_limit_per_address="10000:60") as server:
        world = await build_world(server)
        wrong = []
        for role in UNAUTHENTICATED:
            token = world.jwts[role]
            url = f"{server.http_url}/api/ws/rpc" + (f"?token={quote(token)}" if token else "")
            response = await treq.get(url, headers={"Upgrade": ["websocket"], "Connection": ["Upgrade"]})
            await response.content()
            if response.code != 401:
                wrong.append(f"upgrade as {role}: {response.code} (expected 401)")
        for role in WS_ALL:
            client = WsClient(server.http_url.replace("http://", "ws://") + f"/api/ws/rpc?token={world.jwts[role]}")
            from autobahn.twisted.websocket import connectWS

            connectWS(client.factory)
            await with_timeout(client.opened)
            frames = {"subscribe": lambda device: {"cmd": "subscribe", "deviceId": device},
                      "unsubscribe": lambda device: {"cmd": "unsubscribe", "deviceId": device},
                      "rpc": lambda device: dict(PERSISTENT, cmd="rpc", deviceId=device, oneway=True)}
            for command, statuses in WS_MATRIX.items():
                for target, wanted in zip(TARGETS, statuses[role]):
                    frame = dict(frames[command](world.device[target]), id=f"{command}-{target}")
                    status = (await client.call(frame))["status"]
                    if status != wanted:
                        wrong.append(f"{command} as {role} on {target}: {status} (expected {wanted})")
            status = (await client.call({"cmd": "subscribe", "deviceId": "*", "id": "all"}))["status"]
            if status != WS_ALL[role]:
                wrong.append(f"subscribe * as {role}: {status} (expected {WS_ALL[role]})")
            client.close()
            await with_timeout(client.closed)
        assert wrong == [], "\n".join(wrong)
