"""Node-to-node messages behind one small interface, so that the transport can change: PostgreSQL LISTEN/NOTIFY
here (no extra moving part: the cluster already shares the database), NATS request/reply for large clusters.

Delivery is at most once and only to live listeners: every caller of ``send`` has its own deadline.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from nanoiot.cluster import codec
from nanoiot.cluster.notify import NotifyBus

log = Logger(namespace="nanoiot.cluster")

#: Every node listens here for the cluster's notices (claims, cache invalidations).
BROADCAST_CHANNEL = "nanoiot_cluster"

Receiver = Callable[[dict[str, Any]], None]


class Router(Protocol):
    node: str

    def start(self, receive: Receiver) -> Deferred[None]:
        """Start listening; ``receive`` gets every envelope for this node and every broadcast of another node."""

    def send(self, node: str, envelope: dict[str, Any]) -> bool:
        """Queue an envelope for one node; False when it was refused (the outbound queue is full)."""

    def broadcast(self, envelope: dict[str, Any]) -> bool:
        """Queue an envelope for every other node."""

    def stop(self) -> Deferred[None]: ...


def node_channel(node: str) -> str:
    """A node's channel: a fixed-length name (PostgreSQL truncates identifiers past 63 bytes)."""
    return "nanoiot_" + hashlib.sha1(node.encode()).hexdigest()[:24]


class NotifyRouter:
    """Routing over PostgreSQL LISTEN/NOTIFY: one channel per node plus one for broadcasts."""

    def __init__(self, bus: NotifyBus, node: str) -> None:
        self.bus = bus
        self.node = node
        self.channel = node_channel(node)
        self._receive: Receiver | None = None
        self.received = 0
        self.sent = 0
        self.broadcasts = 0

    def start(self, receive: Receiver) -> Deferred[None]:
        self._receive = receive
        d = self.bus.start()
        d.addCallback(lambda _: gatherResults([self.bus.listen(self.channel, self._on_payload),
                                               # every node reads a large broadcast: the row is purged later
                                               self.bus.listen(BROADCAST_CHANNEL, self._on_payload, shared=True)]))
        return d.addCallback(lambda _: None)

    def _on_payload(self, payload: str) -> None:
        try:
            envelope = codec.loads(payload)
        except codec.CodecError as exc:
            log.warn("cluster: unreadable message dropped: {error}", error=exc)
            return
        if envelope.get("from") == self.node and envelope.get("b"):
            return  # our own broadcast
        self.received += 1
        assert self._receive is not None
        self._receive(envelope)

    def send(self, node: str, envelope: dict[str, Any]) -> bool:
        envelope["from"] = self.node
        self.sent += 1
        return self.bus.notify(node_channel(node), codec.dumps(envelope))

    def broadcast(self, envelope: dict[str, Any]) -> bool:
        envelope["from"] = self.node
        envelope["b"] = 1
        self.broadcasts += 1
        return self.bus.notify(BROADCAST_CHANNEL, codec.dumps(envelope))

    def stop(self) -> Deferred[None]:
        return self.bus.stop()
