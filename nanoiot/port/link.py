"""The session's side of the device port: what a session reports to its device actor.

``attach(device, session, exclusive) -> DeviceLink`` is the only call a transport makes to reach a device; every
later report goes through the returned link, which knows the session and always reaches the device's live actor
(a passivated actor's successor, or, in a cluster, nothing but this node's). The reports are one-way: a session
never waits for the actor, and a report for a device whose actor has gone is dropped.

``answered`` and ``called`` take an optional ``done``: called once the actor has handled the report (or dropped
it), so that a transport can acknowledge a device's message only then and stop reading a device whose reports pile
up (MQTT's bounded inbound path, ``nanoiot/transports/mqtt/flow.py``). A link that delivers nowhere calls it at once.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

from nanoiot.persistence.records import Device
from nanoiot.port.session import DeviceSession


#: Called (no arguments) once the actor has handled a report; None: nobody waits for that.
Done = Optional[Callable[[], None]]


class DeviceLink(Protocol):
    """One session's line to its device actor."""

    def subscribed(self, one_shot: bool = False) -> None:
        """The session wants commands (MQTT SUBSCRIBE, a CoAP observe, an HTTP long poll when ``one_shot``)."""

    def unsubscribed(self) -> None:
        """The session no longer wants commands (MQTT UNSUBSCRIBE)."""

    def acked(self, request_id: int) -> None:
        """The device acknowledged command ``request_id`` (PUBACK, CoAP ACK)."""

    def answered(self, request_id: int, payload: bytes, done: Done = None) -> None:
        """The device answered command ``request_id`` with ``payload`` (raw; the actor parses it)."""

    def called(self, request_id: int, payload: bytes, done: Done = None) -> None:
        """The device called the server (a device-to-server RPC); the answer comes back through ``send_reply``."""

    def closed(self) -> None:
        """The session ended (connection lost, poll answered); the actor forgets it."""


#: How a transport attaches a session: (device, session, exclusive) -> its link. ``exclusive``: a newer session of
#: the same transport replaces an older one (an MQTT reconnect); HTTP polls and CoAP exchanges attach non-exclusively.
Attach = Callable[[Device, DeviceSession, bool], DeviceLink]


class NoLink:
    """The link of a session that is not attached (yet, or any more): reports go nowhere."""

    __slots__ = ()

    def subscribed(self, one_shot: bool = False) -> None:
        pass

    def unsubscribed(self) -> None:
        pass

    def acked(self, request_id: int) -> None:
        pass

    def answered(self, request_id: int, payload: bytes, done: Done = None) -> None:
        if done is not None:
            done()

    def called(self, request_id: int, payload: bytes, done: Done = None) -> None:
        if done is not None:
            done()

    def closed(self) -> None:
        pass


NO_LINK: Any = NoLink()
