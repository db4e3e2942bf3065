"""The rule engine inside the server, as ThingsBoard wires it: every tenant has one root rule chain, and

- a command from a user (REST, WebSocket) or a bulk RPC becomes an ``RPC_CALL_FROM_SERVER_TO_DEVICE`` message into
  it; the chain's *RPC Call Request* node sends the command, and the caller gets that command's outcome (exactly
  once, even if the chain sends several commands); a chain that drops the message answers the caller with
  :class:`CommandNotSent` instead of leaving it to time out;
- a device-to-server call of a method that no server method answers becomes a ``TO_SERVER_RPC_REQUEST`` message; an
  *RPC Call Reply* node answers the device (``ReplyToDevice``, routed to wherever the device's actor is); a chain that
  answered nothing answers the device as before (``Unsupported method``), one still running after
  ``--device-call-timeout`` answers ``{"error":"timeout"}`` (ThingsBoard's transport answer);
- every status change of a persistent command is an ``RPC_<STATUS>`` message (the Rpc JSON as data).

Costs nothing where nothing happens: a chain whose *Message Type Switch* sends "RPC Request to Device" straight to
one RPC Call Request node with nothing after it (ThingsBoard's default root chain) lets commands go directly, and
message types the switch has no connection for (the default chain has none for ``RPC_*``) are not made at all;
the event stream is only listened to while some root chain wants ``RPC_*`` messages.

Bounded: each tenant has at most ``--rules-max-inflight`` messages in the engine (past it a message is dropped and
counted, a user's command refused with 429, a device's call answered with an error; drops are logged at most once a
second); messages start on a later reactor turn, a few hundred per turn, so that an event burst never runs inside a
device actor's handler; scripts run in the script runner's threads, with its time and memory limits.

The root chains are loaded at start (every tenant's stored root) and reloaded when the REST API changes them; in a
cluster the change is broadcast (``{"t": "rules-changed", "tenant"}``) and every node reloads.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Final
from uuid import UUID

from twisted.application.service import MultiService
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    ensureDeferred,
    fail,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from nanoiot.actors import messages as m
from nanoiot.actors.replies import Replies, ReplyTo
from nanoiot.commands.events import EventStream, RpcStatusChanged
from nanoiot.commands.service import CommandService, Initiator
from nanoiot.errors import ErrorCode, NanoError, NotFound, TooManyRequests
from nanoiot.ids import uuid7
from nanoiot.persistence.records import NULL_UUID, Device, RelationRecord, RuleChainRecord
from nanoiot.persistence.rule_store import COMMON, RuleStore
from nanoiot.rpc.body import RpcBody
from nanoiot.rpc.model import RpcResult
from nanoiot.rules.message import EntityId, RuleMessage, compact_json, switch_label
from nanoiot.web.rule_chains import chain_export, default_root_id, default_root_record
from nanoiot.web.shapes import rpc_json

log = Logger(namespace="nanoiot.rules")
chain_log = Logger(namespace="nanoiot.rules.log")

RPC_TO_DEVICE: Final = "RPC_CALL_FROM_SERVER_TO_DEVICE"
RPC_FROM_DEVICE: Final = "TO_SERVER_RPC_REQUEST"
RPC_EVENT_TYPES: Final = tuple(f"RPC_{s}" for s in ("QUEUED", "SENT", "DELIVERED", "SUCCESSFUL", "TIMEOUT",
                                                    "EXPIRED", "FAILED", "DELETED"))
SWITCH_NODE: Final = "org.thingsboard.rule.engine.filter.TbMsgTypeSwitchNode"
RPC_REQUEST_NODE: Final = "org.thingsboard.rule.engine.rpc.TbSendRPCRequestNode"
#: Nodes that pass every message on "Success" and do nothing else here (ThingsBoard 3.x exports start with one).
PASS_THROUGH_NODES: Final = frozenset({"org.thingsboard.rule.engine.profile.TbDeviceProfileNode"})
#: Messages started per reactor turn; the rest wait for the next turn.
TURN_BATCH: Final = 256
#: A REST caller whose command no chain sent is answered this long after the command's expiration time (ThingsBoard's
#: REST waiter fires at expirationTime + 1 s).
CALLER_GRACE_S: Final = 1.0
#: The engine's limits: nodes one message (and its copies) may pass, seconds one node may take.
MAX_HOPS: Final = 64
NODE_TIMEOUT_S: Final = 10.0
SCRIPT_TIMEOUT_MS: Final = 100
SCRIPT_THREADS: Final = 2


class CommandNotSent(NanoError):
    """The tenant's root rule chain ended without sending the command (no RPC Call Request node reached)."""

    http_status = 500
    error_code = ErrorCode.GENERAL
    default_message = "The rule chain did not send the command to the device"

    def __init__(self, message: str | None = None, **details: Any) -> None:
        super().__init__(message, rpcError="NOT_SENT_BY_RULE_CHAIN", **details)


class CommandNotSentInTime(CommandNotSent):
    """The chain was still running when the command expired."""

    http_status = 504
    default_message = "The rule chain did not send the command before it expired"


@dataclass(frozen=True, slots=True)
class CallerOrigin:
    """``RuleMessage.origin`` of a user's command: where its outcome goes, and who asked."""

    reply_to: ReplyTo
    user_id: UUID | None
    request_uuid: UUID
    #: The bulk RPC the command belongs to: the command sent for the caller stays in its batch.
    batch_id: UUID | None = None


@dataclass(slots=True)
class _PendingCall:
    """A device-to-server call a chain may still answer."""

    device: Device
    method: str
    timer: IDelayedCall | None = None


@dataclass(frozen=True, slots=True)
class Routes:
    """What a chain does with a message type before running anything (from its export, no engine involved)."""

    #: None: the chain does not start with a Message Type Switch (after pass-through nodes): nothing is known.
    switch_labels: frozenset[str] | None
    #: "RPC Request to Device" goes straight to one RPC Call Request node with nothing after it.
    direct_rpc: bool

    def drops(self, msg_type: str) -> bool:
        """The chain's first switch has no connection for this type: the message would be acked and dropped."""
        return self.switch_labels is not None and switch_label(msg_type).lower() not in self.switch_labels

    @property
    def wants_rpc_events(self) -> bool:
        return not all(self.drops(t) for t in RPC_EVENT_TYPES)


def analyse_routes(export: dict[str, Any]) -> Routes:
    """The routes of a chain export (normalised metadata: ``firstNodeIndex``, ``nodes``, ``connections``)."""
    metadata = export.get("metadata") or {}
    nodes = metadata.get("nodes") or []
    outgoing: dict[int, list[tuple[str, int]]] = {}
    for connection in metadata.get("connections") or []:
        try:
            source, target = int(connection["fromIndex"]), int(connection["toIndex"])
        except (KeyError, TypeError, ValueError):
            continue
        outgoing.setdefault(source, []).append((str(connection.get("type") or "").lower(), target))
    unknown = Routes(None, False)
    index = metadata.get("firstNodeIndex")
    seen: set[int] = set()
    while True:
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(nodes) or index in seen:
            return unknown
        seen.add(index)
        node_type = (nodes[index] or {}).get("type")
        if node_type not in PASS_THROUGH_NODES:
            break
        successors = outgoing.get(index, [])
        if len(successors) != 1 or successors[0][0] != "success":
            return unknown
        index = successors[0][1]
    if node_type != SWITCH_NODE:
        return unknown
    switch_out = outgoing.get(index, [])
    labels = frozenset(label for label, _ in switch_out)
    rpc_label = switch_label(RPC_TO_DEVICE).lower()
    targets = [target for label, target in switch_out if label == rpc_label]
    direct = (len(targets) == 1 and 0 <= targets[0] < len(nodes)
              and (nodes[targets[0]] or {}).get("type") == RPC_REQUEST_NODE and not outgoing.get(targets[0]))
    return Routes(labels, direct)


@dataclass(slots=True)
class Root:
    """A tenant's root chain: its record, its routes, and the loaded chain (loaded when first needed)."""

    record: RuleChainRecord
    routes: Routes
    chain: Any = None
    #: Stored in the database (False: the server's default, for a tenant that has none stored).
    stored: bool = True


def _session_ref(session_id: int) -> str:
    """A session id as ThingsBoard's ``sessionId`` metadata (a UUID)."""
    return str(UUID(int=session_id))


def _session_of(ref: str) -> int | None:
    try:
        return UUID(str(ref)).int
    except ValueError:
        try:
            return int(ref)
        except ValueError:
            return None


def _text(value: Any) -> str:
    return "true" if value is True else "false" if value is False else str(value)


class RuleService(MultiService):
    """Per-tenant root chains, the engine, the RuleContext; hooked into the command service, the device actors
    (their ``device_calls``) and the event stream by :meth:`install`."""

    name = "rule-service"

    def __init__(self, config: Any, clock: IReactorTime, store: RuleStore, commands: CommandService, catalog: Any,
                 repository: Any, port: Any, replies: Replies, events: EventStream, node: str = "",
                 cluster: Any = None, http: Any = None, scripts: Any = None, engine: Any = None,
                 registry: Any = None) -> None:
        super().__init__()
        from nanoiot.rules.chain import default_root_chain, load_chain_file

        self.config = config
        self.clock = clock
        self.store = store
        self.commands = commands
        self.catalog = catalog
        self.repository = repository
        self.port = port
        self.replies = replies
        self.events = events
        self.node = node
        #: ThingsBoard's ``serviceId`` of device calls: this node's name.
        self.service_id = node or "nanoiot"
        self.cluster = cluster
        if registry is None:
            from nanoiot.rules.registry import NodeRegistry

            registry = NodeRegistry()
        self.registry = registry
        self.max_inflight = int(getattr(config, "rules_max_inflight", 10000))
        self.device_call_timeout = int(getattr(config, "device_call_timeout", 60000)) / 1000.0
        path = getattr(config, "rule_chain", "")
        fallback = load_chain_file(path, registry) if path else default_root_chain()
        self._fallback_export: dict[str, Any] = getattr(fallback, "export", fallback)
        self.fallback_routes = analyse_routes(self._fallback_export)
        #: tenant -> its stored root chain (a tenant not here runs the fallback).
        self.roots: dict[UUID, Root] = {}
        #: tenant -> the fallback chain loaded with the tenant's default root id (only for tenants that needed it).
        self._defaults: dict[UUID, Root] = {}
        #: (tenant, chain id) -> loaded non-root chains (Rule Chain input nodes).
        self._chains: dict[tuple[UUID, UUID], Any] = {}
        self._generations: dict[UUID, int] = {}
        self._contexts: dict[UUID, TenantContext] = {}
        self._inflight: dict[UUID, int] = {}
        self._queue: deque[tuple[UUID, Any, RuleMessage, Deferred]] = deque()
        self._drain_scheduled = False
        #: REST callers waiting for a chain to send their command: correlation -> their timer.
        self._callers: dict[int, IDelayedCall] = {}
        self._device_calls: dict[tuple[int, int], _PendingCall] = {}
        self._unsubscribe: Callable[[], None] | None = None
        self.dropped = 0
        self._dropped_unreported = 0
        self._last_drop_report = -1.0
        self.processed = 0
        if scripts is None:
            from nanoiot.rules.scripts import ScriptRunner

            scripts = ScriptRunner(clock, timeout_ms=SCRIPT_TIMEOUT_MS, threads=SCRIPT_THREADS)
            scripts.setServiceParent(self)
        self.scripts = scripts
        if engine is None:
            from nanoiot.rules.engine import RuleEngine

            engine = RuleEngine(self.context_for, scripts, max_hops=MAX_HOPS, node_timeout=NODE_TIMEOUT_S)
        self.engine = engine
        self.http = http
        self._http_pool: Any = None

    # --- wiring -----------------------------------------------------------------------------------------------------

    def install(self, directory_context: Any) -> None:
        """Hook into the command service and the device actors (their ``ActorContext``), and the cluster."""
        self.commands.interceptor = self.intercept
        directory_context.device_calls = self.device_called
        if self.cluster is not None:
            self.cluster.notices["rules-changed"] = self._remote_change
        self._update_subscription()

    async def load(self) -> None:
        """Every tenant's stored root chain (at start, once the database is up). A stored chain that no longer
        loads (written by an older NanoIoT, say) is logged and its tenant runs the default chain meanwhile."""
        for record in await self.store.list_root_chains():
            self._set_root(record.tenant_id, record)
        log.info("rule engine: {count} tenants with a root chain of their own; default root chain: {name}",
                 count=len(self.roots), name=(self._fallback_export.get("ruleChain") or {}).get("name"))

    def stopService(self) -> Deferred[None] | None:
        for timer in self._callers.values():
            if timer.active():
                timer.cancel()
        self._callers.clear()
        for pending in self._device_calls.values():
            if pending.timer is not None and pending.timer.active():
                pending.timer.cancel()
        self._device_calls.clear()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        closing = [maybeDeferred(super().stopService)]
        if self._http_pool is not None:
            closing.append(self._http_pool.closeCachedConnections())
            self._http_pool = None
        return gatherResults(closing, consumeErrors=True).addCallback(lambda _: None)

    def fallback_export(self) -> dict[str, Any]:
        """The export file of the root chain of tenants that have none stored (for the REST API)."""
        return json.loads(json.dumps(self._fallback_export))

    # --- root chains ------------------------------------------------------------------------------------------------

    def root_of(self, tenant_id: UUID) -> Root:
        """The tenant's root chain, loaded (the default one is loaded for the tenant the first time it is needed)."""
        root = self.roots.get(tenant_id)
        if root is None:
            root = self._defaults.get(tenant_id)
            if root is None:
                record = default_root_record(tenant_id, self._fallback_export)
                root = Root(record, self.fallback_routes, stored=False)
                self._defaults[tenant_id] = root
        if root.chain is None:
            root.chain = self._load(root.record)
        return root

    def routes_of(self, tenant_id: UUID) -> Routes:
        root = self.roots.get(tenant_id)
        return root.routes if root is not None else self.fallback_routes

    def _load(self, record: RuleChainRecord) -> Any:
        from nanoiot.rules.chain import load_chain

        return load_chain(chain_export(record), self.registry, chain_id=record.id)

    def _set_root(self, tenant_id: UUID, record: RuleChainRecord | None) -> None:
        if record is None:
            self.roots.pop(tenant_id, None)
        else:
            try:
                chain = self._load(record)
            except Exception as exc:
                log.error("rule engine: tenant {tenant}'s root chain {chain_id} ({name}) does not load, the default "
                          "root chain runs instead: {error}", tenant=tenant_id, chain_id=record.id, name=record.name,
                          error=exc)
                self.roots.pop(tenant_id, None)
            else:
                export = getattr(chain, "export", None) or chain_export(record)
                self.roots[tenant_id] = Root(record, analyse_routes(export), chain)
        self._update_subscription()

    def chains_changed(self, tenant_id: UUID) -> None:
        """The REST API changed one of the tenant's chains: reload here, and tell the other nodes."""
        self._reload(tenant_id)
        cluster = self.cluster
        if cluster is not None and getattr(cluster, "_joined", False):
            cluster.router.broadcast({"t": "rules-changed", "tenant": str(tenant_id)})

    def _remote_change(self, envelope: dict[str, Any]) -> None:
        try:
            tenant_id = UUID(str(envelope.get("tenant")))
        except ValueError:
            log.warn("cluster: unreadable rules-changed notice dropped: {envelope}", envelope=envelope)
            return
        self._reload(tenant_id)

    def _reload(self, tenant_id: UUID) -> Deferred[None]:
        generation = self._generations.get(tenant_id, 0) + 1
        self._generations[tenant_id] = generation
        for key in [key for key in self._chains if key[0] == tenant_id]:
            del self._chains[key]

        def loaded(record: RuleChainRecord | None) -> None:
            if self._generations.get(tenant_id) == generation:  # else a later reload is under way: it decides
                self._set_root(tenant_id, record)

        d = self.store.get_root(tenant_id)
        d.addCallback(loaded)
        d.addErrback(lambda f: log.failure("rule engine: reloading tenant {tenant}'s root chain failed", f,
                                           tenant=tenant_id))
        return d

    def _update_subscription(self) -> None:
        wanted = self.fallback_routes.wants_rpc_events or any(r.routes.wants_rpc_events for r in self.roots.values())
        if wanted and self._unsubscribe is None:
            # Persistent commands' status changes only: a lightweight one then costs no event (four per command).
            self._unsubscribe = self.events.subscribe(self._on_event, (RpcStatusChanged,), persistent_only=True)
        elif not wanted and self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def chain_of(self, tenant_id: UUID, chain_id: UUID) -> Deferred[Any]:
        """One of the tenant's chains, loaded (cached until the tenant's chains change); NotFound if none."""
        cached = self._chains.get((tenant_id, chain_id))
        if cached is not None:
            return succeed(cached)
        root = self.roots.get(tenant_id)
        if root is not None and root.record.id == chain_id:
            return succeed(root.chain)
        generation = self._generations.get(tenant_id, 0)

        async def load() -> Any:
            record = await self.store.get_rule_chain(chain_id, tenant_id)
            if record is None:
                if chain_id == default_root_id(tenant_id) and tenant_id not in self.roots:
                    return self.root_of(tenant_id).chain
                raise NotFound(f"Rule chain {chain_id} wasn't found")
            chain = self._load(record)
            if self._generations.get(tenant_id, 0) == generation:
                self._chains[(tenant_id, chain_id)] = chain
            return chain

        return ensureDeferred(load())

    # --- the engine, bounded ----------------------------------------------------------------------------------------

    def context_for(self, tenant_id: UUID) -> TenantContext:
        context = self._contexts.get(tenant_id)
        if context is None:
            context = self._contexts[tenant_id] = TenantContext(self, tenant_id)
        return context

    def _admit(self, tenant_id: UUID) -> bool:
        count = self._inflight.get(tenant_id, 0)
        if count >= self.max_inflight:
            self.dropped += 1
            self._dropped_unreported += 1
            now = self.clock.seconds()
            if now - self._last_drop_report >= 1.0:
                log.warn("rule engine: tenant {tenant} has {limit} messages in flight (--rules-max-inflight); "
                         "{count} messages dropped since the last report", tenant=tenant_id, limit=self.max_inflight,
                         count=self._dropped_unreported)
                self._last_drop_report = now
                self._dropped_unreported = 0
            return False
        self._inflight[tenant_id] = count + 1
        return True

    def _release(self, result: Any, tenant_id: UUID) -> Any:
        left = self._inflight.get(tenant_id, 1) - 1
        if left > 0:
            self._inflight[tenant_id] = left
        else:
            self._inflight.pop(tenant_id, None)
        return result

    def inflight(self, tenant_id: UUID) -> int:
        return self._inflight.get(tenant_id, 0)

    def submit(self, tenant_id: UUID, chain: Any, msg: RuleMessage) -> Deferred[Any] | None:
        """Queue a message for the engine; None when the tenant is at its limit (the message is dropped). The
        Deferred fires with what the chain emitted last, or errbacks with why processing failed."""
        if not self._admit(tenant_id):
            return None
        d: Deferred[Any] = Deferred()
        d.addBoth(self._release, tenant_id)
        self._queue.append((tenant_id, chain, msg, d))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self.clock.callLater(0, self._drain)
        return d

    def _drain(self) -> None:
        self._drain_scheduled = False
        queue = self._queue
        for _ in range(min(len(queue), TURN_BATCH)):
            tenant_id, chain, msg, d = queue.popleft()
            self.processed += 1
            maybeDeferred(self.engine.process, chain, msg, self.context_for(tenant_id)).chainDeferred(d)
        if queue and not self._drain_scheduled:
            self._drain_scheduled = True
            self.clock.callLater(0, self._drain)

    # --- commands from users (the command service's interceptor) --------------------------------------------------

    def intercept(self, initiator: Initiator, device: Device, body: RpcBody,
                  oneway: bool) -> Deferred[RpcResult] | None:
        """A user's (REST, WebSocket) or a bulk RPC's command: None lets it go directly (the root chain would only
        send it), else the Deferred of its outcome through the tenant's root chain."""
        routes = self.routes_of(device.tenant_id)
        if routes.direct_rpc:
            return None
        if routes.drops(RPC_TO_DEVICE):
            return fail(CommandNotSent("The root rule chain has no route for 'RPC Request to Device'"))
        root = self.root_of(device.tenant_id)
        reply_to, answered = self.replies.expect()
        origin = CallerOrigin(reply_to, initiator.user_id, body.request_uuid, initiator.batch_id)
        message = self._command_message(initiator, device, body, oneway, origin)
        processing = self.submit(device.tenant_id, root.chain, message)
        if processing is None:
            answered.cancel()
            return fail(TooManyRequests(f"Too many rule-engine messages in flight for this tenant "
                                        f"(limit {self.max_inflight})", limit="rules-max-inflight",
                                        value=self.max_inflight))
        delay = max(0.0, (body.expiration_time - self._now()) / 1000.0) + CALLER_GRACE_S
        self._callers[reply_to.correlation] = self.clock.callLater(delay, self._caller_expired, reply_to)
        processing.addBoth(self._chain_done_for_caller, reply_to)
        return answered

    def _command_message(self, initiator: Initiator, device: Device, body: RpcBody, oneway: bool,
                         origin: CallerOrigin) -> RuleMessage:
        """ThingsBoard's RPC_CALL_FROM_SERVER_TO_DEVICE: ``params`` as JSON text, as its REST controller sends."""
        data = {"method": body.method, "params": compact_json(body.params),
                "additionalInfo": None if body.additional_info is None else compact_json(body.additional_info)}
        metadata = {"requestUUID": str(body.request_uuid), "originServiceId": self.service_id,
                    "expirationTime": str(body.expiration_time), "oneway": _text(oneway),
                    "persistent": _text(body.persistent), "deviceName": device.name, "deviceType": device.type}
        if body.retries is not None:
            metadata["retries"] = str(body.retries)
        customer = initiator.customer_id or (device.customer_id if device.customer_id != NULL_UUID else None)
        return RuleMessage.create(RPC_TO_DEVICE, EntityId("DEVICE", device.id), data, metadata, customer_id=customer,
                                  ts=self._now(), origin=origin)

    def _claim_caller(self, origin: Any, msg: RuleMessage) -> ReplyTo | None:
        """The REST caller this send answers: the first RPC Call Request of a user's command claims it."""
        if not isinstance(origin, CallerOrigin) or msg.type != RPC_TO_DEVICE:
            return None
        timer = self._callers.pop(origin.reply_to.correlation, None)
        if timer is None:
            return None
        if timer.active():
            timer.cancel()
        return origin.reply_to

    def _chain_done_for_caller(self, result: Any, reply_to: ReplyTo) -> None:
        timer = self._callers.pop(reply_to.correlation, None)
        if timer is None:
            return None  # a send claimed the caller
        if timer.active():
            timer.cancel()
        if isinstance(result, Failure):
            reason = result.getErrorMessage()
            log.warn("rule engine: a command's message failed in the root chain: {reason}", reason=reason)
            self.replies.fail(reply_to, CommandNotSent(f"The rule chain failed before it sent the command: {reason}"))
        else:
            self.replies.fail(reply_to, CommandNotSent())
        return None

    def _caller_expired(self, reply_to: ReplyTo) -> None:
        if self._callers.pop(reply_to.correlation, None) is not None:
            self.replies.fail(reply_to, CommandNotSentInTime())

    def send_rpc(self, tenant_id: UUID, msg: RuleMessage, device_id: UUID, method: str, params: Any, oneway: bool,
                 persistent: bool, expiration_time: int, retries: int | None, request_uuid: UUID | None,
                 additional_info: Any, rule_chain_id: UUID | None, rule_node_id: UUID | None) -> Deferred[RpcResult]:
        origin = msg.origin
        caller = self._claim_caller(origin, msg)
        user_id = origin.user_id if isinstance(origin, CallerOrigin) else None
        if request_uuid is None or (caller is None and isinstance(origin, CallerOrigin)
                                    and request_uuid == origin.request_uuid):
            request_uuid = uuid7()  # a second command made from one user's command gets an id of its own
        now = self._now()
        body = RpcBody(method=method, params=params, timeout=max(0, expiration_time - now),
                       expiration_time=expiration_time, persistent=persistent, retries=retries,
                       additional_info=additional_info, request_uuid=request_uuid, qos=None)
        initiator = Initiator(tenant_id, user_id=user_id, rule_chain_id=rule_chain_id or default_root_id(tenant_id),
                              rule_node_id=rule_node_id,
                              batch_id=origin.batch_id if caller is not None else None)  # type: ignore[union-attr]
        d = self.commands.submit(initiator, device_id, body, oneway)
        if caller is not None:
            d.addCallbacks(self._answer_caller, self._fail_caller, callbackArgs=(caller,), errbackArgs=(caller,))
        return d

    def _answer_caller(self, result: Any, caller: ReplyTo) -> Any:
        self.replies.answer(caller, result)
        return result

    def _fail_caller(self, failure: Failure, caller: ReplyTo) -> Failure:
        error = failure.value
        if isinstance(error, (CancelledError, TimeoutError)):  # the node stopped waiting for the outcome
            error = CommandNotSentInTime("The command's outcome did not come before the rule chain stopped waiting")
        self.replies.fail(caller, error)
        return failure

    # --- device-to-server calls (the device actors' device_calls) ---------------------------------------------------

    def device_called(self, device: Device, transport: str, session_id: int, request_id: int,
                      payload: bytes) -> bool:
        """A call no server method answers: True when the root chain takes it (the device is answered later)."""
        routes = self.routes_of(device.tenant_id)
        if routes.drops(RPC_FROM_DEVICE):
            return False  # the chain would drop it: the server methods answer "Unsupported method" as before
        try:
            request = json.loads(payload)
            method = request["method"]
        except (ValueError, TypeError, KeyError, RecursionError):
            return False
        key = (session_id, request_id)
        if key in self._device_calls:
            return False  # the same request id again while the first still runs
        root = self.root_of(device.tenant_id)
        metadata = {"deviceName": device.name, "deviceType": device.type, "requestId": str(request_id),
                    "serviceId": self.service_id, "sessionId": _session_ref(session_id)}
        customer = device.customer_id if device.customer_id != NULL_UUID else None
        message = RuleMessage.create(RPC_FROM_DEVICE, EntityId("DEVICE", device.id),
                                     {"method": method, "params": request.get("params")}, metadata,
                                     customer_id=customer, ts=self._now())
        processing = self.submit(device.tenant_id, root.chain, message)
        if processing is None:
            self._send_to_device(device, session_id, request_id,
                                 {"error": f"{method} failed: too many rule-engine messages in flight"})
            return True
        pending = _PendingCall(device, str(method))
        pending.timer = self.clock.callLater(self.device_call_timeout, self._device_call_expired, key)
        self._device_calls[key] = pending
        processing.addBoth(self._device_chain_done, key)
        return True

    def _device_chain_done(self, result: Any, key: tuple[int, int]) -> None:
        pending = self._device_calls.pop(key, None)
        if pending is None:
            return None  # answered by the chain
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        if isinstance(result, Failure):
            reason = result.getErrorMessage()
            log.warn("rule engine: a device call's message failed in the root chain: {reason}", reason=reason)
            answer: Any = {"error": f"{pending.method} failed: {reason}"}
        else:
            answer = {"error": f"Unsupported method: {pending.method}"}  # no chain answered: as without rules
        self._send_to_device(pending.device, key[0], key[1], answer)
        return None

    def _device_call_expired(self, key: tuple[int, int]) -> None:
        pending = self._device_calls.pop(key, None)
        if pending is not None:
            self._send_to_device(pending.device, key[0], key[1], {"error": "timeout"})

    def reply_to_device(self, msg: RuleMessage, device_id: UUID, request_id: int, session_ref: str,
                        body: str) -> bool:
        session_id = _session_of(session_ref)
        if session_id is None:
            return False
        pending = self._device_calls.pop((session_id, int(request_id)), None)
        if pending is None:
            return False  # answered already, timed out, or not a call of this node
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        self.port.tell(pending.device, m.ReplyToDevice(session_id, int(request_id), body.encode("utf-8")))
        return True

    def _send_to_device(self, device: Device, session_id: int, request_id: int, answer: Any) -> None:
        body = json.dumps(answer, separators=(",", ":")).encode()
        self.port.tell(device, m.ReplyToDevice(session_id, request_id, body))

    # --- persistent commands' status changes (the event stream) -----------------------------------------------------

    def _on_event(self, event: Any) -> None:
        if type(event) is not RpcStatusChanged or not event.persistent:
            return
        record = event.record
        msg_type = event.type
        if self.routes_of(record.tenant_id).drops(msg_type):
            return
        root = self.root_of(record.tenant_id)
        device = self.catalog.cached_device(record.device_id)
        customer = device.customer_id if device is not None and device.customer_id != NULL_UUID else None
        message = RuleMessage.create(msg_type, EntityId("DEVICE", record.device_id), rpc_json(record), {},
                                     customer_id=customer, ts=self._now())
        processing = self.submit(record.tenant_id, root.chain, message)
        if processing is not None:
            processing.addErrback(lambda f: log.warn("rule engine: {type} message failed: {reason}", type=msg_type,
                                                     reason=f.getErrorMessage()))

    # --- outgoing HTTP (REST API call node) -------------------------------------------------------------------------

    def http_request(self, method: str, url: str, headers: dict[str, str], body: bytes | None,
                     timeout: float) -> Deferred[tuple[int, str, dict[str, str], bytes]]:
        http = self.http
        kwargs: dict[str, Any] = {}
        if http is None:
            import treq
            from twisted.web.client import HTTPConnectionPool

            if self._http_pool is None:
                self._http_pool = HTTPConnectionPool(self.clock, persistent=True)  # type: ignore[arg-type]
                self._http_pool.maxPersistentPerHost = 8
            http = treq
            kwargs["pool"] = self._http_pool
            kwargs["reactor"] = self.clock

        async def call() -> tuple[int, str, dict[str, str], bytes]:
            response = await http.request(method.upper(), url, headers={k: [v] for k, v in headers.items()},
                                          data=body, timeout=timeout if timeout and timeout > 0 else None, **kwargs)
            content = await http.content(response)
            phrase = response.phrase.decode("latin-1") if isinstance(response.phrase, bytes) else str(response.phrase)
            answer_headers = {name.decode("latin-1"): values[-1].decode("latin-1")
                              for name, values in response.headers.getAllRawHeaders()}
            return response.code, phrase, answer_headers, content

        return ensureDeferred(call())

    def _now(self) -> int:
        return int(self.clock.seconds() * 1000)


class TenantContext:
    """The server's :class:`~nanoiot.rules.context.RuleContext` for one tenant."""

    __slots__ = ("service", "tenant_id", "clock")

    def __init__(self, service: RuleService, tenant_id: UUID) -> None:
        self.service = service
        self.tenant_id = tenant_id
        self.clock = service.clock

    def send_rpc(self, msg: RuleMessage, device_id: UUID, method: str, params: Any, oneway: bool, persistent: bool,
                 expiration_time: int, retries: int | None, request_uuid: UUID | None, additional_info: Any,
                 rule_chain_id: UUID, rule_node_id: UUID) -> Deferred[RpcResult]:
        return self.service.send_rpc(self.tenant_id, msg, device_id, method, params, oneway, persistent,
                                     expiration_time, retries, request_uuid, additional_info, rule_chain_id,
                                     rule_node_id)

    def reply_to_device(self, msg: RuleMessage, device_id: UUID, request_id: int, session_ref: str,
                        body: str) -> bool:
        return self.service.reply_to_device(msg, device_id, request_id, session_ref, body)

    def find_related(self, entity: EntityId, direction: str, relation_type: str, max_level: int,
                     entity_types: list[str]) -> Deferred[list[EntityId]]:
        d = self.service.store.find_related(self.tenant_id, entity.id, entity.entity_type, direction.upper(),
                                            relation_type or None, max_level, entity_types or None)
        return d.addCallback(lambda found: [EntityId(kind, value) for kind, value in found])

    def relation_exists(self, from_: EntityId, to: EntityId | None, relation_type: str,
                        to_type: str | None) -> Deferred[bool]:
        return self.service.store.relation_exists(
            self.tenant_id, (from_.entity_type, from_.id) if from_ is not None else None,
            (to.entity_type, to.id) if to is not None else None, relation_type, COMMON, to_type=to_type or None)

    def create_relation(self, from_: EntityId, to: EntityId, relation_type: str) -> Deferred[None]:
        record = RelationRecord(self.tenant_id, from_.id, from_.entity_type, to.id, to.entity_type, relation_type)
        return self.service.store.save_relation(record).addCallback(lambda _: None)

    def remove_relations(self, entity: EntityId, direction: str, relation_type: str) -> Deferred[None]:
        d = self.service.store.delete_entity_relations(self.tenant_id, entity.id, entity.entity_type,
                                                       direction.upper(), relation_type or None, COMMON)
        return d.addCallback(lambda _: None)

    def find_entity_by_name(self, entity_type: str, name: str) -> Deferred[EntityId | None]:
        d = self.service.store.find_entity_by_name(self.tenant_id, entity_type.upper(), name)
        return d.addCallback(lambda found: EntityId(*found) if found is not None else None)

    def customer_of(self, entity: EntityId) -> Deferred[UUID | None]:
        service = self.service

        async def customer() -> UUID | None:
            if entity.entity_type == "CUSTOMER":
                return entity.id
            if entity.entity_type == "DEVICE":
                device = await service.catalog.get_device(entity.id)
                owner = device.customer_id if device is not None and device.tenant_id == self.tenant_id else None
            elif entity.entity_type == "USER":
                user = await service.repository.get_user(entity.id)
                owner = user.customer_id if user is not None and user.tenant_id == self.tenant_id else None
            else:
                return None
            return None if owner in (None, NULL_UUID) else owner

        return ensureDeferred(customer())

    def http_request(self, method: str, url: str, headers: dict[str, str], body: bytes | None,
                     timeout: float) -> Deferred[tuple[int, str, dict[str, str], bytes]]:
        return self.service.http_request(method, url, headers, body, timeout)

    def run_chain(self, chain_id: UUID, msg: RuleMessage) -> Deferred[list[tuple[str, RuleMessage]]]:
        service = self.service
        return service.chain_of(self.tenant_id, chain_id).addCallback(
            lambda chain: service.engine.process(chain, msg, self))

    def log(self, text: str) -> None:
        chain_log.info("{text}", text=text)
