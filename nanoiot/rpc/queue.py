"""A device's RPC queue as a pure state machine.

The device actor feeds it events (a command submitted, a session subscribed, an ack, an answer, a timer fired) with
the current time, and applies the effects it returns (write to a session, record a status, finish a caller, arm or
cancel a timer). Nothing here does I/O or reads a clock, so every transition is tested on its own.

Semantics, where they go beyond ThingsBoard (see docs/rpc-semantics.md):
- DELIVERED needs an acknowledgement from the device; an answer implies delivery even if the ack was lost.
- A one-way command completes when it is delivered, under every strategy.
- Retries (a resend after an ack timeout) happen under every strategy, bounded by ``max_retries``.
- A command that expires tells its caller which failure it was: never sent, not acknowledged, or not answered.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Union
from uuid import UUID

from nanoiot.rpc.model import RpcCommand, RpcFailure, RpcResult, RpcStatus, SubmitStrategy


class Timer(str, enum.Enum):
    EXPIRY = "expiry"
    ACK = "ack"
    RESPONSE = "response"


@dataclass(slots=True)
class PendingRpc:
    """A command the queue still owns."""

    command: RpcCommand
    request_id: int
    status: RpcStatus = RpcStatus.QUEUED
    attempts: int = 0
    ever_sent: bool = False
    delivered: bool = False
    #: The session the command was last written to and whose ack we wait for; None when not in flight.
    in_flight_on: int | None = None
    #: The last send wrote nothing (the session could not take it): its ack timeout is not a retry.
    unsent: bool = False
    #: Restored as DELIVERED (two-way): the device acknowledged it before the restart, so failing to answer is
    #: NO_RESPONSE even while it is resent and not yet acknowledged again.
    delivered_before_restart: bool = False


# --- effects -----------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Send:
    session_id: int
    pending: PendingRpc


@dataclass(slots=True)
class StatusChanged:
    pending: PendingRpc
    status: RpcStatus
    response: Any = None


@dataclass(slots=True)
class Finished:
    rpc_id: UUID
    result: RpcResult


@dataclass(slots=True)
class StartTimer:
    kind: Timer
    request_id: int
    at: int


@dataclass(slots=True)
class CancelTimer:
    kind: Timer
    request_id: int


Effect = Union[Send, StatusChanged, Finished, StartTimer, CancelTimer]

RETRIES_EXHAUSTED = "There was a Timeout and all retry attempts have been exhausted. Retry attempts set: {n}"
RESPONSE_TIMEOUT = "There was a timeout awaiting for RPC response from device."


@dataclass(slots=True)
class QueueSettings:
    strategy: SubmitStrategy = SubmitStrategy.BURST
    max_retries: int = 5
    ack_timeout_ms: int = 10_000
    response_timeout_ms: int = 30_000
    #: Commands written but not yet acknowledged, at most, under BURST (MQTT's receive maximum is similar).
    max_in_flight: int = 100


@dataclass(slots=True)
class DeviceRpcQueue:
    """The ordered commands of one device and the sessions that can take them."""

    settings: QueueSettings = field(default_factory=QueueSettings)
    next_request_id: int = 0
    #: request id -> pending command, in submission order (dicts keep insertion order).
    pending: dict[int, PendingRpc] = field(default_factory=dict)
    by_rpc_id: dict[UUID, int] = field(default_factory=dict)
    #: session id -> True for one-shot (HTTP long-poll) sessions; the most recent subscription is last.
    subscriptions: dict[int, bool] = field(default_factory=dict)

    # --- queries --------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.pending)

    def find(self, rpc_id: UUID) -> PendingRpc | None:
        request_id = self.by_rpc_id.get(rpc_id)
        return None if request_id is None else self.pending.get(request_id)

    @property
    def is_idle(self) -> bool:
        return not self.pending and not self.subscriptions

    # --- events ---------------------------------------------------------------------------------------------------

    def submit(self, command: RpcCommand, now: int, request_id: int | None = None) -> list[Effect]:
        """Take a new command; it is sent at once if the strategy and a session allow.

        ``request_id`` is the id the device sees; the actor passes one from a server-wide source so that ids stay
        unique across restarts (a device can de-duplicate on them). Without one, a per-queue counter is used.
        """
        pending = self._new_pending(command, request_id)
        effects: list[Effect] = []
        if command.expiration_time <= now:
            effects.append(StatusChanged(pending, RpcStatus.EXPIRED))
            effects.append(Finished(command.rpc_id, RpcResult(failure=RpcFailure.DEVICE_OFFLINE)))
            return effects
        self._admit(pending, effects)
        effects.insert(0, StatusChanged(pending, RpcStatus.QUEUED))
        self._pump(now, effects)
        return effects

    def restore(self, command: RpcCommand, status: RpcStatus, now: int, request_id: int | None = None,
                attempts: int = 0) -> list[Effect]:
        """Re-take a stored command after a restart, keeping its id, its place and what it already went through.

        QUEUED was never written to a device. SENT and TIMEOUT may have reached it: they are sent again (same
        request id) and expire as NOT_DELIVERED. A one-way command stored as DELIVERED has succeeded (its
        SUCCESSFUL was not stored before the restart): it ends at once as SUCCESSFUL. A two-way command stored as
        DELIVERED reached the device, but its answer may have died with the crash (sent while the server was
        down, or received and not yet stored): it is sent again with its original request id so that the device,
        which de-duplicates on that id, can answer again; until then it stays DELIVERED, and it ends as NO_RESPONSE
        if it expires (or runs out of retries) unanswered.
        """
        pending = self._new_pending(command, request_id)
        pending.status = status
        pending.attempts = attempts
        pending.ever_sent = status is not RpcStatus.QUEUED
        was_delivered = status is RpcStatus.DELIVERED
        pending.delivered = was_delivered and command.oneway
        if was_delivered and not command.oneway:
            pending.delivered_before_restart = True
            pending.status = RpcStatus.SENT  # in memory only: the resend does not report SENT again
        effects: list[Effect] = []
        if pending.delivered and command.oneway:
            effects.append(StatusChanged(pending, RpcStatus.SUCCESSFUL))
            effects.append(Finished(command.rpc_id, RpcResult()))
            return effects
        if command.expiration_time <= now:
            effects.append(StatusChanged(pending, RpcStatus.EXPIRED))
            failure = (RpcFailure.NO_RESPONSE if was_delivered else
                       RpcFailure.NOT_DELIVERED if pending.ever_sent else RpcFailure.DEVICE_OFFLINE)
            effects.append(Finished(command.rpc_id, RpcResult(failure=failure)))
            return effects
        self._admit(pending, effects)
        self._pump(now, effects)
        return effects

    def _new_pending(self, command: RpcCommand, request_id: int | None) -> PendingRpc:
        if request_id is None:
            request_id = self.next_request_id
        self.next_request_id = max(self.next_request_id, request_id + 1)
        return PendingRpc(command, request_id)

    def _admit(self, pending: PendingRpc, effects: list[Effect]) -> None:
        self.pending[pending.request_id] = pending
        self.by_rpc_id[pending.command.rpc_id] = pending.request_id
        effects.append(StartTimer(Timer.EXPIRY, pending.request_id, pending.command.expiration_time))

    def forget(self, rpc_id: UUID) -> PendingRpc | None:
        """Drop a command that was never written to the device, with no status change and no outcome: in a
        cluster another node's actor holds it now. Returns it, or None if it is not here or not QUEUED."""
        pending = self.find(rpc_id)
        if pending is None or pending.ever_sent or pending.in_flight_on is not None:
            return None
        del self.pending[pending.request_id]
        del self.by_rpc_id[rpc_id]
        return pending

    def session_subscribed(self, session_id: int, one_shot: bool, now: int) -> list[Effect]:
        """A session asked for commands (MQTT subscribe, CoAP observe, HTTP long-poll)."""
        self.subscriptions.pop(session_id, None)
        self.subscriptions[session_id] = one_shot
        effects: list[Effect] = []
        self._pump(now, effects)
        return effects

    def session_closed(self, session_id: int, now: int) -> list[Effect]:
        """A session went away: what was in flight on it must be sent again, without counting a retry."""
        self.subscriptions.pop(session_id, None)
        effects: list[Effect] = []
        for pending in self.pending.values():
            if pending.in_flight_on == session_id:
                pending.in_flight_on = None
                effects.append(CancelTimer(Timer.ACK, pending.request_id))
        self._pump(now, effects)
        return effects

    def acked(self, request_id: int, now: int) -> list[Effect]:
        """The device acknowledged the command (MQTT PUBACK, CoAP ACK, HTTP poll response written)."""
        pending = self.pending.get(request_id)
        effects: list[Effect] = []
        if pending is None or pending.delivered or not pending.ever_sent:
            return effects
        self._mark_delivered(pending, effects)
        if pending.command.oneway:
            # For a one-way command delivery is success (ThingsBoard's meaning of SUCCESSFUL for one-way).
            self._remove(pending, effects)
            effects.append(StatusChanged(pending, RpcStatus.SUCCESSFUL))
            effects.append(Finished(pending.command.rpc_id, RpcResult()))
        elif self.settings.strategy is SubmitStrategy.SEQUENTIAL_ON_RESPONSE_FROM_DEVICE:
            at = min(now + self.settings.response_timeout_ms, pending.command.expiration_time)
            effects.append(StartTimer(Timer.RESPONSE, request_id, at))
        self._pump(now, effects)
        return effects

    def answered(self, request_id: int, response: Any, now: int) -> list[Effect]:
        """The device answered; an answer implies delivery even when the ack was lost or comes later."""
        pending = self.pending.get(request_id)
        effects: list[Effect] = []
        if pending is None or not pending.ever_sent:
            # An answer to a command never written to a device is stale or forged: ignore it.
            return effects
        if not pending.delivered:
            self._mark_delivered(pending, effects)
        self._remove(pending, effects)
        effects.append(StatusChanged(pending, RpcStatus.SUCCESSFUL, response))
        effects.append(Finished(pending.command.rpc_id, RpcResult(response=response, has_response=True)))
        self._pump(now, effects)
        return effects

    def not_sent(self, request_id: int) -> None:
        """The session took nothing (its window was full, its socket congested): the ack timer stays armed and
        resends the command when it fires, without counting that as a retry."""
        pending = self.pending.get(request_id)
        if pending is not None and pending.in_flight_on is not None:
            pending.unsent = True

    def ack_timed_out(self, request_id: int, now: int) -> list[Effect]:
        """No acknowledgement in time: retry while the budget lasts, then fail."""
        pending = self.pending.get(request_id)
        effects: list[Effect] = []
        if pending is None or pending.delivered or pending.in_flight_on is None:
            return effects
        pending.in_flight_on = None
        if pending.unsent:
            pending.unsent = False
            self._pump(now, effects)
            return effects
        limit = self._retry_limit(pending.command)
        if pending.attempts < limit:
            pending.attempts += 1
            pending.status = RpcStatus.TIMEOUT
            effects.append(StatusChanged(pending, RpcStatus.TIMEOUT))
        else:
            self._remove(pending, effects)
            error = {"error": RETRIES_EXHAUSTED.format(n=limit)}
            effects.append(StatusChanged(pending, RpcStatus.FAILED, error))
            failure = RpcFailure.NO_RESPONSE if pending.delivered_before_restart else RpcFailure.NOT_DELIVERED
            effects.append(Finished(pending.command.rpc_id, RpcResult(failure=failure)))
        self._pump(now, effects)
        return effects

    def response_timed_out(self, request_id: int, now: int) -> list[Effect]:
        """SEQUENTIAL_ON_RESPONSE: a delivered command was not answered in time; let the next one go."""
        pending = self.pending.get(request_id)
        effects: list[Effect] = []
        if pending is None:
            return effects
        self._remove(pending, effects)
        effects.append(StatusChanged(pending, RpcStatus.FAILED, {"error": RESPONSE_TIMEOUT}))
        effects.append(Finished(pending.command.rpc_id, RpcResult(failure=RpcFailure.NO_RESPONSE)))
        self._pump(now, effects)
        return effects

    def expired(self, request_id: int, now: int) -> list[Effect]:
        """The command's life ended; the failure says how far it got."""
        pending = self.pending.get(request_id)
        effects: list[Effect] = []
        if pending is None:
            return effects
        self._remove(pending, effects)
        if pending.delivered or pending.delivered_before_restart:
            failure = RpcFailure.NO_RESPONSE
        elif pending.ever_sent:
            failure = RpcFailure.NOT_DELIVERED
        else:
            failure = RpcFailure.DEVICE_OFFLINE
        effects.append(StatusChanged(pending, RpcStatus.EXPIRED))
        effects.append(Finished(pending.command.rpc_id, RpcResult(failure=failure)))
        self._pump(now, effects)
        return effects

    def delete(self, rpc_id: UUID, now: int) -> list[Effect]:
        """Cancel a pending command (REST DELETE); the next one may go."""
        pending = self.find(rpc_id)
        effects: list[Effect] = []
        if pending is None:
            return effects
        self._remove(pending, effects)
        effects.append(StatusChanged(pending, RpcStatus.DELETED))
        effects.append(Finished(rpc_id, RpcResult(failure=RpcFailure.DELETED)))
        self._pump(now, effects)
        return effects

    # --- internals ------------------------------------------------------------------------------------------------

    def _retry_limit(self, command: RpcCommand) -> int:
        if command.retries is None:
            return self.settings.max_retries
        return max(0, min(command.retries, self.settings.max_retries))

    def _mark_delivered(self, pending: PendingRpc, effects: list[Effect]) -> None:
        pending.delivered = True
        pending.ever_sent = True
        if pending.in_flight_on is not None:
            pending.in_flight_on = None
            effects.append(CancelTimer(Timer.ACK, pending.request_id))
        pending.status = RpcStatus.DELIVERED
        effects.append(StatusChanged(pending, RpcStatus.DELIVERED))

    def _remove(self, pending: PendingRpc, effects: list[Effect]) -> None:
        del self.pending[pending.request_id]
        self.by_rpc_id.pop(pending.command.rpc_id, None)
        effects.append(CancelTimer(Timer.EXPIRY, pending.request_id))
        if pending.in_flight_on is not None:
            pending.in_flight_on = None
            effects.append(CancelTimer(Timer.ACK, pending.request_id))
        if pending.delivered and not pending.command.oneway and (
            self.settings.strategy is SubmitStrategy.SEQUENTIAL_ON_RESPONSE_FROM_DEVICE
        ):
            effects.append(CancelTimer(Timer.RESPONSE, pending.request_id))

    def _candidates(self) -> list[PendingRpc]:
        """The commands the strategy lets go now, in order."""
        strategy = self.settings.strategy
        if strategy is SubmitStrategy.BURST:
            # One pass (after every event of every command): the waiting ones in order, cut to the room left.
            in_flight = 0
            ready: list[PendingRpc] = []
            for p in self.pending.values():
                if p.in_flight_on is not None:
                    in_flight += 1
                elif not p.delivered:
                    ready.append(p)
            room = self.settings.max_in_flight - in_flight
            return ready[:room] if room > 0 else []
        if strategy is SubmitStrategy.SEQUENTIAL_ON_ACK_FROM_DEVICE:
            for p in self.pending.values():
                if p.delivered:
                    continue
                return [] if p.in_flight_on is not None else [p]
            return []
        # SEQUENTIAL_ON_RESPONSE_FROM_DEVICE: only the head, and only while it is neither in flight nor delivered.
        for p in self.pending.values():
            return [] if (p.in_flight_on is not None or p.delivered) else [p]
        return []

    def _pump(self, now: int, effects: list[Effect]) -> None:
        while self.subscriptions:
            candidates = self._candidates()
            if not candidates:
                return
            for pending in candidates:
                if not self.subscriptions:
                    return
                session_id = next(reversed(self.subscriptions))
                if self.subscriptions[session_id]:
                    del self.subscriptions[session_id]  # a long-poll takes one command
                pending.in_flight_on = session_id
                pending.unsent = False
                pending.ever_sent = True
                if pending.status is not RpcStatus.SENT:
                    pending.status = RpcStatus.SENT
                    effects.append(StatusChanged(pending, RpcStatus.SENT))
                at = min(now + self.settings.ack_timeout_ms, pending.command.expiration_time)
                effects.append(StartTimer(Timer.ACK, pending.request_id, at))
                effects.append(Send(session_id, pending))
            # BURST goes round again only while a one-shot session (a long poll) is left to take a command.
            if self.settings.strategy is not SubmitStrategy.BURST or True not in self.subscriptions.values():
                return
