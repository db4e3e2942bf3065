"""The HTTP port's own bounds in memory (nanoiot/web/http_limits.py): twisted.web's HTTPChannel, as the site builds it,
on a StringTransport with a task.Clock. Bodies refused by their Content-Length before one byte is read, chunked
bodies stopped at the limit, header and body deadlines that a byte a second does not extend, no deadline once a
request is complete (a long poll), and connections per address."""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from nanoiot.web.http_limits import (ABORT_GRACE, LINGER_BYTES, LINGER_SECONDS, HttpLimits, LimitedChannel,
                                     Refused)
from nanoiot.web.site import QuietSite


class Recorder(Resource):
    """Answers with the body it got; ``/wait`` never answers (a long poll)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes]] = []
        self.requests: list[Any] = []

    def render(self, request: Any) -> Any:
        body = request.content.read()
        self.seen.append((request.path, body))
        self.requests.append(request)
        if request.path == b"/wait":
            return NOT_DONE_YET
        return b"got %d" % len(body)


class Client:
    def __init__(self, site: QuietSite, host: str = "10.0.0.1") -> None:
        self.site = site
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        self.channel = site.buildProtocol(self.transport.getPeer())
        assert isinstance(self.channel, LimitedChannel)
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    @property
    def written(self) -> bytes:
        return self.transport.value()

    def status(self) -> int:
        return int(self.written.split(b" ", 2)[1])

    def error(self) -> dict:
        return json.loads(self.written.split(b"\r\n\r\n", 1)[1])

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


def make_site(**limits: Any) -> tuple[QuietSite, Recorder, task.Clock]:
    clock = task.Clock()
    resource = Recorder()
    site = QuietSite(resource, reactor=clock)
    options = dict(max_body=1000, max_device_body=100, header_timeout=10.0, body_timeout=30.0, body_min_rate=500)
    options.update(limits)
    site.set_limits(HttpLimits(clock, **options))
    return site, resource, clock


# --- bodies refused by their Content-Length -------------------------------------------------------------------------


def test_a_300_mb_content_length_is_answered_413_at_the_headers_and_nothing_of_the_body_is_kept() -> None:
    site, resource, clock = make_site()
    client = Client(site)
    client.send(b"POST /api/rpc/twoway/x HTTP/1.1\r\nHost: a\r\nContent-Length: 300000000\r\n\r\n" + b"x" * 5000)
    assert client.status() == 413
    error = client.error()
    assert error["status"] == 413 and error["errorCode"] == 31 and "1000 bytes" in error["message"]
    assert b"Connection: close" in client.written and client.closing
    assert resource.seen == []
    request = client.channel.requests[-1]
    assert request.content is None  # no file or buffer was ever made for the body
    before = len(client.written)
    client.send(b"x" * 100_000)  # what the client still sends is dropped, not buffered
    assert client.channel._dataBuffer == [] and client.channel._buffer == b"" and len(client.written) == before
    assert not client.transport.disconnected
    client.send(b"x" * LINGER_BYTES)  # ... for a while: then the connection is cut
    assert client.transport.disconnected


def test_a_refused_body_that_stops_coming_is_cut_after_the_linger_time() -> None:
    site, _, clock = make_site()
    client = Client(site)
    client.send(b"PUT /x HTTP/1.1\r\nContent-Length: 1001\r\n\r\n")
    assert client.status() == 413 and not client.transport.disconnected
    clock.advance(LINGER_SECONDS)
    assert client.transport.disconnected


def test_expect_100_continue_over_the_limit_gets_413_and_no_100_continue() -> None:
    site, _, _ = make_site()
    client = Client(site)
    client.send(b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n")
    assert client.written.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in client.written


def test_a_body_at_the_limit_is_read_and_served() -> None:
    site, resource, _ = make_site()
    client = Client(site)
    client.send(b"POST /x HTTP/1.1\r\nContent-Length: 1000\r\n\r\n" + b"y" * 1000)
    assert client.status() == 200 and resource.seen == [(b"/x", b"y" * 1000)]
    assert not client.closing


def test_the_device_api_has_its_own_smaller_limit() -> None:
    site, resource, _ = make_site()
    refused = Client(site)
    refused.send(b"POST /api/v1/TOKEN/rpc HTTP/1.1\r\nContent-Length: 101\r\n\r\n")
    assert refused.status() == 413 and "100 bytes" in refused.error()["message"]
    served = Client(site)
    served.send(b"POST /api/v1/TOKEN/rpc HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + b"z" * 100)
    assert served.status() == 200 and resource.seen == [(b"/api/v1/TOKEN/rpc", b"z" * 100)]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def test_a_chunked_body_is_stopped_once_it_passes_the_limit() -> None:
    site, resource, _ = make_site()
    client = Client(site)
    client.send(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    client.send(chunk(b"a" * 600))
    assert client.written == b""
    client.send(chunk(b"b" * 600) + chunk(b"c" * 10) + b"0\r\n\r\n")
    assert client.status() == 413 and client.closing
    assert resource.seen == []
    assert client.channel.requests[-1].content.tell() == 600  # what passed the limit was never stored


def test_a_chunked_body_under_the_limit_is_served() -> None:
    site, resource, _ = make_site()
    client = Client(site)
    client.send(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"a" * 500) + chunk(b"b" * 500)
                + b"0\r\n\r\n")
    assert client.status() == 200 and resource.seen == [(b"/x", b"a" * 500 + b"b" * 500)]


# --- slow clients ---------------------------------------------------------------------------------------------------


def test_headers_sent_a_byte_a_second_are_cut_at_the_header_timeout() -> None:
    site, resource, clock = make_site()
    client = Client(site)
    client.send(b"GET /x HTTP/1.1\r\n")
    header = b"X-Slow: " + b"a" * 100
    for second in range(1, 30):
        clock.advance(1)
        if client.closing:
            break
        client.send(header[second:second + 1])
    assert second == 10
    assert client.status() == 408 and "headers" in client.error()["message"]
    assert resource.seen == []
    clock.advance(ABORT_GRACE)  # a client that does not read its 408 is cut
    assert client.transport.disconnected


def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout() -> None:
    site, _, clock = make_site()
    client = Client(site)
    clock.advance(9.9)
    assert not client.closing
    clock.advance(0.1)
    assert client.closing and client.status() == 408


def test_a_body_trickling_a_byte_a_second_is_cut_at_the_body_timeout() -> None:
    site, resource, clock = make_site()
    client = Client(site)
    client.send(b"POST /x HTTP/1.1\r\nContent-Length: 900\r\n\r\n")
    seconds = 0
    while not client.closing and seconds < 100:
        clock.advance(1)
        seconds += 1
        client.send(b"b")
    assert 30 <= seconds <= 31  # 30 s, plus a second per 500 bytes received
    assert client.status() == 408 and "body" in client.error()["message"]
    assert resource.seen == []


def test_a_large_body_arriving_faster_than_the_minimum_rate_may_take_longer_than_the_body_timeout() -> None:
    site, resource, clock = make_site(max_body=100_000)
    client = Client(site)
    client.send(b"POST /x HTTP/1.1\r\nContent-Length: 60000\r\n\r\n")
    for _ in range(60):  # 1000 bytes a second for 60 s: twice the minimum rate
        clock.advance(1)
        assert not client.closing
        client.send(b"c" * 1000)
    assert client.status() == 200 and len(resource.seen[0][1]) == 60000


def test_a_complete_request_waiting_for_its_answer_is_never_cut() -> None:
    site, resource, clock = make_site()
    client = Client(site)
    client.send(b"POST /wait HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
    assert resource.seen == [(b"/wait", b"abc")]
    clock.advance(3600)
    assert not client.closing and client.written == b""
    assert client.channel._timer is None  # its last check found the request complete and did not come back


def test_a_kept_alive_connection_gets_a_new_header_deadline_from_its_next_requests_first_byte() -> None:
    site, resource, clock = make_site()
    client = Client(site)
    client.send(b"POST /x HTTP/1.1\r\nContent-Length: 1\r\n\r\n")
    clock.advance(5)  # the body deadline (30 s) armed the timer later than the next header deadline
    client.send(b"q")
    assert client.status() == 200
    clock.advance(50)  # idle between requests (under twisted.web's idle timeout, 60 s): no header deadline runs
    assert not client.closing
    client.send(b"GET /x HTTP/1.1\r\n")
    clock.advance(9.9)
    assert not client.closing
    clock.advance(0.1)
    assert client.closing and b"408" in client.written


def test_the_deadline_timer_is_gone_with_the_connection() -> None:
    site, _, clock = make_site()
    client = Client(site)
    client.send(b"GET /x HTTP/1.1\r\n")
    client.lose()
    assert clock.getDelayedCalls() == []


# --- connections per address ----------------------------------------------------------------------------------------


def test_connections_over_the_limit_per_address_are_refused_and_counted_again_once_closed() -> None:
    site, _, _ = make_site(max_per_address=2)
    first, second = Client(site), Client(site)
    refused = site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 40001))
    assert isinstance(refused, Refused)
    transport = StringTransport()
    refused.makeConnection(transport)
    assert transport.disconnected and transport.value() == b""  # cut at once, nothing said
    Client(site, host="10.0.0.2")  # another address is not affected
    first.lose()
    third = Client(site)
    assert site.connections is not None and site.connections.count("10.0.0.1") == 2
    second.lose()
    third.lose()
    assert site.connections.count("10.0.0.1") == 0


def test_a_connection_handed_over_to_a_websocket_is_released_by_it_once() -> None:
    site, _, _ = make_site(max_per_address=1)
    client = Client(site)
    release = client.channel.hand_over()
    assert isinstance(site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 40001)), Refused)
    client.lose()  # the channel no longer counts it: the WebSocket's release does
    assert site.connections is not None and site.connections.count("10.0.0.1") == 1
    release()
    assert site.connections.count("10.0.0.1") == 0


def test_without_a_limit_no_connection_is_counted() -> None:
    site, _, _ = make_site()
    clients = [Client(site) for _ in range(50)]
    assert site.connections is None and all(c.channel.connections is None for c in clients)


# --- a caller that leaves before its answer ---------------------------------------------------------------------------


def waiting_request() -> tuple[Any, Client, list[Any], list[Any]]:
    """A JSON API whose one handler waits (its Deferred in ``pending``, the cancelled ones in ``cancelled``) and a
    client whose request it is handling."""
    from twisted.internet.defer import Deferred

    from nanoiot.web.routing import JsonApi, Router
    from nanoiot.web.tokens import TokenIssuer

    clock = task.Clock()
    cancelled: list[Deferred] = []
    pending: list[Deferred] = []

    def handler(request: Any) -> Deferred:
        d: Deferred = Deferred(cancelled.append)
        pending.append(d)
        return d

    router = Router()
    router.add("POST", "/api/wait", handler, authenticated=False)
    api = JsonApi(router, TokenIssuer(b"k" * 64, 60, 60, clock), clock, 1000)
    site = QuietSite(api, reactor=clock)
    site.set_limits(HttpLimits(clock))
    client = Client(site)
    client.send(b"POST /api/wait HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    return api, client, pending, cancelled


def test_a_json_request_whose_client_leaves_cancels_its_handler_once_and_writes_nothing() -> None:
    api, client, pending, cancelled = waiting_request()
    assert len(pending) == 1 and api.waiting and client.written == b""
    client.lose()
    assert cancelled == pending  # the router's errback saw the loss: the handler's Deferred is cancelled
    assert not api.waiting and client.written == b""
    client.lose()  # a second loss tells nobody again
    assert cancelled == pending


def test_a_json_request_answered_before_its_client_leaves_is_not_cancelled() -> None:
    api, client, pending, cancelled = waiting_request()
    pending[0].callback({"ok": 1})
    assert client.status() == 200 and client.written.endswith(b'{"ok":1}')
    client.lose()
    assert cancelled == [] and not api.waiting


# --- twisted.web's idle timeout ---------------------------------------------------------------------------------------


def _idle_calls(clock: task.Clock) -> list[Any]:
    return [call for call in clock.getDelayedCalls() if getattr(call.func, "__name__", "") == "__timedOut"]


def make_idle_site(idle: float = 60.0) -> tuple[QuietSite, Recorder, task.Clock]:
    clock = task.Clock()
    resource = Recorder()
    site = QuietSite(resource, reactor=clock, timeout=idle)
    site.set_limits(HttpLimits(clock))
    return site, resource, clock


def test_kept_alive_requests_share_one_idle_call_and_an_idle_connection_is_still_closed_at_the_timeout() -> None:
    site, _, clock = make_idle_site(60)
    client = Client(site)
    [idle] = _idle_calls(clock)
    for n in range(3):
        client.send(b"POST /x HTTP/1.1\r\nContent-Length: 1\r\n\r\nq")
        clock.advance(20)
    assert client.written.count(b"HTTP/1.1 200") == 3
    assert _idle_calls(clock) == [idle]  # reset by each request, never cancelled and made again
    clock.advance(39.9)
    assert not client.closing  # 59.9 s since the last answer
    clock.advance(0.1)
    assert client.closing


def test_a_request_handled_longer_than_the_idle_timeout_is_not_cut_and_the_idle_timeout_starts_after_it() -> None:
    site, resource, clock = make_idle_site(60)
    client = Client(site)
    client.send(b"POST /wait HTTP/1.1\r\nContent-Length: 1\r\n\r\nq")
    clock.advance(3600)  # the idle call fires meanwhile: it does nothing while the request is handled
    assert not client.closing and client.written == b""
    request = client.channel.requests[0]
    request.write(b"late")
    request.finish()
    assert client.written.startswith(b"HTTP/1.1 200") and not client.closing
    clock.advance(59)
    assert not client.closing
    clock.advance(1)
    assert client.closing


def test_a_connection_lost_while_its_request_is_handled_leaves_no_call_behind() -> None:
    site, _, clock = make_idle_site(60)
    client = Client(site)
    client.send(b"POST /wait HTTP/1.1\r\nContent-Length: 1\r\n\r\nq")
    assert _idle_calls(clock)  # kept through the request's handling
    client.lose()
    assert clock.getDelayedCalls() == []


def test_a_response_carries_the_server_and_date_headers_twisted_web_gives_it() -> None:
    from twisted.web.http import datetimeToString
    from twisted.web.server import version

    site, resource, _ = make_site()
    client = Client(site)
    client.send(b"POST /x/y%20z HTTP/1.1\r\nContent-Length: 1\r\n\r\nq")
    head = client.written.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert b"Server: " + version in head
    assert [line for line in head if line.startswith(b"Date: ")] in ([b"Date: " + datetimeToString()],
                                                                     [b"Date: " + datetimeToString(time.time() - 1)])
    request = resource.requests[-1]
    assert request.prepath == [] and request.postpath == [b"x", b"y z"]
