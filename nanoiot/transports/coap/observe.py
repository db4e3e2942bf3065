"""Observers (RFC 7641): who registered for a device's commands, and each one's notification state.

An observer is keyed by ``(addr, token)`` (the registration's endpoint and CoAP token, §3.1 / §4.1) and indexed by
device, so that a device has one current observation. Pure state: the server does the sending.

* Observe numbers are 24-bit and strictly increasing per observer, wrapping at 2**24 (coapthon wraps at 65000:
  B4). They are taken when a notification is *sent*, never when it is queued, so they follow the wire order.
* At most one notification is "in flight" per observer: a CON one until its ACK (or RST, or give-up), and any one
  whose remaining Block2 blocks the device has not fetched yet. Later commands wait in a bounded FIFO queue.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Hashable

if TYPE_CHECKING:
    from nanoiot.transports.coap.messages import Address, Outgoing

OBSERVE_MODULUS = 1 << 24
#: Commands waiting behind the one in flight, per observer (the device actor's BURST window is 100).
MAX_QUEUED = 100

ObserverKey = tuple["Address", bytes]


class Observer:
    __slots__ = ("addr", "token", "confirmable", "path", "device_id", "session", "number", "queue", "in_flight",
                 "in_flight_request", "transfer_key", "block_szx")

    def __init__(self, addr: Address, token: bytes, confirmable: bool, path: tuple[str, ...], device_id: Any,
                 session: Any = None, number: int = 0, block_szx: int = 6) -> None:
        self.addr = addr
        self.token = token
        self.confirmable = confirmable
        #: The registration's Uri-Path: Block2 follow-ups of a notification come on it (without Observe).
        self.path = path
        self.device_id = device_id
        self.session = session
        #: The Observe number of the last message sent on this observation.
        self.number = number % OBSERVE_MODULUS
        #: (request id, payload) of commands waiting for the one in flight.
        self.queue: deque[tuple[int, bytes]] = deque()
        #: The CON notification being retransmitted, and the request id it carries.
        self.in_flight: Outgoing | None = None
        self.in_flight_request: int | None = None
        #: The Block2 transfer the device still has to complete before the next notification (its store key).
        self.transfer_key: Hashable | None = None
        #: Block size exponent for notifications (a registration may ask for smaller blocks).
        self.block_szx = block_szx

    @property
    def key(self) -> ObserverKey:
        return (self.addr, self.token)

    def next_number(self) -> int:
        self.number = (self.number + 1) % OBSERVE_MODULUS
        return self.number

    @property
    def busy(self) -> bool:
        return self.in_flight is not None or self.transfer_key is not None

    def holds(self, request_id: int) -> bool:
        return self.in_flight_request == request_id or any(rid == request_id for rid, _ in self.queue)


class ObserveRegistry:
    def __init__(self) -> None:
        self.by_key: dict[ObserverKey, Observer] = {}
        self.by_device: dict[Any, Observer] = {}

    def __len__(self) -> int:
        return len(self.by_key)

    def get(self, addr: Address, token: bytes) -> Observer | None:
        return self.by_key.get((addr, token))

    def for_device(self, device_id: Any) -> Observer | None:
        return self.by_device.get(device_id)

    def add(self, observer: Observer) -> Observer | None:
        """Register; returns an observer this one displaced under the same (addr, token), if any."""
        old = self.by_key.get(observer.key)
        if old is not None and old is not observer:
            self.remove(old)
        self.by_key[observer.key] = observer
        self.by_device[observer.device_id] = observer
        return old if old is not observer else None

    def remove(self, observer: Observer) -> bool:
        removed = False
        if self.by_key.get(observer.key) is observer:
            del self.by_key[observer.key]
            removed = True
        if self.by_device.get(observer.device_id) is observer:
            del self.by_device[observer.device_id]
        return removed

    def all(self) -> list[Observer]:
        return list(self.by_key.values())
