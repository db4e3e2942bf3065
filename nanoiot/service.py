"""Every long-lived part assembled in one MultiService, which the twistd plugin and the tests both build."""

from __future__ import annotations

import gc
import resource
from typing import Any
from uuid import UUID

from prometheus_client import CollectorRegistry
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, maybeDeferred
from twisted.internet.task import deferLater
from twisted.internet.interfaces import IListeningPort
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

from nanoiot import __version__
from nanoiot.actors import messages as m
from nanoiot.actors.device import ActorSettings
from nanoiot.actors.directory import DeviceDirectory
from nanoiot.actors.replies import Replies
from nanoiot.actors.runtime import reactor_dispatcher
from nanoiot.collector import CollectorPolicy
from nanoiot.commands.bulk import BulkRpc
from nanoiot.commands.events import EventStream
from nanoiot.commands.presence import PresenceBook
from nanoiot.commands.server_methods import ServerMethods, load_configured_methods, load_entry_point_methods
from nanoiot.commands.service import CommandService, Initiator
from nanoiot.config import Config
from nanoiot.demo import DemoData, banner, seed_demo
from nanoiot.errors import BadRequest, ServiceUnavailable
from nanoiot.ids import uuid7  # a time-ordered RPC id, no getrandom call per command a server method sends
from nanoiot.limits import KeyedLimiter, parse_rates
from nanoiot.logs import LogTarget, make_observer, rotate_on_signal
from nanoiot.metrics import ServerMetrics, pending_commands
from nanoiot.persistence.batch_store import BatchStore
from nanoiot.persistence.catalog import DeviceCatalog
from nanoiot.persistence.journal import RpcJournal
from nanoiot.persistence.records import Device
from nanoiot.persistence.repository import Repository
from nanoiot.persistence.rule_store import RuleStore
from nanoiot.rpc.body import RpcBody
from nanoiot.rpc.model import RpcResult, record_command
from nanoiot.rpc.queue import QueueSettings
from nanoiot.rules.server import RuleService
from nanoiot.transports.coap.server import CoapServer
from nanoiot.transports.mqtt.limits import MqttLimits
from nanoiot.transports.mqtt.protocol import MqttFactory
from nanoiot.transports.tcp import TurnFlusher, listen_tcp
from nanoiot.transports.tls import listen_tls
from nanoiot.transports.udp import listen_udp
from nanoiot.web.active_users import NOTICE as USER_NOTICE
from nanoiot.web.active_users import ActiveUsers
from nanoiot.web.context import WebContext
from nanoiot.web.event_hub import EventHub
from nanoiot.web.metrics import metrics_resource
from nanoiot.web.site import build_site
from nanoiot.web.tokens import TokenIssuer, load_signing_key

log = Logger(namespace="nanoiot")

#: Twisted listens with a backlog of 50; a fleet reconnecting at once overflows that (see BENCHMARKS.md).
LISTEN_BACKLOG = 4096


def raise_open_file_limit(wanted: int = 1_048_576) -> tuple[int, int]:
    """One socket per device: ask for ``wanted`` descriptors (root may raise the hard limit up to
    ``fs.nr_open``), else take the hard limit; raising that is the operator's job (see README)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ValueError, OSError):
        pass
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def session_limits(config: Config) -> dict[str, Any]:
    """ThingsBoard's ``getSessionLimits`` reply, from our own settings."""
    return {
        "maxPayloadSize": config.mqtt_max_packet_size,
        # The MQTT inbound window: publishes past it are not read until the actor handled the earlier ones.
        "maxInflightMessages": config.mqtt_max_inflight_in,
        "rateLimits": {"messages": config.mqtt_device_rate_limit or None, "telemetryMessages": None,
                       "telemetryDataPoints": None},
    }


def mqtt_limits(config: Config, clock: Any) -> MqttLimits:
    """The MQTT listener's inbound window, rate and connection limits (nanoiot/transports/mqtt/limits.py)."""
    return MqttLimits(
        max_inflight_in=config.mqtt_max_inflight_in,
        max_queued_bytes=config.mqtt_max_queued_bytes,
        device_rates=parse_rates(config.mqtt_device_rate_limit),
        tenant_rates=parse_rates(config.mqtt_tenant_rate_limit),
        rate_action=config.mqtt_rate_limit_action,
        max_connections_per_address=config.mqtt_max_connections_per_address,
        max_sessions_per_device=config.mqtt_max_sessions_per_device,
        write_timeout=config.mqtt_write_timeout,
        clock=clock.seconds,
    )


class NanoService(MultiService):
    def __init__(self, config: Config, reactor: Any = None, server_methods: ServerMethods | None = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        self.repository = Repository(config.database, reactor, retry_after=config.db_retry_after,
                                     probe_interval=config.db_probe_interval,
                                     sqlite_cache_mb=config.sqlite_cache_mb)
        self.catalog = DeviceCatalog(self.repository, clock=reactor)
        #: Prometheus metrics (``/metrics``), in a registry of this server's own; None with --metrics off.
        self.metrics = ServerMetrics(CollectorRegistry(), reactor, config.node_name if config.cluster else "") \
            if config.metrics else None
        # The journal's batch writes are timed by the repository it is given (no hook in the journal itself).
        self.journal = RpcJournal(self.metrics.timed_repository(self.repository) if self.metrics else self.repository,
                                  reactor)
        settings = ActorSettings(
            max_persistent_per_device=config.rpc_max_persistent_per_device,
            max_persistent_per_tenant=config.rpc_max_persistent_per_tenant,
            queue=QueueSettings(
                strategy=config.rpc_strategy,
                max_retries=config.rpc_max_retries,
                ack_timeout_ms=config.rpc_ack_timeout,
                response_timeout_ms=config.rpc_response_timeout,
            ),
            qos=config.rpc_qos,
            max_pending=config.rpc_max_pending,
            idle_timeout=config.device_idle_timeout,
            session_limits=session_limits(config),
        )
        self.events = EventStream()
        #: Which devices have a session here: device infos' ``active``, the connected-devices gauge.
        self.presence = PresenceBook(reactor, config.node_name if config.cluster else "")
        self.presence.start(self.events)
        # Server methods: built-ins and those given in code, then installed entry points, then --rpc-methods.
        self.server_methods = server_methods if server_methods is not None else ServerMethods()
        self.server_methods.update(load_entry_point_methods())
        self.server_methods.update(load_configured_methods(config.rpc_methods))
        self.node = config.node_name if config.cluster else ""
        self.replies = Replies(self.node)
        self.directory = DeviceDirectory(reactor, settings, self.server_methods, self.events, self.journal,
                                         reactor_dispatcher(reactor), self.replies, self.node)
        self.directory.context.send_rpc = self._send_rpc
        self.directory.setServiceParent(self)
        # In a cluster the signing key is shared through the database unless --jwt-key gives it (see join()).
        signing_key = config.jwt_key.encode() if config.cluster and config.jwt_key else (
            b"" if config.cluster else load_signing_key(config.jwt_key, config.jwt_key_file))
        # A deleted or disabled user's tokens stop working at once (web/active_users.py).
        self.tokens = TokenIssuer(signing_key, config.jwt_expiration, config.jwt_refresh_expiration, reactor,
                                  users=ActiveUsers(self.repository.get_user))
        #: The device port: this node's directory, or in a cluster the router in front of it.
        self.port: Any = self.directory
        self.cluster: Any = None
        if config.cluster:
            from nanoiot.cluster.node import ClusterNode

            self.cluster = ClusterNode(config, reactor, self.repository, self.directory, self.catalog, self.journal,
                                       self.events, self.tokens)
            self.port = self.cluster.port
            self.cluster.setServiceParent(self)
            # A user deleted or disabled on one node: every node forgets it (its tokens stop there too).
            self.cluster.notices[USER_NOTICE] = self.tokens.users.remote_change
            self.tokens.users.broadcast = self.cluster.tell_others
        self.commands = CommandService(self.port, self.replies, self.catalog, self.repository, self.events, reactor)
        #: Rule chains (nanoiot/rules/server.py): the root chain of each tenant sees its commands, calls and events.
        self.rules: RuleService | None = None
        if not config.rules_bypass:
            self.rules = RuleService(config, reactor, RuleStore(self.repository), self.commands, self.catalog,
                                     self.repository, self.port, self.replies, self.events, self.node, self.cluster)
            self.rules.setServiceParent(self)
            self.rules.install(self.directory.context)
        # A batch's pending commands are long-lived: frozen out of the full collections, as the collector does for
        # a growing fleet (see nanoiot/collector.py).
        self.bulk = BulkRpc(self.commands, BatchStore(self.repository), reactor, config.rpc_bulk_max_devices,
                            grown=gc.freeze if config.gc_freeze else None)
        self.bulk.setServiceParent(self)
        self.web_context = WebContext(config, reactor, self.repository, self.catalog, self.port, self.tokens,
                                      self.commands, self.cluster, bulk=self.bulk)
        self.web_context.rules = self.rules
        self.web_context.presence = self.presence
        #: Which WebSocket client wants which event (``/api/ws/rpc``); in a cluster it also drives the relay.
        self.hub = EventHub(self.events, self.catalog)
        if self.cluster is not None:
            self.cluster.events_relay.attach(self.hub)
        self.site = build_site(self.web_context, self.hub, metrics=self._metrics_resource())
        self.mqtt_factory = MqttFactory(
            authenticate=self.catalog.device_for_token,
            attach=self.port.attach,
            clock=reactor,
            max_packet_size=config.mqtt_max_packet_size,
            connect_timeout=config.mqtt_connect_timeout,
            find_or_create_subdevice=self._find_or_create_subdevice,
            limits=mqtt_limits(config, reactor),
        )
        self.mqtt_factory.noisy = False
        self.coap_server = CoapServer(
            authenticate=self.catalog.device_for_token,
            attach=self.port.attach,
            clock=reactor,
            rate_limiter=KeyedLimiter(parse_rates(config.coap_device_rate_limit), reactor.seconds)
            if config.coap_device_rate_limit else None,
        )
        #: One pass per reactor turn sends what every HTTP and MQTT connection wrote (and the cluster's links).
        self.flusher = TurnFlusher(reactor)
        if self.cluster is not None:
            self.cluster.share_flusher(self.flusher)
        self.http_port: IListeningPort | None = None
        self.mqtt_port: IListeningPort | None = None
        self.coap_port: IListeningPort | None = None
        self.https_port: IListeningPort | None = None
        self.mqtts_port: IListeningPort | None = None
        self.collector: CollectorPolicy | None = None
        self.demo: DemoData | None = None
        self.failed = False
        #: Set by the twistd plugin: a server that cannot start must not linger half-started.
        self.stop_reactor_on_failure = False
        self._ttl: TimerService | None = None
        #: Where twistd was told to log (set by the twistd plugin); None: standard output.
        self.log_target: LogTarget | None = None
        #: Fires with this service once it listens; errbacks if it could not start.
        self.ready: Deferred = Deferred()

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        # Under twistd the parent is the Application: give it our quiet, structured log observer, writing where
        # twistd was told (--logfile, or twistd.log when daemonized); with --syslog twistd's own observer stays.
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver, None) is None:
            target = self.log_target
            if target is not None and target.syslog:
                parent.setComponent(ILogObserver, make_observer(self.config.log_level, node=self.node,
                                                                base=target.syslog_observer()))
                return
            stream = target.open() if target is not None else None
            if stream is not None:
                rotate_on_signal(stream, self.reactor)
            parent.setComponent(ILogObserver, make_observer(self.config.log_level, self.config.log_format,
                                                            stream=stream, node=self.node))

    def _metrics_resource(self) -> Any:
        """``/metrics``, with the gauges read at each scrape; None with --metrics off."""
        metrics = self.metrics
        if metrics is None:
            return None
        metrics.gauge("nanoiot_rpc_pending", "Commands waiting in device actors' queues (not yet ended)",
                      lambda: pending_commands(self.directory._actors.values()))
        metrics.gauge("nanoiot_device_actors", "Device actors in memory on this node", lambda: len(self.directory))
        metrics.gauge("nanoiot_journal_pending", "Persistent-command changes recorded, not yet written",
                      lambda: self.journal.pending)
        metrics.gauge("nanoiot_database_up", "1 while the database answers, 0 during an outage",
                      lambda: 1 if getattr(self.repository, "healthy", True) else 0)
        return metrics_resource(metrics.registry, self.config.metrics_token)

    def _find_or_create_subdevice(self, gateway: Device, name: str, device_type: str) -> Deferred:
        """A gateway's sub-device by name in the gateway's tenant, created on first sight (as ThingsBoard does:
        same customer as the gateway, ``lastConnectedGateway`` in its additional info, a generated token)."""

        async def find_or_create() -> Device | None:
            device = await self.repository.get_tenant_device_by_name(gateway.tenant_id, name)
            if device is not None:
                return device
            try:
                device, _ = await self.catalog.create_device(
                    gateway.tenant_id, name, device_type, customer_id=gateway.customer_id,
                    additional_info={"lastConnectedGateway": str(gateway.id)})
            except BadRequest:
                # Created meanwhile (by another gateway, or over REST): use that one.
                return await self.repository.get_tenant_device_by_name(gateway.tenant_id, name)
            log.info("gateway {gateway_id} created sub-device {name} ({device_id})", gateway_id=gateway.id,
                     name=name, device_id=device.id)
            return device

        return ensureDeferred(find_or_create())

    def _send_rpc(self, caller: Device, device_id: UUID | str, method: str, params: Any = None,
                  oneway: bool = False, timeout_ms: int = 10000) -> Deferred[RpcResult]:
        """``CallContext.send_rpc``: a server method commands another device of the calling device's tenant."""
        target_id = device_id if isinstance(device_id, UUID) else UUID(str(device_id))
        now = int(self.reactor.seconds() * 1000)
        body = RpcBody(method=method, params=params, timeout=int(timeout_ms), expiration_time=now + int(timeout_ms),
                       persistent=False, retries=None, additional_info=None, request_uuid=uuid7(), qos=None)
        return self.commands.submit(Initiator(caller.tenant_id, device_id=caller.id), target_id, body, oneway)

    def _listen(self, port: int, factory: Any) -> IListeningPort:
        return listen_tcp(self.reactor, port, factory, LISTEN_BACKLOG, self.config.host, self.config.reuse_port,
                          self.flusher)

    def startService(self) -> None:
        super().startService()
        ensureDeferred(self._start()).addCallbacks(self.ready.callback, self._start_failed)

    async def _start(self) -> NanoService:
        raise_open_file_limit()
        await self.repository.start()
        if self.metrics is not None:
            self.metrics.start(self.events, self.presence)
        if self.rules is not None:
            await self.rules.load()
        if self.cluster is None:
            await self._resume_persistent_rpcs()
        else:
            await self.cluster.join()
        if self.config.rpc_ttl:
            self._ttl = TimerService(self.config.rpc_ttl_interval, self._clean_up_finished_rpcs)
            self._ttl.clock = self.reactor
            self._ttl.setServiceParent(self)
        if self.config.demo:
            self.demo = await seed_demo(self.repository, self.catalog)
        self.http_port = self._listen(self.config.http_port, self.site)
        self.mqtt_port = self._listen(self.config.mqtt_port, self.mqtt_factory)
        self.coap_port = listen_udp(self.reactor, self.config.coap_port, self.coap_server, self.config.host,
                                    self.config.reuse_port)
        await self._listen_tls()
        if self.config.gc_freeze:
            self.collector = CollectorPolicy(self.reactor, lambda: len(self.directory))
            self.collector.start()
        log.info("{banner}", banner=banner(
            self.config.host, self.http_port.getHost().port, self.mqtt_port.getHost().port,
            self.coap_port.getHost().port,
            self.config.database, self.demo, __version__))
        return self

    async def _listen_tls(self) -> None:
        """--https-port and --mqtts-port: the same site and MQTT factory behind Twisted's ``ssl:`` endpoints."""
        config = self.config
        if config.https_port:
            self.https_port = await listen_tls(self.reactor, config.https_port, self.site, config.host,
                                               config.tls_cert, config.tls_key, config.tls_chain, LISTEN_BACKLOG)
            log.info("HTTPS on port {port}", port=self.https_port.getHost().port)
        if config.mqtts_port:
            self.mqtts_port = await listen_tls(self.reactor, config.mqtts_port, self.mqtt_factory, config.host,
                                               config.tls_cert, config.tls_key, config.tls_chain, LISTEN_BACKLOG)
            log.info("MQTT over TLS on port {port}", port=self.mqtts_port.getHost().port)

    async def _resume_persistent_rpcs(self) -> None:
        """Every persistent command that had not ended goes back to its device actor, in its original order,
        with its timers re-armed (expired ones end as EXPIRED)."""
        self.directory.request_ids.next_id = await self.repository.max_rpc_seq() + 1
        records = await self.repository.load_active_rpcs()
        by_device: dict[Any, list[Any]] = {}
        for record in records:
            by_device.setdefault(record.device_id, []).append(record)
        resumed = 0
        for index, (device_id, stored) in enumerate(by_device.items()):
            device = await self.catalog.get_device(device_id)
            if device is None:
                continue
            entries = [(record_command(r), r.status, r.seq, r.attempts) for r in stored]
            self.directory.tell_local(device, m.RestoreRpcs(entries))
            resumed += len(entries)
            if index % 1000 == 999:
                await deferLater(self.reactor, 0, lambda: None)  # let the reactor breathe between chunks
        if resumed:
            log.info("resumed {count} persistent RPCs on {devices} devices", count=resumed, devices=len(by_device))

    def _clean_up_finished_rpcs(self) -> Deferred:
        cutoff = int(self.reactor.seconds() * 1000) - self.config.rpc_ttl * 1000
        d = self.repository.delete_terminal_rpcs_older_than(cutoff)
        d.addCallback(lambda n: n and log.info("removed {count} finished persistent RPCs past their TTL", count=n))
        d.addErrback(lambda f: log.failure("RPC TTL clean-up failed", f))
        return d

    def _start_failed(self, failure: Any) -> None:
        log.critical("NanoIoT could not start: {error}", error=failure.getErrorMessage())
        self.failed = True
        self.ready.errback(failure)
        if self.stop_reactor_on_failure:  # under twistd: stop, and the plugin exits non-zero
            self.reactor.stop()

    def stopService(self) -> Deferred:
        """Stop accepting, let waiting REST callers finish for --shutdown-grace and answer the rest 503, close
        WebSockets and device sessions, flush the journal; exit within --shutdown-timeout whatever happens."""
        if self.collector is not None:
            self.collector.stop()
            self.collector = None
        if self.metrics is not None:
            self.metrics.stop()
        finished = ensureDeferred(self._stop())
        done: Deferred = Deferred()

        def first(result: Any) -> Any:
            if not done.called:
                done.callback(None)
            return result

        finished.addErrback(lambda f: log.failure("stopping NanoIoT failed", f)).addBoth(first)
        late = self.reactor.callLater(self.config.shutdown_timeout, self._stop_timed_out, done)
        done.addBoth(lambda result: late.cancel() if late.active() else None)
        return done

    def _stop_timed_out(self, done: Deferred) -> None:
        log.warn("NanoIoT did not stop within {seconds} s (--shutdown-timeout): exiting anyway",
                 seconds=self.config.shutdown_timeout)
        if not done.called:
            done.callback(None)

    async def _stop(self) -> None:
        ports = [p for p in (self.http_port, self.mqtt_port, self.coap_port, self.https_port, self.mqtts_port)
                 if p is not None]
        self.http_port = self.mqtt_port = self.coap_port = self.https_port = self.mqtts_port = None
        api = getattr(self.site, "json_api", None)
        if api is not None:
            api.draining = ServiceUnavailable("NanoIoT is shutting down", retry_after=self.config.shutdown_grace)
        await DeferredList([maybeDeferred(p.stopListening) for p in ports])
        if api is not None and api.waiting:
            await self._wait_for(lambda: not api.waiting, self.config.shutdown_grace)
            refused = api.refuse_waiting(ServiceUnavailable(
                "NanoIoT stopped before the command finished; a persistent command is kept and resumes at restart",
                retry_after=self.config.shutdown_grace))
            if refused:
                log.info("answered {count} waiting REST calls 503 at shutdown", count=refused)
        websockets = getattr(self.site, "websockets", None)
        if websockets is not None:
            websockets.close_all()
        await maybeDeferred(MultiService.stopService, self)
        try:
            await self.journal.flushed()
        finally:
            await self.repository.stop()
        log.info("NanoIoT stopped")

    async def _wait_for(self, check: Any, seconds: float) -> None:
        """Until ``check()`` or ``seconds`` passed, looking every 50 ms on the reactor clock."""
        deadline = self.reactor.seconds() + seconds
        while not check() and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.05, lambda: None)
