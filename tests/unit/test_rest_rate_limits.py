"""Rate limits per tenant, customer and device (nanoiot/web/rate_limits.py) in memory: the real JSON router through
treq's StubTreq, a task.Clock; and the HTTP device API's per-device limits over DummyRequest. Over a limit: 429,
ThingsBoard's error body (errorCode 33, "Too many requests for current tenant!") and Retry-After."""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any
from uuid import UUID, uuid4

import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import task
from twisted.internet.defer import succeed
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from nanoiot.config import Config
from nanoiot.errors import TooManyRequests
from nanoiot.persistence.records import NULL_UUID, Authority, Device, User
from nanoiot.transports.http.device_api import DeviceApiResource
from nanoiot.web.rate_limits import RestRateLimits
from nanoiot.web.routing import JsonApi, Router
from nanoiot.web.tokens import TokenIssuer
from tests.fixtures.recording import RecordingAttach

TENANT_A, TENANT_B = uuid4(), uuid4()
CUSTOMER_1, CUSTOMER_2 = uuid4(), uuid4()


def user(authority: Authority, tenant: UUID = TENANT_A, customer: UUID = NULL_UUID) -> User:
    return User(uuid4(), 0, tenant, customer, f"{uuid4().hex[:8]}@x", authority, None, None, b"")


class Api:
    def __init__(self, tenant: str = "", customer: str = "", device_rpc: str = "") -> None:
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.tokens = TokenIssuer(b"k" * 64, 9000, 90000, self.clock)
        router = Router()
        router.add("GET", "/api/thing", lambda r: {"ok": True})
        router.add("POST", "/api/auth/login", lambda r: {"token": "t"}, authenticated=False)
        router.add("POST", "/api/rpc/{kind}/{deviceId}", lambda r: {"sent": r.params["deviceId"]})
        router.add("GET", "/api/rpc/persistent/device/{deviceId}", lambda r: {"data": []})
        self.api = JsonApi(router, self.tokens, self.clock, 1000)
        config = Config().replace(tenant_rest_rate_limit=tenant, customer_rest_rate_limit=customer,
                                  device_rpc_rate_limit=device_rpc)
        self.api.rate_limits = RestRateLimits.from_config(config, self.clock)
        self.stub = StubTreq(self.api)

    async def call(self, who: User | None, method: str, path: str) -> tuple[int, Any, Any]:
        headers = {}
        if who is not None:
            headers["X-Authorization"] = "Bearer " + self.tokens.issue(who)["token"]
        response = await self.stub.request(method, "http://nanoiot" + path, headers=headers)
        body = json.loads(await response.content())
        return response.code, body, response.headers.getRawHeaders(b"retry-after")

    async def statuses(self, who: User | None, count: int, method: str = "GET", path: str = "/api/thing") -> list:
        return [(await self.call(who, method, path))[0] for _ in range(count)]


@pytest_twisted.ensureDeferred
async def test_a_tenant_over_its_limit_gets_thingsboards_429_and_other_tenants_do_not() -> None:
    api = Api(tenant="3:60")
    admin_a = user(Authority.TENANT_ADMIN)
    assert await api.statuses(admin_a, 3) == [200, 200, 200]
    status, body, retry_after = await api.call(admin_a, "GET", "/api/thing")
    assert status == 429 and retry_after == [b"20"]  # one request back every 60/3 s
    assert body["status"] == 429 and body["errorCode"] == 33
    assert body["message"] == "Too many requests for current tenant!"
    customer_a = user(Authority.CUSTOMER_USER, customer=CUSTOMER_1)
    assert await api.statuses(customer_a, 1) == [429]  # the tenant's budget covers its customers' users
    assert await api.statuses(user(Authority.TENANT_ADMIN, tenant=TENANT_B), 3) == [200, 200, 200]
    api.clock.advance(20)
    assert await api.statuses(admin_a, 2) == [200, 429]


@pytest_twisted.ensureDeferred
async def test_the_system_administrator_and_unauthenticated_routes_are_not_limited() -> None:
    api = Api(tenant="1:60", customer="1:60", device_rpc="1:60")
    assert await api.statuses(user(Authority.SYS_ADMIN, tenant=NULL_UUID), 5) == [200] * 5
    assert await api.statuses(None, 5, "POST", "/api/auth/login") == [200] * 5


@pytest_twisted.ensureDeferred
async def test_a_customer_over_its_limit_is_refused_while_its_tenant_and_other_customers_go_on() -> None:
    api = Api(tenant="100:60", customer="2:60")
    first = user(Authority.CUSTOMER_USER, customer=CUSTOMER_1)
    same_customer = user(Authority.CUSTOMER_USER, customer=CUSTOMER_1)
    assert await api.statuses(first, 2) == [200, 200]
    status, body, retry_after = await api.call(same_customer, "GET", "/api/thing")
    assert (status, body["message"], body["errorCode"], retry_after) == (
        429, "Too many requests for current customer!", 33, [b"30"])
    assert await api.statuses(user(Authority.CUSTOMER_USER, customer=CUSTOMER_2), 2) == [200, 200]
    assert await api.statuses(user(Authority.TENANT_ADMIN), 2) == [200, 200]


@pytest_twisted.ensureDeferred
async def test_commands_per_target_device_are_limited_and_reads_of_that_device_are_not() -> None:
    api = Api(device_rpc="2:10")
    admin = user(Authority.TENANT_ADMIN)
    one, other = uuid4(), uuid4()
    assert await api.statuses(admin, 2, "POST", f"/api/rpc/twoway/{one}") == [200, 200]
    # the same device written another way is the same device
    status, body, retry_after = await api.call(admin, "POST", f"/api/rpc/oneway/{str(one).upper()}")
    assert (status, body["message"], retry_after) == (429, "Too many requests for current device!", [b"5"])
    assert await api.statuses(admin, 2, "POST", f"/api/rpc/twoway/{other}") == [200, 200]
    assert await api.statuses(admin, 3, "GET", f"/api/rpc/persistent/device/{one}") == [200] * 3
    assert await api.statuses(admin, 1, "POST", "/api/rpc/twoway/not-a-uuid") == [200]  # the handler's 400


def test_no_limit_configured_means_no_limiter_on_the_hot_path() -> None:
    assert RestRateLimits.from_config(Config(), task.Clock()) is None
    assert Api().api.rate_limits is None


def test_a_websocket_command_counts_against_the_same_limits() -> None:
    clock = task.Clock()
    limits = RestRateLimits("", "", "1:60", clock.seconds)
    principal = TokenIssuer(b"k" * 64, 9000, 90000, clock).verify_access(
        TokenIssuer(b"k" * 64, 9000, 90000, clock).issue(user(Authority.TENANT_ADMIN))["token"])
    device = uuid4()
    limits.check_command(principal, device)
    try:
        limits.check_command(principal, device)
    except TooManyRequests as error:
        assert error.http_status == 429 and error.headers() == {b"retry-after": b"60"}
    else:
        raise AssertionError("the second command within a minute was allowed")


# --- the HTTP device API ---------------------------------------------------------------------------------------------

DEVICES = {"T1": Device(uuid4(), 0, TENANT_A, NULL_UUID, "d1", "default", None, None),
           "T2": Device(uuid4(), 0, TENANT_A, NULL_UUID, "d2", "default", None, None)}


def device_api(**options: Any) -> tuple[DeviceApiResource, task.Clock]:
    clock = task.Clock()
    api = DeviceApiResource(lambda token: succeed(DEVICES.get(token)), RecordingAttach(), clock, **options)
    return api, clock


def poll(api: DeviceApiResource, token: str = "T1") -> DummyRequest:
    request = DummyRequest([token.encode(), b"rpc"])
    request.method = b"GET"
    request.content = BytesIO(b"")
    request.args = {b"timeout": [b"1000"]}
    assert api.render(request) is NOT_DONE_YET
    return request


def test_a_device_over_its_request_rate_gets_429_with_retry_after() -> None:
    api, clock = device_api(rate_limit="2:60")
    first, second, third = poll(api), poll(api), poll(api)
    assert not first.finished and not second.finished
    assert third.responseCode == 429 and third.responseHeaders.getRawHeaders(b"retry-after") == [b"30"]
    body = json.loads(b"".join(third.written))
    assert body["errorCode"] == 33 and body["message"] == "Too many requests for current device!"
    assert not poll(api, "T2").finished  # another device is not affected


def test_open_requests_per_device_are_bounded_and_counted_again_when_one_ends() -> None:
    api, clock = device_api(max_open_per_device=2)
    first, second = poll(api), poll(api)
    third = poll(api)
    assert third.responseCode == 429 and "limit 2" in json.loads(b"".join(third.written))["message"]
    assert not poll(api, "T2").finished
    clock.advance(1)  # the first two polls time out (408): their places are free
    assert first.responseCode == 408 and second.responseCode == 408
    assert not poll(api).finished and not poll(api).finished
    assert poll(api).responseCode == 429


def test_websocket_rpc_frames_are_refused_429_past_the_device_limit_with_the_rest_body() -> None:
    from tests.unit.test_ws_protocol import ADMIN, TENANT_DEVICE, Edge, rpc

    edge = Edge(device_rpc_rate_limit="2:60")
    session, link = edge.session(ADMIN)
    session.rate_limits = RestRateLimits.from_config(edge.config, edge.clock)
    for cid in ("a", "b", "c"):
        rpc(session, TENANT_DEVICE, cid=cid, oneway=True)
    refused = [frame for frame in link.frames() if frame.get("status") == 429]
    assert [f["id"] for f in refused] == ["c"]
    assert refused[0]["error"]["message"] == "Too many requests for current device!"
    assert refused[0]["error"]["errorCode"] == 33
    assert len(edge.port.told) == 2
