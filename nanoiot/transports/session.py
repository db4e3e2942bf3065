"""The one interface every transport's session offers to its device actor.

The actor calls these methods on the reactor thread; a session reports back by telling its actor the messages in
``nanoiot.actors.messages`` (acked, answered, closed). A new transport is a new folder that implements this.
"""

from __future__ import annotations

import enum
import itertools
from typing import Any, Protocol

from pykka import ActorDeadError
from twisted.logger import Logger

log = Logger(namespace="nanoiot.transports")

_session_ids = itertools.count(1)


def next_session_id() -> int:
    """Process-wide unique session ids, so an actor can tell a reconnect from the session it replaces."""
    return next(_session_ids)


class Delivery(enum.Enum):
    """What writing a command achieved, as far as the transport can tell at once."""

    #: Written; the device's acknowledgement (PUBACK, CoAP ACK) will be reported later.
    AWAITING_ACK = "awaiting_ack"
    #: Written and nothing more will come (MQTT QoS 0, an HTTP long-poll answer): counts as delivered.
    DELIVERED = "delivered"
    #: The session could not take it (closed meanwhile, too large for the device): try another time.
    NOT_SENT = "not_sent"


class DeviceSession(Protocol):
    session_id: int
    transport: str

    def send_command(self, request_id: int, method: str, params: Any, qos: int) -> Delivery:
        """Write a server-side command to the device."""

    def send_reply(self, request_id: int, body: bytes) -> None:
        """Write the server's answer to a device-to-server call."""

    def close(self, reason: str) -> None:
        """Drop the connection (device deleted, replaced by a newer session)."""


def tell_actor(ref: Any, message: Any) -> bool:
    """Tell a device actor; a session or timer may outlive its actor for a moment (passivation, shutdown), so a
    message to a stopped actor is dropped, not an error. Returns whether it was delivered."""
    if ref is None:
        return False
    try:
        ref.tell(message)
        return True
    except ActorDeadError:
        log.debug("message for a stopped device actor dropped: {kind}", kind=type(message).__name__)
        return False
