"""Plain, immutable records that the repository returns (never ORM rows), so that they can cross threads."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from uuid import UUID

from nanoiot.rpc.model import RpcStatus

#: ThingsBoard's "no entity" id, used for an unassigned customer and for the system administrator's tenant.
NULL_UUID = UUID("13814000-1dd2-11b2-8080-808080808080")

T = TypeVar("T")


class Authority(str, enum.Enum):
    SYS_ADMIN = "SYS_ADMIN"
    TENANT_ADMIN = "TENANT_ADMIN"
    CUSTOMER_USER = "CUSTOMER_USER"


@dataclass(frozen=True, slots=True)
class Tenant:
    id: UUID
    created_time: int
    title: str


@dataclass(frozen=True, slots=True)
class Customer:
    id: UUID
    created_time: int
    tenant_id: UUID
    title: str


@dataclass(frozen=True, slots=True)
class User:
    id: UUID
    created_time: int
    tenant_id: UUID
    customer_id: UUID
    email: str
    authority: Authority
    first_name: str | None
    last_name: str | None
    password_hash: bytes = field(repr=False)
    #: False for a disabled user (``tb_user.enabled``, schema 5): no login, and its tokens stop working.
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class Device:
    id: UUID
    created_time: int
    tenant_id: UUID
    customer_id: UUID
    name: str
    type: str
    label: str | None
    additional_info: Any
    version: int = 1


@dataclass(frozen=True, slots=True)
class DeviceCredentials:
    id: UUID
    created_time: int
    device_id: UUID
    credentials_id: str
    credentials_type: str = "ACCESS_TOKEN"
    credentials_value: str | None = None
    version: int = 1


@dataclass(frozen=True, slots=True)
class RpcRecord:
    """One persistent RPC as stored; ``seq`` orders a device's RPCs when created_time ties."""

    id: UUID
    created_time: int
    tenant_id: UUID
    device_id: UUID
    expiration_time: int
    oneway: bool
    method: str
    params: Any
    status: RpcStatus
    response: Any = None
    additional_info: Any = None
    retries: int | None = None
    user_id: UUID | None = None
    seq: int = 0
    #: Resends after an acknowledgement timeout so far, kept so that a restart does not renew the retry budget.
    attempts: int = 0
    #: Who sent it: {"type": "USER" | "DEVICE" | "RULE_CHAIN" | "BULK", ...ids} (see commands/service.py).
    initiator: Any = None
    batch_id: UUID | None = None


class SortOrder(str, enum.Enum):
    ASC = "ASC"
    DESC = "DESC"


@dataclass(frozen=True, slots=True)
class PageLink:
    """ThingsBoard's paging query: ``pageSize``, ``page``, ``textSearch``, ``sortProperty``, ``sortOrder``."""

    page_size: int
    page: int = 0
    text_search: str | None = None
    sort_property: str | None = None
    sort_order: SortOrder = SortOrder.ASC


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    data: list[T]
    total_elements: int
    page_size: int
    page: int

    @property
    def total_pages(self) -> int:
        return math.ceil(self.total_elements / self.page_size) if self.page_size else 0

    @property
    def has_next(self) -> bool:
        return (self.page + 1) * self.page_size < self.total_elements


# --- cluster mode ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A node of the cluster as its row says; ``alive`` when its last heartbeat is recent enough."""

    node_id: str
    address: str | None
    started_time: int | None
    heartbeat_time: int | None
    connected_devices: int | None
    alive: bool


@dataclass(frozen=True, slots=True)
class Claim:
    """A device taken by a node: ``epoch`` fences the claim; ``previous_node`` held it before (None: nobody)."""

    device_id: UUID
    epoch: int
    previous_node: str | None


@dataclass(frozen=True, slots=True)
class Owner:
    """Which node serves a device, under which epoch, and whether that node still heartbeats."""

    device_id: UUID
    node_id: str
    epoch: int
    alive: bool


# --- rule chains and relations (schema 4) ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RuleChainRecord:
    """A tenant's rule chain as stored: ThingsBoard's ``RuleChain`` fields, and ``metadata`` (``firstNodeIndex``,
    ``nodes`` each with its ``id``, ``connections``) as the JSON value it was saved as, or None before any save.
    ``version`` grows by one with every change (optimistic locking, as ThingsBoard)."""

    id: UUID
    created_time: int
    tenant_id: UUID
    name: str
    type: str = "CORE"
    root: bool = False
    debug_mode: bool = False
    configuration: Any = None
    additional_info: Any = None
    metadata: Any = None
    version: int = 1


@dataclass(frozen=True, slots=True)
class RelationRecord:
    """One ThingsBoard entity relation: ``from`` -> ``to`` of a ``type`` in a ``type_group``, within a tenant."""

    tenant_id: UUID
    from_id: UUID
    from_type: str
    to_id: UUID
    to_type: str
    type: str
    type_group: str = "COMMON"
    additional_info: Any = None
