"""Users and tenants end to end on loopback (the real server, SQLite): a deleted or disabled user's tokens stop at once
(REST and WebSocket), login throttling (429 with Retry-After), tenant management by the system administrator, and
ThingsBoard's activation flow for a new user's first password."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest_twisted
import treq

from tests.fixtures.server import RunningServer, with_timeout
from tests.fixtures.server_context import server_running
from tests.integration.test_ws_e2e import connect_ws


@pytest_twisted.async_yield_fixture
async def server(tmp_path: Any) -> Any:
    async with server_running(tmp_path) as running:
        yield running


async def call(server: RunningServer, method: str, path: str, jwt: str | None, body: Any = None,
               ) -> tuple[int, Any, Any]:
    """(status, parsed body, response headers) of one REST call made with ``jwt``."""
    headers = {"Content-Type": ["application/json"]}
    if jwt is not None:
        headers["X-Authorization"] = [f"Bearer {jwt}"]
    data = json.dumps(body).encode() if body is not None else None
    response = await treq.request(method, f"{server.http_url}{path}", data=data, headers=headers)
    text = await response.content()
    try:
        parsed = json.loads(text) if text else None
    except ValueError:
        parsed = text.decode()
    return response.code, parsed, response.headers


async def login(server: RunningServer, email: str, password: str) -> tuple[int, Any, Any]:
    return await call(server, "POST", "/api/auth/login", None, {"username": email, "password": password})


async def new_user(server: RunningServer, creator_jwt: str, body: dict[str, Any], password: str = "secret-pw") -> Any:
    """A user created through ``POST /api/user`` and activated through its activation link; returns (user, jwt)."""
    status, user, _ = await call(server, "POST", "/api/user?sendActivationMail=false", creator_jwt, body)
    assert status == 200, user
    status, link, _ = await call(server, "GET", f"/api/user/{user['id']['id']}/activationLink", creator_jwt)
    assert status == 200, link
    token = parse_qs(urlparse(link).query)["activateToken"][0]
    status, pair, _ = await call(server, "POST", "/api/noauth/activate", None,
                                 {"activateToken": token, "password": password})
    assert status == 200, pair
    return user, pair


# --- a deleted or disabled user -----------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_deleted_users_token_stops_working_at_once_for_reads_credentials_and_commands(server):
    admin = await server.jwt("tenant")
    device_id, _ = await server.demo_device()
    user, pair = await new_user(server, admin, {"email": "second@nanoiot.io", "authority": "TENANT_ADMIN"})
    jwt = pair["token"]
    rpc = {"method": "m", "params": {}, "persistent": True, "timeout": 60000}
    assert (await call(server, "GET", f"/api/device/{device_id}", jwt))[0] == 200
    assert (await call(server, "GET", f"/api/device/{device_id}/credentials", jwt))[0] == 200
    assert (await call(server, "POST", f"/api/rpc/oneway/{device_id}", jwt, rpc))[0] == 200
    socket = await connect_ws(server.http_url, jwt)

    status, body, _ = await call(server, "DELETE", f"/api/user/{user['id']['id']}", admin)
    assert (status, body) == (200, None)

    for method, path, body in (("GET", f"/api/device/{device_id}", None),
                               ("GET", f"/api/device/{device_id}/credentials", None),
                               ("POST", f"/api/rpc/oneway/{device_id}", rpc),
                               ("GET", "/api/auth/user", None)):
        status, answer, _ = await call(server, method, path, jwt, body)
        assert status == 401, (path, answer)
        assert answer["errorCode"] in (10, 11), answer
    # The open WebSocket was closed, a new one is refused, and so is a refresh.
    code, reason = await with_timeout(socket.closed)
    assert code == 4003, reason
    response = await treq.get(f"{server.http_url}/api/ws/rpc?token={jwt}", headers={"Upgrade": ["websocket"]})
    assert response.code == 401
    assert (await response.json())["message"] == "User not found"
    status, answer, _ = await call(server, "POST", "/api/auth/token", None, {"refreshToken": pair["refreshToken"]})
    assert status == 401, answer
    assert (await call(server, "GET", f"/api/user/{user['id']['id']}", admin))[0] == 404


@pytest_twisted.ensureDeferred
async def test_a_disabled_user_is_refused_and_its_old_tokens_stay_refused_once_enabled_again(server):
    admin = await server.jwt("tenant")
    device_id, _ = await server.demo_device()
    user, pair = await new_user(server, admin, {"email": "third@nanoiot.io", "authority": "TENANT_ADMIN"})
    user_id, jwt = user["id"]["id"], pair["token"]
    assert (await call(server, "GET", f"/api/device/{device_id}", jwt))[0] == 200

    path = f"/api/user/{user_id}/userCredentialsEnabled?userCredentialsEnabled=false"
    assert (await call(server, "POST", path, admin))[0] == 200
    status, answer, _ = await call(server, "GET", f"/api/device/{device_id}", jwt)
    assert status == 401, answer
    status, answer, _ = await login(server, "third@nanoiot.io", "secret-pw")
    assert (status, answer["message"]) == (401, "User is not active")
    status, shown, _ = await call(server, "GET", f"/api/user/{user_id}", admin)
    assert shown["additionalInfo"]["userCredentialsEnabled"] is False

    assert (await call(server, "POST", path.replace("=false", "=true"), admin))[0] == 200
    assert (await call(server, "GET", f"/api/device/{device_id}", jwt))[0] == 401  # issued before the disabling
    status, fresh, _ = await login(server, "third@nanoiot.io", "secret-pw")
    assert status == 200, fresh
    assert (await call(server, "GET", f"/api/device/{device_id}", fresh["token"]))[0] == 200
    assert (await call(server, "POST", path.replace("=false", "=maybe"), admin))[0] == 400


@pytest_twisted.ensureDeferred
async def test_a_user_may_not_delete_or_disable_itself_and_a_customer_user_manages_nobody(server):
    admin = await server.jwt("tenant")
    me = (await call(server, "GET", "/api/auth/user", admin))[1]["id"]["id"]
    assert (await call(server, "DELETE", f"/api/user/{me}", admin))[0] == 400
    path = f"/api/user/{me}/userCredentialsEnabled?userCredentialsEnabled=false"
    assert (await call(server, "POST", path, admin))[0] == 400
    customer = await server.jwt("customer")
    assert (await call(server, "DELETE", f"/api/user/{me}", customer))[0] == 403
    assert (await call(server, "POST", "/api/user", customer, {"email": "x@nanoiot.io",
                                                              "authority": "CUSTOMER_USER"}))[0] == 403


# --- login throttling -------------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_wrong_passwords_for_one_account_are_answered_429_with_retry_after_once_its_budget_is_spent(tmp_path):
    async with server_running(tmp_path, login_rate_limit_per_account="3:600",
                              login_rate_limit_per_address="1000:60") as server:
        answers = [await login(server, "tenant@nanoiot.io", "wrong") for _ in range(5)]
        assert [a[0] for a in answers] == [401, 401, 401, 429, 429]
        status, body, headers = answers[3]
        assert body["errorCode"] == 33 and body["status"] == 429, body
        assert int(headers.getRawHeaders("retry-after")[0]) >= 1
        # The right password is refused too while the account is throttled; another account is not.
        assert (await login(server, "tenant@nanoiot.io", "tenant"))[0] == 429
        assert (await login(server, "customer@nanoiot.io", "customer"))[0] == 200


@pytest_twisted.ensureDeferred
async def test_a_successful_login_resets_the_accounts_budget(tmp_path):
    async with server_running(tmp_path, login_rate_limit_per_account="3:600",
                              login_rate_limit_per_address="1000:60") as server:
        for _ in range(3):
            assert (await login(server, "customer@nanoiot.io", "wrong"))[0] == 401
        # The 3 attempts spent the budget; a typo corrected in time still... is throttled: wait is the only cure.
        assert (await login(server, "customer@nanoiot.io", "customer"))[0] == 429
    async with server_running(tmp_path, "other.db", login_rate_limit_per_account="3:600",
                              login_rate_limit_per_address="1000:60") as server:
        for _ in range(2):
            assert (await login(server, "customer@nanoiot.io", "wrong"))[0] == 401
        assert (await login(server, "customer@nanoiot.io", "customer"))[0] == 200
        for _ in range(2):
            assert (await login(server, "customer@nanoiot.io", "wrong"))[0] == 401


@pytest_twisted.ensureDeferred
async def test_one_address_trying_many_accounts_is_throttled_and_unknown_users_count_too(tmp_path):
    async with server_running(tmp_path, login_rate_limit_per_account="100:60",
                              login_rate_limit_per_address="4:600") as server:
        statuses = [(await login(server, f"nobody{i}@nanoiot.io", "pw"))[0] for i in range(6)]
        assert statuses == [401, 401, 401, 401, 429, 429]


# --- tenants and users ------------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_the_system_administrator_creates_lists_renames_and_deletes_a_tenant_with_everything_in_it(server):
    sysadmin = await server.jwt("sysadmin")
    status, tenant, _ = await call(server, "POST", "/api/tenant", sysadmin, {"title": "Tenant B", "region": "Global"})
    assert status == 200, tenant
    tenant_id = tenant["id"]["id"]
    assert tenant["id"]["entityType"] == "TENANT" and tenant["title"] == "Tenant B"
    status, page, _ = await call(server, "GET", "/api/tenants?pageSize=10&page=0&textSearch=tenant b", sysadmin)
    assert status == 200 and [t["id"]["id"] for t in page["data"]] == [tenant_id], page
    status, page, _ = await call(server, "GET", "/api/tenants?pageSize=1&page=0&sortProperty=title&sortOrder=DESC",
                                 sysadmin)
    assert page["totalElements"] == 2 and page["hasNext"] and page["data"][0]["title"] == "Tenant B"
    renamed = dict(tenant, title="Tenant Bee")
    assert (await call(server, "POST", "/api/tenant", sysadmin, renamed))[1]["title"] == "Tenant Bee"
    assert (await call(server, "GET", f"/api/tenant/{tenant_id}", sysadmin))[1]["title"] == "Tenant Bee"
    assert (await call(server, "POST", "/api/tenant", sysadmin, {"title": ""}))[0] == 400
    assert (await call(server, "POST", "/api/tenant", sysadmin, {"title": "x" * 256}))[0] == 400

    # Its administrator (created by the system administrator, activated by link) creates a device and a customer user.
    _, pair = await new_user(server, sysadmin, {"email": "admin@b.example", "authority": "TENANT_ADMIN",
                                                "tenantId": {"entityType": "TENANT", "id": tenant_id}})
    b_admin = pair["token"]
    assert (await call(server, "GET", f"/api/tenant/{tenant_id}", b_admin))[0] == 200
    status, device, _ = await call(server, "POST", "/api/device?accessToken=B_DEVICE_TOKEN", b_admin, {"name": "b1"})
    assert status == 200, device
    status, customer, _ = await call(server, "POST", "/api/customer", b_admin, {"title": "B's customer"})
    _, customer_pair = await new_user(server, b_admin, {"email": "user@b.example", "authority": "CUSTOMER_USER",
                                                        "customerId": customer["id"]})
    # The demo tenant's administrator cannot read tenant B, its device or its users.
    demo_admin = await server.jwt("tenant")
    assert (await call(server, "GET", f"/api/tenant/{tenant_id}", demo_admin))[0] == 403
    assert (await call(server, "GET", f"/api/device/{device['id']['id']}", demo_admin))[0] == 403
    assert (await call(server, "GET", "/api/tenants?pageSize=10&page=0", demo_admin))[0] == 403

    assert (await call(server, "DELETE", f"/api/tenant/{tenant_id}", sysadmin))[0] == 200
    assert (await call(server, "GET", f"/api/tenant/{tenant_id}", sysadmin))[0] == 404
    assert (await call(server, "GET", "/api/auth/user", b_admin))[0] == 401
    assert (await call(server, "GET", "/api/auth/user", customer_pair["token"]))[0] == 401
    assert await server.service.catalog.device_for_token("B_DEVICE_TOKEN") is None
    assert (await login(server, "admin@b.example", "secret-pw"))[0] == 401


@pytest_twisted.ensureDeferred
async def test_who_may_create_which_user(server):
    sysadmin, admin = await server.jwt("sysadmin"), await server.jwt("tenant")
    demo_tenant = (await call(server, "GET", "/api/auth/user", admin))[1]["tenantId"]
    assert (await call(server, "POST", "/api/user", sysadmin,
                       {"email": "c@x.example", "authority": "CUSTOMER_USER"}))[0] == 403
    assert (await call(server, "POST", "/api/user", sysadmin,
                       {"email": "t@x.example", "authority": "TENANT_ADMIN"}))[0] == 400  # no tenantId
    assert (await call(server, "POST", "/api/user", admin,
                       {"email": "s@x.example", "authority": "SYS_ADMIN"}))[0] == 403
    assert (await call(server, "POST", "/api/user", admin,
                       {"email": "c@x.example", "authority": "CUSTOMER_USER"}))[0] == 400  # no customerId
    assert (await call(server, "POST", "/api/user", admin, {"email": "not-an-email", "authority": "TENANT_ADMIN"}
                       ))[0] == 400
    status, user, _ = await call(server, "POST", "/api/user", sysadmin,
                                 {"email": "t@x.example", "authority": "TENANT_ADMIN", "tenantId": demo_tenant,
                                  "firstName": "Tee"})
    assert status == 200 and user["tenantId"] == demo_tenant and user["firstName"] == "Tee", user
    assert (await call(server, "POST", "/api/user", admin, {"email": "T@X.example", "authority": "TENANT_ADMIN"}
                       ))[0] == 400  # the e-mail is taken, whatever its case
    # Not activated yet: no password logs in; a link is used once.
    assert (await login(server, "t@x.example", "anything"))[0] == 401
    status, link, _ = await call(server, "GET", f"/api/user/{user['id']['id']}/activationLink", admin)
    token = parse_qs(urlparse(link).query)["activateToken"][0]
    assert (await call(server, "POST", "/api/noauth/activate", None, {"activateToken": token, "password": "abc"}
                       ))[0] == 400  # too short
    assert (await call(server, "POST", "/api/noauth/activate", None, {"activateToken": token, "password": "longer1"}
                       ))[0] == 200
    assert (await call(server, "POST", "/api/noauth/activate", None, {"activateToken": token, "password": "again12"}
                       ))[0] == 401
    assert (await call(server, "GET", f"/api/user/{user['id']['id']}/activationLink", admin))[0] == 400
    assert (await login(server, "t@x.example", "longer1"))[0] == 200


@pytest_twisted.ensureDeferred
async def test_changing_ones_password_outdates_ones_earlier_tokens(server):
    admin = await server.jwt("tenant")
    _, pair = await new_user(server, admin, {"email": "changer@nanoiot.io", "authority": "TENANT_ADMIN"})
    status, answer, _ = await call(server, "POST", "/api/auth/changePassword", pair["token"],
                                   {"currentPassword": "wrong-one", "newPassword": "brand-new-pw"})
    assert (status, answer["message"]) == (400, "Current password doesn't match!")
    status, fresh, _ = await call(server, "POST", "/api/auth/changePassword", pair["token"],
                                  {"currentPassword": "secret-pw", "newPassword": "brand-new-pw"})
    assert status == 200, fresh
    assert (await call(server, "GET", "/api/auth/user", pair["token"]))[0] == 401
    assert (await call(server, "POST", "/api/auth/token", None, {"refreshToken": pair["refreshToken"]}))[0] == 401
    assert (await call(server, "GET", "/api/auth/user", fresh["token"]))[0] == 200
    assert (await login(server, "changer@nanoiot.io", "secret-pw"))[0] == 401
    assert (await login(server, "changer@nanoiot.io", "brand-new-pw"))[0] == 200
