"""The write-behind journal of persistent RPCs: every insert and status change, batched in order.

Device actors record changes as they happen; the journal flushes them in submission order, one transaction per
batch, with one batch in flight at a time. Each record call returns a Deferred that fires once its batch is
durable, so the REST layer answers ``{"rpcId"}`` only after the insert committed and an actor writes a command
to a device only after its SENT status committed. Under load many changes share a transaction, so throughput
does not collapse into one commit per status change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from nanoiot.persistence.records import RpcRecord, RpcStatus
from nanoiot.persistence.repository import UNCHANGED, Repository

log = Logger(namespace="nanoiot.journal")


@dataclass
class _Batch:
    inserts: list[RpcRecord] = field(default_factory=list)
    changes: list[tuple[UUID, RpcStatus, Any, int | None]] = field(default_factory=list)
    deletes: list[UUID] = field(default_factory=list)
    waiters: list[Deferred] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.inserts) + len(self.changes) + len(self.deletes)


class RpcJournal:
    def __init__(self, repository: Repository, clock: IReactorTime, max_batch: int = 2000,
                 linger: float = 0.0) -> None:
        self.repository = repository
        self.clock = clock
        self.max_batch = max_batch
        #: Seconds to wait for more changes before flushing an idle journal (0: next reactor turn).
        self.linger = linger
        self._open = _Batch()
        self._flushing = False
        self._scheduled = False
        self.batches_written = 0
        self.changes_written = 0

    @property
    def pending(self) -> int:
        return len(self._open)

    def insert(self, record: RpcRecord) -> Deferred:
        self._open.inserts.append(record)
        return self._wait()

    def change(self, rpc_id: UUID, status: RpcStatus, response: Any = UNCHANGED,
               retries: int | None = None) -> Deferred:
        self._open.changes.append((rpc_id, status, response, retries))
        return self._wait()

    def delete(self, rpc_id: UUID) -> Deferred:
        self._open.deletes.append(rpc_id)
        return self._wait()

    def flushed(self) -> Deferred:
        """Fires once everything recorded so far is durable (used at shutdown and by tests)."""
        if not len(self._open) and not self._flushing:
            d: Deferred = Deferred()
            d.callback(None)
            return d
        return self._wait()

    def _wait(self) -> Deferred:
        d: Deferred = Deferred()
        self._open.waiters.append(d)
        self._schedule()
        return d

    def _schedule(self) -> None:
        if self._flushing or self._scheduled or not (len(self._open) or self._open.waiters):
            return
        self._scheduled = True
        self.clock.callLater(self.linger, self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._flushing or not (len(self._open) or self._open.waiters):
            return
        batch, self._open = self._open, _Batch()
        if len(batch) > self.max_batch:
            # Keep batches bounded; order is kept because the rest goes first into the next batch.
            batch, rest = _split(batch, self.max_batch)
            rest.inserts += self._open.inserts
            rest.changes += self._open.changes
            rest.deletes += self._open.deletes
            rest.waiters += self._open.waiters
            self._open = rest
        self._flushing = True
        d = self.repository.write_rpc_batch(batch.inserts, batch.changes, batch.deletes)
        d.addCallbacks(self._written, self._failed, callbackArgs=(batch,), errbackArgs=(batch,))

    def _written(self, _: Any, batch: _Batch) -> None:
        self._flushing = False
        self.batches_written += 1
        self.changes_written += len(batch)
        for waiter in batch.waiters:
            waiter.callback(None)
        self._schedule()

    def _failed(self, failure: Failure, batch: _Batch) -> None:
        self._flushing = False
        log.failure("journal: a batch of {n} RPC changes could not be written", failure, n=len(batch))
        for waiter in batch.waiters:
            waiter.errback(failure)
        self._schedule()


def _split(batch: _Batch, size: int) -> tuple[_Batch, _Batch]:
    """The first ``size`` operations, taken kind by kind (inserts, then changes, then deletes): a change never
    precedes the insert of its RPC nor a delete its change, so splitting this way keeps every RPC's own order."""
    first, rest = _Batch(), _Batch()
    room = size
    first.inserts, rest.inserts = batch.inserts[:room], batch.inserts[room:]
    room -= len(first.inserts)
    first.changes, rest.changes = batch.changes[:max(room, 0)], batch.changes[max(room, 0):]
    room -= len(first.changes)
    first.deletes, rest.deletes = batch.deletes[:max(room, 0)], batch.deletes[max(room, 0):]
    # Waiters cannot be split by kind reliably: everyone waits for the later batch, which is never earlier.
    rest.waiters = batch.waiters
    return first, rest
