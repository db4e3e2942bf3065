"""The command service: the one way in for submitting, inspecting, listing and deleting device commands.

REST, server methods (``context.send_rpc``), the MQTT gateway and, next, rule chains, WebSocket clients and bulk
RPC all call it. It authorizes (the initiator's tenant and customer), builds the command (plain data), keeps
``requestUUID`` idempotent, and hands the command to the device port — a local actor, or in a cluster the actor on
whichever node holds the device. Outcomes are :class:`~nanoiot.rpc.model.RpcResult`; refusals are
:class:`~nanoiot.errors.NanoError`; ``commands.outcomes`` renders both.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from collections.abc import Sequence
from typing import Any, Callable, Protocol
from uuid import UUID

from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from nanoiot.actors import messages as m
from nanoiot.actors.replies import Replies
from nanoiot.commands.events import EventStream, RpcStatusChanged
from nanoiot.errors import Conflict, InvalidArguments, NanoError, NotFound, PermissionDenied, RouteLost
from nanoiot.persistence.records import Device, Page, PageLink, RpcRecord
from nanoiot.rpc.body import RpcBody
from nanoiot.rpc.model import RpcCommand, RpcResult, RpcStatus

DEVICE_NOT_FOUND = "Device with requested id wasn't found!"
#: The field order ``CommandService._command`` passes RpcCommand's fields in.
_COMMAND_FIELDS = ("rpc_id", "tenant_id", "device_id", "method", "params", "oneway", "expiration_time",
                   "created_time", "persistent", "retries", "additional_info", "qos", "user_id", "initiator",
                   "batch_id")
if tuple(f.name for f in fields(RpcCommand)) != _COMMAND_FIELDS:
    raise ImportError("RpcCommand's fields moved: CommandService._command passes them by position")
#: Origins remembered by ``CommandService._origin`` at most (then it starts again).
MAX_ORIGINS = 10_000


@dataclass(frozen=True, slots=True)
class Initiator:
    """Who sends a command: what it may reach, and what the command records as its origin."""

    tenant_id: UUID
    #: Set for a customer user: only that customer's devices.
    customer_id: UUID | None = None
    user_id: UUID | None = None
    #: A device commanding another one (a server method's ``context.send_rpc``).
    device_id: UUID | None = None
    #: A rule chain's node sending the command (RPC Call Request).
    rule_chain_id: UUID | None = None
    rule_node_id: UUID | None = None
    #: The bulk RPC the command belongs to.
    batch_id: UUID | None = None

    def to_json(self) -> dict[str, Any] | None:
        """What the command records as its origin (shown in the Rpc JSON and in events)."""
        if self.batch_id is not None:
            return {"type": "BULK", "batchId": str(self.batch_id), "userId": _text(self.user_id)}
        if self.rule_chain_id is not None:
            return {"type": "RULE_CHAIN", "ruleChainId": str(self.rule_chain_id),
                    "ruleNodeId": _text(self.rule_node_id)}
        if self.device_id is not None:
            return {"type": "DEVICE", "id": str(self.device_id)}
        if self.user_id is not None:
            return {"type": "USER", "id": str(self.user_id)}
        return None


def _text(value: UUID | None) -> str | None:
    return None if value is None else str(value)


class DevicePort(Protocol):
    """What the service needs of the device port: reach a device's actor, wherever it lives."""

    def tell(self, device: Device, message: Any) -> None: ...


class Devices(Protocol):
    def cached_device(self, device_id: UUID) -> Device | None: ...

    def get_device(self, device_id: UUID) -> Deferred: ...


class CommandStore(Protocol):
    def get_rpc(self, rpc_id: UUID) -> Deferred: ...

    def delete_rpc(self, rpc_id: UUID) -> Deferred: ...

    def insert_rpcs(self, records: list[RpcRecord]) -> Deferred: ...

    def list_device_rpcs(self, device_id: UUID, link: PageLink, status: RpcStatus | None) -> Deferred: ...


#: The rule service's hook (``nanoiot/rules/server.py``): sees a command from a user (REST, WebSocket) or a bulk RPC
#: before it is sent, as (initiator, device, body, oneway), and either takes it, returning the Deferred of its outcome
#: (the tenant's root rule chain sends it), or returns None to let it go as it is.
Interceptor = Callable[[Initiator, Device, RpcBody, bool], "Deferred[RpcResult] | None"]


class ChunkOutcome:
    """The outcomes of one chunk of bulk commands gathered into ONE Deferred, ``done``, fired (with this object)
    once every command was stored or refused: no Deferred or reply address per command. ``refused`` lists the
    commands not stored, as (device id, the refusal: a REJECTED RpcResult naming the limit, or a Failure)."""

    __slots__ = ("left", "refused", "done")

    def __init__(self, count: int) -> None:
        self.left = count
        self.refused: list[tuple[UUID, Any]] = []
        self.done: Deferred[ChunkOutcome] = Deferred()
        if count <= 0:
            self.done.callback(self)

    def stored(self) -> None:
        """One command's insert is durable."""
        self.left -= 1
        if self.left == 0:
            self.done.callback(self)

    def refuse(self, device_id: UUID, why: Any) -> None:
        """One command was not stored: ``why`` is a REJECTED RpcResult or a Failure."""
        self.refused.append((device_id, why))
        self.stored()

    def outcome(self, result: Any, device_id: UUID) -> None:
        """A command submitted on its own (a rule chain's, or on a cluster node): its Deferred's outcome."""
        if isinstance(result, Failure) or not result.ok:
            self.refuse(device_id, result)
        else:
            self.stored()


class CommandService:
    def __init__(self, port: DevicePort, replies: Replies, devices: Devices, store: CommandStore,
                 events: EventStream, clock: IReactorTime) -> None:
        self.port = port
        self.replies = replies
        self.devices = devices
        self.store = store
        self.events = events
        self.clock = clock
        #: Set by the rule service; None: no rule chains (``--rules-bypass``, or unit tests).
        self.interceptor: Interceptor | None = None
        #: id(initiator) -> (initiator, its origin JSON): an edge that keeps one Initiator per caller (REST does)
        #: builds the origin once, not per command. Read-only data, shared by that caller's commands.
        self._origins: dict[int, tuple[Initiator, Any]] = {}

    def now(self) -> int:
        return int(self.clock.seconds() * 1000)

    # --- authorization ----------------------------------------------------------------------------------------------

    @staticmethod
    def check_access(initiator: Initiator, device: Device | None) -> Device:
        """ThingsBoard's rules: a tenant reaches its own devices, a customer user its customer's."""
        if device is None:
            raise NotFound(DEVICE_NOT_FOUND)
        if device.tenant_id != initiator.tenant_id:
            raise PermissionDenied()
        if initiator.customer_id is not None and device.customer_id != initiator.customer_id:
            raise PermissionDenied()
        return device

    # --- submit -----------------------------------------------------------------------------------------------------

    def submit(self, initiator: Initiator, device_id: UUID, body: RpcBody, oneway: bool,
               idempotent: bool = False) -> Deferred[RpcResult]:
        """Send one command. Fires with its RpcResult: the answer (lightweight), ``{"rpcId"}`` once stored
        (persistent), or a failure; errbacks with a NanoError for a command that is refused before it is sent.

        ``idempotent``: the caller gave its own ``requestUUID`` for a persistent command, so the same one again is
        answered with the command already held instead of a second command. While the device is in memory and no
        such check is needed, this is plain calls and one Deferred (the hot path of the REST API).
        """
        device = self.devices.cached_device(device_id)
        if device is None or (idempotent and body.persistent):
            return ensureDeferred(self._submit_after_lookup(initiator, device_id, body, oneway, idempotent))
        try:
            self.check_access(initiator, device)
        except NanoError:
            return fail()
        return self._send(device, initiator, body, oneway)

    async def _submit_after_lookup(self, initiator: Initiator, device_id: UUID, body: RpcBody, oneway: bool,
                                   idempotent: bool, retried: bool = False) -> RpcResult:
        device = self.check_access(initiator, await self.devices.get_device(device_id))
        if idempotent and body.persistent:
            known = await self.store.get_rpc(body.request_uuid)
            if known is not None:
                # The same requestUUID again: the command is already held; it is not sent twice.
                if known.device_id != device.id:
                    raise Conflict(f"requestUUID {body.request_uuid} is already used by another command")
                return RpcResult(response={"rpcId": str(known.id)}, has_response=True)
        if retried:
            return await self._send(device, initiator, body, oneway, retry=False)
        return await self._send(device, initiator, body, oneway)

    def _send(self, device: Device, initiator: Initiator, body: RpcBody, oneway: bool,
              retry: bool = True) -> Deferred[RpcResult]:
        interceptor = self.interceptor
        if interceptor is not None and retry and initiator.rule_chain_id is None and initiator.device_id is None:
            taken = interceptor(initiator, device, body, oneway)  # a user's or a bulk RPC's: the root rule chain
            if taken is not None:
                return taken
        command = self._command(device, initiator, body, oneway)
        reply_to, answered = self.replies.expect()
        self.port.tell(device, m.SubmitRpc(command, reply_to))
        if body.persistent and retry:
            # In a cluster the node holding the device may die with the command: once more, idempotently (the
            # command's id is fixed: if that node stored it, the stored one is answered; else it is sent again).
            answered.addErrback(self._once_more, initiator, device.id, body, oneway)
        return answered

    def _command(self, device: Device, initiator: Initiator, body: RpcBody, oneway: bool) -> RpcCommand:
        # Positional, in RpcCommand's field order (checked at import): once per command, keywords cost a third more.
        return RpcCommand(body.request_uuid, device.tenant_id, device.id, body.method, body.params, oneway,
                          body.expiration_time, int(self.clock.seconds() * 1000), body.persistent, body.retries,
                          body.additional_info, body.qos, initiator.user_id, self._origin(initiator),
                          initiator.batch_id)

    def _origin(self, initiator: Initiator) -> Any:
        cached = self._origins.get(id(initiator))
        if cached is not None and cached[0] is initiator:
            return cached[1]
        origin = initiator.to_json()
        if len(self._origins) >= MAX_ORIGINS:
            self._origins.clear()
        self._origins[id(initiator)] = (initiator, origin)
        return origin

    def submit_stored(self, initiator: Initiator, targets: Sequence[tuple[Device, RpcBody]],
                      oneway: bool) -> Deferred[ChunkOutcome]:
        """Persistent commands for many devices (a chunk of a bulk RPC): ONE Deferred, fired with the chunk's
        :class:`ChunkOutcome` once every command is stored (durable) or refused. The devices were authorized by the
        caller.

        Where this node holds every device (no cluster), each command a rule chain does not take goes to its actor
        with the chunk instead of a reply address (``SubmitBatched``): the actor checks its limits and journals the
        insert as for any command, so that for a connected device QUEUED and SENT are one row write (inserted as
        SENT) and the device gets the command only once that row is durable. Elsewhere each is submitted as
        usual and its outcome counted into the chunk.
        """
        chunk = ChunkOutcome(len(targets))
        interceptor = self.interceptor
        if initiator.rule_chain_id is not None or initiator.device_id is not None:
            interceptor = None
        batched = getattr(self.port, "holds_every_device", False)
        tell = self.port.tell
        for device, body in targets:
            taken = None if interceptor is None else interceptor(initiator, device, body, oneway)
            if taken is None:
                if batched:
                    tell(device, m.SubmitBatched(self._command(device, initiator, body, oneway), chunk))
                    continue
                taken = self._send(device, initiator, body, oneway, retry=False)
            taken.addBoth(chunk.outcome, device.id)
        return chunk.done

    def _once_more(self, failure: Any, initiator: Initiator, device_id: UUID, body: RpcBody,
                   oneway: bool) -> Any:
        failure.trap(RouteLost)
        return ensureDeferred(self._submit_after_lookup(initiator, device_id, body, oneway, True, retried=True))

    # --- inspect, list, delete ------------------------------------------------------------------------------------

    async def _stored(self, initiator: Initiator, rpc_id: UUID) -> tuple[RpcRecord, Device]:
        record = await self.store.get_rpc(rpc_id)
        if record is None:
            raise NotFound(f"Rpc with id [{rpc_id}] is not found")
        device = await self.devices.get_device(record.device_id)
        if device is None:
            raise NotFound(f"Rpc with id [{rpc_id}] is not found")
        # Access as for sending: a customer user reaches its own customer's devices only.
        return record, self.check_access(initiator, device)

    def get(self, initiator: Initiator, rpc_id: UUID) -> Deferred[RpcRecord]:
        """A persistent command as stored."""
        async def get() -> RpcRecord:
            record, _ = await self._stored(initiator, rpc_id)
            return record

        return ensureDeferred(get())

    def list(self, initiator: Initiator, device_id: UUID, link: PageLink,
             status: RpcStatus | None = None) -> Deferred[Page[RpcRecord]]:
        """A device's persistent commands, a page at a time (DELETED ones are not kept, so cannot be listed)."""
        async def page() -> Page[RpcRecord]:
            if status is RpcStatus.DELETED:
                raise InvalidArguments("RPCs with status DELETED are not kept: they cannot be listed")
            device = self.check_access(initiator, await self.devices.get_device(device_id))
            return await self.store.list_device_rpcs(device.id, link, status)

        return ensureDeferred(page())

    def delete(self, initiator: Initiator, rpc_id: UUID) -> Deferred[None]:
        """Delete a persistent command: one still pending is taken out of its device's queue first (wherever the
        device is, so that it is not sent after all), then removed from the database before the answer."""
        async def delete() -> None:
            record, device = await self._stored(initiator, rpc_id)
            cancelled = False
            if not record.status.is_terminal:
                reply_to, answered = self.replies.expect()
                self.port.tell(device, m.DeleteRpc(record.id, reply_to))
                cancelled = await answered
            # The actor journals the deletion too (on its own node); deleting here as well makes the answer wait
            # for a durable deletion wherever that actor lives.
            await self.store.delete_rpc(record.id)
            if not cancelled:  # a cancelled command's actor published RPC_DELETED itself
                self.events.publish(RpcStatusChanged(replace(record, status=RpcStatus.DELETED), True))

        return ensureDeferred(delete())
