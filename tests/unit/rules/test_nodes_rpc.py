"""RPC Call Request and RPC Call Reply: what they read from the message, what they ask the context, and the
messages they emit (ThingsBoard's TbSendRPCRequestNode / TbSendRPCReplyNode)."""

from __future__ import annotations

import json
from uuid import UUID

import pytest
from twisted.internet.defer import fail

from nanoiot.errors import InvalidArguments, NotFound, PermissionDenied
from nanoiot.rpc.model import NonJsonResponse, RpcFailure, RpcResult
from nanoiot.rules.message import EntityId
from nanoiot.rules.nodes.rpc import (
    OUTCOME_GRACE_S,
    RPC_ERRORS,
    RpcCallError,
    RpcReplyNode,
    RpcRequestNode,
    parse_rpc_call,
)
from tests.unit.rules.fakes import ASSET, CHAIN, DEVICE, NODE, T0, FakeContext, build, message, relations, result_of

NOW = int(T0 * 1000)
REQUEST_UUID = UUID("7d1e2b3c-0000-4000-8000-000000000001")


def rest_message(**metadata: str) -> object:
    """An RPC_CALL_FROM_SERVER_TO_DEVICE as the REST API makes it (params as JSON text)."""
    md = {"requestUUID": str(REQUEST_UUID), "originServiceId": "node-1", "expirationTime": str(NOW + 10_000),
          "oneway": "false", "persistent": "false", "deviceName": "pump-1", "deviceType": "default"}
    md.update(metadata)
    return message("RPC_CALL_FROM_SERVER_TO_DEVICE",
                   data={"method": "setGpio", "params": '{"pin":7,"value":1}', "additionalInfo": None},
                   metadata=md, origin="reply-address", customer_id=UUID(int=5))


# --- reading the command ---------------------------------------------------------------------------------------------


def test_rest_message_makes_the_command_it_describes() -> None:
    call = parse_rpc_call(rest_message(), NOW, 60)
    assert call.device_id == DEVICE.id and call.method == "setGpio"
    assert call.params == {"pin": 7, "value": 1}  # the JSON text in params is the JSON value
    assert (call.oneway, call.persistent, call.retries) == (False, False, None)
    assert call.expiration_time == NOW + 10_000 and call.request_uuid == REQUEST_UUID
    assert call.additional_info is None and call.request_id is None


def test_metadata_flags_and_retries_are_read_as_thingsboard_does() -> None:
    msg = message(data={"method": "m", "params": {"a": 1}, "requestId": 42, "additionalInfo": '{"k":"v"}'},
                  metadata={"oneway": "TRUE", "persistent": "true", "retries": "3"})
    call = parse_rpc_call(msg, NOW, 60)
    assert (call.oneway, call.persistent, call.retries, call.request_id) == (True, True, 3, 42)
    assert call.params == {"a": 1} and call.additional_info == {"k": "v"}


def test_without_expiration_time_the_node_timeout_sets_it_and_without_uuid_the_service_picks_one() -> None:
    call = parse_rpc_call(message(data={"method": "m", "params": None}), NOW, 60)
    assert call.expiration_time == NOW + 60_000 and call.request_uuid is None and call.params is None


def test_params_that_are_a_plain_string_stay_a_string() -> None:
    assert parse_rpc_call(message(data={"method": "m", "params": "on"}), NOW, 60).params == "on"


@pytest.mark.parametrize(("msg", "error"), [
    (message(originator=ASSET, data={"method": "m", "params": {}}), "Message originator is not a device entity!"),
    (message(data={"params": {}}), "Method is not present in the message!"),
    (message(data={"method": "m"}), "Params are not present in the message!"),
    (message(data="[1,2]"), "Message data is not a JSON object!"),
    (message(data={"method": "m", "params": {}}, metadata={"expirationTime": "soon"}), "Invalid metadata"),
    (message(data={"method": "m", "params": {}}, metadata={"requestUUID": "not-a-uuid"}), "Invalid metadata"),
    (message(data={"method": "m", "params": {}, "requestId": "x"}), "requestId is not a number"),
])
def test_a_message_that_makes_no_command_is_refused_with_thingsboards_words(msg: object, error: str) -> None:
    with pytest.raises(RpcCallError, match=error):
        parse_rpc_call(msg, NOW, 60)


# --- the node --------------------------------------------------------------------------------------------------------


def test_request_node_sends_through_the_context_with_its_chain_and_node_ids(ctx: FakeContext) -> None:
    node = build(RpcRequestNode, {"timeoutInSeconds": 60})
    d = node.on_message(rest_message(), ctx)
    [sent] = ctx.rpcs
    assert (sent.device_id, sent.method, sent.params) == (DEVICE.id, "setGpio", {"pin": 7, "value": 1})
    assert (sent.rule_chain_id, sent.rule_node_id, sent.request_uuid) == (CHAIN, NODE, REQUEST_UUID)
    assert sent.msg.origin == "reply-address"
    assert not d.called


def test_success_is_a_new_message_with_the_answer_and_everything_else_kept(ctx: FakeContext) -> None:
    msg = rest_message()
    d = build(RpcRequestNode).on_message(msg, ctx)
    ctx.clock.advance(2)
    ctx.rpcs[0].answer.callback(RpcResult(response={"ok": True}, has_response=True))
    [(relation, out)] = result_of(d)
    assert relation == "Success" and out.data == '{"ok":true}'
    assert out.id != msg.id and out.ts == NOW + 2000
    assert (out.type, out.originator, out.customer_id, out.metadata, out.origin) == \
        (msg.type, msg.originator, msg.customer_id, msg.metadata, "reply-address")


@pytest.mark.parametrize(("result", "data"), [
    (RpcResult(), "{}"),  # one-way: no answer
    (RpcResult(response=None, has_response=True), "{}"),
    (RpcResult(response={"rpcId": "abc"}, has_response=True), '{"rpcId":"abc"}'),  # persistent: stored
    (RpcResult(response=NonJsonResponse("plain text"), has_response=True), "plain text"),
    (RpcResult(response="a string", has_response=True), '"a string"'),
])
def test_success_data_is_the_answer_as_text_or_an_empty_object(ctx: FakeContext, result: RpcResult,
                                                                data: str) -> None:
    d = build(RpcRequestNode).on_message(rest_message(), ctx)
    ctx.rpcs[0].answer.callback(result)
    assert result_of(d)[0][1].data == data


@pytest.mark.parametrize(("failure", "name"), [
    (RpcFailure.DEVICE_OFFLINE, "NO_ACTIVE_CONNECTION"),
    (RpcFailure.NOT_DELIVERED, "TIMEOUT"),
    (RpcFailure.NO_RESPONSE, "TIMEOUT"),
    (RpcFailure.DELETED, "INTERNAL"),
    (RpcFailure.REJECTED, "INTERNAL"),
])
def test_failure_is_a_new_message_with_thingsboards_rpc_error(ctx: FakeContext, failure: RpcFailure,
                                                              name: str) -> None:
    msg = rest_message()
    d = build(RpcRequestNode).on_message(msg, ctx)
    ctx.rpcs[0].answer.callback(RpcResult(failure=failure))
    [(relation, out)] = result_of(d)
    assert relation == "Failure" and json.loads(out.data) == {"error": name}
    assert out.error.startswith(name) and failure.value in out.error
    assert out.id != msg.id and out.metadata == msg.metadata and out.origin == "reply-address"


def test_every_rpc_failure_has_a_thingsboard_name() -> None:
    assert set(RPC_ERRORS) == set(RpcFailure)


@pytest.mark.parametrize(("error", "name"), [
    (NotFound("Device with requested id wasn't found!"), "NOT_FOUND"),
    (PermissionDenied(), "FORBIDDEN"),
    (InvalidArguments("bad"), "INTERNAL"),
    (RuntimeError("boom"), "INTERNAL"),
])
def test_a_command_refused_before_sending_is_a_failure_outcome(ctx: FakeContext, error: Exception,
                                                               name: str) -> None:
    ctx.send_rpc = lambda *a: fail(error)  # type: ignore[method-assign]
    [(relation, out)] = result_of(build(RpcRequestNode).on_message(rest_message(), ctx))
    assert relation == "Failure" and json.loads(out.data) == {"error": name}


def test_a_context_that_raises_instead_of_failing_is_an_internal_outcome(ctx: FakeContext) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("no command service")

    ctx.send_rpc = broken  # type: ignore[method-assign,assignment]
    [(relation, out)] = result_of(build(RpcRequestNode).on_message(rest_message(), ctx))
    assert relation == "Failure" and json.loads(out.data) == {"error": "INTERNAL"}
    assert "no command service" in out.error


def test_an_outcome_that_never_comes_is_a_timeout_after_expiration_and_grace(ctx: FakeContext) -> None:
    d = build(RpcRequestNode).on_message(rest_message(expirationTime=str(NOW + 10_000)), ctx)
    ctx.clock.advance(10 + OUTCOME_GRACE_S - 0.01)
    assert not d.called
    ctx.clock.advance(0.02)
    [(relation, out)] = result_of(d)
    assert relation == "Failure" and json.loads(out.data) == {"error": "TIMEOUT"}
    assert ctx.clock.getDelayedCalls() == []


def test_an_answered_command_leaves_no_timer_behind(ctx: FakeContext) -> None:
    d = build(RpcRequestNode).on_message(rest_message(), ctx)
    ctx.rpcs[0].answer.callback(RpcResult())
    result_of(d)
    assert ctx.clock.getDelayedCalls() == []


def test_invalid_input_goes_down_failure_unchanged_without_sending(ctx: FakeContext) -> None:
    msg = message(data={"method": "m"})
    [(relation, out)] = result_of(build(RpcRequestNode).on_message(msg, ctx))
    assert relation == "Failure" and out.data == msg.data and out.error == "Params are not present in the message!"
    assert ctx.rpcs == []


def test_request_node_has_no_engine_deadline_because_it_guards_itself() -> None:
    assert build(RpcRequestNode).deadline(rest_message(), NOW, 10.0) is None


# --- RPC Call Reply ---------------------------------------------------------------------------------------------------


def device_call(**metadata: str) -> object:
    md = {"requestId": "5", "sessionId": "mqtt-17", "serviceId": "node-1", "deviceName": "pump-1"}
    md.update(metadata)
    return message("TO_SERVER_RPC_REQUEST", data={"method": "getTime", "params": {}}, metadata=md)


def test_reply_sends_the_data_verbatim_to_the_calls_session(ctx: FakeContext) -> None:
    msg = device_call().with_(data='{"time": 1}')
    assert result_of(build(RpcReplyNode).on_message(msg, ctx)) == [("Success", msg)]
    assert ctx.replies == [(DEVICE.id, 5, "mqtt-17", '{"time": 1}')]


def test_reply_reads_the_metadata_keys_it_is_configured_with(ctx: FakeContext) -> None:
    node = build(RpcReplyNode, {"requestIdMetaDataAttribute": "rid", "sessionIdMetaDataAttribute": "",
                                "serviceIdMetaDataAttribute": None})
    result_of(node.on_message(device_call(rid="9"), ctx))
    assert ctx.replies[0][1] == 9


@pytest.mark.parametrize(("msg", "error"), [
    (device_call().with_(originator=EntityId("ASSET", DEVICE.id)), "Message originator is not a device entity!"),
    (device_call(requestId=""), "Request id is not present in the metadata!"),
    (device_call(serviceId=""), "Service id is not present in the metadata!"),
    (device_call(sessionId=""), "Session id is not present in the metadata!"),
    (device_call().with_(data=""), "Request body is empty!"),
    (device_call(requestId="five"), "Request id is not a number"),
])
def test_reply_without_what_it_needs_goes_down_failure(ctx: FakeContext, msg: object, error: str) -> None:
    [(relation, out)] = result_of(build(RpcReplyNode).on_message(msg, ctx))
    assert relation == "Failure" and error in out.error
    assert ctx.replies == []


def test_reply_to_a_closed_session_goes_down_failure(ctx: FakeContext) -> None:
    ctx.sessions_open = False
    assert relations(result_of(build(RpcReplyNode).on_message(device_call(), ctx))) == ["Failure"]
