"""The message that flows through rule chains, shaped like ThingsBoard's ``TbMsg``.

A message is immutable: a node that changes something returns a new one (``with_``). ``data`` stays JSON *text*,
as ThingsBoard keeps it, so that a chain exported from ThingsBoard sees exactly the bytes it would see there;
``json()`` parses it for the nodes that look inside.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from nanoiot.ids import uuid4

__all__ = [
    "FAILURE",
    "FALSE",
    "MSG_TYPES",
    "OTHER",
    "SUCCESS",
    "TRUE",
    "EntityId",
    "RuleMessage",
    "compact_json",
    "switch_label",
]

# ThingsBoard's relation names (TbNodeConnectionType).
SUCCESS = "Success"
FAILURE = "Failure"
TRUE = "True"
FALSE = "False"
OTHER = "Other"

#: ThingsBoard's message type NAME -> the relation the Message Type Switch sends it on (TbMsgType). Types without a
#: label of their own go to "Other", as do custom types (not in this table).
MSG_TYPES: dict[str, str] = {
    "POST_ATTRIBUTES_REQUEST": "Post attributes",
    "POST_TELEMETRY_REQUEST": "Post telemetry",
    "TO_SERVER_RPC_REQUEST": "RPC Request from Device",
    "ACTIVITY_EVENT": "Activity Event",
    "INACTIVITY_EVENT": "Inactivity Event",
    "CONNECT_EVENT": "Connect Event",
    "DISCONNECT_EVENT": "Disconnect Event",
    "ENTITY_CREATED": "Entity Created",
    "ENTITY_UPDATED": "Entity Updated",
    "ENTITY_DELETED": "Entity Deleted",
    "ENTITY_ASSIGNED": "Entity Assigned",
    "ENTITY_UNASSIGNED": "Entity Unassigned",
    "ATTRIBUTES_UPDATED": "Attributes Updated",
    "ATTRIBUTES_DELETED": "Attributes Deleted",
    "ALARM": "Alarm",
    "ALARM_CREATED": "Alarm Created",
    "ALARM_UPDATED": "Alarm Updated",
    "ALARM_SEVERITY_UPDATED": "Alarm Severity Updated",
    "ALARM_ACK": "Alarm Acknowledged",
    "ALARM_CLEAR": "Alarm Cleared",
    "ALARM_DELETE": OTHER,
    "ALARM_ASSIGNED": "Alarm Assigned",
    "ALARM_UNASSIGNED": "Alarm Unassigned",
    "COMMENT_CREATED": "Comment Created",
    "COMMENT_UPDATED": "Comment Updated",
    "RPC_CALL_FROM_SERVER_TO_DEVICE": "RPC Request to Device",
    "ENTITY_ASSIGNED_FROM_TENANT": "Entity Assigned From Tenant",
    "ENTITY_ASSIGNED_TO_TENANT": "Entity Assigned To Tenant",
    "ENTITY_ASSIGNED_TO_EDGE": OTHER,
    "ENTITY_UNASSIGNED_FROM_EDGE": OTHER,
    "TIMESERIES_UPDATED": "Timeseries Updated",
    "TIMESERIES_DELETED": "Timeseries Deleted",
    "RPC_QUEUED": "RPC Queued",
    "RPC_SENT": "RPC Sent",
    "RPC_DELIVERED": "RPC Delivered",
    "RPC_SUCCESSFUL": "RPC Successful",
    "RPC_TIMEOUT": "RPC Timeout",
    "RPC_EXPIRED": "RPC Expired",
    "RPC_FAILED": "RPC Failed",
    "RPC_DELETED": "RPC Deleted",
    "RELATION_ADD_OR_UPDATE": "Relation Added or Updated",
    "RELATION_DELETED": "Relation Deleted",
    "RELATIONS_DELETED": "All Relations Deleted",
    "PROVISION_SUCCESS": OTHER,
    "PROVISION_FAILURE": OTHER,
    "SEND_EMAIL": OTHER,
    "REST_API_REQUEST": "REST API request",
}


def switch_label(msg_type: str) -> str:
    """The Message Type Switch relation of a type: its label, or "Other" for custom and unlabelled types."""
    return MSG_TYPES.get(msg_type, OTHER)


def compact_json(value: Any) -> str:
    """JSON text as ThingsBoard (Jackson) writes it: no spaces, UTF-8 kept as is."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class EntityId:
    """ThingsBoard's ``{"entityType", "id"}``: DEVICE, TENANT, CUSTOMER, ASSET, RULE_CHAIN, USER, ..."""

    entity_type: str
    id: UUID

    def to_json(self) -> dict[str, str]:
        return {"entityType": self.entity_type, "id": str(self.id)}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> EntityId:
        return cls(str(raw["entityType"]), UUID(str(raw["id"])))


@dataclass(frozen=True)
class RuleMessage:
    """One message in a rule chain (ThingsBoard's TbMsg)."""

    #: ThingsBoard's TbMsgType NAME ("RPC_CALL_FROM_SERVER_TO_DEVICE", ...) or a custom type.
    type: str
    originator: EntityId
    #: JSON text, as TbMsg keeps it.
    data: str
    #: String keys and values; copied on construction, and treated as read-only (a node changes metadata by making a
    #: new message).
    metadata: Mapping[str, str]
    customer_id: UUID | None = None
    ts: int = 0
    id: UUID = field(default_factory=uuid4)
    #: Opaque to the rule engine, carried unchanged through nodes and onto RPC Call Request's outcome: the server
    #: puts the REST caller's reply address here.
    origin: Any = None
    #: Why the message was sent down "Failure" (ThingsBoard's failureMessage); None otherwise.
    error: str | None = None
    #: Nodes the message (and the messages it came from) went through, across chains: the loop guard.
    hops: int = 0

    def __post_init__(self) -> None:
        # A copy, so that neither the caller nor another message shares it (pickles and compares as a plain dict).
        object.__setattr__(self, "metadata", dict(self.metadata))

    @classmethod
    def create(cls, type: str, originator: EntityId, data: Any = None, metadata: Mapping[str, str] | None = None,
               **fields: Any) -> RuleMessage:
        """A message from Python values: ``data`` that is not already text is written as compact JSON."""
        text = data if isinstance(data, str) else compact_json({} if data is None else data)
        return cls(type=type, originator=originator, data=text, metadata=dict(metadata or {}), **fields)

    def with_(self, **changes: Any) -> RuleMessage:
        """A copy with some fields changed (``data`` given as a non-string is written as compact JSON)."""
        if "data" in changes and not isinstance(changes["data"], str):
            changes["data"] = compact_json(changes["data"])
        return dataclasses.replace(self, **changes)

    def json(self) -> Any:
        """The parsed data; text that is not JSON is returned as the string itself (never raises)."""
        try:
            return json.loads(self.data)
        except (ValueError, TypeError):
            return self.data

    def metadata_dict(self) -> dict[str, str]:
        """A mutable copy of the metadata, to build the next message from."""
        return dict(self.metadata)
