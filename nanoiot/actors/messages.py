"""Messages a device actor understands: plain data, told (never asked) so that no caller ever waits on the actor.

Callers that need an outcome pass a Deferred in the message; the actor fires it on the reactor thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from twisted.internet.defer import Deferred

from nanoiot.rpc.model import RpcCommand
from nanoiot.rpc.queue import Timer
from nanoiot.transports.session import DeviceSession


@dataclass(slots=True)
class SubmitRpc:
    """A server-side command; ``reply`` fires with an RpcResult when it ends (or at once for persistent ones)."""

    command: RpcCommand
    reply: Deferred = field(default_factory=Deferred)


@dataclass(slots=True)
class DeleteRpc:
    rpc_id: UUID
    reply: Deferred = field(default_factory=Deferred)


@dataclass(slots=True)
class AttachSession:
    session: DeviceSession
    #: Sessions of the same transport that this one replaces (an MQTT reconnect takes over the old connection).
    exclusive: bool = True


@dataclass(slots=True)
class DetachSession:
    session_id: int


@dataclass(slots=True)
class SubscribeCommands:
    session_id: int
    one_shot: bool = False


@dataclass(slots=True)
class UnsubscribeCommands:
    session_id: int


@dataclass(slots=True)
class CommandAcked:
    session_id: int
    request_id: int


@dataclass(slots=True)
class CommandAnswered:
    session_id: int
    request_id: int
    payload: bytes


@dataclass(slots=True)
class DeviceCall:
    """A device-to-server ("client-side") call; the answer goes back on the session it came from."""

    session_id: int
    request_id: int
    payload: bytes


@dataclass(slots=True)
class DeviceRemoved:
    """The device was deleted: close its sessions and fail what it had queued."""


@dataclass(slots=True)
class TimerFired:
    kind: Timer
    request_id: int
    #: Which arming of the timer this is: a firing that raced with a cancel or re-arm is ignored.
    generation: int = 0


@dataclass(slots=True)
class Passivate:
    generation: int


@dataclass(slots=True)
class Inspect:
    """For tests and diagnostics: reply with a snapshot of the actor's state."""

    reply: Deferred = field(default_factory=Deferred)
    extra: Any = None


@dataclass(slots=True)
class RestoreRpcs:
    """Stored commands to resume after a restart, in their original order: (command, status, request id, retry
    attempts already spent)."""

    entries: list = field(default_factory=list)


@dataclass(slots=True)
class SendNow:
    """A persistent command whose SENT status is durable may now be written to the device."""

    session_id: int
    request_id: int
