"""REST API call with a fake ``http_request``: the request it builds, and the messages a response makes."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed

from nanoiot.rules.nodes.base import InvalidConfig
from nanoiot.rules.nodes.rest import RestApiCallNode, plain_text, status_name
from tests.unit.rules.fakes import FakeContext, build, message, relations, result_of


def rest(**config: Any) -> dict[str, Any]:
    base = dict(RestApiCallNode.default_config)
    base.update(config)
    return base


def answer(ctx: FakeContext, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
           reason: str = "") -> None:
    ctx.http_handler = lambda *a: succeed((status, reason, headers or {}, body))


def test_patterns_fill_url_query_headers_and_body_template(ctx: FakeContext) -> None:
    node = build(RestApiCallNode, rest(
        restEndpointUrlPattern="https://api.example.com/${deviceType}/$[id]",
        queryParams=[{"key": "name", "value": "${deviceName}"}, {"key": "v", "value": "$[v]"}],
        headers={"X-Device": "${deviceName}", "X-$[hdr]": "1"},
        requestBodyTemplate='{"device": "${deviceName}", "value": $[v], "note": "$[note]"}'))
    msg = message(data={"id": 7, "v": 1.5, "hdr": "Kind", "note": 'he said "hi"'},
                  metadata={"deviceType": "pump", "deviceName": "p 1"})
    result_of(node.on_message(msg, ctx))
    [(method, url, headers, body, _timeout)] = ctx.http_calls
    assert method == "POST"
    assert url == "https://api.example.com/pump/7?name=p+1&v=1.5"
    assert headers["X-Device"] == "p 1" and headers["X-Kind"] == "1"
    assert json.loads(body) == {"device": "p 1", "value": 1.5, "note": 'he said "hi"'}


def test_without_template_the_body_is_the_message_data(ctx: FakeContext) -> None:
    result_of(build(RestApiCallNode, rest(restEndpointUrlPattern="http://h/x")).on_message(
        message(data={"a": 1}), ctx))
    assert ctx.http_calls[0][3] == b'{"a":1}'
    assert ctx.http_calls[0][2]["Content-Type"] == "application/json"


def test_get_and_ignore_request_body_send_no_body(ctx: FakeContext) -> None:
    result_of(build(RestApiCallNode, rest(requestMethod="GET")).on_message(message(), ctx))
    result_of(build(RestApiCallNode, rest(ignoreRequestBody=True)).on_message(message(), ctx))
    assert [call[3] for call in ctx.http_calls] == [None, None]


def test_parse_to_plain_text_sends_a_json_string_without_its_quotes(ctx: FakeContext) -> None:
    result_of(build(RestApiCallNode, rest(parseToPlainText=True, headers={})).on_message(
        message(data='"hello"'), ctx))
    assert ctx.http_calls[0][3] == b"hello"
    assert ctx.http_calls[0][2]["Content-Type"].startswith("text/plain")
    assert plain_text('"a\\"b"') == 'a"b' and plain_text("{}") == "{}"


def test_basic_credentials_add_an_authorization_header(ctx: FakeContext) -> None:
    node = build(RestApiCallNode, rest(credentials={"type": "basic", "username": "u", "password": "p"}))
    result_of(node.on_message(message(), ctx))
    assert ctx.http_calls[0][2]["Authorization"] == "Basic " + base64.b64encode(b"u:p").decode()


def test_read_timeout_is_the_requests_timeout(ctx: FakeContext) -> None:
    result_of(build(RestApiCallNode, rest(readTimeoutMs=2500)).on_message(message(), ctx))
    assert ctx.http_calls[0][4] == 2.5


def test_success_carries_the_response_body_and_status_metadata(ctx: FakeContext) -> None:
    answer(ctx, 201, b'{"id":3}', {"X-Request-Id": "r1"}, reason="Created")
    msg = message(metadata={"deviceName": "p1"})
    [(relation, out)] = result_of(build(RestApiCallNode, rest()).on_message(msg, ctx))
    assert relation == "Success" and out.data == '{"id":3}'
    assert out.metadata == {"deviceName": "p1", "status": "CREATED", "statusCode": "201", "statusReason": "Created",
                            "X-Request-Id": "r1"}


def test_an_empty_success_body_is_an_empty_object(ctx: FakeContext) -> None:
    answer(ctx, 204)
    assert result_of(build(RestApiCallNode, rest()).on_message(message(), ctx))[0][1].data == "{}"


def test_non_2xx_goes_down_failure_with_error_body_and_the_data_unchanged(ctx: FakeContext) -> None:
    answer(ctx, 404, b"no such thing", reason="Not Found")
    msg = message(data={"a": 1})
    [(relation, out)] = result_of(build(RestApiCallNode, rest()).on_message(msg, ctx))
    assert relation == "Failure" and out.data == msg.data
    assert out.metadata["status"] == "NOT_FOUND" and out.metadata["statusCode"] == "404"
    assert out.metadata["statusReason"] == "Not Found" and out.metadata["error_body"] == "no such thing"


def test_a_request_that_gets_no_response_goes_down_failure_with_error(ctx: FakeContext) -> None:
    ctx.http_handler = lambda *a: fail(ConnectionRefusedError("Connection refused"))
    [(relation, out)] = result_of(build(RestApiCallNode, rest()).on_message(message(), ctx))
    assert relation == "Failure" and out.metadata["error"] == "ConnectionRefusedError: Connection refused"


def test_a_request_that_never_ends_fails_after_its_timeout(ctx: FakeContext) -> None:
    ctx.http_handler = lambda *a: Deferred()
    d = build(RestApiCallNode, rest(readTimeoutMs=1000)).on_message(message(), ctx)
    ctx.clock.advance(2.0)
    [(relation, out)] = result_of(d)
    assert relation == "Failure" and "TimeoutError" in out.metadata["error"]
    assert ctx.clock.getDelayedCalls() == []


@pytest.mark.parametrize(("url", "error"), [
    ("no-scheme/path", "Transport scheme(protocol) must be provided!"),
    ("http://", "Url string is invalid!"),
])
def test_a_url_that_is_not_one_is_a_failure_without_a_request(ctx: FakeContext, url: str, error: str) -> None:
    [(relation, out)] = result_of(build(RestApiCallNode, rest(restEndpointUrlPattern=url)).on_message(
        message(), ctx))
    assert relation == "Failure" and error in out.metadata["error"] and ctx.http_calls == []


def test_a_template_that_makes_invalid_json_is_a_failure(ctx: FakeContext) -> None:
    node = build(RestApiCallNode, rest(requestBodyTemplate='{"v": $[missing]}'))
    [(relation, out)] = result_of(node.on_message(message(), ctx))
    assert relation == "Failure" and "invalid JSON" in out.metadata["error"]


def test_legacy_configuration_keeps_its_query_string_in_the_url(ctx: FakeContext) -> None:
    config = rest(restEndpointUrlPattern="http://h/a b?x=${k}")
    del config["queryParams"]
    result_of(build(RestApiCallNode, config).on_message(message(metadata={"k": "1"}), ctx))
    assert ctx.http_calls[0][1] == "http://h/a%20b?x=1"


def test_at_most_max_parallel_requests_are_in_flight(ctx: FakeContext) -> None:
    pending: list[Deferred[Any]] = []
    ctx.http_handler = lambda *a: pending.append(Deferred()) or pending[-1]
    node = build(RestApiCallNode, rest(maxParallelRequestsCount=1))
    first, second = node.on_message(message(), ctx), node.on_message(message(), ctx)
    assert len(pending) == 1
    pending[0].callback((200, "OK", {}, b"{}"))
    assert relations(result_of(first)) == ["Success"] and len(pending) == 2
    pending[1].callback((200, "OK", {}, b"{}"))
    assert relations(result_of(second)) == ["Success"]


def test_version_0_configuration_is_upgraded_like_thingsboard_does() -> None:
    old = {"restEndpointUrlPattern": "http://h", "requestMethod": "POST", "headers": {}, "trimDoubleQuotes": True,
           "useRedisQueueForMsgPersistence": False, "trimQueue": False, "maxQueueSize": 0,
           "useSimpleClientHttpFactory": False, "readTimeoutMs": 0}
    new = RestApiCallNode.upgrade(0, old)
    assert new["parseToPlainText"] is True and "trimDoubleQuotes" not in new
    assert "useRedisQueueForMsgPersistence" not in new and "useSimpleClientHttpFactory" not in new
    assert new["maxInMemoryBufferSizeInKb"] == 256 and new["requestBodyTemplate"] is None


@pytest.mark.parametrize(("config", "error"), [
    (rest(enableProxy=True), "proxies"),
    (rest(credentials={"type": "cert.PEM"}), "cert.PEM"),
    (rest(requestMethod="FETCH"), "requestMethod"),
    (rest(queryParams=[{"key": "a", "value": None}]), "query parameter"),
])
def test_what_cannot_work_here_is_refused_at_load(config: dict[str, Any], error: str) -> None:
    with pytest.raises(InvalidConfig, match=error):
        build(RestApiCallNode, config)


def test_status_names_are_springs() -> None:
    assert status_name(200, "whatever") == ("OK", "OK")
    assert status_name(413, "") == ("PAYLOAD_TOO_LARGE", "Request Entity Too Large")
    assert status_name(599, "Custom") == ("599", "Custom")
