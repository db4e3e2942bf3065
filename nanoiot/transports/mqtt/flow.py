"""A connection's bounded inbound path: a device's messages are read, handled and acknowledged in step.

A PUBLISH that the device actor must see (an answer to a command, a device-to-server call) is handed over with a
``done`` that the actor calls once it has handled (or dropped) it; only then is its PUBACK (PUBREC at QoS 2) written.
Messages the transport handles by itself (telemetry, attributes: an RPC server has no use for them) are handled at
once, but their acknowledgements keep the order the PUBLISHes came in (MQTT 4.6: PUBACKs in receive order), so they
may wait behind a message the actor has not handled yet.

The :class:`InboundWindow` counts what was handed over and not yet handled, in messages and in bytes, per
connection; past either bound the connection stops reading its socket (``transport.pauseProducing``) and holds the
packets it had already read, and it reads again once the actor has worked the window down to half. So a device that
sends faster than its actor handles fills its own TCP window, not the server's memory: the server's memory per
device is the window plus one socket read. One MQTT connection is one device (a reconnect replaces the older
connection), so the bounds per connection are the bounds per device; a gateway's sub-devices share their gateway's.

Before 2026-12 the PUBACK was written as soon as a message was decoded and the actor's mailbox took everything a
flood could send: RSS grew 4.5-8.6 MB/s under 32 flooding clients (issue 11, issue 12).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

__all__ = ["InboundWindow"]


class _Entry:
    """One acknowledgement waiting for its message to be handled; called (as the report's ``done``) when it is."""

    __slots__ = ("window", "qos", "packet_id", "size", "handled")

    def __init__(self, window: InboundWindow | None, qos: int, packet_id: int, size: int, handled: bool) -> None:
        self.window = window
        self.qos = qos
        self.packet_id = packet_id
        self.size = size
        self.handled = handled

    def __call__(self) -> None:
        window = self.window
        if window is None or self.handled:
            return  # called twice, or the connection is gone: nothing to acknowledge any more
        self.handled = True
        self.window = None
        window._handled(self)


class InboundWindow:
    """Messages of one connection handed to the actor and not yet handled, and the acknowledgements behind them."""

    __slots__ = ("max_messages", "max_bytes", "messages", "bytes", "handled", "_queue", "_ack", "_drained", "closed")

    def __init__(self, max_messages: int, max_bytes: int, ack: Callable[[int, int], None],
                 drained: Callable[[], None]) -> None:
        """``ack(qos, packet_id)`` writes a PUBACK (qos 1) or PUBREC (qos 2); ``drained()`` is called whenever a
        handled message leaves the window at most half full."""
        self.max_messages = max(1, max_messages)
        self.max_bytes = max(1, max_bytes)
        #: Messages handed to the actor and not handled yet, and their topic and payload bytes.
        self.messages = 0
        self.bytes = 0
        #: Messages handled since the connection began (a window that stops moving is stuck).
        self.handled = 0
        #: Acknowledgements in the order their PUBLISHes came: the oldest goes out once its message is handled.
        self._queue: deque[_Entry] = deque()
        self._ack = ack
        self._drained = drained
        self.closed = False

    @property
    def full(self) -> bool:
        """No more may be read until the actor has handled some (a bound is reached)."""
        return self.messages >= self.max_messages or self.bytes >= self.max_bytes

    @property
    def waiting(self) -> int:
        """Acknowledgements not written yet (including those handled but queued behind an unhandled one)."""
        return len(self._queue)

    def hand_over(self, qos: int, packet_id: int, size: int) -> Callable[[], None]:
        """A message goes to the actor: the ``done`` to pass along with it (acknowledged once that is called)."""
        entry = _Entry(self, qos, packet_id, size, False)
        self.messages += 1
        self.bytes += size
        self._queue.append(entry)
        return entry

    def handled_now(self, qos: int, packet_id: int) -> None:
        """A message the transport handled itself: acknowledged at once, or after the ones still ahead of it."""
        if not qos:
            return
        if not self._queue:
            self._ack(qos, packet_id)
            return
        self._queue.append(_Entry(None, qos, packet_id, 0, True))

    def _handled(self, entry: _Entry) -> None:
        self.handled += 1
        self.messages -= 1
        self.bytes -= entry.size
        if self.closed:
            return
        queue = self._queue
        ack = self._ack
        while queue and queue[0].handled:
            head = queue.popleft()
            if head.qos:
                ack(head.qos, head.packet_id)
        if self.messages * 2 <= self.max_messages and self.bytes * 2 <= self.max_bytes:
            self._drained()

    def close(self) -> None:
        """The connection is gone: late ``done`` calls change nothing, and nothing is kept alive for them."""
        self.closed = True
        for entry in self._queue:
            entry.window = None
        self._queue.clear()
        self.messages = self.bytes = 0
        # They are the connection's bound methods: dropping them leaves no cycle for the full collector to find.
        self._ack = _ignore_ack
        self._drained = _nothing


def _ignore_ack(qos: int, packet_id: int) -> None:
    pass


def _nothing() -> None:
    pass
