"""The device port end to end in memory: a fake session attached to the real DeviceDirectory and DeviceActor (on a
task.Clock-driven dispatcher), commands submitted through the real CommandService, the EventStream recorded.

The last tests check the layering the port exists for: transports know nothing of actors or of the web layer, and
the RPC model knows nothing of anything but itself."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Iterator
from uuid import UUID, uuid4

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed

import nanoiot
from nanoiot.actors import messages as m
from nanoiot.actors.device import ActorSettings
from nanoiot.actors.directory import DeviceDirectory
from nanoiot.commands.events import DeviceCalled, DeviceOffline, DeviceOnline, EventStream, RpcStatusChanged
from nanoiot.commands.service import CommandService, Initiator
from nanoiot.persistence.records import Device
from nanoiot.port.link import DeviceLink
from nanoiot.port.session import Delivery
from nanoiot.rpc.body import RpcBody
from nanoiot.rpc.model import RpcFailure, RpcResult, RpcStatus
from nanoiot.rpc.queue import QueueSettings
from tests.fixtures.actors import actors_on_clock

T0 = 1_700_000_000
DEVICE = Device(uuid4(), 0, uuid4(), uuid4(), "dev", "default", None, None)
ADMIN = Initiator(DEVICE.tenant_id, user_id=uuid4())


class FakeSession:
    def __init__(self, session_id: int, transport: str = "mqtt", outcome: Delivery = Delivery.AWAITING_ACK) -> None:
        self.session_id = session_id
        self.transport = transport
        self.outcome = outcome
        self.sent: list[tuple[int, str, Any, int]] = []
        self.replies: list[tuple[int, bytes]] = []
        self.closed: list[str] = []

    def send_command(self, request_id: int, method: str, params: Any, qos: int) -> Delivery:
        self.sent.append((request_id, method, params, qos))
        return self.outcome

    def send_reply(self, request_id: int, body: bytes) -> None:
        self.replies.append((request_id, body))

    def close(self, reason: str) -> None:
        self.closed.append(reason)


class Devices:
    def cached_device(self, device_id: UUID) -> Device | None:
        return DEVICE if device_id == DEVICE.id else None

    def get_device(self, device_id: UUID) -> Deferred:
        return succeed(self.cached_device(device_id))


class Store:
    """Stored commands as the test puts them there (the actors here run without a journal)."""

    def __init__(self) -> None:
        self.rpcs: dict[UUID, Any] = {}
        self.deleted: list[UUID] = []

    def get_rpc(self, rpc_id: UUID) -> Deferred:
        return succeed(self.rpcs.get(rpc_id))

    def delete_rpc(self, rpc_id: UUID) -> Deferred:
        self.deleted.append(rpc_id)
        self.rpcs.pop(rpc_id, None)
        return succeed(None)

    def list_device_rpcs(self, *args: Any) -> Deferred:
        raise AssertionError("not used here")


class Port:
    """The real directory and actors, the real command service in front of them, every event recorded."""

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.events = EventStream()
        self.published: list[Any] = []
        self.events.subscribe(self.published.append)
        settings = ActorSettings(queue=QueueSettings(ack_timeout_ms=1000), idle_timeout=5.0)
        self.directory = DeviceDirectory(clock, settings, events=self.events)
        self.store = Store()
        self.commands = CommandService(self.directory, self.directory.replies, Devices(), self.store, self.events,
                                       clock)

    def run(self) -> None:
        self.clock.advance(0)
        self.clock.advance(0)

    def submit(self, method: str = "setGpio", oneway: bool = False, ttl_ms: int = 60_000,
               persistent: bool = False) -> Deferred:
        now = int(self.clock.seconds() * 1000)
        body = RpcBody(method=method, params={"pin": 7}, timeout=ttl_ms, expiration_time=now + ttl_ms,
                       persistent=persistent, retries=None, additional_info=None, request_uuid=uuid4(), qos=None)
        d = self.commands.submit(ADMIN, DEVICE.id, body, oneway)
        self.run()
        return d

    def inspect(self) -> dict:
        reply_to, d = self.directory.replies.expect()
        self.directory.tell(DEVICE, m.Inspect(reply_to))
        self.run()
        assert d.called
        return d.result

    def of(self, kind: type) -> list[Any]:
        return [event for event in self.published if isinstance(event, kind)]

    def presence(self) -> list[tuple[str, str]]:
        return [(e.type, e.transport) for e in self.published if isinstance(e, (DeviceOnline, DeviceOffline))]


@pytest.fixture
def port(monkeypatch: pytest.MonkeyPatch) -> Iterator[Port]:
    with actors_on_clock(monkeypatch, T0) as clock:
        yield Port(clock)


def attached(port: Port, session_id: int = 1, exclusive: bool = True, **options: Any) -> tuple[FakeSession, Any]:
    session = FakeSession(session_id, **options)
    link = port.directory.attach(DEVICE, session, exclusive)
    port.run()
    return session, link


# --- the link ------------------------------------------------------------------------------------------------------


def test_attach_returns_a_link_with_every_report_of_the_port(port):
    session, link = attached(port)
    for report in ("subscribed", "unsubscribed", "acked", "answered", "called", "closed"):
        assert callable(getattr(link, report)), report
        assert hasattr(DeviceLink, report)
    assert port.inspect()["sessions"] == [session.session_id]


def test_a_subscribed_session_gets_a_submitted_command(port):
    session, link = attached(port)
    link.subscribed()
    reply = port.submit("setGpio")
    assert [(method, params, qos) for _, method, params, qos in session.sent] == [("setGpio", {"pin": 7}, 1)]
    assert not reply.called


def test_a_session_that_did_not_subscribe_gets_nothing(port):
    session, _ = attached(port)
    port.submit("setGpio")
    assert session.sent == []
    assert [status for _, status in port.inspect()["pending"]] == ["QUEUED"]


def test_an_acked_and_answered_command_ends_and_its_caller_gets_the_answer(port):
    session, link = attached(port)
    link.subscribed()
    reply = port.submit("getTemperature")
    [(request_id, *_)] = session.sent
    link.acked(request_id)
    port.run()
    assert port.inspect()["pending"] == [(request_id, "DELIVERED")]
    assert not reply.called
    link.answered(request_id, b'{"x":1}')
    port.run()
    assert reply.called and reply.result == RpcResult(response={"x": 1}, has_response=True)
    assert port.inspect()["pending"] == []
    assert len(port.directory.replies) == 0


def test_an_answer_without_an_ack_ends_the_command_too(port):
    session, link = attached(port)
    link.subscribed()
    reply = port.submit()
    [(request_id, *_)] = session.sent
    link.answered(request_id, b"[1,2]")
    port.run()
    assert reply.result == RpcResult(response=[1, 2], has_response=True)


def test_an_acked_one_way_command_ends_without_an_answer(port):
    session, link = attached(port)
    link.subscribed()
    reply = port.submit("reboot", oneway=True)
    [(request_id, *_)] = session.sent
    link.acked(request_id)
    port.run()
    assert reply.called and reply.result == RpcResult()


def test_a_device_call_is_answered_through_the_session_by_the_built_in_methods(port):
    session, link = attached(port)
    port.clock.advance(0.25)
    link.called(17, b'{"method":"getCurrentTime","params":{}}')
    port.run()
    assert session.replies == [(17, str(T0 * 1000 + 250).encode())]
    link.called(18, b'{"method":"nope"}')
    port.run()
    assert session.replies[-1] == (18, b'{"error":"Unsupported method: nope"}')


def test_a_closed_session_is_detached_and_a_later_command_is_not_sent_to_it(port):
    session, link = attached(port)
    link.subscribed()
    link.closed()
    port.run()
    assert port.inspect()["sessions"] == []
    reply = port.submit("later")
    assert session.sent == []
    assert [status for _, status in port.inspect()["pending"]] == ["QUEUED"]
    # the next session that subscribes gets it
    nxt, nxt_link = attached(port, 2)
    nxt_link.subscribed()
    port.run()
    assert [method for _, method, _, _ in nxt.sent] == ["later"]
    assert not reply.called


def test_a_command_in_flight_on_a_closed_session_goes_to_the_next_one_with_the_same_id(port):
    first, link = attached(port)
    link.subscribed()
    reply = port.submit("m")
    [(request_id, *_)] = first.sent
    link.closed()
    port.run()
    second, second_link = attached(port, 2)
    second_link.subscribed()
    port.run()
    assert [rid for rid, *_ in second.sent] == [request_id]
    second_link.answered(request_id, b"1")
    port.run()
    assert reply.result.response == 1


def test_a_command_nobody_takes_expires_as_device_offline(port):
    reply = port.submit("nobodyHome", ttl_ms=5000)
    port.clock.advance(5)
    port.run()
    assert reply.called and reply.result.failure is RpcFailure.DEVICE_OFFLINE


# --- presence events -------------------------------------------------------------------------------------------------


def test_the_first_attach_puts_the_device_online_and_the_last_close_offline(port):
    _, first = attached(port, 1, exclusive=False, transport="http")
    assert port.presence() == [("DEVICE_ONLINE", "http")]
    [online] = port.of(DeviceOnline)
    assert (online.device_id, online.tenant_id, online.customer_id) == (DEVICE.id, DEVICE.tenant_id,
                                                                         DEVICE.customer_id)
    _, second = attached(port, 2, exclusive=False, transport="http")
    assert port.presence() == [("DEVICE_ONLINE", "http")]  # already online
    first.closed()
    port.run()
    assert port.presence() == [("DEVICE_ONLINE", "http")]  # one session left
    second.closed()
    port.run()
    assert port.presence() == [("DEVICE_ONLINE", "http"), ("DEVICE_OFFLINE", "http")]
    [offline] = port.of(DeviceOffline)
    assert offline.device_id == DEVICE.id


def test_an_exclusive_reconnect_replaces_the_session_without_an_offline_online_pair(port):
    old, old_link = attached(port, 1)
    new, new_link = attached(port, 2)
    assert old.closed and not new.closed
    assert port.inspect()["sessions"] == [2]
    assert port.presence() == [("DEVICE_ONLINE", "mqtt")]
    # the replaced connection then reports its end: it was already forgotten, the device stays online
    old_link.closed()
    port.run()
    assert port.presence() == [("DEVICE_ONLINE", "mqtt")]
    new_link.closed()
    port.run()
    assert port.presence() == [("DEVICE_ONLINE", "mqtt"), ("DEVICE_OFFLINE", "mqtt")]


def test_an_exclusive_attach_replaces_only_sessions_of_its_own_transport(port):
    coap, _ = attached(port, 1, transport="coap")
    mqtt, _ = attached(port, 2, transport="mqtt")
    assert coap.closed == [] and mqtt.closed == []
    assert port.inspect()["sessions"] == [1, 2]
    assert port.presence() == [("DEVICE_ONLINE", "coap")]


# --- command and call events ---------------------------------------------------------------------------------------


def rpc_events(port: Port) -> list[tuple[str, bool]]:
    return [(e.type, e.persistent) for e in port.of(RpcStatusChanged)]


def test_a_lightweight_command_reports_every_status_change(port):
    session, link = attached(port)
    link.subscribed()
    port.submit("getTemperature")
    [(request_id, *_)] = session.sent
    assert rpc_events(port) == [("RPC_QUEUED", False), ("RPC_SENT", False)]
    link.acked(request_id)
    port.run()
    link.answered(request_id, b'{"t":1}')
    port.run()
    assert rpc_events(port) == [("RPC_QUEUED", False), ("RPC_SENT", False), ("RPC_DELIVERED", False),
                                ("RPC_SUCCESSFUL", False)]
    last = port.of(RpcStatusChanged)[-1]
    assert last.status is RpcStatus.SUCCESSFUL and last.record.response == {"t": 1}
    assert (last.record.device_id, last.record.method, last.record.seq) == (DEVICE.id, "getTemperature", request_id)
    assert last.record.user_id == ADMIN.user_id


def test_a_one_way_command_written_at_qos_0_is_delivered_and_successful_on_the_write(port):
    session, link = attached(port, outcome=Delivery.DELIVERED)
    link.subscribed()
    reply = port.submit("reboot", oneway=True)
    assert rpc_events(port) == [("RPC_QUEUED", False), ("RPC_SENT", False), ("RPC_DELIVERED", False),
                                ("RPC_SUCCESSFUL", False)]
    assert reply.called and reply.result == RpcResult()


def test_an_expired_lightweight_command_reports_expired(port):
    port.submit("nobodyHome", ttl_ms=5000)
    port.clock.advance(5)
    port.run()
    assert rpc_events(port) == [("RPC_QUEUED", False), ("RPC_EXPIRED", False)]


def test_deleting_a_pending_persistent_command_takes_it_from_its_actor_and_publishes_rpc_deleted_once(port):
    session, link = attached(port)  # not subscribed: the command stays QUEUED
    reply = port.submit("later", persistent=True)
    [queued] = port.of(RpcStatusChanged)
    rpc_id = queued.record.id
    assert queued.persistent and queued.status is RpcStatus.QUEUED
    assert reply.result == RpcResult(response={"rpcId": str(rpc_id)}, has_response=True)
    port.store.rpcs[rpc_id] = queued.record
    d = port.commands.delete(ADMIN, rpc_id)
    port.run()
    assert d.called and d.result is None
    assert port.store.deleted == [rpc_id]
    assert rpc_events(port) == [("RPC_QUEUED", True), ("RPC_DELETED", True)]
    assert port.inspect()["pending"] == [] and len(port.directory.replies) == 0
    link.subscribed()
    port.run()
    assert session.sent == []


def test_a_device_call_is_published_with_its_method(port):
    _, link = attached(port, transport="coap")
    link.called(1, b'{"method":"getCurrentTime","params":{}}')
    link.called(2, b"not json")
    port.run()
    assert [(e.type, e.method, e.transport, e.device_id) for e in port.of(DeviceCalled)] == [
        ("DEVICE_CALLED", "getCurrentTime", "coap", DEVICE.id),
        ("DEVICE_CALLED", None, "coap", DEVICE.id),
    ]


# --- layering -------------------------------------------------------------------------------------------------------


PACKAGE = Path(nanoiot.__file__).parent


def imports_in(source: str, package: str) -> set[str]:
    """Every module ``source`` (a module of ``package``) imports, anywhere in it (functions and TYPE_CHECKING blocks
    included), relative imports resolved, and ``from package import name`` counted as ``package.name`` too."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def imports_of(path: Path) -> set[str]:
    package = ".".join(path.relative_to(PACKAGE.parent).parts[:-1])
    return imports_in(path.read_text(), package)


def imports_under(package: str) -> dict[str, set[str]]:
    root = PACKAGE.parent.joinpath(*package.split("."))
    files = sorted(root.rglob("*.py"))
    assert files, f"no source files under {root}"
    return {str(path.relative_to(PACKAGE.parent)): imports_of(path) for path in files}


def offending(package: str, forbidden: tuple[str, ...]) -> list[tuple[str, str]]:
    return sorted((path, name) for path, names in imports_under(package).items() for name in names
                  if any(name == f or name.startswith(f + ".") for f in forbidden))


def test_the_import_walker_sees_imports_in_every_form():
    source = """
import nanoiot.web.site
from typing import TYPE_CHECKING
from nanoiot import actors
from ..actors import device
from . import codec
if TYPE_CHECKING:
    from nanoiot.actors.directory import DeviceDirectory
def late():
    from ...web.rpc import RpcApi
"""
    found = imports_in(source, "nanoiot.transports.mqtt")
    assert {"nanoiot.web.site", "nanoiot.actors", "nanoiot.transports.actors.device", "nanoiot.transports.mqtt.codec",
            "nanoiot.actors.directory", "nanoiot.web.rpc"} <= found
    every = set().union(*imports_under("nanoiot.transports").values())
    assert {"nanoiot.port.link", "nanoiot.port.session", "nanoiot.transports.coap.messages"} <= every


def test_transports_import_nothing_of_the_actors_or_the_web_layer():
    assert offending("nanoiot.transports", ("nanoiot.actors", "nanoiot.web")) == []


def test_the_rpc_model_imports_nothing_of_persistence_web_transports_or_actors():
    forbidden = ("nanoiot.persistence", "nanoiot.web", "nanoiot.transports", "nanoiot.actors")
    assert offending("nanoiot.rpc", forbidden) == []
