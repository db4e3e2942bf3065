"""The data an RPC is made of, shared by the REST layer, the device actor and the transports (no I/O here)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any
from uuid import UUID

__all__ = [
    "NonJsonResponse",
    "RpcCommand",
    "RpcFailure",
    "RpcResult",
    "RpcStatus",
    "SubmitStrategy",
    "record_command",
]


class RpcStatus(str, enum.Enum):
    QUEUED = "QUEUED"
    SENT = "SENT"
    DELIVERED = "DELIVERED"
    SUCCESSFUL = "SUCCESSFUL"
    TIMEOUT = "TIMEOUT"
    EXPIRED = "EXPIRED"
    FAILED = "FAILED"
    DELETED = "DELETED"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({RpcStatus.SUCCESSFUL, RpcStatus.EXPIRED, RpcStatus.FAILED, RpcStatus.DELETED})


class SubmitStrategy(str, enum.Enum):
    """How many commands a device may have in flight (ThingsBoard's ``actors.rpc.submit_strategy``)."""

    BURST = "BURST"
    SEQUENTIAL_ON_ACK_FROM_DEVICE = "SEQUENTIAL_ON_ACK_FROM_DEVICE"
    SEQUENTIAL_ON_RESPONSE_FROM_DEVICE = "SEQUENTIAL_ON_RESPONSE_FROM_DEVICE"


class RpcFailure(str, enum.Enum):
    """Why a call ended without an answer: ThingsBoard says "timeout" for all of these, we say which."""

    #: No session ever took the command before it expired (ThingsBoard's NO_ACTIVE_CONNECTION).
    DEVICE_OFFLINE = "DEVICE_OFFLINE"
    #: The command was written to the device but never acknowledged (PUBACK / CoAP ACK), retries included.
    NOT_DELIVERED = "NOT_DELIVERED"
    #: The device acknowledged the command but did not answer in time.
    NO_RESPONSE = "NO_RESPONSE"
    #: The command was deleted through the API while pending.
    DELETED = "DELETED"
    #: The server could not accept the command (queue full, device removed).
    REJECTED = "REJECTED"

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    RpcFailure.DEVICE_OFFLINE: "Device is offline: no session took the command before it expired",
    RpcFailure.NOT_DELIVERED: "Command was sent but the device never acknowledged it",
    RpcFailure.NO_RESPONSE: "Command was delivered but the device did not answer in time",
    RpcFailure.DELETED: "Command was deleted before it completed",
    RpcFailure.REJECTED: "Command was rejected by the server",
}


class NonJsonResponse(str):
    """A device answer that is not JSON: REST answers 406, persistence stores ``{"error": text}``."""


@dataclass(slots=True)
class RpcCommand:
    """One server-to-device command, as the device actor holds it."""

    rpc_id: UUID
    tenant_id: UUID
    device_id: UUID
    method: str
    params: Any
    oneway: bool
    expiration_time: int
    created_time: int
    persistent: bool = False
    retries: int | None = None
    additional_info: Any = None
    qos: int | None = None
    user_id: UUID | None = None
    #: Who sent it, as data: {"type": "USER" | "DEVICE" | "RULE_CHAIN" | "BULK", ...ids}.
    initiator: Any = None
    batch_id: UUID | None = None


# Not frozen (never changed once made), for the cost of its __init__: see RpcBody. One per command outcome.
@dataclass(slots=True)
class RpcResult:
    """How a command ended, for whoever waits on it (the REST caller)."""

    response: Any = None
    failure: RpcFailure | None = None
    has_response: bool = False

    @property
    def ok(self) -> bool:
        return self.failure is None


def record_command(record: Any) -> RpcCommand:
    """A stored persistent command (an ``RpcRecord``) as the actor holds it, to resume after a restart."""
    return RpcCommand(
        rpc_id=record.id,
        tenant_id=record.tenant_id,
        device_id=record.device_id,
        method=record.method,
        params=record.params,
        oneway=record.oneway,
        expiration_time=record.expiration_time,
        created_time=record.created_time,
        persistent=True,
        retries=record.retries,
        additional_info=record.additional_info,
        user_id=record.user_id,
        initiator=record.initiator,
        batch_id=record.batch_id,
    )
