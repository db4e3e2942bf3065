"""The CoAP message layer in memory: retransmission timing, dedup, piggy-backed and separate answers, ping, purge."""

from __future__ import annotations

import pytest
from twisted.internet import task

from nanoiot.transports.coap import codec
from nanoiot.transports.coap.messages import (
    EXCHANGE_LIFETIME,
    NON_LIFETIME,
    ExpiringMap,
    MessageLayer,
    Sweeper,
)
from nanoiot.transports.coap.testing import CoapHarness

PEER = ("192.0.2.7", 40000)


class Recorder:
    def __init__(self, clock):
        self.clock = clock
        self.sent = []

    def __call__(self, data, addr):
        self.sent.append((self.clock.seconds(), bytes(data), addr))


def layer_with(random_value):
    clock = task.Clock()
    recorder = Recorder(clock)
    sweeper = Sweeper(clock)
    layer = MessageLayer(clock, recorder, random=lambda: random_value, sweeper=sweeper)
    return clock, recorder, layer, sweeper


def stop(clock, layer, sweeper):
    layer.stop()
    sweeper.stop()
    assert clock.getDelayedCalls() == []


def notification(token=b"ob"):
    return codec.build(None, codec.CONTENT, token=token, options=[(codec.OBSERVE, 5)], payload=b"{}")


@pytest.mark.parametrize("random_value, first_timeout", [(0.0, 2.0), (0.5, 2.5), (1.0, 3.0)])
def test_a_con_is_retransmitted_at_t_3t_7t_15t_and_given_up_at_31t(random_value, first_timeout):
    clock, recorder, layer, sweeper = layer_with(random_value)
    gave_up = []
    layer.send_con(notification(), PEER, on_timeout=lambda: gave_up.append(clock.seconds()))
    for _ in range(200):
        clock.advance(0.5)
    times = [t for t, _, _ in recorder.sent]
    t = first_timeout
    assert times == pytest.approx([0.0, t, 3 * t, 7 * t, 15 * t])
    assert gave_up == pytest.approx([31 * t], abs=0.5)
    stop(clock, layer, sweeper)


def test_the_give_up_comes_62_seconds_after_the_first_send_with_the_lowest_random_factor():
    clock, recorder, layer, sweeper = layer_with(0.0)
    gave_up = []
    layer.send_con(notification(), PEER, on_timeout=lambda: gave_up.append(clock.seconds()))
    clock.pump([2, 4, 8, 16, 31.9])
    assert gave_up == []
    clock.advance(0.1)
    assert gave_up == [pytest.approx(62.0)]
    stop(clock, layer, sweeper)


def test_every_retransmission_is_the_identical_bytes_to_the_same_peer():
    clock, recorder, layer, sweeper = layer_with(0.0)
    layer.send_con(notification(), PEER)
    clock.pump([2, 4, 8, 16, 32])
    assert len(recorder.sent) == 5
    assert len({data for _, data, _ in recorder.sent}) == 1
    assert {addr for _, _, addr in recorder.sent} == {PEER}
    stop(clock, layer, sweeper)


def test_an_ack_stops_retransmission_and_reports_once():
    clock, recorder, layer, sweeper = layer_with(0.0)
    acked = []
    outgoing = layer.send_con(notification(), PEER, on_ack=acked.append)
    clock.advance(2)
    layer.receive(codec.decode(codec.empty(codec.ACK, outgoing.mid)), PEER)
    layer.receive(codec.decode(codec.empty(codec.ACK, outgoing.mid)), PEER)  # a duplicate ACK
    clock.advance(100)
    assert len(recorder.sent) == 2 and len(acked) == 1
    stop(clock, layer, sweeper)


def test_an_ack_from_another_port_does_not_match():
    clock, recorder, layer, sweeper = layer_with(0.0)
    acked = []
    outgoing = layer.send_con(notification(), PEER, on_ack=acked.append)
    layer.receive(codec.decode(codec.empty(codec.ACK, outgoing.mid)), (PEER[0], PEER[1] + 1))
    assert acked == [] and layer.outgoing
    stop(clock, layer, sweeper)


def test_an_rst_stops_retransmission_and_reports_the_reset():
    clock, recorder, layer, sweeper = layer_with(0.0)
    resets = []
    outgoing = layer.send_con(notification(), PEER, on_reset=lambda: resets.append(1))
    layer.receive(codec.decode(codec.empty(codec.RST, outgoing.mid)), PEER)
    clock.advance(100)
    assert resets == [1] and len(recorder.sent) == 1
    stop(clock, layer, sweeper)


def test_message_ids_to_one_peer_increase_and_other_peers_have_their_own_sequence():
    clock, recorder, layer, sweeper = layer_with(0.0)
    first = [layer.next_mid(PEER) for _ in range(3)]
    other = layer.next_mid(("192.0.2.8", 1))
    assert first == [0, 1, 2] and other == 0
    stop(clock, layer, sweeper)


def test_a_ping_is_answered_with_an_rst_of_the_same_mid():
    harness = CoapHarness()
    harness.server.datagramReceived(codec.empty(codec.CON, 0x4242), PEER)
    assert harness.take_raw() == [(codec.empty(codec.RST, 0x4242), PEER)]
    harness.stop()


def test_dedup_is_by_host_port_mid_tuple_so_5683_mid_12_and_56831_mid_2_are_two_requests():
    # coapthon keys "host"+"5683"+"12" == "host"+"56831"+"2": the second client got nothing (B2).
    harness = CoapHarness()
    host = "192.0.2.50"
    harness.request(codec.POST, harness.rpc_path(), token=b"A", payload=b'{"method":"x"}', mid=12, addr=(host, 5683))
    harness.request(codec.POST, harness.rpc_path(), token=b"B", payload=b'{"method":"y"}', mid=2, addr=(host, 56831))
    calls = [a.session for a in harness.attached]
    assert len(calls) == 2
    calls[0].send_reply(0, b'"for A"')
    calls[1].send_reply(0, b'"for B"')
    (to_a,) = harness.take((host, 5683))
    (to_b,) = harness.take((host, 56831))
    assert (to_a.token, to_a.mid, to_a.payload) == (b"A", 12, b'"for A"')
    assert (to_b.token, to_b.mid, to_b.payload) == (b"B", 2, b'"for B"')
    harness.stop()


def test_a_retransmitted_con_gets_the_identical_cached_reply_and_is_handled_once():
    harness = CoapHarness()
    mid = harness.request(codec.POST, harness.rpc_path("7"), payload=b'{"ok":true}')
    (first,) = harness.take_raw()
    harness.request(codec.POST, harness.rpc_path("7"), payload=b'{"ok":true}', mid=mid)
    harness.clock.advance(EXCHANGE_LIFETIME - 10)
    harness.request(codec.POST, harness.rpc_path("7"), payload=b'{"ok":true}', mid=mid)
    assert harness.take_raw() == [first, first]
    assert len(harness.attached) == 1  # the answer was told to the actor once
    harness.stop()


def test_after_exchange_lifetime_the_same_mid_is_a_new_request_and_the_cache_is_purged():
    harness = CoapHarness()
    mid = harness.request(codec.POST, harness.rpc_path("7"), payload=b"{}")
    harness.clock.advance(EXCHANGE_LIFETIME + 2)
    assert len(harness.server.messages.con_seen) == 0
    assert harness.clock.getDelayedCalls() == []  # nothing left to purge: no timer either
    harness.request(codec.POST, harness.rpc_path("7"), payload=b"{}", mid=mid)
    assert len(harness.attached) == 2
    harness.stop()


def test_a_duplicated_non_request_is_ignored_for_non_lifetime():
    harness = CoapHarness()
    mid = harness.request(codec.POST, harness.rpc_path("7"), mtype=codec.NON, payload=b"{}")
    (reply,) = harness.take()
    assert (reply.type, reply.code) == (codec.NON, codec.CREATED)
    harness.request(codec.POST, harness.rpc_path("7"), mtype=codec.NON, payload=b"{}", mid=mid)
    assert harness.take() == [] and len(harness.attached) == 1
    harness.clock.advance(NON_LIFETIME + 2)
    harness.request(codec.POST, harness.rpc_path("7"), mtype=codec.NON, payload=b"{}", mid=mid)
    assert len(harness.attached) == 2
    harness.stop()


def test_an_answer_ready_within_500_ms_is_piggy_backed_on_the_ack():
    harness = CoapHarness()
    mid = harness.request(codec.POST, harness.rpc_path(), token=b"c1", payload=b'{"method":"getCurrentTime"}')
    harness.clock.advance(0.4)
    harness.attached[-1].session.send_reply(0, b"1700000000000")
    (reply,) = harness.take()
    assert (reply.type, reply.code, reply.mid, reply.token, reply.payload) == (
        codec.ACK, codec.CONTENT, mid, b"c1", b"1700000000000")
    harness.stop()


def test_a_slow_answer_gets_an_empty_ack_at_500_ms_then_a_separate_con_response():
    harness = CoapHarness()
    mid = harness.request(codec.POST, harness.rpc_path(), token=b"c1", payload=b'{"method":"slow"}')
    harness.clock.advance(0.5)
    (empty_ack,) = harness.take()
    assert (empty_ack.type, empty_ack.code, empty_ack.mid) == (codec.ACK, codec.EMPTY, mid)
    # The device retransmits its request meanwhile: it gets the empty ACK again, the call is not repeated.
    harness.request(codec.POST, harness.rpc_path(), token=b"c1", payload=b'{"method":"slow"}', mid=mid)
    assert [m.code for m in harness.take()] == [codec.EMPTY]
    harness.attached[-1].session.send_reply(0, b'{"late":1}')
    (separate,) = harness.take()
    assert (separate.type, separate.code, separate.token, separate.payload) == (
        codec.CON, codec.CONTENT, b"c1", b'{"late":1}')
    assert separate.mid != mid
    harness.ack(separate)
    harness.clock.advance(10)
    assert harness.take() == []  # acknowledged: not retransmitted
    harness.stop()


def test_a_retransmission_while_the_answer_is_pending_gets_an_empty_ack_at_once():
    harness = CoapHarness()
    mid = harness.request(codec.POST, harness.rpc_path(), payload=b'{"method":"slow"}')
    harness.clock.advance(0.2)
    harness.request(codec.POST, harness.rpc_path(), payload=b'{"method":"slow"}', mid=mid)
    (empty_ack,) = harness.take()
    assert (empty_ack.type, empty_ack.code, empty_ack.mid) == (codec.ACK, codec.EMPTY, mid)
    harness.stop()


def test_a_response_code_in_a_con_from_a_device_is_rejected_with_rst():
    harness = CoapHarness()
    message = codec.build(codec.CON, codec.CONTENT, 77, b"x", payload=b"?")
    harness.server.datagramReceived(codec.encode(message), PEER)
    assert harness.take_raw() == [(codec.empty(codec.RST, 77), PEER)]
    harness.stop()


def test_an_expiring_map_drops_its_oldest_entries_past_its_size_and_forgets_expired_ones():
    expired = []
    entries = ExpiringMap(10.0, max_size=2, on_expire=lambda key, value: expired.append(key))
    entries.put("a", 1, 0.0)
    entries.put("b", 2, 1.0)
    entries.put("a", 3, 2.0)  # refreshed: "b" is now the oldest
    entries.put("c", 4, 3.0)
    assert expired == ["b"] and entries.get("a", 3.0) == 3 and entries.get("c", 3.0) == 4
    assert entries.get("a", 12.5) is None  # past its deadline, even before a purge
    entries.purge(12.5)
    assert expired == ["b", "a"] and entries.next_deadline() == 13.0


def test_one_sweeper_call_purges_every_map_at_the_earliest_deadline():
    clock = task.Clock()
    sweeper = Sweeper(clock)
    short = sweeper.register(ExpiringMap(5.0))
    long = sweeper.register(ExpiringMap(50.0))
    for i in range(100):
        short.put(i, i, clock.seconds())
        long.put(i, i, clock.seconds())
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(5.0 + Sweeper.SLACK)
    assert len(short) == 0 and len(long) == 100
    clock.advance(50.0)
    assert len(long) == 0 and clock.getDelayedCalls() == []


def test_refreshing_one_key_many_times_on_a_frozen_clock_keeps_the_bookkeeping_small():
    # Regression: stale records were recognised by deadline, which a frozen clock makes equal: every put compacted.
    entries = ExpiringMap(10.0)
    for i in range(10_000):
        entries.put("peer", i, 0.0)
    assert len(entries) == 1 and entries.get("peer", 0.0) == 9_999
    assert len(entries._order) <= 2 * len(entries) + 65
    assert entries.next_deadline() == 10.0
