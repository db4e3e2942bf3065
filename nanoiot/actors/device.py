"""The device actor: one per device, scheduled on the reactor, owning its sessions, RPC queue and timers.

It is a thin shell around ``DeviceRpcQueue`` (the pure state machine): it turns messages into queue events and
applies the effects (write to a session, arm a timer, fire the caller's Deferred, record a status change).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable
from uuid import UUID

from pykka import ActorDeadError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from nanoiot.actors import messages as m
from nanoiot.actors.replies import Replies, ReplyTo
from nanoiot.actors.runtime import Dispatcher, ReactorActor
from nanoiot.actors.wakeups import Wakeups, wakeups_of
from nanoiot.commands.events import DeviceCalled, DeviceOffline, DeviceOnline, EventStream, RpcStatusChanged
from nanoiot.commands.server_methods import CallContext, ServerMethods
from nanoiot.errors import ServiceUnavailable
from nanoiot.jsontext import compact
from nanoiot.persistence.records import Device, RpcRecord
from nanoiot.rpc.model import NonJsonResponse, RpcCommand, RpcFailure, RpcResult, RpcStatus
from nanoiot.rpc.queue import (
    CancelTimer,
    DeviceRpcQueue,
    Effect,
    Finished,
    PendingRpc,
    QueueSettings,
    Send,
    StartTimer,
    StatusChanged,
    Timer,
)
from nanoiot.rpc.payload import loads as payload_json
from nanoiot.port.session import Delivery, DeviceSession

if TYPE_CHECKING:
    from nanoiot.actors.directory import DeviceDirectory
    from nanoiot.persistence.journal import RpcJournal

log = Logger(namespace="nanoiot.device")


def parse_device_payload(payload: bytes) -> Any:
    try:
        return payload_json(payload)
    except (ValueError, RecursionError):  # a deeply nested payload must not kill the actor
        return NonJsonResponse(payload.decode("utf-8", "replace"))


@dataclass(slots=True)
class ActorSettings:
    queue: QueueSettings
    qos: int = 1
    max_pending: int = 1000
    max_persistent_per_device: int = 1000
    max_persistent_per_tenant: int = 1_000_000
    idle_timeout: float = 60.0
    session_limits: dict[str, Any] | None = None


class RequestIds:
    """Server-wide request ids: unique across devices and restarts (they continue above the highest stored
    ``seq``), so a device can de-duplicate on them and a late answer never matches another command."""

    __slots__ = ("next_id",)

    def __init__(self, start: int = 1) -> None:
        self.next_id = start

    def take(self) -> int:
        value = self.next_id
        self.next_id += 1
        return value


class TenantCounts:
    """Active persistent commands per tenant, for the per-tenant limit (kept in memory, loaded at start)."""

    def __init__(self) -> None:
        self.active: dict[UUID, int] = {}

    def add(self, tenant_id: UUID, n: int = 1) -> None:
        self.active[tenant_id] = self.active.get(tenant_id, 0) + n

    def release(self, tenant_id: UUID) -> None:
        left = self.active.get(tenant_id, 0) - 1
        if left > 0:
            self.active[tenant_id] = left
        else:
            self.active.pop(tenant_id, None)


def tell_quietly(ref: Any, message: Any) -> bool:
    """Tell an actor from a timer or a callback that may outlive it (passivation, shutdown): a message to a
    stopped actor is dropped, not an error. Returns whether it was delivered."""
    try:
        ref.tell(message)
        return True
    except ActorDeadError:
        log.debug("message for a stopped device actor dropped: {kind}", kind=type(message).__name__)
        return False


@dataclass(slots=True)
class ActorContext:
    """What every device actor shares: one reference per actor instead of one per service."""

    directory: DeviceDirectory
    clock: IReactorTime
    settings: ActorSettings
    server_methods: ServerMethods
    dispatcher: Dispatcher | None = None
    events: EventStream | None = None
    journal: RpcJournal | None = None
    replies: Replies = field(default_factory=Replies)
    ids: RequestIds = field(default_factory=RequestIds)
    tenant_counts: TenantCounts = field(default_factory=TenantCounts)
    #: Lets server methods command other devices (``CallContext.send_rpc``; see ``RpcSender``); set by the service.
    send_rpc: Callable[..., Deferred] | None = None
    #: This node's name (events say where a device is); "" on a single node.
    node: str = ""
    #: Set by the rule service: takes a device-to-server call of a method no server method answers, to run it through
    #: the tenant's root rule chain: (device, transport, session id, request id, payload) -> whether it took it.
    device_calls: Callable[[Device, str, int, int, bytes], bool] | None = None
    #: Every actor's timer wake-ups on one reactor call (``nanoiot.actors.wakeups``), made on first use.
    wakeups: Wakeups | None = None


class DeviceActor(ReactorActor):
    def __init__(self, device: Device, context: ActorContext) -> None:
        super().__init__(dispatcher=context.dispatcher)
        self.device = device
        self.ctx = context
        self.queue = DeviceRpcQueue(context.settings.queue)
        self.sessions: dict[int, DeviceSession] = {}
        #: rpc id -> callers waiting for the outcome (lightweight) or for the durable insert (persistent).
        self.waiters: dict[Any, list[ReplyTo]] = {}
        #: (kind, request id) -> (due at, epoch ms; arming sequence). One wake-up, at ``_wake_at`` on the shared
        #: wheel ``_wake`` (None: none), is set for the earliest (or an earlier) one: a command's expiry and ack
        #: timers cost dict entries, not a callLater and a cancel each (twisted's DelayedCall heap was ~5 % of a
        #: REST RPC's CPU).
        self.timers: dict[tuple[Timer, int], tuple[int, int]] = {}
        self._wake: Wakeups | None = None
        self._wake_at = 0
        self._wake_generation = 0
        self.passivated = False
        self._idle_call: IDelayedCall | None = None
        self._idle_generation = 0
        self._timer_generation = 0
        #: The persistent command being submitted: its first status change is an insert, not an update.
        self._inserting: Any = None
        #: request id -> the Deferred of its durable SENT status, which the write to the device waits for.
        self._sent_durable: dict[int, Deferred] = {}
        self.persistent_pending = 0
        self._inserts_pending: set[Any] = set()
        #: rpc id -> the bulk chunk (``SubmitBatched``) told once the command's insert is durable or failed.
        self._chunks: dict[Any, Any] = {}
        #: (rpc id, the insert's Deferred) of a new command inserted as SENT, until its SENT change takes it.
        self._sent_in_insert: tuple[Any, Deferred] | None = None

    # --- plumbing -------------------------------------------------------------------------------------------------

    @property
    def clock(self) -> IReactorTime:
        return self.ctx.clock

    @property
    def directory(self) -> DeviceDirectory:
        return self.ctx.directory

    @property
    def settings(self) -> ActorSettings:
        return self.ctx.settings

    def now(self) -> int:
        return int(self.ctx.clock.seconds() * 1000)

    def on_start(self) -> None:
        # An actor is started for a message (a session to attach, a command), which arms or cancels the idle
        # timer right after; arming one here too was a callLater and a cancel per new actor.
        if self.actor_inbox.empty():
            self._schedule_idle_check()

    def on_stop(self) -> None:
        self._clear_timers()
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()

    def on_receive(self, message: Any) -> Any:
        if self.passivated:
            # A message that raced with passivation goes to the device's next actor, in order.
            self.directory.redeliver(self.device, message)
            return None
        handler = _HANDLERS.get(type(message))
        if handler is None:
            log.warn("device {device_id} ignored unknown message {kind}", device_id=self.device.id,
                     kind=type(message).__name__)
            return None
        result = handler(self, message)
        self._schedule_idle_check()
        return result

    # --- handlers -------------------------------------------------------------------------------------------------

    def _submit(self, msg: m.SubmitRpc) -> None:
        command = msg.command
        reply_to = msg.reply_to
        if self.queue.find(command.rpc_id) is not None:
            # The same requestUUID again: join the pending call (or its insert), never send it twice.
            if command.persistent and command.rpc_id not in self._inserts_pending:
                self._reply(reply_to, _persisted(command.rpc_id))
            elif reply_to is not None:
                self.waiters.setdefault(command.rpc_id, []).append(reply_to)
            return
        refusal = self._refusal(command)
        if refusal is not None:
            self._reply(reply_to, refusal)
            return
        if reply_to is not None:
            self.waiters.setdefault(command.rpc_id, []).append(reply_to)
        self._inserting = command.rpc_id if command.persistent else None
        try:
            self._apply(self.queue.submit(command, self.now(), self.ctx.ids.take()))
        finally:
            self._inserting = None

    def _submit_batched(self, msg: m.SubmitBatched) -> None:
        """A bulk RPC's persistent command: as ``_submit`` (the limits, the insert journalled, for a connected device
        QUEUED and SENT in one row write), but its chunk learns the outcome instead of a caller per command."""
        command, chunk = msg.command, msg.chunk
        refusal = self._refusal(command)
        if refusal is None and self.queue.find(command.rpc_id) is not None:
            refusal = _rejected("duplicate-rpc-id", 1)  # ids are fresh: never reached, never sent twice all the same
        if refusal is not None:
            chunk.refuse(self.device.id, refusal)
            return
        self._chunks[command.rpc_id] = chunk
        self._inserting = command.rpc_id
        try:
            self._apply(self.queue.submit(command, self.now(), self.ctx.ids.take()))
        finally:
            self._inserting = None

    def _refusal(self, command: RpcCommand) -> RpcResult | None:
        """A limit the command would break, as a REJECTED result naming it (the REST layer answers 429)."""
        settings = self.settings
        if len(self.queue) >= settings.max_pending:
            return _rejected("rpc-max-pending", settings.max_pending)
        if command.persistent:
            if self.persistent_pending >= settings.max_persistent_per_device:
                return _rejected("rpc-max-persistent-per-device", settings.max_persistent_per_device)
            if self.ctx.tenant_counts.active.get(command.tenant_id, 0) >= settings.max_persistent_per_tenant:
                return _rejected("rpc-max-persistent-per-tenant", settings.max_persistent_per_tenant)
        return None

    def _restore(self, msg: m.RestoreRpcs) -> None:
        now = self.now()
        for command, status, request_id, attempts in msg.entries:
            if self.queue.find(command.rpc_id) is None:
                # Counted first: if it expired meanwhile, its EXPIRED releases the count again.
                self.persistent_pending += 1
                self.ctx.tenant_counts.add(command.tenant_id)
                self._apply(self.queue.restore(command, status, now, request_id, attempts))

    def _send_now(self, msg: m.SendNow) -> None:
        self._write_stored(msg.session_id, msg.request_id)

    def _sent_stored(self, _: Any, session_id: int, request_id: int) -> None:
        """The journal's callback once a persistent command's SENT is durable: the command is written here and now
        (on the reactor thread, between two actor turns), not through a ``SendNow`` message, which cost as much
        as handling the command's PUBACK."""
        if self.passivated or self.actor_stopped.is_set():
            return  # the device's next actor loads the command from the database
        try:
            self._write_stored(session_id, request_id)
        except Exception:  # the journal's other callers must still be answered
            log.failure("device {device_id}: writing stored command {request_id} failed", device_id=self.device.id,
                        request_id=request_id)
        self._schedule_idle_check()

    def _sent_not_stored(self, failure: Any) -> None:
        log.failure("device {device_id}: SENT not stored", failure, device_id=self.device.id)

    def _write_stored(self, session_id: int, request_id: int) -> None:
        pending = self.queue.pending.get(request_id)
        if pending is None or pending.in_flight_on != session_id or pending.delivered:
            return  # acknowledged, answered, deleted or moved to another session meanwhile
        # The wait for an acknowledgement starts now that the command is written, not when it was scheduled: a
        # long journal backlog must not turn into ack timeouts and retries of commands never sent.
        now = self.now()
        ack_at = min(now + self.settings.queue.ack_timeout_ms, pending.command.expiration_time)
        self._start_timer(StartTimer(Timer.ACK, request_id, ack_at))
        if self._send(Send(session_id, pending)):
            self._apply(self.queue.acked(request_id, now))

    def _delete(self, msg: m.DeleteRpc) -> None:
        effects = self.queue.delete(msg.rpc_id, self.now())
        self._apply(effects)
        self._reply(msg.reply_to, bool(effects))

    def _attach(self, msg: m.AttachSession) -> None:
        session = msg.session
        was_online = bool(self.sessions)
        if msg.exclusive:
            for other in [s for s in self.sessions.values() if s.transport == session.transport]:
                log.info("device {device_id}: {transport} session {old} replaced by {new}",
                         device_id=self.device.id, transport=session.transport, old=other.session_id,
                         new=session.session_id)
                self._detach_session(other.session_id, announce=False)
                other.close("replaced by a newer session of the same device")
        self.sessions[session.session_id] = session
        if not was_online:
            self._publish_presence(DeviceOnline, session.transport)

    def _detach(self, msg: m.DetachSession) -> None:
        self._detach_session(msg.session_id)

    def _detach_session(self, session_id: int, announce: bool = True) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            self._apply(self.queue.session_closed(session_id, self.now()))
            if announce and not self.sessions:
                self._publish_presence(DeviceOffline, session.transport)

    def _publish_presence(self, kind: type, transport: str) -> None:
        events = self.ctx.events
        if events is not None and events.wants(kind):
            device = self.device
            events.publish(kind(device.id, device.tenant_id, device.customer_id, transport, self.ctx.node))

    def _subscribe(self, msg: m.SubscribeCommands) -> None:
        if msg.session_id in self.sessions:
            self._apply(self.queue.session_subscribed(msg.session_id, msg.one_shot, self.now()))

    def _unsubscribe(self, msg: m.UnsubscribeCommands) -> None:
        self.queue.subscriptions.pop(msg.session_id, None)

    def _acked(self, msg: m.CommandAcked) -> None:
        self._apply(self.queue.acked(msg.request_id, self.now()))

    def _answered(self, msg: m.CommandAnswered) -> None:
        try:
            if msg.request_id in self.queue.pending:  # else stale or forged: dropped without parsing it (a flood)
                self._apply(self.queue.answered(msg.request_id, parse_device_payload(msg.payload), self.now()))
        finally:
            if msg.done is not None:
                msg.done()  # the session acknowledges the device's message now (bounded inbound path)

    def _device_call(self, msg: m.DeviceCall) -> None:
        try:
            self._handle_device_call(msg)
        finally:
            if msg.done is not None:
                msg.done()

    def _handle_device_call(self, msg: m.DeviceCall) -> None:
        session = self.sessions.get(msg.session_id)
        if session is None:
            return
        events = self.ctx.events
        method = _call_method(msg.payload)
        if events is not None and events.wants(DeviceCalled):
            device = self.device
            events.publish(DeviceCalled(device.id, device.tenant_id, device.customer_id, session.transport,
                                        method, self.ctx.node))
        rules = self.ctx.device_calls
        if (rules is not None and method is not None and method not in self.ctx.server_methods
                and rules(self.device, session.transport, msg.session_id, msg.request_id, msg.payload)):
            return  # a rule chain answers it (ReplyToDevice), or the rule service does when none did
        context = CallContext(self.device, session.transport, self.clock, self.settings.session_limits or {},
                              self.ctx.send_rpc)
        d = self.ctx.server_methods.call(context, msg.payload)

        def reply(value: Any) -> None:
            # The session may have closed while the method ran: then nobody is there to answer.
            target = self.sessions.get(msg.session_id)
            if target is not None:
                target.send_reply(msg.request_id, compact(value))

        d.addCallback(reply)
        d.addErrback(lambda f: log.failure("device call failed", f))

    def _reply_to_device(self, msg: m.ReplyToDevice) -> None:
        target = self.sessions.get(msg.session_id)
        if target is not None:  # else the session closed meanwhile: nobody is there to answer
            target.send_reply(msg.request_id, msg.body)

    def _timers_due(self, msg: m.TimersDue) -> None:
        if msg.generation != self._wake_generation:
            return  # re-armed or cancelled after this one fired
        self._wake = None
        now = self.now()
        timers = self.timers
        # The timers due now, in the order they would have fired one by one; those armed meanwhile wait for their
        # own wake-up, as a timer armed from a timer's handler used to.
        due = sorted((armed, key) for key, armed in timers.items() if armed[0] <= now)
        for armed, key in due:
            if timers.get(key) == armed:  # else cancelled or re-armed by an earlier one's effects
                del timers[key]
                self._fire(key[0], key[1])
        if timers:
            earliest = min(at for at, _ in timers.values())
            if self._wake is None or earliest < self._wake_at:
                self._arm_wake(earliest)
        elif self._wake is not None:
            self._cancel_wake()

    def _timer_fired(self, msg: m.TimerFired) -> None:
        """One timer by its arming sequence (``generation``): what ``_timers_due`` does for each due timer."""
        key = (msg.kind, msg.request_id)
        armed = self.timers.get(key)
        if armed is None or armed[1] != msg.generation:
            return  # cancelled or re-armed after this firing was queued
        del self.timers[key]
        self._fire(msg.kind, msg.request_id)

    def _fire(self, kind: Timer, request_id: int) -> None:
        now = self.now()
        if kind is Timer.EXPIRY:
            self._apply(self.queue.expired(request_id, now))
        elif kind is Timer.ACK:
            self._apply(self.queue.ack_timed_out(request_id, now))
        else:
            self._apply(self.queue.response_timed_out(request_id, now))

    def _removed(self, msg: m.DeviceRemoved) -> None:
        self._close_sessions("device deleted")
        now = self.now()
        for pending in list(self.queue.pending.values()):
            self._apply(self.queue.delete(pending.command.rpc_id, now))
        self._retire()

    def _close_sessions(self, reason: str) -> None:
        sessions = list(self.sessions.values())
        self.sessions.clear()
        for session in sessions:
            session.close(reason)
        if sessions:
            self._publish_presence(DeviceOffline, sessions[-1].transport)

    def _released(self, msg: m.Released) -> None:
        """Another node holds the device now: nothing is delivered from here any more. Lightweight commands still
        waiting go to the device's new actor with their callers' addresses (it answers them directly); persistent
        ones are forgotten without a status change, since the new actor loads them from the database."""
        log.info("device {device_id} taken over by node {node}", device_id=self.device.id, node=msg.new_node)
        self._close_sessions(f"taken over by node {msg.new_node}")
        forward: list[m.SubmitRpc] = []
        for pending in list(self.queue.pending.values()):
            command = pending.command
            if command.persistent:
                self.persistent_pending -= 1
                self.ctx.tenant_counts.release(command.tenant_id)
                if command.rpc_id not in self._inserts_pending:  # else answered once durable (_answer_persistent)
                    self.waiters.pop(command.rpc_id, None)
            else:
                for reply_to in self.waiters.pop(command.rpc_id, ()):
                    forward.append(m.SubmitRpc(command, reply_to))
        self._clear_timers()
        self.queue = DeviceRpcQueue(self.settings.queue)
        self._sent_durable.clear()
        self._reply(msg.reply_to, True)
        self._retire()
        for message in forward:
            self.directory.tell(self.device, message)

    def _passivate(self, msg: m.Passivate) -> None:
        if msg.generation != self._idle_generation or not self._is_idle():
            return
        self._retire()

    def _retire(self) -> None:
        """Leave the directory and hand the mail still queued here to the device's next actor, in order, in
        this same step: nothing sent before can be overtaken by what is sent after, and nothing is lost."""
        self.directory.forget(self.device, self.actor_ref)
        self.passivated = True
        inbox = self.actor_inbox
        while not inbox.empty():
            envelope = inbox.get()
            if envelope.reply_to is None:
                self.directory.redeliver(self.device, envelope.message)
            else:
                envelope.reply_to.set_exception(exc_info=(ActorDeadError, ActorDeadError(
                    f"device actor {self.device.id} passivated"), None))
        self.stop()
        self.directory.retired(self.device)

    def _inspect(self, msg: m.Inspect) -> None:
        self._reply(msg.reply_to, {
            "sessions": sorted(self.sessions),
            "subscriptions": list(self.queue.subscriptions),
            "pending": [(p.request_id, p.status.value) for p in self.queue.pending.values()],
            "timers": sorted((k.value, rid) for k, rid in self.timers),
            "persistent_pending": self.persistent_pending,
        })

    def _reply(self, reply_to: ReplyTo | None, value: Any) -> None:
        if reply_to is not None:
            self.ctx.replies.answer(reply_to, value)

    # --- effects --------------------------------------------------------------------------------------------------

    def _apply(self, effects: list[Effect]) -> None:
        delivered_on_write: list[int] | None = None  # made only when needed: QoS 0 writes, rare
        for effect in effects:
            # By exact type, the most frequent first (effects are final classes): ~10 effects per command.
            kind = type(effect)
            if kind is StatusChanged:
                self._status_changed(effect)
            elif kind is StartTimer:
                if effect.kind is Timer.ACK and self._sent_durable and effect.request_id in self._sent_durable:
                    continue  # armed when the command is actually written (see _send_now)
                self._start_timer(effect)
            elif kind is CancelTimer:
                timers = self.timers
                if timers.pop((effect.kind, effect.request_id), None) is not None and not timers:
                    self._cancel_wake()  # else it may fire early: it finds nothing due and re-arms
            elif kind is Send:
                durable = self._sent_durable.pop(effect.pending.request_id, None) if self._sent_durable else None
                if durable is not None:
                    # Write-ahead: the device gets a persistent command only once SENT is stored, so after a
                    # crash every command that may have reached a device is known to have been sent.
                    durable.addCallbacks(self._sent_stored, self._sent_not_stored,
                                         callbackArgs=(effect.session_id, effect.pending.request_id))
                elif self._send(effect):
                    if delivered_on_write is None:
                        delivered_on_write = []
                    delivered_on_write.append(effect.pending.request_id)
            elif kind is Finished:
                self._finished(effect)
        if delivered_on_write is not None:
            for request_id in delivered_on_write:
                self._apply(self.queue.acked(request_id, self.now()))

    def _finished(self, effect: Finished) -> None:
        if self._inserts_pending and effect.rpc_id in self._inserts_pending:
            return  # a persistent caller is answered when its insert is durable, not when the command ends
        replies = self.ctx.replies
        for reply_to in self.waiters.pop(effect.rpc_id, ()):
            replies.answer(reply_to, effect.result)  # a caller that went away is skipped there

    def _status_changed(self, effect: StatusChanged) -> None:
        pending, status = effect.pending, effect.status
        command = pending.command
        if command.persistent:
            self._journal(pending, status, effect.response)
        events = self.ctx.events
        if events is not None and events.wants(RpcStatusChanged):
            # Counted by the metrics' tally as plain values; an event (and its record) only for a listener.
            events.status_changed(status, command.created_time, command.persistent,
                                  _record, command, pending.request_id, status, effect.response)

    def _journal(self, pending: PendingRpc, status: RpcStatus, response: Any) -> None:
        command = pending.command
        journal = self.ctx.journal
        inserting = self._inserting
        # UUID.__eq__ is pure Python: the same object (the usual case) or no insert under way answers without it.
        first = inserting is not None and (command.rpc_id is inserting or command.rpc_id == inserting)
        if first:
            self._inserting = None  # only the first status change of a new command is its insert
            if status is RpcStatus.QUEUED:
                self.persistent_pending += 1
                self.ctx.tenant_counts.add(command.tenant_id)
            else:
                log.debug("device {device_id}: persistent RPC {rpc_id} stored as {status}",
                          device_id=self.device.id, rpc_id=command.rpc_id, status=status.value)
            if journal is None:
                self._answer_persistent(command.rpc_id, None)
                return
            self._inserts_pending.add(command.rpc_id)
            if status is RpcStatus.QUEUED and pending.status is RpcStatus.SENT:
                # Sent as it is submitted (a connected device): the row is inserted as SENT, one write for both,
                # and the SENT change that follows waits for this insert instead of writing again.
                d = journal.insert(_record(command, pending.request_id, RpcStatus.SENT, response))
                self._sent_in_insert = (command.rpc_id, d)
            else:
                d = journal.insert(_record(command, pending.request_id, status, response))
            # Both return None: after a failed insert the write waiting behind it finds the command gone.
            d.addCallbacks(self._inserted, self._insert_failed, callbackArgs=(command.rpc_id,),
                           errbackArgs=(command.rpc_id,))
            return
        if status.is_terminal:
            self.persistent_pending -= 1
            self.ctx.tenant_counts.release(command.tenant_id)
        if journal is None:
            return
        if status is RpcStatus.DELETED:
            journal.delete(command.rpc_id)
        elif status is RpcStatus.DELIVERED and command.oneway and self.queue.pending.get(pending.request_id) is None:
            pass  # a one-way command acknowledged: its SUCCESSFUL follows in this same step, one journal entry for both
        elif status is RpcStatus.SENT:
            sent = self._sent_in_insert
            if sent is not None and (sent[0] is command.rpc_id or sent[0] == command.rpc_id):
                self._sent_in_insert = None
                self._sent_durable[pending.request_id] = sent[1]  # the insert says SENT: written once it is durable
            else:
                self._sent_durable[pending.request_id] = journal.change(command.rpc_id, status)
        elif status in (RpcStatus.SUCCESSFUL, RpcStatus.FAILED) and response is not None:
            journal.note(command.rpc_id, status, _storable(response))
        elif status is RpcStatus.TIMEOUT:
            # A retry was spent: stored with it, so that a restart does not hand the command a fresh budget.
            journal.note(command.rpc_id, status, attempts=pending.attempts)
        else:
            journal.note(command.rpc_id, status)

    def _inserted(self, _: Any, rpc_id: Any) -> None:
        self._answer_persistent(rpc_id, None)

    def _insert_failed(self, failure: Any, rpc_id: Any) -> None:
        self._answer_persistent(rpc_id, failure)

    def _answer_persistent(self, rpc_id: Any, failure: Any) -> None:
        """Runs when the insert is durable (or failed): only now may the caller learn the rpcId."""
        self._inserts_pending.discard(rpc_id)
        waiters = self.waiters.pop(rpc_id, ())
        if failure is not None:
            if failure.check(ServiceUnavailable):
                # The database is out of reach: the caller gets 503 (the repository already logged the outage).
                log.debug("device {device_id}: persistent RPC {rpc_id} refused: {error}", device_id=self.device.id,
                          rpc_id=rpc_id, error=failure.getErrorMessage())
            else:
                log.failure("device {device_id}: persistent RPC {rpc_id} could not be stored", failure,
                            device_id=self.device.id, rpc_id=rpc_id)
            self._apply(self.queue.delete(rpc_id, self.now()))
        chunk = self._chunks.pop(rpc_id, None) if self._chunks else None
        if chunk is not None:
            if failure is None:
                chunk.stored()
            else:
                chunk.refuse(self.device.id, failure)
        replies = self.ctx.replies
        for reply_to in waiters:
            if failure is None:
                replies.answer(reply_to, _persisted(rpc_id))
            else:
                replies.fail(reply_to, failure.value)
        if not self.passivated:
            self._schedule_idle_check()

    def _send(self, effect: Send) -> bool:
        session = self.sessions.get(effect.session_id)
        command = effect.pending.command
        qos = self.settings.qos if command.qos is None else command.qos
        if session is None:
            outcome = Delivery.NOT_SENT
        else:
            outcome = session.send_command(effect.pending.request_id, command.method, command.params, qos)
        if outcome is Delivery.NOT_SENT:
            # Nothing was written (window full, socket congested): the ack timer resends it without
            # counting a retry.
            self.queue.not_sent(effect.pending.request_id)
        return outcome is Delivery.DELIVERED

    def _start_timer(self, effect: StartTimer) -> None:
        self._timer_generation += 1
        at = effect.at
        self.timers[(effect.kind, effect.request_id)] = (at, self._timer_generation)  # a re-arm replaces
        if self._wake is None or at < self._wake_at:
            self._arm_wake(at)

    def _arm_wake(self, at: int) -> None:
        wheel = self._wake
        if wheel is not None:
            wheel.remove(self, self._wake_at)
        else:
            wheel = self._wake = wakeups_of(self.ctx)
        self._wake_generation += 1
        self._wake_at = at
        wheel.add(self, at)

    def wake_up(self) -> None:
        """The wheel's call for ``_wake_at`` (on the reactor, outside this actor's turn): the timers are looked at
        in the actor's turn, unless the wake-up was moved or cancelled before then (its generation)."""
        tell_quietly(self.actor_ref, m.TimersDue(self._wake_generation))

    def _cancel_wake(self) -> None:
        wheel = self._wake
        if wheel is not None:
            wheel.remove(self, self._wake_at)
            self._wake = None
            self._wake_generation += 1  # a wake-up already queued is ignored

    def _clear_timers(self) -> None:
        self.timers.clear()
        self._cancel_wake()

    # --- passivation ----------------------------------------------------------------------------------------------

    def _is_idle(self) -> bool:
        return not self.sessions and not self.queue.pending and not self.waiters and not self._sent_durable \
            and not self._inserts_pending

    def _schedule_idle_check(self) -> None:
        if not self._is_idle():
            if self._idle_call is not None and self._idle_call.active():
                self._idle_call.cancel()
            self._idle_call = None
            return
        if self._idle_call is not None and self._idle_call.active():
            return
        self._idle_generation += 1
        self._idle_call = self.clock.callLater(self.settings.idle_timeout, tell_quietly, self.actor_ref,
                                               m.Passivate(self._idle_generation))


def _call_method(payload: bytes) -> str | None:
    try:
        method = payload_json(payload).get("method")
    except (ValueError, AttributeError, RecursionError):
        return None
    return method if isinstance(method, str) else None


def _persisted(rpc_id: Any) -> RpcResult:
    return RpcResult(response={"rpcId": str(rpc_id)}, has_response=True)


def _rejected(limit: str, value: int) -> RpcResult:
    return RpcResult(failure=RpcFailure.REJECTED, response={"limit": limit, "value": value})


def _storable(response: Any) -> Any:
    """What the ``response`` column keeps: the answer's JSON, or ``{"error": text}`` for a non-JSON answer."""
    if isinstance(response, NonJsonResponse):
        return {"error": str(response)}
    return response


def command_record(command: RpcCommand, request_id: int, status: RpcStatus, response: Any) -> RpcRecord:
    """The command as a stored record (also what status events carry)."""
    return _record(command, request_id, status, response)


#: ``_record`` passes RpcRecord's fields by position: this fails at import, not in a record, if they change.
assert [f.name for f in fields(RpcRecord)] == [
    "id", "created_time", "tenant_id", "device_id", "expiration_time", "oneway", "method", "params", "status",
    "response", "additional_info", "retries", "user_id", "seq", "attempts", "initiator", "batch_id"]


def _record(command: RpcCommand, request_id: int, status: RpcStatus, response: Any) -> RpcRecord:
    # Built for every status change some listener wants (four per two-way command): positional arguments, in
    # RpcRecord's field order, cost a third less than keywords.
    if isinstance(response, NonJsonResponse):
        response = {"error": str(response)}
    return RpcRecord(command.rpc_id, command.created_time, command.tenant_id, command.device_id,
                     command.expiration_time, command.oneway, command.method, command.params, status, response,
                     command.additional_info, command.retries, command.user_id, request_id, 0, command.initiator,
                     command.batch_id)




_HANDLERS: dict[type, Callable[[DeviceActor, Any], Any]] = {
    m.SubmitRpc: DeviceActor._submit,
    m.SubmitBatched: DeviceActor._submit_batched,
    m.DeleteRpc: DeviceActor._delete,
    m.AttachSession: DeviceActor._attach,
    m.DetachSession: DeviceActor._detach,
    m.SubscribeCommands: DeviceActor._subscribe,
    m.UnsubscribeCommands: DeviceActor._unsubscribe,
    m.CommandAcked: DeviceActor._acked,
    m.CommandAnswered: DeviceActor._answered,
    m.DeviceCall: DeviceActor._device_call,
    m.ReplyToDevice: DeviceActor._reply_to_device,
    m.TimerFired: DeviceActor._timer_fired,
    m.TimersDue: DeviceActor._timers_due,
    m.DeviceRemoved: DeviceActor._removed,
    m.Passivate: DeviceActor._passivate,
    m.Inspect: DeviceActor._inspect,
    m.Released: DeviceActor._released,
    m.RestoreRpcs: DeviceActor._restore,
    m.SendNow: DeviceActor._send_now,
}
