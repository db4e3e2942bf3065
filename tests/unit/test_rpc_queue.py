"""The device RPC queue as a pure state machine: every transition, driven by a fake clock (plain integers).

``Harness`` plays the device actor's part without I/O: it feeds events to ``DeviceRpcQueue``, keeps the time, and
replays the returned effects to track which timers are armed (firing them in time order when the clock moves).
The last part of the file drives random event sequences with Hypothesis under every strategy and checks the
queue's invariants after each step.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any
from uuid import UUID

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from nanoiot.rpc.model import RpcCommand, RpcFailure, RpcResult, RpcStatus, SubmitStrategy
from nanoiot.rpc.queue import (
    RESPONSE_TIMEOUT,
    RETRIES_EXHAUSTED,
    CancelTimer,
    DeviceRpcQueue,
    Effect,
    Finished,
    QueueSettings,
    Send,
    StartTimer,
    StatusChanged,
    Timer,
)

T0 = 1_700_000_000_000
TENANT = UUID("00000000-0000-0000-0000-0000000000aa")
DEVICE = UUID("00000000-0000-0000-0000-0000000000bb")

BURST = SubmitStrategy.BURST
ON_ACK = SubmitStrategy.SEQUENTIAL_ON_ACK_FROM_DEVICE
ON_RESPONSE = SubmitStrategy.SEQUENTIAL_ON_RESPONSE_FROM_DEVICE
ALL_STRATEGIES = [BURST, ON_ACK, ON_RESPONSE]
SEQUENTIAL = [ON_ACK, ON_RESPONSE]

Q, SENT, DELIVERED, SUCCESSFUL = RpcStatus.QUEUED, RpcStatus.SENT, RpcStatus.DELIVERED, RpcStatus.SUCCESSFUL
TIMEOUT, EXPIRED, FAILED, DELETED = RpcStatus.TIMEOUT, RpcStatus.EXPIRED, RpcStatus.FAILED, RpcStatus.DELETED

RETRIES_TEXT = "There was a Timeout and all retry attempts have been exhausted. Retry attempts set: {}"
RESPONSE_TEXT = "There was a timeout awaiting for RPC response from device."


# --- harness -----------------------------------------------------------------------------------------------------


class Harness:
    """A fake device actor: the queue, a clock in epoch ms, and the timers the effects armed."""

    def __init__(self, strategy: SubmitStrategy = BURST, **overrides: Any) -> None:
        self.queue = DeviceRpcQueue(QueueSettings(strategy=strategy, **overrides))
        self.now = T0
        #: (kind, request id) -> (due time, arming sequence number); the sequence breaks ties like callLater does.
        self.armed: dict[tuple[Timer, int], tuple[int, int]] = {}
        self.history: list[Effect] = []
        self._seq = itertools.count()
        self._uuids = itertools.count(1)

    # --- commands ---

    def command(self, *, oneway: bool = False, ttl: int = 60_000, retries: int | None = None,
                method: str = "setGpio", params: Any = None) -> RpcCommand:
        return RpcCommand(
            rpc_id=UUID(int=next(self._uuids)),
            tenant_id=TENANT,
            device_id=DEVICE,
            method=method,
            params=params,
            oneway=oneway,
            expiration_time=self.now + ttl,
            created_time=self.now,
            retries=retries,
        )

    # --- events ---

    def apply(self, effects: list[Effect]) -> list[Effect]:
        for effect in effects:
            if isinstance(effect, StartTimer):
                key = (effect.kind, effect.request_id)
                assert key not in self.armed, f"{key} armed while already armed"
                self.armed[key] = (effect.at, next(self._seq))
            elif isinstance(effect, CancelTimer):
                self.armed.pop((effect.kind, effect.request_id), None)
        self.history.extend(effects)
        return effects

    def submit(self, command: RpcCommand, request_id: int | None = None) -> list[Effect]:
        return self.apply(self.queue.submit(command, self.now, request_id))

    def restore(self, command: RpcCommand, status: RpcStatus, request_id: int | None = None,
                attempts: int = 0) -> list[Effect]:
        return self.apply(self.queue.restore(command, status, self.now, request_id, attempts))

    def subscribe(self, session_id: int, one_shot: bool = False) -> list[Effect]:
        return self.apply(self.queue.session_subscribed(session_id, one_shot, self.now))

    def close(self, session_id: int) -> list[Effect]:
        return self.apply(self.queue.session_closed(session_id, self.now))

    def ack(self, request_id: int) -> list[Effect]:
        return self.apply(self.queue.acked(request_id, self.now))

    def answer(self, request_id: int, response: Any = None) -> list[Effect]:
        return self.apply(self.queue.answered(request_id, response, self.now))

    def delete(self, rpc_id: UUID) -> list[Effect]:
        return self.apply(self.queue.delete(rpc_id, self.now))

    def fire(self, kind: Timer, request_id: int) -> list[Effect]:
        """The armed timer fires (late if the clock is already past it)."""
        at, _ = self.armed.pop((kind, request_id))
        self.now = max(self.now, at)
        handler = {
            Timer.EXPIRY: self.queue.expired,
            Timer.ACK: self.queue.ack_timed_out,
            Timer.RESPONSE: self.queue.response_timed_out,
        }[kind]
        return self.apply(handler(request_id, self.now))

    def next_due(self, until: int | None = None) -> tuple[Timer, int] | None:
        due = [(at, seq, key) for key, (at, seq) in self.armed.items() if until is None or at <= until]
        return min(due)[2] if due else None

    def advance(self, ms: int) -> list[Effect]:
        """Move the clock forward, firing every timer that falls due on the way, in time order."""
        return self.advance_to(self.now + ms)

    def advance_to(self, target: int) -> list[Effect]:
        effects: list[Effect] = []
        while (key := self.next_due(target)) is not None:
            effects += self.fire(*key)
        self.now = max(self.now, target)
        return effects

    def drain(self) -> list[Effect]:
        """Fire timers in time order until none is left (every command ends by its expiry at the latest)."""
        effects: list[Effect] = []
        for _ in range(10_000):
            key = self.next_due()
            if key is None:
                return effects
            effects += self.fire(*key)
        raise AssertionError("timers kept re-arming")

    # --- checks ---

    def assert_timers_match_pending(self) -> None:
        for kind, request_id in self.armed:
            assert request_id in self.queue.pending, f"{kind} timer left armed for removed command {request_id}"


def request_id_of(effect: Effect) -> int | None:
    if isinstance(effect, (Send, StatusChanged)):
        return effect.pending.request_id
    if isinstance(effect, (StartTimer, CancelTimer)):
        return effect.request_id
    return None


def retry_limit(command: RpcCommand, max_retries: int) -> int:
    """min(command.retries, max_retries), as ThingsBoard computes it; None means max_retries, negatives mean 0."""
    return max_retries if command.retries is None else max(0, min(command.retries, max_retries))


def sends(effects: list[Effect]) -> list[tuple[int, int]]:
    return [(e.session_id, e.pending.request_id) for e in effects if isinstance(e, Send)]


def statuses(effects: list[Effect]) -> list[tuple[int, RpcStatus]]:
    return [(e.pending.request_id, e.status) for e in effects if isinstance(e, StatusChanged)]


def status_changes(effects: list[Effect]) -> list[StatusChanged]:
    return [e for e in effects if isinstance(e, StatusChanged)]


def results(effects: list[Effect]) -> dict[UUID, RpcResult]:
    return {e.rpc_id: e.result for e in effects if isinstance(e, Finished)}


def started(effects: list[Effect]) -> list[tuple[Timer, int, int]]:
    return [(e.kind, e.request_id, e.at) for e in effects if isinstance(e, StartTimer)]


def cancelled(effects: list[Effect]) -> list[tuple[Timer, int]]:
    return [(e.kind, e.request_id) for e in effects if isinstance(e, CancelTimer)]


def failure(effects: list[Effect], command: RpcCommand) -> RpcFailure | None:
    return results(effects)[command.rpc_id].failure


# --- submit / subscribe / ack / answer ---------------------------------------------------------------------------


def test_submit_while_offline_queues_the_command_and_arms_its_expiry_timer_without_sending():
    h = Harness()
    c = h.command(ttl=30_000)
    effects = h.submit(c)
    assert statuses(effects) == [(0, Q)]
    assert started(effects) == [(Timer.EXPIRY, 0, T0 + 30_000)]
    assert sends(effects) == []
    assert results(effects) == {}
    assert len(h.queue) == 1
    assert h.queue.find(c.rpc_id).status is Q


def test_submit_while_subscribed_sends_at_once():
    h = Harness()
    h.subscribe(7)
    effects = h.submit(h.command())
    assert statuses(effects) == [(0, Q), (0, SENT)]
    assert sends(effects) == [(7, 0)]


def test_subscribing_sends_the_queued_commands_in_submission_order_each_marked_sent_with_an_ack_timer():
    h = Harness(ack_timeout_ms=10_000)
    cs = [h.command() for _ in range(3)]
    for c in cs:
        h.submit(c)
    h.now += 500
    effects = h.subscribe(1)
    assert sends(effects) == [(1, 0), (1, 1), (1, 2)]
    assert statuses(effects) == [(0, SENT), (1, SENT), (2, SENT)]
    assert started(effects) == [(Timer.ACK, rid, T0 + 10_500) for rid in range(3)]
    # Each command's SENT and ack timer come before it is written, so an ack can never beat its own timer.
    for rid in range(3):
        assert [type(e) for e in effects if request_id_of(e) == rid] == [StatusChanged, StartTimer, Send]


def test_send_carries_the_pending_command_itself():
    h = Harness()
    h.subscribe(1)
    c = h.command(method="reboot", params={"delay": 3})
    [send] = [e for e in h.submit(c) if isinstance(e, Send)]
    assert send.pending.command is c
    assert send.pending is h.queue.find(c.rpc_id)


def test_ack_timer_is_capped_at_the_expiration_time():
    h = Harness(ack_timeout_ms=10_000)
    h.subscribe(1)
    effects = h.submit(h.command(ttl=4_000))
    assert (Timer.ACK, 0, T0 + 4_000) in started(effects)


def test_ack_marks_the_command_delivered_and_cancels_its_ack_timer():
    h = Harness()
    h.subscribe(1)
    c = h.command()
    h.submit(c)
    effects = h.ack(0)
    assert statuses(effects) == [(0, DELIVERED)]
    assert cancelled(effects) == [(Timer.ACK, 0)]
    assert results(effects) == {}
    pending = h.queue.find(c.rpc_id)
    assert pending.delivered and pending.status is DELIVERED and pending.in_flight_on is None
    assert set(h.armed) == {(Timer.EXPIRY, 0)}


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_one_way_command_completes_on_ack_with_an_empty_ok_result(strategy):
    h = Harness(strategy)
    h.subscribe(1)
    c = h.command(oneway=True)
    h.submit(c)
    effects = h.ack(0)
    assert statuses(effects) == [(0, DELIVERED), (0, SUCCESSFUL)]
    result = results(effects)[c.rpc_id]
    assert result == RpcResult()
    assert result.ok and not result.has_response and result.response is None
    assert len(h.queue) == 0
    assert h.armed == {}
    assert (Timer.RESPONSE, 0) not in [(k, r) for k, r, _ in started(effects)]


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_two_way_command_completes_on_answer_with_the_device_response(strategy):
    h = Harness(strategy)
    h.subscribe(1)
    c = h.command()
    h.submit(c)
    h.ack(0)
    effects = h.answer(0, {"pin": 7, "value": 1})
    assert statuses(effects) == [(0, SUCCESSFUL)]
    assert status_changes(effects)[0].response == {"pin": 7, "value": 1}
    assert results(effects) == {c.rpc_id: RpcResult(response={"pin": 7, "value": 1}, has_response=True)}
    assert len(h.queue) == 0
    assert h.armed == {}


@pytest.mark.parametrize("strategy", [BURST, ON_ACK])
def test_an_acked_two_way_command_waits_for_its_answer_until_expiry_without_a_response_timer(strategy):
    h = Harness(strategy)
    h.subscribe(1)
    h.submit(h.command())
    effects = h.ack(0)
    assert not any(k is Timer.RESPONSE for k, _, _ in started(effects))
    assert len(h.queue) == 1


def test_an_answer_with_a_null_payload_is_still_a_response():
    h = Harness()
    h.subscribe(1)
    c = h.command()
    h.submit(c)
    result = results(h.answer(0, None))[c.rpc_id]
    assert result.ok and result.has_response and result.response is None


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_an_answer_before_the_ack_implies_delivery_then_success_and_cancels_the_ack_timer(strategy):
    h = Harness(strategy)
    h.subscribe(1)
    c = h.command()
    h.submit(c)
    effects = h.answer(0, "ok")
    assert statuses(effects) == [(0, DELIVERED), (0, SUCCESSFUL)]
    assert (Timer.ACK, 0) in cancelled(effects)
    assert results(effects)[c.rpc_id] == RpcResult(response="ok", has_response=True)
    assert h.armed == {}


def test_a_late_ack_after_the_answer_is_ignored():
    h = Harness()
    h.subscribe(1)
    h.submit(h.command())
    h.answer(0, "ok")
    assert h.ack(0) == []


def test_an_answer_for_an_unknown_request_id_is_ignored():
    h = Harness()
    h.subscribe(1)
    h.submit(h.command())
    assert h.answer(42, "hello") == []
    assert len(h.queue) == 1


def test_a_second_answer_for_the_same_request_id_is_ignored():
    h = Harness()
    h.subscribe(1)
    h.submit(h.command())
    h.answer(0, "first")
    assert h.answer(0, "second") == []


def test_an_ack_for_an_unknown_request_id_is_ignored():
    h = Harness()
    h.subscribe(1)
    h.submit(h.command())
    assert h.ack(42) == []


def test_a_duplicate_ack_is_ignored():
    h = Harness()
    h.subscribe(1)
    h.submit(h.command())
    h.ack(0)
    assert h.ack(0) == []


def test_a_late_ack_after_an_ack_timeout_still_delivers_the_command():
    h = Harness(ack_timeout_ms=1_000)
    h.subscribe(1, one_shot=True)
    h.submit(h.command())
    assert statuses(h.fire(Timer.ACK, 0)) == [(0, TIMEOUT)]  # no session left to resend on
    effects = h.ack(0)
    assert statuses(effects) == [(0, DELIVERED)]
    assert cancelled(effects) == []  # nothing was in flight


def test_an_ack_of_an_earlier_write_delivers_a_command_that_was_resent():
    h = Harness(ack_timeout_ms=1_000)
    h.subscribe(1)
    h.submit(h.command())
    h.fire(Timer.ACK, 0)  # TIMEOUT, written again
    effects = h.ack(0)
    assert statuses(effects) == [(0, DELIVERED)]
    assert cancelled(effects) == [(Timer.ACK, 0)]


# --- one-way success (DELIVERED then SUCCESSFUL) ------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_an_acked_one_way_command_reports_delivered_then_successful_with_no_response_before_it_finishes(strategy):
    h = Harness(strategy)
    h.subscribe(1)
    c = h.command(oneway=True)
    h.submit(c)
    effects = h.ack(0)
    delivered, successful = status_changes(effects)
    assert (delivered.status, successful.status) == (DELIVERED, SUCCESSFUL)
    assert delivered.response is None and successful.response is None
    assert successful.pending.request_id == 0
    # The Finished comes last, after the terminal status, so a caller never learns the result before it is recorded.
    order = [e for e in effects if isinstance(e, (StatusChanged, Finished))]
    assert [type(e) for e in order] == [StatusChanged, StatusChanged, Finished]
    assert results(effects) == {c.rpc_id: RpcResult()}


def test_a_one_way_command_acked_late_after_an_ack_timeout_still_reports_delivered_then_successful():
    h = Harness(ack_timeout_ms=1_000)
    h.subscribe(1, one_shot=True)
    c = h.command(oneway=True)
    h.submit(c)
    h.fire(Timer.ACK, 0)  # TIMEOUT, no session to resend on
    effects = h.ack(0)
    assert statuses(effects) == [(0, DELIVERED), (0, SUCCESSFUL)]
    assert results(effects) == {c.rpc_id: RpcResult()}
    assert len(h.queue) == 0 and h.armed == {}


def test_a_one_way_command_that_the_device_answers_reports_successful_with_the_answer():
    h = Harness()
    h.subscribe(1)
    c = h.command(oneway=True)
    h.submit(c)
    effects = h.answer(0, "done")
    assert statuses(effects) == [(0, DELIVERED), (0, SUCCESSFUL)]
    assert status_changes(effects)[-1].response == "done"
    assert results(effects) == {c.rpc_id: RpcResult(response="done", has_response=True)}


def test_an_ack_after_a_one_way_command_succeeded_is_ignored():
    h = Harness()
    h.subscribe(1)
    h.submit(h.command(oneway=True))
    h.ack(0)
    assert h.ack(0) == []
    assert h.answer(0, "late") == []


# --- acks and answers for commands never written to a device ----------------------------------------------------


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_an_ack_for_a_queued_command_never_sent_is_ignored_and_the_command_is_still_sent_later(strategy):
    h = Harness(strategy)
    c = h.command()
    h.submit(c)
    assert h.ack(0) == []
    pending = h.queue.find(c.rpc_id)
    assert pending.status is Q and not pending.delivered and not pending.ever_sent
    effects = h.subscribe(1)
    assert statuses(effects) == [(0, SENT)]
    assert sends(effects) == [(1, 0)]


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_an_answer_for_a_queued_command_never_sent_is_ignored_and_the_command_still_expires_as_device_offline(
    strategy
):
    h = Harness(strategy)
    c = h.command(ttl=5_000)
    h.submit(c)
    assert h.answer(0, "forged") == []
    assert h.queue.find(c.rpc_id).status is Q
    assert set(h.armed) == {(Timer.EXPIRY, 0)}
    assert failure(h.advance(5_000), c) is RpcFailure.DEVICE_OFFLINE


@pytest.mark.parametrize("oneway", [False, True])
def test_an_ack_for_a_queued_one_way_or_two_way_command_never_sent_neither_delivers_nor_completes_it(oneway):
    h = Harness()
    c = h.command(oneway=oneway)
    h.submit(c)
    assert h.ack(0) == []
    assert len(h.queue) == 1 and h.queue.find(c.rpc_id).status is Q


@pytest.mark.parametrize("strategy", SEQUENTIAL)
def test_under_sequential_strategies_an_ack_or_answer_for_a_command_waiting_behind_the_head_is_ignored(strategy):
    h = Harness(strategy)
    h.subscribe(1)
    head, waiting = h.command(), h.command()
    h.submit(head)
    h.submit(waiting)
    assert h.ack(1) == []
    assert h.answer(1, "forged") == []
    assert h.queue.find(waiting.rpc_id).status is Q
    # Once it really is written, the same ack is accepted.
    h.answer(0, "ok")
    assert statuses(h.ack(1)) == [(1, DELIVERED)]


def test_under_burst_an_ack_for_a_command_held_back_by_max_in_flight_is_ignored_and_frees_nothing():
    h = Harness(BURST, max_in_flight=1)
    h.subscribe(1)
    h.submit(h.command())
    h.submit(h.command())
    assert h.ack(1) == []
    assert sends(h.ack(0)) == [(1, 1)]


def test_an_ack_or_answer_for_a_restored_queued_command_never_sent_is_ignored():
    h = Harness()
    c = h.command()
    h.restore(c, Q, request_id=40)
    assert h.ack(40) == []
    assert h.answer(40, "forged") == []
    assert h.queue.find(c.rpc_id).status is Q


def test_an_ack_for_a_command_put_back_by_a_session_close_is_still_accepted_because_it_was_written():
    h = Harness()
    h.subscribe(1)
    c = h.command()
    h.submit(c)
    h.close(1)
    effects = h.ack(0)
    assert statuses(effects) == [(0, DELIVERED)]
    assert cancelled(effects) == []  # nothing in flight any more


# --- retries -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_an_ack_timeout_marks_the_command_timeout_and_resends_it_under_every_strategy(strategy):
    h = Harness(strategy, ack_timeout_ms=1_000)
    h.subscribe(1)
    c = h.command()
    h.submit(c)
    effects = h.advance(1_000)
    assert statuses(effects) == [(0, TIMEOUT), (0, SENT)]
    assert sends(effects) == [(1, 0)]
    assert started(effects) == [(Timer.ACK, 0, T0 + 2_000)]
    assert h.queue.find(c.rpc_id).attempts == 1


def test_a_resent_command_keeps_its_request_id():
    h = Harness(ack_timeout_ms=1_000)
    h.subscribe(1)
    h.submit(h.command())
    h.submit(h.command())
    effects = h.fire(Timer.ACK, 0)
    assert sends(effects) == [(1, 0)]


@pytest.mark.parametrize(
    ("retries", "max_retries", "limit"),
    [(2, 5, 2), (7, 3, 3), (None, 4, 4), (None, 5, 5), (0, 5, 0), (3, 0, 0), (-1, 5, 0)],
)
def test_retries_are_bounded_by_the_smaller_of_the_command_retries_and_max_retries_then_the_command_fails(
    retries, max_retries, limit
):
    h = Harness(max_retries=max_retries, ack_timeout_ms=1_000)
    h.subscribe(1)
    c = h.command(ttl=1_000_000, retries=retries)
    effects = h.submit(c)
    while c.rpc_id not in results(effects):
        effects += h.fire(Timer.ACK, 0)
    assert [s for _, s in statuses(effects)].count(TIMEOUT) == limit
    assert len(sends(effects)) == limit + 1
    final = status_changes(effects)[-1]
    assert final.status is FAILED
    assert final.response == {"error": RETRIES_TEXT.format(limit)}
    assert results(effects)[c.rpc_id] == RpcResult(failure=RpcFailure.NOT_DELIVERED)
    assert len(h.queue) == 0 and h.armed == {}


def test_retries_exhausted_text_is_thingsboards():
    assert RETRIES_EXHAUSTED.format(n=5) == RETRIES_TEXT.format(5)
    assert RESPONSE_TIMEOUT == RESPONSE_TEXT


def test_retries_zero_fails_on_the_first_ack_timeout():
    h = Harness(ack_timeout_ms=1_000)
    h.subscribe(1)
    c = h.command(retries=0)
    h.submit(c)
    effects = h.advance(1_000)
    assert statuses(effects) == [(0, FAILED)]
    assert status_changes(effects)[0].response == {"error": RETRIES_TEXT.format(0)}
    assert failure(effects, c) is RpcFailure.NOT_DELIVERED
    assert sends(effects) == []


def test_retries_none_uses_max_retries():
    h = Harness(max_retries=5, ack_timeout_ms=1_000)
    h.subscribe(1)
    c = h.command(ttl=1_000_000, retries=None)
    h.submit(c)
    for attempt in range(1, 6):
        assert statuses(h.fire(Timer.ACK, 0)) == [(0, TIMEOUT), (0, SENT)]
        assert h.queue.find(c.rpc_id).attempts == attempt
    effects = h.fire(Timer.ACK, 0)
    assert status_changes(effects)[-1].response == {"error": RETRIES_TEXT.format(5)}
    assert failure(effects, c) is RpcFailure.NOT_DELIVERED


def test_an_ack_timeout_while_no_session_is_subscribed_waits_in_timeout_for_the_next_subscription():
    h = Harness(ack_timeout_ms=1_000)
    h.subscribe(1, one_shot=True)
    c = h.command()
    h.submit(c)  # the long-poll took it and is gone
    effects = h.advance(1_000)
    assert statuses(effects) == [(0, TIMEOUT)]
    assert sends(effects) == []
    assert h.queue.find(c.rpc_id).status is TIMEOUT
    effects = h.subscribe(2, one_shot=True)
    assert statuses(effects) == [(0, SENT)]
    assert sends(effects) == [(2, 0)]


def test_a_stale_ack_timeout_after_the_ack_is_ignored():
    h = Harness()
    h.subscribe(1)
    h.submit(h.command())
    h.ack(0)
    assert h.queue.ack_timed_out(0, h.now + 10_000) == []


def test_a_stale_ack_timeout_after_the_session_closed_is_ignored():
    h = Harness()
    h.subscribe(1)
    c = h.command()
    h.submit(c)
    h.close(1)
    assert h.queue.ack_timed_out(0, h.now + 10_000) == []
    assert h.queue.find(c.rpc_id).attempts == 0


def test_timer_events_for_removed_commands_are_ignored():
    h = Harness()
    h.subscribe(1)
    h.submit(h.command())
    h.answer(0, 1)
    later = h.now + 100_000
    assert h.queue.ack_timed_out(0, later) == []
    assert h.queue.response_timed_out(0, later) == []
    assert h.queue.expired(0, later) == []


# --- expiry ------------------------------------------------------------------------------------------------------


def test_expiry_of_a_command_that_was_never_sent_reports_the_device_offline():
    h = Harness()
    c = h.command(ttl=5_000)
    h.submit(c)
    effects = h.advance(5_000)
    assert statuses(effects) == [(0, EXPIRED)]
    assert results(effects) == {c.rpc_id: RpcResult(failure=RpcFailure.DEVICE_OFFLINE)}
    assert len(h.queue) == 0 and h.armed == {}


def test_expiry_of_a_sent_but_unacknowledged_command_reports_not_delivered():
    h = Harness(ack_timeout_ms=10_000)
    h.subscribe(1)
    c = h.command(ttl=5_000)
    h.submit(c)
    effects = h.advance(5_000)
    assert statuses(effects) == [(0, EXPIRED)]
    assert (Timer.ACK, 0) in cancelled(effects)
    assert failure(effects, c) is RpcFailure.NOT_DELIVERED
    assert h.armed == {}


def test_expiry_after_the_sending_session_closed_still_reports_not_delivered():
    h = Harness()
    h.subscribe(1)
    c = h.command(ttl=5_000)
    h.submit(c)
    h.close(1)
    assert failure(h.advance(5_000), c) is RpcFailure.NOT_DELIVERED


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_expiry_of_a_delivered_but_unanswered_command_reports_no_response(strategy):
    h = Harness(strategy, response_timeout_ms=60_000)
    h.subscribe(1)
    c = h.command(ttl=5_000)
    h.submit(c)
    h.ack(0)
    effects = h.advance(5_000)
    assert statuses(effects)[-1] == (0, EXPIRED)
    assert failure(effects, c) is RpcFailure.NO_RESPONSE
    assert h.armed == {}


def test_a_command_already_expired_at_submit_is_expired_and_reported_offline_with_nothing_pending():
    h = Harness()
    h.subscribe(1)
    c = h.command(ttl=0)
    effects = h.submit(c)
    assert statuses(effects) == [(0, EXPIRED)]
    assert results(effects) == {c.rpc_id: RpcResult(failure=RpcFailure.DEVICE_OFFLINE)}
    assert sends(effects) == [] and started(effects) == [] and cancelled(effects) == []
    assert len(h.queue) == 0
    assert h.queue.find(c.rpc_id) is None


def test_a_command_expired_at_submit_still_uses_up_a_request_id():
    h = Harness()
    h.submit(h.command(ttl=-1))
    assert statuses(h.submit(h.command())) == [(1, Q)]


# --- delete ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["queued", "sent", "delivered"])
def test_deleting_a_pending_command_reports_deleted_and_cancels_its_timers(stage):
    h = Harness(ON_RESPONSE)
    c = h.command()
    if stage != "queued":
        h.subscribe(1)
    h.submit(c)
    if stage == "delivered":
        h.ack(0)
    effects = h.delete(c.rpc_id)
    assert statuses(effects) == [(0, DELETED)]
    assert results(effects) == {c.rpc_id: RpcResult(failure=RpcFailure.DELETED)}
    assert len(h.queue) == 0
    assert h.queue.find(c.rpc_id) is None
    assert h.armed == {}


@pytest.mark.parametrize("strategy", SEQUENTIAL)
def test_deleting_the_command_in_flight_releases_the_next_one_under_sequential_strategies(strategy):
    h = Harness(strategy)
    h.subscribe(1)
    first, second = h.command(), h.command()
    h.submit(first)
    assert sends(h.submit(second)) == []
    effects = h.delete(first.rpc_id)
    assert sends(effects) == [(1, 1)]


def test_deleting_an_unknown_id_has_no_effects():
    h = Harness()
    h.submit(h.command())
    assert h.delete(UUID(int=999)) == []
    assert len(h.queue) == 1


def test_deleting_twice_has_no_effects_the_second_time():
    h = Harness()
    c = h.command()
    h.submit(c)
    h.delete(c.rpc_id)
    assert h.delete(c.rpc_id) == []


# --- strategies --------------------------------------------------------------------------------------------------


def test_burst_sends_every_command_at_once():
    h = Harness(BURST)
    h.subscribe(1)
    effects = []
    for _ in range(4):
        effects += h.submit(h.command())
    assert sends(effects) == [(1, 0), (1, 1), (1, 2), (1, 3)]


def test_burst_sends_at_most_max_in_flight_and_the_rest_as_acks_come_in():
    h = Harness(BURST, max_in_flight=2)
    for _ in range(5):
        h.submit(h.command())
    assert sends(h.subscribe(1)) == [(1, 0), (1, 1)]
    assert sends(h.ack(1)) == [(1, 2)]
    assert sends(h.answer(0, "x")) == [(1, 3)]
    assert sends(h.ack(0)) == []  # late ack after the answer: nothing freed
    assert sends(h.ack(2)) == [(1, 4)]


def test_burst_frees_a_slot_when_a_command_in_flight_fails_expires_or_is_deleted():
    h = Harness(BURST, max_in_flight=1, ack_timeout_ms=1_000)
    h.subscribe(1)
    cs = [h.command(retries=0), h.command(ttl=1_500), h.command(), h.command()]
    for c in cs:
        h.submit(c)
    assert sends(h.fire(Timer.ACK, 0)) == [(1, 1)]  # failed
    assert sends(h.advance_to(T0 + 1_500)) == [(1, 2)]  # expired (its ack timer, capped at expiry, fires after)
    assert sends(h.delete(cs[2].rpc_id)) == [(1, 3)]  # deleted


def test_burst_does_not_count_delivered_commands_awaiting_an_answer_as_in_flight():
    h = Harness(BURST, max_in_flight=1)
    h.subscribe(1)
    h.submit(h.command())
    h.submit(h.command())
    assert sends(h.ack(0)) == [(1, 1)]


def test_burst_does_not_resend_a_delivered_command_to_a_new_session():
    h = Harness(BURST)
    h.subscribe(1)
    h.submit(h.command())
    h.ack(0)
    h.close(1)
    assert h.subscribe(2) == []


def test_sequential_on_ack_sends_the_next_command_only_after_the_previous_is_acked():
    h = Harness(ON_ACK)
    h.subscribe(1)
    effects = []
    for _ in range(3):
        effects += h.submit(h.command())
    assert sends(effects) == [(1, 0)]
    assert sends(h.ack(0)) == [(1, 1)]
    assert sends(h.ack(1)) == [(1, 2)]


def test_sequential_on_ack_a_delivered_command_awaiting_its_answer_does_not_block_the_next():
    h = Harness(ON_ACK)
    h.subscribe(1)
    h.submit(h.command())
    h.submit(h.command())
    assert sends(h.ack(0)) == [(1, 1)]
    assert sends(h.ack(1)) == []
    assert len(h.queue) == 2


@pytest.mark.parametrize("how", ["failed", "expired", "deleted"])
def test_sequential_on_ack_releases_the_next_command_when_the_previous_one_ends_without_an_ack(how):
    h = Harness(ON_ACK, ack_timeout_ms=1_000)
    h.subscribe(1)
    first = h.command(retries=0, ttl=500 if how == "expired" else 60_000)
    h.submit(first)
    h.submit(h.command())
    if how == "failed":
        effects = h.fire(Timer.ACK, 0)
    elif how == "expired":
        effects = h.advance(500)
    else:
        effects = h.delete(first.rpc_id)
    assert first.rpc_id in results(effects)
    assert sends(effects) == [(1, 1)]


def test_sequential_on_ack_retries_the_head_before_anything_else():
    h = Harness(ON_ACK, ack_timeout_ms=1_000)
    h.subscribe(1)
    h.submit(h.command())
    h.submit(h.command())
    assert sends(h.fire(Timer.ACK, 0)) == [(1, 0)]


def test_sequential_on_response_sends_the_next_command_only_after_the_previous_is_answered():
    h = Harness(ON_RESPONSE)
    h.subscribe(1)
    h.submit(h.command())
    assert sends(h.submit(h.command())) == []
    assert sends(h.ack(0)) == []
    assert sends(h.answer(0, "done")) == [(1, 1)]


def test_sequential_on_response_arms_the_response_timer_on_ack():
    h = Harness(ON_RESPONSE, response_timeout_ms=30_000)
    h.subscribe(1)
    h.submit(h.command(ttl=120_000))
    h.now += 2_000
    effects = h.ack(0)
    assert started(effects) == [(Timer.RESPONSE, 0, T0 + 32_000)]
    assert cancelled(h.answer(0, 1)) == [(Timer.EXPIRY, 0), (Timer.RESPONSE, 0)]


def test_sequential_on_response_caps_the_response_timer_at_the_expiration_time():
    h = Harness(ON_RESPONSE, response_timeout_ms=30_000)
    h.subscribe(1)
    h.submit(h.command(ttl=10_000))
    assert started(h.ack(0)) == [(Timer.RESPONSE, 0, T0 + 10_000)]


def test_sequential_on_response_a_response_timeout_fails_the_command_and_releases_the_next():
    h = Harness(ON_RESPONSE, response_timeout_ms=30_000)
    h.subscribe(1)
    c = h.command(ttl=120_000)
    h.submit(c)
    h.submit(h.command(ttl=120_000))
    h.ack(0)
    effects = h.advance(30_000)
    assert statuses(effects) == [(0, FAILED), (1, SENT)]
    assert status_changes(effects)[0].response == {"error": RESPONSE_TEXT}
    assert results(effects) == {c.rpc_id: RpcResult(failure=RpcFailure.NO_RESPONSE)}
    assert sends(effects) == [(1, 1)]
    h.assert_timers_match_pending()


def test_sequential_on_response_a_one_way_command_releases_the_next_on_ack():
    h = Harness(ON_RESPONSE)
    h.subscribe(1)
    h.submit(h.command(oneway=True))
    h.submit(h.command())
    effects = h.ack(0)
    assert not any(k is Timer.RESPONSE for k, _, _ in started(effects))
    assert sends(effects) == [(1, 1)]


@pytest.mark.parametrize("how", ["failed", "expired", "deleted", "expired after delivery"])
def test_sequential_on_response_releases_the_next_command_when_the_previous_one_ends_unanswered(how):
    h = Harness(ON_RESPONSE, ack_timeout_ms=1_000, response_timeout_ms=60_000)
    h.subscribe(1)
    first = h.command(retries=0, ttl=60_000 if how in {"failed", "deleted"} else 500)
    h.submit(first)
    h.submit(h.command())
    if how == "failed":
        effects = h.fire(Timer.ACK, 0)
    elif how == "deleted":
        h.ack(0)
        effects = h.delete(first.rpc_id)
    else:
        if how == "expired after delivery":
            h.ack(0)
        effects = h.fire(Timer.EXPIRY, 0)
    assert first.rpc_id in results(effects)
    assert sends(effects) == [(1, 1)]
    h.assert_timers_match_pending()


def test_sequential_on_response_does_not_resend_a_delivered_head_on_resubscription():
    h = Harness(ON_RESPONSE)
    h.subscribe(1)
    h.submit(h.command())
    h.submit(h.command())
    h.ack(0)
    h.close(1)
    assert h.subscribe(2) == []
    assert (Timer.RESPONSE, 0) in h.armed  # still waiting for the answer, which may come on any session


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_a_device_that_acks_but_never_answers_does_not_block_the_queue_forever(strategy):
    h = Harness(strategy, response_timeout_ms=30_000)
    h.subscribe(1)
    first, second = h.command(ttl=600_000), h.command(ttl=600_000)
    effects = h.submit(first) + h.submit(second)
    effects += h.ack(0)
    effects += h.advance(30_000)
    assert (1, 1) in sends(effects)
    assert second.rpc_id not in results(effects)


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_a_device_that_never_acks_does_not_block_the_queue_forever(strategy):
    h = Harness(strategy, ack_timeout_ms=1_000, max_retries=2)
    h.subscribe(1)
    first, second = h.command(ttl=600_000), h.command(ttl=600_000)
    effects = h.submit(first) + h.submit(second)
    effects += h.advance(3_000)  # three writes of the first, then it fails
    assert failure(effects, first) is RpcFailure.NOT_DELIVERED
    assert (1, 1) in sends(effects)


# --- sessions ----------------------------------------------------------------------------------------------------


def test_commands_go_to_the_most_recently_subscribed_session():
    h = Harness()
    h.subscribe(1)
    h.subscribe(2)
    assert sends(h.submit(h.command())) == [(2, 0)]


def test_subscribing_again_makes_a_session_the_most_recent():
    h = Harness()
    h.subscribe(1)
    h.subscribe(2)
    assert h.subscribe(1) == []
    assert sends(h.submit(h.command())) == [(1, 0)]


def test_a_one_shot_session_takes_exactly_one_command_and_is_then_removed():
    h = Harness(BURST)
    for _ in range(3):
        h.submit(h.command())
    effects = h.subscribe(9, one_shot=True)
    assert sends(effects) == [(9, 0)]
    assert 9 not in h.queue.subscriptions
    assert sends(h.submit(h.command())) == []
    assert sends(h.subscribe(10, one_shot=True)) == [(10, 1)]


def test_a_one_shot_session_waits_for_a_command_if_none_is_pending():
    h = Harness()
    assert h.subscribe(9, one_shot=True) == []
    assert sends(h.submit(h.command())) == [(9, 0)]
    assert sends(h.submit(h.command())) == []


def test_under_burst_a_one_shot_session_takes_one_command_and_the_older_persistent_session_the_rest():
    h = Harness(BURST)
    h.subscribe(1)
    h.subscribe(9, one_shot=True)
    effects = h.submit(h.command()) + h.submit(h.command()) + h.submit(h.command())
    assert sends(effects) == [(9, 0), (1, 1), (1, 2)]


def test_under_burst_commands_put_back_by_a_close_go_one_to_each_waiting_one_shot_session_newest_first():
    h = Harness(BURST, max_in_flight=3)
    h.subscribe(1)
    for _ in range(3):
        h.submit(h.command())
    h.subscribe(8, one_shot=True)
    h.subscribe(9, one_shot=True)
    effects = h.close(1)
    assert sends(effects) == [(9, 0), (8, 1)]
    assert h.queue.subscriptions == {}
    assert sends(h.subscribe(10, one_shot=True)) == [(10, 2)]


def test_an_acked_one_shot_write_completes_a_one_way_command():
    h = Harness()
    c = h.command(oneway=True)
    h.submit(c)
    h.subscribe(9, one_shot=True)
    assert results(h.ack(0)) == {c.rpc_id: RpcResult()}


def test_closing_a_session_puts_its_commands_back_to_be_resent_on_the_next_subscription_without_counting_a_retry():
    h = Harness(BURST, ack_timeout_ms=1_000)
    h.subscribe(1)
    cs = [h.command(retries=1), h.command(retries=1)]
    for c in cs:
        h.submit(c)
    effects = h.close(1)
    assert cancelled(effects) == [(Timer.ACK, 0), (Timer.ACK, 1)]
    assert statuses(effects) == [] and sends(effects) == []
    for c in cs:
        pending = h.queue.find(c.rpc_id)
        assert pending.attempts == 0 and pending.in_flight_on is None and pending.status is SENT
    effects = h.subscribe(2)
    assert sends(effects) == [(2, 0), (2, 1)]
    assert statuses(effects) == []  # still SENT: no new status for a rewrite
    assert started(effects) == [(Timer.ACK, 0, h.now + 1_000), (Timer.ACK, 1, h.now + 1_000)]
    # The budget is intact: the single retry is still available.
    assert statuses(h.fire(Timer.ACK, 0)) == [(0, TIMEOUT), (0, SENT)]


def test_closing_a_session_resends_its_commands_at_once_on_another_subscribed_session():
    h = Harness()
    h.subscribe(1)
    h.subscribe(2)
    h.submit(h.command())
    effects = h.close(2)
    assert cancelled(effects) == [(Timer.ACK, 0)]
    assert sends(effects) == [(1, 0)]


def test_closing_a_session_only_touches_the_commands_in_flight_on_it():
    h = Harness()
    h.subscribe(1)
    h.submit(h.command())
    h.subscribe(2)
    h.submit(h.command())
    effects = h.close(1)
    assert cancelled(effects) == [(Timer.ACK, 0)]
    assert sends(effects) == [(2, 0)]
    assert h.queue.pending[1].in_flight_on == 2


def test_closing_a_one_shot_session_that_took_a_command_puts_the_command_back():
    h = Harness()
    h.submit(h.command())
    h.subscribe(9, one_shot=True)
    effects = h.close(9)
    assert cancelled(effects) == [(Timer.ACK, 0)]
    assert sends(h.subscribe(10, one_shot=True)) == [(10, 0)]


def test_closing_an_unknown_session_is_harmless():
    h = Harness()
    h.subscribe(1)
    h.submit(h.command())
    assert h.close(5) == []
    assert list(h.queue.subscriptions) == [1]


def test_a_device_with_no_subscribed_session_is_sent_nothing():
    h = Harness()
    h.subscribe(1)
    h.close(1)
    effects = h.submit(h.command()) + h.submit(h.command()) + h.advance(30_000)
    assert sends(effects) == []


def test_request_ids_are_a_per_queue_counter_starting_at_zero():
    a, b = Harness(), Harness()
    assert [statuses(a.submit(a.command()))[0][0] for _ in range(3)] == [0, 1, 2]
    assert statuses(b.submit(b.command()))[0][0] == 0


def test_request_ids_are_never_reused_after_commands_finish():
    h = Harness()
    h.subscribe(1)
    c = h.command()
    h.submit(c)
    h.answer(0, 1)
    assert statuses(h.submit(h.command()))[0] == (1, Q)


def test_a_command_resent_after_a_session_close_keeps_its_request_id():
    h = Harness()
    h.subscribe(1)
    h.submit(h.command())
    h.submit(h.command())
    h.close(1)
    assert sends(h.subscribe(2)) == [(2, 0), (2, 1)]


def test_submit_with_an_explicit_request_id_uses_it_for_the_status_the_timers_and_the_send():
    h = Harness(ack_timeout_ms=1_000)
    h.subscribe(1)
    c = h.command(ttl=30_000)
    effects = h.submit(c, request_id=500)
    assert statuses(effects) == [(500, Q), (500, SENT)]
    assert started(effects) == [(Timer.EXPIRY, 500, T0 + 30_000), (Timer.ACK, 500, T0 + 1_000)]
    assert sends(effects) == [(1, 500)]
    assert h.queue.find(c.rpc_id).request_id == 500
    assert list(h.queue.pending) == [500]


def test_a_command_with_an_explicit_request_id_is_acked_answered_and_timed_out_by_that_id():
    h = Harness(ON_RESPONSE, ack_timeout_ms=1_000, response_timeout_ms=5_000)
    h.subscribe(1)
    first, second = h.command(), h.command()
    h.submit(first, request_id=70)
    h.submit(second, request_id=71)
    assert statuses(h.fire(Timer.ACK, 70)) == [(70, TIMEOUT), (70, SENT)]
    assert started(h.ack(70)) == [(Timer.RESPONSE, 70, h.now + 5_000)]
    effects = h.answer(70, "ok")
    assert results(effects)[first.rpc_id] == RpcResult(response="ok", has_response=True)
    assert sends(effects) == [(1, 71)]
    assert h.ack(0) == [] and h.answer(0, "x") == []  # the per-queue counter's ids were never used


def test_submit_without_a_request_id_continues_the_counter_past_the_highest_explicit_id():
    h = Harness()
    h.submit(h.command(), request_id=10)
    assert statuses(h.submit(h.command()))[0] == (11, Q)
    assert h.queue.next_request_id == 12


def test_an_explicit_request_id_below_the_counter_is_used_and_does_not_move_the_counter_back():
    h = Harness()
    h.submit(h.command(), request_id=10)
    c = h.command()
    assert statuses(h.submit(c, request_id=3))[0] == (3, Q)
    assert h.queue.find(c.rpc_id).request_id == 3
    assert h.queue.next_request_id == 11
    assert statuses(h.submit(h.command()))[0] == (11, Q)


def test_commands_with_explicit_request_ids_are_sent_in_submission_order_not_id_order():
    h = Harness()
    for rid in (9, 4, 6):
        h.submit(h.command(), request_id=rid)
    assert sends(h.subscribe(1)) == [(1, 9), (1, 4), (1, 6)]


def test_a_command_expired_at_submit_with_an_explicit_request_id_still_moves_the_counter_past_it():
    h = Harness()
    c = h.command(ttl=0)
    effects = h.submit(c, request_id=20)
    assert statuses(effects) == [(20, EXPIRED)]
    assert results(effects) == {c.rpc_id: RpcResult(failure=RpcFailure.DEVICE_OFFLINE)}
    assert len(h.queue) == 0
    assert statuses(h.submit(h.command()))[0] == (21, Q)


def test_explicit_request_ids_from_a_shared_source_keep_two_queues_ids_apart():
    ids = itertools.count(100)
    a, b = Harness(), Harness()
    assert statuses(a.submit(a.command(), request_id=next(ids)))[0] == (100, Q)
    assert statuses(b.submit(b.command(), request_id=next(ids)))[0] == (101, Q)
    assert statuses(a.submit(a.command(), request_id=next(ids)))[0] == (102, Q)


def test_the_queue_is_idle_only_without_commands_and_subscriptions():
    h = Harness()
    assert h.queue.is_idle
    h.subscribe(1)
    assert not h.queue.is_idle
    c = h.command()
    h.submit(c)
    h.close(1)
    assert not h.queue.is_idle
    h.delete(c.rpc_id)
    assert h.queue.is_idle


# --- restore -----------------------------------------------------------------------------------------------------


def test_restore_keeps_the_stored_order_and_does_not_report_queued_again():
    h = Harness()
    stored = [(h.command(), Q), (h.command(), SENT), (h.command(), TIMEOUT), (h.command(), DELIVERED)]
    effects = []
    for c, status in stored:
        effects += h.restore(c, status)
    assert statuses(effects) == []
    assert [h.queue.find(c.rpc_id).request_id for c, _ in stored] == [0, 1, 2, 3]
    assert started(effects) == [(Timer.EXPIRY, rid, T0 + 60_000) for rid in range(4)]
    effects = h.subscribe(1)
    # All go in their stored order, the delivered two-way one too (its answer may have died with the crash).
    assert sends(effects) == [(1, 0), (1, 1), (1, 2), (1, 3)]
    # SENT is already SENT and DELIVERED stays DELIVERED: only the never-sent and the timed-out ones report SENT.
    assert statuses(effects) == [(0, SENT), (2, SENT)]


@pytest.mark.parametrize("status", [Q, SENT, TIMEOUT])
def test_restore_keeps_the_stored_request_id_status_and_attempts_and_reports_no_status(status):
    h = Harness(max_retries=5)
    c = h.command(ttl=30_000)
    effects = h.restore(c, status, request_id=1234, attempts=2)
    assert statuses(effects) == []
    assert started(effects) == [(Timer.EXPIRY, 1234, T0 + 30_000)]
    assert sends(effects) == [] and results(effects) == {}
    pending = h.queue.find(c.rpc_id)
    assert pending.request_id == 1234 and list(h.queue.pending) == [1234]
    assert pending.status is status
    assert pending.attempts == 2
    assert pending.ever_sent == (status is not Q)
    assert not pending.delivered and not pending.delivered_before_restart
    assert pending.in_flight_on is None


def test_restore_holds_a_delivered_two_way_command_as_sent_but_unconfirmed_keeping_its_request_id_and_attempts():
    """In memory it is SENT (so its resend reports nothing) and not delivered (so it is resent); nothing is
    reported, so its stored status stays DELIVERED."""
    h = Harness(max_retries=5)
    c = h.command(ttl=30_000)
    effects = h.restore(c, DELIVERED, request_id=1234, attempts=2)
    assert statuses(effects) == []
    assert started(effects) == [(Timer.EXPIRY, 1234, T0 + 30_000)]
    assert sends(effects) == [] and results(effects) == {}
    pending = h.queue.find(c.rpc_id)
    assert pending.request_id == 1234 and list(h.queue.pending) == [1234]
    assert pending.status is SENT
    assert pending.attempts == 2
    assert pending.ever_sent and not pending.delivered and pending.delivered_before_restart
    assert pending.in_flight_on is None


@pytest.mark.parametrize("status", [Q, SENT, TIMEOUT, DELIVERED])
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_restore_never_reports_queued(strategy, status):
    h = Harness(strategy)
    h.subscribe(1)
    effects = h.restore(h.command(), status, request_id=5) + h.restore(h.command(ttl=0), status, request_id=6)
    assert Q not in [s for _, s in statuses(effects)]


def test_restore_without_a_request_id_uses_and_continues_the_counter():
    h = Harness()
    h.submit(h.command())
    h.restore(h.command(), SENT)
    assert statuses(h.submit(h.command())) == [(2, Q)]


def test_restore_with_explicit_request_ids_moves_the_counter_past_the_highest():
    h = Harness()
    h.restore(h.command(), SENT, request_id=41)
    h.restore(h.command(), Q, request_id=42)
    assert h.queue.next_request_id == 43
    assert statuses(h.submit(h.command()))[0] == (43, Q)


def test_a_restored_command_already_expired_still_moves_the_counter_past_its_request_id():
    h = Harness()
    h.restore(h.command(ttl=0), SENT, request_id=30)
    assert h.queue.next_request_id == 31


def test_a_restored_queued_command_is_sent_on_the_next_subscription_and_reported_sent():
    h = Harness()
    c = h.command()
    h.restore(c, Q, request_id=8)
    effects = h.subscribe(1)
    assert statuses(effects) == [(8, SENT)]
    assert sends(effects) == [(1, 8)]


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@pytest.mark.parametrize("status", [SENT, TIMEOUT])
def test_a_restored_sent_or_timed_out_command_is_resent_with_the_same_request_id_on_the_next_subscription(
    status, strategy
):
    h = Harness(strategy, ack_timeout_ms=1_000)
    h.restore(h.command(), status, request_id=77)
    effects = h.subscribe(3)
    assert sends(effects) == [(3, 77)]
    assert started(effects) == [(Timer.ACK, 77, h.now + 1_000)]


def test_a_restored_sent_command_resent_does_not_report_sent_again_but_a_timed_out_one_does():
    h = Harness()
    h.restore(h.command(), SENT, request_id=1)
    h.restore(h.command(), TIMEOUT, request_id=2)
    assert statuses(h.subscribe(1)) == [(2, SENT)]


@pytest.mark.parametrize(
    ("status", "reported"), [(Q, [(0, SENT)]), (SENT, []), (TIMEOUT, [(0, SENT)]), (DELIVERED, [])]
)
def test_restore_while_subscribed_sends_the_command_at_once_reporting_sent_only_if_it_was_not_sent(
    status, reported
):
    h = Harness()
    h.subscribe(1)
    effects = h.restore(h.command(), status)
    assert statuses(effects) == reported
    assert sends(effects) == [(1, 0)]


@pytest.mark.parametrize("status", [SENT, TIMEOUT])
def test_a_restored_sent_or_timed_out_command_is_completed_by_an_ack_then_answer_with_its_stored_request_id(status):
    h = Harness()
    c = h.command()
    h.restore(c, status, request_id=900)
    h.subscribe(1)
    assert statuses(h.ack(900)) == [(900, DELIVERED)]
    effects = h.answer(900, {"ok": True})
    assert statuses(effects) == [(900, SUCCESSFUL)]
    assert results(effects) == {c.rpc_id: RpcResult(response={"ok": True}, has_response=True)}


@pytest.mark.parametrize("status", [SENT, TIMEOUT])
def test_an_answer_to_a_restored_sent_command_before_it_is_resent_completes_it(status):
    """The device got it before the restart and answers with the same request id on a new session."""
    h = Harness()
    c = h.command()
    h.restore(c, status, request_id=12)
    effects = h.answer(12, 42)
    assert statuses(effects) == [(12, DELIVERED), (12, SUCCESSFUL)]
    assert results(effects) == {c.rpc_id: RpcResult(response=42, has_response=True)}
    assert h.armed == {}
    assert h.subscribe(1) == []


def test_an_ack_of_a_restored_sent_command_before_it_is_resent_delivers_it_so_it_is_not_resent():
    h = Harness()
    h.restore(h.command(), SENT, request_id=12)
    effects = h.ack(12)
    assert statuses(effects) == [(12, DELIVERED)]
    assert cancelled(effects) == []
    assert h.subscribe(1) == []


@pytest.mark.parametrize("status", [SENT, TIMEOUT])
def test_a_restored_command_that_had_been_sent_reports_not_delivered_on_expiry(status):
    h = Harness()
    c = h.command(ttl=5_000)
    h.restore(c, status)
    assert failure(h.advance(5_000), c) is RpcFailure.NOT_DELIVERED


def test_a_restored_command_that_was_only_queued_reports_the_device_offline_on_expiry():
    h = Harness()
    c = h.command(ttl=5_000)
    h.restore(c, Q)
    assert failure(h.advance(5_000), c) is RpcFailure.DEVICE_OFFLINE


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_a_restored_delivered_two_way_command_is_resent_with_its_request_id_on_subscribe_without_reporting_sent(
    strategy
):
    """Its answer may have died with the crash: the device de-duplicates on the request id and can answer again."""
    h = Harness(strategy, ack_timeout_ms=1_000)
    c = h.command()
    h.restore(c, DELIVERED, request_id=60)
    effects = h.subscribe(3)
    assert sends(effects) == [(3, 60)]
    assert statuses(effects) == []
    assert started(effects) == [(Timer.ACK, 60, h.now + 1_000)]
    pending = h.queue.find(c.rpc_id)
    assert pending.in_flight_on == 3 and pending.status is SENT and pending.attempts == 0
    assert not pending.delivered


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_the_ack_of_a_resent_restored_delivered_two_way_command_reports_delivered_again_and_cancels_its_ack_timer(
    strategy
):
    h = Harness(strategy, response_timeout_ms=30_000)
    c = h.command()
    h.restore(c, DELIVERED, request_id=60)
    h.subscribe(1)
    effects = h.ack(60)
    assert statuses(effects) == [(60, DELIVERED)]
    assert cancelled(effects) == [(Timer.ACK, 60)]
    assert results(effects) == {} and sends(effects) == []
    expected = [(Timer.RESPONSE, 60, h.now + 30_000)] if strategy is ON_RESPONSE else []
    assert started(effects) == expected
    pending = h.queue.find(c.rpc_id)
    assert pending.delivered and pending.status is DELIVERED
    assert h.ack(60) == []  # a duplicate ack is ignored as usual


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_an_answer_completes_a_resent_restored_delivered_two_way_command_as_successful_with_the_device_response(
    strategy
):
    """The answer implies the delivery: DELIVERED is reported again, then SUCCESSFUL."""
    h = Harness(strategy)
    c = h.command()
    h.restore(c, DELIVERED, request_id=60)
    h.subscribe(1)
    effects = h.answer(60, "value")
    assert statuses(effects) == [(60, DELIVERED), (60, SUCCESSFUL)]
    assert status_changes(effects)[-1].response == "value"
    assert results(effects) == {c.rpc_id: RpcResult(response="value", has_response=True)}
    assert (Timer.ACK, 60) in cancelled(effects)
    assert len(h.queue) == 0 and h.armed == {}


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_an_answer_after_the_renewed_ack_completes_a_restored_delivered_two_way_command_as_successful(strategy):
    h = Harness(strategy)
    c = h.command()
    h.restore(c, DELIVERED, request_id=60)
    h.subscribe(1)
    h.ack(60)
    effects = h.answer(60, {"ok": True})
    assert statuses(effects) == [(60, SUCCESSFUL)]
    assert results(effects) == {c.rpc_id: RpcResult(response={"ok": True}, has_response=True)}
    assert len(h.queue) == 0 and h.armed == {}


def test_an_answer_to_a_restored_delivered_two_way_command_before_it_is_resent_completes_it():
    """The device answers with the same request id on a new session before the command is written again."""
    h = Harness()
    c = h.command()
    h.restore(c, DELIVERED, request_id=12)
    effects = h.answer(12, 42)
    assert statuses(effects) == [(12, DELIVERED), (12, SUCCESSFUL)]
    assert results(effects) == {c.rpc_id: RpcResult(response=42, has_response=True)}
    assert h.armed == {}
    assert h.subscribe(1) == []


def test_an_ack_of_a_restored_delivered_two_way_command_before_it_is_resent_reports_delivered_so_it_is_not_resent():
    h = Harness()
    h.restore(h.command(), DELIVERED, request_id=12)
    effects = h.ack(12)
    assert statuses(effects) == [(12, DELIVERED)]
    assert cancelled(effects) == []
    assert h.subscribe(1) == []


def test_a_restored_delivered_two_way_command_is_resent_again_after_a_session_close_without_counting_a_retry():
    h = Harness()
    c = h.command()
    h.restore(c, DELIVERED)
    h.subscribe(1)
    assert h.close(1) == [CancelTimer(Timer.ACK, 0)]
    effects = h.subscribe(2)
    assert sends(effects) == [(2, 0)]
    assert statuses(effects) == []
    assert h.queue.find(c.rpc_id).attempts == 0


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_a_restored_delivered_two_way_command_reports_no_response_on_expiry(strategy):
    h = Harness(strategy, response_timeout_ms=60_000)
    c = h.command(ttl=5_000)
    h.restore(c, DELIVERED)
    effects = h.advance(5_000)
    assert statuses(effects) == [(0, EXPIRED)]
    assert failure(effects, c) is RpcFailure.NO_RESPONSE
    assert h.armed == {}


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_a_restored_delivered_two_way_command_resent_but_not_acked_again_still_reports_no_response_on_expiry(
    strategy
):
    """The device acknowledged it before the restart: the stored status was DELIVERED."""
    h = Harness(strategy, ack_timeout_ms=10_000, response_timeout_ms=60_000)
    c = h.command(ttl=5_000)
    h.restore(c, DELIVERED)
    h.subscribe(1)
    effects = h.advance(5_000)
    assert statuses(effects) == [(0, EXPIRED)]
    assert failure(effects, c) is RpcFailure.NO_RESPONSE
    assert (Timer.ACK, 0) in cancelled(effects)
    assert h.armed == {}


def test_a_resent_restored_delivered_two_way_command_whose_ack_times_out_is_retried_then_fails_as_no_response():
    """Its resend is an ordinary send: an ack timeout reports TIMEOUT and resends it, counting a retry against the
    restored attempts; when the budget is spent it fails, and the failure is NO_RESPONSE (it was delivered)."""
    h = Harness(max_retries=2, ack_timeout_ms=1_000)
    c = h.command(ttl=1_000_000)
    h.restore(c, DELIVERED, attempts=1)
    h.subscribe(1)
    effects = h.fire(Timer.ACK, 0)
    assert statuses(effects) == [(0, TIMEOUT), (0, SENT)]
    assert sends(effects) == [(1, 0)]
    assert h.queue.find(c.rpc_id).attempts == 2
    effects = h.fire(Timer.ACK, 0)
    assert statuses(effects) == [(0, FAILED)]
    assert status_changes(effects)[0].response == {"error": RETRIES_TEXT.format(2)}
    assert failure(effects, c) is RpcFailure.NO_RESPONSE
    assert h.armed == {}


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_a_restored_delivered_two_way_command_arms_no_response_timer_at_restore(strategy):
    h = Harness(strategy)
    effects = h.restore(h.command(), DELIVERED)
    assert started(effects) == [(Timer.EXPIRY, 0, T0 + 60_000)]


def test_under_sequential_on_response_a_restored_delivered_command_arms_its_response_timer_when_acked_again():
    h = Harness(ON_RESPONSE, response_timeout_ms=30_000)
    h.restore(h.command(ttl=120_000), DELIVERED, request_id=3)
    h.subscribe(1)
    h.advance(1_000)
    effects = h.ack(3)
    assert started(effects) == [(Timer.RESPONSE, 3, T0 + 31_000)]


def test_under_sequential_on_response_the_response_timer_of_a_restored_delivered_command_is_capped_at_expiry():
    h = Harness(ON_RESPONSE, response_timeout_ms=30_000)
    h.restore(h.command(ttl=10_000), DELIVERED)
    h.subscribe(1)
    effects = h.ack(0)
    assert started(effects) == [(Timer.RESPONSE, 0, T0 + 10_000)]


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [(BURST, [(1, 1), (1, 2), (1, 3)]), (ON_ACK, [(1, 1)]), (ON_RESPONSE, [(1, 1)])],
)
def test_under_every_strategy_a_restored_delivered_head_is_resent_first_in_the_stored_order(strategy, expected):
    h = Harness(strategy)
    h.restore(h.command(), DELIVERED, request_id=1)
    h.restore(h.command(), Q, request_id=2)
    h.restore(h.command(), SENT, request_id=3)
    effects = h.subscribe(1)
    assert sends(effects) == expected
    assert (1, SENT) not in statuses(effects)


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_under_every_strategy_a_one_shot_session_takes_the_restored_delivered_head_first(strategy):
    h = Harness(strategy)
    h.restore(h.command(), DELIVERED, request_id=1)
    h.restore(h.command(), Q, request_id=2)
    effects = h.subscribe(7, one_shot=True)
    assert sends(effects) == [(7, 1)]
    assert statuses(effects) == []
    assert h.queue.subscriptions == {}


def test_under_burst_a_restored_delivered_command_does_not_hold_back_the_next():
    h = Harness(BURST)
    h.restore(h.command(), DELIVERED, request_id=1)
    h.restore(h.command(), SENT, request_id=2)
    assert sends(h.subscribe(1)) == [(1, 1), (1, 2)]


def test_under_sequential_on_ack_a_restored_delivered_head_is_resent_first_and_releases_the_next_once_acked_again():
    h = Harness(ON_ACK)
    c = h.command()
    h.restore(c, DELIVERED, request_id=1)
    h.restore(h.command(), SENT, request_id=2)
    assert sends(h.subscribe(1)) == [(1, 1)]
    effects = h.ack(1)
    assert statuses(effects) == [(1, DELIVERED)]
    assert sends(effects) == [(1, 2)]  # acked again, it awaits its answer without blocking the next
    effects = h.answer(1, "ok")
    assert statuses(effects) == [(1, SUCCESSFUL)]
    assert results(effects) == {c.rpc_id: RpcResult(response="ok", has_response=True)}


def test_under_sequential_on_response_a_restored_delivered_head_is_resent_first_and_holds_back_the_next():
    h = Harness(ON_RESPONSE)
    h.restore(h.command(), DELIVERED, request_id=1)
    h.restore(h.command(), Q, request_id=2)
    assert sends(h.subscribe(1)) == [(1, 1)]
    effects = h.ack(1)
    assert statuses(effects) == [(1, DELIVERED)]
    assert sends(effects) == []
    effects = h.answer(1, "ok")
    assert (Timer.RESPONSE, 1) in cancelled(effects)
    assert statuses(effects) == [(1, SUCCESSFUL), (2, SENT)]
    assert sends(effects) == [(1, 2)]


def test_under_sequential_on_response_a_restored_delivered_head_acked_again_but_unanswered_fails_and_frees_the_next():
    h = Harness(ON_RESPONSE, response_timeout_ms=30_000)
    c = h.command(ttl=120_000)
    h.restore(c, DELIVERED, request_id=1)
    h.restore(h.command(ttl=120_000), SENT, request_id=2)
    h.subscribe(1)
    h.ack(1)
    effects = h.advance(30_000)
    assert statuses(effects) == [(1, FAILED)]
    assert status_changes(effects)[0].response == {"error": RESPONSE_TEXT}
    assert results(effects) == {c.rpc_id: RpcResult(failure=RpcFailure.NO_RESPONSE)}
    assert sends(effects) == [(1, 2)]
    h.assert_timers_match_pending()


def test_under_sequential_on_response_a_restored_delivered_head_never_acked_again_expires_as_no_response_then_next():
    h = Harness(ON_RESPONSE, ack_timeout_ms=1_000, max_retries=5)
    c = h.command(ttl=3_500)
    h.restore(c, DELIVERED, request_id=1)
    h.restore(h.command(ttl=120_000), Q, request_id=2)
    h.subscribe(1)
    effects = h.advance(3_500)
    assert sends(effects) == [(1, 1), (1, 1), (1, 1), (1, 2)]
    assert results(effects) == {c.rpc_id: RpcResult(failure=RpcFailure.NO_RESPONSE)}
    assert statuses(effects)[-2:] == [(1, EXPIRED), (2, SENT)]
    h.assert_timers_match_pending()


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_a_restored_one_way_command_that_was_delivered_ends_at_once_as_successful(strategy):
    """Its SUCCESSFUL was not stored before the restart; delivery is success for a one-way command."""
    h = Harness(strategy)
    h.subscribe(1)
    c = h.command(oneway=True)
    effects = h.restore(c, DELIVERED, request_id=5)
    assert statuses(effects) == [(5, SUCCESSFUL)]
    assert results(effects) == {c.rpc_id: RpcResult()}
    assert sends(effects) == [] and started(effects) == []
    assert len(h.queue) == 0 and h.armed == {}
    assert h.queue.next_request_id == 6


def test_a_restored_one_way_command_that_was_delivered_is_successful_even_when_already_expired():
    h = Harness()
    c = h.command(oneway=True, ttl=0)
    effects = h.restore(c, DELIVERED)
    assert statuses(effects) == [(0, SUCCESSFUL)]
    assert results(effects) == {c.rpc_id: RpcResult()}


@pytest.mark.parametrize("status", [Q, SENT, TIMEOUT])
def test_a_restored_one_way_command_not_yet_delivered_completes_on_ack_as_delivered_then_successful(status):
    h = Harness()
    c = h.command(oneway=True)
    h.restore(c, status, request_id=9)
    h.subscribe(1)
    effects = h.ack(9)
    assert statuses(effects) == [(9, DELIVERED), (9, SUCCESSFUL)]
    assert results(effects) == {c.rpc_id: RpcResult()}


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (Q, RpcFailure.DEVICE_OFFLINE),
        (SENT, RpcFailure.NOT_DELIVERED),
        (TIMEOUT, RpcFailure.NOT_DELIVERED),
        (DELIVERED, RpcFailure.NO_RESPONSE),
    ],
)
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_a_restored_command_already_expired_is_reported_expired_by_how_far_it_got(strategy, status, expected):
    h = Harness(strategy)
    h.subscribe(1)
    c = h.command(ttl=0)
    effects = h.restore(c, status, request_id=17)
    assert statuses(effects) == [(17, EXPIRED)]
    assert results(effects) == {c.rpc_id: RpcResult(failure=expected)}
    assert sends(effects) == [] and started(effects) == [] and cancelled(effects) == []
    assert len(h.queue) == 0 and h.armed == {}
    assert h.queue.find(c.rpc_id) is None


@pytest.mark.parametrize("status", [SENT, TIMEOUT])
def test_restored_attempts_count_against_the_retry_budget(status):
    h = Harness(max_retries=3, ack_timeout_ms=1_000)
    c = h.command(ttl=1_000_000)
    h.restore(c, status, attempts=2)
    h.subscribe(1)
    effects = h.fire(Timer.ACK, 0)
    assert statuses(effects) == [(0, TIMEOUT), (0, SENT)]
    assert h.queue.find(c.rpc_id).attempts == 3
    effects = h.fire(Timer.ACK, 0)
    assert statuses(effects) == [(0, FAILED)]
    assert status_changes(effects)[0].response == {"error": RETRIES_TEXT.format(3)}
    assert failure(effects, c) is RpcFailure.NOT_DELIVERED


def test_a_restored_command_whose_retries_were_all_used_fails_on_its_next_ack_timeout():
    h = Harness(max_retries=5, ack_timeout_ms=1_000)
    c = h.command(retries=2)
    h.restore(c, TIMEOUT, attempts=2)
    h.subscribe(1)
    effects = h.fire(Timer.ACK, 0)
    assert statuses(effects) == [(0, FAILED)]
    assert status_changes(effects)[0].response == {"error": RETRIES_TEXT.format(2)}
    assert sends(effects) == []


def test_a_restored_timed_out_command_resent_after_a_session_close_does_not_count_a_retry():
    h = Harness(max_retries=3, ack_timeout_ms=1_000)
    c = h.command()
    h.restore(c, TIMEOUT, attempts=1)
    h.subscribe(1)
    h.close(1)
    h.subscribe(2)
    assert h.queue.find(c.rpc_id).attempts == 1


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_a_restored_queue_of_every_stored_status_drains_with_every_timer_cancelled_or_fired(strategy):
    h = Harness(strategy, ack_timeout_ms=1_000, response_timeout_ms=2_000, max_retries=1)
    stored = [(Q, False), (SENT, False), (TIMEOUT, True), (DELIVERED, False), (DELIVERED, True), (SENT, True)]
    cs = []
    for rid, (status, oneway) in enumerate(stored, start=100):
        c = h.command(oneway=oneway, ttl=5_000 + 1_000 * rid % 7)
        cs.append(c)
        h.restore(c, status, request_id=rid)
    h.subscribe(1)
    h.ack(101)
    h.answer(102, "x")
    h.drain()
    assert h.armed == {}
    assert len(h.queue) == 0
    assert {f.rpc_id for f in h.history if isinstance(f, Finished)} == {c.rpc_id for c in cs}


# --- timers ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_every_timer_started_in_a_busy_scenario_is_cancelled_or_fires(strategy):
    h = Harness(strategy, ack_timeout_ms=1_000, response_timeout_ms=2_000, max_retries=1, max_in_flight=2)
    h.subscribe(1)
    cs = [h.command(ttl=ttl, oneway=i % 3 == 0) for i, ttl in enumerate([5_000, 9_000, 3_000, 7_000, 20_000])]
    for c in cs:
        h.submit(c)
    h.ack(0)
    h.subscribe(2, one_shot=True)
    h.advance(500)
    h.close(1)
    h.answer(1, "x")
    h.subscribe(3)
    h.delete(cs[3].rpc_id)
    h.advance(1_500)
    h.assert_timers_match_pending()
    h.drain()
    assert h.armed == {}
    assert len(h.queue) == 0
    assert {f.rpc_id for f in h.history if isinstance(f, Finished)} == {c.rpc_id for c in cs}


def test_the_harness_flags_a_timer_armed_twice():
    h = Harness()
    h.apply([StartTimer(Timer.ACK, 0, T0)])
    with pytest.raises(AssertionError):
        h.apply([StartTimer(Timer.ACK, 0, T0)])


# --- random sequences of events (Hypothesis) ---------------------------------------------------------------------

#: Valid status transitions; None is "not yet submitted". A restored command starts in its stored status (never
#: reported again). DELIVERED -> SUCCESSFUL is an answer, or a one-way command's ack (in the same batch), or a
#: one-way command restored as DELIVERED. A two-way command restored as DELIVERED is resent as sent but
#: unconfirmed: until its next reported status it may also go to DELIVERED again (acked or answered again) or
#: TIMEOUT (its resend not acked), see ``_UNCONFIRMED_EXTRA``.
_ALLOWED = {
    None: {Q, EXPIRED},
    Q: {SENT, EXPIRED, DELETED},
    SENT: {DELIVERED, TIMEOUT, FAILED, EXPIRED, DELETED},
    TIMEOUT: {SENT, DELIVERED, EXPIRED, DELETED},
    DELIVERED: {SUCCESSFUL, FAILED, EXPIRED, DELETED},
}
_UNCONFIRMED_EXTRA = {DELIVERED, TIMEOUT}
_TERMINAL = {SUCCESSFUL, FAILED, EXPIRED, DELETED}
_RESTORABLE = [Q, SENT, TIMEOUT, DELIVERED]
UNKNOWN_REQUEST_ID = 10**12


class QueueMachine(RuleBasedStateMachine):
    """Random events against one queue; a model checks every effect batch and the queue's state after each step."""

    strategy: SubmitStrategy = BURST

    @initialize(max_in_flight=st.integers(1, 3), max_retries=st.integers(0, 3))
    def setup(self, max_in_flight: int, max_retries: int) -> None:
        self.h = Harness(self.strategy, max_in_flight=max_in_flight, max_retries=max_retries,
                         ack_timeout_ms=1_000, response_timeout_ms=3_000)
        self.sessions = itertools.count(1)
        self.open: set[int] = set()
        self.subscribed: dict[int, bool] = {}  # the model's view: session -> one-shot
        self.commands: dict[int, RpcCommand] = {}  # request id -> command, for every submit/restore
        self.finished: dict[UUID, RpcResult] = {}
        self.last_status: dict[int, RpcStatus | None] = {}
        self.seen: dict[int, set[RpcStatus]] = defaultdict(set)
        #: Restored with a stored status other than QUEUED: the device may have it, so acks and answers count.
        self.restored_as_sent: set[int] = set()
        #: Two-way commands restored as DELIVERED: the device acknowledged them before the restart.
        self.restored_delivered: set[int] = set()
        #: Of those, the ones with no status reported since the restore: stored DELIVERED, in memory SENT and not
        #: delivered, so they are resent (without reporting SENT) until the device acks or answers again.
        self.unconfirmed: set[int] = set()
        #: Written to a session in this run (by a Send effect).
        self.ever_sent: set[int] = set()
        self.first_sends: list[int] = []
        self.first_sends_by_session: dict[int, list[int]] = defaultdict(list)
        self.answers: dict[int, Any] = {}

    # --- checking a batch of effects ---

    def check(self, effects: list[Effect]) -> list[Effect]:
        terminal_in_batch: set[int] = set()
        for effect in effects:
            if isinstance(effect, Send):
                sid, rid = effect.session_id, effect.pending.request_id
                assert sid in self.subscribed, f"sent {rid} to session {sid}, which is not subscribed"
                assert sid == next(reversed(self.subscribed)), "commands go to the most recent subscription"
                if self.subscribed[sid]:
                    del self.subscribed[sid]  # a long-poll takes one command
                assert self.commands[rid].rpc_id not in self.finished
                if rid in self.unconfirmed:
                    assert self.last_status[rid] is DELIVERED, "resent as stored, without reporting SENT"
                else:
                    assert self.last_status[rid] is SENT, "a command is written only once it is SENT"
                if rid not in self.ever_sent:
                    assert not self.first_sends or rid > self.first_sends[-1], "first sends out of order"
                    per_session = self.first_sends_by_session[sid]
                    assert not per_session or rid > per_session[-1]
                    per_session.append(rid)
                    self.first_sends.append(rid)
                    self.ever_sent.add(rid)
            elif isinstance(effect, StatusChanged):
                rid, new = effect.pending.request_id, effect.status
                old = self.last_status[rid]
                assert old not in _TERMINAL, f"{rid}: {new} after terminal {old}"
                allowed = _ALLOWED[old] | (_UNCONFIRMED_EXTRA if rid in self.unconfirmed else set())
                assert new in allowed, f"{rid}: {old} -> {new} is not a valid transition"
                if new is FAILED:
                    if old is SENT or rid in self.unconfirmed:  # its (re)sends were never acked in this run
                        limit = retry_limit(self.commands[rid], self.h.queue.settings.max_retries)
                        assert effect.response == {"error": RETRIES_TEXT.format(limit)}
                    else:
                        assert self.strategy is ON_RESPONSE
                        assert effect.response == {"error": RESPONSE_TEXT}
                if new is SUCCESSFUL:
                    if rid in self.answers:
                        assert effect.response == self.answers[rid]
                    else:  # a one-way command acked (or restored as delivered): success without a response
                        assert self.commands[rid].oneway and effect.response is None
                self.last_status[rid] = new
                self.seen[rid].add(new)
                self.unconfirmed.discard(rid)
                if new in _TERMINAL:
                    terminal_in_batch.add(rid)
            elif isinstance(effect, Finished):
                rid = next(r for r, c in self.commands.items() if c.rpc_id == effect.rpc_id)
                assert effect.rpc_id not in self.finished, f"{rid} finished twice"
                self.finished[effect.rpc_id] = effect.result
                self.check_result(rid, effect.result)
                terminal_in_batch.discard(rid)
        assert not terminal_in_batch, f"terminal status without Finished for {terminal_in_batch}"
        return effects

    def check_result(self, rid: int, result: RpcResult) -> None:
        status, command = self.last_status[rid], self.commands[rid]
        if status is SUCCESSFUL:
            if rid in self.answers:
                assert result == RpcResult(response=self.answers[rid], has_response=True)
            else:
                assert command.oneway and result == RpcResult()
        elif status is EXPIRED:
            if DELIVERED in self.seen[rid]:
                expected = RpcFailure.NO_RESPONSE
            elif self.seen[rid] & {SENT, TIMEOUT}:
                expected = RpcFailure.NOT_DELIVERED
            else:
                expected = RpcFailure.DEVICE_OFFLINE
            assert result.failure is expected
        elif status is FAILED:
            expected = RpcFailure.NO_RESPONSE if DELIVERED in self.seen[rid] else RpcFailure.NOT_DELIVERED
            assert result.failure is expected
        elif status is DELETED:
            assert result.failure is RpcFailure.DELETED
        else:
            raise AssertionError(f"{rid} finished in status {status}")

    # --- rules ---

    def _new_command(self, oneway: bool, ttl: int, retries: int | None,
                     id_gap: int | None) -> tuple[RpcCommand, int | None, int]:
        """A command and the request id to give it: None (the queue's counter) or an explicit one from a
        server-wide monotonic source, which may skip ids other devices took (``id_gap``)."""
        command = self.h.command(oneway=oneway, ttl=ttl, retries=retries)
        explicit = None if id_gap is None else self.h.queue.next_request_id + id_gap
        rid = self.h.queue.next_request_id if explicit is None else explicit
        assert rid not in self.commands
        self.commands[rid] = command
        return command, explicit, rid

    commands_args = dict(
        oneway=st.booleans(),
        ttl=st.one_of(st.sampled_from([-1, 0]), st.integers(1, 20_000)),
        retries=st.one_of(st.none(), st.integers(-1, 4)),
        id_gap=st.one_of(st.none(), st.integers(0, 3)),
    )

    @rule(**commands_args)
    def submit(self, oneway: bool, ttl: int, retries: int | None, id_gap: int | None) -> None:
        command, explicit, rid = self._new_command(oneway, ttl, retries, id_gap)
        self.last_status[rid] = None
        effects = self.check(self.h.submit(command, explicit))
        assert statuses(effects)[0] in {(rid, Q), (rid, EXPIRED)}
        assert self.h.queue.next_request_id == rid + 1

    @rule(status=st.sampled_from(_RESTORABLE), data=st.data(), **commands_args)
    def restore(self, status: RpcStatus, data: st.DataObject, oneway: bool, ttl: int, retries: int | None,
                id_gap: int | None) -> None:
        command, explicit, rid = self._new_command(oneway, ttl, retries, id_gap)
        limit = retry_limit(command, self.h.queue.settings.max_retries)
        attempts = 0 if status is Q else data.draw(st.integers(0, limit), label="attempts")
        self.last_status[rid] = status  # restored as it was: its stored status is not reported again
        self.seen[rid].add(status)
        if status is not Q:
            self.restored_as_sent.add(rid)
        if status is DELIVERED and not oneway:
            self.restored_delivered.add(rid)
            self.unconfirmed.add(rid)
        effects = self.check(self.h.restore(command, status, explicit, attempts))
        assert Q not in [s for _, s in statuses(effects)], "restore never reports QUEUED"
        assert self.h.queue.next_request_id == rid + 1
        if status is DELIVERED:
            if oneway:
                assert statuses(effects) == [(rid, SUCCESSFUL)]
                assert rid not in [r for _, r in sends(effects)], "a delivered one-way command is not written again"
            elif command.expiration_time > self.h.now:
                # Resent (at once if a session and the strategy allow) with its request id, reporting nothing.
                assert [s for r, s in statuses(effects) if r == rid] == []
        pending = self.h.queue.pending.get(rid)
        if pending is not None:
            assert pending.attempts == attempts
            assert pending.ever_sent == (status is not Q or rid in self.ever_sent)

    @rule(one_shot=st.booleans())
    def subscribe_new_session(self, one_shot: bool) -> None:
        sid = next(self.sessions)
        self.open.add(sid)
        self.subscribed.pop(sid, None)
        self.subscribed[sid] = one_shot
        self.check(self.h.subscribe(sid, one_shot))

    @precondition(lambda self: self.open)
    @rule(data=st.data(), one_shot=st.booleans())
    def subscribe_again(self, data: st.DataObject, one_shot: bool) -> None:
        sid = data.draw(st.sampled_from(sorted(self.open)))
        self.subscribed.pop(sid, None)
        self.subscribed[sid] = one_shot
        self.check(self.h.subscribe(sid, one_shot))

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def close_session(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.open)))
        self.open.discard(sid)
        self.subscribed.pop(sid, None)
        effects = self.check(self.h.close(sid))
        assert not [s for s in effects if isinstance(s, StatusChanged)], "a close changes no status"

    @precondition(lambda self: any(p.in_flight_on is not None for p in self.h.queue.pending.values()))
    @rule(data=st.data())
    def ack_in_flight(self, data: st.DataObject) -> None:
        rids = sorted(r for r, p in self.h.queue.pending.items() if p.in_flight_on is not None)
        self.check(self.h.ack(data.draw(st.sampled_from(rids))))

    def _reached_device(self) -> set[int]:
        """What may have reached the device: written in this run, or restored as written before the restart."""
        return self.ever_sent | self.restored_as_sent

    def _is_active(self, rid: int) -> bool:
        return self.commands[rid].rpc_id not in self.finished

    @precondition(lambda self: self._reached_device())
    @rule(data=st.data())
    def ack_late_or_again(self, data: st.DataObject) -> None:
        """An ack for anything written: duplicates, acks after a close or a timeout, after the answer, and acks of
        restored commands that reached the device before the restart."""
        rid = data.draw(st.sampled_from(sorted(self._reached_device())))
        ignored = not self._is_active(rid) or (self.last_status[rid] is DELIVERED and rid not in self.unconfirmed)
        effects = self.check(self.h.ack(rid))
        if ignored:
            assert effects == []
        else:
            assert statuses(effects)[0] == (rid, DELIVERED)
            if self.commands[rid].oneway:
                assert statuses(effects)[1] == (rid, SUCCESSFUL)
                assert results(effects)[self.commands[rid].rpc_id] == RpcResult()

    @precondition(lambda self: self._reached_device())
    @rule(data=st.data(), response=st.one_of(st.none(), st.integers(), st.text(max_size=3)))
    def answer(self, data: st.DataObject, response: Any) -> None:
        rid = data.draw(st.sampled_from(sorted(self._reached_device())))
        was_pending = self._is_active(rid)
        if was_pending:
            self.answers[rid] = response
        effects = self.check(self.h.answer(rid, response))
        if not was_pending:
            assert effects == []
        else:
            assert self.commands[rid].rpc_id in results(effects)

    def _never_sent(self) -> list[int]:
        return sorted(r for r in self.commands if self._is_active(r) and r not in self._reached_device())

    @precondition(lambda self: self._never_sent())
    @rule(data=st.data(), response=st.integers())
    def ack_or_answer_never_sent(self, data: st.DataObject, response: int) -> None:
        """An ack or answer for a command never written to a device is stale or forged: no effects at all."""
        rid = data.draw(st.sampled_from(self._never_sent()))
        assert self.h.ack(rid) == []
        assert self.h.answer(rid, response) == []
        assert self.h.queue.pending[rid].status is Q

    @rule(response=st.integers())
    def answer_unknown_request(self, response: int) -> None:
        assert self.h.answer(UNKNOWN_REQUEST_ID, response) == []
        assert self.h.ack(UNKNOWN_REQUEST_ID) == []

    def _fire_kind(self, data: st.DataObject, kind: Timer) -> None:
        keys = sorted(k for k in self.h.armed if k[0] is kind)
        self.check(self.h.fire(*data.draw(st.sampled_from(keys))))

    @precondition(lambda self: any(k is Timer.ACK for k, _ in self.h.armed))
    @rule(data=st.data())
    def ack_timeout(self, data: st.DataObject) -> None:
        self._fire_kind(data, Timer.ACK)

    @precondition(lambda self: any(k is Timer.RESPONSE for k, _ in self.h.armed))
    @rule(data=st.data())
    def response_timeout(self, data: st.DataObject) -> None:
        self._fire_kind(data, Timer.RESPONSE)

    @precondition(lambda self: any(k is Timer.EXPIRY for k, _ in self.h.armed))
    @rule(data=st.data())
    def expiry(self, data: st.DataObject) -> None:
        self._fire_kind(data, Timer.EXPIRY)

    @rule(ms=st.integers(0, 5_000))
    def time_passes(self, ms: int) -> None:
        target = self.h.now + ms
        while (key := self.h.next_due(target)) is not None:
            self.check(self.h.fire(*key))
        self.h.now = target

    @precondition(lambda self: self.finished)
    @rule(data=st.data(), kind=st.sampled_from(list(Timer)))
    def stale_timer(self, data: st.DataObject, kind: Timer) -> None:
        """A timer message that raced with its cancellation reaches the queue after the command ended."""
        rid = data.draw(st.sampled_from(sorted(r for r, c in self.commands.items() if c.rpc_id in self.finished)))
        handler = {Timer.EXPIRY: self.h.queue.expired, Timer.ACK: self.h.queue.ack_timed_out,
                   Timer.RESPONSE: self.h.queue.response_timed_out}[kind]
        assert handler(rid, self.h.now) == []

    @precondition(lambda self: len(self.h.queue))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        pending = data.draw(st.sampled_from(list(self.h.queue.pending.values())))
        effects = self.check(self.h.delete(pending.command.rpc_id))
        assert results(effects)[pending.command.rpc_id] == RpcResult(failure=RpcFailure.DELETED)

    @rule()
    def delete_unknown(self) -> None:
        assert self.h.delete(UUID(int=10**30)) == []

    # --- invariants ---

    @invariant()
    def queue_length_is_submitted_minus_finished(self) -> None:
        assert len(self.h.queue) == len(self.commands) - len(self.finished)
        assert all(rid < self.h.queue.next_request_id for rid in self.commands), "the counter is past every id"
        assert set(self.h.queue.pending) == {r for r, c in self.commands.items() if c.rpc_id not in self.finished}
        assert list(self.h.queue.pending) == sorted(self.h.queue.pending), "pending is kept in submission order"
        for rid, pending in self.h.queue.pending.items():
            assert self.h.queue.find(pending.command.rpc_id) is pending
            assert pending.request_id == rid

    @invariant()
    def subscriptions_match_the_model(self) -> None:
        assert self.h.queue.subscriptions == self.subscribed
        assert list(self.h.queue.subscriptions) == list(self.subscribed), "subscription recency order"

    @invariant()
    def armed_timers_match_each_command_state(self) -> None:
        queue = self.h.queue
        for kind, rid in self.h.armed:
            assert rid in queue.pending, f"{kind} timer left armed for removed command {rid}"
        for rid, p in queue.pending.items():
            assert (Timer.EXPIRY, rid) in self.h.armed
            assert ((Timer.ACK, rid) in self.h.armed) == (p.in_flight_on is not None)
            awaits_answer = self.strategy is ON_RESPONSE and p.delivered and not p.command.oneway
            assert ((Timer.RESPONSE, rid) in self.h.armed) == awaits_answer
            at, _ = self.h.armed[(Timer.EXPIRY, rid)]
            assert at == p.command.expiration_time
            for kind in (Timer.ACK, Timer.RESPONSE):
                if (kind, rid) in self.h.armed:
                    assert self.h.armed[(kind, rid)][0] <= p.command.expiration_time

    @invariant()
    def each_command_state_is_consistent(self) -> None:
        for rid, p in self.h.queue.pending.items():
            if rid in self.unconfirmed:
                assert self.last_status[rid] is DELIVERED and p.status is SENT and not p.delivered
            else:
                assert p.status is self.last_status[rid]
            assert p.delivered_before_restart == (rid in self.restored_delivered)
            assert p.attempts <= retry_limit(p.command, self.h.queue.settings.max_retries)
            assert p.delivered == (p.status is DELIVERED)
            assert p.ever_sent == (rid in self._reached_device())
            if p.in_flight_on is not None:
                assert p.status is SENT and p.ever_sent and not p.delivered
            if p.delivered:
                assert not p.command.oneway

    @invariant()
    def the_strategy_is_respected_and_work_is_not_left_undone(self) -> None:
        queue = self.h.queue
        pending = list(queue.pending.values())
        in_flight = [p for p in pending if p.in_flight_on is not None]
        waiting = [p for p in pending if p.in_flight_on is None and not p.delivered]
        if self.strategy is BURST:
            assert len(in_flight) <= queue.settings.max_in_flight
            if queue.subscriptions:
                assert len(in_flight) == queue.settings.max_in_flight or not waiting
        elif self.strategy is ON_ACK:
            undelivered = [p for p in pending if not p.delivered]
            assert all(p is undelivered[0] for p in in_flight)
            if queue.subscriptions and undelivered:
                assert undelivered[0].in_flight_on is not None
        else:
            assert all(p.in_flight_on is None for p in pending[1:])
            # Behind the head, only a command restored as having reached the device can be delivered (stored that
            # way, or acked late before it was written again).
            assert all(p.request_id in self.restored_as_sent for p in pending[1:] if p.delivered)
            if queue.subscriptions and pending:
                assert pending[0].in_flight_on is not None or pending[0].delivered

    def teardown(self) -> None:
        if not hasattr(self, "h"):
            return
        for _ in range(10_000):
            key = self.h.next_due()
            if key is None:
                break
            self.check(self.h.fire(*key))
        assert self.h.armed == {}
        assert len(self.h.queue) == 0
        assert set(self.finished) == {c.rpc_id for c in self.commands.values()}, "every command finishes once"


def _machine_for(strategy: SubmitStrategy) -> type[QueueMachine]:
    return type(f"QueueMachine_{strategy.value}", (QueueMachine,), {"strategy": strategy})


_STATEFUL_SETTINGS = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

TestRandomEventsUnderBurst = _machine_for(BURST).TestCase
TestRandomEventsUnderBurst.settings = _STATEFUL_SETTINGS
TestRandomEventsUnderSequentialOnAck = _machine_for(ON_ACK).TestCase
TestRandomEventsUnderSequentialOnAck.settings = _STATEFUL_SETTINGS
TestRandomEventsUnderSequentialOnResponse = _machine_for(ON_RESPONSE).TestCase
TestRandomEventsUnderSequentialOnResponse.settings = _STATEFUL_SETTINGS


# --- forget (a command another node's actor holds now) ---------------------------------------------------------------


def test_forget_drops_a_queued_command_with_no_effect_and_no_status_change():
    h = Harness()
    c = h.command()
    h.submit(c)
    history = list(h.history)
    pending = h.queue.forget(c.rpc_id)
    assert pending is not None and pending.command is c and pending.request_id == 0
    assert pending.status is Q  # no status change
    assert h.history == history  # forget returns no effects, and nothing else was produced
    assert len(h.queue) == 0 and h.queue.find(c.rpc_id) is None
    assert h.queue.pending == {} and h.queue.by_rpc_id == {}


def test_forget_of_an_unknown_command_is_none():
    h = Harness()
    h.submit(h.command())
    assert h.queue.forget(UUID(int=999)) is None
    assert len(h.queue) == 1


def test_forget_refuses_a_command_in_flight():
    h = Harness()
    h.subscribe(7)
    c = h.command()
    assert sends(h.submit(c)) == [(7, 0)]
    assert h.queue.forget(c.rpc_id) is None
    assert h.queue.find(c.rpc_id).status is SENT and h.queue.find(c.rpc_id).in_flight_on == 7


def test_forget_refuses_a_command_that_was_ever_sent_even_once_back_in_the_queue():
    h = Harness()
    h.subscribe(7)
    c = h.command()
    h.submit(c)
    h.close(7)  # back in the queue, not in flight: but the device may have it
    assert h.queue.find(c.rpc_id).in_flight_on is None
    assert h.queue.forget(c.rpc_id) is None
    assert len(h.queue) == 1


def test_forget_refuses_a_delivered_command():
    h = Harness()
    h.subscribe(7)
    c = h.command()
    h.submit(c)
    h.ack(0)
    assert h.queue.find(c.rpc_id).status is DELIVERED
    assert h.queue.forget(c.rpc_id) is None


@pytest.mark.parametrize("status", [SENT, TIMEOUT, DELIVERED])
def test_forget_refuses_a_restored_command_that_had_been_sent(status):
    h = Harness()
    c = h.command()
    h.restore(c, status, request_id=5)
    assert h.queue.forget(c.rpc_id) is None
    assert h.queue.find(c.rpc_id) is not None


def test_forget_takes_a_restored_queued_command():
    h = Harness()
    c = h.command()
    h.restore(c, Q, request_id=5)
    pending = h.queue.forget(c.rpc_id)
    assert pending is not None and pending.request_id == 5 and len(h.queue) == 0


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@pytest.mark.parametrize("one_shot", [False, True])
def test_after_forget_the_next_command_is_sent_normally(strategy, one_shot):
    h = Harness(strategy)
    first, second = h.command(method="first"), h.command(method="second")
    h.submit(first)
    h.submit(second)
    assert h.queue.forget(first.rpc_id) is not None
    effects = h.subscribe(7, one_shot=one_shot)
    assert sends(effects) == [(7, 1)]
    assert statuses(effects) == [(1, SENT)]
    assert [e.pending.command.method for e in effects if isinstance(e, Send)] == ["second"]
    effects = h.answer(1, {"ok": True})
    assert results(effects) == {second.rpc_id: RpcResult(response={"ok": True}, has_response=True)}
    assert len(h.queue) == 0


def test_a_forgotten_command_leaves_no_outcome_behind():
    h = Harness()
    c = h.command(ttl=30_000)
    h.submit(c)
    h.queue.forget(c.rpc_id)
    # its expiry timer (the actor cancels it; here it is left armed) and a forged answer find nothing to end
    assert h.advance(30_000) == []
    assert h.answer(0, {"late": True}) == []
    assert h.ack(0) == []
    assert results(h.history) == {}


def test_a_forgotten_command_can_be_taken_again_under_its_id():
    h = Harness()
    c = h.command()
    h.submit(c, request_id=3)
    h.queue.forget(c.rpc_id)
    for kind in Timer:  # as the actor does: forget produces no effects, its caller cancels the command's timers
        h.armed.pop((kind, 3), None)
    h.subscribe(7)
    effects = h.restore(c, Q, request_id=3)
    assert sends(effects) == [(7, 3)]
    assert h.queue.find(c.rpc_id).request_id == 3
