"""The CoAP server in memory (fake datagram transport, ``task.Clock``, recording device links): observe, commands,
answers, calls, block-wise transfers, error answers and robustness."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from nanoiot.port.link import NO_LINK
from nanoiot.port.session import Delivery
from nanoiot.transports.coap import codec
from nanoiot.transports.coap import server as server_module
from nanoiot.transports.coap.blockwise import BLOCK_LIFETIME
from nanoiot.transports.coap.testing import DEVICE_ADDR, CoapHarness


@pytest.fixture
def harness():
    h = CoapHarness()
    yield h
    h.stop()


def command(harness, request_id=0, method="setGpio", params=None):
    return harness.session.send_command(request_id, method, params, 1)


def opts(message):
    return {option.number: option.value for option in message.options}


# --- registration ---------------------------------------------------------------------------------------------------


def test_an_observe_registration_is_answered_2_03_with_observe_and_attaches_an_exclusive_subscribed_session(harness):
    reply = harness.register(token=b"obs")
    assert (reply.type, reply.code, reply.token) == (codec.ACK, codec.VALID, b"obs")
    assert codec.observe_value(reply) is not None
    (attached,) = harness.attached
    assert attached.exclusive is True and attached.session.transport == "coap"
    assert attached.session.link is attached.link
    assert harness.reports == [(attached.session.session_id, ("subscribed", False))]


def test_a_command_arrives_as_a_confirmable_2_05_notification_and_its_ack_marks_it_delivered(harness):
    registration = harness.register()
    assert command(harness, 3, "setGpio", {"pin": 7}) is Delivery.AWAITING_ACK
    (note,) = harness.take()
    assert (note.type, note.code, note.token) == (codec.CON, codec.CONTENT, b"obs")
    assert json.loads(note.payload) == {"id": 3, "method": "setGpio", "params": {"pin": 7}}
    assert codec.observe_value(note) > codec.observe_value(registration)
    assert opts(note)[codec.CONTENT_FORMAT] == codec.JSON_FORMAT
    harness.ack(note)
    assert harness.link().of("acked") == [("acked", 3)]
    assert len(harness.reports) == 2  # subscribed, acked: nothing on any other session


def test_a_non_registration_gets_non_notifications_delivered_on_write(harness):
    reply = harness.register(mtype=codec.NON)
    assert (reply.type, reply.code) == (codec.NON, codec.VALID)
    assert command(harness) is Delivery.DELIVERED
    (note,) = harness.take()
    assert note.type == codec.NON
    assert harness.reports == [(harness.session.session_id, ("subscribed", False))]  # no ack for a NON


def test_observe_numbers_increase_with_every_notification_and_wrap_at_2_pow_24(harness):
    harness.register()
    observer = harness.session.observer
    observer.number = (1 << 24) - 3
    numbers = []
    for request_id in range(4):
        command(harness, request_id)
        (note,) = harness.take()
        numbers.append(codec.observe_value(note))
        harness.ack(note)
    assert numbers == [(1 << 24) - 2, (1 << 24) - 1, 0, 1]


def test_only_one_con_notification_is_in_flight_and_the_next_goes_when_it_is_acked(harness):
    harness.register()
    assert command(harness, 0) is Delivery.AWAITING_ACK
    assert command(harness, 1) is Delivery.AWAITING_ACK
    assert command(harness, 2) is Delivery.AWAITING_ACK
    (first,) = harness.take()
    assert json.loads(first.payload)["id"] == 0
    harness.ack(first)
    (second,) = harness.take()
    assert json.loads(second.payload)["id"] == 1
    assert codec.observe_value(second) > codec.observe_value(first)
    harness.ack(second)
    (third,) = harness.take()
    harness.ack(third)
    assert harness.link().calls == [("subscribed", False), ("acked", 0), ("acked", 1), ("acked", 2)]
    assert len(harness.reports) == 4


def test_a_command_the_actor_sends_again_while_in_flight_or_queued_is_not_duplicated(harness):
    harness.register()
    command(harness, 0)
    command(harness, 1)
    assert command(harness, 0) is Delivery.AWAITING_ACK
    assert command(harness, 1) is Delivery.AWAITING_ACK
    (first,) = harness.take()
    harness.ack(first)
    (second,) = harness.take()
    harness.ack(second)
    assert harness.take() == []


def test_when_the_local_queue_is_full_a_command_is_not_sent(harness):
    harness.server.max_queued = 2
    harness.register()
    assert [command(harness, i) for i in range(4)] == [
        Delivery.AWAITING_ACK, Delivery.AWAITING_ACK, Delivery.AWAITING_ACK, Delivery.NOT_SENT]


def test_a_non_notification_queued_behind_a_block_transfer_is_reported_acked_when_written(harness):
    harness.register(mtype=codec.NON)
    assert command(harness, 0, params="x" * 2000) is Delivery.DELIVERED
    assert command(harness, 1) is Delivery.AWAITING_ACK  # waits for the device to fetch the blocks
    (first,) = harness.take()
    harness.request(codec.GET, harness.rpc_path(), options=[(codec.BLOCK2, codec.block_option(1, False, 6))])
    messages = harness.take()
    assert [msg.code for msg in messages] == [codec.CONTENT, codec.CONTENT]  # the block, then the next command
    assert json.loads(messages[1].payload)["id"] == 1
    assert harness.link().calls == [("subscribed", False), ("acked", 1)]
    assert len(harness.reports) == 2


def test_giving_up_after_four_retransmissions_drops_the_observer_and_detaches_the_session(harness):
    harness.register()
    session = harness.session
    command(harness, 0)
    command(harness, 1)
    harness.clock.pump([2, 4, 8, 16])
    sent = harness.take_raw()
    assert len(sent) == 5 and len({data for data, _ in sent}) == 1
    harness.clock.advance(32)
    assert harness.reports == [(session.session_id, ("subscribed", False)), (session.session_id, ("closed",))]
    assert session.link is NO_LINK
    assert len(harness.server.observers) == 0
    assert harness.take_raw() == []  # the queued command was not sent to a dead observer
    assert command(harness, 2) is Delivery.NOT_SENT


def test_an_rst_to_a_con_notification_cancels_the_observation(harness):
    harness.register()
    command(harness)
    (note,) = harness.take()
    harness.reset(note)
    assert harness.link().calls == [("subscribed", False), ("closed",)]
    assert len(harness.reports) == 2
    harness.clock.advance(100)
    assert harness.take() == []  # no retransmission
    assert command(harness, 1) is Delivery.NOT_SENT


def test_an_rst_to_a_non_notification_cancels_the_observation(harness):
    harness.register(mtype=codec.NON)
    command(harness)
    (note,) = harness.take()
    harness.reset(note)
    assert harness.link().calls == [("subscribed", False), ("closed",)]
    assert len(harness.reports) == 2


def test_a_get_with_observe_1_deregisters(harness):
    harness.register(token=b"obs")
    harness.request(codec.GET, harness.rpc_path(), token=b"obs", options=[(codec.OBSERVE, 1)])
    (reply,) = harness.take()
    assert reply.code == codec.CONTENT and codec.observe_value(reply) is None
    assert harness.link().calls == [("subscribed", False), ("closed",)]
    assert len(harness.reports) == 2
    assert command(harness) is Delivery.NOT_SENT


def test_a_re_registration_with_the_same_token_keeps_the_observation_and_its_numbers(harness):
    first = harness.register(token=b"obs")
    second = harness.register(token=b"obs")
    assert len(harness.attached) == 1
    assert codec.observe_value(second) > codec.observe_value(first)
    assert harness.reports == [(harness.session.session_id, ("subscribed", False))] * 2


def test_a_new_registration_replaces_the_old_observation_which_gets_a_final_2_02(harness):
    harness.register(token=b"old")
    old = harness.session
    harness.register(token=b"new")
    new = harness.session
    assert new is not old and harness.attached[-1].exclusive
    old.close("replaced by a newer session of the same device")  # what the actor does on an exclusive attach
    (final,) = harness.take()
    assert (final.token, final.code, codec.observe_value(final)) == (b"old", codec.DELETED, None)
    assert old.send_command(5, "x", None, 1) is Delivery.NOT_SENT
    assert command(harness, 5) is Delivery.AWAITING_ACK
    (note,) = harness.take()
    assert note.token == b"new"
    # the actor closed it: nothing to report back
    assert harness.link(old).calls == [("subscribed", False)] and old.link is NO_LINK
    assert harness.link(new).calls == [("subscribed", False)]
    assert len(harness.reports) == 2


# --- answers and calls ----------------------------------------------------------------------------------------------


def test_an_answer_is_told_on_the_observe_session_and_acknowledged_2_01(harness):
    harness.register()
    mid = harness.request(codec.POST, harness.rpc_path("3"), token=b"a", payload=b'{"temperature":21.5}')
    (reply,) = harness.take()
    assert (reply.type, reply.code, reply.mid, reply.token) == (codec.ACK, codec.CREATED, mid, b"a")
    assert len(harness.attached) == 1  # no extra session for the answer
    assert harness.link().calls == [("subscribed", False), ("answered", 3, b'{"temperature":21.5}')]


def test_an_answer_without_an_observation_uses_a_short_lived_non_exclusive_session(harness):
    harness.request(codec.POST, harness.rpc_path("9"), payload=b'"done"')
    (attached,) = harness.attached
    assert attached.exclusive is False and attached.session.transport == "coap-request"
    sid = attached.session.session_id
    assert harness.reports == [(sid, ("answered", 9, b'"done"')), (sid, ("closed",))]
    assert harness.take()[0].code == codec.CREATED


@pytest.mark.parametrize("segment, payload", [("abc", b"{}"), ("-1", b"{}"), ("99999999999", b"{}"),
                                              ("3", b"not json"), ("3", b""), ("3", b"\xff\xfe")])
def test_a_malformed_answer_is_4_00(harness, segment, payload):
    harness.request(codec.POST, harness.rpc_path(segment), payload=payload)
    assert [r.code for r in harness.take()] == [codec.BAD_REQUEST]
    assert harness.attached == [] and harness.reports == []


def test_a_device_call_is_told_to_the_actor_and_the_reply_detaches_its_session(harness):
    harness.request(codec.POST, harness.rpc_path(), payload=b'{"method":"getCurrentTime","params":{}}')
    (attached,) = harness.attached
    assert attached.exclusive is False
    call = attached.session
    assert call.link is attached.link
    assert harness.reports == [(call.session_id, ("called", 0, b'{"method":"getCurrentTime","params":{}}'))]
    call.send_reply(0, b"1700000000000")
    (reply,) = harness.take()
    assert (reply.code, reply.payload, opts(reply)[codec.CONTENT_FORMAT]) == (
        codec.CONTENT, b"1700000000000", codec.JSON_FORMAT)
    assert harness.reports[1:] == [(call.session_id, ("closed",))]
    assert call.link is NO_LINK


def test_a_call_nobody_answers_gets_the_thingsboard_timeout_answer(harness):
    harness.request(codec.POST, harness.rpc_path(), payload=b'{"method":"nobodyHome"}')
    harness.clock.advance(server_module.CALL_TIMEOUT)
    replies = harness.take()
    assert [r.code for r in replies] == [codec.EMPTY, codec.CONTENT]
    assert json.loads(replies[-1].payload) == {"error": "timeout"}
    harness.ack(replies[-1])


def test_a_call_whose_session_the_actor_closes_is_answered_5_03(harness):
    harness.request(codec.POST, harness.rpc_path(), payload=b'{"method":"x"}')
    harness.attached[0].session.close("device deleted")
    assert [r.code for r in harness.take()] == [codec.SERVICE_UNAVAILABLE]
    assert harness.attached[0].link.calls == [("called", 0, b'{"method":"x"}')]  # no close reported back


# --- errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code, path, options", [
    (codec.GET, ["api", "v1", "unknown", "rpc"], [(codec.OBSERVE, 0)]),
    (codec.POST, ["api", "v1", "unknown", "rpc"], []),
    (codec.POST, ["api", "v1", "unknown", "rpc", "1"], []),
])
def test_an_unknown_token_is_4_01(harness, code, path, options):
    harness.request(code, path, options=options, payload=b"{}")
    assert [r.code for r in harness.take()] == [codec.UNAUTHORIZED]
    assert harness.attached == []


@pytest.mark.parametrize("code, path, options, expected", [
    (codec.GET, ["api", "v1", "good-token", "telemetry"], [], codec.BAD_REQUEST),
    (codec.GET, ["api", "v2", "good-token", "rpc"], [(codec.OBSERVE, 0)], codec.BAD_REQUEST),
    (codec.GET, [], [], codec.BAD_REQUEST),
    (codec.GET, ["api", "v1", "good-token", "rpc"], [], codec.BAD_REQUEST),
    (codec.GET, ["api", "v1", "good-token", "rpc"], [(codec.OBSERVE, 5)], codec.BAD_REQUEST),
    (codec.POST, ["api", "v1", "good-token", "rpc"], [], codec.BAD_REQUEST),  # a call needs JSON
    (codec.PUT, ["api", "v1", "good-token", "rpc"], [], codec.METHOD_NOT_ALLOWED),
    (codec.GET, ["api", "v1", "good-token", "rpc", "4"], [], codec.METHOD_NOT_ALLOWED),
])
def test_malformed_requests_get_a_4_xx_without_touching_any_actor(harness, code, path, options, expected):
    harness.request(code, path, options=options, payload=b"not json")
    assert [r.code for r in harness.take()] == [expected]
    assert harness.attached == [] and harness.reports == []


def test_a_failing_token_lookup_is_5_00(harness):
    harness.pending_lookup = Deferred()
    harness.request(codec.POST, harness.rpc_path("1"), payload=b"{}")
    harness.pending_lookup.errback(RuntimeError("database down"))
    assert [r.code for r in harness.take()] == [codec.INTERNAL_SERVER_ERROR]


def test_a_slow_token_lookup_gets_an_empty_ack_and_then_the_2_03_separately(harness):
    harness.pending_lookup = Deferred()
    mid = harness.request(codec.GET, harness.rpc_path(), token=b"obs", options=[(codec.OBSERVE, 0)])
    harness.clock.advance(0.5)
    lookup, harness.pending_lookup = harness.pending_lookup, None
    lookup.callback(harness.tokens["good-token"])
    empty_ack, separate = harness.take()
    assert (empty_ack.type, empty_ack.code, empty_ack.mid) == (codec.ACK, codec.EMPTY, mid)
    assert (separate.type, separate.code, separate.token) == (codec.CON, codec.VALID, b"obs")
    harness.ack(separate)


def test_an_unknown_critical_option_gets_4_02(harness):
    # After Uri-Path (11), delta 2 makes option 13: unassigned and odd, so critical.
    data = codec.encode(codec.build(codec.CON, codec.GET, 9, b"tk", [(codec.URI_PATH, "api")])) + bytes([0x20])
    harness.server.datagramReceived(data, DEVICE_ADDR)
    (reply,) = harness.take()
    assert (reply.type, reply.code, reply.mid, reply.token) == (codec.ACK, codec.BAD_OPTION, 9, b"tk")


def test_a_garbage_datagram_is_dropped_with_one_log_line_and_the_server_carries_on(harness, monkeypatch):
    events = []
    monkeypatch.setattr(server_module, "log", Logger(namespace="nanoiot.coap", observer=events.append))
    harness.server.datagramReceived(bytes.fromhex("4101000709600474656d70"), DEVICE_ADDR)  # coapthon's killer
    harness.server.datagramReceived(b"\x00\x01", DEVICE_ADDR)
    assert len(events) == 2 and all("dropped" in e["log_format"] for e in events)
    assert harness.take_raw() == [(codec.empty(codec.RST, 7), DEVICE_ADDR)]  # a readable CON header: rejected
    reply = harness.register()
    assert reply.code == codec.VALID
    assert harness.server.stats["dropped"] == 2


def test_bad_datagrams_are_logged_at_most_ten_times_a_minute(harness, monkeypatch):
    events = []
    monkeypatch.setattr(server_module, "log", Logger(namespace="nanoiot.coap", observer=events.append))
    for _ in range(1000):
        harness.server.datagramReceived(b"\xff", DEVICE_ADDR)
    assert len(events) == 10
    harness.clock.advance(60)
    harness.server.datagramReceived(b"\xff", DEVICE_ADDR)
    assert len(events) == 12 and events[10]["n"] == 990


# --- block-wise -----------------------------------------------------------------------------------------------------


def fetch_blocks(harness, first, path, code=codec.GET, mtype=codec.CON, others=None):
    """Play aiocoap: ask for block 1, 2, ... until more=0; returns the assembled payload (anything else the server
    sent meanwhile goes to ``others``)."""
    num, more, szx = codec.block_value(first, codec.BLOCK2)
    assert (num, more) == (0, True)
    body = first.payload
    etag = opts(first)[codec.ETAG]
    while more:
        num += 1
        harness.request(code, path, mtype=mtype, token=bytes([num]),
                        options=[(codec.BLOCK2, codec.block_option(num, False, szx))])
        replies = harness.take()
        (block,) = [r for r in replies if r.token == bytes([num])]
        if others is not None:
            others.extend(r for r in replies if r is not block)
        assert block.code == first.code and opts(block)[codec.ETAG] == etag
        got_num, more, _ = codec.block_value(block, codec.BLOCK2)
        assert got_num == num
        body += block.payload
    return body


def test_a_command_larger_than_a_block_is_notified_with_block2_and_the_device_fetches_the_rest(harness):
    harness.register()
    params = {"blob": "x" * 3000}
    command(harness, 0, "bigConfig", params)
    (note,) = harness.take()
    assert len(note.payload) == 1024
    assert opts(note)[codec.SIZE2] > 3000 and codec.observe_value(note) is not None
    harness.ack(note)
    assert command(harness, 1) is Delivery.AWAITING_ACK
    assert harness.take() == []  # held until the device has the whole of the previous one
    others = []
    body = fetch_blocks(harness, note, harness.rpc_path(), others=others)
    assert json.loads(body) == {"id": 0, "method": "bigConfig", "params": params}
    assert [json.loads(n.payload)["id"] for n in others] == [1]  # released by the last block


def test_a_registration_asking_for_small_blocks_gets_notifications_in_those_blocks(harness):
    harness.register(options=[(codec.BLOCK2, codec.block_option(0, False, 2))])  # 64-byte blocks
    command(harness, 0, "m", "y" * 200)
    (note,) = harness.take()
    assert len(note.payload) == 64 and codec.block_value(note, codec.BLOCK2) == (0, True, 2)
    harness.ack(note)
    assert json.loads(fetch_blocks(harness, note, harness.rpc_path()))["params"] == "y" * 200


def test_an_unfetched_block_transfer_releases_the_queue_after_its_lifetime(harness):
    harness.register()
    command(harness, 0, "m", "z" * 2000)
    (note,) = harness.take()
    harness.ack(note)
    command(harness, 1)
    harness.clock.advance(BLOCK_LIFETIME + 2)
    assert [json.loads(n.payload)["id"] for n in harness.take()] == [1]


def test_a_large_call_reply_is_sent_block_wise_and_the_follow_ups_do_not_repeat_the_call(harness):
    path = harness.rpc_path()
    harness.request(codec.POST, path, token=b"c", payload=b'{"method":"getBig"}')
    reply_body = json.dumps({"data": "q" * 2500}).encode()
    harness.attached[0].session.send_reply(0, reply_body)
    (first,) = harness.take()
    assert first.code == codec.CONTENT and len(first.payload) == 1024
    assert fetch_blocks(harness, first, path, code=codec.POST) == reply_body
    assert len(harness.attached) == 1
    assert harness.attached[0].link.calls == [("called", 0, b'{"method":"getBig"}'), ("closed",)]


def test_a_block2_request_past_the_end_is_4_02_and_one_for_nothing_is_4_08(harness):
    harness.register()
    command(harness, 0, "m", "z" * 2000)
    (note,) = harness.take()
    harness.ack(note)
    harness.request(codec.GET, harness.rpc_path(), options=[(codec.BLOCK2, codec.block_option(9, False, 6))])
    assert [r.code for r in harness.take()] == [codec.BAD_OPTION]
    harness.request(codec.GET, harness.rpc_path(token="other"),
                    options=[(codec.BLOCK2, codec.block_option(1, False, 6))])
    assert [r.code for r in harness.take()] == [codec.REQUEST_ENTITY_INCOMPLETE]


def send_block1(harness, path, body, szx=4, token=b"b1", stop_after=None):
    size = codec.szx_size(szx)
    chunks = [body[i:i + size] for i in range(0, len(body), size)]
    replies = []
    for num, chunk in enumerate(chunks):
        if stop_after is not None and num > stop_after:
            break
        more = num < len(chunks) - 1
        harness.request(codec.POST, path, token=token, payload=chunk,
                        options=[(codec.BLOCK1, codec.block_option(num, more, szx))])
        got = harness.take()
        replies.extend(got)
        if any(r.code != codec.CONTINUE for r in got):
            break
    return replies


def test_a_block1_answer_is_reassembled_with_2_31_continues_and_a_final_2_01(harness):
    body = json.dumps({"values": list(range(200))}).encode()
    replies = send_block1(harness, harness.rpc_path("4"), body)
    assert [r.code for r in replies] == [codec.CONTINUE] * (len(replies) - 1) + [codec.CREATED]
    assert codec.block_value(replies[0], codec.BLOCK1) == (0, True, 4)
    assert codec.block_value(replies[-1], codec.BLOCK1)[1] is False
    (attached,) = harness.attached
    assert attached.link.calls == [("answered", 4, body), ("closed",)]


def test_a_block1_body_over_the_cap_is_4_13_with_size1():
    harness = CoapHarness(max_payload=1000)
    replies = send_block1(harness, harness.rpc_path("4"), b"[" + b"1," * 700 + b"1]")
    assert [r.code for r in replies] == [codec.CONTINUE] * 3 + [codec.REQUEST_ENTITY_TOO_LARGE]
    assert opts(replies[-1])[codec.SIZE1] == 1000
    assert harness.attached == [] and harness.reports == []
    harness.stop()


def test_a_single_datagram_body_over_the_cap_is_4_13():
    harness = CoapHarness(max_payload=100)
    harness.request(codec.POST, harness.rpc_path("4"), payload=b'"' + b"a" * 200 + b'"')
    assert [r.code for r in harness.take()] == [codec.REQUEST_ENTITY_TOO_LARGE]
    harness.stop()


def test_a_block1_out_of_order_or_after_its_state_timed_out_is_4_08(harness):
    body = b'"' + b"a" * 100 + b'"'
    send_block1(harness, harness.rpc_path("4"), body, szx=0, stop_after=0)
    harness.request(codec.POST, harness.rpc_path("4"), payload=b"x" * 16,
                    options=[(codec.BLOCK1, codec.block_option(3, True, 0))])
    assert [r.code for r in harness.take()] == [codec.REQUEST_ENTITY_INCOMPLETE]
    assert [r.code for r in send_block1(harness, harness.rpc_path("4"), body, szx=0, stop_after=1)] == [
        codec.CONTINUE, codec.CONTINUE]
    harness.clock.advance(BLOCK_LIFETIME + 2)
    harness.request(codec.POST, harness.rpc_path("4"), payload=body[32:48],
                    options=[(codec.BLOCK1, codec.block_option(2, True, 0))])
    assert [r.code for r in harness.take()] == [codec.REQUEST_ENTITY_INCOMPLETE]


# --- robustness -----------------------------------------------------------------------------------------------------


def test_stopping_the_server_detaches_its_sessions_and_cancels_every_timer():
    harness = CoapHarness()
    harness.register()
    command(harness)
    harness.request(codec.POST, harness.rpc_path(), payload=b'{"method":"slow"}')
    harness.stop()
    assert len(harness.attached) == 2
    for attached in harness.attached:
        assert attached.link.of("closed") == [("closed",)]
        assert attached.session.link is NO_LINK


@st.composite
def datagrams(draw):
    choice = draw(st.integers(0, 2))
    if choice == 0:
        return draw(st.binary(max_size=80))
    message = codec.build(
        draw(st.sampled_from([codec.CON, codec.NON, codec.ACK, codec.RST])),
        draw(st.sampled_from([codec.EMPTY, codec.GET, codec.POST, codec.PUT, codec.CONTENT])),
        draw(st.integers(0, 0xFFFF)),
        draw(st.binary(max_size=8)),
        [(codec.URI_PATH, s) for s in draw(st.sampled_from([
            ["api", "v1", "good-token", "rpc"], ["api", "v1", "good-token", "rpc", "1"], ["api", "v1", "x", "rpc"],
            ["api"], []]))]
        + draw(st.lists(st.sampled_from([(codec.OBSERVE, 0), (codec.OBSERVE, 1), (codec.BLOCK2, 0x16),
                                         (codec.BLOCK1, 0x1C), (codec.BLOCK1, 0x04), (codec.SIZE1, 10**6)]),
                        max_size=2, unique_by=lambda o: o[0])),
        draw(st.sampled_from([b"", b"{}", b'{"method":"getCurrentTime"}', b"\xff\x00", b"[" * 5000])),
    )
    try:
        data = codec.encode(message)
    except codec.CoapEncodeError:
        return b""
    if choice == 2 and data:
        position = draw(st.integers(0, len(data) - 1))
        data = data[:position] + bytes([data[position] ^ draw(st.integers(1, 255))]) + data[position + 1:]
    return data


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(datagrams(), min_size=1, max_size=4))
def test_fuzz_datagram_received_never_raises_never_hits_an_internal_error_and_leaves_no_timer(batch):
    harness = CoapHarness()
    harness.register()
    for data in batch:
        harness.server.datagramReceived(data, DEVICE_ADDR)
    harness.clock.advance(0.6)
    assert harness.server.stats["errors"] == 0
    harness.stop()
