"""The RPC journal: changes batched in order, one transaction at a time, callers told when theirs is durable."""

from __future__ import annotations

from uuid import uuid4

from twisted.internet import task
from twisted.internet.defer import Deferred

from nanoiot.persistence.journal import RpcJournal
from nanoiot.persistence.records import RpcRecord, RpcStatus


class FakeRepository:
    def __init__(self) -> None:
        self.batches: list[tuple[list, list, list]] = []
        self.pending: list[Deferred] = []

    def write_rpc_batch(self, inserts, changes, deletes) -> Deferred:
        self.batches.append((list(inserts), list(changes), list(deletes)))
        d: Deferred = Deferred()
        self.pending.append(d)
        return d

    def commit(self) -> None:
        self.pending.pop(0).callback([])


def record(status: RpcStatus = RpcStatus.QUEUED) -> RpcRecord:
    return RpcRecord(uuid4(), 0, uuid4(), uuid4(), 1, False, "m", None, status)


def journal() -> tuple[RpcJournal, FakeRepository, task.Clock]:
    repository, clock = FakeRepository(), task.Clock()
    return RpcJournal(repository, clock), repository, clock  # type: ignore[arg-type]


def test_changes_recorded_in_one_turn_are_written_in_one_batch_in_order():
    j, repo, clock = journal()
    a = record()
    j.insert(a)
    j.change(a.id, RpcStatus.SENT)
    j.change(a.id, RpcStatus.DELIVERED)
    assert repo.batches == []
    clock.advance(0)
    [(inserts, changes, deletes)] = repo.batches
    assert inserts == [a]
    assert [status for _, status, *_ in changes] == [RpcStatus.SENT, RpcStatus.DELIVERED]
    assert deletes == []


def test_a_change_carries_the_retry_attempts_to_the_repository():
    j, repo, clock = journal()
    a = record()
    j.insert(a)
    j.change(a.id, RpcStatus.TIMEOUT, attempts=2)
    j.change(a.id, RpcStatus.SENT)
    clock.advance(0)
    [(_, changes, _)] = repo.batches
    assert [(status, attempts) for _, status, _, _, attempts in changes] == [(RpcStatus.TIMEOUT, 2),
                                                                              (RpcStatus.SENT, None)]


def test_a_caller_learns_of_durability_only_when_its_batch_committed():
    j, repo, clock = journal()
    done = j.insert(record())
    clock.advance(0)
    assert not done.called
    repo.commit()
    assert done.called


def test_only_one_batch_is_in_flight_and_the_next_carries_what_came_meanwhile():
    j, repo, clock = journal()
    j.insert(record())
    clock.advance(0)
    later = [j.insert(record()), j.insert(record())]
    clock.advance(0)
    assert len(repo.batches) == 1  # the second waits for the first to commit
    repo.commit()
    clock.advance(0)
    assert len(repo.batches) == 2 and len(repo.batches[1][0]) == 2
    repo.commit()
    assert all(d.called for d in later)


def test_a_failed_batch_fails_its_callers_and_the_journal_carries_on():
    j, repo, clock = journal()
    failed = j.insert(record())
    clock.advance(0)
    errors = []
    failed.addErrback(errors.append)
    repo.pending.pop(0).errback(RuntimeError("database gone"))
    assert errors and errors[0].check(RuntimeError)
    ok = j.insert(record())
    clock.advance(0)
    repo.commit()
    assert ok.called and ok.result is None


def test_an_oversized_backlog_is_written_in_bounded_batches_in_recorded_order():
    j, repo, clock = journal()
    j.max_batch = 3
    records = [record() for _ in range(4)]
    waiters = [j.insert(r) for r in records]
    waiters.append(j.change(records[3].id, RpcStatus.SENT))
    waiters.append(j.delete(records[0].id))
    clock.advance(0)
    assert repo.batches[0] == (records[:3], [], [])
    repo.commit()
    # Each caller waits for its own batch only, not for the whole backlog.
    assert [d.called for d in waiters] == [True, True, True, False, False, False]
    clock.advance(0)
    inserts, changes, deletes = repo.batches[1]
    assert inserts == records[3:]
    assert [rpc_id for rpc_id, *_ in changes] == [records[3].id]
    assert deletes == [records[0].id]
    repo.commit()
    assert all(d.called for d in waiters)


def test_a_caller_behind_a_long_backlog_waits_only_for_the_batches_before_it():
    j, repo, clock = journal()
    j.max_batch = 100
    first = j.insert(record())
    for _ in range(499):
        j.insert(record())
    clock.advance(0)
    repo.commit()
    assert first.called and j.pending == 400


def test_flushed_fires_at_once_when_idle_and_after_the_last_batch_otherwise():
    j, repo, clock = journal()
    assert j.flushed().called
    j.insert(record())
    waiting = j.flushed()
    clock.advance(0)
    assert not waiting.called
    repo.commit()
    assert waiting.called
    assert clock.getDelayedCalls() == []
