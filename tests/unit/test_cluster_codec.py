"""The cluster codec on its own: what travels between nodes comes back as it left (messages, answers, errors,
envelopes), what must not travel is refused, and what cannot be read is a CodecError."""

from __future__ import annotations

import dataclasses
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


# --- direct link frames (LINK_FORMAT 2) -----------------------------------------------------------------------------

def link_travel(envelope: dict[str, Any]) -> dict[str, Any]:
    """An envelope through a direct link's frame and back: what the receiving node gets."""
    frame = codec.encode_frame(envelope)
    assert isinstance(frame, bytes)
    return codec.decode_frame(frame, {})


def test_a_routed_submit_takes_a_compact_frame_and_comes_back_equal() -> None:
    message = m.SubmitRpc(full_command(initiator={"type": "USER", "id": str(uuid4())}, batch_id=uuid4()),
                          ReplyTo("node-ä", 12345678901))
    envelope = {"t": "tell", "d": message.command.device_id, "m": message, "hops": 2}
    frame = codec.encode_frame(envelope)
    assert frame.startswith(b'["S",') and b'"tenant"' not in frame  # positional, no keys
    assert str(message.command.device_id).encode() not in frame  # ids as hex, the device once
    back = codec.decode_frame(frame, {})
    assert back == {"t": "tell", "d": message.command.device_id, "m": message, "hops": 2}
    assert isinstance(back["m"].command.tenant_id, UUID) and isinstance(back["d"], UUID)


def test_a_compact_submit_keeps_a_command_device_other_than_the_tell_s_and_optional_nones() -> None:
    command = full_command(params=None, retries=None, additional_info=None, qos=None, user_id=None, oneway=True,
                           persistent=False)
    other = uuid4()
    back = link_travel({"t": "tell", "d": other, "m": m.SubmitRpc(command, None), "hops": 0})
    assert back["d"] == other and back["m"] == m.SubmitRpc(command, None)


def test_the_reader_s_id_cache_shares_ids_and_stays_bounded() -> None:
    uuids: dict[str, UUID] = {}
    command = full_command()
    for _ in range(2):
        back = codec.decode_frame(codec.encode_frame(
            {"t": "tell", "d": command.device_id, "m": m.SubmitRpc(command, None), "hops": 0}), uuids)
        assert back["m"].command == command
    assert set(uuids) == {command.tenant_id.hex, command.device_id.hex, command.user_id.hex}  # not the rpc id
    for _ in range(codec.UUID_CACHE_SIZE):
        fresh = full_command()
        codec.decode_frame(codec.encode_frame({"t": "tell", "d": fresh.device_id, "m": m.SubmitRpc(fresh, None)}),
                           uuids)
    assert len(uuids) <= codec.UUID_CACHE_SIZE


@pytest.mark.parametrize("envelope", [
    {"t": "tell", "d": uuid4(), "m": m.DeleteRpc(UUID(int=5), ReplyTo("b", 9)), "hops": 1},
    {"t": "tell", "d": uuid4(), "m": m.Inspect(ReplyTo("b", 3)), "hops": 0},
    {"t": "tell", "d": uuid4(), "m": m.DeviceRemoved(), "hops": 0},
    {"t": "tell", "d": uuid4(), "m": m.ReplyToDevice(4, 17, b'{"ok":1}'), "hops": 0},
    {"t": "reply", "r": 5, "v": codec.value_to_json(RpcResult(response={"a": 1}, has_response=True))},
    {"t": "reply", "r": 5, "e": codec.error_to_json(NotFound("gone"))},
    {"t": "claimed", "d": [[str(uuid4()), 3]]},
    {"t": "tell", "x": 1},
])
def test_every_other_envelope_takes_its_object_form_on_a_link(envelope: dict[str, Any]) -> None:
    frame = codec.encode_frame(envelope)
    assert frame.startswith(b"{")
    back = codec.decode_frame(frame)
    assert back == codec.loads(codec.dumps(envelope))  # what the bus carries, read the same way
    if envelope["t"] == "tell" and "m" in envelope:
        assert codec.incoming_message(back["m"]) == envelope["m"]
        assert codec.incoming_device(back["d"]) == envelope["d"]


def test_an_envelope_holding_objects_is_written_for_the_bus_as_before() -> None:
    """Nodes of the previous version read the bus: a tell holding its message and device id is the same text as
    one holding their JSON."""
    message = m.SubmitRpc(full_command(), ReplyTo("b", 1))
    device_id = message.command.device_id
    with_objects = codec.dumps({"t": "tell", "d": device_id, "m": message, "hops": 0})
    as_json = codec.dumps({"t": "tell", "d": str(device_id), "m": codec.message_to_json(message), "hops": 0})
    assert with_objects == as_json
    for not_json in (m.DetachSession(1), object()):  # the port sends only what outgoing_message let through
        with pytest.raises(TypeError):
            codec.dumps({"t": "tell", "m": not_json})


def test_outgoing_and_incoming_messages() -> None:
    message = m.DeleteRpc(uuid4(), None)
    assert codec.outgoing_message(message) is message
    assert codec.incoming_message(message) is message
    assert codec.incoming_message(codec.message_to_json(message)) == message
    with pytest.raises(codec.CodecError):
        codec.outgoing_message(m.DetachSession(1))
    for bad in ("garbage", None, 5, ["x"]):
        with pytest.raises(codec.CodecError):
            codec.incoming_message(bad)
    for bad_id in ("not-a-uuid", None, 5, True, ["x"]):
        with pytest.raises(codec.CodecError):
            codec.incoming_device(bad_id)


def _compact(**changes: Any) -> list[Any]:
    command = full_command()
    data = codec._tell_submit(command.device_id, 0, m.SubmitRpc(command, ReplyTo("b", 3)))
    fields = ["tag", "hops", "device", "id", "tenant", "command_device", "method", "params", "oneway", "expires",
              "created", "persistent", "retries", "info", "qos", "user", "by", "batch", "node", "correlation"]
    for name, value in changes.items():
        data[fields.index(name)] = value
    return data


@pytest.mark.parametrize("data", [
    [], ["S"], ["X", *_compact()[1:]], _compact() + [1], _compact()[:-1], [1, 2, 3],
    _compact(tag=None), _compact(hops="0"), _compact(hops=1.5), _compact(hops=True), _compact(device="zz"),
    _compact(device=None), _compact(device=12), _compact(id="g" * 32), _compact(id=[]), _compact(tenant={}),
    _compact(command_device="x"), _compact(method=5), _compact(oneway=0), _compact(persistent=None),
    _compact(expires="1"), _compact(expires=1e300), _compact(created=None), _compact(retries="3"),
    _compact(qos=1.0), _compact(user=7), _compact(batch="nope"), _compact(node=5), _compact(correlation="9"),
    _compact(correlation=None), _compact(correlation=True),
])
def test_a_malformed_compact_frame_is_a_codec_error(data: list[Any]) -> None:
    frame = json.dumps(data).encode()
    with pytest.raises(codec.CodecError):
        codec.decode_frame(frame, {})


@pytest.mark.parametrize("frame", [
    b"", b"nope", b"{", b"42", b"null", b'"t"', b'{"x": 1}', b'{"t": 5}', b"[" * 100_000, b"\xff\xfe\xfd",
    b'["S"' + b",1" * 19 + b"]", b"[1e999]",
])
def test_a_garbage_frame_is_a_codec_error(frame: bytes) -> None:
    with pytest.raises(codec.CodecError):
        codec.decode_frame(frame, {})


@settings(max_examples=300, deadline=None)
@given(command=commands, reply_to=reply_addresses, hops=st.integers(min_value=0, max_value=3),
       same_device=st.booleans(), initiator=json_values, batch_id=st.none() | st.uuids())
def test_any_command_round_trips_through_a_compact_frame(command: RpcCommand, reply_to: ReplyTo | None, hops: int,
                                                         same_device: bool, initiator: Any,
                                                         batch_id: UUID | None) -> None:
    command = dataclasses.replace(command, initiator=initiator, batch_id=batch_id)
    device_id = command.device_id if same_device else uuid4()
    message = m.SubmitRpc(command, reply_to)
    back = link_travel({"t": "tell", "d": device_id, "m": message, "hops": hops})
    assert back == {"t": "tell", "d": device_id, "m": message, "hops": hops}


@settings(max_examples=300, deadline=None)
@given(data=st.lists(json_values, min_size=20, max_size=20) | st.lists(json_values, max_size=22))
def test_any_json_list_is_a_tell_or_a_codec_error(data: list[Any]) -> None:
    if data and len(data) == 20:
        data[0] = "S"
    try:
        back = codec.decode_frame(json.dumps(data).encode(), {})
    except codec.CodecError:
        return
    assert back["t"] == "tell" and isinstance(back["m"], m.SubmitRpc)


@pytest.mark.parametrize("changes", [dict(expiration_time=1.7e12), dict(qos=True), dict(retries=2.0),
                                     dict(oneway=1), dict(method=None)])
def test_a_command_the_compact_reader_would_refuse_travels_as_an_object(changes: dict[str, Any]) -> None:
    message = m.SubmitRpc(full_command(**changes), ReplyTo("b", 1))
    frame = codec.encode_frame({"t": "tell", "d": message.command.device_id, "m": message, "hops": 0})
    assert frame.startswith(b"{")
    back = codec.decode_frame(frame, {})
    assert codec.incoming_message(back["m"]) == message  # as the bus would have carried it
