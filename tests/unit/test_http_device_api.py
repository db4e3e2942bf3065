"""The HTTP device API in memory: DummyRequest for the HTTP request, task.Clock for time, a recording device link.
Only the device port is needed: what the actor makes of the reports is the actor's tests' business."""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any
from uuid import uuid4

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from nanoiot.errors import ServiceUnavailable

from nanoiot.persistence.records import NULL_UUID, Device
from nanoiot.port.link import NO_LINK
from nanoiot.port.session import Delivery
from nanoiot.transports.http.device_api import DeviceApiResource, HttpCallSession, HttpPollSession
from tests.fixtures.recording import Attached, RecordingAttach, RecordingLink

TOKEN = "GOOD_TOKEN"
DEVICE = Device(uuid4(), 0, uuid4(), NULL_UUID, "dev", "default", None, None)
DECLARED = {200, 400, 401, 404, 405, 408, 413}


class Harness:
    def __init__(self, auth: Any = None, **options: Any) -> None:
        self.clock = task.Clock()
        self.attach = RecordingAttach()

        def authenticate(token: str) -> Deferred:
            if auth is not None:
                return auth
            return succeed(DEVICE if token == TOKEN else None)

        self.api = DeviceApiResource(authenticate, self.attach, self.clock, **options)

    @property
    def attached(self) -> list[Attached]:
        return self.attach.attached

    @property
    def reports(self) -> list[tuple[int, tuple]]:
        """Every report of every session, in order, as (session id, call)."""
        return self.attach.reports

    @property
    def session(self) -> Any:
        return self.attached[-1].session

    @property
    def link(self) -> RecordingLink:
        """The link the latest session was attached with."""
        return self.attached[-1].link

    def request(self, method: bytes, *segments: bytes, body: bytes = b"", args: dict | None = None,
                token: bytes = TOKEN.encode()) -> DummyRequest:
        request = DummyRequest([token, *segments])
        request.method = method
        request.content = BytesIO(body)
        request.args = dict(args or {})
        assert self.api.render(request) is NOT_DONE_YET
        return request

    def poll(self, **args: bytes) -> DummyRequest:
        return self.request(b"GET", b"rpc", args={k.encode(): [v] for k, v in args.items()})


def body_of(request: DummyRequest) -> bytes:
    return b"".join(request.written)


def json_of(request: DummyRequest) -> Any:
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
    return json.loads(body_of(request))


class UnfinishedRequest(DummyRequest):
    """finish() hands the response over but, like a pipelined twisted.web request not yet at the head, does not
    report it written; processingFailed then says the connection died first."""

    def __init__(self, postpath: list[bytes]) -> None:
        super().__init__(postpath)
        self.method = b"GET"
        self.content = BytesIO(b"")

    def finish(self) -> None:
        self.finished += 1


# --- the long poll -------------------------------------------------------------------------------------------------


def test_a_poll_attaches_a_non_exclusive_session_and_subscribes_for_one_command() -> None:
    h = Harness()
    request = h.poll()
    [attached] = h.attached
    session = attached.session
    assert attached.device is DEVICE and isinstance(session, HttpPollSession) and attached.exclusive is False
    assert session.transport == "http" and session.link is attached.link
    assert h.reports == [(session.session_id, ("subscribed", True))]
    assert not request.finished


def test_a_command_is_the_poll_response_and_is_acknowledged_once_written_then_the_session_detaches() -> None:
    h = Harness()
    request = h.poll()
    session = h.session
    outcome = session.send_command(41, "setGpio", {"pin": 7, "value": 1}, 1)
    assert outcome is Delivery.AWAITING_ACK
    assert request.finished and request.responseCode == 200
    assert json_of(request) == {"id": 41, "method": "setGpio", "params": {"pin": 7, "value": 1}}
    # acknowledged first, so that the detach cannot put the command back in the queue
    assert h.reports == [(session.session_id, call) for call in [("subscribed", True), ("acked", 41), ("closed",)]]
    assert session.link is NO_LINK
    assert h.clock.getDelayedCalls() == []
    # a one-shot poll takes exactly one command
    assert session.send_command(42, "other", None, 1) is Delivery.NOT_SENT


def test_a_poll_without_a_command_ends_with_an_empty_408_after_the_default_timeout() -> None:
    h = Harness()
    request = h.poll()
    h.clock.advance(59.999)
    assert not request.finished
    h.clock.advance(0.001)
    assert request.finished and request.responseCode == 408
    assert body_of(request) == b""
    assert h.link.calls == [("subscribed", True), ("closed",)]  # no ack
    # a command that reaches the poll after it ended is not sent; the detach puts it back
    assert h.session.send_command(1, "late", None, 1) is Delivery.NOT_SENT


@pytest.mark.parametrize(("given", "expected_ms"), [
    (b"300", 300),
    (b"0", 60_000),
    (b"", 60_000),
    (b"+250", 250),
    (b"007", 7),
    (b"299999", 299_999),
    (b"300001", 300_000),
    (b"1000000000", 300_000),
    (b"9" * 40, 300_000),
])
def test_the_timeout_parameter_is_used_defaulted_or_clamped(given: bytes, expected_ms: int) -> None:
    h = Harness()
    request = h.poll(timeout=given)
    h.clock.advance(expected_ms / 1000 - 0.0005)
    assert not request.finished
    h.clock.advance(0.001)
    assert request.responseCode == 408


def test_an_absent_timeout_uses_the_configured_default_and_the_maximum_is_configurable() -> None:
    h = Harness(default_poll_ms=5000, max_poll_ms=10_000)
    absent = h.poll()
    clamped = h.poll(timeout=b"60000")
    h.clock.advance(5)
    assert absent.responseCode == 408 and not clamped.finished
    h.clock.advance(5)
    assert clamped.responseCode == 408


@pytest.mark.parametrize("given", [b"abc", b"1.5", b"-5", b"1e3", b" 5", b"0x10", b"\xff"])
def test_a_timeout_that_is_not_a_whole_number_of_ms_is_a_400(given: bytes) -> None:
    h = Harness()
    request = h.poll(timeout=given)
    assert request.responseCode == 400
    assert json_of(request)["status"] == 400
    assert h.attached == []


def test_a_client_that_leaves_mid_poll_detaches_its_session_and_takes_no_command() -> None:
    h = Harness()
    request = h.poll()
    session = h.session
    request.processingFailed(Failure(ConnectionError("client went away")))
    assert h.link.calls == [("subscribed", True), ("closed",)]  # no ack
    assert h.clock.getDelayedCalls() == []
    assert session.send_command(5, "setGpio", {}, 1) is Delivery.NOT_SENT
    assert request.written == []


def test_a_command_written_to_a_client_that_left_before_the_response_completed_is_not_acknowledged() -> None:
    h = Harness()
    request = UnfinishedRequest([TOKEN.encode(), b"rpc"])
    h.api.render(request)
    session = h.session
    assert session.send_command(9, "reboot", None, 1) is Delivery.AWAITING_ACK
    request.processingFailed(Failure(ConnectionError("reset while writing")))
    assert h.attach.calls(session) == [("subscribed", True), ("closed",)]  # no ack


def test_the_actor_closing_a_poll_ends_it_without_telling_the_actor_again() -> None:
    h = Harness()
    request = h.poll()
    h.session.close("device deleted")
    assert request.responseCode == 408 and request.finished
    assert h.link.calls == [("subscribed", True)]  # no close reported back
    assert h.session.link is NO_LINK
    assert h.clock.getDelayedCalls() == []


def test_an_unknown_token_is_a_401_with_an_empty_body() -> None:
    h = Harness()
    for method, segments, body in ((b"GET", (b"rpc",), b""), (b"POST", (b"rpc",), b'{"method":"x"}'),
                                   (b"POST", (b"rpc", b"5"), b"{}")):
        request = h.request(method, *segments, body=body, token=b"WRONG")
        assert request.responseCode == 401 and body_of(request) == b"" and request.finished
    assert h.attached == [] and h.reports == []
    assert h.request(b"GET", b"rpc", token=b"\xff\xfe").responseCode == 401
    assert h.request(b"GET", b"rpc", token=b"GOOD\x00TOKEN").responseCode == 401


def test_a_client_that_leaves_while_its_token_is_looked_up_attaches_nothing() -> None:
    lookup: Deferred = Deferred()
    h = Harness(auth=lookup)
    request = h.poll()
    request.processingFailed(Failure(ConnectionError("gone")))
    lookup.callback(DEVICE)
    assert h.attached == [] and h.reports == []
    assert request.written == []


def test_an_unavailable_token_lookup_is_a_503_json_error_with_retry_after() -> None:
    h = Harness(auth=fail(ServiceUnavailable("database down", retry_after=5)))
    request = h.poll()
    assert request.responseCode == 503
    assert json_of(request)["status"] == 503
    assert request.responseHeaders.getRawHeaders(b"retry-after") == [b"5"]


def test_an_unexpected_failure_is_a_500_with_an_error_id_and_no_internals() -> None:
    h = Harness(auth=fail(RuntimeError("psycopg2 could not connect to db.internal:5432")))
    request = h.poll()
    assert request.responseCode == 500
    body = json_of(request)
    assert "db.internal" not in json.dumps(body) and len(body["errorId"]) == 12
    assert body["errorId"] in body["message"]


# --- answers -------------------------------------------------------------------------------------------------------


def test_an_answer_is_told_to_the_actor_through_a_short_lived_session_and_gets_an_empty_200() -> None:
    h = Harness()
    request = h.request(b"POST", b"rpc", b"41", body=b'{"temperature":21.5}')
    assert request.finished and request.responseCode == 200 and body_of(request) == b""
    session = h.session
    assert h.attached[-1].exclusive is False
    assert h.reports == [(session.session_id, ("answered", 41, b'{"temperature":21.5}')),
                         (session.session_id, ("closed",))]


def test_an_answer_may_be_any_bytes_the_actor_decides() -> None:
    h = Harness()
    request = h.request(b"POST", b"rpc", b"7", body=b"not json \xff")
    assert request.responseCode == 200
    assert h.link.of("answered") == [("answered", 7, b"not json \xff")]


@pytest.mark.parametrize("segment", [b"abc", b"1.5", b"0x1", b"2147483648", b"99999999999", b"1 ", b"\xd9\xa3"])
def test_a_request_id_that_is_not_an_integer_is_a_400(segment: bytes) -> None:
    h = Harness()
    request = h.request(b"POST", b"rpc", segment, body=b"{}")
    assert request.responseCode == 400
    assert json_of(request)["status"] == 400
    assert h.attached == []


def test_an_answer_nested_too_deep_for_the_json_parser_is_refused_before_it_reaches_the_actor() -> None:
    h = Harness()
    request = h.request(b"POST", b"rpc", b"1", body=b"[" * 5000)
    assert request.responseCode == 400
    assert h.attached == []


# --- device-to-server calls ----------------------------------------------------------------------------------------


def test_a_device_call_goes_to_the_actor_and_its_reply_is_the_response() -> None:
    h = Harness()
    request = h.request(b"POST", b"rpc", body=b'{"method":"getCurrentTime","params":{}}')
    session = h.session
    assert isinstance(session, HttpCallSession) and h.attached[-1].exclusive is False
    assert h.reports == [(session.session_id, ("called", 0, b'{"method":"getCurrentTime","params":{}}'))]
    assert not request.finished
    session.send_reply(0, b"1700000000000")
    assert request.responseCode == 200 and json_of(request) == 1700000000000
    assert h.reports[1:] == [(session.session_id, ("closed",))]
    assert h.clock.getDelayedCalls() == []


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b"\xff\xfe", b"[" * 5000])
def test_a_device_call_that_is_not_json_is_a_400(body: bytes) -> None:
    h = Harness()
    request = h.request(b"POST", b"rpc", body=body)
    assert request.responseCode == 400
    assert json_of(request)["status"] == 400
    assert h.attached == []


def test_a_device_call_whose_client_leaves_detaches_and_a_late_reply_is_dropped() -> None:
    h = Harness()
    request = h.request(b"POST", b"rpc", body=b'{"method":"slow"}')
    session = h.session
    request.processingFailed(Failure(ConnectionError("gone")))
    assert h.link.calls == [("called", 0, b'{"method":"slow"}'), ("closed",)]
    session.send_reply(0, b"{}")
    assert request.written == []
    assert h.clock.getDelayedCalls() == []


def test_a_device_call_nobody_answers_gets_thingsboards_timeout_answer() -> None:
    h = Harness()
    request = h.request(b"POST", b"rpc", body=b'{"method":"slow"}')
    h.clock.advance(60)
    assert request.responseCode == 200 and json_of(request) == {"error": "timeout"}
    assert h.link.calls == [("called", 0, b'{"method":"slow"}'), ("closed",)]


# --- limits and routing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "segments"), [(b"POST", (b"rpc",)), (b"POST", (b"rpc", b"1")),
                                                  (b"GET", (b"rpc",)), (b"PUT", (b"rpc", b"x", b"y"))])
def test_a_body_over_64_kib_is_a_413_json_error(method: bytes, segments: tuple) -> None:
    h = Harness()
    request = h.request(method, *segments, body=b"1" * 65537)
    assert request.responseCode == 413
    assert json_of(request)["status"] == 413
    assert h.attached == []


def test_a_body_of_exactly_64_kib_is_accepted() -> None:
    h = Harness()
    request = h.request(b"POST", b"rpc", b"3", body=b"1" * 65536)
    assert request.responseCode == 200


@pytest.mark.parametrize(("method", "segments", "status"), [
    (b"GET", (b"telemetry",), 404),
    (b"GET", (), 404),
    (b"GET", (b"rpc", b"1", b"2"), 404),
    (b"POST", (b"rpc", b""), 404),
    (b"PUT", (b"rpc",), 405),
    (b"DELETE", (b"rpc",), 405),
    (b"GET", (b"rpc", b"1"), 405),
])
def test_other_paths_are_404_and_other_methods_405(method: bytes, segments: tuple, status: int) -> None:
    h = Harness()
    request = h.request(method, *segments)
    assert request.responseCode == status
    assert json_of(request)["status"] == status


def test_no_token_segment_is_a_404() -> None:
    h = Harness()
    request = DummyRequest([])
    h.api.render(request)
    assert request.responseCode == 404


# --- fuzz ----------------------------------------------------------------------------------------------------------

_segment = st.one_of(st.sampled_from([TOKEN.encode(), b"rpc", b"1", b"-1", b"", b"v1", b"x"]), st.binary(max_size=12))
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_body = st.one_of(
    st.binary(max_size=256),
    _json.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda method, params: json.dumps({"method": method, "params": params}).encode(),
              st.sampled_from(["getCurrentTime", "x"]) | st.text(max_size=6), _json),
    st.sampled_from([b"{}", b"[" * 3000, b"null", b"1" * 65537, b"1" * 65536]),
)
_value = st.one_of(st.sampled_from([b"", b"0", b"300", b"-1", b"9" * 30, b"abc"]), st.binary(max_size=8))
_method = st.one_of(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"PATCH"]), st.binary(max_size=6))
_token = st.one_of(st.just(TOKEN.encode()), st.just(TOKEN.encode()), st.just(b"WRONG"), st.binary(max_size=12))
_request_id = st.integers(-2**32, 2**32).map(lambda i: str(i).encode()) | _segment
#: (method, path): mostly the API's own shapes (with any token, id, body and query), sometimes anything at all.
_shape = st.one_of(
    st.tuples(st.just(b"GET"), st.tuples(_token, st.just(b"rpc")).map(list)),
    st.tuples(st.just(b"POST"), st.tuples(_token, st.just(b"rpc")).map(list)),
    st.tuples(st.just(b"POST"), st.tuples(_token, st.just(b"rpc"), _request_id).map(list)),
    st.tuples(_method, st.lists(_segment, max_size=5)),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=_shape,
    args=st.one_of(st.just({}), st.builds(lambda v: {b"timeout": [v]}, _value),
                   st.dictionaries(st.sampled_from([b"timeout", b"x"]) | st.binary(max_size=6),
                                   st.lists(_value, max_size=2))),
    body=_body,
    leave=st.booleans(),
)
def test_fuzz_any_request_ends_with_a_declared_status_and_never_raises(shape: tuple[bytes, list[bytes]], args: dict,
                                                                      body: bytes, leave: bool) -> None:
    method, path = shape
    h = Harness()
    request = DummyRequest(list(path))
    request.method = method
    request.content = BytesIO(body)
    request.args = args
    assert h.api.render(request) is NOT_DONE_YET
    if leave and not request.finished:
        request.processingFailed(Failure(ConnectionError("gone")))
        h.clock.advance(301)
        assert request.written == [] or request.finished
        return
    for session in h.attach.sessions:
        if isinstance(session, HttpPollSession):
            session.send_command(1, "m", {"p": body.decode("latin-1")}, 1)
    h.clock.advance(301)
    assert request.finished == 1
    assert request.responseCode in DECLARED
    if request.responseCode not in (200, 401, 408):
        assert json_of(request)["status"] == request.responseCode
    assert h.clock.getDelayedCalls() == []
