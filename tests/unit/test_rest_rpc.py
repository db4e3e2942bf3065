"""The REST RPC endpoints in memory: treq's StubTreq over the real resource tree of ``build_site``, a real
TokenIssuer for the JWTs, and a fake command service that records its calls and answers with canned outcomes (a few
tests put the real CommandService behind the edge, with a fake device port). No sockets, no reactor."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID, uuid4

import pytest
from treq.testing import StubTreq
from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from nanoiot.actors import messages as m
from nanoiot.actors.replies import Replies
from nanoiot.commands.events import EventStream
from nanoiot.commands.service import CommandService, Initiator
from nanoiot.config import Config
from nanoiot.errors import NanoError, NotFound, PermissionDenied
from nanoiot.persistence.records import NULL_UUID, Authority, Device, Page, PageLink, RpcRecord, SortOrder, User
from nanoiot.rpc.model import NonJsonResponse, RpcFailure, RpcResult, RpcStatus
from nanoiot.web.context import WebContext
from nanoiot.web.site import build_site
from nanoiot.web.tokens import TokenIssuer
from tests.fixtures.untouched import Untouched

T0 = 1_700_000_000
NOW_MS = T0 * 1000
TENANT, CUSTOMER = uuid4(), uuid4()
DEVICE_ID = uuid4()
KEY = b"unit-test-signing-key-" * 3


def user(authority: Authority, tenant: UUID = TENANT, customer: UUID = NULL_UUID) -> User:
    return User(uuid4(), 0, tenant, customer, f"{authority.value.lower()}@nanoiot.io", authority, None, None, b"")


ADMIN = user(Authority.TENANT_ADMIN)
CUSTOMER_USER = user(Authority.CUSTOMER_USER, customer=CUSTOMER)
SYSADMIN = user(Authority.SYS_ADMIN, tenant=NULL_UUID)


def stored(status: RpcStatus = RpcStatus.QUEUED) -> RpcRecord:
    return RpcRecord(id=uuid4(), created_time=NOW_MS, tenant_id=TENANT, device_id=DEVICE_ID,
                     expiration_time=NOW_MS + 60_000, oneway=False, method="setGpio", params={"pin": 7},
                     status=status, response=None, retries=2, user_id=ADMIN.id, seq=41)


class FakeCommands:
    """The command service as the REST edge sees it: records every call, answers with ``outcome`` (a value, a
    NanoError to errback with, or a Deferred)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []
        self.outcome: Any = RpcResult(response={"ok": True}, has_response=True)

    def _answer(self, name: str, *args: Any) -> Deferred:
        self.calls.append((name, args))
        if isinstance(self.outcome, Deferred):
            return self.outcome
        if isinstance(self.outcome, BaseException):
            return fail(self.outcome)
        return succeed(self.outcome)

    def submit(self, initiator: Initiator, device_id: UUID, body: Any, oneway: bool,
               idempotent: bool = False) -> Deferred:
        return self._answer("submit", initiator, device_id, body, oneway, idempotent)

    def get(self, initiator: Initiator, rpc_id: UUID) -> Deferred:
        return self._answer("get", initiator, rpc_id)

    def delete(self, initiator: Initiator, rpc_id: UUID) -> Deferred:
        return self._answer("delete", initiator, rpc_id)

    def list(self, initiator: Initiator, device_id: UUID, link: PageLink, status: RpcStatus | None = None) -> Deferred:
        return self._answer("list", initiator, device_id, link, status)




class Api:
    def __init__(self, commands: Any = None, **config: Any) -> None:
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.commands = commands if commands is not None else FakeCommands()
        self.tokens = TokenIssuer(KEY, 9000, 604800, self.clock)
        context = WebContext(
            config=Config(**config),
            clock=self.clock,
            repository=Untouched("repository"),  # type: ignore[arg-type]
            catalog=Untouched("catalog"),  # type: ignore[arg-type]
            directory=Untouched("directory"),
            tokens=self.tokens,
            commands=self.commands,
        )
        self.site = build_site(context)
        self.stub = StubTreq(self.site.resource)
        self._jwts: dict[UUID, str] = {}

    def jwt(self, who: User) -> str:
        if who.id not in self._jwts:
            self._jwts[who.id] = self.tokens.issue(who)["token"]
        return self._jwts[who.id]

    def call(self, method: str, path: str, who: User | None = ADMIN, body: Any = None,
             raw: bytes | None = None) -> tuple[int, Any]:
        """(status, parsed JSON body, or b"" when empty)."""
        headers = {b"Content-Type": [b"application/json"]}
        if who is not None:
            headers[b"X-Authorization"] = [f"Bearer {self.jwt(who)}".encode()]
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        response = self._fired(self.stub.request(method, f"http://nanoiot.test{path}", data=data, headers=headers))
        content = self._fired(self.stub.content(response))
        if content and path.startswith("/api"):
            assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
        return response.code, (json.loads(content) if content else b"")

    def _fired(self, d: Deferred) -> Any:
        self.stub.flush()
        results: list[Any] = []
        d.addBoth(results.append)
        assert results, "no response"
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def calls(self, name: str) -> list[tuple]:
        return [args for called, args in self.commands.calls if called == name]


@pytest.fixture
def api() -> Api:
    return Api()


def rpc_path(kind: str = "twoway", device_id: Any = DEVICE_ID, v1: bool = False) -> str:
    return f"/api/plugins/rpc/{kind}/{device_id}" if v1 else f"/api/rpc/{kind}/{device_id}"


# --- sending ---------------------------------------------------------------------------------------------------------


def test_a_two_way_command_answers_200_with_the_devices_answer(api):
    api.commands.outcome = RpcResult(response={"t": 21.5}, has_response=True)
    status, body = api.call("POST", rpc_path(), body={"method": "getTemperature", "params": {"unit": "C"},
                                                      "timeout": 7000})
    assert (status, body) == (200, {"t": 21.5})
    [(initiator, device_id, rpc_body, oneway, idempotent)] = api.calls("submit")
    assert initiator == Initiator(TENANT, None, ADMIN.id)
    assert device_id == DEVICE_ID and oneway is False and idempotent is False
    assert (rpc_body.method, rpc_body.params, rpc_body.persistent) == ("getTemperature", {"unit": "C"}, False)
    assert rpc_body.expiration_time == NOW_MS + 7000


@pytest.mark.parametrize("v1", [False, True])
def test_a_one_way_command_answers_200_with_an_empty_body(api, v1):
    api.commands.outcome = RpcResult()
    status, body = api.call("POST", rpc_path("oneway", v1=v1), body={"method": "reboot"})
    assert (status, body) == (200, b"")
    [(_, _, _, oneway, _)] = api.calls("submit")
    assert oneway is True


def test_the_minimum_timeout_applies_to_a_shorter_request(api):
    api.call("POST", rpc_path(), body={"method": "m", "timeout": 100})
    [(_, _, rpc_body, _, _)] = api.calls("submit")
    assert rpc_body.expiration_time == NOW_MS + Config().rpc_min_timeout


def test_a_persistent_command_answers_its_rpc_id(api):
    request_uuid = uuid4()
    api.commands.outcome = RpcResult(response={"rpcId": str(request_uuid)}, has_response=True)
    status, body = api.call("POST", rpc_path(), body={"method": "m", "persistent": True, "retries": 2,
                                                      "requestUUID": str(request_uuid)})
    assert (status, body) == (200, {"rpcId": str(request_uuid)})
    [(_, _, rpc_body, _, idempotent)] = api.calls("submit")
    assert rpc_body.persistent and rpc_body.retries == 2 and rpc_body.request_uuid == request_uuid
    assert idempotent is True  # the caller chose its requestUUID


def test_a_customer_user_sends_as_its_customer(api):
    api.call("POST", rpc_path(), who=CUSTOMER_USER, body={"method": "m"})
    [(initiator, *_)] = api.calls("submit")
    assert initiator == Initiator(TENANT, CUSTOMER, CUSTOMER_USER.id)


def test_an_offline_device_is_a_v2_504_that_says_which_failure(api):
    api.commands.outcome = RpcResult(failure=RpcFailure.DEVICE_OFFLINE)
    status, body = api.call("POST", rpc_path(), body={"method": "m"})
    [(_, _, rpc_body, _, _)] = api.calls("submit")
    assert status == 504
    assert (body["status"], body["rpcError"], body["rpcId"]) == (504, "DEVICE_OFFLINE", str(rpc_body.request_uuid))
    assert body["message"] == RpcFailure.DEVICE_OFFLINE.description and body["timestamp"] == NOW_MS


@pytest.mark.parametrize("failure, v2, v1", [
    (RpcFailure.DEVICE_OFFLINE, 504, 409),
    (RpcFailure.NOT_DELIVERED, 504, 408),
    (RpcFailure.NO_RESPONSE, 504, 408),
])
def test_failures_keep_thingsboards_status_codes_on_each_version(api, failure, v2, v1):
    api.commands.outcome = RpcResult(failure=failure)
    assert api.call("POST", rpc_path(), body={"method": "m"})[0] == v2
    status, body = api.call("POST", rpc_path(v1=True), body={"method": "m"})
    assert status == v1 and body["rpcError"] == failure.value


def test_a_non_json_answer_is_406(api):
    api.commands.outcome = RpcResult(response=NonJsonResponse("OK"), has_response=True)
    status, body = api.call("POST", rpc_path(), body={"method": "m"})
    assert status == 406 and body["rpcError"] == "NON_JSON_RESPONSE" and body["response"] == "OK"


def test_a_rejected_command_is_429_naming_the_limit(api):
    api.commands.outcome = RpcResult(failure=RpcFailure.REJECTED, response={"limit": "rpc-max-pending", "value": 5})
    status, body = api.call("POST", rpc_path(), body={"method": "m"})
    assert status == 429
    assert (body["rpcError"], body["limit"], body["value"]) == ("REJECTED", "rpc-max-pending", 5)


@pytest.mark.parametrize("error", [NotFound("Device with requested id wasn't found!"), PermissionDenied()])
def test_a_refusal_of_the_service_is_its_status_and_error_body(api, error):
    api.commands.outcome = error
    status, body = api.call("POST", rpc_path(), body={"method": "m"})
    assert status == error.http_status
    assert (body["status"], body["message"], body["errorCode"]) == (error.http_status, error.message,
                                                                     int(error.error_code))


@pytest.mark.parametrize("raw", [b"{not json", b"", b'"just a string"', b'{"params": {}}', b'{"method": "m", '
                                                                                            b'"persistent": "yes"}'])
def test_a_bad_body_is_a_400_json_error_and_nothing_is_sent(api, raw):
    status, body = api.call("POST", rpc_path(), raw=raw)
    assert status == 400 and body["status"] == 400 and body["message"]
    assert api.calls("submit") == []


def test_an_unknown_kind_is_404(api):
    status, body = api.call("POST", rpc_path("sideways"), body={"method": "m"})
    assert status == 404 and body["status"] == 404 and "sideways" in body["message"]
    assert api.calls("submit") == []


def test_a_bad_device_id_is_400(api):
    status, body = api.call("POST", rpc_path(device_id="not-a-uuid"), body={"method": "m"})
    assert status == 400 and "not-a-uuid" in body["message"]
    assert api.calls("submit") == []


def test_no_token_is_401(api):
    status, body = api.call("POST", rpc_path(), who=None, body={"method": "m"})
    assert status == 401 and body["status"] == 401
    assert api.calls("submit") == []


def test_a_token_signed_with_another_key_is_401(api):
    forged = TokenIssuer(b"another signing key, just as long-" * 3, 9000, 604800, api.clock).issue(ADMIN)["token"]
    api._jwts[ADMIN.id] = forged
    assert api.call("POST", rpc_path(), body={"method": "m"})[0] == 401
    assert api.calls("submit") == []


def test_an_expired_token_is_401(api):
    api.jwt(ADMIN)
    api.clock.advance(9000)
    status, body = api.call("POST", rpc_path(), body={"method": "m"})
    assert status == 401 and body["errorCode"] == 11
    assert api.calls("submit") == []


@pytest.mark.parametrize("method, path", [
    ("POST", rpc_path()),
    ("POST", rpc_path(v1=True)),
    ("GET", f"/api/rpc/persistent/{uuid4()}"),
    ("DELETE", f"/api/rpc/persistent/{uuid4()}"),
    ("GET", f"/api/rpc/persistent/device/{DEVICE_ID}?pageSize=10&page=0"),
])
def test_a_system_administrator_commands_no_device(api, method, path):
    status, body = api.call(method, path, who=SYSADMIN, body={"method": "m"} if method == "POST" else None)
    assert status == 403 and body["status"] == 403
    assert api.commands.calls == []


# --- persistent commands: get, delete, list --------------------------------------------------------------------------


def test_get_asks_the_service_for_the_command_and_renders_it(api):
    record = stored(RpcStatus.SENT)
    api.commands.outcome = record
    status, body = api.call("GET", f"/api/rpc/persistent/{record.id}")
    assert status == 200
    assert api.calls("get") == [(Initiator(TENANT, None, ADMIN.id), record.id)]
    assert body["id"] == {"entityType": "RPC", "id": str(record.id)}
    assert (body["status"], body["request"]["body"]["method"], body["request"]["requestId"]) == ("SENT", "setGpio",
                                                                                              41)


def test_a_customer_user_gets_as_its_customer(api):
    api.commands.outcome = stored()
    rpc_id = uuid4()
    assert api.call("GET", f"/api/rpc/persistent/{rpc_id}", who=CUSTOMER_USER)[0] == 200
    assert api.calls("get") == [(Initiator(TENANT, CUSTOMER, CUSTOMER_USER.id), rpc_id)]


def test_get_of_an_unknown_command_is_the_services_404(api):
    api.commands.outcome = NotFound("Rpc with id [x] is not found")
    status, body = api.call("GET", f"/api/rpc/persistent/{uuid4()}")
    assert status == 404 and body["message"] == "Rpc with id [x] is not found"


def test_delete_asks_the_service_and_answers_an_empty_200(api):
    api.commands.outcome = None
    rpc_id = uuid4()
    assert api.call("DELETE", f"/api/rpc/persistent/{rpc_id}") == (200, b"")
    assert api.calls("delete") == [(Initiator(TENANT, None, ADMIN.id), rpc_id)]


def test_delete_waits_for_the_service(api):
    api.commands.outcome = Deferred()
    d = api.stub.request("DELETE", f"http://nanoiot.test/api/rpc/persistent/{uuid4()}",
                         headers={b"X-Authorization": [f"Bearer {api.jwt(ADMIN)}".encode()]})
    responses: list[Any] = []
    d.addBoth(responses.append)
    api.stub.flush()
    assert responses == [] and len(api.calls("delete")) == 1
    api.commands.outcome.callback(None)
    api.stub.flush()
    assert [r.code for r in responses] == [200]


def test_a_customer_user_may_not_delete(api):
    status, _ = api.call("DELETE", f"/api/rpc/persistent/{uuid4()}", who=CUSTOMER_USER)
    assert status == 403 and api.commands.calls == []


def test_a_bad_rpc_id_is_400(api):
    assert api.call("GET", "/api/rpc/persistent/nope")[0] == 400
    assert api.call("DELETE", "/api/rpc/persistent/nope")[0] == 400
    assert api.commands.calls == []


def test_list_passes_the_page_and_the_status_and_renders_a_page(api):
    record = stored()
    api.commands.outcome = Page([record], 11, 10, 0)
    status, body = api.call("GET", f"/api/rpc/persistent/device/{DEVICE_ID}?pageSize=10&page=0&rpcStatus=queued"
                                   "&sortProperty=createdTime&sortOrder=desc&textSearch=set")
    assert status == 200
    assert api.calls("list") == [(Initiator(TENANT, None, ADMIN.id), DEVICE_ID,
                                  PageLink(10, 0, "set", "createdTime", SortOrder.DESC), RpcStatus.QUEUED)]
    assert (body["totalElements"], body["totalPages"], body["hasNext"]) == (11, 2, True)
    assert [item["id"]["id"] for item in body["data"]] == [str(record.id)]


def test_list_without_a_status_lists_every_status(api):
    api.commands.outcome = Page([], 0, 5, 1)
    assert api.call("GET", f"/api/rpc/persistent/device/{DEVICE_ID}?pageSize=5&page=1", who=CUSTOMER_USER)[0] == 200
    assert api.calls("list") == [(Initiator(TENANT, CUSTOMER, CUSTOMER_USER.id), DEVICE_ID, PageLink(5, 1), None)]


@pytest.mark.parametrize("query", ["pageSize=10&page=0&rpcStatus=bogus", "page=0", "pageSize=10&page=0&sortProperty=x",
                                   "pageSize=0&page=0"])
def test_a_bad_list_query_is_400_and_the_service_is_not_asked(api, query):
    status, body = api.call("GET", f"/api/rpc/persistent/device/{DEVICE_ID}?{query}")
    assert status == 400 and body["status"] == 400
    assert api.calls("list") == []


# --- with the real command service -----------------------------------------------------------------------------------


class AnsweringPort:
    """A device port whose actor answers every command at once with ``answer``."""

    def __init__(self, replies: Replies, answer: Any) -> None:
        self.replies = replies
        self.answer = answer
        self.told: list[Any] = []

    def tell(self, device: Device, message: Any) -> None:
        self.told.append(message)
        if isinstance(message, m.SubmitRpc):
            self.replies.answer(message.reply_to, self.answer)


class Devices:
    def __init__(self, *devices: Device) -> None:
        self.known = {d.id: d for d in devices}

    def cached_device(self, device_id: UUID) -> Device | None:
        return self.known.get(device_id)

    def get_device(self, device_id: UUID) -> Deferred:
        return succeed(self.known.get(device_id))


class Store:
    def get_rpc(self, rpc_id: UUID) -> Deferred:
        return succeed(None)

    def delete_rpc(self, rpc_id: UUID) -> Deferred:
        return succeed(None)

    def list_device_rpcs(self, *args: Any) -> Deferred:
        raise AssertionError("a DELETED listing must be refused before the store is asked")


def real_api(answer: Any, *devices: Device) -> tuple[Api, AnsweringPort]:
    clock = task.Clock()
    replies = Replies()
    port = AnsweringPort(replies, answer)
    service = CommandService(port, replies, Devices(*devices), Store(), EventStream(), clock)
    api = Api(service)
    service.clock = api.clock
    return api, port


def test_a_command_through_the_real_service_reaches_the_port_and_its_answer_the_client():
    target = Device(DEVICE_ID, 0, TENANT, NULL_UUID, "dev", "default", None, None)
    api, port = real_api(RpcResult(response={"x": 1}, has_response=True), target)
    assert api.call("POST", rpc_path(), body={"method": "m", "params": [1]}) == (200, {"x": 1})
    [message] = port.told
    assert (message.command.device_id, message.command.method, message.command.user_id) == (DEVICE_ID, "m",
                                                                                            ADMIN.id)
    assert len(port.replies) == 0


def test_another_tenants_device_through_the_real_service_is_403():
    theirs = Device(DEVICE_ID, 0, uuid4(), NULL_UUID, "dev", "default", None, None)
    api, port = real_api(RpcResult(), theirs)
    status, body = api.call("POST", rpc_path(), body={"method": "m"})
    assert status == 403 and body["errorCode"] == 20
    assert port.told == []


def test_an_unknown_device_through_the_real_service_is_404():
    api, port = real_api(RpcResult())
    status, body = api.call("POST", rpc_path(), body={"method": "m"})
    assert status == 404 and body["message"] == "Device with requested id wasn't found!"


def test_listing_deleted_commands_through_the_real_service_is_400():
    target = Device(DEVICE_ID, 0, TENANT, NULL_UUID, "dev", "default", None, None)
    api, _ = real_api(RpcResult(), target)
    status, body = api.call("GET", f"/api/rpc/persistent/device/{DEVICE_ID}?pageSize=10&page=0&rpcStatus=DELETED")
    assert status == 400 and "DELETED" in body["message"]


def test_a_client_that_leaves_cancels_the_wait_and_forgets_the_correlation():
    target = Device(DEVICE_ID, 0, TENANT, NULL_UUID, "dev", "default", None, None)
    api, port = real_api(RpcResult(), target)
    port.tell = lambda device, message: port.told.append(message)  # type: ignore[method-assign]  # never answers
    d = api.stub.request("POST", f"http://nanoiot.test{rpc_path()}", data=b'{"method":"m"}',
                         headers={b"X-Authorization": [f"Bearer {api.jwt(ADMIN)}".encode()]})
    responses: list[Any] = []
    d.addBoth(responses.append)
    api.stub.flush()
    assert len(port.told) == 1 and len(port.replies) == 1 and responses == []
    for pump in api.stub._agent._pumps:  # the client goes away
        pump.client.transport.loseConnection()
        pump.flush()
    api.stub.flush()
    assert len(port.replies) == 0


def test_a_nano_error_body_is_json_with_the_error_code():
    api = Api()
    api.commands.outcome = NanoError("boom")
    status, body = api.call("POST", rpc_path(), body={"method": "m"})
    assert status == 500 and body["message"] == "boom" and body["errorCode"] == 2


def test_a_device_ids_text_is_parsed_once_and_a_malformed_one_is_a_400_that_is_not_remembered():
    from nanoiot.errors import BadRequest
    from nanoiot.web.rpc import RpcApi

    api = RpcApi(Untouched("context"))
    text = str(uuid4()).upper()
    first = api._device_id(text)
    assert first == UUID(text) and api._device_id(text) is first
    with pytest.raises(BadRequest, match="deviceId"):
        api._device_id("not-a-uuid")
    assert list(api._device_ids) == [text]
