"""Bulk RPC: one command to many devices, each device getting its own persistent command.

ThingsBoard keeps group RPC for its paid edition (issue #1508). Here a batch is:

1. **resolved**: the devices named by id (every one must exist and be the caller's to command, or the whole batch
   is refused, naming them), or every device of a type that the caller may see (a tenant admin: the tenant's; a
   customer user: its customer's);
2. **stored**: one ``rpc_batch`` row (the command, who sent it, how many devices) — then the caller gets the
   ``batchId``;
3. **queued** in the background: one persistent command per device, each with its own ``rpcId`` and its own place
   in its device's queue, submitted a chunk at a time through :meth:`CommandService.submit_stored` with
   ``Initiator(batch_id=...)``: each device's actor checks its limits and journals the insert as for any command (for
   a connected device QUEUED and SENT are one row write, and the device gets the command once that row is durable),
   and the chunk has one Deferred, fired once every command of it is stored or refused. Chunks go out one per
   reactor turn with at most ``window`` commands not yet stored, so the reactor keeps serving devices and requests,
   and the journal's batches (one transaction for up to 2,000 writes of many actors) fill up instead of committing
   a handful at a time. A command counts as queued only once its row is durable.

Its status is counted from the commands' rows (``GROUP BY status`` on ``rpc.batch_id``); a deleted command has no
row, so ``DELETED = total - the rest``. Deleting a batch takes each unfinished command out of its device's queue
(the batched equivalent of :meth:`CommandService.delete`), then deletes their rows in one transaction.

What is only in memory, on the node that queued the batch: whether it is still being queued, and the devices whose
command was refused while queueing (a device's or the tenant's limit). After a restart those show as
DELETED, and a batch whose queueing a crash interrupted stays partly queued (its ``total`` says how many were meant).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from uuid import UUID

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from nanoiot.actors import messages as m
from nanoiot.commands.events import RpcStatusChanged
from nanoiot.commands.service import ChunkOutcome, CommandService, Initiator
from nanoiot.errors import BadRequest, NanoError, NotFound, PermissionDenied
from nanoiot.ids import uuid4, uuid7
from nanoiot.persistence.batch_store import BatchRecord, BatchStore
from nanoiot.persistence.records import Device, RpcStatus
from nanoiot.rpc.body import RpcBody, parse_rpc_body
from nanoiot.rpc.model import RpcResult

log = Logger(namespace="nanoiot.bulk")

#: The statuses a batch's commands are counted in (DELETED is what is left of ``total``).
COUNTED = (RpcStatus.QUEUED, RpcStatus.SENT, RpcStatus.DELIVERED, RpcStatus.SUCCESSFUL, RpcStatus.TIMEOUT,
           RpcStatus.EXPIRED, RpcStatus.FAILED)
#: Device ids named in an error, at most (the message says how many there are in all).
MAX_NAMED = 100
#: Devices whose refused command a batch names (GET's ``rejected``), at most; ``rejectedCount`` counts them all.
MAX_REJECTED_NAMED = 1000
#: Submissions per reactor turn.
DEFAULT_CHUNK = 200
#: Submissions not yet stored, at most: one journal batch's worth (it writes up to 2,000 per transaction). More
#: makes no batch faster, only the turns that fire a whole batch's callers longer (measured in bench/bulk.py).
DEFAULT_WINDOW = 2000
#: Commands queued between two calls of ``grown`` (the GC relief hook).
DEFAULT_GROWN_EVERY = 2000
#: Finished batches whose in-memory progress (refusals) is kept for GET, most recent first.
KEEP_FINISHED = 1000
#: Fields of one command in a bulk request; the rest of the body says which devices.
TARGET_FIELDS = ("deviceIds", "deviceType")


# --- the request ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BulkRequest:
    """A validated ``POST /api/rpc/bulk`` body: exactly one of ``device_ids``/``device_type``, and the command."""

    device_ids: tuple[UUID, ...] | None
    device_type: str | None
    #: The command; persistent. Its ``request_uuid`` is a placeholder: each device's command gets its own.
    body: RpcBody
    oneway: bool
    #: The command as the batch row records it (and GET shows it).
    request: dict[str, Any]


def parse_bulk_request(raw: Any, now: int, default_timeout: int, min_timeout: int,
                       max_devices: int) -> BulkRequest:
    """Validate a bulk body (pure code): the targets here, the command's fields as ``parse_rpc_body`` does."""
    if not isinstance(raw, dict):
        raise BadRequest("Invalid request body: expected a JSON object")
    given = [name for name in TARGET_FIELDS if raw.get(name) is not None]
    if len(given) != 1:
        raise BadRequest("Invalid request body: give exactly one of 'deviceIds' (a list of device ids) and "
                         "'deviceType'")
    device_ids: tuple[UUID, ...] | None = None
    device_type: str | None = None
    if given[0] == "deviceIds":
        device_ids = _device_ids(raw["deviceIds"], max_devices)
    else:
        device_type = raw["deviceType"]
        if not isinstance(device_type, str) or not device_type:
            raise BadRequest("Invalid request body: 'deviceType' must be a non-empty string")
    if raw.get("requestUUID") is not None:
        raise BadRequest("Invalid request body: 'requestUUID' names one command; each command of a bulk RPC gets "
                         "its own id (and the batch its batchId)")
    if raw.get("persistent", True) is not True:
        raise BadRequest("Invalid request body: bulk commands are always persistent ('persistent' may only be true)")
    oneway = raw.get("oneway", False)
    if not isinstance(oneway, bool):
        raise BadRequest("Invalid request body: 'oneway' must be true or false")
    command = {k: v for k, v in raw.items() if k not in TARGET_FIELDS and k != "oneway"}
    command["persistent"] = True
    body = parse_rpc_body(command, now, default_timeout, min_timeout)
    request: dict[str, Any] = {"method": body.method, "params": body.params, "oneway": oneway,
                               "timeout": body.timeout, "expirationTime": body.expiration_time,
                               "retries": body.retries, "additionalInfo": body.additional_info, "qos": body.qos}
    if device_type is not None:
        request["deviceType"] = device_type
    return BulkRequest(device_ids, device_type, body, oneway, request)


def _device_ids(value: Any, max_devices: int) -> tuple[UUID, ...]:
    if not isinstance(value, list) or not value:
        raise BadRequest("Invalid request body: 'deviceIds' must be a non-empty list of device ids")
    ids: dict[UUID, None] = {}  # a device named twice gets one command
    invalid = []
    for item in value:
        try:
            if not isinstance(item, str):
                raise ValueError
            ids[UUID(item)] = None
        except ValueError:
            invalid.append(item)
    if invalid:
        raise BadRequest(f"Invalid request body: {len(invalid)} of 'deviceIds' are not UUIDs: "
                         f"{_named(str(i) for i in invalid)}", invalidDeviceIds=[str(i) for i in invalid[:MAX_NAMED]])
    if len(ids) > max_devices:
        raise BadRequest(f"Invalid request body: {len(ids)} devices, more than a bulk RPC may target "
                         f"({max_devices}, --rpc-bulk-max-devices)")
    return tuple(ids)


def _named(ids: Any) -> str:
    ids = list(ids)
    text = ", ".join(ids[:MAX_NAMED])
    return text + (f" and {len(ids) - MAX_NAMED} more" if len(ids) > MAX_NAMED else "")


# --- what a batch looks like --------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BatchStatus:
    batch: BatchRecord
    #: Every status of COUNTED and DELETED, with zeros.
    status_counts: dict[str, int]
    #: device id -> its command's id (deleted commands are absent).
    rpc_ids: dict[UUID, UUID]
    #: Still being queued on this node.
    queueing: bool
    #: Commands not stored yet (while queueing).
    not_yet_queued: int
    #: device id -> why its command was refused while queueing (known on this node while it runs; the first
    #: MAX_REJECTED_NAMED of them), and how many were refused in all.
    rejected: dict[UUID, str]
    rejected_count: int


class _Progress:
    """A batch being queued on this node: refusals, and the waits of the queueing loop and of DELETE."""

    __slots__ = ("batch_id", "rejected", "rejected_count", "in_flight", "queueing", "cancelled", "_room",
                 "_room_at", "_finished", "_logged")

    def __init__(self, batch_id: UUID) -> None:
        self.batch_id = batch_id
        #: device id -> why its command was refused (the first MAX_REJECTED_NAMED); ``rejected_count``: all of them.
        self.rejected: dict[UUID, str] = {}
        self.rejected_count = 0
        self.in_flight = 0
        self.queueing = True
        self.cancelled = False
        self._room: Deferred | None = None
        self._room_at = 0
        self._finished: list[Deferred] = []
        self._logged = False

    def chunk_done(self, outcome: ChunkOutcome, count: int) -> None:
        """A chunk of ``count`` submissions has every outcome: the refused ones are noted."""
        for device_id, why in outcome.refused:
            if isinstance(why, Failure):
                self._failed(why, device_id)
            else:
                self._refused(device_id, _reason(why))
        self._less(count)

    def chunk_failed(self, failure: Failure, count: int) -> None:
        log.failure("bulk RPC {batch_id}: a chunk's outcomes were lost", failure, batch_id=self.batch_id)
        self._less(count)

    def _failed(self, failure: Failure, device_id: UUID) -> None:
        if not failure.check(NanoError) and not self._logged:
            self._logged = True  # once per batch: a failing database would fail every command the same way
            log.failure("bulk RPC {batch_id}: the command for device {device_id} failed", failure,
                        batch_id=self.batch_id, device_id=device_id)
        self._refused(device_id, failure.getErrorMessage() or type(failure.value).__name__)

    def _refused(self, device_id: UUID, reason: str) -> None:
        self.rejected_count += 1
        if len(self.rejected) < MAX_REJECTED_NAMED:
            self.rejected[device_id] = reason

    def _less(self, count: int) -> None:
        self.in_flight -= count
        room = self._room
        if room is not None and self.in_flight <= self._room_at:
            self._room = None
            room.callback(None)

    def room(self, at_most: int) -> Deferred:
        """Fires once no more than ``at_most`` submissions wait to be stored."""
        if self.in_flight <= at_most:
            return succeed(None)
        self._room, self._room_at = Deferred(), at_most
        return self._room

    def finish(self) -> None:
        self.queueing = False
        waiting, self._finished = self._finished, []
        for d in waiting:
            d.callback(None)

    def finished(self) -> Deferred:
        """Fires once queueing ended and every submission has its outcome."""
        if not self.queueing:
            return succeed(None)
        d: Deferred = Deferred()
        self._finished.append(d)
        return d


def _reason(result: RpcResult) -> str:
    """Why a command was refused, as GET's ``rejected`` names it ("REJECTED: rpc-max-persistent-per-device 2")."""
    details = result.response if isinstance(result.response, dict) else {}
    reason = result.failure.value if result.failure is not None else "refused"
    if details.get("limit"):
        reason += f": {details['limit']} {details.get('value')}"
    return reason


def batch_initiator(initiator: Initiator) -> dict[str, Any]:
    """Who sent a batch, as its row records it (a customer user's batches are visible to that customer only)."""
    return {"type": "USER", "id": _text(initiator.user_id), "customerId": _text(initiator.customer_id)}


def _text(value: UUID | None) -> str | None:
    return None if value is None else str(value)


# --- the use case -------------------------------------------------------------------------------------------------

class BulkRpc(Service):
    name = "bulk-rpc"

    def __init__(self, commands: CommandService, store: BatchStore, clock: IReactorTime,
                 max_devices: int = 100_000, chunk: int = DEFAULT_CHUNK, window: int = DEFAULT_WINDOW,
                 keep_finished: int = KEEP_FINISHED, grown: Callable[[], Any] | None = None,
                 grown_every: int = DEFAULT_GROWN_EVERY) -> None:
        self.commands = commands
        self.store = store
        self.clock = clock
        self.max_devices = max_devices
        self.chunk = chunk
        self.window = max(window, chunk)
        self.keep_finished = keep_finished
        #: Told every ``grown_every`` commands queued: the long-lived heap grew (the service freezes it for the GC).
        self.grown = grown
        self.grown_every = grown_every
        #: Batches queued by this node: the ones being queued, then the last ``keep_finished`` finished ones.
        self._progress: OrderedDict[UUID, _Progress] = OrderedDict()

    def now(self) -> int:
        return int(self.clock.seconds() * 1000)

    # --- start ----------------------------------------------------------------------------------------------------

    def start(self, initiator: Initiator, request: BulkRequest) -> Deferred[BatchRecord]:
        """Resolve and check the targets, store the batch, and start queueing its commands; fires with the stored
        batch (before its commands are queued). Refuses the whole batch if any named device is missing (404) or
        not the initiator's to command (403). A caller that goes away (its Deferred cancelled) does not stop a
        batch already being stored or queued."""
        shielded: Deferred[BatchRecord] = Deferred()
        ensureDeferred(self._start(initiator, request)).chainDeferred(shielded)
        return shielded

    async def _start(self, initiator: Initiator, request: BulkRequest) -> BatchRecord:
        targets = await self._targets(initiator, request)
        batch = BatchRecord(uuid4(), self.now(), initiator.tenant_id, len(targets), request.request,
                            batch_initiator(initiator))
        await self.store.insert_batch(batch)
        progress = _Progress(batch.id)
        self._progress[batch.id] = progress
        queueing = ensureDeferred(self._queue(batch, targets, request, replace(initiator, batch_id=batch.id),
                                              progress))
        queueing.addErrback(self._queueing_failed, progress)
        return batch

    async def _targets(self, initiator: Initiator, request: BulkRequest) -> list[Device]:
        if request.device_ids is not None:
            found = await self.store.devices_by_ids(request.device_ids)
            missing = [i for i in request.device_ids if i not in found]
            if missing:
                raise NotFound(f"{len(missing)} of the devices weren't found: {_named(str(i) for i in missing)}",
                               notFound=[str(i) for i in missing[:MAX_NAMED]])
            foreign = [i for i in request.device_ids if not _reachable(initiator, found[i])]
            if foreign:
                raise PermissionDenied(f"You don't have permission to command {len(foreign)} of the devices: "
                                       f"{_named(str(i) for i in foreign)}",
                                       forbidden=[str(i) for i in foreign[:MAX_NAMED]])
            return [found[i] for i in request.device_ids]
        assert request.device_type is not None
        targets = await self.store.devices_of_type(initiator.tenant_id, request.device_type, initiator.customer_id,
                                                   limit=self.max_devices + 1)
        if len(targets) > self.max_devices:
            raise BadRequest(f"More than {self.max_devices} devices of type '{request.device_type}': more than a "
                             "bulk RPC may target (--rpc-bulk-max-devices)")
        if not targets:
            raise NotFound(f"No device of type '{request.device_type}' was found")
        return targets

    async def _queue(self, batch: BatchRecord, targets: Sequence[Device], request: BulkRequest,
                     initiator: Initiator, progress: _Progress) -> None:
        """Submit each device's command: ``chunk`` per reactor turn, at most ``window`` waiting to be stored."""
        service = self.commands
        t, oneway = request.body, request.oneway
        chunk, low_water = self.chunk, self.window - self.chunk
        done, lost = progress.chunk_done, progress.chunk_failed
        since_grown = 0
        for start in range(0, len(targets), chunk):
            if progress.cancelled:
                break
            part = targets[start:start + chunk]
            progress.in_flight += len(part)
            bodies = [(device, RpcBody(t.method, t.params, t.timeout, t.expiration_time, True, t.retries,
                                       t.additional_info, uuid7(), t.qos)) for device in part]
            # One Deferred for the chunk, fired once each command is stored or refused (CommandService.submit_stored).
            service.submit_stored(initiator, bodies, oneway).addCallbacks(
                done, lost, callbackArgs=(len(part),), errbackArgs=(len(part),))
            if progress.in_flight > low_water:
                await progress.room(low_water)
            since_grown += len(part)
            if self.grown is not None and since_grown >= self.grown_every:
                since_grown = 0
                self.grown()
            if start + chunk < len(targets):
                await deferLater(self.clock, 0, lambda: None)  # the reactor's turn: devices, requests, the journal
        await progress.room(0)
        progress.finish()
        self._forget_old()
        if progress.rejected:
            log.warn("bulk RPC {batch_id}: {rejected} of {total} commands were refused (first: {first})",
                     batch_id=batch.id, rejected=progress.rejected_count, total=batch.total,
                     first=next(iter(progress.rejected.values())))

    def _queueing_failed(self, failure: Failure, progress: _Progress) -> None:
        log.failure("bulk RPC {batch_id}: queueing stopped", failure, batch_id=progress.batch_id)
        progress.finish()

    def _forget_old(self) -> None:
        finished = [batch_id for batch_id, p in self._progress.items() if not p.queueing]
        for batch_id in finished[:max(0, len(finished) - self.keep_finished)]:
            del self._progress[batch_id]

    def queued(self, batch_id: UUID) -> Deferred[None]:
        """Fires once this node finished queueing the batch (at once for a batch it is not queueing)."""
        progress = self._progress.get(batch_id)
        return progress.finished() if progress is not None else succeed(None)

    # --- inspect --------------------------------------------------------------------------------------------------

    def status(self, initiator: Initiator, batch_id: UUID, with_rpc_ids: bool = True) -> Deferred[BatchStatus]:
        """The batch's commands counted by status, and which command each device got."""
        return ensureDeferred(self._status(initiator, batch_id, with_rpc_ids))

    async def _status(self, initiator: Initiator, batch_id: UUID, with_rpc_ids: bool) -> BatchStatus:
        snapshot = await self.store.snapshot(batch_id, with_rpc_ids)
        if snapshot is None:
            raise NotFound(f"Bulk RPC with id [{batch_id}] is not found")
        batch = self._check_access(initiator, snapshot.batch)
        counts = {status.value: snapshot.status_counts.get(status, 0) for status in COUNTED}
        progress = self._progress.get(batch_id)
        rejected = dict(progress.rejected) if progress is not None else {}
        rejected_count = progress.rejected_count if progress is not None else 0
        queueing = progress is not None and progress.queueing
        left = max(0, batch.total - sum(counts.values()) - rejected_count)
        # While queueing, what has no row yet is still to come (a command deleted meanwhile counts here too).
        counts[RpcStatus.DELETED.value] = 0 if queueing else left
        return BatchStatus(batch, counts, snapshot.rpc_ids, queueing, left if queueing else 0, rejected,
                           rejected_count)

    @staticmethod
    def _check_access(initiator: Initiator, batch: BatchRecord) -> BatchRecord:
        """A tenant's batches are its own; a customer user sees the batches it sent only."""
        if batch.tenant_id != initiator.tenant_id:
            raise PermissionDenied()
        if initiator.customer_id is not None:
            sender = batch.initiator if isinstance(batch.initiator, dict) else {}
            if sender.get("customerId") != str(initiator.customer_id):
                raise PermissionDenied()
        return batch

    # --- delete ---------------------------------------------------------------------------------------------------

    def delete(self, initiator: Initiator, batch_id: UUID) -> Deferred[int]:
        """Delete the batch's unfinished commands: queueing stops, each pending command is taken out of its
        device's queue (wherever the device is: it will not be sent), then their rows go in one transaction.
        Fires with how many were deleted. Finished commands and the batch row stay."""
        return ensureDeferred(self._delete(initiator, batch_id))

    async def _delete(self, initiator: Initiator, batch_id: UUID) -> int:
        batch = await self.store.get_batch(batch_id)
        if batch is None:
            raise NotFound(f"Bulk RPC with id [{batch_id}] is not found")
        self._check_access(initiator, batch)
        progress = self._progress.get(batch_id)
        if progress is not None and progress.queueing:
            progress.cancelled = True
            await progress.finished()  # the submissions already made are stored (or refused): now they are listed
        records = await self.store.unfinished_rpcs(batch_id)
        if not records:
            return 0
        commands = self.commands
        devices: dict[UUID, Device] = {}
        unknown = []
        for record in records:
            device = commands.devices.cached_device(record.device_id)
            if device is None:
                unknown.append(record.device_id)
            else:
                devices[device.id] = device
        if unknown:
            devices.update(await self.store.devices_by_ids(unknown))
        cancelled: dict[UUID, bool] = {}
        answers: list[Deferred] = []
        for index, record in enumerate(records):
            device = devices.get(record.device_id)
            if device is None:
                continue  # the device was deleted, and its commands with it
            reply_to, answered = commands.replies.expect()
            commands.port.tell(device, m.DeleteRpc(record.id, reply_to))
            answered.addCallbacks(_note, _not_cancelled, callbackArgs=(record.id, cancelled),
                                  errbackArgs=(record.id, cancelled))
            answers.append(answered)
            if index % self.chunk == self.chunk - 1:
                await deferLater(self.clock, 0, lambda: None)
        await gatherResults(answers)
        # The actors journal their deletions too; deleting here as well makes the answer wait for all of them
        # (whichever of the two removes a row first: every unfinished command of the batch is gone).
        await self.store.delete_rpcs([record.id for record in records])
        for record in records:
            if not cancelled.get(record.id):  # a cancelled command's actor published RPC_DELETED itself
                commands.events.publish(RpcStatusChanged(replace(record, status=RpcStatus.DELETED), True))
        return len(records)

    # --- lifecycle ------------------------------------------------------------------------------------------------

    def stopService(self) -> None:
        """Stop queueing: the loops end at their next submission. Not waited for: the device actors stop at the same
        time, and the submissions already made end in the journal's last flush or not at all (the batch then stays
        partly queued, as after a crash)."""
        super().stopService()
        for progress in self._progress.values():
            progress.cancelled = True


def _reachable(initiator: Initiator, device: Device) -> bool:
    try:
        CommandService.check_access(initiator, device)
    except NanoError:
        return False
    return True


def _note(answer: Any, rpc_id: UUID, cancelled: dict[UUID, bool]) -> None:
    cancelled[rpc_id] = bool(answer)


def _not_cancelled(failure: Failure, rpc_id: UUID, cancelled: dict[UUID, bool]) -> None:
    # The node holding the device did not answer (cluster): its row is deleted all the same.
    log.warn("bulk RPC: deleting command {rpc_id}: {error}", rpc_id=rpc_id, error=failure.getErrorMessage())
    cancelled[rpc_id] = False
