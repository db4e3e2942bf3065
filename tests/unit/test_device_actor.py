"""The device actor on a task.Clock-driven dispatcher, with fake sessions and a recording journal: no reactor."""

from __future__ import annotations

from typing import Any, Iterator
from uuid import uuid4

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred

from nanoiot.actors import messages as m
from nanoiot.actors.device import ActorSettings
from nanoiot.actors.directory import DeviceDirectory
from nanoiot.actors.wakeups import Wakeups
from nanoiot.persistence.records import NULL_UUID, Device
from nanoiot.rpc.model import RpcCommand, RpcFailure, RpcStatus
from nanoiot.rpc.queue import QueueSettings
from nanoiot.port.session import Delivery
from tests.fixtures.actors import actors_on_clock

DEVICE = Device(uuid4(), 0, uuid4(), NULL_UUID, "dev", "default", None, None)


class FakeSession:
    transport = "fake"

    def __init__(self, session_id: int, outcome: Delivery = Delivery.AWAITING_ACK) -> None:
        self.session_id = session_id
        self.outcome = outcome
        self.sent: list[tuple[int, str]] = []
        self.replies: list[tuple[int, bytes]] = []
        self.closed: list[str] = []

    def send_command(self, request_id: int, method: str, params: Any, qos: int) -> Delivery:
        if self.outcome is not Delivery.NOT_SENT:
            self.sent.append((request_id, method))
        return self.outcome

    def send_reply(self, request_id: int, body: bytes) -> None:
        self.replies.append((request_id, body))

    def close(self, reason: str) -> None:
        self.closed.append(reason)


class RecordingJournal:
    """Stands in for RpcJournal: every write is durable when the test says so."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, Any, Any]] = []
        self.waiting: list[Deferred] = []
        #: (rpc id, attempts) of the changes that carried retry attempts.
        self.attempts: list[tuple[Any, int]] = []

    def _record(self, kind: str, key: Any, value: Any) -> Deferred:
        self.writes.append((kind, key, value))
        d: Deferred = Deferred()
        self.waiting.append(d)
        return d

    def insert(self, record: Any) -> Deferred:
        return self._record("insert", record.id, record.status)

    def change(self, rpc_id: Any, status: RpcStatus, response: Any = None, retries: Any = None,
               attempts: int | None = None) -> Deferred:
        if attempts is not None:
            self.attempts.append((rpc_id, attempts))
        return self._record("change", rpc_id, status)

    def note(self, rpc_id: Any, status: RpcStatus, response: Any = None, attempts: int | None = None) -> None:
        self.change(rpc_id, status, response, attempts=attempts)

    def delete(self, rpc_id: Any) -> Deferred:
        return self._record("delete", rpc_id, None)

    def commit(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[task.Clock]:
    with actors_on_clock(monkeypatch) as clock:
        yield clock


def directory_on(clock: task.Clock, journal: Any = None, **queue: Any) -> DeviceDirectory:
    settings = ActorSettings(queue=QueueSettings(ack_timeout_ms=1000, **queue), idle_timeout=5.0)
    return DeviceDirectory(clock, settings, journal=journal)


def command(clock: task.Clock, method: str = "m", persistent: bool = False, oneway: bool = False,
            ttl_ms: int = 60_000) -> RpcCommand:
    now = int(clock.seconds() * 1000)
    return RpcCommand(uuid4(), DEVICE.tenant_id, DEVICE.id, method, None, oneway, now + ttl_ms, now,
                      persistent=persistent)


class Asked:
    """A message carrying a reply address, and the Deferred that the actor's answer fires."""

    def __init__(self, directory: DeviceDirectory, make: Any, *args: Any) -> None:
        reply_to, self.reply = directory.replies.expect()
        self.message = make(*args, reply_to=reply_to)

    @property
    def command(self) -> RpcCommand:
        return self.message.command


def run(clock: task.Clock) -> None:
    clock.advance(0)
    clock.advance(0)


def test_an_idle_actor_is_passivated_and_the_next_message_starts_a_new_one(clock):
    directory = directory_on(clock)
    first = directory.ref_for(DEVICE)
    run(clock)
    clock.advance(5.0)
    run(clock)
    assert not first.is_alive() and DEVICE.id not in directory
    session = FakeSession(1)
    directory.attach(DEVICE, session)
    run(clock)
    assert DEVICE.id in directory and directory.existing(DEVICE.id) is not first


def test_mail_queued_behind_passivation_reaches_the_next_actor_in_order(clock):
    directory = directory_on(clock)
    first = directory.ref_for(DEVICE)
    run(clock)
    first.tell(m.Passivate(1))  # as the idle timer would, with more mail right behind it
    session = FakeSession(1)
    first.tell(m.AttachSession(session))
    first.tell(m.SubscribeCommands(1))
    submit = Asked(directory, m.SubmitRpc, command(clock, "after-passivation"))
    first.tell(submit.message)
    run(clock)
    assert session.sent == [(session.sent[0][0], "after-passivation")]
    assert not first.is_alive()


def test_a_session_link_reaches_the_live_actor_after_passivation(clock):
    directory = directory_on(clock)
    session = FakeSession(1)
    link = directory.attach(DEVICE, session)
    link.closed()
    run(clock)
    clock.advance(5.0)
    run(clock)
    assert DEVICE.id not in directory
    directory.tell_local(DEVICE, m.AttachSession(session))
    link.subscribed()  # the link made for the first actor reaches its successor
    directory.tell(DEVICE, Asked(directory, m.SubmitRpc, command(clock, "hello")).message)
    run(clock)
    assert [method for _, method in session.sent] == ["hello"]


def test_a_session_that_takes_nothing_is_retried_without_spending_a_retry(clock):
    directory = directory_on(clock, max_retries=0)
    session = FakeSession(1, Delivery.NOT_SENT)
    directory.attach(DEVICE, session)
    directory.tell(DEVICE, m.SubscribeCommands(1))
    submit = Asked(directory, m.SubmitRpc, command(clock, "later"))
    directory.tell(DEVICE, submit.message)
    run(clock)
    session.outcome = Delivery.AWAITING_ACK
    clock.advance(1.0)  # the ack timeout resends; with max_retries=0 a counted retry would have failed it
    run(clock)
    assert [method for _, method in session.sent] == ["later"]
    assert not submit.reply.called


def test_a_deeply_nested_answer_does_not_kill_the_actor(clock):
    directory = directory_on(clock)
    session = FakeSession(1)
    directory.attach(DEVICE, session)
    directory.tell(DEVICE, m.SubscribeCommands(1))
    submit = Asked(directory, m.SubmitRpc, command(clock))
    directory.tell(DEVICE, submit.message)
    run(clock)
    request_id = session.sent[0][0]
    directory.tell(DEVICE, m.CommandAnswered(1, request_id, b"[" * 100_000))
    directory.tell(DEVICE, m.DeviceCall(1, 7, b"[" * 100_000))
    run(clock)
    assert submit.reply.called and submit.reply.result.failure is None
    assert directory.existing(DEVICE.id).is_alive()
    assert b"error" in session.replies[0][1]


def test_a_persistent_command_is_answered_after_its_insert_and_written_after_its_sent_status(clock):
    journal = RecordingJournal()
    directory = directory_on(clock, journal=journal)
    session = FakeSession(1)
    directory.attach(DEVICE, session)
    directory.tell(DEVICE, m.SubscribeCommands(1))
    submit = Asked(directory, m.SubmitRpc, command(clock, "durable", persistent=True))
    directory.tell(DEVICE, submit.message)
    run(clock)
    # Sent as it is submitted: one write, the row inserted as SENT (the write-ahead of the device's copy).
    assert [(kind, status) for kind, _, status in journal.writes] == [("insert", RpcStatus.SENT)]
    assert not submit.reply.called and session.sent == []
    journal.commit()
    run(clock)
    assert submit.reply.result.response == {"rpcId": str(submit.command.rpc_id)}
    assert [method for _, method in session.sent] == ["durable"]


def test_a_stored_command_is_written_by_the_journals_callback_itself_not_a_message_later(clock):
    journal = RecordingJournal()
    directory = directory_on(clock, journal=journal)
    session = FakeSession(1)
    directory.attach(DEVICE, session)
    directory.tell(DEVICE, m.SubscribeCommands(1))
    directory.tell(DEVICE, m.SubmitRpc(command(clock, "at-once", persistent=True), None))
    run(clock)
    assert session.sent == []
    journal.commit()  # no reactor turn: nothing goes through the actor's mailbox
    assert [method for _, method in session.sent] == ["at-once"]


def test_a_stored_command_whose_actor_stopped_meanwhile_is_not_written(clock):
    journal = RecordingJournal()
    directory = directory_on(clock, journal=journal)
    session = FakeSession(1)
    directory.attach(DEVICE, session)
    directory.tell(DEVICE, m.SubscribeCommands(1))
    directory.tell(DEVICE, m.SubmitRpc(command(clock, "orphan", persistent=True), None))
    run(clock)
    directory.ref_for(DEVICE).stop(block=False)
    run(clock)
    journal.commit()
    run(clock)
    assert session.sent == []


def test_a_failed_insert_fails_the_caller_and_drops_the_command(clock):
    journal = RecordingJournal()
    directory = directory_on(clock, journal=journal)
    submit = Asked(directory, m.SubmitRpc, command(clock, "doomed", persistent=True))
    directory.tell(DEVICE, submit.message)
    run(clock)
    journal.waiting.pop(0).errback(RuntimeError("disk full"))
    run(clock)
    failures = []
    submit.reply.addErrback(failures.append)
    assert failures and failures[0].check(RuntimeError)
    inspect = Asked(directory, m.Inspect)
    directory.tell(DEVICE, inspect.message)
    run(clock)
    assert inspect.reply.result["pending"] == []


def test_the_pending_limit_rejects_with_the_limit_named(clock):
    directory = directory_on(clock)
    directory.settings.max_pending = 1
    first, second = Asked(directory, m.SubmitRpc, command(clock)), Asked(directory, m.SubmitRpc, command(clock))
    directory.tell(DEVICE, first.message)
    directory.tell(DEVICE, second.message)
    run(clock)
    assert second.reply.result.failure is RpcFailure.REJECTED
    assert second.reply.result.response == {"limit": "rpc-max-pending", "value": 1}


def test_an_mqtt_reconnect_replaces_the_old_session_of_the_same_transport(clock):
    directory = directory_on(clock)
    old, new = FakeSession(1), FakeSession(2)
    directory.attach(DEVICE, old)
    directory.attach(DEVICE, new)
    run(clock)
    assert old.closed and not new.closed


def test_the_ack_wait_of_a_persistent_command_starts_when_it_is_written_not_when_it_was_scheduled(clock):
    journal = RecordingJournal()
    directory = directory_on(clock, journal=journal, max_retries=0)
    session = FakeSession(1)
    directory.attach(DEVICE, session)
    directory.tell(DEVICE, m.SubscribeCommands(1))
    submit = Asked(directory, m.SubmitRpc, command(clock, "slow-disk", persistent=True))
    directory.tell(DEVICE, submit.message)
    run(clock)
    clock.advance(5.0)  # the journal is slow: five ack timeouts pass before SENT is durable
    run(clock)
    assert [status for kind, _, status in journal.writes] == [RpcStatus.SENT]  # QUEUED and SENT in one insert
    journal.commit()
    run(clock)
    assert [method for _, method in session.sent] == ["slow-disk"]
    clock.advance(0.9)
    run(clock)
    assert RpcStatus.FAILED not in [status for _, _, status in journal.writes]


def test_each_spent_retry_of_a_persistent_command_is_journalled_with_its_count(clock):
    journal = RecordingJournal()
    directory = directory_on(clock, journal=journal, max_retries=2)
    session = FakeSession(1)  # takes every command, never acknowledges one
    directory.attach(DEVICE, session)
    directory.tell(DEVICE, m.SubscribeCommands(1))
    submit = Asked(directory, m.SubmitRpc, command(clock, "unacked", persistent=True))
    directory.tell(DEVICE, submit.message)
    for _ in range(4):
        run(clock)
        journal.commit()
        run(clock)
        clock.advance(1.0)  # the ack timeout
    run(clock)
    rpc_id = submit.command.rpc_id
    assert journal.attempts == [(rpc_id, 1), (rpc_id, 2)]
    assert len(session.sent) == 3  # the first send and two retries
    assert [status for kind, _, status in journal.writes if kind == "change"][-1] is RpcStatus.FAILED


@pytest.mark.parametrize("spent, retried, failed", [(1, True, False), (2, False, True)])
def test_a_restored_command_keeps_the_retries_it_had_spent_before_the_restart(clock, spent, retried, failed):
    journal = RecordingJournal()
    directory = directory_on(clock, journal=journal, max_retries=2)
    stored = command(clock, "resumed", persistent=True)
    directory.tell(DEVICE, m.RestoreRpcs([(stored, RpcStatus.SENT, 7, spent)]))
    session = FakeSession(1)
    directory.attach(DEVICE, session)
    directory.tell(DEVICE, m.SubscribeCommands(1))
    run(clock)
    journal.commit()
    run(clock)
    assert session.sent == [(7, "resumed")]  # sent again with its id
    clock.advance(1.0)  # no acknowledgement
    run(clock)
    changes = [status for kind, _, status in journal.writes if kind == "change"]
    # One retry left after one spent; none after two (not a fresh budget of two).
    assert (RpcStatus.TIMEOUT in changes, RpcStatus.FAILED in changes) == (retried, failed)
    assert journal.attempts == ([(stored.rpc_id, 2)] if retried else [])


def _timer_calls(clock: task.Clock) -> list[Any]:
    """The reactor calls that wake device actors for their timers (one wheel shared by all of a node's actors)."""
    return [c for c in clock.getDelayedCalls() if isinstance(getattr(c.func, "__self__", None), Wakeups)]


def test_a_commands_expiry_and_ack_timers_share_one_reactor_call_gone_once_it_is_answered(clock):
    directory = directory_on(clock)
    session = FakeSession(1)
    directory.attach(DEVICE, session)
    directory.tell(DEVICE, m.SubscribeCommands(1))
    first, second = (Asked(directory, m.SubmitRpc, command(clock, name)) for name in ("a", "b"))
    directory.tell(DEVICE, first.message)
    directory.tell(DEVICE, second.message)
    run(clock)
    # Four timers (two expiries, two ack waits), one call: at the earliest of them, the first ack timeout.
    [call] = _timer_calls(clock)
    assert call.getTime() == pytest.approx(clock.seconds() + 1.0)
    for request_id, _ in session.sent:
        directory.tell(DEVICE, m.CommandAnswered(1, request_id, b"{}"))
    run(clock)
    assert first.reply.called and second.reply.called
    assert _timer_calls(clock) == []


def test_commands_of_many_devices_wait_on_one_reactor_call_gone_once_all_are_answered(clock):
    directory = directory_on(clock)
    devices = [Device(uuid4(), 0, DEVICE.tenant_id, NULL_UUID, f"d{i}", "default", None, None) for i in range(3)]
    sessions = [FakeSession(i + 1) for i in range(3)]
    asked = []
    for device, session in zip(devices, sessions):
        directory.attach(device, session)
        directory.tell(device, m.SubscribeCommands(session.session_id))
        now = int(clock.seconds() * 1000)
        submit = Asked(directory, m.SubmitRpc, RpcCommand(uuid4(), device.tenant_id, device.id, "m", None, False,
                                                          now + 60_000, now))
        directory.tell(device, submit.message)
        asked.append(submit)
    run(clock)
    [call] = _timer_calls(clock)  # six timers of three actors: one call, at the first ack timeout
    assert call.getTime() == pytest.approx(clock.seconds() + 1.0)
    for device, session in zip(devices, sessions):
        [(request_id, _)] = session.sent
        directory.tell(device, m.CommandAnswered(session.session_id, request_id, b"{}"))
        run(clock)
        assert _timer_calls(clock) == ([] if session is sessions[-1] else [call])
    assert all(a.reply.called for a in asked)


def test_a_wake_up_left_early_by_a_cancelled_timer_fires_the_later_ones_at_their_time(clock):
    directory = directory_on(clock, max_retries=0)
    session = FakeSession(1)
    directory.attach(DEVICE, session)
    directory.tell(DEVICE, m.SubscribeCommands(1))
    submit = Asked(directory, m.SubmitRpc, command(clock, ttl_ms=3000))
    directory.tell(DEVICE, submit.message)
    run(clock)
    [(request_id, _)] = session.sent
    directory.tell(DEVICE, m.CommandAcked(1, request_id))  # the ack wait (due at 1 s) is cancelled, expiry stays
    run(clock)
    clock.advance(1.0)  # the wake-up for the ack wait: nothing due, re-armed for the expiry
    run(clock)
    assert not submit.reply.called
    [call] = _timer_calls(clock)
    assert call.getTime() == pytest.approx(clock.seconds() + 2.0)
    clock.advance(2.0)
    run(clock)
    assert submit.reply.called and submit.reply.result.failure is RpcFailure.NO_RESPONSE
    assert _timer_calls(clock) == []
