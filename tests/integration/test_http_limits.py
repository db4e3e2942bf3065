"""The HTTP port's bounds on a real server and real sockets (nanoiot/web/http_limits.py): a body refused by its
Content-Length before it is read, slow clients (headers or body a byte at a time) closed at their deadline while a
long poll that is complete is not, and connections per address, including one handed over to a WebSocket."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater
from zope.interface import implementer

from tests.fixtures.server import HOST, with_timeout
from tests.fixtures.server_context import server_running
from tests.integration.test_ws_e2e import connect_ws, stop_client

CHUNK = 64 * 1024
DECLARED = 300_000_000


class RawClient(Protocol):
    """Bytes in, bytes out, and when the server closed the connection."""

    def __init__(self) -> None:
        self.received = b""
        self.sent = 0
        self.answered: defer.Deferred = defer.Deferred()
        self.lost: defer.Deferred = defer.Deferred()
        self._waiting: list[tuple[bytes, defer.Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\r\n\r\n" in self.received and not self.answered.called:
            self.answered.callback(self.received)
        for marker, d in list(self._waiting):
            if marker in self.received:
                self._waiting.remove((marker, d))
                d.callback(None)

    def seen(self, marker: bytes) -> defer.Deferred:
        """Fires once ``marker`` has been received."""
        d: defer.Deferred = defer.Deferred()
        if marker in self.received:
            d.callback(None)
        else:
            self._waiting.append((marker, d))
        return d

    def connectionLost(self, reason: Any) -> None:
        if not self.answered.called:
            self.answered.callback(self.received)
        self.lost.callback(None)

    def status(self) -> int:
        return int(self.received.split(b" ", 2)[1])

    def body(self) -> Any:
        return json.loads(self.received.split(b"\r\n\r\n", 1)[1])


@implementer(IPullProducer)
class Flood:
    """Writes the declared body as fast as the connection takes it, until the server cuts the connection."""

    def __init__(self, client: RawClient) -> None:
        self.client = client

    def resumeProducing(self) -> None:
        if self.client.sent >= DECLARED or self.client.lost.called:
            return
        self.client.sent += CHUNK
        self.client.transport.write(b"x" * CHUNK)

    def stopProducing(self) -> None:
        pass


async def connect(running: Any) -> RawClient:
    port = running.service.http_port.getHost().port
    return await connectProtocol(TCP4ClientEndpoint(reactor, HOST, port), RawClient())


@pytest_twisted.ensureDeferred
async def test_a_300_mb_body_is_refused_413_at_its_headers_and_the_server_cuts_the_sender(tmp_path):
    async with server_running(tmp_path, "big.db") as running:
        device_id, _ = await running.demo_device()
        client = await connect(running)
        client.transport.write(b"POST /api/rpc/twoway/%s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: %d\r\n\r\n" % (device_id.encode(), DECLARED))
        client.transport.registerProducer(Flood(client), False)
        await with_timeout(client.answered)
        assert client.status() == 413
        body = client.body()
        assert body["errorCode"] == 31 and str(16 * 1024 * 1024) in body["message"]
        await with_timeout(client.lost, 30)
        # What the kernel's buffers and the server's short lingering take, not the body: it was never read.
        assert client.sent < 64 * 1024 * 1024, client.sent


@pytest_twisted.ensureDeferred
async def test_slow_headers_and_slow_bodies_are_closed_408_and_a_complete_long_poll_is_not(tmp_path):
    async with server_running(tmp_path, "slow.db", http_header_timeout=0.5, http_body_timeout=0.5,
                              http_body_min_rate=0) as running:
        _, token = await running.demo_device()
        slow_headers = [await connect(running) for _ in range(10)]
        slow_bodies = [await connect(running) for _ in range(10)]
        for client in slow_headers:
            client.transport.write(b"GET /api/auth/user HTTP/1.1\r\nX-Slow: ")
        for client in slow_bodies:
            client.transport.write(b"POST /api/auth/login HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{")
        poll = await connect(running)
        # A long poll of 1.5 s: longer than either deadline, but its request is complete, so it runs its course.
        poll.transport.write(b"GET /api/v1/%s/rpc?timeout=1500 HTTP/1.1\r\nHost: x\r\n\r\n" % token.encode())

        def trickle() -> None:  # a byte every 50 ms keeps twisted.web's idle timeout from ever firing
            for client in slow_headers + slow_bodies:
                if not client.lost.called:
                    client.transport.write(b"a")

        loop = LoopingCall(trickle)
        loop.clock = reactor
        loop.start(0.05)
        try:
            await with_timeout(defer.gatherResults([c.lost for c in slow_headers + slow_bodies]), 15)
        finally:
            loop.stop()
        assert {c.status() for c in slow_headers + slow_bodies} == {408}
        assert all("headers" in c.body()["message"] for c in slow_headers)
        assert all("body" in c.body()["message"] for c in slow_bodies)
        await with_timeout(poll.answered, 10)
        assert poll.status() == 408 and poll.received.endswith(b"\r\n\r\n")  # the poll's own empty 408
        assert not poll.lost.called  # kept alive for the next poll
        poll.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_connections_per_address_are_bounded_and_a_websocket_gives_its_place_back(tmp_path):
    async with server_running(tmp_path, "conns.db", http_max_connections_per_address=3) as running:
        counted = running.service.site.connections
        token = await running.jwt("tenant")
        base = counted.count(HOST)  # treq keeps the login's connection open for its next request
        counted.maximum = base + 3
        ws = await connect_ws(running.http_url, token)
        first, second = await connect(running), await connect(running)
        assert counted.count(HOST) == base + 3
        refused = await connect(running)
        await with_timeout(refused.lost)
        assert refused.received == b""  # closed at once, before a byte
        assert not second.lost.called
        first.transport.loseConnection()
        await with_timeout(first.lost)
        third = await connect(running)
        third.transport.write(b"GET /api/nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        await with_timeout(third.answered)
        assert third.status() == 404
        assert counted.count(HOST) == base + 3
        await stop_client(ws)
        for client in (second, third):
            client.transport.loseConnection()
            await with_timeout(client.lost)
        for _ in range(500):  # the server hears of the closes a moment after the clients: bounded wait for it
            if counted.count(HOST) == base:
                break
            await deferLater(reactor, 0.01, lambda: None)
        assert counted.count(HOST) == base


@pytest_twisted.ensureDeferred
async def test_rate_limits_configured_on_the_server_answer_429_on_rest_and_on_the_device_api(tmp_path):
    async with server_running(tmp_path, "rates.db", tenant_rest_rate_limit="3:60",
                              http_device_rate_limit="1:60") as running:
        _, token = await running.demo_device()
        statuses = [(await running.call("GET", "/api/auth/user"))[0] for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        status, body = await running.call("GET", "/api/auth/user")
        assert (status, body["errorCode"], body["message"]) == (429, 33, "Too many requests for current tenant!")
        assert (await running.call("GET", "/api/auth/user", who="sysadmin"))[0] == 200  # never limited
        first = await connect(running)
        request = b"POST /api/v1/%s/rpc HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}" % token.encode()
        first.transport.write(request)  # a call: the server answers it in its own time
        second = await connect(running)
        second.transport.write(request)
        await with_timeout(second.seen(b"\r\n0\r\n\r\n"))  # the end of its chunked body
        assert second.status() == 429 and b"Retry-After: 60" in second.received
        assert b'"message":"Too many requests for current device!","errorCode":33' in second.received
        for client in (first, second):
            client.transport.loseConnection()
