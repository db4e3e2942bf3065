"""How a command's outcome reads at the edges: ``failure_error`` (status codes and the JSON body) and ``answer_of``."""

from __future__ import annotations

from uuid import uuid4

import pytest

from nanoiot.commands.outcomes import NO_ANSWER, CommandFailed, NonJsonAnswer, answer_of, device_error_text, \
    failure_error
from nanoiot.errors import ErrorCode, TooManyRequests
from nanoiot.rpc.model import NonJsonResponse, RpcFailure, RpcResult

RPC_ID = uuid4()
TS = 1_700_000_000_123
NOT_REJECTED = [f for f in RpcFailure if f is not RpcFailure.REJECTED]


@pytest.mark.parametrize("failure", NOT_REJECTED)
def test_v2_answers_504_for_every_failure_but_a_rejection(failure):
    error = failure_error(RpcResult(failure=failure), RPC_ID)
    assert isinstance(error, CommandFailed) and error.http_status == 504
    assert error.failure is failure


@pytest.mark.parametrize("failure, status", [
    (RpcFailure.DEVICE_OFFLINE, 409),
    (RpcFailure.NOT_DELIVERED, 408),
    (RpcFailure.NO_RESPONSE, 408),
    (RpcFailure.DELETED, 408),
])
def test_v1_answers_409_when_the_device_was_offline_and_408_otherwise(failure, status):
    error = failure_error(RpcResult(failure=failure), RPC_ID, v1=True)
    assert error.http_status == status


@pytest.mark.parametrize("v1", [False, True])
@pytest.mark.parametrize("failure", NOT_REJECTED)
def test_a_failure_body_says_which_failure_and_which_command(failure, v1):
    error = failure_error(RpcResult(failure=failure), RPC_ID, v1=v1)
    body = error.to_json(TS)
    assert body == {
        "status": error.http_status,
        "message": failure.description,
        "errorCode": int(ErrorCode.GENERAL),
        "timestamp": TS,
        "rpcError": failure.value,
        "rpcId": str(RPC_ID),
    }


@pytest.mark.parametrize("v1", [False, True])
def test_a_rejection_is_429_naming_the_limit_and_its_value(v1):
    result = RpcResult(failure=RpcFailure.REJECTED, response={"limit": "rpc-max-pending", "value": 1000})
    error = failure_error(result, RPC_ID, v1=v1)
    assert isinstance(error, TooManyRequests) and error.http_status == 429
    body = error.to_json(TS)
    assert body["status"] == 429 and body["errorCode"] == int(ErrorCode.TOO_MANY_REQUESTS)
    assert (body["rpcError"], body["limit"], body["value"]) == ("REJECTED", "rpc-max-pending", 1000)
    assert "1000" in body["message"] and body["timestamp"] == TS


def test_a_rejection_without_details_still_renders():
    body = failure_error(RpcResult(failure=RpcFailure.REJECTED), RPC_ID).to_json(TS)
    assert body["status"] == 429 and body["rpcError"] == "REJECTED"
    assert body["limit"] is None and body["value"] is None


def test_failure_error_is_only_for_failures():
    with pytest.raises(AssertionError):
        failure_error(RpcResult(response=1, has_response=True), RPC_ID)


# --- answer_of -----------------------------------------------------------------------------------------------------


def test_a_two_way_answer_is_the_devices_json():
    assert answer_of(RpcResult(response={"t": 21.5}, has_response=True), oneway=False) == {"t": 21.5}
    assert answer_of(RpcResult(response=[1, 2], has_response=True), oneway=False) == [1, 2]


@pytest.mark.parametrize("value", [0, False, "", [], {}])
def test_a_falsy_json_answer_is_still_an_answer(value):
    assert answer_of(RpcResult(response=value, has_response=True), oneway=False) == value


@pytest.mark.parametrize("result, oneway", [
    (RpcResult(), True),
    (RpcResult(response={"t": 1}, has_response=True), True),  # one-way: whatever came back is not the answer
    (RpcResult(), False),  # finished without a response
    (RpcResult(response=None, has_response=True), False),
    (RpcResult(response={"x": 1}, has_response=False), False),
    (RpcResult(response=NonJsonResponse(""), has_response=True), False),  # an empty answer is no answer
])
def test_no_answer(result, oneway):
    assert answer_of(result, oneway) is NO_ANSWER


def test_a_text_answer_is_a_406_that_carries_the_text():
    with pytest.raises(NonJsonAnswer) as raised:
        answer_of(RpcResult(response=NonJsonResponse("OK, done"), has_response=True), oneway=False)
    error = raised.value
    assert error.http_status == 406 and error.error_code is ErrorCode.BAD_REQUEST_PARAMS
    body = error.to_json(TS)
    assert (body["status"], body["rpcError"], body["response"]) == (406, "NON_JSON_RESPONSE", "OK, done")


def test_a_text_answer_to_a_one_way_command_is_no_answer_not_an_error():
    assert answer_of(RpcResult(response=NonJsonResponse("OK"), has_response=True), oneway=True) is NO_ANSWER


def test_a_device_reads_a_failure_as_its_name_and_description():
    text = device_error_text(RpcResult(failure=RpcFailure.NO_RESPONSE))
    assert text == f"NO_RESPONSE: {RpcFailure.NO_RESPONSE.description}"
