"""The one interface every transport's session offers to its device actor.

The actor calls these methods on the reactor thread; a session reports back through the
:class:`~nanoiot.port.link.DeviceLink` that ``attach`` returned (acked, answered, called, closed). A new transport is
a new folder under ``transports/`` that implements this.
"""

from __future__ import annotations

import enum
import itertools
from typing import Any, Protocol



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
