"""The one typed event stream of the command service: devices going online and offline, every status change of
every command (lightweight ones too), and device-to-server calls.

Listeners run synchronously on the reactor thread and must not block. WebSocket clients, rule chains, metrics and
tests subscribe here; in a cluster each node publishes the events of the devices it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
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
#: Counts a status change without an event object: (status, persistent, created_time epoch ms).
Tally = Callable[[RpcStatus, bool, int], None]


#: ``EventStream._status_listened``: which status changes some listener takes (ordered: max() of the listeners').
_NONE, _PERSISTENT, _EVERY = 0, 1, 2
#: ``EventStream._targets``' key for the status changes of lightweight commands.
_LIGHTWEIGHT = object()


class EventStream:
    """Listeners say which kinds of event they want, so that an actor builds an event (a record per status change,
    on the hot path) only when somebody wants that kind.

    A *tally* (the metrics) sees every RpcStatusChanged as three plain values through :meth:`status_changed`: no
    event object is made for it (four status changes per command)."""

    def __init__(self) -> None:
        #: (listener, kinds, persistent only).
        self._listeners: list[tuple[Listener, tuple[type, ...] | None, bool]] = []
        self._wanted: dict[type, bool] = {}
        self._tallies: list[Tally] = []
        #: Event class (``_LIGHTWEIGHT``: a lightweight command's RpcStatusChanged) -> the listeners that take it, in
        #: order (cached until the listeners change).
        self._targets: dict[Any, tuple[Listener, ...]] = {}
        #: Which status changes a listener (not a tally) takes: ``_EVERY``, ``_PERSISTENT`` or ``_NONE``; None: not
        #: known since the listeners changed.
        self._status_listened: int | None = None

    def tally(self, count: Tally) -> Callable[[], None]:
        """``count(status, persistent, created_time)`` for every status change of every command, published by
        :meth:`status_changed` or :meth:`publish` alike. Returns the function that stops it."""
        self._tallies.append(count)
        self._changed()

        def stop() -> None:
            if count in self._tallies:
                self._tallies.remove(count)
                self._changed()

        return stop

    def _changed(self) -> None:
        self._wanted.clear()
        self._targets.clear()
        self._status_listened = None

    def status_changed(self, status: RpcStatus, created_time: int, persistent: bool,
                       build: Callable[..., RpcRecord], *args: Any) -> None:
        """A device actor's status change: counted by the tallies, and published as a lazy
        :class:`RpcStatusChanged` (``build(*args)`` makes its record) only when a listener takes it."""
        for count in self._tallies:
            try:
                count(status, persistent, created_time)
            except Exception:
                log.failure("status tally failed on {status}", status=status)
        listened = self._status_listened
        if listened is None:
            listened = self._status_listened = max(
                (_PERSISTENT if only_persistent else _EVERY for _, kinds, only_persistent in self._listeners
                 if kinds is None or issubclass(RpcStatusChanged, kinds)), default=_NONE)
        if listened == _EVERY or (persistent and listened == _PERSISTENT):
            self._notify(RpcStatusChanged.lazily(status, created_time, persistent, partial(build, *args)))

    def subscribe(self, listener: Listener, kinds: tuple[type, ...] | None = None, *,
                  persistent_only: bool = False) -> Callable[[], None]:
        """``kinds``: the event classes wanted (None: every event). ``persistent_only``: of the status changes, only
        persistent commands' ones (no event is built for a lightweight command's when no other listener takes
        them). Returns the function that unsubscribes."""
        entry = (listener, kinds, persistent_only)
        self._listeners.append(entry)
        self._changed()

        def unsubscribe() -> None:
            if entry in self._listeners:
                self._listeners.remove(entry)
                self._changed()

        return unsubscribe

    @property
    def has_listeners(self) -> bool:
        return bool(self._listeners) or bool(self._tallies)

    def wants(self, kind: type) -> bool:
        """Whether some listener (or, for status changes, a tally) takes events of ``kind`` (cached until the
        listeners change)."""
        wanted = self._wanted.get(kind)
        if wanted is None:
            wanted = any(kinds is None or issubclass(kind, kinds) for _, kinds, _ in self._listeners)
            if not wanted and self._tallies and issubclass(kind, RpcStatusChanged):
                wanted = True
            self._wanted[kind] = wanted
        return wanted

    def publish(self, event: Event) -> None:
        if self._tallies and type(event) is RpcStatusChanged:
            for count in self._tallies:
                try:
                    count(event.status, event.persistent, event.created_time)
                except Exception:
                    log.failure("status tally failed on {event}", event=event)
        self._notify(event)

    def _notify(self, event: Event) -> None:
        kind = type(event)
        lightweight = kind is RpcStatusChanged and not event.persistent  # type: ignore[union-attr]
        key: Any = _LIGHTWEIGHT if lightweight else kind
        targets = self._targets.get(key)
        if targets is None:
            targets = self._targets[key] = tuple(
                listener for listener, kinds, only_persistent in self._listeners
                if (kinds is None or issubclass(kind, kinds)) and not (only_persistent and key is _LIGHTWEIGHT))
        for listener in targets:
            try:
                listener(event)
            except Exception:
                log.failure("event listener failed on {event}", event=event)
