"""The WebSocket edge in memory: :class:`WsSession` (frames in, frames out) over a fake link, the real
:class:`EventHub` and :class:`CommandService` (with a device port the test answers for), a ``task.Clock``; the upgrade
refusals through StubTreq over ``build_site``; the cluster's event relay over a fake router. No sockets, no reactor
(Autobahn itself is exercised by tests/integration/test_ws_e2e.py)."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID, uuid4

import pytest
from treq.testing import StubTreq
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport

from nanoiot.actors import messages as m
from nanoiot.actors.replies import Replies
from nanoiot.cluster.events import EventRelay, RemoteEvent, event_from_json, event_to_json
from nanoiot.commands.events import DeviceCalled, DeviceOffline, DeviceOnline, EventStream, RpcStatusChanged
from nanoiot.commands.service import CommandService
from nanoiot.config import Config
from nanoiot.persistence.records import NULL_UUID, Authority, Device, RpcRecord, User
from nanoiot.rpc.model import NonJsonResponse, RpcFailure, RpcResult, RpcStatus
from nanoiot.web.context import WebContext
from nanoiot.web.event_hub import EventHub
from nanoiot.web.shapes import rpc_json
from nanoiot.web.site import build_site
from nanoiot.web.tokens import TokenIssuer
from nanoiot.web.ws import (
    CLOSE_TOKEN_EXPIRED, CLOSE_TOO_SLOW, SLOW_CHECK_DELAY, SLOW_CLOSE_GRACE, RpcWebSocketFactory, WsSession,
    _SocketLink, buffered_bytes,
)

T0 = 1_700_000_000
KEY = b"unit-test-signing-key-" * 3
TENANT, OTHER_TENANT = uuid4(), uuid4()
CUSTOMER_A, CUSTOMER_B = uuid4(), uuid4()


def device(name: str, tenant: UUID = TENANT, customer: UUID = NULL_UUID) -> Device:
    return Device(uuid4(), 0, tenant, customer, name, "default", None, None)


TENANT_DEVICE = device("tenant's")
A_DEVICE = device("customer A's", customer=CUSTOMER_A)
B_DEVICE = device("customer B's", customer=CUSTOMER_B)
FOREIGN_DEVICE = device("other tenant's", tenant=OTHER_TENANT)
DEVICES = (TENANT_DEVICE, A_DEVICE, B_DEVICE, FOREIGN_DEVICE)


def user(authority: Authority, tenant: UUID = TENANT, customer: UUID = NULL_UUID) -> User:
    return User(uuid4(), 0, tenant, customer, f"{authority.value.lower()}-{uuid4().hex[:6]}@nanoiot.io", authority,
                None, None, b"")


ADMIN = user(Authority.TENANT_ADMIN)
CUSTOMER = user(Authority.CUSTOMER_USER, customer=CUSTOMER_A)
SYSADMIN = user(Authority.SYS_ADMIN, tenant=NULL_UUID)


def record(target: Device, status: RpcStatus = RpcStatus.QUEUED, **changes: Any) -> RpcRecord:
    values: dict[str, Any] = dict(id=uuid4(), created_time=T0 * 1000, tenant_id=target.tenant_id,
                                  device_id=target.id, expiration_time=T0 * 1000 + 60_000, oneway=False,
                                  method="setGpio", params={"pin": 7}, status=status, seq=3)
    values.update(changes)
    return RpcRecord(**values)


def online(target: Device, kind: type = DeviceOnline) -> Any:
    return kind(target.id, target.tenant_id, target.customer_id, "MQTT", "node-x")


class FakeLink:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.unread = 0
        self.closed: tuple[int, str, float | None] | None = None

    def send(self, data: bytes) -> None:
        assert self.closed is None, "sent after close"
        self.sent.append(data)

    def buffered(self) -> int:
        return self.unread

    def close(self, code: int, reason: str, grace: float | None = None) -> None:
        self.closed = (code, reason, grace)

    def frames(self) -> list[Any]:
        frames = [json.loads(data) for data in self.sent]
        self.sent.clear()
        return frames


class Devices:
    """The device catalog: ``cached`` devices answer at once; the others through ``get_device``, which the test may
    hold back (``hold``)."""

    def __init__(self, *devices: Device, cached: bool = True) -> None:
        self.known = {d.id: d for d in devices}
        self.cached = cached
        self.held: list[tuple[Deferred, UUID]] = []
        self.hold = False

    def cached_device(self, device_id: UUID) -> Device | None:
        return self.known.get(device_id) if self.cached else None

    def get_device(self, device_id: UUID) -> Deferred:
        if self.hold:
            d: Deferred = Deferred()
            self.held.append((d, device_id))
            return d
        return succeed(self.known.get(device_id))

    def release(self) -> None:
        held, self.held = self.held, []
        for d, device_id in held:
            d.callback(self.known.get(device_id))


class Port:
    """The device port: records what the service tells actors; the test answers with ``answer``."""

    def __init__(self, replies: Replies) -> None:
        self.replies = replies
        self.told: list[Any] = []

    def tell(self, target: Device, message: Any) -> None:
        self.told.append(message)

    def answer(self, result: RpcResult, index: int = -1) -> None:
        self.replies.answer(self.told[index].reply_to, result)


class Store:
    def get_rpc(self, rpc_id: UUID) -> Deferred:
        return succeed(None)

    def delete_rpc(self, rpc_id: UUID) -> Deferred:
        return succeed(None)

    def list_device_rpcs(self, *args: Any) -> Deferred:
        raise AssertionError("not used")


class Edge:
    """One server's WebSocket edge in memory."""

    def __init__(self, cached: bool = True, **config: Any) -> None:
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.config = Config(rpc_min_timeout=0, **config)
        self.events = EventStream()
        self.devices = Devices(*DEVICES, cached=cached)
        self.replies = Replies()
        self.port = Port(self.replies)
        self.commands = CommandService(self.port, self.replies, self.devices, Store(), self.events, self.clock)
        self.hub = EventHub(self.events, self.devices)
        self.tokens = TokenIssuer(KEY, 9000, 604800, self.clock)

    def session(self, who: User = ADMIN, expires_in: float | None = 9000) -> tuple[WsSession, FakeLink]:
        link = FakeLink()
        principal = self.tokens.verify_access(self.tokens.issue(who)["token"])
        expires = None if expires_in is None else self.clock.seconds() + expires_in
        return WsSession(principal, expires, link, self.hub, self.commands, self.devices, self.config,
                         self.clock), link


def send(session: WsSession, frame: Any) -> None:
    session.handle(json.dumps(frame).encode())


def subscribe(session: WsSession, link: FakeLink, target: Device | str, cid: Any = "s") -> dict[str, Any]:
    send(session, {"cmd": "subscribe", "deviceId": target if isinstance(target, str) else str(target.id),
                   "id": cid})
    [frame] = link.frames()
    return frame


# --- subscriptions and events ---------------------------------------------------------------------------------------


def test_a_subscription_is_acknowledged_and_gets_its_devices_rpc_and_presence_events():
    edge = Edge()
    session, link = edge.session()
    assert not edge.events.has_listeners  # actors build no events while nobody listens
    assert subscribe(session, link, TENANT_DEVICE) == {
        "id": "s", "status": 200, "body": {"subscribed": str(TENANT_DEVICE.id), "subscriptions": 1}}
    assert edge.events.has_listeners

    queued = record(TENANT_DEVICE)
    edge.events.publish(RpcStatusChanged(queued, True))
    edge.events.publish(online(TENANT_DEVICE))
    edge.events.publish(online(TENANT_DEVICE, DeviceOffline))
    edge.events.publish(RpcStatusChanged(record(A_DEVICE), False))  # not subscribed to
    edge.events.publish(DeviceCalled(TENANT_DEVICE.id, TENANT, NULL_UUID, "MQTT", "getTime"))  # not sent
    rpc_frame, on, off = link.frames()
    assert rpc_frame == {"event": "RPC_QUEUED", "deviceId": str(TENANT_DEVICE.id),
                         "rpc": json.loads(json.dumps(rpc_json(queued))), "persistent": True}
    assert on == {"event": "DEVICE_ONLINE", "deviceId": str(TENANT_DEVICE.id), "transport": "MQTT",
                  "node": "node-x"}
    assert off["event"] == "DEVICE_OFFLINE"

    send(session, {"cmd": "unsubscribe", "deviceId": str(TENANT_DEVICE.id)})
    assert link.frames() == [{"id": None, "status": 200,
                              "body": {"unsubscribed": str(TENANT_DEVICE.id), "subscriptions": 0}}]
    assert not edge.events.has_listeners
    edge.events.publish(online(TENANT_DEVICE))
    assert link.frames() == []


def test_star_is_every_device_of_the_tenant_for_an_admin_and_of_its_customer_for_a_customer_user():
    edge = Edge()
    admin, admin_link = edge.session(ADMIN)
    customer, customer_link = edge.session(CUSTOMER)
    assert subscribe(admin, admin_link, "*")["body"] == {"subscribed": "*", "subscriptions": 1}
    assert subscribe(customer, customer_link, "*")["status"] == 200
    for target in DEVICES:
        edge.events.publish(RpcStatusChanged(record(target), False))
        edge.events.publish(online(target))
    admin_seen = [(f["event"], f["deviceId"]) for f in admin_link.frames()]
    customer_seen = [(f["event"], f["deviceId"]) for f in customer_link.frames()]
    mine = [TENANT_DEVICE, A_DEVICE, B_DEVICE]
    assert admin_seen == [(e, str(d.id)) for d in mine for e in ("RPC_QUEUED", "DEVICE_ONLINE")]
    assert customer_seen == [("RPC_QUEUED", str(A_DEVICE.id)), ("DEVICE_ONLINE", str(A_DEVICE.id))]


def test_a_device_of_another_customer_or_tenant_or_none_at_all_is_refused():
    edge = Edge()
    customer, link = edge.session(CUSTOMER)
    for target, status, code in [(B_DEVICE, 403, 20), (TENANT_DEVICE, 403, 20), (FOREIGN_DEVICE, 403, 20),
                                 (device("unknown"), 404, 32)]:
        frame = subscribe(customer, link, target, cid=7)
        assert (frame["id"], frame["status"], frame["error"]["status"], frame["error"]["errorCode"]) == \
            (7, status, status, code), frame
        assert "body" not in frame
    assert customer.subscriptions == {}
    admin, admin_link = edge.session(ADMIN)
    assert subscribe(admin, admin_link, FOREIGN_DEVICE)["status"] == 403
    sysadmin, sys_link = edge.session(SYSADMIN)
    assert subscribe(sysadmin, sys_link, "*")["status"] == 403
    assert not edge.events.has_listeners


def test_a_socket_gets_an_event_once_however_many_of_its_subscriptions_match_and_every_socket_the_same_bytes():
    edge = Edge()
    first, first_link = edge.session(ADMIN)
    second, second_link = edge.session(CUSTOMER)
    subscribe(first, first_link, "*")
    subscribe(first, first_link, A_DEVICE)
    subscribe(second, second_link, "*")
    subscribe(second, second_link, A_DEVICE)
    edge.events.publish(online(A_DEVICE))
    assert len(first_link.sent) == len(second_link.sent) == 1
    assert first_link.sent[0] is second_link.sent[0]  # encoded once


def test_customer_wide_subscribers_wait_for_an_uncached_devices_customer_and_keep_its_events_in_order():
    edge = Edge(cached=False)
    session, link = edge.session(CUSTOMER)
    subscribe(session, link, "*")
    edge.devices.hold = True
    statuses = [RpcStatus.QUEUED, RpcStatus.SENT, RpcStatus.DELIVERED]
    base = record(A_DEVICE)
    for status in statuses:
        edge.events.publish(RpcStatusChanged(record(A_DEVICE, status, id=base.id), False))
    edge.events.publish(RpcStatusChanged(record(B_DEVICE), False))
    assert link.frames() == []
    edge.devices.release()
    assert [f["event"] for f in link.frames()] == ["RPC_QUEUED", "RPC_SENT", "RPC_DELIVERED"]


def test_remote_events_are_delivered_like_local_ones():
    edge = Edge(cached=False)
    session, link = edge.session(CUSTOMER)
    subscribe(session, link, "*")
    edge.events.publish(RemoteEvent(RpcStatusChanged(record(A_DEVICE), True), "node-2", CUSTOMER_A))
    edge.events.publish(RemoteEvent(online(A_DEVICE), "node-2", CUSTOMER_A))
    assert [f["event"] for f in link.frames()] == ["RPC_QUEUED", "DEVICE_ONLINE"]


def test_the_subscription_limit_answers_429():
    edge = Edge(ws_max_subscriptions=2)
    session, link = edge.session(ADMIN)
    assert subscribe(session, link, TENANT_DEVICE)["status"] == 200
    assert subscribe(session, link, A_DEVICE)["status"] == 200
    assert subscribe(session, link, A_DEVICE)["status"] == 200  # the same one again is no new subscription
    frame = subscribe(session, link, "*")
    assert (frame["status"], frame["error"]["errorCode"], frame["error"]["limit"]) == (429, 33, 2)
    assert len(session.subscriptions) == 2


# --- commands ---------------------------------------------------------------------------------------------------


def rpc(session: WsSession, target: Device, cid: Any = "c1", **fields: Any) -> None:
    send(session, {"cmd": "rpc", "id": cid, "deviceId": str(target.id), "method": "getTemperature",
                   "params": {"unit": "C"}, **fields})


def test_a_two_way_command_goes_through_the_command_service_and_its_answer_comes_back_with_the_id():
    edge = Edge()
    session, link = edge.session(CUSTOMER)
    rpc(session, A_DEVICE, cid="abc", timeout=3000, retries=2, qos=0, additionalInfo={"k": 1})
    [message] = edge.port.told
    assert isinstance(message, m.SubmitRpc)
    command = message.command
    assert (command.device_id, command.method, command.params, command.oneway) == \
        (A_DEVICE.id, "getTemperature", {"unit": "C"}, False)
    assert (command.user_id, command.initiator) == (CUSTOMER.id, {"type": "USER", "id": str(CUSTOMER.id)})
    assert (command.retries, command.qos, command.additional_info) == (2, 0, {"k": 1})
    assert command.expiration_time == T0 * 1000 + 3000
    assert link.frames() == []
    assert len(session.inflight) == 1
    edge.port.answer(RpcResult(response={"t": 21.5}, has_response=True))
    assert link.frames() == [{"id": "abc", "status": 200, "body": {"t": 21.5}}]
    assert session.inflight == set()


@pytest.mark.parametrize("fields, result, expected", [
    ({"oneway": True}, RpcResult(), {"status": 200, "body": None}),
    ({}, RpcResult(response=None, has_response=False), {"status": 200, "body": None}),
    ({"persistent": True, "requestUUID": "c7d6d2a8-5f0e-4b43-9d7e-2b8a0c1f0a11"},
     RpcResult(response={"rpcId": "c7d6d2a8-5f0e-4b43-9d7e-2b8a0c1f0a11"}, has_response=True),
     {"status": 200, "body": {"rpcId": "c7d6d2a8-5f0e-4b43-9d7e-2b8a0c1f0a11"}}),
])
def test_one_way_no_answer_and_persistent_commands_answer_as_rest_does(fields, result, expected):
    edge = Edge()
    session, link = edge.session(ADMIN)
    rpc(session, TENANT_DEVICE, **fields)
    edge.port.answer(result)
    [frame] = link.frames()
    assert frame == {"id": "c1", **expected}


@pytest.mark.parametrize("result, status, rpc_error", [
    (RpcResult(failure=RpcFailure.DEVICE_OFFLINE), 504, "DEVICE_OFFLINE"),
    (RpcResult(failure=RpcFailure.NO_RESPONSE), 504, "NO_RESPONSE"),
    (RpcResult(response=NonJsonResponse("not json {"), has_response=True), 406, "NON_JSON_RESPONSE"),
])
def test_a_failed_command_answers_with_the_rest_error_body(result, status, rpc_error):
    edge = Edge()
    session, link = edge.session(ADMIN)
    rpc(session, TENANT_DEVICE)
    edge.port.answer(result)
    [frame] = link.frames()
    assert (frame["id"], frame["status"], frame["error"]["status"], frame["error"]["rpcError"]) == \
        ("c1", status, status, rpc_error)
    assert isinstance(frame["error"]["message"], str) and frame["error"]["timestamp"] == T0 * 1000


def test_a_customer_user_cannot_command_another_customers_device_and_a_sysadmin_none():
    edge = Edge()
    session, link = edge.session(CUSTOMER)
    rpc(session, B_DEVICE, cid=1)
    rpc(session, TENANT_DEVICE, cid=2)
    sysadmin, sys_link = edge.session(SYSADMIN)
    rpc(sysadmin, A_DEVICE, cid=3)
    assert [(f["id"], f["status"], f["error"]["errorCode"]) for f in link.frames() + sys_link.frames()] == \
        [(1, 403, 20), (2, 403, 20), (3, 403, 20)]
    assert edge.port.told == []


def test_commands_in_flight_are_bounded_per_socket():
    edge = Edge(ws_max_inflight=2)
    session, link = edge.session(ADMIN)
    for cid in ("a", "b", "c"):
        rpc(session, TENANT_DEVICE, cid=cid)
    [refused] = link.frames()
    assert (refused["id"], refused["status"], refused["error"]["limit"]) == ("c", 429, 2)
    assert len(edge.port.told) == 2
    edge.port.answer(RpcResult(response=1, has_response=True), 0)
    rpc(session, TENANT_DEVICE, cid="d")
    assert len(edge.port.told) == 3
    assert [f["id"] for f in link.frames()] == ["a"]


@pytest.mark.parametrize("raw, cid", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"id": 5, "cmd": "dance"}', 5),
    (b'{"id": "x"}', "x"),
    (b'{"id": "u", "cmd": "subscribe", "deviceId": "not-a-uuid"}', "u"),
    (b'{"id": "n", "cmd": "subscribe", "deviceId": 12}', "n"),
    (b'{"id": "r", "cmd": "rpc", "deviceId": "nope", "method": "m"}', "r"),
    (b'{"id": "o", "cmd": "rpc", "deviceId": "%s", "method": "m", "oneway": "yes"}', "o"),
    (b'{"id": "p", "cmd": "rpc", "deviceId": "%s", "params": {}}', "p"),
    (b'{"id": "t", "cmd": "rpc", "deviceId": "%s", "method": "m", "timeout": -1}', "t"),
    (b'{"id": 7, "cmd": "\xff\xfe"}', None),  # not UTF-8 (Autobahn does not validate it: the JSON decoder does)
])
def test_a_bad_frame_is_answered_400_and_the_socket_goes_on(raw, cid):
    edge = Edge()
    session, link = edge.session(ADMIN)
    session.handle(raw.replace(b"%s", str(TENANT_DEVICE.id).encode()) if b"%s" in raw else raw)
    [frame] = link.frames()
    assert (frame["id"], frame["status"], frame["error"]["status"]) == (cid, 400, 400), frame
    assert frame["error"]["errorCode"] in (30, 31)
    assert link.closed is None and edge.port.told == []
    assert subscribe(session, link, TENANT_DEVICE)["status"] == 200


def test_a_binary_frame_is_answered_400():
    edge = Edge()
    session, link = edge.session(ADMIN)
    session.handle(b'{"cmd": "subscribe", "deviceId": "*"}', binary=True)
    [frame] = link.frames()
    assert frame["status"] == 400 and "text" in frame["error"]["message"]


def test_frames_after_a_subscription_waiting_for_its_device_wait_behind_it():
    edge = Edge(cached=False)
    edge.devices.hold = True
    session, link = edge.session(ADMIN)
    send(session, {"cmd": "subscribe", "deviceId": str(TENANT_DEVICE.id), "id": "s"})
    send(session, {"cmd": "rpc", "id": "r", "deviceId": str(TENANT_DEVICE.id), "method": "m"})
    send(session, {"cmd": "dance", "id": "d"})
    assert link.frames() == [] and edge.port.told == []
    edge.devices.hold = False
    edge.devices.release()
    assert [(f["id"], f["status"]) for f in link.frames()] == [("s", 200), ("d", 400)]
    [message] = edge.port.told  # the command, after the subscription was in place
    assert message.command.method == "m"


def test_frames_piling_up_behind_a_lookup_are_bounded():
    edge = Edge(cached=False, ws_max_inflight=2)
    edge.devices.hold = True
    session, link = edge.session(ADMIN)
    send(session, {"cmd": "subscribe", "deviceId": str(TENANT_DEVICE.id), "id": "s"})
    for cid in ("a", "b", "c"):
        send(session, {"cmd": "subscribe", "deviceId": "*", "id": cid})
    [refused] = link.frames()
    assert (refused["id"], refused["status"]) == ("c", 429)
    edge.devices.hold = False
    edge.devices.release()
    assert [(f["id"], f["status"]) for f in link.frames()] == [("s", 200), ("a", 200), ("b", 200)]


# --- closing ----------------------------------------------------------------------------------------------------


def test_the_socket_closes_with_4001_when_the_token_expires_and_lets_go_of_everything():
    edge = Edge()
    session, link = edge.session(ADMIN, expires_in=30)
    subscribe(session, link, "*")
    rpc(session, TENANT_DEVICE)
    edge.clock.advance(29)
    assert link.closed is None
    edge.clock.advance(1)
    assert link.closed == (CLOSE_TOKEN_EXPIRED, "token expired", None)
    assert session.subscriptions == {} and session.inflight == set()
    assert not edge.events.has_listeners
    assert edge.replies._waiting == {}  # the command's caller was cancelled
    edge.events.publish(online(TENANT_DEVICE))
    session.handle(b'{"cmd": "subscribe", "deviceId": "*"}')
    assert link.frames() == []


def test_a_client_that_leaves_too_much_unread_is_closed_with_4008():
    edge = Edge(ws_max_buffer=1000)
    session, link = edge.session(ADMIN)
    subscribe(session, link, TENANT_DEVICE)
    link.unread = 1000
    edge.events.publish(online(TENANT_DEVICE))
    edge.clock.advance(SLOW_CHECK_DELAY)
    assert len(link.frames()) == 1 and link.closed is None
    # Over the limit: still sent (a turn's writes wait for its flush), and looked at again after the flush.
    link.unread = 5000
    edge.events.publish(online(TENANT_DEVICE))
    edge.events.publish(online(TENANT_DEVICE))
    assert len(link.frames()) == 2 and link.closed is None
    edge.clock.advance(SLOW_CHECK_DELAY)
    assert link.closed == (CLOSE_TOO_SLOW, "too slow", SLOW_CLOSE_GRACE)
    assert not edge.events.has_listeners and session.close_code == CLOSE_TOO_SLOW
    edge.events.publish(online(TENANT_DEVICE))
    assert link.frames() == []


def test_a_burst_that_the_flush_drains_is_no_slow_consumer():
    edge = Edge(ws_max_buffer=1000)
    session, link = edge.session(ADMIN)
    subscribe(session, link, TENANT_DEVICE)
    link.unread = 50_000  # one turn's burst, not flushed yet
    edge.events.publish(online(TENANT_DEVICE))
    link.unread = 0  # the flush: the kernel took it all
    edge.clock.advance(SLOW_CHECK_DELAY)
    assert link.closed is None and session.subscriptions


def test_connection_lost_cancels_commands_in_flight_and_unsubscribes():
    edge = Edge()
    session, link = edge.session(ADMIN)
    subscribe(session, link, "*")
    rpc(session, TENANT_DEVICE)
    session.connection_lost()
    assert session.inflight == set() and edge.replies._waiting == {} and not edge.events.has_listeners
    edge.port.answer(RpcResult(response=1, has_response=True))  # too late: nobody waits
    assert link.frames() == []


def test_buffered_bytes_reads_a_twisted_transports_write_buffer():
    class Transport:
        dataBuffer = b"x" * 100
        offset = 30
        _tempDataLen = 12

    assert buffered_bytes(Transport()) == 82
    assert buffered_bytes(object()) == 0


@pytest.mark.parametrize("size", [0, 5, 125, 126, 300, 65535, 65536, 70000])
def test_a_frame_the_link_writes_is_byte_for_byte_what_autobahn_writes(size):
    edge = Edge(max_payload_size=1 << 20)
    factory = RpcWebSocketFactory(edge.hub, edge.commands, edge.devices, edge.tokens, edge.config, edge.clock)
    written = []
    for send in (lambda protocol, data: protocol.sendMessage(data, isBinary=False),
                 lambda protocol, data: _SocketLink(protocol).send(data)):
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.state = protocol.STATE_OPEN  # as after the opening handshake
        transport.clear()
        send(protocol, b"x" * size)
        written.append(transport.value())
    assert written[1] == written[0] and len(written[0]) > size


# --- the upgrade ------------------------------------------------------------------------------------------------


class Untouched:
    """What the upgrade must not reach (only the attributes the site's wiring reads exist; calling fails)."""

    def __getattr__(self, name: str) -> Any:
        def called(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"{name} was called")

        return called


class Catalog(Devices):
    def device_for_token(self, token: str) -> Deferred:
        raise AssertionError("device_for_token was called")


def stub_site(edge: Edge) -> StubTreq:
    context = WebContext(config=edge.config, clock=edge.clock, repository=Untouched(),  # type: ignore[arg-type]
                         catalog=Catalog(*DEVICES), directory=Untouched(), tokens=edge.tokens,  # type: ignore[arg-type]
                         commands=edge.commands)
    return StubTreq(build_site(context, edge.hub).resource)


def fetch(stub: StubTreq, url: str, headers: dict[bytes, list[bytes]] | None = None) -> tuple[int, Any]:
    results: list[Any] = []
    d = stub.get(f"http://nanoiot.test{url}", headers=headers)
    d.addCallback(lambda response: stub.content(response).addCallback(lambda body: (response, body)))
    d.addBoth(results.append)
    stub.flush()
    response, body = results[0]
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    return response.code, json.loads(body)


def test_the_upgrade_is_refused_with_a_json_401_for_a_missing_bad_or_expired_token():
    edge = Edge()
    stub = stub_site(edge)
    upgrade = {b"Upgrade": [b"websocket"], b"Connection": [b"Upgrade"]}
    status, body = fetch(stub, "/api/ws/rpc", upgrade)
    assert (status, body["status"], body["errorCode"]) == (401, 401, 10)
    status, body = fetch(stub, "/api/ws/rpc?token=not-a-jwt", upgrade)
    assert (status, body["errorCode"]) == (401, 10)
    token = edge.tokens.issue(ADMIN)["token"]
    edge.clock.advance(9000)
    status, body = fetch(stub, f"/api/ws/rpc?token={token}", upgrade)
    assert (status, body["errorCode"]) == (401, 11)


def test_a_plain_get_with_a_good_token_is_told_to_upgrade_and_other_ws_paths_are_a_json_404():
    edge = Edge()
    stub = stub_site(edge)
    token = edge.tokens.issue(ADMIN)["token"]
    status, body = fetch(stub, f"/api/ws/rpc?token={token}")
    assert (status, body["status"]) == (400, 400) and "WebSocket" in body["message"]
    status, body = fetch(stub, "/api/ws/other")
    assert (status, body["errorCode"]) == (404, 32)


# --- the cluster relay ------------------------------------------------------------------------------------------


class Router:
    def __init__(self) -> None:
        self.broadcasts: list[dict[str, Any]] = []

    def broadcast(self, envelope: dict[str, Any]) -> bool:
        self.broadcasts.append(json.loads(json.dumps(envelope)))  # as it would travel
        return True


def relay_pair() -> tuple[task.Clock, EventStream, EventRelay, Router, EventStream, EventRelay, Router]:
    clock = task.Clock()
    clock.advance(T0)
    events_1, events_2 = EventStream(), EventStream()
    router_1, router_2 = Router(), Router()
    relay_1 = EventRelay(router_1, "node-1", events_1, clock, 10_000, Devices(*DEVICES))
    relay_2 = EventRelay(router_2, "node-2", events_2, clock, 10_000, Devices(*DEVICES))
    return clock, events_1, relay_1, router_1, events_2, relay_2, router_2


def deliver(router: Router, relay: EventRelay, origin: str) -> None:
    for envelope in router.broadcasts:
        relay.receive({**envelope, "from": origin})
    router.broadcasts.clear()


def test_events_round_trip_through_json():
    persisted = record(A_DEVICE, RpcStatus.SUCCESSFUL, response={"ok": 1}, user_id=ADMIN.id, batch_id=uuid4(),
                       initiator={"type": "USER", "id": str(ADMIN.id)}, retries=3, attempts=1)
    for event in (RpcStatusChanged(persisted, True), online(A_DEVICE), online(B_DEVICE, DeviceOffline)):
        back = event_from_json(json.loads(json.dumps(event_to_json(event, CUSTOMER_A))), "node-1")
        assert back.event == event and back.node == "node-1"
    assert event_to_json(DeviceCalled(A_DEVICE.id, TENANT, CUSTOMER_A, "MQTT", "m")) is None


def test_a_node_relays_only_while_another_node_announced_interest_in_the_tenant():
    clock, events_1, relay_1, router_1, events_2, relay_2, router_2 = relay_pair()
    hub_2 = EventHub(events_2, Devices(*DEVICES))
    relay_2.attach(hub_2)
    events_1.publish(online(A_DEVICE))
    clock.advance(0)
    assert router_1.broadcasts == []  # nobody is interested

    session = WsSession(TokenIssuer(KEY, 9000, 1, clock).verify_access(TokenIssuer(KEY, 9000, 1, clock).issue(
        CUSTOMER)["token"]), None, FakeLink(), hub_2, None, Devices(*DEVICES), Config(), clock)  # type: ignore
    link: FakeLink = session.link  # type: ignore[assignment]
    subscribe(session, link, "*")
    assert router_2.broadcasts == [{"t": "ws-interest", "tenants": [str(TENANT)]}]  # announced at once
    deliver(router_2, relay_1, "node-2")

    events_1.publish(RpcStatusChanged(record(A_DEVICE), False))
    events_1.publish(online(A_DEVICE))
    events_1.publish(online(FOREIGN_DEVICE))  # a tenant nobody asked for
    events_1.publish(DeviceCalled(A_DEVICE.id, TENANT, CUSTOMER_A, "MQTT", "m"))
    assert router_1.broadcasts == []
    clock.advance(0)
    [envelope] = router_1.broadcasts  # one envelope for the turn
    assert envelope["t"] == "event" and [e["k"] for e in envelope["e"]] == ["rpc", "on"]
    assert envelope["e"][0]["c"] == str(CUSTOMER_A)
    deliver(router_1, relay_2, "node-1")
    assert [(f["event"], f["deviceId"]) for f in link.frames()] == [("RPC_QUEUED", str(A_DEVICE.id)),
                                                                  ("DEVICE_ONLINE", str(A_DEVICE.id))]
    assert router_2.broadcasts == []  # remote events are not relayed again

    relay_2.heartbeat()  # renewed with each heartbeat while it has subscribers
    assert router_2.broadcasts == [{"t": "ws-interest", "tenants": [str(TENANT)]}]
    router_2.broadcasts.clear()
    clock.advance(10.001)  # not renewed within dead-after: node-1 stops
    relay_1.heartbeat()
    events_1.publish(online(A_DEVICE))
    clock.advance(0)
    assert router_1.broadcasts == []
    session.connection_lost()
    relay_2.heartbeat()
    assert router_2.broadcasts == []  # no subscribers, no interest


def test_a_big_turn_is_split_into_envelopes_of_a_few_kilobytes_and_bad_envelopes_are_dropped():
    clock, events_1, relay_1, router_1, events_2, relay_2, _ = relay_pair()
    relay_1.receive({"t": "ws-interest", "from": "node-2"})  # no tenant list: every tenant
    for i in range(40):
        events_1.publish(RpcStatusChanged(record(TENANT_DEVICE, params={"blob": "x" * 500, "i": i}), False))
    clock.advance(0)
    assert len(router_1.broadcasts) > 3
    assert sum(len(e["e"]) for e in router_1.broadcasts) == 40
    assert all(len(json.dumps(e)) < 8000 for e in router_1.broadcasts)
    seen: list[Any] = []
    events_2.subscribe(seen.append)
    relay_2.receive({"t": "event", "from": "node-1", "e": [{"k": "nonsense"}]})
    relay_2.receive({"t": "event", "from": "node-1", "e": [{"k": "on"}]})
    assert seen == []
