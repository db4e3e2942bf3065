"""Live RPC events and commands over WebSocket: ``ws://host:port/api/ws/rpc?token=<jwt>``, JSON text frames.

Client to server::

    {"cmd": "subscribe", "deviceId": "<uuid>" | "*", "id": <optional correlation>}
    {"cmd": "unsubscribe", "deviceId": "<uuid>" | "*", "id": ...}
    {"cmd": "rpc", "id": "<correlation>", "deviceId": "<uuid>", "oneway": false, "method": ..., "params": ...,
     "persistent": false, "timeout": 10000, ...}   # and expirationTime, retries, requestUUID, additionalInfo, qos

Server to client::

    {"event": "RPC_QUEUED" | ... | "RPC_DELETED", "deviceId": ..., "rpc": <Rpc JSON>, "persistent": bool}
    {"event": "DEVICE_ONLINE" | "DEVICE_OFFLINE", "deviceId": ..., "transport": ..., "node": ...}
    {"id": <correlation>, "status": 200, "body": <answer, {"rpcId": ...}, null, or a subscription's ack>}
    {"id": <correlation or null>, "status": 4xx | 5xx, "error": <the REST error body>}

The same rules as REST: a token checked at the upgrade (401 JSON otherwise, also for a deleted or disabled user),
then the socket closes with 4001 "token expired" when the token does, and with 4003 when its user is deleted or
disabled; commands go through :meth:`CommandService.submit` with the REST user's initiator; a
customer user subscribes to and commands its customer's devices only. Per socket: at most ``--ws-max-subscriptions``
subscriptions and ``--ws-max-inflight`` commands in flight (429), and a client that leaves more than
``--ws-max-buffer`` bytes unread is closed with 4008 "too slow".

The protocol work is :class:`WsSession` (plain methods over a :class:`Link`, tested in memory); Autobahn's protocol
below is only its adapter to a socket.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any, Callable, Hashable, Protocol
from uuid import UUID

import jwt
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from nanoiot import __version__
from nanoiot.commands.outcomes import NO_ANSWER, answer_of, failure_error
from nanoiot.commands.service import CommandService, Initiator
from nanoiot.errors import AuthenticationFailed, BadRequest, NanoError, TooManyRequests, unexpected
from nanoiot.errors import NotFound as NotFoundError
from nanoiot.rpc.body import parse_rpc_body
from nanoiot.rpc.model import RpcResult
from nanoiot.validation import uuid_param
from nanoiot.web.active_users import check_now
from nanoiot.web.event_hub import ALL, EventHub, customer_key, device_key, tenant_key
from nanoiot.web.rpc import initiator_of
from nanoiot.web.tokens import Principal, TokenIssuer
from nanoiot.jsontext import compact

log = Logger(namespace="nanoiot.ws")

CLOSE_TOKEN_EXPIRED = 4001
CLOSE_TOO_SLOW = 4008
#: The socket's user was deleted or disabled (or its tokens were revoked).
CLOSE_USER_REVOKED = 4003
#: Seconds a slow consumer gets to read up to the close frame before its connection is aborted.
SLOW_CLOSE_GRACE = 10.0
#: Seconds after the buffer was seen over the limit that it is looked at again (after the transport's flush).
SLOW_CHECK_DELAY = 0.05
#: Keep-alive: a ping every this many seconds; no pong within as many again closes the socket.
PING_INTERVAL = 30.0
COMMANDS = ("subscribe", "unsubscribe", "rpc")


class Link(Protocol):
    """What a session needs of its socket."""

    def send(self, data: bytes) -> None:
        """One text frame (UTF-8 JSON)."""

    def buffered(self) -> int:
        """Bytes written but not yet taken by the kernel."""

    def close(self, code: int, reason: str, grace: float | None = None) -> None:
        """Start the closing handshake; ``grace``: seconds the peer has to answer it (default: Autobahn's)."""


def _dumps(value: Any) -> bytes:
    # ASCII escapes: a lone surrogate a client sent (and an error echoes) still encodes.
    return compact(value)


class WsSession:
    """One WebSocket client: its frames in, its events and answers out. Frames are handled in order: a subscription
    given before a command is in place before that command's first event (a subscription may wait for its device's
    lookup; later frames wait behind it, but a command's answer is never waited for)."""

    #: The REST rate limits (``web/rate_limits.py``), shared by every socket; None: none configured.
    rate_limits: Any = None

    def __init__(self, principal: Principal, expires_at: float | None, link: Link, hub: EventHub,
                 commands: CommandService, devices: Any, config: Any, clock: Any) -> None:
        self.principal = principal
        self.link = link
        self.hub = hub
        self.commands = commands
        self.devices = devices
        self.clock = clock
        self.max_buffer = config.ws_max_buffer
        self.max_subscriptions = config.ws_max_subscriptions
        self.max_inflight = config.ws_max_inflight
        self.default_timeout = config.rpc_default_timeout
        self.min_timeout = config.rpc_min_timeout
        #: Subscription key -> the deviceId text the client gave.
        self.subscriptions: dict[Hashable, str] = {}
        self.inflight: set[Deferred] = set()
        self.closed = False
        self.close_code: int | None = None
        #: Frames waiting behind a subscription's device lookup, as (payload, binary).
        self._ops: deque[tuple[bytes | str, bool]] = deque()
        self._busy = False
        self._initiator: Initiator | None = None
        self._expiry = None
        self._slow_check: Any = None
        if expires_at is not None:
            self._expiry = clock.callLater(max(0.0, expires_at - clock.seconds()), self._token_expired)

    def now(self) -> int:
        return int(self.clock.seconds() * 1000)

    # --- out ------------------------------------------------------------------------------------------------------

    def deliver(self, frame: bytes) -> None:
        """An event frame from the hub."""
        self._send(frame)

    def _send(self, frame: bytes) -> None:
        if self.closed:
            return
        if self._slow_check is None and self.link.buffered() > self.max_buffer:
            # What this reactor turn wrote is still buffered until the turn's flush: only what the kernel refused
            # then (its socket buffer is full) shows a client that does not read. Look again after that flush.
            self._slow_check = self.clock.callLater(SLOW_CHECK_DELAY, self._check_slow)
        self.link.send(frame)

    def _check_slow(self) -> None:
        self._slow_check = None
        unread = self.link.buffered()
        if unread > self.max_buffer:
            log.info("ws: {email} reads too slowly ({unread} bytes unread, limit {limit}): closing",
                     email=self.principal.email, unread=unread, limit=self.max_buffer)
            self._close(CLOSE_TOO_SLOW, "too slow", SLOW_CLOSE_GRACE)

    def _reply(self, correlation: Any, body: Any) -> None:
        self._send(_dumps({"id": correlation, "status": 200, "body": body}))

    def _error(self, correlation: Any, error: NanoError) -> None:
        self._send(_dumps({"id": correlation, "status": error.http_status, "error": error.to_json(self.now())}))

    # --- closing --------------------------------------------------------------------------------------------------

    def _token_expired(self) -> None:
        self._expiry = None
        self._close(CLOSE_TOKEN_EXPIRED, "token expired")

    def _close(self, code: int, reason: str, grace: float | None = None) -> None:
        if self.closed:
            return
        self.close_code = code
        self.connection_lost()
        self.link.close(code, reason, grace)

    def connection_lost(self) -> None:
        """The socket closed (or is closing): no more frames either way; commands in flight are let go."""
        self.closed = True
        self._ops.clear()
        for call in (self._expiry, self._slow_check):
            if call is not None and call.active():
                call.cancel()
        self._expiry = self._slow_check = None
        tenant = self.principal.tenant_id
        self.hub.remove_all(self, [(key, tenant) for key in self.subscriptions])
        self.subscriptions.clear()
        for d in list(self.inflight):
            d.cancel()  # as REST does for a client that went away: its answer has nowhere to go
        self.inflight.clear()

    # --- in -------------------------------------------------------------------------------------------------------

    def handle(self, payload: bytes | str, binary: bool = False) -> None:
        """One frame from the client."""
        if self.closed:
            return
        if not self._busy and not self._ops:  # the common case: nothing waits, handled at once
            self._run(payload, binary)
            return
        if len(self._ops) >= self.max_inflight:  # frames piling up behind a subscription's device lookup
            self._refuse(payload, binary)
            return
        self._ops.append((payload, binary))
        self._drain()

    def _refuse(self, payload: bytes | str, binary: bool) -> None:
        try:
            frame = {} if binary else json.loads(payload)
        except (ValueError, RecursionError):
            frame = {}
        correlation = frame.get("id") if isinstance(frame, dict) else None
        self._error(correlation, TooManyRequests(f"Too many frames waiting on this socket (limit {self.max_inflight})",
                                                 limit=self.max_inflight))

    def _drain(self) -> None:
        while self._ops and not self._busy and not self.closed:
            payload, binary = self._ops.popleft()
            if not self._run(payload, binary):
                return  # the next frames wait behind this one

    def _run(self, payload: bytes | str, binary: bool) -> bool:
        """Handle one frame; False while it still waits (a subscription's device lookup): then it resumes the
        queue when done."""
        self._busy = True
        try:
            result = self._handle_frame(payload, binary)
        except Exception:
            log.failure("ws: handling a frame failed")
            result = None
        if result is not None:
            # ``marks`` tells the two cases apart: fired already (the callback ran inside addBoth, marking
            # it) or later (marked here first: then the callback resumes the queue).
            marks: list[bool] = []
            result.addBoth(self._op_done, marks)
            if not marks:
                marks.append(True)
                return False
        self._busy = False
        return True

    def _op_done(self, result: Any, marks: list[bool]) -> None:
        if isinstance(result, Failure):
            log.failure("ws: handling a frame failed", result)
        if marks:
            self._busy = False
            self._drain()
        else:
            marks.append(True)

    def _handle_frame(self, payload: bytes | str, binary: bool) -> Deferred | None:
        correlation = None
        try:
            if binary:
                raise BadRequest("Invalid frame: send JSON text frames, not binary ones")
            try:
                frame = json.loads(payload)
            except (ValueError, RecursionError):
                raise BadRequest("Invalid frame: not JSON") from None
            if not isinstance(frame, dict):
                raise BadRequest("Invalid frame: expected a JSON object")
            correlation = frame.get("id")
            cmd = frame.get("cmd")
            if cmd == "rpc":
                self._rpc(correlation, frame)
                return None
            if cmd == "subscribe":
                return self._subscribe(correlation, frame)
            if cmd == "unsubscribe":
                self._unsubscribe(correlation, frame)
                return None
            raise BadRequest(f"Invalid frame: unknown cmd {cmd!r}: use one of {', '.join(COMMANDS)}")
        except NanoError as error:
            self._error(correlation, error)
        return None

    # --- subscriptions --------------------------------------------------------------------------------------------

    @staticmethod
    def _target(frame: dict[str, Any]) -> UUID | str:
        raw = frame.get("deviceId")
        if raw == ALL:
            return ALL
        if not isinstance(raw, str):
            raise BadRequest(f"Invalid frame: 'deviceId' must be a device id or \"{ALL}\"")
        return uuid_param("deviceId", raw)

    def _all_key(self, initiator: Initiator) -> Hashable:
        if initiator.customer_id is not None:
            return customer_key(initiator.tenant_id, initiator.customer_id)
        return tenant_key(initiator.tenant_id)

    def _subscribe(self, correlation: Any, frame: dict[str, Any]) -> Deferred | None:
        target = self._target(frame)
        initiator = initiator_of(self.principal)  # a system administrator sees no device: 403
        if target == ALL:
            self._add(correlation, self._all_key(initiator), ALL)
            return None
        assert isinstance(target, UUID)
        device = self.devices.cached_device(target)
        if device is not None:
            self._subscribe_device(device, correlation, initiator, target)
            return None
        d = self.devices.get_device(target)
        d.addCallback(self._subscribe_device, correlation, initiator, target)
        d.addErrback(self._failed, correlation)
        return d

    def _subscribe_device(self, device: Any, correlation: Any, initiator: Initiator, target: UUID) -> None:
        if self.closed:
            return
        try:
            CommandService.check_access(initiator, device)
            self._add(correlation, device_key(target), str(target))
        except NanoError as error:
            self._error(correlation, error)

    def _add(self, correlation: Any, key: Hashable, text: str) -> None:
        if key not in self.subscriptions:
            if len(self.subscriptions) >= self.max_subscriptions:
                raise TooManyRequests(f"Too many subscriptions on this socket (limit {self.max_subscriptions})",
                                      limit=self.max_subscriptions)
            self.subscriptions[key] = text
            self.hub.add(self, key, self.principal.tenant_id)
        self._reply(correlation, {"subscribed": text, "subscriptions": len(self.subscriptions)})

    def _unsubscribe(self, correlation: Any, frame: dict[str, Any]) -> None:
        target = self._target(frame)
        initiator = initiator_of(self.principal)
        key = self._all_key(initiator) if target == ALL else device_key(target)  # type: ignore[arg-type]
        text = ALL if target == ALL else str(target)
        if self.subscriptions.pop(key, None) is not None:
            self.hub.remove(self, key, self.principal.tenant_id)
        self._reply(correlation, {"unsubscribed": text, "subscriptions": len(self.subscriptions)})

    # --- commands -------------------------------------------------------------------------------------------------

    def _rpc(self, correlation: Any, frame: dict[str, Any]) -> None:
        initiator = self._initiator
        if initiator is None:
            initiator = self._initiator = initiator_of(self.principal)  # a system administrator: 403, every time
        device_id = uuid_param("deviceId", frame.get("deviceId"))
        oneway = frame.get("oneway", False)
        if not isinstance(oneway, bool):
            raise BadRequest("Invalid frame: 'oneway' must be true or false")
        if len(self.inflight) >= self.max_inflight:
            raise TooManyRequests(f"Too many commands in flight on this socket (limit {self.max_inflight})",
                                  limit=self.max_inflight)
        if self.rate_limits is not None:  # the REST limits: tenant, customer, commands per device
            self.rate_limits.check_command(self.principal, device_id)
        body = parse_rpc_body(frame, self.now(), self.default_timeout, self.min_timeout)
        idempotent = isinstance(frame.get("requestUUID"), str)
        d = self.commands.submit(initiator, device_id, body, oneway, idempotent)
        if not d.called:  # refused or answered at once: no need to track it
            self.inflight.add(d)
        d.addCallbacks(self._answered, self._failed, callbackArgs=(correlation, body, oneway, d),
                       errbackArgs=(correlation, d))

    def _answered(self, result: RpcResult, correlation: Any, body: Any, oneway: bool, d: Deferred) -> None:
        self.inflight.discard(d)
        if oneway and result.ok and not body.persistent and type(correlation) is int:
            self._send(b'{"id":%d,"status":200,"body":null}' % correlation)  # the common one-way answer, as _reply
            return
        try:
            if not result.ok:
                raise failure_error(result, body.request_uuid)
            if body.persistent:
                answer = result.response
            else:
                answer = answer_of(result, oneway)
                answer = None if answer is NO_ANSWER else answer
        except NanoError as error:
            self._error(correlation, error)
            return
        self._reply(correlation, answer)

    def _failed(self, failure: Failure, correlation: Any, d: Deferred) -> None:
        self.inflight.discard(d)
        if failure.check(CancelledError) or self.closed:
            return
        error = failure.value
        if not isinstance(error, NanoError):
            log.failure("ws: unhandled error for {email}", failure, email=self.principal.email)
            error = NanoError()
        self._error(correlation, error)


# --- tokens -----------------------------------------------------------------------------------------------------------


def token_expiry(token: str) -> float | None:
    """The ``exp`` of a token already verified (so its claims are trusted here)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False, "verify_exp": False})
        return float(claims["exp"])
    except (jwt.PyJWTError, KeyError, TypeError, ValueError):
        return None


def _request_token(request: Request) -> str:
    values = request.args.get(b"token")
    if values:
        return values[0].decode("utf-8", "replace")
    header = request.getHeader(b"x-authorization") or request.getHeader(b"authorization")
    return header[7:].strip() if header else ""


def _handshake_token(params: dict[str, list[str]], headers: dict[str, str]) -> str:
    values = params.get("token")
    if values:
        return values[0]
    header = headers.get("x-authorization") or headers.get("authorization")
    return header[7:].strip() if header else ""


# --- Autobahn: the adapter to a socket --------------------------------------------------------------------------------


def buffered_bytes(transport: Any) -> int:
    """Bytes a Twisted TCP transport holds that the kernel has not taken yet (0 when it cannot tell)."""
    data = getattr(transport, "dataBuffer", None)
    if data is None:
        return 0
    return len(data) - getattr(transport, "offset", 0) + getattr(transport, "_tempDataLen", 0)


class _SocketLink:
    def __init__(self, protocol: RpcWebSocketProtocol) -> None:
        self.protocol = protocol

    def send(self, data: bytes) -> None:
        protocol = self.protocol
        if protocol.state != WebSocketProtocol.STATE_OPEN:  # closing (either side): dropped
            return
        n = len(data)
        if n < 65536 and not protocol.send_queue and protocol._perMessageCompress is None \
                and not 0 < protocol.maxMessagePayloadSize < n:
            # What sendMessage writes for an unfragmented, uncompressed, unmasked (server) text frame, without its
            # per-call bookkeeping: one of these per command answered.
            head = b"\x81" + (bytes((n,)) if n < 126 else b"\x7e" + n.to_bytes(2, "big"))
            protocol.transport.write(head + data)
            return
        protocol.sendMessage(data, isBinary=False)

    def buffered(self) -> int:
        return buffered_bytes(self.protocol.transport)

    def close(self, code: int, reason: str, grace: float | None = None) -> None:
        if grace is not None:
            self.protocol.closeHandshakeTimeout = grace
        self.protocol.sendClose(code, reason)


class RpcWebSocketProtocol(WebSocketServerProtocol):
    factory: RpcWebSocketFactory
    session: WsSession | None = None
    principal: Principal | None = None
    expires_at: float | None = None
    #: Called once when the connection is gone (set by the resource that took it over from the HTTP channel).
    release: Callable[[], None] | None = None

    def onConnect(self, request: Any) -> None:
        token = _handshake_token(request.params, request.headers)
        try:
            self.principal = self.factory.tokens.verify_access(token)
        except NanoError as error:  # checked by the resource already: only a token expiring just now gets here
            raise ConnectionDeny(error.http_status, error.message) from None
        self.expires_at = token_expiry(token)  # accepted, with no subprotocol

    def onOpen(self) -> None:
        assert self.principal is not None
        self.session = self.factory.new_session(self.principal, self.expires_at, _SocketLink(self))
        self.factory.open.add(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.session is not None:
            self.session.handle(payload, isBinary)

    def onMessageEnd(self) -> None:
        # Autobahn's own also fires its "message" observer event (a Deferred per frame) that nothing here listens
        # to: one frame per command, so that was a good part of a command's cost.
        if not self.failedByMe:
            self.onMessage(b"".join(self.message_data), self.message_is_binary)
        self.message_data = None

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.open.discard(self)
        if self.session is not None:
            self.session.connection_lost()

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        release, self.release = self.release, None
        if release is not None:
            release()  # the HTTP channel's count of connections per address (web/http_limits.py)


class RpcWebSocketFactory(WebSocketServerFactory):
    protocol = RpcWebSocketProtocol
    rate_limits: Any = None

    def __init__(self, hub: EventHub, commands: CommandService, devices: Any, tokens: TokenIssuer, config: Any,
                 clock: Any) -> None:
        super().__init__(server=f"NanoIoT/{__version__}", reactor=clock)
        # No UTF-8 validation of each frame here: the JSON decoder decodes it anyway (invalid UTF-8 is a 400).
        self.setProtocolOptions(maxMessagePayloadSize=config.max_payload_size, autoPingInterval=PING_INTERVAL,
                                autoPingTimeout=PING_INTERVAL, utf8validateIncoming=False)
        self.webStatus = False
        self.hub = hub
        self.commands = commands
        self.devices = devices
        self.tokens = tokens
        self.config = config
        self.clock = clock
        self.sessions = 0
        #: Open connections, closed with 1001 (going away) when the server stops.
        self.open: set[RpcWebSocketProtocol] = set()
        if getattr(tokens, "users", None) is not None:  # a deleted or disabled user's sockets close at once
            tokens.users.listeners.append(self.user_changed)

    def user_changed(self, user_id: UUID) -> None:
        """A user was deleted, disabled or changed: its open sockets are checked again, closed (4003) if refused."""
        for protocol in list(self.open):
            principal = protocol.principal
            if principal is not None and principal.user_id == user_id and protocol.session is not None:
                check_now(self.tokens.users, principal).addErrback(self._user_refused, protocol.session)

    @staticmethod
    def _user_refused(failure: Failure, session: WsSession) -> None:
        if failure.check(NanoError):
            session._close(CLOSE_USER_REVOKED, "user deleted or disabled")
        else:
            log.failure("ws: checking a user failed", failure)

    def close_all(self, reason: str = "NanoIoT is shutting down") -> int:
        """Send every open WebSocket a close frame (1001 going away); returns how many."""
        protocols = list(self.open)
        for protocol in protocols:
            protocol.sendClose(1001, reason)
        return len(protocols)

    def new_session(self, principal: Principal, expires_at: float | None, link: Link) -> WsSession:
        self.sessions += 1
        session = WsSession(principal, expires_at, link, self.hub, self.commands, self.devices, self.config,
                            self.clock)
        session.rate_limits = self.rate_limits
        return session


class RpcWebSocketResource(Resource):
    """``/api/ws/rpc``: the token is checked before the upgrade (a JSON 401 as REST gives, not an HTML page), then
    Autobahn's resource takes the connection over."""

    isLeaf = True

    def __init__(self, factory: RpcWebSocketFactory) -> None:
        super().__init__()
        self.factory = factory
        self.websocket = WebSocketResource(factory)

    def render(self, request: Request) -> Any:
        try:
            principal = self.factory.tokens.verify_access(_request_token(request) or _missing_token())
            upgrade = (request.getHeader(b"upgrade") or b"").lower()
            if upgrade != b"websocket":
                raise BadRequest("This is a WebSocket endpoint: connect with a WebSocket client")
            users = self.factory.tokens.users
            # A deleted or disabled user is refused; when its state is not cached yet, ask first, then render again.
            waiting = users.admit(principal) if users is not None else None
            if waiting is not None:
                waiting.addCallbacks(lambda _: _finish(request, self.render(request)),
                                     lambda failure: _finish(request, self._refusal(request, failure)))
                return NOT_DONE_YET
        except NanoError as error:
            return self._refusal(request, error)
        # The HTTP channel's idle timeout would fire on a transport it no longer owns.
        channel = getattr(request, "channel", None)
        if channel is not None and hasattr(channel, "setTimeout"):
            channel.setTimeout(None)
        transport = getattr(channel, "transport", None)
        result = self.websocket.render(request)
        # The channel hears nothing more of this connection: its WebSocket releases its count per address.
        protocol = getattr(transport, "wrappedProtocol", None) or getattr(transport, "protocol", None)  # TLS or TCP
        protocol = getattr(protocol, "wrappedProtocol", protocol)
        if isinstance(protocol, RpcWebSocketProtocol) and hasattr(channel, "hand_over"):
            protocol.release = channel.hand_over()
        return result


    def _refusal(self, request: Request, error: Any) -> bytes:
        """The JSON error answer to an upgrade refused with ``error`` (a NanoError, or a Failure of anything else:
        a 500 with an error id)."""
        error = unexpected(error, log, "ws: checking a user failed")
        data = _dumps(error.to_json(int(self.factory.clock.seconds() * 1000)))
        request.setResponseCode(error.http_status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(data))
        return data


def _missing_token() -> str:
    raise AuthenticationFailed("Authentication failed: give the JWT as ?token=")


def _finish(request: Request, result: Any) -> None:
    """Write what a later :meth:`RpcWebSocketResource.render` returned (unless it took the connection over)."""
    if result is NOT_DONE_YET or request.finished or getattr(request, "_disconnected", False):
        return
    request.write(result)
    request.finish()


class _NotFound(Resource):
    isLeaf = True

    def __init__(self, clock: Any) -> None:
        super().__init__()
        self.clock = clock

    def render(self, request: Request) -> bytes:
        path = request.path.decode("utf-8", "replace")
        data = _dumps(NotFoundError(f"No handler for {request.method.decode()} {path}").to_json(
            int(self.clock.seconds() * 1000)))
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        return data


class WebSocketRoot(Resource):
    """``/api/ws``: ``rpc`` below it; anything else is the API's JSON 404."""

    #: The connections' factory (the server closes them at shutdown).
    factory: RpcWebSocketFactory | None = None

    def __init__(self, rpc: RpcWebSocketResource, clock: Any) -> None:
        super().__init__()
        self.rpc = rpc
        self.not_found = _NotFound(clock)

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self.rpc if path == b"rpc" else self.not_found

    def render(self, request: Request) -> bytes:
        return self.not_found.render(request)


def websocket_resource(hub: EventHub, commands: CommandService, devices: Any, tokens: TokenIssuer, config: Any,
                       clock: Any) -> WebSocketRoot:
    """``/api/ws``, with ``rpc`` below it."""
    factory = RpcWebSocketFactory(hub, commands, devices, tokens, config, clock)
    root = WebSocketRoot(RpcWebSocketResource(factory), clock)
    root.factory = factory
    return root
