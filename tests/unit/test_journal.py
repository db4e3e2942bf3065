"""The RPC journal: changes batched in order, one transaction at a time, callers told when theirs is durable."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from nanoiot.persistence.errors import RowRefused
from nanoiot.persistence.journal import RpcJournal
from nanoiot.persistence.records import RpcRecord, RpcStatus
from nanoiot.persistence.repository import UNCHANGED


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


# --- a row the database refuses fails only its own caller ------------------------------------------------------------

class Table:
    """An in-memory table behind the journal: a transaction applies all of its batch or, when one row is refused
    (as the database refuses a value out of its column's range), nothing; ``down`` makes every write fail as a
    database out of reach does."""

    def __init__(self) -> None:
        self.rows: dict = {}
        self.refuse: set = set()
        self.transactions = 0
        self.down = False

    def write_rpc_batch(self, inserts, changes, deletes) -> Deferred:
        self.transactions += 1
        if self.down:
            return fail(OperationalError("INSERT ...", {}, ConnectionRefusedError("db:5432")))
        if any(r.id in self.refuse for r in inserts) or any(c[0] in self.refuse for c in changes):
            return fail(DataError("INSERT ...", {}, OverflowError("bigint out of range")))
        for r in inserts:
            self.rows[r.id] = r.status
        for rpc_id, status, *_ in changes:
            if rpc_id in self.rows:
                self.rows[rpc_id] = status
        for rpc_id in deletes:
            self.rows.pop(rpc_id, None)
        return succeed(None)


def on_table() -> tuple[RpcJournal, Table, task.Clock]:
    table, clock = Table(), task.Clock()
    return RpcJournal(table, clock), table, clock  # type: ignore[arg-type]


def outcome(d: Deferred) -> Any:
    results: list = []
    d.addBoth(results.append)
    assert results, "not settled"
    return results[0]


def test_a_refused_insert_fails_only_its_own_caller_and_every_other_change_is_stored():
    j, table, clock = on_table()
    a_sent = [record() for _ in range(3)]  # tenant A's commands, already stored and acknowledged by the device
    for r in a_sent:
        table.rows[r.id] = RpcStatus.SENT
    a_new = [record() for _ in range(5)]
    b_bad = record()
    table.refuse.add(b_bad.id)
    waiters = [j.insert(a_new[0]), j.insert(a_new[1]), j.insert(b_bad)]
    waiters += [j.change(r.id, RpcStatus.DELIVERED) for r in a_sent]
    waiters += [j.insert(r) for r in a_new[2:]]
    clock.advance(0)
    results = [outcome(d) for d in waiters]
    refused = results.pop(2)
    assert isinstance(refused, Failure) and refused.check(RowRefused)
    assert refused.value.http_status == 400 and "error id" in refused.value.message
    assert results == [None] * 8
    assert {rid: table.rows[rid] for rid in table.rows} == {
        **{r.id: RpcStatus.DELIVERED for r in a_sent}, **{r.id: RpcStatus.QUEUED for r in a_new}}
    assert j.pending == 0 and not j._flushing


def test_the_later_changes_of_a_refused_rpc_fail_with_it_and_are_not_written():
    j, table, clock = on_table()
    bad, good = record(), record()
    table.refuse.add(bad.id)
    ops = [j.insert(bad), j.insert(good), j.change(bad.id, RpcStatus.SENT), j.change(good.id, RpcStatus.SENT),
           j.delete(bad.id)]
    clock.advance(0)
    first, ok_insert, bad_change, ok_change, bad_delete = [outcome(d) for d in ops]
    assert first.check(RowRefused) and bad_change.value is first.value and bad_delete.value is first.value
    assert ok_insert is None and ok_change is None
    assert table.rows == {good.id: RpcStatus.SENT}


def test_a_refused_row_in_a_large_batch_costs_a_logarithmic_number_of_transactions():
    j, table, clock = on_table()
    records = [record() for _ in range(1024)]
    table.refuse.add(records[700].id)
    waiters = [j.insert(r) for r in records]
    barrier = j.flushed()
    clock.advance(0)
    assert sum(isinstance(outcome(d), Failure) for d in waiters) == 1
    assert len(table.rows) == 1023
    assert table.transactions <= 1 + 2 * 10
    assert outcome(barrier) is None


def test_an_rpcs_own_operations_keep_their_order_across_the_parts_of_a_split_batch():
    j, table, clock = on_table()
    bad = record()
    table.refuse.add(bad.id)
    written: list = []
    original = table.write_rpc_batch

    def spy(inserts, changes, deletes):
        d = original(inserts, changes, deletes)
        if not isinstance(d.result, Failure):
            written.extend([("insert", r.id) for r in inserts] + [("change", c[0], c[1]) for c in changes]
                           + [("delete", i) for i in deletes])
        return d

    table.write_rpc_batch = spy  # type: ignore[method-assign]
    r = record()
    j.insert(r)
    j.insert(bad)
    j.change(r.id, RpcStatus.SENT)
    j.change(r.id, RpcStatus.DELIVERED)
    j.delete(r.id)
    clock.advance(0)
    assert written == [("insert", r.id), ("change", r.id, RpcStatus.SENT), ("change", r.id, RpcStatus.DELIVERED),
                       ("delete", r.id)]


def test_a_database_out_of_reach_fails_the_whole_batch_in_one_attempt_without_splitting_it():
    j, table, clock = on_table()
    table.down = True
    waiters = [j.insert(record()) for _ in range(100)]
    clock.advance(0)
    assert table.transactions == 1
    assert all(outcome(d).check(OperationalError) for d in waiters)
    table.down = False
    later = j.insert(record())
    clock.advance(0)
    assert outcome(later) is None and table.transactions == 2


def test_the_next_batch_waits_until_every_part_of_a_split_batch_is_written():
    j, repo, clock = journal()
    bad, good = record(), record()
    first = [j.insert(bad), j.insert(good)]
    clock.advance(0)
    later = j.insert(record())
    repo.pending.pop(0).errback(IntegrityError("INSERT ...", {}, Exception("duplicate key")))
    clock.advance(0)
    assert [len(b[0]) for b in repo.batches] == [2, 1]  # the first half, alone; the rest waits for it
    repo.commit()  # bad alone: committed here (the fake refuses nothing itself)
    clock.advance(0)
    assert [len(b[0]) for b in repo.batches] == [2, 1, 1]
    repo.commit()
    clock.advance(0)
    assert all(outcome(d) is None for d in first) and not later.called
    assert [len(b[0]) for b in repo.batches] == [2, 1, 1, 1]
    repo.commit()
    assert outcome(later) is None


def test_a_noted_change_is_written_in_order_without_a_deferred_and_a_failed_batch_carries_on():
    j, repo, clock = journal()
    a = record()
    inserted = j.insert(a)
    assert j.note(a.id, RpcStatus.SENT) is None
    j.note(a.id, RpcStatus.SUCCESSFUL, {"ok": 1})
    j.note(a.id, RpcStatus.TIMEOUT, attempts=2)
    clock.advance(0)
    [(inserts, changes, _)] = repo.batches
    assert inserts == [a]
    assert changes == [(a.id, RpcStatus.SENT, UNCHANGED, None, None),
                       (a.id, RpcStatus.SUCCESSFUL, {"ok": 1}, None, None),
                       (a.id, RpcStatus.TIMEOUT, UNCHANGED, None, 2)]
    repo.commit()
    assert inserted.called
    j.note(a.id, RpcStatus.FAILED)
    clock.advance(0)
    repo.pending.pop(0).errback(RuntimeError("database gone"))  # logged by the journal; nobody else to tell
    later = j.insert(record())
    clock.advance(0)
    repo.commit()
    assert later.called and later.result is None
    assert len(repo.batches) == 3


def test_after_a_large_batch_the_next_flush_waits_briefly_for_more_and_after_a_small_one_it_does_not():
    j, repo, clock = journal()
    j.busy_batch, j.busy_linger = 4, 0.01
    for _ in range(4):
        j.insert(record())
    clock.advance(0)
    repo.commit()  # a large batch was written: the journal is busy
    first = j.insert(record())
    clock.advance(0)
    assert len(repo.batches) == 1 and not first.called
    j.insert(record())
    clock.advance(0.01)
    assert len(repo.batches) == 2 and len(repo.batches[1][0]) == 2  # both in one batch
    repo.commit()
    assert first.called
    j.insert(record())  # the last batch was small: written on the next turn again
    clock.advance(0)
    assert len(repo.batches) == 3


def test_a_busy_journal_does_not_wait_when_a_full_batch_is_already_waiting():
    j, repo, clock = journal()
    j.busy_batch, j.busy_linger, j.max_batch = 2, 0.01, 3
    for _ in range(3):
        j.insert(record())
    clock.advance(0)
    for _ in range(3):
        j.insert(record())
    repo.commit()
    clock.advance(0)
    assert len(repo.batches) == 2 and len(repo.batches[1][0]) == 3
