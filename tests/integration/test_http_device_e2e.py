"""End to end on loopback: the real server, treq both as the REST client and as an HTTP device (ThingsBoard's
``/api/v1/{token}/rpc`` long poll)."""

from __future__ import annotations

import json
from typing import Any, Callable
from uuid import UUID

import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.web.client import ResponseNeverReceived

from nanoiot.actors import messages as m
from tests.fixtures.server import server, with_timeout  # noqa: F401


def device_request(server: Any, method: str, token: str, suffix: str = "", body: bytes | None = None,
                   query: str = "") -> defer.Deferred:
    """One request as the HTTP device; fires with (status, raw body, content type)."""

    async def run() -> tuple[int, bytes, Any]:
        url = f"{server.http_url}/api/v1/{token}/rpc{suffix}{query}"
        response = await treq.request(method, url, data=body)
        content = await response.content()
        return response.code, content, response.headers.getRawHeaders(b"content-type")

    return defer.ensureDeferred(run())


async def actor_state(server: Any, device_id: str) -> dict | None:
    ref = server.service.directory.existing(UUID(device_id))
    if ref is None:
        return None
    reply_to, answered = server.service.replies.expect()
    ref.tell(m.Inspect(reply_to))
    return await with_timeout(answered)


async def wait_for_actor(server: Any, device_id: str, predicate: Callable[[dict], bool],
                         seconds: float = 10.0) -> dict:
    """Poll the device actor's state (bounded) until ``predicate`` holds."""
    deadline = reactor.seconds() + seconds
    while True:
        state = await actor_state(server, device_id)
        if state is not None and predicate(state):
            return state
        assert reactor.seconds() < deadline, f"actor state never matched: {state}"
        await deferLater(reactor, 0.01, lambda: None)


def rest_call(server: Any, kind: str, device_id: str, method: str, params: Any,
              timeout: int = 10000) -> defer.Deferred:
    return defer.ensureDeferred(server.call("POST", f"/api/rpc/{kind}/{device_id}",
                                            body={"method": method, "params": params, "timeout": timeout}))


@pytest_twisted.ensureDeferred
async def test_a_two_way_call_sent_while_no_poll_is_open_is_delivered_on_the_next_poll_and_answered(server):
    device_id, token = await server.demo_device()
    call = rest_call(server, "twoway", device_id, "getTemperature", {"unit": "C"})
    await wait_for_actor(server, device_id, lambda s: len(s["pending"]) == 1 and not s["sessions"])
    status, body, content_type = await with_timeout(device_request(server, "GET", token, query="?timeout=5000"))
    assert status == 200 and content_type == [b"application/json"]
    command = json.loads(body)
    assert set(command) == {"id", "method", "params"}
    assert (command["method"], command["params"]) == ("getTemperature", {"unit": "C"})
    assert isinstance(command["id"], int)
    await wait_for_actor(server, device_id, lambda s: s["pending"] == [(command["id"], "DELIVERED")])
    answer = json.dumps({"t": 21.5}).encode()
    status, body, _ = await device_request(server, "POST", token, f"/{command['id']}", answer)
    assert (status, body) == (200, b"")
    assert await with_timeout(call) == (200, {"t": 21.5})


@pytest_twisted.ensureDeferred
async def test_a_one_way_call_completes_once_the_poll_response_was_written(server):
    device_id, token = await server.demo_device()
    poll = device_request(server, "GET", token, query="?timeout=10000")
    await wait_for_actor(server, device_id, lambda s: len(s["subscriptions"]) == 1)
    status, body = await with_timeout(rest_call(server, "oneway", device_id, "setGpio", {"pin": 7, "value": 1}))
    assert (status, body) == (200, None)
    status, raw, _ = await with_timeout(poll)
    assert status == 200
    assert {k: v for k, v in json.loads(raw).items() if k != "id"} == {"method": "setGpio",
                                                                      "params": {"pin": 7, "value": 1}}
    await wait_for_actor(server, device_id, lambda s: not s["pending"] and not s["sessions"])


@pytest_twisted.ensureDeferred
async def test_a_long_poll_without_a_command_ends_with_an_empty_408_after_its_timeout(server):
    device_id, token = await server.demo_device()
    started = reactor.seconds()
    status, body, _ = await with_timeout(device_request(server, "GET", token, query="?timeout=300"))
    elapsed = reactor.seconds() - started
    assert (status, body) == (408, b"")
    assert 0.29 <= elapsed < 5
    await wait_for_actor(server, device_id, lambda s: not s["sessions"] and not s["subscriptions"])


@pytest_twisted.ensureDeferred
async def test_a_device_calls_get_current_time_over_http(server):
    _, token = await server.demo_device()
    before = int(reactor.seconds() * 1000)
    payload = json.dumps({"method": "getCurrentTime", "params": {}}).encode()
    status, body, content_type = await with_timeout(device_request(server, "POST", token, body=payload))
    after = int(reactor.seconds() * 1000)
    assert status == 200 and content_type == [b"application/json"]
    assert before - 1000 <= json.loads(body) <= after + 1000
    status, body, _ = await device_request(server, "POST", token, body=b'{"method":"noSuchMethod"}')
    assert (status, json.loads(body)) == (200, {"error": "Unsupported method: noSuchMethod"})


@pytest_twisted.ensureDeferred
async def test_an_unknown_token_is_a_401(server):
    for method, suffix, body in (("GET", "", None), ("POST", "", b'{"method":"getCurrentTime"}'),
                                 ("POST", "/1", b"{}")):
        status, raw, _ = await with_timeout(device_request(server, method, "NO_SUCH_TOKEN", suffix, body))
        assert (status, raw) == (401, b"")


@pytest_twisted.ensureDeferred
async def test_bad_requests_are_400_and_too_large_bodies_413_with_json_errors(server):
    _, token = await server.demo_device()
    for method, suffix, body, query, expected in (
        ("GET", "", None, "?timeout=soon", 400),
        ("POST", "/abc", b"{}", "", 400),
        ("POST", "", b"{not json", "", 400),
        ("POST", "/1", b"x" * 65537, "", 413),
    ):
        status, raw, content_type = await with_timeout(device_request(server, method, token, suffix, body, query))
        assert status == expected
        assert content_type == [b"application/json"] and json.loads(raw)["status"] == expected


@pytest_twisted.ensureDeferred
async def test_the_rest_api_beside_the_device_api_is_unchanged(server):
    status, body = await server.call("GET", "/api/auth/user")
    assert status == 200 and body["authority"] == "TENANT_ADMIN"
    status, body = await server.call("GET", "/api/v1", who=None)
    assert status == 404
    status, body = await server.call("GET", "/api/nothing/here", who=None)
    assert status == 404 and body["status"] == 404


@pytest_twisted.ensureDeferred
async def test_a_client_that_disconnects_mid_poll_does_not_swallow_the_next_command(server):
    device_id, token = await server.demo_device()
    abandoned = device_request(server, "GET", token, query="?timeout=30000")
    abandoned.addErrback(lambda failure: failure.trap(defer.CancelledError, ResponseNeverReceived))
    await wait_for_actor(server, device_id, lambda s: len(s["subscriptions"]) == 1)
    abandoned.cancel()  # treq aborts the connection
    await wait_for_actor(server, device_id, lambda s: not s["sessions"] and not s["subscriptions"])
    call = rest_call(server, "twoway", device_id, "reboot", {"delay": 0})
    await wait_for_actor(server, device_id, lambda s: len(s["pending"]) == 1)
    status, body, _ = await with_timeout(device_request(server, "GET", token, query="?timeout=5000"))
    assert status == 200
    command = json.loads(body)
    assert (command["method"], command["params"]) == ("reboot", {"delay": 0})
    status, _, _ = await device_request(server, "POST", token, f"/{command['id']}", b'"ok"')
    assert status == 200
    assert await with_timeout(call) == (200, "ok")
