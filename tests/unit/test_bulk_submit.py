"""A bulk RPC's commands on a node holding every device (``SubmitBatched``): the device actors with the real journal
over a repository that keeps its batches in memory, and one Deferred per chunk (``ChunkOutcome``)."""

from __future__ import annotations

from typing import Any, Iterator
from uuid import uuid4

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred

from nanoiot.actors import messages as m
from nanoiot.actors.device import ActorSettings
from nanoiot.actors.directory import DeviceDirectory
from nanoiot.commands.service import ChunkOutcome
from nanoiot.persistence.journal import RpcJournal
from nanoiot.persistence.records import NULL_UUID, Device
from nanoiot.port.session import Delivery
from nanoiot.rpc.model import RpcCommand, RpcFailure, RpcStatus
from nanoiot.rpc.queue import QueueSettings
from tests.fixtures.actors import actors_on_clock

TENANT = uuid4()


class FakeSession:
    transport = "fake"

    def __init__(self, session_id: int) -> None:
        self.session_id = session_id
        self.sent: list[str] = []
        self.request_ids: list[int] = []

    def send_command(self, request_id: int, method: str, params: Any, qos: int) -> Delivery:
        self.sent.append(method)
        self.request_ids.append(request_id)
        return Delivery.AWAITING_ACK

    def close(self, reason: str) -> None:
        pass


class BatchRepository:
    """The journal's repository: each batch is durable (or fails) when the test says so."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[Any], list[Any], list[Any]]] = []
        self.waiting: list[Deferred] = []

    def write_rpc_batch(self, inserts: list[Any], changes: list[Any], deletes: list[Any]) -> Deferred:
        self.batches.append((list(inserts), list(changes), list(deletes)))
        d: Deferred = Deferred()
        self.waiting.append(d)
        return d

    def commit(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback([])


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[task.Clock]:
    with actors_on_clock(monkeypatch) as clock:
        yield clock


def node(clock: task.Clock, repository: BatchRepository) -> DeviceDirectory:
    settings = ActorSettings(queue=QueueSettings(ack_timeout_ms=1000), idle_timeout=5.0)
    return DeviceDirectory(clock, settings, journal=RpcJournal(repository, clock))  # type: ignore[arg-type]


def a_device(name: str) -> Device:
    return Device(uuid4(), 0, TENANT, NULL_UUID, name, "bench", None, None)


def bulk_command(clock: task.Clock, target: Device) -> RpcCommand:
    now = int(clock.seconds() * 1000)
    return RpcCommand(uuid4(), TENANT, target.id, "bulk", None, True, now + 60_000, now, persistent=True)


def connected(directory: DeviceDirectory, target: Device, session_id: int) -> FakeSession:
    session = FakeSession(session_id)
    directory.attach(target, session)
    directory.tell(target, m.SubscribeCommands(session_id))
    return session


def turn(clock: task.Clock, times: int = 3) -> None:
    for _ in range(times):
        clock.advance(0)


def test_a_chunk_is_one_journal_batch_with_queued_and_sent_in_one_insert_and_written_once_durable(clock):
    repository = BatchRepository()
    directory = node(clock, repository)
    online, offline = a_device("online"), a_device("offline")
    session = connected(directory, online, 1)
    chunk = ChunkOutcome(2)
    commands = [bulk_command(clock, online), bulk_command(clock, offline)]
    for target, command in zip((online, offline), commands):
        directory.tell(target, m.SubmitBatched(command, chunk))
    turn(clock)
    [(inserts, changes, deletes)] = repository.batches  # one row write each: QUEUED and SENT in one insert
    assert [(r.id, r.status) for r in inserts] == [(commands[0].rpc_id, RpcStatus.SENT),
                                                   (commands[1].rpc_id, RpcStatus.QUEUED)]
    assert changes == [] and deletes == []
    assert session.sent == [] and not chunk.done.called  # nothing reaches a device or the caller before durable
    repository.commit()
    assert session.sent == ["bulk"]  # the write-ahead: written once the SENT row is durable
    assert chunk.done.called and chunk.refused == [] and chunk.left == 0
    directory.tell(online, m.CommandAcked(1, session.request_ids[0]))
    turn(clock)
    [_, (inserts, changes, deletes)] = repository.batches  # the PUBACK of a one-way command: one entry, SUCCESSFUL
    assert inserts == [] and deletes == [] and [c[:2] for c in changes] == [(commands[0].rpc_id,
                                                                            RpcStatus.SUCCESSFUL)]


def test_a_device_over_its_persistent_limit_refuses_its_command_naming_the_limit(clock):
    repository = BatchRepository()
    directory = node(clock, repository)
    directory.settings.max_persistent_per_device = 1
    target = a_device("full")
    first, second = ChunkOutcome(1), ChunkOutcome(1)
    directory.tell(target, m.SubmitBatched(bulk_command(clock, target), first))
    directory.tell(target, m.SubmitBatched(bulk_command(clock, target), second))
    turn(clock)
    repository.commit()
    assert first.done.called and first.refused == []
    [(device_id, why)] = second.refused
    assert device_id == target.id and why.failure is RpcFailure.REJECTED
    assert why.response == {"limit": "rpc-max-persistent-per-device", "value": 1}
    assert sum(len(inserts) for inserts, _, _ in repository.batches) == 1  # the refused one was never stored


def test_a_chunk_whose_insert_failed_is_told_and_its_device_never_gets_the_command(clock):
    repository = BatchRepository()
    directory = node(clock, repository)
    target = a_device("unlucky")
    session = connected(directory, target, 1)
    chunk = ChunkOutcome(1)
    directory.tell(target, m.SubmitBatched(bulk_command(clock, target), chunk))
    turn(clock)
    repository.waiting.pop(0).errback(RuntimeError("disk full"))
    turn(clock)
    repository.commit()
    [(device_id, why)] = chunk.refused
    assert device_id == target.id and why.check(RuntimeError)
    assert session.sent == []
    inspect_reply, answered = directory.replies.expect()
    directory.tell(target, m.Inspect(inspect_reply))
    turn(clock)
    assert answered.result["pending"] == [] and answered.result["persistent_pending"] == 0
