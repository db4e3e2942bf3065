"""Where the Deferreds of actor replies are made and fired: nowhere else.

An actor message that wants an answer carries a :class:`ReplyTo` (a node name and a correlation id), which is plain
data: the same message can reach a local actor or travel to another node. The caller holds the Deferred that
:meth:`Replies.expect` made; the actor answers by address with :meth:`Replies.answer`, and an address of another
node is handed to ``remote`` (the cluster router) instead of being fired here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

log = Logger(namespace="nanoiot.actors")


# Not frozen, for the cost of a frozen __init__ (one per call), yet hashed by its fields as before (unsafe_hash):
# the cluster keys its routed calls by it. Never changed once made.
@dataclass(slots=True, unsafe_hash=True)
class ReplyTo:
    """Where an answer goes: ``node`` ("" or this node's name for a local caller) and the caller's correlation."""

    node: str
    correlation: int


#: Sends an answer to a caller on another node: (address, value, error) with exactly one of value/error meaningful.
RemoteReply = Callable[[ReplyTo, Any, "BaseException | None"], None]


class Replies:
    """The callers waiting for actors' answers on this node, by correlation id."""

    def __init__(self, node: str = "") -> None:
        self.node = node
        self._waiting: dict[int, Deferred[Any]] = {}
        self._ids = itertools.count(1)
        #: Set by the cluster: how answers for callers on other nodes leave this one.
        self.remote: RemoteReply | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def expect(self) -> tuple[ReplyTo, Deferred[Any]]:
        """A new address and the Deferred its answer fires; cancelling the Deferred forgets the caller."""
        correlation = next(self._ids)
        d: Deferred[Any] = Deferred(lambda _: self._waiting.pop(correlation, None))
        self._waiting[correlation] = d
        return ReplyTo(self.node, correlation), d

    def is_local(self, reply_to: ReplyTo) -> bool:
        return reply_to.node == self.node

    def waiting(self, reply_to: ReplyTo) -> bool:
        """Whether anybody still waits at this address (a local caller may have gone away; a remote one is assumed
        to wait until its own deadline)."""
        if reply_to.node != self.node:
            return True
        return reply_to.correlation in self._waiting

    def answer(self, reply_to: ReplyTo, value: Any) -> None:
        if reply_to.node != self.node:
            self._send_remote(reply_to, value, None)
            return
        d = self._waiting.pop(reply_to.correlation, None)
        if d is not None:
            d.callback(value)

    def fail(self, reply_to: ReplyTo, error: BaseException) -> None:
        if reply_to.node != self.node:
            self._send_remote(reply_to, None, error)
            return
        d = self._waiting.pop(reply_to.correlation, None)
        if d is not None:
            d.errback(error)

    def _send_remote(self, reply_to: ReplyTo, value: Any, error: BaseException | None) -> None:
        if self.remote is None:
            log.warn("answer for {node} dropped: this node is not in a cluster", node=reply_to.node)
            return
        self.remote(reply_to, value, error)
