"""The cluster codec on its own: what travels between nodes comes back as it left (messages, answers, errors,
envelopes), what must not travel is refused, and what cannot be read is a CodecError."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID, uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoiot.actors import messages as m
from nanoiot.actors.replies import ReplyTo
from nanoiot.cluster import codec
from nanoiot.errors import ErrorCode, NanoError, NotFound, ServiceUnavailable, TooManyRequests
from nanoiot.rpc.model import NonJsonResponse, RpcCommand, RpcFailure, RpcResult
from nanoiot.rpc.queue import Timer


def full_command(**changes: Any) -> RpcCommand:
    values: dict[str, Any] = dict(
        rpc_id=uuid4(), tenant_id=uuid4(), device_id=uuid4(), method="setGpio·ß",
        params={"pin": 7, "value": True, "label": "Küche ☕ 温度", "nested": [1, 2.5, None, {"k": "ü"}]},
        oneway=False, expiration_time=1_700_000_060_000, created_time=1_700_000_000_000, persistent=True,
        retries=3, additional_info={"note": "ümlaut", "list": []}, qos=1, user_id=uuid4())
    values.update(changes)
    return RpcCommand(**values)


def travel(message: Any) -> Any:
    """A message as a tell envelope, through text and back: what the receiving node gets."""
    text = codec.dumps({"t": "tell", "d": str(uuid4()), "m": codec.message_to_json(message), "hops": 0,
                        "from": "node-a"})
    assert isinstance(text, str)
    return codec.message_from_json(codec.loads(text)["m"])


def answer_travels(value: Any) -> Any:
    text = codec.dumps({"t": "reply", "r": 5, "v": codec.value_to_json(value), "from": "node-b"})
    return codec.value_from_json(codec.loads(text)["v"])


def error_travels(error: BaseException) -> BaseException:
    text = codec.dumps({"t": "reply", "r": 5, "e": codec.error_to_json(error), "from": "node-b"})
    return codec.error_from_json(codec.loads(text)["e"])


# --- messages -------------------------------------------------------------------------------------------------------

def test_a_submit_with_every_field_set_comes_back_equal() -> None:
    message = m.SubmitRpc(full_command(), ReplyTo("node-ä", 12345678901))
    back = travel(message)
    assert isinstance(back, m.SubmitRpc)
    assert back == message
    assert back.command.params["label"] == "Küche ☕ 温度"
    assert isinstance(back.command.rpc_id, UUID) and isinstance(back.command.user_id, UUID)


def test_a_submit_with_every_optional_field_none_comes_back_equal() -> None:
    command = full_command(params=None, retries=None, additional_info=None, qos=None, user_id=None, persistent=False,
                           oneway=True)
    message = m.SubmitRpc(command, None)
    back = travel(message)
    assert back == message
    assert back.command.user_id is None and back.command.qos is None and back.command.retries is None
    assert back.reply_to is None


@pytest.mark.parametrize("params", ["plain text", 0, -1.5, [], {}, ["ü", {"a": None}], {"": ""}, False])
def test_any_json_params_come_back_equal(params: Any) -> None:
    message = m.SubmitRpc(full_command(params=params), ReplyTo("b", 1))
    assert travel(message) == message


def test_a_delete_comes_back_equal() -> None:
    message = m.DeleteRpc(uuid4(), ReplyTo("node-c", 9))
    back = travel(message)
    assert isinstance(back, m.DeleteRpc) and back == message
    assert travel(m.DeleteRpc(uuid4(), None)).reply_to is None


def test_an_inspect_comes_back_with_its_reply_address() -> None:
    message = m.Inspect(ReplyTo("node-c", 3))
    back = travel(message)
    assert isinstance(back, m.Inspect) and back.reply_to == ReplyTo("node-c", 3)


def test_a_device_removed_comes_back() -> None:
    assert isinstance(travel(m.DeviceRemoved()), m.DeviceRemoved)


class _Session:
    session_id = 1
    transport = "fake"


@pytest.mark.parametrize("message", [
    m.AttachSession(_Session()),  # type: ignore[arg-type]
    m.DetachSession(1),
    m.SubscribeCommands(1),
    m.CommandAcked(1, 2),
    m.CommandAnswered(1, 2, b"{}"),
    m.DeviceCall(1, 2, b"{}"),
    m.Released("b"),
    m.TimerFired(Timer.ACK, 1),
    m.Passivate(1),
    m.RestoreRpcs([]),
    m.SendNow(1, 2),
    "not a message",
])
def test_a_message_that_cannot_travel_is_a_codec_error(message: Any) -> None:
    with pytest.raises(codec.CodecError):
        codec.message_to_json(message)


@pytest.mark.parametrize("data", [{}, {"k": "attach"}, {"k": None}, {"k": "SUBMIT"}])
def test_an_unknown_message_kind_is_a_codec_error(data: dict[str, Any]) -> None:
    with pytest.raises(codec.CodecError):
        codec.message_from_json(data)


# --- answers --------------------------------------------------------------------------------------------------------

def test_an_ok_result_with_a_json_answer_comes_back_equal() -> None:
    result = RpcResult(response={"temp": 21.5, "unit": "°C", "ok": [True, None]}, has_response=True)
    back = answer_travels(result)
    assert back == result and back.ok


def test_a_json_string_answer_stays_a_plain_string() -> None:
    back = answer_travels(RpcResult(response="just text", has_response=True))
    assert back.response == "just text" and not isinstance(back.response, NonJsonResponse)


def test_a_non_json_answer_comes_back_as_non_json() -> None:
    back = answer_travels(RpcResult(response=NonJsonResponse("not {json ü"), has_response=True))
    assert isinstance(back, RpcResult)
    assert isinstance(back.response, NonJsonResponse) and back.response == "not {json ü"
    assert back.has_response and back.failure is None


@pytest.mark.parametrize("failure", list(RpcFailure))
def test_each_failure_comes_back(failure: RpcFailure) -> None:
    result = RpcResult(failure=failure)
    back = answer_travels(result)
    assert back == result and back.failure is failure


def test_a_rejection_keeps_the_limit_it_names() -> None:
    result = RpcResult(failure=RpcFailure.REJECTED, response={"limit": "rpc-max-pending", "value": 1})
    assert answer_travels(result) == result


def test_the_persisted_answer_comes_back() -> None:
    result = RpcResult(response={"rpcId": str(uuid4())}, has_response=True)
    assert answer_travels(result) == result


@pytest.mark.parametrize("value", [True, False, None, 0, "text", {"sessions": [1, 2], "pending": []}, [1, "ü"]])
def test_plain_answers_come_back(value: Any) -> None:
    back = answer_travels(value)
    assert back == value and type(back) is type(value)


@pytest.mark.parametrize("data", [None, True, 1, "x", [], {}, {"$other": 1}])
def test_an_untagged_answer_is_a_codec_error(data: Any) -> None:
    with pytest.raises(codec.CodecError):
        codec.value_from_json(data)


# --- errors ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("error", [
    NotFound("Device with requested id wasn't found!", entity="device", ids=["a", "ü"]),
    TooManyRequests(),
    ServiceUnavailable("Node b did not answer in time"),
    NanoError("plain"),
])
def test_a_nano_error_keeps_status_code_message_and_details(error: NanoError) -> None:
    back = error_travels(error)
    assert isinstance(back, NanoError)
    assert back.http_status == error.http_status
    assert back.error_code is error.error_code
    assert back.message == error.message
    assert back.details == error.details
    assert back.to_json(0) == error.to_json(0)  # renders at the caller's edge as it would have here


def test_any_other_error_becomes_a_500_without_its_text() -> None:
    error = RuntimeError("password=hunter2 at db.internal:5432")
    data = codec.error_to_json(error)
    assert "hunter2" not in codec.dumps(data) and "db.internal" not in codec.dumps(data)
    back = error_travels(error)
    assert isinstance(back, NanoError)
    assert back.http_status == 500 and back.error_code is ErrorCode.GENERAL
    assert "hunter2" not in back.message and back.details == {}


def test_an_unknown_error_code_becomes_general() -> None:
    back = codec.error_from_json({"status": 418, "code": 99999, "message": "teapot", "details": {}})
    assert back.http_status == 418 and back.error_code is ErrorCode.GENERAL and back.message == "teapot"


# --- envelopes ------------------------------------------------------------------------------------------------------

def test_an_envelope_round_trips_with_unicode_kept_as_text() -> None:
    envelope = {"t": "claimed", "from": "nöde-1", "b": 1, "d": [[str(uuid4()), 3], [str(uuid4()), 1]]}
    text = codec.dumps(envelope)
    assert "nöde-1" in text and "\\u" not in text  # compact and not escaped: NOTIFY payloads are bounded
    assert " " not in text
    assert codec.loads(text) == envelope


@pytest.mark.parametrize("text", [
    "", "nope", "{", "[]", "42", "null", '"t"', '{"x": 1}', '{"t": 5}', '{"t": null}', "[" * 100_000,
    "{" * 100_000, '{"t": "tell", "d": ' + "1" * 5000 + "}", b"\xff\xfe\xfd", "\ud800",
])
def test_garbage_is_a_codec_error(text: Any) -> None:
    with pytest.raises(codec.CodecError):
        codec.loads(text)


# --- properties -----------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)

commands = st.builds(
    RpcCommand,
    rpc_id=st.uuids(), tenant_id=st.uuids(), device_id=st.uuids(), method=st.text(), params=json_values,
    oneway=st.booleans(), expiration_time=st.integers(min_value=0, max_value=2**63 - 1),
    created_time=st.integers(min_value=0, max_value=2**63 - 1), persistent=st.booleans(),
    retries=st.none() | st.integers(min_value=0, max_value=1000), additional_info=json_values,
    qos=st.none() | st.integers(min_value=0, max_value=2), user_id=st.none() | st.uuids(),
)

reply_addresses = st.none() | st.builds(ReplyTo, st.text(min_size=1), st.integers(min_value=1, max_value=2**62))


@settings(max_examples=300, deadline=None)
@given(command=commands, reply_to=reply_addresses)
def test_any_command_round_trips(command: RpcCommand, reply_to: ReplyTo | None) -> None:
    message = m.SubmitRpc(command, reply_to)
    back = travel(message)
    assert back == message
    # and once more: a command passed on again (a stale cache) is still the same command
    assert travel(back) == message


@settings(max_examples=200, deadline=None)
@given(response=json_values, failure=st.none() | st.sampled_from(list(RpcFailure)), has_response=st.booleans(),
       text=st.booleans())
def test_any_result_round_trips(response: Any, failure: RpcFailure | None, has_response: bool, text: bool) -> None:
    if text:
        response = NonJsonResponse(json.dumps(response))
    result = RpcResult(response=response, failure=failure, has_response=has_response)
    back = answer_travels(result)
    assert back == result
    assert isinstance(back.response, NonJsonResponse) == text
