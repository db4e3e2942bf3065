"""One node of a cluster: joins (registers, shares the JWT key and the request-id space), heartbeats, watches the
other nodes, routes through :class:`~nanoiot.cluster.port.ClusterPort`, and tells the others when a device changes.
"""

from __future__ import annotations

import secrets
import socket
from typing import Any
from uuid import UUID

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from nanoiot.actors import messages as m
from nanoiot.actors.device import RequestIds
from nanoiot.cluster.direct import DirectRouter, machine_id
from nanoiot.cluster.events import EventRelay
from nanoiot.cluster.notify import NotifyBus
from nanoiot.cluster.port import ClusterPort
from nanoiot.cluster.router import NotifyRouter
from nanoiot.commands.events import DeviceOffline, DeviceOnline
from nanoiot.persistence.cluster_store import ClusterStore
from nanoiot.persistence.records import NodeRecord

log = Logger(namespace="nanoiot.cluster")

#: Request ids a node takes from the shared counter at a time (the next block is fetched at half-time).
REQUEST_ID_BLOCK = 100_000
#: Large routed messages left unread (their receiver died) are purged after this long.
MESSAGE_TTL_MS = 60_000
#: Every this many heartbeats a node checks that no other node has claimed a device it believes it holds.
AUDIT_EVERY = 5


class BlockRequestIds(RequestIds):
    """Request ids unique across the cluster: blocks taken from a counter in the database, the next one fetched
    while half of the current one is left, so that ``take`` never waits."""

    __slots__ = ("end", "_next", "_fetching", "_store", "_block")

    def __init__(self, store: ClusterStore, start: int, block: int = REQUEST_ID_BLOCK) -> None:
        super().__init__(start)
        self.end = start + block
        self._next: int | None = None
        self._fetching = False
        self._store = store
        self._block = block

    def take(self) -> int:
        if self.next_id >= self.end:
            if self._next is not None and self._next < self.next_id:
                self._next = None  # overtaken by ids handed out past the end meanwhile: not unique here
            if self._next is not None:
                self.next_id, self.end, self._next = self._next, self._next + self._block, None
            else:  # the database is slower than 50,000 commands: stay unique on this node at least
                log.error("cluster: request-id block exhausted before the next one arrived")
                self.end += self._block
        if self._next is None and not self._fetching and self.end - self.next_id < self._block // 2:
            self._fetching = True
            self._store.allocate_request_ids(self._block).addCallbacks(self._fetched, self._fetch_failed)
        return super().take()

    def _fetched(self, start: int) -> None:
        self._fetching = False
        self._next = start

    def _fetch_failed(self, failure: Any) -> None:
        self._fetching = False
        log.failure("cluster: could not take a block of request ids", failure)


class ClusterNode(Service):
    name = "cluster-node"

    def __init__(self, config: Any, reactor: Any, repository: Any, directory: Any, catalog: Any, journal: Any,
                 events: Any, tokens: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.node = config.node_name
        self.directory = directory
        self.catalog = catalog
        self.tokens = tokens
        self.dead_after_ms = int(config.dead_after * 1000)
        self.store = ClusterStore(repository)
        self.bus = NotifyBus(config.database, reactor)
        self.router: Any = NotifyRouter(self.bus, self.node)
        link_host = getattr(config, "cluster_link_host", "")
        if link_host:
            self.router = DirectRouter(self.router, reactor, link_host, machine_id())
        self.port = ClusterPort(self.node, directory, self.store, self.router, catalog, repository, journal, reactor,
                                self.dead_after_ms, config.route_timeout)
        self._beats = 0
        self._loop: LoopingCall | None = None
        self._joined = False
        events.subscribe(self._on_event, (DeviceOnline, DeviceOffline))  # counts devices: no status records
        #: This node's events for WebSocket subscribers on other nodes, and theirs for this node's.
        self.events_relay = EventRelay(self.router, self.node, events, reactor, self.dead_after_ms, catalog)
        catalog.changed = self._device_changed
        #: Other services' broadcasts, by envelope kind ``t`` (the rule service's "rules-changed").
        self.notices: dict[str, Any] = {}

    def share_flusher(self, flusher: Any) -> None:
        """The service's :class:`~nanoiot.transports.tcp.TurnFlusher`: the direct links' writes of a turn go out
        in the same pass as its HTTP and MQTT connections' (one reactor call, not one per kind)."""
        if isinstance(self.router, DirectRouter):
            self.router.flusher = flusher

    @property
    def address(self) -> str:
        host = self.config.host
        if host in ("", "0.0.0.0", "::"):
            host = socket.gethostname()
        return f"{host}:{self.config.http_port}"

    async def join(self) -> None:
        """Start as a member: claims left by an earlier life of this node id are dropped (its devices reconnect),
        the shared JWT key and a block of request ids are taken, and routing starts before the ports open."""
        await self.store.remove_node(self.node)
        if not self.config.jwt_key:
            key = await self.store.shared_setting("jwt_signing_key", lambda: secrets.token_urlsafe(64))
            self.tokens.key = key.encode()
        record = await self.store.register_node(self.node, self.address)
        start = await self.store.allocate_request_ids(REQUEST_ID_BLOCK)
        self.directory.context.ids = BlockRequestIds(self.store, start)
        await self.router.start(self._receive)
        for node in await self.store.list_nodes(self.dead_after_ms):
            self.port.alive[node.node_id] = node.alive
        self._loop = LoopingCall(self._beat)
        self._loop.clock = self.reactor
        self._loop.start(self.config.heartbeat_interval, now=False).addErrback(
            lambda f: log.failure("cluster: heartbeat loop stopped", f))
        self._joined = True
        log.info("joined the cluster as node {node} ({address}, started {started})", node=self.node,
                 address=self.address, started=record.started_time)

    def nodes(self) -> Deferred[list[NodeRecord]]:
        return self.store.list_nodes(self.dead_after_ms)

    # --- heartbeat --------------------------------------------------------------------------------------------------

    def _beat(self) -> Deferred[None]:
        return ensureDeferred(self._heartbeat()).addErrback(
            lambda f: log.warn("cluster: heartbeat failed: {error}", error=f.getErrorMessage()))

    async def _heartbeat(self) -> None:
        self._beats += 1
        self.events_relay.heartbeat()
        await self.store.heartbeat(self.node, len(self.port.online))
        for record in await self.store.list_nodes(self.dead_after_ms):
            if record.node_id == self.node:
                continue
            was_alive = self.port.alive.get(record.node_id, True)
            self.port.alive[record.node_id] = record.alive
            if was_alive and not record.alive:
                log.warn("cluster: node {dead} stopped heartbeating; declared dead", dead=record.node_id)
                self.port.node_died(record.node_id)
        if self._beats % AUDIT_EVERY == 0:
            await self._audit_claims()
        if self._beats % 10 == 0:
            await self.store.purge_messages(MESSAGE_TTL_MS)

    async def _audit_claims(self) -> None:
        """A claim notice can be lost (NOTIFY is at most once): devices another node holds now are let go."""
        owned = list(self.port.owned)
        if not owned:
            return
        for device_id in await self.store.owned_elsewhere(self.node, owned):
            device = self.catalog.cached_device(device_id) or await self.catalog.get_device(device_id)
            owners = await self.store.owners([device_id], self.dead_after_ms)
            owner = owners.get(device_id)
            if device is not None and owner is not None:
                log.warn("cluster: device {device_id} is held by {other}; letting it go", device_id=device_id,
                         other=owner.node_id)
                self.port._let_go(device, owner.node_id)

    # --- events and cache invalidation ------------------------------------------------------------------------------

    def _on_event(self, event: Any) -> None:
        if isinstance(event, DeviceOnline):
            self.port.online.add(event.device_id)
        elif isinstance(event, DeviceOffline):
            self.port.online.discard(event.device_id)

    def _device_changed(self, device_id: UUID, deleted: bool) -> None:
        """A device, its credentials or its customer changed here: every other node drops its cached copies."""
        if self._joined:
            self.router.broadcast({"t": "invalidate", "d": [str(device_id)], "deleted": deleted})

    def tell_others(self, envelope: dict[str, Any]) -> None:
        """Broadcast another service's notice (kind ``t``, handled by :attr:`notices` on the other nodes): the user
        API's "user-changed", so that a deleted or disabled user's tokens stop on every node."""
        if self._joined:
            self.router.broadcast(envelope)

    def _receive(self, envelope: dict[str, Any]) -> None:
        notice = self.notices.get(envelope.get("t"))  # type: ignore[arg-type]
        if notice is not None:
            notice(envelope)
            return
        if envelope.get("t") in ("event", "ws-interest"):
            self.events_relay.receive(envelope)
            return
        if envelope.get("t") == "invalidate":
            for raw_id in envelope.get("d", []):
                device_id = UUID(raw_id)
                device = self.catalog.cached_device(device_id)
                self.catalog.forget(device_id)
                if envelope.get("deleted") and device is not None and self.directory.existing(device_id):
                    self.directory.tell_local(device, m.DeviceRemoved())
            return
        self.port.receive(envelope)

    # --- leaving ----------------------------------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if not self._joined:
            return succeed(None)
        self._joined = False

        async def leave() -> None:
            try:
                await self.store.remove_node(self.node)
            except Exception:
                log.failure("cluster: could not leave cleanly")
            await self.router.stop()

        return ensureDeferred(leave())
