"""Device id -> actor: actors are created on demand (a device connects or a command targets it) and passivated
when idle. The directory is a plain dict on the reactor thread, never Pykka's global registry scan."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from pykka import ActorDeadError, ActorRef
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from nanoiot.actors.device import ActorContext, ActorSettings, DeviceActor, RequestIds, StatusListener
from nanoiot.actors.runtime import stop_deferred
from nanoiot.persistence.records import Device
from nanoiot.rpc.server_methods import ServerMethods

log = Logger(namespace="nanoiot.actors")


class DeviceMailbox:
    """What a session holds to reach its device: always the live actor, never a stale ref of one that was
    passivated (a session's later messages would otherwise be lost)."""

    __slots__ = ("directory", "device")

    def __init__(self, directory: DeviceDirectory, device: Device) -> None:
        self.directory = directory
        self.device = device

    def tell(self, message: Any) -> None:
        self.directory.tell(self.device, message)


class DeviceDirectory(Service):
    name = "device-directory"

    def __init__(
        self,
        clock: IReactorTime,
        settings: ActorSettings,
        server_methods: ServerMethods | None = None,
        status_listener: StatusListener | None = None,
        journal: Any = None,
    ) -> None:
        self.clock = clock
        self.context = ActorContext(self, clock, settings, server_methods or ServerMethods(), status_listener,
                                    journal)
        self._actors: dict[UUID, ActorRef[DeviceActor]] = {}

    @property
    def settings(self) -> ActorSettings:
        return self.context.settings

    @property
    def request_ids(self) -> RequestIds:
        return self.context.ids

    def __len__(self) -> int:
        return len(self._actors)

    def __contains__(self, device_id: UUID) -> bool:
        return device_id in self._actors

    def ref_for(self, device: Device) -> ActorRef[DeviceActor]:
        ref = self._actors.get(device.id)
        if ref is None or not ref.is_alive():
            ref = DeviceActor.start(device, self.context)
            self._actors[device.id] = ref
        return ref

    def tell(self, device: Device, message: Any) -> ActorRef[DeviceActor]:
        """Deliver to the device's actor, starting one if needed; a dying actor is replaced, not an error."""
        for _ in range(3):
            ref = self.ref_for(device)
            try:
                ref.tell(message)
                return ref
            except ActorDeadError:
                self._actors.pop(device.id, None)
        raise ActorDeadError(f"no live actor for device {device.id}")

    def attach(self, device: Device, message: Any) -> DeviceMailbox:
        """Deliver an attach message and return the mailbox the session should use from now on."""
        self.tell(device, message)
        return DeviceMailbox(self, device)

    def existing(self, device_id: UUID) -> ActorRef[DeviceActor] | None:
        return self._actors.get(device_id)

    def forget(self, device_id: UUID, ref: ActorRef[DeviceActor]) -> None:
        if self._actors.get(device_id) is ref:
            del self._actors[device_id]

    def stopService(self) -> Deferred:
        super().stopService()
        refs = list(self._actors.values())
        self._actors.clear()
        if not refs:
            return succeed(None)
        return gatherResults([stop_deferred(ref) for ref in reversed(refs)]).addCallback(lambda _: None)
