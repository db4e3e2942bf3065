"""The one typed event stream of the command service: devices going online and offline, every status change of
every command (lightweight ones too), and device-to-server calls.

Listeners run synchronously on the reactor thread and must not block. WebSocket clients, rule chains, metrics and
tests subscribe here; in a cluster each node publishes the events of the devices it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Union
from uuid import UUID

from twisted.logger import Logger

from nanoiot.persistence.records import RpcRecord
from nanoiot.rpc.model import RpcStatus

log = Logger(namespace="nanoiot.events")


class RpcStatusChanged:
    """``RPC_<STATUS>``: one status change of one command; ``record`` is the command as it stands now.

    A device actor publishes four of these per command, and most listeners (metrics) read only ``status``,
    ``persistent`` and ``created_time``: :meth:`lazily` builds the record only when a listener reads it."""

    __slots__ = ("_record", "_build", "persistent", "status", "created_time")

    def __init__(self, record: RpcRecord, persistent: bool) -> None:
        self._record: RpcRecord | None = record
        self._build: Callable[[], RpcRecord] | None = None
        self.persistent = persistent
        self.status: RpcStatus = record.status
        self.created_time: int = record.created_time

    @classmethod
    def lazily(cls, status: RpcStatus, created_time: int, persistent: bool,
               build: Callable[[], RpcRecord]) -> RpcStatusChanged:
        """``build`` must give the same record whenever it is called (it reads nothing that changes later)."""
        event = cls.__new__(cls)
        event._record, event._build = None, build
        event.persistent, event.status, event.created_time = persistent, status, created_time
        return event

    @property
    def record(self) -> RpcRecord:
        record = self._record
        if record is None:
            assert self._build is not None
            record = self._record = self._build()
            self._build = None
        return record

    @property
    def type(self) -> str:
        return f"RPC_{self.status.value}"

    def __eq__(self, other: object) -> bool:
        if type(other) is not RpcStatusChanged:
            return NotImplemented
        return self.persistent == other.persistent and self.record == other.record

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RpcStatusChanged(record={self.record!r}, persistent={self.persistent!r})"


@dataclass(frozen=True, slots=True)
class DevicePresence:
    """A device came online or went offline on ``node`` (by its sessions: first attached, last detached)."""

    device_id: UUID
    tenant_id: UUID
    customer_id: UUID
    transport: str
    node: str = ""
    type: ClassVar[str] = ""


@dataclass(frozen=True, slots=True)
class DeviceOnline(DevicePresence):
    """The device's first session attached."""

    type: ClassVar[str] = "DEVICE_ONLINE"


@dataclass(frozen=True, slots=True)
class DeviceOffline(DevicePresence):
    """The device's last session detached (closed, or taken over by another node)."""

    type: ClassVar[str] = "DEVICE_OFFLINE"


@dataclass(frozen=True, slots=True)
class DeviceCalled:
    """A device called the server (a device-to-server RPC); ``method`` is None when the call was not valid JSON."""

    device_id: UUID
    tenant_id: UUID
    customer_id: UUID
    transport: str
    method: str | None
    node: str = ""
    type: str = "DEVICE_CALLED"


Event = Union[RpcStatusChanged, DeviceOnline, DeviceOffline, DeviceCalled]
Listener = Callable[[Any], None]


class EventStream:
    """Listeners say which kinds of event they want, so that an actor builds an event (a record per status change,
    on the hot path) only when somebody wants that kind."""

    def __init__(self) -> None:
        self._listeners: list[tuple[Listener, tuple[type, ...] | None]] = []
        self._wanted: dict[type, bool] = {}

    def subscribe(self, listener: Listener, kinds: tuple[type, ...] | None = None) -> Callable[[], None]:
        """``kinds``: the event classes wanted (None: every event). Returns the function that unsubscribes."""
        entry = (listener, kinds)
        self._listeners.append(entry)
        self._wanted.clear()

        def unsubscribe() -> None:
            if entry in self._listeners:
                self._listeners.remove(entry)
                self._wanted.clear()

        return unsubscribe

    @property
    def has_listeners(self) -> bool:
        return bool(self._listeners)

    def wants(self, kind: type) -> bool:
        """Whether some listener takes events of ``kind`` (cached until the listeners change)."""
        wanted = self._wanted.get(kind)
        if wanted is None:
            wanted = self._wanted[kind] = any(kinds is None or issubclass(kind, kinds) for _, kinds in self._listeners)
        return wanted

    def publish(self, event: Event) -> None:
        for listener, kinds in tuple(self._listeners):
            if kinds is not None and not isinstance(event, kinds):
                continue
            try:
                listener(event)
            except Exception:
                log.failure("event listener failed on {event}", event=event)
