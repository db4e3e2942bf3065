"""An in-process event bus: RPC status changes are published here for whoever listens (tests, WebSocket
subscribers, webhooks). Listeners run synchronously on the reactor thread and must not block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from twisted.logger import Logger

from nanoiot.persistence.records import RpcRecord
from nanoiot.rpc.model import RpcStatus

log = Logger(namespace="nanoiot.events")


@dataclass(frozen=True, slots=True)
class RpcStatusEvent:
    """``RPC_<STATUS>``: one status change of one command; ``record`` is the command as it stands now."""

    record: RpcRecord
    persistent: bool

    @property
    def type(self) -> str:
        return f"RPC_{self.record.status.value}"

    @property
    def status(self) -> RpcStatus:
        return self.record.status


Listener = Callable[[Any], None]


class EventBus:
    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Returns the function that unsubscribes."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    @property
    def has_listeners(self) -> bool:
        return bool(self._listeners)

    def publish(self, event: Any) -> None:
        for listener in tuple(self._listeners):
            try:
                listener(event)
            except Exception:
                log.failure("event listener failed on {event}", event=event)
