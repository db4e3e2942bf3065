"""The write-behind journal of persistent RPCs: every insert and status change, batched in order.

Device actors record changes as they happen; the journal flushes them in submission order, one transaction per
batch, with one batch in flight at a time. Each record call returns a Deferred that fires once its batch is
durable, so the REST layer answers ``{"rpcId"}`` only after the insert committed and an actor writes a command
to a device only after its SENT status committed. Under load many changes share a transaction, so throughput
does not collapse into one commit per status change; a busy journal (its last batch was large) waits a few
milliseconds before the next flush so that batches grow further (``BUSY_LINGER``). Status changes nobody waits for
(``note``) carry no Deferred.

A batch carries many tenants' commands, so one client's row must not fail the others: when the database refuses
a row (a value out of range, a violated constraint; see :mod:`nanoiot.persistence.errors`), the batch is written
again in halves until the refused rows stand alone, and only their own callers fail. When the database is out of
reach the whole batch fails at once, as before — except when the repository says so itself
(:class:`~nanoiot.persistence.errors.DatabaseUnavailable`): then the journal holds (see :meth:`RpcJournal._hold`).
"""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from nanoiot.errors import NanoError
from nanoiot.persistence.errors import DatabaseUnavailable, RowRefused, is_refused_row
from nanoiot.persistence.records import RpcRecord, RpcStatus
from nanoiot.persistence.repository import UNCHANGED, Repository

log = Logger(namespace="nanoiot.journal")


#: Operation kinds; the first three also index the lists a batch is split into (``_write_next``).
INSERT, CHANGE, DELETE, MARK = range(4)
#: Seconds a busy journal waits before its next flush, and the batch size (operations) that makes it busy. A
#: transaction's cost on SQLite grows with the index pages it dirties (random uuid keys: about one page per row in
#: the id and device indexes, up to every page) more than with its rows: in-process, a bulk command's insert and
#: update cost ~48 µs at 500 commands per transaction, ~42 at 1,000, ~34 at 2,000. Without the wait a bulk RPC's
#: batches stayed at ~400 commands (bench/throughput.py --channels bulk); the commands of a larger batch also reach
#: a device together, so its acknowledgements are read together. An idle journal still flushes on the next turn.
BUSY_LINGER = 0.010
BUSY_BATCH = 256


class _Unobserved:
    """The waiter of an operation nobody waits for (``RpcJournal.note``)."""

    __slots__ = ()

    def callback(self, _: Any) -> None:
        pass

    def errback(self, _: Any = None) -> None:
        pass


_UNOBSERVED: Any = _Unobserved()


@dataclass(slots=True)
class _Op:
    """One journalled operation and the caller waiting for it to be durable (MARK: a barrier, no write)."""

    kind: int
    payload: Any
    waiter: Deferred


class RpcJournal:
    def __init__(self, repository: Repository, clock: IReactorTime, max_batch: int = 2000,
                 linger: float = 0.0, busy_linger: float = BUSY_LINGER, busy_batch: int = BUSY_BATCH) -> None:
        self.repository = repository
        self.clock = clock
        self.max_batch = max_batch
        #: Seconds to wait for more changes before flushing an idle journal (0: next reactor turn).
        self.linger = linger
        #: Under load (the last batch had ``busy_batch`` operations or more), seconds to wait before the next flush
        #: unless a full batch is already waiting: see BUSY_LINGER.
        self.busy_linger = busy_linger
        self.busy_batch = busy_batch
        self._last_batch = 0
        #: Operations not yet written, in the order they were recorded.
        self._ops: deque[_Op] = deque()
        self._flushing = False
        self._scheduled = False
        #: The batch being flushed, in parts still to write (one part unless a refused row split it).
        self._parts: deque[list[_Op]] = deque()
        #: RPCs of the batch being flushed whose row the database refused, with the error their callers got.
        self._refused: dict[UUID | None, NanoError] = {}
        self._split = False
        #: While the database is out of reach, the failure new inserts get (see :meth:`_hold`); else None.
        self._held: Failure | None = None
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

    def note(self, rpc_id: UUID, status: RpcStatus, response: Any = UNCHANGED, attempts: int | None = None) -> None:
        """``change`` for a caller that does not wait for it (a device actor's status changes other than SENT): no
        Deferred per change. A failed write is logged here as for any batch."""
        self._ops.append(_Op(CHANGE, (rpc_id, status, response, None, attempts), _UNOBSERVED))
        self._schedule()

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
        if self._held is not None and kind in (INSERT, MARK):
            # The database is out of reach: a new command is refused at once (503), never acknowledged unstored.
            # On the next turn: the recording actor is in the middle of applying its effects.
            self.clock.callLater(0, d.errback, self._held)
            return d
        self._ops.append(_Op(kind, payload, d))
        self._schedule()
        return d

    def _schedule(self) -> None:
        if self._flushing or self._scheduled or not self._ops:
            return
        self._scheduled = True
        delay = self.linger
        if self._last_batch >= self.busy_batch and len(self._ops) < self.max_batch:
            delay = max(delay, self.busy_linger)
        self.clock.callLater(delay, self._flush)

    def _flush(self) -> None:
        """Write the oldest ``max_batch`` operations in one transaction. Each caller waits for its own batch only,
        so a long backlog delays nobody more than the batches recorded before them."""
        self._scheduled = False
        if self._flushing or not self._ops:
            return
        batch = [self._ops.popleft() for _ in range(min(self.max_batch, len(self._ops)))]
        self._last_batch = len(batch)
        self._flushing = True
        self._parts = deque([batch])
        self._refused = {}
        self._split = False
        self._write_next()

    def _write_next(self) -> None:
        """Write the next part of the batch being flushed (the whole batch unless a refused row split it); when
        none is left, the journal is free for the next batch."""
        while self._parts:
            part = self._without_refused(self._parts.popleft())
            # In one transaction inserts go first, then changes, then deletes: within a part an RPC is always
            # inserted before it changes and changes before it is deleted, so its own order is kept (parts are
            # written one after another, in recorded order). One pass: this runs for every operation.
            inserts: list[Any] = []
            changes: list[Any] = []
            deletes: list[Any] = []
            by_kind = (inserts, changes, deletes)
            for op in part:
                if op.kind != MARK:
                    by_kind[op.kind].append(op.payload)
            if not (inserts or changes or deletes):
                for op in part:  # barriers only: everything before them is settled
                    op.waiter.callback(None)
                continue
            d = self.repository.write_rpc_batch(inserts, changes, deletes)
            d.addCallbacks(self._written, self._failed, callbackArgs=(part,), errbackArgs=(part,))
            return
        self._flushing = False
        self._refused = {}
        self._schedule()

    def _without_refused(self, part: list[_Op]) -> list[_Op]:
        """The part less the later operations of an RPC whose earlier one was refused (they fail alike: an RPC
        never stored must not look SENT or deleted to its actor)."""
        if not self._refused:
            return part
        kept = []
        for op in part:
            error = self._refused.get(_rpc_id(op))
            if error is None:
                kept.append(op)
            else:
                op.waiter.errback(error)
        return kept

    def _written(self, _: Any, part: list[_Op]) -> None:
        self.batches_written += 1
        written = 0
        for op in part:
            written += op.kind != MARK
            op.waiter.callback(None)
        self.changes_written += written
        self._write_next()

    def _failed(self, failure: Failure, part: list[_Op]) -> None:
        if isinstance(failure.value, DatabaseUnavailable):
            self._hold(failure, part)
            return
        writes = [i for i, op in enumerate(part) if op.kind != MARK]
        if not is_refused_row(failure.value):
            # The database is out of reach (or failed in a way no row explains): the whole batch fails alike;
            # splitting it would only send thousands of single writes to a database that is down.
            rest = [op for remaining in self._parts for op in remaining]
            self._parts.clear()
            log.failure("journal: a batch of {n} RPC changes could not be written", failure, n=len(part) + len(rest))
            for op in part + rest:
                op.waiter.errback(failure)
            self._write_next()
            return
        if len(writes) > 1:
            # Some row of this part was refused: write each half on its own until the refused rows stand alone,
            # so that only their own callers fail and every other change (another tenant's, an acknowledged
            # command's status) is stored.
            if not self._split:
                self._split = True
                log.warn("journal: the database refused a row of a batch of {n} RPC changes ({error}); writing it in "
                         "parts to isolate it", n=len(writes), error=type(failure.value).__name__)
            middle = writes[len(writes) // 2]
            self._parts.extendleft([part[middle:], part[:middle]])
            self._write_next()
            return
        op = part[writes[0]]
        error_id = uuid.uuid4().hex[:12]
        log.failure("journal: the database refused {what} of RPC {rpc_id} (error id {error_id})", failure,
                    what=_WHAT[op.kind], rpc_id=_rpc_id(op), error_id=error_id)
        error = RowRefused(f"the values of this command ({_WHAT[op.kind]})", error_id)
        self._refused[_rpc_id(op)] = error
        for other in part:
            if other is op:
                other.waiter.errback(error)
            else:
                other.waiter.callback(None)
        self._write_next()


    def _hold(self, failure: Failure, part: list[_Op]) -> None:
        """The database is out of reach: a new command's insert fails (its caller gets 503 with Retry-After, so
        nothing is acknowledged that is not stored), and until the repository finds the database back every other
        insert fails alike while status changes and deletions of stored commands wait, in recorded order, and are
        written then. So nothing a device did is lost, and a command waiting for its SENT to be stored reaches its
        device, still connected, as soon as the database is back."""
        # The later operations of an RPC whose row was refused fail with it, as they would have been written.
        held = self._without_refused(part + [op for remaining in self._parts for op in remaining])
        self._parts.clear()
        self._refused = {}
        if self._held is None:
            log.warn("journal: the database is out of reach; holding {n} RPC changes until it is back",
                     n=sum(1 for op in held if op.kind == CHANGE or op.kind == DELETE))
        self._held = failure
        kept = []
        for op in held:
            if op.kind in (INSERT, MARK):
                op.waiter.errback(failure)
            else:
                kept.append(op)
        # Newer inserts and barriers fail too (as they would have had they come after the hold).
        for op in [op for op in self._ops if op.kind in (INSERT, MARK)]:
            self._ops.remove(op)
            op.waiter.errback(failure)
        self._ops.extendleft(reversed(kept))
        self.repository.when_healthy().addCallback(self._resume)

    def _resume(self, _: Any = None) -> None:
        log.info("journal: the database is back; writing {n} held RPC changes", n=len(self._ops))
        self._held = None
        self._flushing = False
        self._schedule()


_WHAT = {INSERT: "the insert", CHANGE: "a status change", DELETE: "the deletion"}


def _rpc_id(op: _Op) -> UUID | None:
    if op.kind == INSERT:
        return op.payload.id
    if op.kind == CHANGE:
        return op.payload[0]
    if op.kind == DELETE:
        return op.payload
    return None
