"""Live events across the cluster, for WebSocket subscribers: each node publishes the events of the devices it holds
(``commands/events.py``); a subscriber on node B of a device held by node A needs A's events too.

Relaying every status change of every command to every node would cost the cluster's bus for nothing most of the
time, so it happens only while somebody listens:

- a node with WebSocket subscribers broadcasts ``{"t": "ws-interest", "tenants": [...]}`` at once when its first
  subscription is made and then with each heartbeat;
- a node that heard an interest within ``--dead-after`` broadcasts its own RpcStatusChanged, DeviceOnline and
  DeviceOffline events of those tenants as ``{"t": "event", "e": [event, ...]}`` (the events of a reactor turn
  together, a few KB per envelope);
- a node receiving events republishes them into its own event stream wrapped in :class:`RemoteEvent`, which the
  relay never sends on again (and which the cluster node's own listener, counting this node's online devices,
  ignores). Delivery is at most once, like everything on the bus.

Pure data in and out of JSON here; the router and the clock come from :class:`~nanoiot.cluster.node.ClusterNode`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable
from uuid import UUID

from twisted.logger import Logger

from nanoiot.commands.events import DeviceOffline, DeviceOnline, EventStream, RpcStatusChanged
from nanoiot.persistence.records import RpcRecord
from nanoiot.rpc.model import RpcStatus

log = Logger(namespace="nanoiot.cluster")

EVENT = "event"
INTEREST = "ws-interest"
#: The events relayed to nodes with WebSocket subscribers.
RELAYED = (RpcStatusChanged, DeviceOnline, DeviceOffline)
#: Encoded events per envelope, at most: stays under PostgreSQL's inline NOTIFY payload (larger ones go through
#: the bus's message table, which works but costs a row).
ENVELOPE_BUDGET = 6000


@dataclass(frozen=True, slots=True)
class RemoteEvent:
    """An event of a device held by another node (``node``), as that node published it. ``customer_id``: the
    device's customer there, for an RPC event (whose record does not carry it)."""

    event: Any
    node: str
    customer_id: UUID | None = None

    @property
    def type(self) -> str:
        return self.event.type


# --- encoding ---------------------------------------------------------------------------------------------------


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _uuid(value: Any) -> UUID | None:
    return None if value is None else UUID(value)


def record_to_json(record: RpcRecord) -> dict[str, Any]:
    return {
        "id": str(record.id), "ct": record.created_time, "tn": str(record.tenant_id), "d": str(record.device_id),
        "exp": record.expiration_time, "ow": record.oneway, "m": record.method, "p": record.params,
        "s": record.status.value, "r": record.response, "i": record.additional_info, "rt": record.retries,
        "u": _str(record.user_id), "seq": record.seq, "a": record.attempts, "by": record.initiator,
        "b": _str(record.batch_id),
    }


def record_from_json(data: dict[str, Any]) -> RpcRecord:
    return RpcRecord(
        id=UUID(data["id"]), created_time=data["ct"], tenant_id=UUID(data["tn"]), device_id=UUID(data["d"]),
        expiration_time=data["exp"], oneway=data["ow"], method=data["m"], params=data["p"],
        status=RpcStatus(data["s"]), response=data["r"], additional_info=data["i"], retries=data["rt"],
        user_id=_uuid(data["u"]), seq=data["seq"], attempts=data["a"], initiator=data["by"],
        batch_id=_uuid(data["b"]),
    )


def event_to_json(event: Any, customer_id: UUID | None = None) -> dict[str, Any] | None:
    """A local event as it travels; None for the kinds that are not relayed (DeviceCalled)."""
    if isinstance(event, RpcStatusChanged):
        return {"k": "rpc", "r": record_to_json(event.record), "p": event.persistent, "c": _str(customer_id)}
    if isinstance(event, (DeviceOnline, DeviceOffline)):
        return {"k": "on" if isinstance(event, DeviceOnline) else "off", "d": str(event.device_id),
                "tn": str(event.tenant_id), "c": str(event.customer_id), "tr": event.transport, "n": event.node}
    return None


def event_from_json(data: dict[str, Any], node: str) -> RemoteEvent:
    kind = data["k"]
    if kind == "rpc":
        return RemoteEvent(RpcStatusChanged(record_from_json(data["r"]), bool(data["p"])), node, _uuid(data["c"]))
    if kind in ("on", "off"):
        presence = DeviceOnline if kind == "on" else DeviceOffline
        customer = UUID(data["c"])
        return RemoteEvent(presence(UUID(data["d"]), UUID(data["tn"]), customer, data["tr"], data.get("n") or node),
                           node, customer)
    raise ValueError(f"unknown event kind {kind!r}")


def _tenant_of(event: Any) -> UUID:
    return event.record.tenant_id if isinstance(event, RpcStatusChanged) else event.tenant_id


# --- the relay ------------------------------------------------------------------------------------------------------


class EventRelay:
    """One per cluster node. ``router``: the node's router (``broadcast``); ``devices``: the device cache (an RPC
    event's customer); ``dead_after_ms``: how long an interest that is not renewed lasts."""

    def __init__(self, router: Any, node: str, events: EventStream, clock: Any, dead_after_ms: int,
                 devices: Any = None) -> None:
        self.router = router
        self.node = node
        self.events = events
        self.clock = clock
        self.dead_after_ms = dead_after_ms
        self.devices = devices
        #: Tenants this node has WebSocket subscribers for (set by :meth:`attach`); empty: no interest.
        self.wanted: Callable[[], Iterable[UUID]] = lambda: ()
        #: Interest heard from other nodes: tenant (None: every tenant) -> when last heard, ms.
        self.interest: dict[UUID | None, int] = {}
        self._batch: list[dict[str, Any]] = []
        self._batch_size = 0
        self._flush_call: Any = None
        self.relayed = 0
        self.received = 0
        #: Subscribed to this node's events only while another node wants them (else actors build no events).
        self._unsubscribe: Callable[[], None] | None = None

    def attach(self, hub: Any) -> None:
        """Let this node's WebSocket hub drive the interest it announces."""
        self.wanted = hub.tenants
        hub.on_active = self.announce

    def _now(self) -> int:
        return int(self.clock.seconds() * 1000)

    # --- interest -------------------------------------------------------------------------------------------------

    def announce(self) -> None:
        """Tell the other nodes this node has WebSocket subscribers (for these tenants)."""
        tenants = [str(t) for t in self.wanted()]
        if tenants:
            self.router.broadcast({"t": INTEREST, "tenants": tenants})

    def heartbeat(self) -> None:
        """Called with each of the node's heartbeats: renew this node's interest, forget the stale ones heard."""
        try:
            self.announce()
        except Exception:
            log.failure("cluster: announcing WebSocket interest failed")
        cutoff = self._now() - self.dead_after_ms
        for tenant, heard in list(self.interest.items()):
            if heard < cutoff:
                del self.interest[tenant]
        if not self.interest and self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _listen(self) -> None:
        if self._unsubscribe is None:
            self._unsubscribe = self.events.subscribe(self._on_local_event, RELAYED)

    def _wants(self, tenant_id: UUID) -> bool:
        interest = self.interest
        if not interest:
            return False
        cutoff = self._now() - self.dead_after_ms
        heard = interest.get(tenant_id)
        if heard is not None and heard >= cutoff:
            return True
        heard = interest.get(None)
        return heard is not None and heard >= cutoff

    # --- out ------------------------------------------------------------------------------------------------------

    def _on_local_event(self, event: Any) -> None:
        if not self.interest or isinstance(event, RemoteEvent):
            return
        if not isinstance(event, RELAYED):
            return
        if not self._wants(_tenant_of(event)):
            return
        customer = None
        if isinstance(event, RpcStatusChanged) and self.devices is not None:
            device = self.devices.cached_device(event.record.device_id)
            customer = device.customer_id if device is not None else None
        data = event_to_json(event, customer)
        if data is None:
            return
        size = len(json.dumps(data, separators=(",", ":"), default=str))
        if self._batch and self._batch_size + size > ENVELOPE_BUDGET:
            self._flush()
        self._batch.append(data)
        self._batch_size += size
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        batch, self._batch, self._batch_size = self._batch, [], 0
        if batch:
            self.relayed += len(batch)
            try:
                self.router.broadcast({"t": EVENT, "e": batch})
            except Exception:
                log.failure("cluster: relaying events failed")

    # --- in -------------------------------------------------------------------------------------------------------

    def receive(self, envelope: dict[str, Any]) -> None:
        """An ``event`` or ``ws-interest`` envelope from another node."""
        origin = str(envelope.get("from") or "")
        try:
            if envelope.get("t") == INTEREST:
                now = self._now()
                tenants = envelope.get("tenants")
                if tenants is None:
                    self.interest[None] = now
                else:
                    for tenant in tenants:
                        self.interest[UUID(tenant)] = now
                self._listen()
                return
            if envelope.get("t") == EVENT:
                for data in envelope.get("e") or ():
                    remote = event_from_json(data, origin)
                    self.received += 1
                    self.events.publish(remote)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            log.warn("cluster: bad {kind} message from {node} dropped: {error}", kind=envelope.get("t"),
                     node=origin, error=exc)
