"""Which WebSocket wants which event: one listener on the server's event stream, one index for every socket.

A socket subscribes to single devices (``deviceId``) or to every device it may see (``*``: a tenant's devices for a
tenant administrator, its customer's devices for a customer user). An event is looked up by its device, its tenant
and its (tenant, customer) — three dictionary reads whatever the number of sockets — encoded to JSON once, and the
same bytes are handed to each subscriber (at most once per socket, however many of its subscriptions match).

The hub listens to the :class:`~nanoiot.commands.events.EventStream` only while it has a subscription: device actors
skip building events nobody listens to. Authorization is the caller's (``web/ws.py``): the hub only indexes.

In a cluster the events of devices held by other nodes arrive as :class:`~nanoiot.cluster.events.RemoteEvent`
(``cluster/events.py``) and are delivered the same way.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Callable, Hashable, Iterable, Protocol
from uuid import UUID

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from nanoiot.cluster.events import RemoteEvent
from nanoiot.commands.events import DeviceOffline, DeviceOnline, EventStream, RpcStatusChanged
from nanoiot.web.shapes import rpc_json

log = Logger(namespace="nanoiot.ws")

#: The subscription to every device a socket may see.
ALL = "*"


class Subscriber(Protocol):
    def deliver(self, frame: bytes) -> None:
        """One event frame (UTF-8 JSON text); must not raise and must not block."""


class Devices(Protocol):
    def cached_device(self, device_id: UUID) -> Any: ...

    def get_device(self, device_id: UUID) -> Deferred: ...


def device_key(device_id: UUID) -> tuple[str, UUID]:
    return ("d", device_id)


def tenant_key(tenant_id: UUID) -> tuple[str, UUID]:
    return ("t", tenant_id)


def customer_key(tenant_id: UUID, customer_id: UUID) -> tuple[str, UUID, UUID]:
    return ("c", tenant_id, customer_id)


def event_frame(event: Any, node: str | None = None) -> bytes | None:
    """The frame a subscriber gets for ``event``; None for an event that is not sent to WebSocket clients."""
    if isinstance(event, RpcStatusChanged):
        body: dict[str, Any] = {"event": event.type, "deviceId": str(event.record.device_id),
                                "rpc": rpc_json(event.record), "persistent": event.persistent}
    elif isinstance(event, (DeviceOnline, DeviceOffline)):
        body = {"event": event.type, "deviceId": str(event.device_id), "transport": event.transport,
                "node": event.node or node}
    else:
        return None
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, default=str).encode()


class EventHub:
    def __init__(self, events: EventStream, devices: Devices) -> None:
        self.events = events
        self.devices = devices
        self._index: dict[Hashable, set[Subscriber]] = {}
        #: (subscriber, key) pairs per tenant: which tenants this node has subscribers for (cluster interest).
        self._tenants: Counter[UUID] = Counter()
        #: Customer-wide (``*``) subscriptions per tenant: only then does an RPC event need its device's customer.
        self._customer_wide: Counter[UUID] = Counter()
        self._subscriptions = 0
        self._unsubscribe: Callable[[], None] | None = None
        #: Events waiting for their device's customer (not in the device cache), in order, per device.
        self._waiting: dict[UUID, list[tuple[Any, str | None, UUID]]] = {}
        #: Called when a tenant gets its first subscription here (the cluster relay announces this node's interest
        #: at once rather than with the next heartbeat).
        self.on_active: Callable[[], None] | None = None
        self.delivered = 0

    # --- the index ------------------------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self._subscriptions > 0

    def tenants(self) -> list[UUID]:
        """The tenants this node's sockets subscribed to something of."""
        return list(self._tenants)

    def subscriber_count(self) -> int:
        return self._subscriptions

    def add(self, subscriber: Subscriber, key: Hashable, tenant_id: UUID) -> bool:
        """Index ``subscriber`` under ``key`` (see ``device_key``, ``tenant_key``, ``customer_key``); False if it
        already was."""
        subscribers = self._index.setdefault(key, set())
        if subscriber in subscribers:
            return False
        subscribers.add(subscriber)
        self._tenants[tenant_id] += 1
        if key[0] == "c":  # type: ignore[index]
            self._customer_wide[tenant_id] += 1
        self._subscriptions += 1
        if self._subscriptions == 1:
            self._unsubscribe = self.events.subscribe(self._on_event)
        if self._tenants[tenant_id] == 1 and self.on_active is not None:
            try:
                self.on_active()
            except Exception:
                log.failure("announcing WebSocket interest failed")
        return True

    def remove(self, subscriber: Subscriber, key: Hashable, tenant_id: UUID) -> bool:
        subscribers = self._index.get(key)
        if subscribers is None or subscriber not in subscribers:
            return False
        subscribers.discard(subscriber)
        if not subscribers:
            del self._index[key]
        _decrement(self._tenants, tenant_id)
        if key[0] == "c":  # type: ignore[index]
            _decrement(self._customer_wide, tenant_id)
        self._subscriptions -= 1
        if self._subscriptions == 0 and self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        return True

    def remove_all(self, subscriber: Subscriber, keys: Iterable[tuple[Hashable, UUID]]) -> None:
        for key, tenant_id in list(keys):
            self.remove(subscriber, key, tenant_id)

    # --- dispatch -------------------------------------------------------------------------------------------------

    def _on_event(self, event: Any) -> None:
        node = None
        customer_hint = None
        if isinstance(event, RemoteEvent):
            node, customer_hint, event = event.node, event.customer_id, event.event
        if isinstance(event, RpcStatusChanged):
            device_id, tenant_id = event.record.device_id, event.record.tenant_id
            if device_id in self._waiting:  # keep this device's events in order behind the lookup
                self._waiting[device_id].append((event, node, tenant_id))
                return
            customer_id = None
            if self._customer_wide.get(tenant_id):
                device = self.devices.cached_device(device_id)
                customer_id = device.customer_id if device is not None else customer_hint
                if customer_id is None:
                    self._look_up_customer(event, node, device_id, tenant_id)
                    return
            self._dispatch(event, node, device_id, tenant_id, customer_id)
        elif isinstance(event, (DeviceOnline, DeviceOffline)):
            self._dispatch(event, node, event.device_id, event.tenant_id, event.customer_id)

    def _look_up_customer(self, event: Any, node: str | None, device_id: UUID, tenant_id: UUID) -> None:
        self._waiting[device_id] = [(event, node, tenant_id)]

        def found(device: Any) -> None:
            waiting = self._waiting.pop(device_id, [])
            customer_id = device.customer_id if device is not None else None
            for queued, origin, tenant in waiting:
                self._dispatch(queued, origin, device_id, tenant, customer_id)

        def failed(failure: Any) -> None:
            log.warn("ws: device {device_id} not found for its events: {error}", device_id=device_id,
                     error=failure.getErrorMessage())
            found(None)

        self.devices.get_device(device_id).addCallbacks(found, failed)

    def recipients(self, device_id: UUID, tenant_id: UUID, customer_id: UUID | None) -> set[Subscriber]:
        index = self._index
        found: set[Subscriber] = set()
        for key in (device_key(device_id), tenant_key(tenant_id),
                    customer_key(tenant_id, customer_id) if customer_id is not None else None):
            if key is not None:
                subscribers = index.get(key)
                if subscribers:
                    found.update(subscribers)
        return found

    def _dispatch(self, event: Any, node: str | None, device_id: UUID, tenant_id: UUID,
                  customer_id: UUID | None) -> None:
        recipients = self.recipients(device_id, tenant_id, customer_id)
        if not recipients:
            return
        frame = event_frame(event, node)
        if frame is None:
            return
        for subscriber in recipients:  # a copy: a subscriber may leave (too slow) while this runs
            try:
                subscriber.deliver(frame)
                self.delivered += 1
            except Exception:
                log.failure("ws: delivering an event failed")


def _decrement(counter: Counter[UUID], key: UUID) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
