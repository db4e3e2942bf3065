"""The write-behind journal of persistent RPCs: every insert and status change, batched in order.

Device actors record changes as they happen; the journal flushes them in submission order, one transaction per
batch, with one batch in flight at a time. Each record call returns a Deferred that fires once its batch is
durable, so the REST layer answers ``{"rpcId"}`` only after the insert committed and an actor writes a command
to a device only after its SENT status committed. Under load many changes share a transaction, so throughput
does not collapse into one commit per status change.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from nanoiot.persistence.records import RpcRecord, RpcStatus
from nanoiot.persistence.repository import UNCHANGED, Repository

log = Logger(namespace="nanoiot.journal")


INSERT, CHANGE, DELETE, MARK = range(4)


@dataclass(slots=True)
class _Op:
    """One journalled operation and the caller waiting for it to be durable (MARK: a barrier, no write)."""

    kind: int
    payload: Any
    waiter: Deferred


class RpcJournal:
    def __init__(self, repository: Repository, clock: IReactorTime, max_batch: int = 2000,
                 linger: float = 0.0) -> None:
        self.repository = repository
        self.clock = clock
        self.max_batch = max_batch
        #: Seconds to wait for more changes before flushing an idle journal (0: next reactor turn).
        self.linger = linger
        #: Operations not yet written, in the order they were recorded.
        self._ops: deque[_Op] = deque()
        self._flushing = False
        self._scheduled = False
        self.batches_written = 0
        self.changes_written = 0

    @property
    def pending(self) -> int:
        return len(self._ops)

    def insert(self, record: RpcRecord) -> Deferred:
        return self._record(INSERT, record)

    def change(self, rpc_id: UUID, status: RpcStatus, response: Any = UNCHANGED,
               retries: int | None = None, attempts: int | None = None) -> Deferred:
        return self._record(CHANGE, (rpc_id, status, response, retries, attempts))

    def delete(self, rpc_id: UUID) -> Deferred:
        return self._record(DELETE, rpc_id)

    def flushed(self) -> Deferred:
        """Fires once everything recorded so far is durable (used at shutdown and by tests)."""
        if not self._ops and not self._flushing:
            d: Deferred = Deferred()
            d.callback(None)
            return d
        return self._record(MARK, None)

    def _record(self, kind: int, payload: Any) -> Deferred:
        d: Deferred = Deferred()
        self._ops.append(_Op(kind, payload, d))
        self._schedule()
        return d

    def _schedule(self) -> None:
        if self._flushing or self._scheduled or not self._ops:
            return
        self._scheduled = True
        self.clock.callLater(self.linger, self._flush)

    def _flush(self) -> None:
        """Write the oldest ``max_batch`` operations in one transaction. Each caller waits for its own batch only,
        so a long backlog delays nobody more than the batches recorded before them."""
        self._scheduled = False
        if self._flushing or not self._ops:
            return
        batch = [self._ops.popleft() for _ in range(min(self.max_batch, len(self._ops)))]
        inserts = [op.payload for op in batch if op.kind == INSERT]
        changes = [op.payload for op in batch if op.kind == CHANGE]
        deletes = [op.payload for op in batch if op.kind == DELETE]
        self._flushing = True
        # In one transaction inserts go first, then changes, then deletes: within a batch an RPC is always
        # inserted before it changes and changes before it is deleted, so its own order is kept.
        d = self.repository.write_rpc_batch(inserts, changes, deletes)
        d.addCallbacks(self._written, self._failed, callbackArgs=(batch,), errbackArgs=(batch,))

    def _written(self, _: Any, batch: list[_Op]) -> None:
        self._flushing = False
        self.batches_written += 1
        self.changes_written += sum(1 for op in batch if op.kind != MARK)
        for op in batch:
            op.waiter.callback(None)
        self._schedule()

    def _failed(self, failure: Failure, batch: list[_Op]) -> None:
        self._flushing = False
        log.failure("journal: a batch of {n} RPC changes could not be written", failure, n=len(batch))
        for op in batch:
            op.waiter.errback(failure)
        self._schedule()
