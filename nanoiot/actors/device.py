"""The device actor: one per device, scheduled on the reactor, owning its sessions, RPC queue and timers.

It is a thin shell around ``DeviceRpcQueue`` (the pure state machine): it turns messages into queue events and
applies the effects (write to a session, arm a timer, fire the caller's Deferred, record a status change).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from nanoiot.actors import messages as m
from nanoiot.actors.runtime import ReactorActor
from nanoiot.persistence.records import Device
from nanoiot.rpc.model import RpcFailure, RpcResult, RpcStatus
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
from nanoiot.rpc.server_methods import CallContext, ServerMethods
from nanoiot.transports.session import Delivery, DeviceSession

if TYPE_CHECKING:
    from nanoiot.actors.directory import DeviceDirectory

log = Logger(namespace="nanoiot.device")


class NonJsonResponse(str):
    """A device answer that is not JSON: REST answers 406, persistence stores ``{"error": text}``."""


def parse_device_payload(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return NonJsonResponse(payload.decode("utf-8", "replace"))


#: Called with (pending, status, response) for every status change; persistence and events subscribe here.
StatusListener = Callable[[Device, PendingRpc, RpcStatus, Any], None]


@dataclass(slots=True)
class ActorSettings:
    queue: QueueSettings
    qos: int = 1
    max_pending: int = 1000
    idle_timeout: float = 60.0
    session_limits: dict[str, Any] | None = None


class DeviceActor(ReactorActor):
    def __init__(
        self,
        device: Device,
        directory: DeviceDirectory,
        clock: IReactorTime,
        settings: ActorSettings,
        server_methods: ServerMethods,
        status_listener: StatusListener | None = None,
    ) -> None:
        super().__init__()
        self.device = device
        self.directory = directory
        self.clock = clock
        self.settings = settings
        self.server_methods = server_methods
        self.status_listener = status_listener
        self.queue = DeviceRpcQueue(settings.queue)
        self.sessions: dict[int, DeviceSession] = {}
        self.waiters: dict[Any, list[Deferred]] = {}
        self.timers: dict[tuple[Timer, int], IDelayedCall] = {}
        self.passivated = False
        self._idle_call: IDelayedCall | None = None
        self._idle_generation = 0

    # --- plumbing -------------------------------------------------------------------------------------------------

    def now(self) -> int:
        return int(self.clock.seconds() * 1000)

    def on_start(self) -> None:
        self._schedule_idle_check()

    def on_stop(self) -> None:
        for call in self.timers.values():
            if call.active():
                call.cancel()
        self.timers.clear()
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()

    def on_receive(self, message: Any) -> Any:
        if self.passivated:
            # A message that raced with passivation goes to the device's next actor, in order.
            self.directory.tell(self.device, message)
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
        existing = self.queue.find(command.rpc_id)
        if existing is not None:
            # The same requestUUID again: join the pending call, never send it twice.
            self.waiters.setdefault(command.rpc_id, []).append(msg.reply)
            return
        if len(self.queue) >= self.settings.max_pending:
            msg.reply.callback(RpcResult(failure=RpcFailure.REJECTED, response={
                "limit": "rpc-max-pending", "value": self.settings.max_pending}))
            return
        self.waiters.setdefault(command.rpc_id, []).append(msg.reply)
        self._apply(self.queue.submit(command, self.now()))

    def _delete(self, msg: m.DeleteRpc) -> None:
        effects = self.queue.delete(msg.rpc_id, self.now())
        self._apply(effects)
        msg.reply.callback(bool(effects))

    def _attach(self, msg: m.AttachSession) -> None:
        session = msg.session
        if msg.exclusive:
            for other in [s for s in self.sessions.values() if s.transport == session.transport]:
                log.info("device {device_id}: {transport} session {old} replaced by {new}",
                         device_id=self.device.id, transport=session.transport, old=other.session_id,
                         new=session.session_id)
                self._detach_session(other.session_id)
                other.close("replaced by a newer session of the same device")
        self.sessions[session.session_id] = session

    def _detach(self, msg: m.DetachSession) -> None:
        self._detach_session(msg.session_id)

    def _detach_session(self, session_id: int) -> None:
        if self.sessions.pop(session_id, None) is not None:
            self._apply(self.queue.session_closed(session_id, self.now()))

    def _subscribe(self, msg: m.SubscribeCommands) -> None:
        if msg.session_id in self.sessions:
            self._apply(self.queue.session_subscribed(msg.session_id, msg.one_shot, self.now()))

    def _unsubscribe(self, msg: m.UnsubscribeCommands) -> None:
        self.queue.subscriptions.pop(msg.session_id, None)

    def _acked(self, msg: m.CommandAcked) -> None:
        self._apply(self.queue.acked(msg.request_id, self.now()))

    def _answered(self, msg: m.CommandAnswered) -> None:
        self._apply(self.queue.answered(msg.request_id, parse_device_payload(msg.payload), self.now()))

    def _device_call(self, msg: m.DeviceCall) -> None:
        session = self.sessions.get(msg.session_id)
        if session is None:
            return
        context = CallContext(self.device, session.transport, self.clock, self.settings.session_limits or {})
        d = self.server_methods.call(context, msg.payload)

        def reply(value: Any) -> None:
            # The session may have closed while the method ran: then nobody is there to answer.
            target = self.sessions.get(msg.session_id)
            if target is not None:
                target.send_reply(msg.request_id, json.dumps(value, separators=(",", ":")).encode())

        d.addCallback(reply)
        d.addErrback(lambda f: log.failure("device call failed", f))

    def _timer_fired(self, msg: m.TimerFired) -> None:
        self.timers.pop((msg.kind, msg.request_id), None)
        now = self.now()
        if msg.kind is Timer.EXPIRY:
            self._apply(self.queue.expired(msg.request_id, now))
        elif msg.kind is Timer.ACK:
            self._apply(self.queue.ack_timed_out(msg.request_id, now))
        else:
            self._apply(self.queue.response_timed_out(msg.request_id, now))

    def _removed(self, msg: m.DeviceRemoved) -> None:
        for session in list(self.sessions.values()):
            session.close("device deleted")
        self.sessions.clear()
        now = self.now()
        for pending in list(self.queue.pending.values()):
            self._apply(self.queue.delete(pending.command.rpc_id, now))
        self.directory.forget(self.device.id, self.actor_ref)
        self.passivated = True
        self.stop()

    def _passivate(self, msg: m.Passivate) -> None:
        if msg.generation != self._idle_generation or not self._is_idle():
            return
        self.directory.forget(self.device.id, self.actor_ref)
        self.passivated = True
        self.stop()

    def _inspect(self, msg: m.Inspect) -> None:
        msg.reply.callback({
            "sessions": sorted(self.sessions),
            "subscriptions": list(self.queue.subscriptions),
            "pending": [(p.request_id, p.status.value) for p in self.queue.pending.values()],
            "timers": sorted((k.value, rid) for k, rid in self.timers),
        })

    # --- effects --------------------------------------------------------------------------------------------------

    def _apply(self, effects: list[Effect]) -> None:
        delivered_on_write: list[int] = []
        for effect in effects:
            if isinstance(effect, Send):
                if self._send(effect):
                    delivered_on_write.append(effect.pending.request_id)
            elif isinstance(effect, StartTimer):
                self._start_timer(effect)
            elif isinstance(effect, CancelTimer):
                call = self.timers.pop((effect.kind, effect.request_id), None)
                if call is not None and call.active():
                    call.cancel()
            elif isinstance(effect, Finished):
                for waiter in self.waiters.pop(effect.rpc_id, ()):
                    if not waiter.called:  # a caller that went away cancelled its Deferred
                        waiter.callback(effect.result)
            elif isinstance(effect, StatusChanged):
                if self.status_listener is not None:
                    self.status_listener(self.device, effect.pending, effect.status, effect.response)
        for request_id in delivered_on_write:
            self._apply(self.queue.acked(request_id, self.now()))

    def _send(self, effect: Send) -> bool:
        session = self.sessions.get(effect.session_id)
        if session is None:
            return False
        command = effect.pending.command
        qos = self.settings.qos if command.qos is None else command.qos
        outcome = session.send_command(effect.pending.request_id, command.method, command.params, qos)
        return outcome is Delivery.DELIVERED

    def _start_timer(self, effect: StartTimer) -> None:
        key = (effect.kind, effect.request_id)
        old = self.timers.pop(key, None)
        if old is not None and old.active():
            old.cancel()
        delay = max(0.0, (effect.at - self.now()) / 1000.0)
        ref = self.actor_ref
        self.timers[key] = self.clock.callLater(delay, _tell_quietly, ref, m.TimerFired(effect.kind, effect.request_id))

    # --- passivation ----------------------------------------------------------------------------------------------

    def _is_idle(self) -> bool:
        return not self.sessions and not self.queue.pending and not self.waiters

    def _schedule_idle_check(self) -> None:
        if not self._is_idle():
            if self._idle_call is not None and self._idle_call.active():
                self._idle_call.cancel()
            self._idle_call = None
            return
        if self._idle_call is not None and self._idle_call.active():
            return
        self._idle_generation += 1
        self._idle_call = self.clock.callLater(self.settings.idle_timeout, _tell_quietly, self.actor_ref,
                                               m.Passivate(self._idle_generation))


def _tell_quietly(ref: Any, message: Any) -> None:
    """Timers may fire after their actor stopped; that is not an error."""
    from pykka import ActorDeadError

    try:
        ref.tell(message)
    except ActorDeadError:
        pass


_HANDLERS: dict[type, Callable[[DeviceActor, Any], Any]] = {
    m.SubmitRpc: DeviceActor._submit,
    m.DeleteRpc: DeviceActor._delete,
    m.AttachSession: DeviceActor._attach,
    m.DetachSession: DeviceActor._detach,
    m.SubscribeCommands: DeviceActor._subscribe,
    m.UnsubscribeCommands: DeviceActor._unsubscribe,
    m.CommandAcked: DeviceActor._acked,
    m.CommandAnswered: DeviceActor._answered,
    m.DeviceCall: DeviceActor._device_call,
    m.TimerFired: DeviceActor._timer_fired,
    m.DeviceRemoved: DeviceActor._removed,
    m.Passivate: DeviceActor._passivate,
    m.Inspect: DeviceActor._inspect,
}
