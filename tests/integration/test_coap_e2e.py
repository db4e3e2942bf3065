"""End to end on loopback: the real server, treq as the REST client, aiocoap as the CoAP device.

aiocoap is asyncio and the tests run on Twisted's default reactor (pytest-twisted), so the device lives on its own
asyncio loop in its own thread; everything it sees comes back to the reactor through ``callFromThread`` into
Deferreds, and every wait is bounded (``with_timeout``). Nothing sleeps.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import aiocoap
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.python.failure import Failure

from nanoiot.transports.coap import codec
from tests.fixtures.server import HOST, make_config, start_server, with_timeout


def coap_port(running: Any) -> int:
    """The running server's CoAP port (the service listens on an ephemeral UDP port in tests)."""
    return running.service.coap_port.getHost().port


class _OneReply(DatagramProtocol):
    def __init__(self) -> None:
        self.reply: defer.Deferred = defer.Deferred()

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if not self.reply.called:
            self.reply.callback(data)


async def raw_request(running: Any, path: list[str], payload: bytes) -> tuple[int, bytes]:
    """One CON POST in one datagram from a plain UDP socket; returns the piggy-backed reply's (code, payload)."""
    protocol = _OneReply()
    port = reactor.listenUDP(0, protocol, interface=HOST)
    try:
        message = codec.build(codec.CON, codec.POST, 4321, b"raw", [(codec.URI_PATH, p) for p in path], payload)
        port.write(codec.encode(message), (HOST, coap_port(running)))
        reply = codec.decode(await with_timeout(protocol.reply))
        return reply.code, reply.payload
    finally:
        await port.stopListening()


class AiocoapDevice:
    """A CoAP device played by aiocoap on its own asyncio loop and thread."""

    def __init__(self, port: int) -> None:
        self.base = f"coap://{HOST}:{port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="aiocoap-device", daemon=True)
        self.thread.start()
        self.context: Any = None
        #: (observation number, code "2.05", payload, Observe) of every notification after the first response;
        #: code "ended" when an observation ends.
        self.notifications: defer.DeferredQueue = defer.DeferredQueue()
        self._observations: list[Any] = []
        self._followers: list[Any] = []

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _on_loop(self, coroutine: Any) -> defer.Deferred:
        """Run a coroutine on the device's loop; its outcome fires a Deferred on the reactor thread."""
        d: defer.Deferred = defer.Deferred()
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)

        def done(f: Any) -> None:
            try:
                result = f.result()
            except BaseException as exc:  # noqa: BLE001 - handed to the reactor as a Failure
                reactor.callFromThread(d.errback, Failure(exc))
            else:
                reactor.callFromThread(d.callback, result)

        future.add_done_callback(done)
        return d

    async def start(self) -> None:
        async def create() -> Any:
            return await aiocoap.Context.create_client_context()

        self.context = await with_timeout(self._on_loop(create()))

    async def stop(self) -> None:
        async def shutdown() -> None:
            for observation in self._observations:
                if not observation.cancelled:
                    observation.cancel()
            for follower in self._followers:
                follower.cancel()
            await asyncio.gather(*self._followers, return_exceptions=True)
            await self.context.shutdown()

        try:
            await with_timeout(self._on_loop(shutdown()))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)

    def _path(self, token: str, *extra: str) -> str:
        return "/".join([self.base, "api", "v1", token, "rpc", *extra])

    async def request(self, method: Any, token: str, *extra: str, payload: bytes = b"") -> tuple[str, bytes]:
        """One confirmable request (aiocoap's default); returns (code, payload) of the assembled response."""

        async def go() -> tuple[str, bytes]:
            message = aiocoap.Message(code=method, uri=self._path(token, *extra), payload=payload)
            response = await self.context.request(message).response
            return response.code.dotted, response.payload

        return await with_timeout(self._on_loop(go()))

    async def observe(self, token: str) -> tuple[str, int | None]:
        """Register (CON) for commands; returns the first response's (code, Observe); notifications are queued."""

        async def go() -> tuple[str, int | None]:
            message = aiocoap.Message(code=aiocoap.GET, uri=self._path(token), observe=0)
            request = self.context.request(message)
            first = await request.response
            if first.opt.observe is not None:
                self._observations.append(request.observation)
                tag = len(self._observations)
                self._followers.append(asyncio.ensure_future(self._follow(tag, request.observation)))
            return first.code.dotted, first.opt.observe

        return await with_timeout(self._on_loop(go()))

    async def _follow(self, tag: int, observation: Any) -> None:
        try:
            async for notification in observation:
                item = (tag, notification.code.dotted, notification.payload, notification.opt.observe)
                reactor.callFromThread(self.notifications.put, item)
            ended = b""
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the test, which may be waiting
            ended = repr(exc).encode()
        reactor.callFromThread(self.notifications.put, (tag, "ended", ended, None))

    async def next_notification(self, timeout: float = 10.0) -> tuple[int, str, bytes, int | None]:
        return await with_timeout(self.notifications.get(), timeout)


@pytest_twisted.async_yield_fixture
async def coap(tmp_path: Any) -> Any:
    running = await start_server(make_config(f"sqlite:///{tmp_path / 'nanoiot.db'}", jwt_key_file=str(tmp_path / "k")))
    device = AiocoapDevice(coap_port(running))
    try:
        await device.start()
        yield running, device
    finally:
        await device.stop()
        device.thread.join(10)
        await running.service.stopService()


async def observing(running: Any, device: AiocoapDevice) -> tuple[str, str]:
    device_id, token = await running.demo_device()
    code, observe = await device.observe(token)
    assert code == "2.03" and observe is not None
    return device_id, token


@pytest_twisted.ensureDeferred
async def test_an_observing_device_gets_a_two_way_command_as_a_notification_and_its_answer_reaches_rest(coap):
    running, device = coap
    device_id, token = await observing(running, device)
    call = defer.ensureDeferred(running.call("POST", f"/api/rpc/twoway/{device_id}",
                                             body={"method": "getTemperature", "params": {"unit": "C"}}))
    _, code, payload, observe = await device.next_notification()
    command = json.loads(payload)
    assert code == "2.05" and observe is not None
    assert command == {"id": command["id"], "method": "getTemperature", "params": {"unit": "C"}}
    reply = await device.request(aiocoap.POST, token, str(command["id"]), payload=b'{"temperature":21.5}')
    assert reply == ("2.01", b"")
    assert await with_timeout(call) == (200, {"temperature": 21.5})


@pytest_twisted.ensureDeferred
async def test_a_one_way_command_is_200_once_the_con_notification_is_acknowledged(coap):
    running, device = coap
    device_id, _ = await observing(running, device)
    status, body = await running.call("POST", f"/api/rpc/oneway/{device_id}",
                                      body={"method": "setGpio", "params": {"pin": 7, "value": 1}})
    assert (status, body) == (200, None)
    _, _, payload, _ = await device.next_notification()
    assert json.loads(payload)["params"] == {"pin": 7, "value": 1}


@pytest_twisted.ensureDeferred
async def test_observe_numbers_rise_across_notifications(coap):
    running, device = coap
    device_id, _ = await observing(running, device)
    numbers = []
    for i in range(3):
        await running.call("POST", f"/api/rpc/oneway/{device_id}", body={"method": "tick", "params": i})
        _, _, payload, observe = await device.next_notification()
        assert json.loads(payload)["params"] == i
        numbers.append(observe)
    assert numbers == sorted(numbers) and len(set(numbers)) == 3


@pytest_twisted.ensureDeferred
async def test_a_single_datagram_answer_of_20_kb_arrives_whole(coap):
    running, device = coap
    device_id, token = await observing(running, device)
    call = defer.ensureDeferred(running.call("POST", f"/api/rpc/twoway/{device_id}", body={"method": "dump"}))
    _, _, payload, _ = await device.next_notification()
    answer = {"dump": "d" * 20_000}
    # aiocoap sends a request body this size block-wise on its own; send it raw in one datagram instead.
    request_id = str(json.loads(payload)["id"])
    code, _ = await raw_request(running, ["api", "v1", token, "rpc", request_id], json.dumps(answer).encode())
    assert code == codec.CREATED
    assert await with_timeout(call) == (200, answer)


@pytest_twisted.ensureDeferred
async def test_a_client_side_get_current_time_call_is_answered_2_05_with_an_int(coap):
    running, device = coap
    _, token = await running.demo_device()
    code, payload = await device.request(aiocoap.POST, token, payload=b'{"method":"getCurrentTime","params":{}}')
    assert code == "2.05"
    now = json.loads(payload)
    assert isinstance(now, int) and now > 1_600_000_000_000


@pytest_twisted.ensureDeferred
async def test_an_unknown_token_is_4_01(coap):
    _, device = coap
    code, observe = await device.observe("no-such-token")
    assert (code, observe) == ("4.01", None)
    assert (await device.request(aiocoap.POST, "no-such-token", "1", payload=b"{}"))[0] == "4.01"


@pytest_twisted.ensureDeferred
async def test_a_malformed_answer_is_4_00(coap):
    running, device = coap
    _, token = await running.demo_device()
    assert (await device.request(aiocoap.POST, token, "abc", payload=b"{}"))[0] == "4.00"
    assert (await device.request(aiocoap.POST, token, "1", payload=b"{not json"))[0] == "4.00"


@pytest_twisted.ensureDeferred
async def test_a_garbage_datagram_is_dropped_and_a_valid_request_after_it_still_works(coap):
    running, device = coap
    port = coap_port(running)
    sender = reactor.listenUDP(0, DatagramProtocol(), interface=HOST)
    try:
        for garbage in (bytes.fromhex("4101000709600474656d70"), b"\x00", b"\xff" * 300):
            sender.write(garbage, (HOST, port))
        _, token = await running.demo_device()
        code, payload = await device.request(aiocoap.POST, token, payload=b'{"method":"getCurrentTime"}')
        assert code == "2.05" and isinstance(json.loads(payload), int)
        assert running.service.coap_server.stats["dropped"] >= 3
    finally:
        await sender.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_command_over_1_kb_is_delivered_with_block2_and_answered(coap):
    running, device = coap
    device_id, token = await observing(running, device)
    params = {"firmware": "f" * 3000, "chunks": list(range(100))}
    call = defer.ensureDeferred(running.call("POST", f"/api/rpc/twoway/{device_id}",
                                             body={"method": "configure", "params": params}))
    _, code, payload, _ = await device.next_notification()
    assert code == "2.05" and len(payload) > 3000
    command = json.loads(payload)
    assert command["method"] == "configure" and command["params"] == params
    assert (await device.request(aiocoap.POST, token, str(command["id"]), payload=b'{"ok":true}'))[0] == "2.01"
    assert await with_timeout(call) == (200, {"ok": True})
    assert running.service.coap_server.stats["notifications"] == 1


@pytest_twisted.ensureDeferred
async def test_a_new_registration_of_the_same_device_replaces_the_old_observation(coap):
    running, device = coap
    device_id, token = await observing(running, device)  # observation 1
    assert (await device.observe(token))[0] == "2.03"  # observation 2: aiocoap picks a new CoAP token
    # The old exchange is told it is over (a final 2.02 without Observe, as ThingsBoard does) ...
    assert await device.next_notification() == (1, "2.02", b"", None)
    status, _ = await running.call("POST", f"/api/rpc/oneway/{device_id}", body={"method": "once"})
    assert status == 200
    # ... which aiocoap ends (in any order with what follows), and only the new one gets commands.
    events = sorted([await device.next_notification(), await device.next_notification()])
    assert events[0][:2] == (1, "ended")
    tag, code, payload, _ = events[1]
    assert (tag, code, json.loads(payload)["method"]) == (2, "2.05", "once")
