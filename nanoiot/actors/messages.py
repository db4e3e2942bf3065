"""Messages a device actor understands: plain data, told (never asked) so that no caller ever waits on the actor.

A message that wants an answer carries a :class:`~nanoiot.actors.replies.ReplyTo` address, never a Deferred, so
that it can be written to a socket and reach an actor on another node. Only :class:`AttachSession` holds an
object (the session), and a session is local by definition: a device's actor lives where its session is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from nanoiot.actors.replies import ReplyTo
from nanoiot.port.link import Done
from nanoiot.port.session import DeviceSession
from nanoiot.rpc.model import RpcCommand
from nanoiot.rpc.queue import Timer


@dataclass(slots=True)
class SubmitRpc:
    """A server-side command; the answer (an RpcResult) goes to ``reply_to`` when it ends, or at once with the
    rpcId for a persistent one once it is stored."""

    command: RpcCommand
    reply_to: ReplyTo | None = None


@dataclass(slots=True)
class SubmitBatched:
    """A bulk RPC's persistent command on a node that holds every device (``CommandService.submit_stored``): no
    reply address; ``chunk`` (a local object, as a session is) learns once the command's insert is durable, or why
    it was refused, so that a whole chunk of commands has one Deferred."""

    command: RpcCommand
    chunk: Any


@dataclass(slots=True)
class DeleteRpc:
    """Delete a pending command; answers True if it was pending here."""

    rpc_id: UUID
    reply_to: ReplyTo | None = None


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
    #: Called once handled: the session acknowledges the device's message only then (a local report, never routed).
    done: Done = None


@dataclass(slots=True)
class DeviceCall:
    """A device-to-server ("client-side") call; the answer goes back on the session it came from."""

    session_id: int
    request_id: int
    payload: bytes
    #: Called once handled, as for :class:`CommandAnswered`.
    done: Done = None


@dataclass(slots=True)
class DeviceRemoved:
    """The device was deleted: close its sessions and fail what it had queued."""


@dataclass(slots=True)
class Released:
    """Another node took the device over (cluster): close its sessions here, hand lightweight commands still
    waiting for a session to ``forward`` and forget persistent ones (the new owner loads them from the database)."""

    new_node: str
    reply_to: ReplyTo | None = None


@dataclass(slots=True)
class TimerFired:
    kind: Timer
    request_id: int
    #: Which arming of the timer this is: a firing that raced with a cancel or re-arm is ignored.
    generation: int = 0


@dataclass(slots=True)
class TimersDue:
    """The actor's one wake-up call fired: every timer due by now fires, in order (``DeviceActor._timers_due``)."""

    #: Which arming of the wake-up call this is: one that raced with a re-arm or a cancel is ignored.
    generation: int


@dataclass(slots=True)
class Passivate:
    generation: int


@dataclass(slots=True)
class Inspect:
    """For tests and diagnostics: answer with a snapshot of the actor's state."""

    reply_to: ReplyTo | None = None
    extra: Any = None


@dataclass(slots=True)
class RestoreRpcs:
    """Stored commands to resume (after a restart, or on taking a device over in a cluster), in their original
    order: (command, status, request id, retry attempts already spent)."""

    entries: list = field(default_factory=list)


@dataclass(slots=True)
class SendNow:
    """A persistent command whose SENT status is durable may now be written to the device."""

    session_id: int
    request_id: int


@dataclass(slots=True)
class ReplyToDevice:
    """The server's answer to a device-to-server call that a rule chain answered (RPC Call Reply): written as is on
    the session the call came from, if it is still there."""

    session_id: int
    request_id: int
    body: bytes
