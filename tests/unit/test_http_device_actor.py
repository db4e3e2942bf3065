"""The HTTP device API against the real device actor: DummyRequest for the HTTP requests, the real DeviceDirectory
and DeviceActor on a Dispatcher driven by the same task.Clock, commands submitted with a reply address. These are the
delivery guarantees of a long poll (what happens to a command when a poll times out, dies or is never written).

The HTTP layer alone, with a recording device link, is tested in test_http_device_api.py."""

from __future__ import annotations

from io import BytesIO
from typing import Iterator
from uuid import uuid4

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from nanoiot.actors import messages as m
from nanoiot.actors.device import ActorSettings
from nanoiot.actors.directory import DeviceDirectory
from nanoiot.persistence.records import NULL_UUID, Device
from nanoiot.rpc.model import RpcCommand, RpcFailure, RpcResult
from nanoiot.rpc.queue import QueueSettings
from nanoiot.transports.http.device_api import DeviceApiResource
from tests.unit.test_http_device_api import UnfinishedRequest, json_of
from tests.fixtures.actors import actors_on_clock

TOKEN = "GOOD_TOKEN"
DEVICE = Device(uuid4(), 0, uuid4(), NULL_UUID, "dev", "default", None, None)


@pytest.fixture
def actors(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[task.Clock, DeviceDirectory]]:
    with actors_on_clock(monkeypatch, 0) as clock:
        yield clock, DeviceDirectory(clock, ActorSettings(queue=QueueSettings(ack_timeout_ms=10_000)))


class LiveApi:
    """The device API attached to the real device actor of the ``actors`` fixture through the device port, all on
    the one clock."""

    def __init__(self, clock: task.Clock, directory: DeviceDirectory) -> None:
        self.clock = clock
        self.directory = directory
        self.api = DeviceApiResource(
            authenticate=lambda token: succeed(DEVICE if token == TOKEN else None),
            attach=directory.attach,
            clock=clock,
            max_poll_ms=300_000,
            default_poll_ms=60_000,
        )

    def _render(self, request: DummyRequest, method: bytes = b"GET", body: bytes = b"") -> DummyRequest:
        request.method = method
        request.content = BytesIO(body)
        self.api.render(request)
        return request

    def poll(self, kind: type[DummyRequest] = DummyRequest) -> DummyRequest:
        """A GET .../rpc long poll, once the actor has taken its session in."""
        request = self._render(kind([TOKEN.encode(), b"rpc"]))
        self.clock.advance(0)
        return request

    def call(self, body: bytes) -> DummyRequest:
        """A device-to-server call (POST .../rpc), once the actor has handled it."""
        request = self._render(DummyRequest([TOKEN.encode(), b"rpc"]), b"POST", body)
        self.clock.advance(0)
        return request

    def answer(self, request_id: int, body: bytes) -> DummyRequest:
        """A device's answer (POST .../rpc/<id>), rendered only: the actor takes it on the next advance."""
        return self._render(DummyRequest([TOKEN.encode(), b"rpc", str(request_id).encode()]), b"POST", body)

    def submit(self, method: str, oneway: bool = False) -> Deferred:
        """A command told to the device's actor with a reply address; returns the Deferred its answer fires."""
        now = int(self.clock.seconds() * 1000)
        command = RpcCommand(uuid4(), DEVICE.tenant_id, DEVICE.id, method, {"n": 1}, oneway, now + 100_000, now)
        reply_to, reply = self.directory.replies.expect()
        self.directory.tell(DEVICE, m.SubmitRpc(command, reply_to))
        return reply

    def inspect(self) -> dict:
        reply_to, reply = self.directory.replies.expect()
        self.directory.tell(DEVICE, m.Inspect(reply_to))
        self.clock.advance(0)
        assert reply.called
        return reply.result


@pytest.fixture
def live(actors: tuple[task.Clock, DeviceDirectory]) -> LiveApi:
    return LiveApi(*actors)


def test_a_command_queued_between_polls_waits_for_the_next_poll_and_its_answer_reaches_the_caller(live) -> None:
    first = live.poll()
    live.clock.advance(60)  # the poll times out: no session is open any more
    assert first.responseCode == 408
    reply = live.submit("getTemperature")
    live.clock.advance(1)
    assert live.inspect()["sessions"] == []
    poll = live.poll()
    command = json_of(poll)
    assert (poll.responseCode, command["method"], command["params"]) == (200, "getTemperature", {"n": 1})
    live.clock.advance(0)
    assert live.inspect()["pending"] == [(command["id"], "DELIVERED")]
    answer = live.answer(command["id"], b'{"t":21.5}')
    assert answer.responseCode == 200
    live.clock.advance(0)
    assert reply.called
    assert reply.result == RpcResult(response={"t": 21.5}, has_response=True)
    assert live.inspect()["sessions"] == []


def test_a_one_way_command_completes_when_the_poll_response_was_written(live) -> None:
    poll = live.poll()
    reply = live.submit("setGpio", oneway=True)
    live.clock.advance(0)
    assert poll.responseCode == 200
    live.clock.advance(0)
    assert reply.called and reply.result == RpcResult()


def test_a_client_that_left_mid_poll_does_not_swallow_the_next_command(live) -> None:
    gone = live.poll()
    gone.processingFailed(Failure(ConnectionError("client cancelled")))
    reply = live.submit("setGpio", oneway=True)
    live.clock.advance(0)
    assert gone.written == []
    assert live.inspect()["pending"][0][1] == "QUEUED"
    poll = live.poll()
    assert json_of(poll)["method"] == "setGpio"
    live.clock.advance(0)
    assert reply.called and reply.result == RpcResult()


def test_a_command_whose_poll_died_while_it_was_written_goes_to_the_next_poll_not_to_the_bin(live) -> None:
    dying = live.poll(UnfinishedRequest)
    reply = live.submit("reboot")
    live.clock.advance(0)
    first = json_of(dying)
    dying.processingFailed(Failure(ConnectionError("reset")))
    live.clock.advance(0)
    assert live.inspect()["pending"] == [(first["id"], "SENT")]
    assert not reply.called
    poll = live.poll()
    again = json_of(poll)
    assert again == first  # the same command, same id: the device can de-duplicate
    live.clock.advance(0)
    assert live.inspect()["pending"] == [(first["id"], "DELIVERED")]


def test_a_command_that_reaches_a_poll_which_just_timed_out_goes_to_the_next_poll(live) -> None:
    replies: list[Deferred] = []
    # Scheduled before the poll, so at t=60 it runs before the poll's timer: the actor then finds the command and
    # the poll's DetachSession in its mailbox, in that order, with the poll already answered 408.
    live.clock.callLater(60, lambda: replies.append(live.submit("ping", oneway=True)))
    poll = live.poll()
    live.clock.advance(60)
    assert poll.responseCode == 408 and poll.written == []
    (reply,) = replies
    assert not reply.called
    assert live.inspect()["pending"][0][1] == "SENT"  # it was offered to the ended poll: NOT_SENT
    nxt = live.poll()
    assert json_of(nxt)["method"] == "ping"
    live.clock.advance(0)
    assert reply.called and reply.result == RpcResult()


def test_a_device_call_is_answered_by_the_server_methods(live) -> None:
    live.clock.advance(1234.5)
    call = live.call(b'{"method":"getCurrentTime","params":{}}')
    assert call.responseCode == 200 and json_of(call) == 1234500
    unknown = live.call(b'{"method":"nope"}')
    assert json_of(unknown) == {"error": "Unsupported method: nope"}
    live.clock.advance(0)
    assert live.inspect()["sessions"] == []


def test_an_expired_command_tells_its_caller_the_device_was_offline(live) -> None:
    reply = live.submit("nobodyHome")
    live.clock.advance(101)
    assert reply.called and reply.result.failure is RpcFailure.DEVICE_OFFLINE
