"""Rule chains end to end: the real server on loopback, chains loaded through the REST API, devices on raw MQTT, and
a twisted.web endpoint of the test's own for the REST API call node. Every wait is an event bounded by a timeout."""

from __future__ import annotations

import copy
import json
import time
from typing import Any
from uuid import UUID

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from nanoiot.transports.mqtt import codec
from tests.fixtures.raw_mqtt import RawDevice, connect_raw
from tests.fixtures.server import RunningServer, with_timeout
from tests.fixtures.server_context import server_running

SWITCH = {"type": "org.thingsboard.rule.engine.filter.TbMsgTypeSwitchNode", "name": "Message Type Switch",
          "configuration": {"version": 0}}
RPC_REQUEST = {"type": "org.thingsboard.rule.engine.rpc.TbSendRPCRequestNode", "name": "RPC Call Request",
               "configuration": {"timeoutInSeconds": 60}}
RPC_REPLY = {"type": "org.thingsboard.rule.engine.rpc.TbSendRPCReplyNode", "name": "rpcReply",
             "configuration": {"requestIdMetaDataAttribute": "requestId"}}
#: The spec's RpcResponseRuleChainMetadata (ThingsBoard's black-box test chain): a JS transformation answers
#: ``getResponse``, everything else is echoed back.
REPLY_CHAIN = {
    "ruleChain": {"name": "RPC reply", "type": "CORE", "root": False, "debugMode": False},
    "metadata": {
        "firstNodeIndex": 0,
        "nodes": [
            SWITCH,
            {"type": "org.thingsboard.rule.engine.transform.TbTransformMsgNode", "name": "formResponse",
             "configuration": {"jsScript": "if (msg.method == \"getResponse\") {\n    return {msg: {\"response\": "
                                           "\"requestReceived\"}, metadata: metadata, msgType: msgType};\n}\n\n"
                                           "return {msg: msg, metadata: metadata, msgType: msgType};"}},
            RPC_REPLY,
        ],
        "connections": [{"fromIndex": 0, "toIndex": 1, "type": "RPC Request from Device"},
                        {"fromIndex": 1, "toIndex": 2, "type": "Success"},
                        {"fromIndex": 1, "toIndex": 2, "type": "Failure"}],
        "ruleChainConnections": None,
    },
}


def chain(name: str, nodes: list[dict[str, Any]], connections: list[tuple[int, int, str]]) -> dict[str, Any]:
    return {"ruleChain": {"name": name, "type": "CORE"},
            "metadata": {"firstNodeIndex": 0, "nodes": copy.deepcopy(nodes),
                         "connections": [{"fromIndex": a, "toIndex": b, "type": t} for a, b, t in connections]}}


def rest_call(name: str, url: str) -> dict[str, Any]:
    return {"type": "org.thingsboard.rule.engine.rest.TbRestApiCallNode", "name": name, "configurationVersion": 4,
            "configuration": {"restEndpointUrlPattern": url, "requestMethod": "POST",
                              "headers": {"Content-Type": "application/json"}, "readTimeoutMs": 5000}}


def transform(name: str, script: str) -> dict[str, Any]:
    return {"type": "org.thingsboard.rule.engine.transform.TbTransformMsgNode", "name": name,
            "configuration": {"scriptLang": "JS", "jsScript": script}}


async def make_root(server: RunningServer, export: dict[str, Any]) -> dict[str, Any]:
    """Import ``export`` over REST and make it the tenant's root chain."""
    status, imported = await server.call("POST", "/api/ruleChain/import", body=export)
    assert status == 200, imported
    status, rooted = await server.call("POST", f"/api/ruleChain/{imported['id']['id']}/root")
    assert status == 200 and rooted["root"], rooted
    await until_root(server, UUID(imported["id"]["id"]))
    return rooted


async def until_root(server: RunningServer, chain_id: UUID) -> None:
    """The rule service reloads a root chain asynchronously after the REST call: wait for it (bounded)."""
    rules = server.service.rules
    tenant_id = server.service.demo.devices[0][0].tenant_id  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while True:
        root = rules.roots.get(tenant_id)
        if root is not None and root.record.id == chain_id:
            return
        assert time.monotonic() < deadline, "the root chain was not reloaded"
        await deferLater(0.01)


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


class CallingDevice:
    """A raw MQTT device that calls the server (device-to-server RPC) and may also take commands."""

    def __init__(self, raw: RawDevice) -> None:
        self.raw = raw
        self.next_id = 100
        #: Answers read while waiting for another one (they may come in any order).
        self.answers: dict[str, Any] = {}

    @classmethod
    async def connect(cls, server: RunningServer, token: str, commands: bool = False) -> CallingDevice:
        raw = await connect_raw(server.mqtt_port, token, subscribe=commands)
        await raw.subscribe("v1/devices/me/rpc/response/+")
        return cls(raw)

    def send(self, method: str, params: Any = None) -> int:
        self.next_id += 1
        self.raw.next_pid += 1
        body = json.dumps({"method": method, "params": params}).encode()
        self.raw.transport.write(codec.encode_publish(f"v1/devices/me/rpc/request/{self.next_id}", body, 1,
                                                      self.raw.next_pid, self.raw.level))
        return self.next_id

    async def answer_to(self, request_id: int, timeout: float = 10.0) -> Any:
        topic = f"v1/devices/me/rpc/response/{request_id}"
        while topic not in self.answers:
            packet = await self.raw.next_packet(codec.Publish, timeout)
            self.answers[packet.topic] = json.loads(packet.payload)
        return self.answers.pop(topic)

    async def call(self, method: str, params: Any = None, timeout: float = 10.0) -> Any:
        return await self.answer_to(self.send(method, params), timeout)

    def close(self) -> None:
        self.raw.close()


class Endpoint(Resource):
    """A local HTTP endpoint for the REST API call node: records each POST, answers ``{"fromHttp": body}``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: defer.DeferredQueue = defer.DeferredQueue()

    def render_POST(self, request: Any) -> bytes:
        body = json.loads(request.content.read() or b"null")
        self.received.put((request.path.decode(), body))
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"x-endpoint", b"test")
        return json.dumps({"fromHttp": body}).encode()


async def endpoint() -> tuple[Endpoint, Any, str]:
    resource = Endpoint()
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    return resource, port, f"http://127.0.0.1:{port.getHost().port}"


async def new_device(server: RunningServer, name: str) -> tuple[str, str]:
    status, device = await server.call("POST", "/api/device", body={"name": name, "type": "valve"})
    assert status == 200, device
    status, credentials = await server.call("GET", f"/api/device/{device['id']['id']}/credentials")
    assert status == 200, credentials
    return device["id"]["id"], credentials["credentialsId"]


# --- (a) a device's call answered by a JS transformation and RPC Call Reply -------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_device_call_is_answered_by_a_transformation_and_rpc_call_reply(tmp_path):
    async with server_running(tmp_path) as server:
        await make_root(server, REPLY_CHAIN)
        _, token = await server.demo_device()
        device = await CallingDevice.connect(server, token)
        try:
            assert await device.call("getResponse", {}) == {"response": "requestReceived"}
            # Any other method: the transformation passes the request on and the reply node echoes it.
            assert await device.call("echoMe", {"n": [1, 2]}) == {"method": "echoMe", "params": {"n": [1, 2]}}
            # A server method is still answered by the server method, not by the chain.
            now = await device.call("getCurrentTime")
            assert isinstance(now, int) and abs(now - time.time() * 1000) < 60_000
        finally:
            device.close()


class Stalling(Resource):
    """An HTTP endpoint that does not answer until told to."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Any] = []
        self.arrived: defer.DeferredQueue = defer.DeferredQueue()

    def render_POST(self, request: Any) -> Any:
        from twisted.web.server import NOT_DONE_YET

        self.waiting.append(request)
        self.arrived.put(request)
        return NOT_DONE_YET

    def release(self) -> None:
        for request in self.waiting:
            if not request.finished and not request._disconnected:
                request.write(b"{}")
                request.finish()
        self.waiting.clear()


@pytest_twisted.ensureDeferred
async def test_a_call_no_chain_answers_gets_an_answer_at_once_and_a_stuck_one_times_out(tmp_path):
    stalling = Stalling()
    port = reactor.listenTCP(0, Site(stalling), interface="127.0.0.1")
    try:
        async with server_running(tmp_path, device_call_timeout=300) as server:
            log_only = chain("log only", [SWITCH, {"type": "org.thingsboard.rule.engine.action.TbLogNode",
                                                   "name": "log", "configuration": {"jsScript": "return 'x';"}}],
                             [(0, 1, "RPC Request from Device")])
            await make_root(server, log_only)
            _, token = await server.demo_device()
            device = await CallingDevice.connect(server, token)
            try:
                # The chain ended without answering: the device learns so at once, as without rule chains.
                assert await device.call("noSuchMethod", {}) == {"error": "Unsupported method: noSuchMethod"}
                url = f"http://127.0.0.1:{port.getHost().port}/stall"
                await make_root(server, chain("stall", [SWITCH, rest_call("stall", url), RPC_REPLY],
                                              [(0, 1, "RPC Request from Device"), (1, 2, "Success")]))
                request_id = device.send("waitForever", {})
                await with_timeout(stalling.arrived.get())
                assert await device.answer_to(request_id) == {"error": "timeout"}
                assert server.service.rules._device_calls == {}  # a late RPC Call Reply would answer nobody
            finally:
                stalling.release()
                device.close()
    finally:
        stalling.release()
        await port.stopListening()


# --- (b) a command forwarded to a related device ----------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_call_is_forwarded_to_the_related_device_and_its_answer_comes_back(tmp_path):
    forward = chain("forward to related", [
        SWITCH,
        {"type": "org.thingsboard.rule.engine.transform.TbChangeOriginatorNode", "name": "to the valve",
         "configuration": {"originatorSource": "RELATED", "relationsQuery": {
             "direction": "FROM", "maxLevel": 1, "fetchLastLevelOnly": False,
             "filters": [{"relationType": "Controls", "entityTypes": ["DEVICE"]}]}}},
        RPC_REQUEST,
        RPC_REPLY,
    ], [(0, 1, "RPC Request from Device"), (1, 2, "Success"), (2, 3, "Success"), (2, 3, "Failure")])
    async with server_running(tmp_path) as server:
        await make_root(server, forward)
        controller_id, controller_token = await server.demo_device()
        valve_id, valve_token = await new_device(server, "Valve 1")
        status, relation = await server.call("POST", "/api/relation", body={
            "from": {"entityType": "DEVICE", "id": controller_id}, "to": {"entityType": "DEVICE", "id": valve_id},
            "type": "Controls"})
        assert status == 200, relation
        valve = await connect_raw(server.mqtt_port, valve_token)
        controller = await CallingDevice.connect(server, controller_token)
        try:
            request_id = controller.send("setValve", {"open": 40})
            valve_request_id, command, _ = await valve.next_command()
            assert command == {"method": "setValve", "params": {"open": 40}}
            valve.answer(valve_request_id, {"opened": 40})
            assert await controller.answer_to(request_id) == {"opened": 40}
            # The command the chain sent records who sent it.
            status, page = await server.call("GET", f"/api/rpc/persistent/device/{valve_id}?pageSize=10&page=0")
            assert status == 200 and page["totalElements"] == 0  # lightweight: not stored
        finally:
            controller.close()
            valve.close()


# --- (c) the REST API call node on a local endpoint -------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_chain_calls_a_local_http_endpoint_and_answers_with_its_response(tmp_path):
    hook, port, base = await endpoint()
    try:
        export = chain("http", [SWITCH, rest_call("ask the endpoint", base + "/lookup/${deviceName}"), RPC_REPLY],
                       [(0, 1, "RPC Request from Device"), (1, 2, "Success")])
        async with server_running(tmp_path) as server:
            await make_root(server, export)
            _, token = await server.demo_device()
            device = await CallingDevice.connect(server, token)
            try:
                answer = await device.call("lookup", {"k": 1})
                path, body = await with_timeout(hook.received.get())
                assert path == "/lookup/Demo%20Device"
                assert body == {"method": "lookup", "params": {"k": 1}}
                assert answer == {"fromHttp": {"method": "lookup", "params": {"k": 1}}}
            finally:
                device.close()
    finally:
        await port.stopListening()


# --- (d) see tests/integration/test_thingsboard_clients.py (tb-rest-client imports a chain and sets it as root) -------

# --- (e) a script that loops forever stalls nothing else --------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_script_that_loops_forever_fails_alone_and_other_devices_are_answered_meanwhile(tmp_path):
    spin = transform("spin", "if (msg.method == 'spin') { while (true) {} }\n"
                             "return {msg: {ok: true}, metadata: metadata, msgType: msgType};")
    failed = transform("report failure", "return {msg: {failed: true}, metadata: metadata, msgType: msgType};")
    type_filter = {"type": "org.thingsboard.rule.engine.filter.TbMsgTypeFilterNode", "name": "commands only",
                   "configuration": {"messageTypes": ["RPC_CALL_FROM_SERVER_TO_DEVICE"]}}
    export = chain("spin", [SWITCH, spin, RPC_REPLY, failed, type_filter, RPC_REQUEST],
                   [(0, 1, "RPC Request from Device"), (1, 2, "Success"), (1, 3, "Failure"), (3, 2, "Success"),
                    (0, 4, "RPC Request to Device"), (4, 5, "True")])
    async with server_running(tmp_path) as server:
        await make_root(server, export)
        rules = server.service.rules
        assert not rules.routes_of(server.service.demo.devices[0][0].tenant_id).direct_rpc  # through the engine
        _, spinner_token = await server.demo_device()
        worker_id, worker_token = await new_device(server, "Worker")
        spinner = await CallingDevice.connect(server, spinner_token)
        worker = await connect_raw(server.mqtt_port, worker_token)
        try:
            spins = [spinner.send("spin", {}) for _ in range(3)]  # more loops than the runner has threads
            rest = defer.ensureDeferred(server.call("POST", f"/api/rpc/twoway/{worker_id}",
                                                    body={"method": "work", "params": {"n": 1}, "timeout": 5000}))
            request_id, command, _ = await worker.next_command()
            assert command == {"method": "work", "params": {"n": 1}}
            worker.answer(request_id, {"done": 1})
            status, answer = await with_timeout(rest)
            assert (status, answer) == (200, {"done": 1})
            assert rules.scripts.pending > 0  # the loops were still running meanwhile
            for request_id in spins:
                assert await spinner.answer_to(request_id) == {"failed": True}
            assert await spinner.call("other", {}) == {"ok": True}  # the runner is healthy again
        finally:
            spinner.close()
            worker.close()


# --- (f) RPC_* messages of persistent commands ------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_every_status_change_of_a_persistent_command_reaches_the_root_chain(tmp_path):
    hook, port, base = await endpoint()
    try:
        statuses = ["RPC Queued", "RPC Sent", "RPC Delivered", "RPC Successful"]
        export = chain("rpc events", [SWITCH, rest_call("report", base + "/rpc-event"), RPC_REQUEST],
                       [(0, 1, label) for label in statuses] + [(0, 2, "RPC Request to Device")])
        async with server_running(tmp_path) as server:
            await make_root(server, export)
            device_id, token = await server.demo_device()
            device = await connect_raw(server.mqtt_port, token)
            try:
                status, body = await server.call("POST", f"/api/rpc/twoway/{device_id}", body={
                    "method": "setGpio", "params": {"pin": 7}, "persistent": True, "timeout": 60000})
                assert status == 200, body
                rpc_id = body["rpcId"]
                request_id, command, _ = await device.next_command()
                device.answer(request_id, {"pin": 7, "value": 1})
                seen: dict[str, Any] = {}
                # Each status is its own REST call from the chain, so two of them may reach the hook in either
                # order (DELIVERED and SUCCESSFUL come in one turn when the PUBACK and the answer are read together):
                # wait for all three (a missing one fails by timeout).
                while not {"QUEUED", "DELIVERED", "SUCCESSFUL"} <= set(seen):
                    path, event = await with_timeout(hook.received.get())
                    assert path == "/rpc-event" and event["id"] == {"entityType": "RPC", "id": rpc_id}
                    seen[event["status"]] = event
                assert seen["SUCCESSFUL"]["response"] == {"pin": 7, "value": 1}
                assert seen["QUEUED"]["request"]["body"] == {"method": "setGpio", "params": '{"pin":7}'}
                assert seen["QUEUED"]["deviceId"] == {"entityType": "DEVICE", "id": device_id}
            finally:
                device.close()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_rpc_messages_are_not_even_made_when_the_root_chain_drops_them(tmp_path):
    async with server_running(tmp_path) as server:
        rules = server.service.rules
        assert rules._unsubscribe is None  # the default chain has no RPC_* route: no event listener at all
        device_id, token = await server.demo_device()
        device = await connect_raw(server.mqtt_port, token)
        try:
            before = rules.processed
            status, body = await server.call("POST", f"/api/rpc/twoway/{device_id}", body={
                "method": "m", "params": {}, "persistent": True, "timeout": 60000})
            assert status == 200, body
            request_id, _, _ = await device.next_command()
            device.answer(request_id, {"ok": True})
            status, answer = await server.call("POST", f"/api/rpc/twoway/{device_id}",
                                               body={"method": "m2", "params": {}})
            request_id, _, _ = await device.next_command()
            device.answer(request_id, {"ok": 2})
            assert rules.processed == before  # the default chain's commands skip the engine
        finally:
            device.close()


# --- REST commands through the root chain -----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_chain_that_drops_a_command_answers_the_caller_with_an_error_not_a_timeout(tmp_path):
    log_node = {"type": "org.thingsboard.rule.engine.action.TbLogNode", "name": "log",
                "configuration": {"jsScript": "return 'dropped';"}}
    async with server_running(tmp_path) as server:
        device_id, _ = await server.demo_device()
        await make_root(server, chain("no route", [SWITCH, log_node], [(0, 1, "RPC Request from Device")]))
        started = time.monotonic()
        status, error = await server.call("POST", f"/api/rpc/twoway/{device_id}", body={"method": "m",
                                                                                         "timeout": 30000})
        assert (status, error["rpcError"]) == (500, "NOT_SENT_BY_RULE_CHAIN"), error
        await make_root(server, chain("log it", [SWITCH, log_node], [(0, 1, "RPC Request to Device")]))
        status, error = await server.call("POST", f"/api/rpc/twoway/{device_id}", body={"method": "m",
                                                                                         "timeout": 30000})
        assert (status, error["rpcError"]) == (500, "NOT_SENT_BY_RULE_CHAIN"), error
        assert time.monotonic() - started < 10


@pytest_twisted.ensureDeferred
async def test_a_command_through_a_transformation_reaches_the_device_changed_and_the_caller_gets_its_answer(
        tmp_path):
    export = chain("rename", [SWITCH, transform("rename", "msg.method = 'renamed_' + msg.method;\n"
                                                          "return {msg: msg, metadata: metadata, msgType: msgType};"),
                              RPC_REQUEST],
                   [(0, 1, "RPC Request to Device"), (1, 2, "Success")])
    async with server_running(tmp_path) as server:
        await make_root(server, export)
        device_id, token = await server.demo_device()
        device = await connect_raw(server.mqtt_port, token)
        try:
            rest = defer.ensureDeferred(server.call("POST", f"/api/rpc/twoway/{device_id}",
                                                    body={"method": "read", "params": {"a": [1, "x"]}}))
            request_id, command, _ = await device.next_command()
            assert command == {"method": "renamed_read", "params": {"a": [1, "x"]}}
            device.answer(request_id, {"value": 3})
            assert await with_timeout(rest) == (200, {"value": 3})
            # Persistent: the caller gets the rpcId it asked for, the stored command says a rule chain sent it.
            status, body = await server.call("POST", f"/api/rpc/oneway/{device_id}", body={
                "method": "write", "params": {}, "persistent": True,
                "requestUUID": "6f1c3f5e-8d1b-4a52-9c1e-2b8f3e6a9d41"})
            assert (status, body) == (200, {"rpcId": "6f1c3f5e-8d1b-4a52-9c1e-2b8f3e6a9d41"})
            request_id, command, _ = await device.next_command()
            assert command["method"] == "renamed_write"
            status, stored = await server.call("GET", f"/api/rpc/persistent/{body['rpcId']}")
            assert status == 200 and stored["initiator"]["type"] == "RULE_CHAIN"
            assert stored["createdBy"]["entityType"] == "USER"
        finally:
            device.close()
