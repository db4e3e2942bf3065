"""Device id -> actor: actors are created on demand (a device connects or a command targets it) and passivated
when idle. The directory is a plain dict on the reactor thread, never Pykka's global registry scan.

It is also the local half of the device port: ``attach`` hands a session its link, ``tell`` reaches a device's
actor. In a cluster, :class:`nanoiot.cluster.directory.ClusterDirectory` wraps it and decides which node's actor a
message is for; what reaches this class is always for an actor of this node.
"""

from __future__ import annotations

from typing import Any, Callable
from uuid import UUID

from pykka import ActorDeadError, ActorRef
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from nanoiot.actors import messages as m
from nanoiot.actors.device import ActorContext, ActorSettings, DeviceActor, RequestIds
from nanoiot.actors.link import ActorLink
from nanoiot.actors.replies import Replies
from nanoiot.actors.runtime import Dispatcher, install_fast_registry, stop_deferred
from nanoiot.commands.events import EventStream
from nanoiot.commands.server_methods import ServerMethods
from nanoiot.persistence.records import Device
from nanoiot.port.link import DeviceLink
from nanoiot.port.session import DeviceSession

log = Logger(namespace="nanoiot.actors")


class DeviceDirectory(Service):
    name = "device-directory"
    #: Every device's actor is on this node (no cluster): stored commands can be handed to actors directly.
    holds_every_device = True

    def __init__(
        self,
        clock: IReactorTime,
        settings: ActorSettings,
        server_methods: ServerMethods | None = None,
        events: EventStream | None = None,
        journal: Any = None,
        dispatcher: Dispatcher | None = None,
        replies: Replies | None = None,
        node: str = "",
    ) -> None:
        install_fast_registry()  # Pykka's registry as a dict: starting and stopping actors stays O(1)
        self.clock = clock
        self.context = ActorContext(self, clock, settings, server_methods or ServerMethods(), dispatcher, events,
                                    journal, replies if replies is not None else Replies(node), node=node)
        self._actors: dict[UUID, ActorRef[DeviceActor]] = {}
        #: Where messages for a device this node does not hold go (the cluster sets it); None: a single node.
        self.route: Callable[[Device, Any], None] | None = None
        #: Called with a device whose actor retired with no successor here (the cluster lets the device go).
        self.on_actor_retired: Callable[[Device], None] | None = None

    @property
    def settings(self) -> ActorSettings:
        return self.context.settings

    @property
    def request_ids(self) -> RequestIds:
        return self.context.ids

    @property
    def replies(self) -> Replies:
        return self.context.replies

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

    def tell(self, device: Device, message: Any) -> None:
        """Deliver to the device's actor wherever it lives (in a cluster, ``route`` decides)."""
        if self.route is not None:
            self.route(device, message)
        else:
            self.tell_local(device, message)

    def tell_local(self, device: Device, message: Any) -> ActorRef[DeviceActor]:
        """Deliver to this node's actor of the device, starting one if needed; a dying actor is replaced."""
        ref = self._actors.get(device.id)
        if ref is not None and not ref.actor_stopped._set:  # type: ignore[attr-defined]  # runtime's _StoppedFlag
            # The common case, one dict look-up (a command, a PUBACK: every message of a bulk RPC comes this way),
            # and the message straight into the mailbox: ref.tell would check the flag again.
            ref.actor_inbox.tell(message)  # type: ignore[attr-defined]  # runtime's _Mailbox
            return ref
        for _ in range(3):
            ref = self.ref_for(device)
            try:
                ref.tell(message)
                return ref
            except ActorDeadError:
                self._actors.pop(device.id, None)
        raise ActorDeadError(f"no live actor for device {device.id}")

    def attach(self, device: Device, session: DeviceSession, exclusive: bool = True) -> DeviceLink:
        """The device port's way in for a session: its actor lives here, on the node holding the session."""
        self.tell_local(device, m.AttachSession(session, exclusive))
        return ActorLink(self, device, session.session_id)

    def redeliver(self, device: Device, message: Any) -> None:
        """Mail of an actor that retired goes to the device's next actor: commands wherever the device is now
        (``tell``), a session's reports to this node's actor (its session is here)."""
        if isinstance(message, (m.SubmitRpc, m.DeleteRpc)):
            self.tell(device, message)
        else:
            self.tell_local(device, message)

    def retired(self, device: Device) -> None:
        """An actor retired and handed its mail on; if no successor started here, the node lets the device go."""
        if device.id not in self._actors and self.on_actor_retired is not None:
            self.on_actor_retired(device)

    def existing(self, device_id: UUID) -> ActorRef[DeviceActor] | None:
        return self._actors.get(device_id)

    def forget(self, device: Device, ref: ActorRef[DeviceActor]) -> None:
        if self._actors.get(device.id) is ref:
            del self._actors[device.id]

    def stopService(self) -> Deferred:
        super().stopService()
        refs = list(self._actors.values())
        self._actors.clear()
        if not refs:
            return succeed(None)
        return gatherResults([stop_deferred(ref) for ref in reversed(refs)]).addCallback(lambda _: None)
