"""Which devices have a session on this node, and since when: ThingsBoard's ``active``, ``lastConnectTime`` and
``lastDisconnectTime`` (its DeviceInfo and server-scope attributes), from the device events of this node.

In a cluster each node knows the sessions it holds; a device connected to another node reads as not active here
(the device info says which node answered). Bounded by the fleet: one small entry per device seen since start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable
from uuid import UUID

from nanoiot.commands.events import DeviceOffline, DeviceOnline, EventStream


@dataclass(slots=True)
class Presence:
    active: bool
    transport: str
    last_connect_ms: int = 0
    last_disconnect_ms: int = 0


class PresenceBook:
    def __init__(self, clock: Any, node: str = "") -> None:
        self.clock = clock
        self.node = node
        self._devices: dict[UUID, Presence] = {}
        #: Devices with a session, by the transport of the session that brought them online.
        self._counts: dict[str, int] = {}
        self._unsubscribe: Callable[[], None] | None = None

    def start(self, events: EventStream) -> None:
        self._unsubscribe = events.subscribe(self.on_event, (DeviceOnline, DeviceOffline))

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def on_event(self, event: DeviceOnline | DeviceOffline) -> None:
        if event.node not in ("", self.node):
            return
        now = int(self.clock.seconds() * 1000)
        entry = self._devices.get(event.device_id)
        if entry is None:
            entry = self._devices[event.device_id] = Presence(False, event.transport)
        if entry.active:
            self._counts[entry.transport] -= 1
        if isinstance(event, DeviceOnline):
            entry.active, entry.transport, entry.last_connect_ms = True, event.transport, now
            self._counts[entry.transport] = self._counts.get(entry.transport, 0) + 1
        else:
            entry.active, entry.last_disconnect_ms = False, now

    def get(self, device_id: UUID) -> Presence | None:
        return self._devices.get(device_id)

    def active(self, device_id: UUID) -> bool:
        entry = self._devices.get(device_id)
        return entry is not None and entry.active

    def forget(self, device_id: UUID) -> None:
        """A deleted device."""
        entry = self._devices.pop(device_id, None)
        if entry is not None and entry.active:
            self._counts[entry.transport] -= 1

    def by_transport(self) -> dict[str, int]:
        """Devices with a session, counted by the transport of the session that brought them online."""
        return {transport: count for transport, count in self._counts.items() if count}
