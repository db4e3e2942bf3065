"""The actor side of the device port: the :class:`~nanoiot.port.link.DeviceLink` a session gets from ``attach``.

The only place that turns a session's reports into device-actor messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nanoiot.actors import messages as m
from nanoiot.persistence.records import Device
from nanoiot.port.link import Done

if TYPE_CHECKING:
    from nanoiot.actors.directory import DeviceDirectory


class ActorLink:
    """One session's line to its device: always reaches the device's live actor, never a stale ref of one that was
    passivated (the session's later reports would otherwise be lost)."""

    __slots__ = ("directory", "device", "session_id")

    def __init__(self, directory: DeviceDirectory, device: Device, session_id: int) -> None:
        self.directory = directory
        self.device = device
        self.session_id = session_id

    def subscribed(self, one_shot: bool = False) -> None:
        self.directory.tell_local(self.device, m.SubscribeCommands(self.session_id, one_shot))

    def unsubscribed(self) -> None:
        self.directory.tell_local(self.device, m.UnsubscribeCommands(self.session_id))

    def acked(self, request_id: int) -> None:
        self.directory.tell_local(self.device, m.CommandAcked(self.session_id, request_id))

    def answered(self, request_id: int, payload: bytes, done: Done = None) -> None:
        self.directory.tell_local(self.device, m.CommandAnswered(self.session_id, request_id, payload, done))

    def called(self, request_id: int, payload: bytes, done: Done = None) -> None:
        self.directory.tell_local(self.device, m.DeviceCall(self.session_id, request_id, payload, done))

    def closed(self) -> None:
        self.directory.tell_local(self.device, m.DetachSession(self.session_id))
