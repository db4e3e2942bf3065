"""The rule service in memory (nanoiot/rules/server.py): ``task.Clock``, a fake engine whose runs the test finishes
by hand, fake command service, device port and store; the real Replies, EventStream and chain loader. Plus the
command service's interceptor hook with the real CommandService, and the REST API call's HTTP through StubTreq."""

from __future__ import annotations

import copy
import json
from typing import Any
from uuid import UUID, uuid4

import pytest
from treq.testing import StubTreq
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from nanoiot.actors import messages as m
from nanoiot.actors.replies import Replies
from nanoiot.commands.events import EventStream, RpcStatusChanged
from nanoiot.commands.service import CommandService, Initiator
from nanoiot.config import Config
from nanoiot.errors import NotFound, TooManyRequests
from nanoiot.persistence.records import NULL_UUID, Device, RpcRecord, RuleChainRecord
from nanoiot.rpc.body import RpcBody
from nanoiot.rpc.model import RpcResult, RpcStatus
from nanoiot.rules.chain import default_root_chain
from nanoiot.rules.message import EntityId, RuleMessage
from nanoiot.rules.server import (
    CallerOrigin,
    CommandNotSent,
    CommandNotSentInTime,
    RuleService,
    analyse_routes,
)
from nanoiot.web.rule_chains import default_root_id
from tests.fixtures.actors import actors_on_clock

T0 = 1_700_000_000
TENANT, CUSTOMER = uuid4(), uuid4()
DEVICE = Device(uuid4(), 0, TENANT, CUSTOMER, "Valve 7", "valve", None, None)
USER_ID = uuid4()

SWITCH = {"type": "org.thingsboard.rule.engine.filter.TbMsgTypeSwitchNode", "name": "switch",
          "configuration": {"version": 0}}
RPC = {"type": "org.thingsboard.rule.engine.rpc.TbSendRPCRequestNode", "name": "rpc",
       "configuration": {"timeoutInSeconds": 60}}
LOG = {"type": "org.thingsboard.rule.engine.action.TbLogNode", "name": "log",
       "configuration": {"jsScript": "return 'x';"}}
PROFILE = {"type": "org.thingsboard.rule.engine.profile.TbDeviceProfileNode", "name": "profile",
           "configuration": {"persistAlarmRulesState": False, "fetchAlarmRulesStateOnStart": False}}


def export(nodes: list[dict[str, Any]], connections: list[tuple[int, int, str]], first: int = 0,
           name: str = "chain") -> dict[str, Any]:
    return {"ruleChain": {"name": name, "type": "CORE"},
            "metadata": {"firstNodeIndex": first, "nodes": copy.deepcopy(nodes),
                         "connections": [{"fromIndex": a, "toIndex": b, "type": t} for a, b, t in connections]}}


def record(exported: dict[str, Any], tenant: UUID = TENANT) -> RuleChainRecord:
    return RuleChainRecord(uuid4(), 1, tenant, exported["ruleChain"]["name"], "CORE", True, False, None, None,
                           exported["metadata"], 2)


THROUGH_ENGINE = export([SWITCH, LOG, RPC], [(0, 1, "RPC Request to Device"), (1, 2, "Success"),
                                              (0, 1, "RPC Request from Device"), (0, 1, "RPC Successful")])


# --- routes -----------------------------------------------------------------------------------------------------------

def test_the_default_root_chain_sends_commands_directly_and_drops_rpc_status_messages():
    routes = analyse_routes(default_root_chain())
    assert routes.direct_rpc
    assert all(routes.drops(t) for t in ("RPC_QUEUED", "RPC_SUCCESSFUL", "RPC_DELETED"))
    assert not routes.drops("TO_SERVER_RPC_REQUEST") and not routes.drops("RPC_CALL_FROM_SERVER_TO_DEVICE")
    assert not routes.drops("SOME_CUSTOM_TYPE")  # "Other" is connected (to Log Other)
    assert not routes.wants_rpc_events


def test_a_thingsboard_3_export_starting_at_the_device_profile_node_is_seen_through():
    routes = analyse_routes(export([PROFILE, SWITCH, RPC], [(0, 1, "Success"), (1, 2, "RPC Request to Device")]))
    assert routes.direct_rpc and routes.drops("TO_SERVER_RPC_REQUEST")


@pytest.mark.parametrize("exported", [
    export([SWITCH, RPC, LOG], [(0, 1, "RPC Request to Device"), (1, 2, "Success")]),  # something after it
    export([SWITCH, RPC], [(0, 1, "RPC Request to Device"), (0, 1, "RPC Request to Device")]),  # sent twice
    export([SWITCH, LOG, RPC], [(0, 1, "RPC Request to Device"), (1, 2, "Success")]),  # something before it
    export([SWITCH, RPC, RPC], [(0, 1, "RPC Request to Device"), (0, 2, "RPC Request to Device")]),
])
def test_a_command_goes_through_the_engine_when_the_chain_does_more_than_send_it(exported):
    assert not analyse_routes(exported).direct_rpc


def test_a_chain_not_starting_with_a_switch_drops_nothing_and_sends_nothing_directly():
    routes = analyse_routes(export([LOG, SWITCH, RPC], [(0, 1, "Success"), (1, 2, "RPC Request to Device")]))
    assert routes.switch_labels is None and not routes.direct_rpc
    assert not routes.drops("RPC_QUEUED") and routes.wants_rpc_events
    assert analyse_routes({"metadata": {"firstNodeIndex": None, "nodes": []}}).switch_labels is None


def test_switch_labels_match_ignoring_case():
    routes = analyse_routes(export([SWITCH, LOG], [(0, 1, "rpc successful")]))
    assert not routes.drops("RPC_SUCCESSFUL") and routes.drops("RPC_QUEUED") and routes.wants_rpc_events


# --- fakes ------------------------------------------------------------------------------------------------------------

class FakeEngine:
    """Records each run; the test ends it with ``finish``."""

    def __init__(self) -> None:
        self.runs: list[tuple[Any, RuleMessage, Any, Deferred]] = []

    def process(self, chain: Any, msg: RuleMessage, ctx: Any) -> Deferred:
        d: Deferred = Deferred()
        self.runs.append((chain, msg, ctx, d))
        return d

    def finish(self, index: int = -1, outputs: Any = None) -> None:
        self.runs[index][3].callback(outputs or [])


class FakeCommands:
    def __init__(self) -> None:
        self.sent: list[tuple[Initiator, UUID, RpcBody, bool, Deferred]] = []
        self.interceptor: Any = None

    def submit(self, initiator: Initiator, device_id: UUID, body: RpcBody, oneway: bool,
               idempotent: bool = False) -> Deferred:
        d: Deferred = Deferred()
        self.sent.append((initiator, device_id, body, oneway, d))
        return d


class FakePort:
    def __init__(self) -> None:
        self.told: list[tuple[Device, Any]] = []

    def tell(self, device: Device, message: Any) -> None:
        self.told.append((device, message))


class FakeStore:
    def __init__(self) -> None:
        self.roots: dict[UUID, RuleChainRecord] = {}

    def list_root_chains(self) -> Deferred:
        return succeed(list(self.roots.values()))

    def get_root(self, tenant_id: UUID) -> Deferred:
        return succeed(self.roots.get(tenant_id))

    def get_rule_chain(self, chain_id: UUID, tenant_id: UUID | None = None) -> Deferred:
        return succeed(next((r for r in self.roots.values() if r.id == chain_id), None))


class FakeCatalog:
    def cached_device(self, device_id: UUID) -> Device | None:
        return DEVICE if device_id == DEVICE.id else None


class FakeCluster:
    def __init__(self) -> None:
        self.notices: dict[str, Any] = {}
        self.broadcasts: list[dict[str, Any]] = []
        self._joined = True
        self.router = self

    def broadcast(self, envelope: dict[str, Any]) -> bool:
        self.broadcasts.append(envelope)
        return True


class DirectoryContext:
    device_calls: Any = None


class Rig:
    def __init__(self, root: dict[str, Any] | None = None, cluster: Any = None, **config: Any) -> None:
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.engine = FakeEngine()
        self.commands = FakeCommands()
        self.port = FakePort()
        self.store = FakeStore()
        self.replies = Replies()
        self.events = EventStream()
        self.directory = DirectoryContext()
        if root is not None:
            self.store.roots[TENANT] = record(root)
        self.rules = RuleService(Config(**config), self.clock, self.store, self.commands, FakeCatalog(), None,
                                 self.port, self.replies, self.events, "node-a", cluster, scripts=object(),
                                 engine=self.engine)
        self.rules.install(self.directory)
        done: list[Any] = []
        Deferred.fromCoroutine(self.rules.load()).addBoth(done.append)
        assert done == [None]

    def body(self, **changes: Any) -> RpcBody:
        values = dict(method="setGpio", params={"pin": 7}, timeout=10000, expiration_time=T0 * 1000 + 10000,
                      persistent=False, retries=None, additional_info=None, request_uuid=uuid4(), qos=None)
        values.update(changes)
        return RpcBody(**values)

    def intercept(self, body: RpcBody | None = None, oneway: bool = False) -> tuple[Deferred | None, list[Any]]:
        d = self.rules.intercept(Initiator(TENANT, None, USER_ID), DEVICE, body or self.body(), oneway)
        outcome: list[Any] = []
        if d is not None:
            d.addBoth(outcome.append)
        return d, outcome

    def turn(self) -> None:
        self.clock.advance(0)


def error_of(outcome: list[Any]) -> Any:
    [result] = outcome
    assert isinstance(result, Failure), result
    return result.value


# --- commands from users ----------------------------------------------------------------------------------------------

def test_with_the_default_chain_a_users_command_is_not_taken():
    rig = Rig()
    d, _ = rig.intercept()
    assert d is None and rig.engine.runs == []


def test_a_users_command_becomes_thingsboards_rpc_message_into_the_root_chain():
    rig = Rig(THROUGH_ENGINE)
    body = rig.body(params={"pin": 7, "on": True}, retries=3, persistent=True, additional_info={"note": "x"})
    d, outcome = rig.intercept(body)
    assert d is not None and outcome == []
    assert rig.engine.runs == []  # on the next reactor turn, never inside the caller's call
    rig.turn()
    [(chain, msg, ctx, _)] = rig.engine.runs
    assert chain.id == rig.store.roots[TENANT].id and ctx.tenant_id == TENANT
    assert (msg.type, msg.originator, msg.customer_id) == ("RPC_CALL_FROM_SERVER_TO_DEVICE",
                                                           EntityId("DEVICE", DEVICE.id), CUSTOMER)
    assert json.loads(msg.data) == {"method": "setGpio", "params": '{"pin":7,"on":true}',
                                    "additionalInfo": '{"note":"x"}'}
    assert msg.metadata == {"requestUUID": str(body.request_uuid), "originServiceId": "node-a",
                            "expirationTime": str(body.expiration_time), "oneway": "false", "persistent": "true",
                            "retries": "3", "deviceName": "Valve 7", "deviceType": "valve"}
    assert isinstance(msg.origin, CallerOrigin) and msg.origin.user_id == USER_ID


def test_the_first_rpc_call_request_answers_the_caller_once_and_later_ones_get_their_own_ids():
    rig = Rig(THROUGH_ENGINE)
    body = rig.body()
    _, outcome = rig.intercept(body)
    rig.turn()
    [(chain, msg, ctx, _)] = rig.engine.runs
    node_id = uuid4()
    first = ctx.send_rpc(msg, DEVICE.id, "setGpio", {"pin": 7}, False, False, body.expiration_time, None,
                         body.request_uuid, None, chain.id, node_id)
    second = ctx.send_rpc(msg, DEVICE.id, "setGpio", {"pin": 8}, True, False, body.expiration_time, None,
                          body.request_uuid, None, chain.id, node_id)
    (initiator, _, sent, oneway, d1), (_, _, sent2, _, d2) = rig.commands.sent
    assert initiator == Initiator(TENANT, user_id=USER_ID, rule_chain_id=chain.id, rule_node_id=node_id)
    assert (sent.method, sent.params, sent.request_uuid, oneway) == ("setGpio", {"pin": 7}, body.request_uuid, False)
    assert sent2.request_uuid != body.request_uuid  # one command, one id
    answered = RpcResult(response={"ok": 1}, has_response=True)
    d1.callback(answered)
    d2.callback(RpcResult(response={"ok": 2}, has_response=True))
    assert outcome == [answered]
    node_seen: list[Any] = []
    first.addBoth(node_seen.append)
    second.addBoth(node_seen.append)
    assert len(node_seen) == 2  # the node gets its outcome too (its Success/Failure message)
    rig.engine.finish()
    assert outcome == [answered]  # the end of the chain does not answer a second time


def test_a_bulk_rpcs_command_sent_by_the_chain_stays_in_its_batch():
    rig = Rig(THROUGH_ENGINE)
    batch_id = uuid4()
    body = rig.body()
    rig.rules.intercept(Initiator(TENANT, None, USER_ID, batch_id=batch_id), DEVICE, body, False)
    rig.turn()
    [(chain, msg, ctx, _)] = rig.engine.runs
    for _ in range(2):
        ctx.send_rpc(msg, DEVICE.id, "m", {}, False, True, body.expiration_time, None, body.request_uuid, None,
                     chain.id, None)
    (first, *_), (second, *_) = rig.commands.sent
    assert (first.batch_id, first.rule_chain_id) == (batch_id, chain.id)
    assert second.batch_id is None  # a further command of the chain is not one of the batch's


def test_a_refused_send_is_the_callers_error_too():
    rig = Rig(THROUGH_ENGINE)
    body = rig.body()
    _, outcome = rig.intercept(body)
    rig.turn()
    [(chain, msg, ctx, _)] = rig.engine.runs
    sent = ctx.send_rpc(msg, uuid4(), "m", {}, False, False, body.expiration_time, None, None, None, chain.id, None)
    sent.addErrback(lambda f: None)
    rig.commands.sent[0][4].errback(NotFound("Device with requested id wasn't found!"))
    assert isinstance(error_of(outcome), NotFound)


def test_a_chain_that_ends_without_sending_answers_the_caller_with_an_error():
    rig = Rig(THROUGH_ENGINE)
    _, outcome = rig.intercept()
    rig.turn()
    rig.engine.finish()
    error = error_of(outcome)
    assert type(error) is CommandNotSent and error.http_status == 500
    assert error.details["rpcError"] == "NOT_SENT_BY_RULE_CHAIN"
    assert rig.rules.inflight(TENANT) == 0 and rig.clock.getDelayedCalls() == []


def test_a_chain_still_running_when_the_command_expires_answers_the_caller_then():
    rig = Rig(THROUGH_ENGINE)
    _, outcome = rig.intercept(rig.body(expiration_time=T0 * 1000 + 2000))
    rig.turn()
    rig.clock.advance(2.9)
    assert outcome == []
    rig.clock.advance(0.2)  # expiration + 1 s, as ThingsBoard's REST waiter
    assert isinstance(error_of(outcome), CommandNotSentInTime) and error_of(outcome).http_status == 504
    rig.engine.finish()
    assert len(outcome) == 1


def test_a_chain_with_no_route_for_commands_refuses_at_once():
    rig = Rig(export([SWITCH, LOG], [(0, 1, "RPC Request from Device")]))
    _, outcome = rig.intercept()
    assert type(error_of(outcome)) is CommandNotSent and rig.engine.runs == []


def test_a_tenant_past_its_in_flight_limit_is_refused_with_429_and_counted():
    rig = Rig(THROUGH_ENGINE, rules_max_inflight=2)
    rig.intercept()
    rig.intercept()
    _, outcome = rig.intercept()
    assert isinstance(error_of(outcome), TooManyRequests) and rig.rules.dropped == 1
    rig.turn()
    rig.engine.finish(0)
    assert rig.rules.inflight(TENANT) == 1
    d, _ = rig.intercept()
    assert d is not None and rig.rules.dropped == 1


def test_other_tenants_run_the_default_chain_meanwhile():
    rig = Rig(THROUGH_ENGINE)
    other = Device(uuid4(), 0, uuid4(), NULL_UUID, "d", "default", None, None)
    assert rig.rules.intercept(Initiator(other.tenant_id), other, rig.body(), False) is None


def test_messages_start_a_bounded_number_per_turn():
    rig = Rig(THROUGH_ENGINE, rules_max_inflight=1000)
    for _ in range(600):
        rig.intercept()
    [turn] = [c for c in rig.clock.getDelayedCalls() if c.getTime() == rig.clock.seconds()]
    turn.func(*turn.args)  # one reactor turn (task.Clock would also run what that turn schedules for "now")
    assert len(rig.engine.runs) == 256
    rig.turn()
    assert len(rig.engine.runs) == 600


# --- the command service's hook ---------------------------------------------------------------------------------------

class HookPort:
    def __init__(self) -> None:
        self.told: list[Any] = []

    def tell(self, device: Device, message: Any) -> None:
        self.told.append(message)


class Devices:
    def cached_device(self, device_id: UUID) -> Device | None:
        return DEVICE

    def get_device(self, device_id: UUID) -> Deferred:
        return succeed(DEVICE)


@pytest.mark.parametrize("initiator, consulted", [
    (Initiator(TENANT, None, USER_ID), True),
    (Initiator(TENANT, None, USER_ID, batch_id=uuid4()), True),
    (Initiator(TENANT, device_id=uuid4()), False),
    (Initiator(TENANT, rule_chain_id=uuid4(), rule_node_id=uuid4()), False),
])
def test_the_command_service_asks_its_interceptor_about_users_and_bulk_commands_only(initiator, consulted):
    clock = task.Clock()
    port = HookPort()
    service = CommandService(port, Replies(), Devices(), None, EventStream(), clock)  # type: ignore[arg-type]
    seen: list[Any] = []
    taken: Deferred = Deferred()
    service.interceptor = lambda *args: seen.append(args) or taken
    body = RpcBody("m", {}, 1000, 1000, False, None, None, uuid4(), None)
    d = service.submit(initiator, DEVICE.id, body, False)
    assert (d is taken) is consulted and bool(seen) is consulted
    assert bool(port.told) is not consulted  # a taken command is not sent by the service itself
    service.interceptor = lambda *args: None  # None: the command goes as it is
    service.submit(initiator, DEVICE.id, body, False)
    assert isinstance(port.told[-1], m.SubmitRpc)


# --- device-to-server calls -------------------------------------------------------------------------------------------

REPLYING = export([SWITCH, LOG], [(0, 1, "RPC Request from Device")])


def call(rig: Rig, method: str = "getWeather", request_id: int = 42, session_id: int = 7) -> bool:
    payload = json.dumps({"method": method, "params": {"city": "Oslo"}}).encode()
    return rig.directory.device_calls(DEVICE, "MQTT", session_id, request_id, payload)


def reply_of(rig: Rig) -> tuple[int, int, Any]:
    device, message = rig.port.told[-1]
    assert device == DEVICE and isinstance(message, m.ReplyToDevice)
    return message.session_id, message.request_id, json.loads(message.body)


def test_a_call_becomes_thingsboards_to_server_rpc_request_message():
    rig = Rig(REPLYING)
    assert call(rig) is True
    rig.turn()
    [(_, msg, _, _)] = rig.engine.runs
    assert msg.type == "TO_SERVER_RPC_REQUEST" and msg.originator == EntityId("DEVICE", DEVICE.id)
    assert json.loads(msg.data) == {"method": "getWeather", "params": {"city": "Oslo"}}
    assert msg.metadata == {"deviceName": "Valve 7", "deviceType": "valve", "requestId": "42",
                            "serviceId": "node-a", "sessionId": str(UUID(int=7))}


def test_rpc_call_reply_answers_the_device_once():
    rig = Rig(REPLYING)
    call(rig)
    rig.turn()
    [(_, msg, ctx, _)] = rig.engine.runs
    assert ctx.reply_to_device(msg, DEVICE.id, 42, msg.metadata["sessionId"], '{"t":-3}') is True
    assert reply_of(rig) == (7, 42, {"t": -3})
    assert ctx.reply_to_device(msg, DEVICE.id, 42, msg.metadata["sessionId"], '{"t":-4}') is False
    rig.engine.finish()
    assert len(rig.port.told) == 1 and rig.clock.getDelayedCalls() == []


def test_a_reply_may_come_after_the_originator_changed():
    rig = Rig(REPLYING)
    call(rig)
    rig.turn()
    [(_, msg, ctx, _)] = rig.engine.runs
    other = msg.with_(originator=EntityId("DEVICE", uuid4()))
    assert ctx.reply_to_device(other, other.originator.id, 42, msg.metadata["sessionId"], "{}") is True
    assert reply_of(rig)[:2] == (7, 42)  # to the calling device's session


def test_a_call_no_chain_answers_is_answered_when_the_chain_ends():
    rig = Rig(REPLYING)
    call(rig, "noSuchMethod")
    rig.turn()
    rig.engine.finish()
    assert reply_of(rig) == (7, 42, {"error": "Unsupported method: noSuchMethod"})


def test_a_call_still_running_after_the_device_call_timeout_is_answered_timeout():
    rig = Rig(REPLYING, device_call_timeout=500)
    call(rig)
    rig.turn()
    rig.clock.advance(0.5)
    assert reply_of(rig) == (7, 42, {"error": "timeout"})
    rig.engine.finish()
    assert len(rig.port.told) == 1


def test_a_chain_that_drops_calls_leaves_them_to_the_server_methods():
    rig = Rig(export([SWITCH, LOG], [(0, 1, "Other")]))
    assert call(rig) is False and rig.engine.runs == []


def test_a_call_past_the_in_flight_limit_is_answered_with_an_error():
    rig = Rig(REPLYING, rules_max_inflight=1)
    call(rig, request_id=1)
    assert call(rig, request_id=2) is True
    session_id, request_id, answer = reply_of(rig)
    assert request_id == 2 and "too many rule-engine messages" in answer["error"]


# --- persistent commands' status changes ------------------------------------------------------------------------------

def rpc_record(status: RpcStatus) -> RpcRecord:
    return RpcRecord(uuid4(), T0 * 1000, TENANT, DEVICE.id, T0 * 1000 + 60000, False, "setGpio", {"pin": 7}, status)


def test_no_listener_while_every_root_chain_drops_rpc_messages():
    rig = Rig()
    assert not rig.events.has_listeners


def test_each_persistent_status_change_is_an_rpc_message_with_the_rpc_json():
    rig = Rig(THROUGH_ENGINE)
    assert rig.events.has_listeners
    successful = rpc_record(RpcStatus.SUCCESSFUL)
    rig.events.publish(RpcStatusChanged(successful, True))
    rig.events.publish(RpcStatusChanged(rpc_record(RpcStatus.QUEUED), True))  # "RPC Queued": no route
    rig.events.publish(RpcStatusChanged(rpc_record(RpcStatus.SUCCESSFUL), False))  # lightweight: none
    rig.turn()
    [(_, msg, _, _)] = rig.engine.runs
    assert (msg.type, msg.originator, msg.metadata, msg.customer_id) == (
        "RPC_SUCCESSFUL", EntityId("DEVICE", DEVICE.id), {}, CUSTOMER)
    data = json.loads(msg.data)
    assert data["id"] == {"entityType": "RPC", "id": str(successful.id)} and data["status"] == "SUCCESSFUL"


def test_a_status_burst_past_the_limit_is_dropped_counted_and_logged_once_a_second():
    from twisted.logger import globalLogPublisher

    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        rig = Rig(THROUGH_ENGINE, rules_max_inflight=3)
        for _ in range(10):
            rig.events.publish(RpcStatusChanged(rpc_record(RpcStatus.SUCCESSFUL), True))
        rig.clock.advance(0.5)
        rig.events.publish(RpcStatusChanged(rpc_record(RpcStatus.SUCCESSFUL), True))
        rig.clock.advance(0.6)
        rig.events.publish(RpcStatusChanged(rpc_record(RpcStatus.SUCCESSFUL), True))
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert rig.rules.dropped == 9 and len(rig.engine.runs) == 3
    reports = [e for e in logged if "messages in flight" in e.get("log_format", "")]
    assert [e["count"] for e in reports] == [1, 8]


# --- root chains change -----------------------------------------------------------------------------------------------

def test_a_changed_root_chain_is_reloaded_and_announced_to_the_cluster():
    cluster = FakeCluster()
    rig = Rig(cluster=cluster)
    assert rig.rules.routes_of(TENANT).direct_rpc
    rig.store.roots[TENANT] = record(THROUGH_ENGINE)
    rig.rules.chains_changed(TENANT)
    assert not rig.rules.routes_of(TENANT).direct_rpc and rig.events.has_listeners
    assert cluster.broadcasts == [{"t": "rules-changed", "tenant": str(TENANT)}]
    del rig.store.roots[TENANT]
    cluster.notices["rules-changed"]({"t": "rules-changed", "tenant": str(TENANT), "from": "node-b"})
    assert rig.rules.routes_of(TENANT).direct_rpc and not rig.events.has_listeners
    assert len(cluster.broadcasts) == 1  # a notice from another node is not sent on again


def test_a_stored_root_that_no_longer_loads_leaves_its_tenant_on_the_default_chain():
    broken = export([{"type": "org.example.Gone", "name": "gone"}], [])
    rig = Rig(broken)
    assert TENANT not in rig.rules.roots and rig.rules.routes_of(TENANT).direct_rpc


def test_the_default_root_chain_runs_under_the_tenants_default_root_id():
    rig = Rig(export([SWITCH, LOG], [(0, 1, "RPC Request to Device")]))
    del rig.store.roots[TENANT]
    rig.rules.chains_changed(TENANT)
    tenant = uuid4()
    assert rig.rules.root_of(tenant).chain.id == default_root_id(tenant)


# --- outgoing HTTP ----------------------------------------------------------------------------------------------------

class Echo(Resource):
    isLeaf = True

    def render_POST(self, request: Any) -> bytes:
        request.setHeader(b"x-seen", request.getHeader(b"x-token") or b"")
        request.setResponseCode(201)
        return b"got " + request.content.read()


def test_http_requests_return_status_reason_headers_and_body():
    rig = Rig()
    rig.rules.http = StubTreq(Echo())
    results: list[Any] = []
    d = rig.rules.context_for(TENANT).http_request("post", "http://hook.test/x", {"X-Token": "t1"}, b"abc", 5.0)
    d.addBoth(results.append)
    rig.rules.http.flush()
    [(status, reason, headers, body)] = results
    assert (status, reason, body) == (201, "Created", b"got abc")
    assert headers["X-Seen"] == "t1"


# --- the device actor's side, and the cluster codec -----------------------------------------------------------------

@pytest.fixture
def actor_clock(monkeypatch: pytest.MonkeyPatch) -> Any:
    with actors_on_clock(monkeypatch, T0) as clock:
        yield clock


class ReplySession:
    transport = "fake"

    def __init__(self, session_id: int) -> None:
        self.session_id = session_id
        self.replies: list[tuple[int, bytes]] = []

    def send_reply(self, request_id: int, body: bytes) -> None:
        self.replies.append((request_id, body))

    def close(self, reason: str) -> None:
        pass


def test_the_actor_hands_calls_no_server_method_answers_to_the_rules_and_writes_their_replies(actor_clock):
    from nanoiot.actors.device import ActorSettings
    from nanoiot.actors.directory import DeviceDirectory
    from nanoiot.rpc.queue import QueueSettings

    directory = DeviceDirectory(actor_clock, ActorSettings(queue=QueueSettings()))
    taken: list[tuple[Any, ...]] = []
    directory.context.device_calls = lambda *args: taken.append(args) or True
    session = ReplySession(5)
    directory.attach(DEVICE, session)  # type: ignore[arg-type]
    for request_id, method in ((1, "getCurrentTime"), (2, "openValve"), (3, None)):
        payload = json.dumps({"method": method}).encode() if method else b"not json"
        directory.tell_local(DEVICE, m.DeviceCall(5, request_id, payload))
    actor_clock.advance(0)
    actor_clock.advance(0)
    assert [(args[2], args[3]) for args in taken] == [(5, 2)]  # only the method no server method answers
    answered = dict(session.replies)
    assert set(answered) == {1, 3}  # the built-in method and the invalid call, as before
    directory.tell_local(DEVICE, m.ReplyToDevice(5, 2, b'{"open":true}'))
    directory.tell_local(DEVICE, m.ReplyToDevice(99, 2, b"{}"))  # a session that is gone: nobody to answer
    actor_clock.advance(0)
    assert session.replies[-1] == (2, b'{"open":true}') and len(session.replies) == 3


def test_a_reply_to_a_device_travels_between_nodes():
    from nanoiot.cluster import codec

    message = m.ReplyToDevice(7, 42, '{"t":"\u00fc"}'.encode())
    assert codec.message_from_json(json.loads(codec.dumps(codec.message_to_json(message)))) == message


# --- --rule-chain --------------------------------------------------------------------------------------------------

def test_a_rule_chain_file_with_problems_is_one_config_error_listing_all_of_them(tmp_path):
    from nanoiot.errors import ConfigError

    bad = export([SWITCH, {"type": "org.example.Gone", "name": "gone"}, LOG], [(0, 7, "Other")])
    bad["metadata"]["nodes"][2]["configuration"] = {"scriptLang": "JS", "jsScript": "return (;"}
    path = tmp_path / "chain.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError) as raised:
        Config.from_sources({"rule-chain": str(path)}, environ={})
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"--rule-chain='{path}': ")
    assert "'gone'" in message and "node 2" in message and "7" in message
    with pytest.raises(ConfigError, match="cannot be read"):
        Config.from_sources({"rule-chain": str(tmp_path / "missing.json")}, environ={})


def test_a_valid_rule_chain_file_becomes_the_default_root_chain(tmp_path):
    path = tmp_path / "chain.json"
    path.write_text(json.dumps(THROUGH_ENGINE))
    config = Config.from_sources({"rule-chain": str(path)}, environ={})
    assert config.rule_chain == str(path)
    rig = Rig(rule_chain=str(path))
    assert not rig.rules.routes_of(uuid4()).direct_rpc
    assert rig.rules.fallback_export()["ruleChain"]["name"] == "chain"
