"""A small JSON router on twisted.web: path patterns to async handlers, with auth, size limits and errors mapped
to ThingsBoard's error body in one place."""

from __future__ import annotations

import re
from inspect import iscoroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Awaitable, Callable
from urllib.parse import unquote

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from nanoiot.errors import (AuthenticationFailed, BadRequest, MethodNotAllowed, NanoError, NotFound, PayloadTooLarge,
                            ServiceUnavailable, unexpected)
from nanoiot.web.http_limits import LimitedRequest
from nanoiot.web.tokens import Principal, TokenIssuer
from nanoiot.jsontext import compact
from nanoiot.rpc.payload import loads as json_loads

log = Logger(namespace="nanoiot.web")

#: Marks a response with no body (ThingsBoard answers some calls with an empty 200).
NO_BODY = object()
#: Matched paths a Router remembers at most (then it starts again).
MAX_MATCHES_KEPT = 10_000


@dataclass
class Response:
    status: int = 200
    body: Any = NO_BODY
    content_type: bytes = b"application/json"


class ApiRequest:
    """What a handler sees: path parameters, query, body and the verified caller."""

    __slots__ = ("request", "params", "principal", "clock")

    def __init__(self, request: Request, params: dict[str, str], principal: Principal | None,
                 clock: IReactorTime) -> None:
        self.request = request
        self.params = params
        self.principal = principal
        self.clock = clock

    @property
    def user(self) -> Principal:
        assert self.principal is not None
        return self.principal

    def now(self) -> int:
        return int(self.clock.seconds() * 1000)

    def query(self, name: str, default: str | None = None) -> str | None:
        values = self.request.args.get(name.encode())
        if not values:
            return default
        return values[0].decode("utf-8", "replace")

    def raw_body(self) -> bytes:
        content = self.request.content
        if content is None:
            return b""
        content.seek(0)
        return content.read()

    def json_body(self) -> Any:
        raw = self.raw_body()
        try:
            return json_loads(raw)  # json.loads, without its encoding detection for a JSON object (every RPC body)
        except (ValueError, RecursionError):  # RecursionError: a body nested thousands of levels deep
            raise BadRequest("Invalid request body") from None

    def on_disconnect(self) -> Deferred:
        return self.request.notifyFinish()


Handler = Callable[[ApiRequest], Awaitable[Any] | Any]


@dataclass
class Route:
    method: bytes
    pattern: re.Pattern[str]
    handler: Handler
    authenticated: bool = True
    #: The template's text before its first parameter: a cheap test before the regular expression.
    prefix: str = ""


@dataclass
class Router:
    routes: list[Route] = field(default_factory=list)
    #: Routes by their path's second segment ("rpc" of /api/rpc/...), in order; a route with a parameter there is in
    #: every list and under None. Built on the first match after an add: a match scans a handful, not every route.
    _by_head: dict[str | None, list[Route]] | None = field(default=None, repr=False, compare=False)
    #: (method, path) -> its route and parameters, for paths met before (a device's RPC path comes again and again):
    #: no regular expression per request. Cleared by ``add`` and when it holds MAX_MATCHES_KEPT.
    _matched: dict[tuple[bytes, str], tuple[Route, dict[str, str]]] = field(default_factory=dict, repr=False,
                                                                              compare=False)

    def add(self, method: str, template: str, handler: Handler, authenticated: bool = True) -> None:
        """``template`` like ``/api/device/{deviceId}``; a parameter matches one path segment."""
        regex = "^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template) + "$"
        prefix = template.split("{", 1)[0]
        self.routes.append(Route(method.encode(), re.compile(regex), handler, authenticated, prefix))
        self._by_head = None
        self._matched.clear()

    def _index(self) -> dict[str | None, list[Route]]:
        index: dict[str | None, list[Route]] = {head: [] for head in map(_route_head, (r.prefix for r in self.routes))}
        index[None] = []
        for route in self.routes:
            head = _route_head(route.prefix)
            for key, routes in index.items():
                if head is None or key == head:
                    routes.append(route)
        self._by_head = index
        return index

    def match(self, method: bytes, path: str) -> tuple[Route, dict[str, str]]:
        """The route of ``method`` and ``path`` and the path's parameters (a dict of the caller's own)."""
        found = self._matched.get((method, path))
        if found is not None:
            return found[0], found[1].copy()
        route, params = self._match(method, path)
        if len(self._matched) >= MAX_MATCHES_KEPT:
            self._matched.clear()
        self._matched[(method, path)] = (route, params.copy())
        return route, params

    def _match(self, method: bytes, path: str) -> tuple[Route, dict[str, str]]:
        index = self._by_head
        if index is None:
            index = self._index()
        candidates = index.get(_head(path))
        if candidates is None:
            candidates = index[None]
        allowed = False
        for route in candidates:
            if not path.startswith(route.prefix):
                continue
            found = route.pattern.match(path)
            if found is None:
                continue
            if route.method != method:
                allowed = True
                continue
            params = found.groupdict()
            if "%" in path:
                params = {k: unquote(v) for k, v in params.items()}
            return route, params
        if allowed:
            raise MethodNotAllowed(f"Request method '{method.decode()}' is not supported")
        raise NotFound(f"No handler for {method.decode()} {path}")


def _head(path: str) -> str:
    """The second segment of a path: ``rpc`` of ``/api/rpc/twoway/x`` ("" when there is none)."""
    parts = path.split("/", 3)
    return parts[2] if len(parts) > 2 else ""


def _route_head(prefix: str) -> str | None:
    """A route's second segment when its template fixes it (the prefix runs past it), else None (any)."""
    parts = prefix.split("/", 3)
    return parts[2] if len(parts) > 3 else None


class JsonApi(Resource):
    """A leaf resource that routes every request below it."""

    isLeaf = True
    #: Per tenant, customer and device REST rate limits (``web/rate_limits.py``); None: none configured.
    rate_limits: Any = None

    def __init__(self, router: Router, tokens: TokenIssuer, clock: IReactorTime, max_payload_size: int) -> None:
        super().__init__()
        self.router = router
        self.tokens = tokens
        self.clock = clock
        self.max_payload_size = max_payload_size
        #: Requests whose handler has not answered yet (each with its "gone" flag): answered 503 at shutdown.
        self.waiting: dict[Request, list[bool]] = {}
        #: Set when the server is stopping: requests on connections still open are refused with 503.
        self.draining: ServiceUnavailable | None = None

    def render(self, request: Request) -> Any:
        path = request.path.decode("utf-8", "replace")
        try:
            if self.draining is not None:
                request.setHeader(b"connection", b"close")
                raise self.draining
            route, params = self.router.match(request.method, path)
            if _body_size(request) > self.max_payload_size:
                raise PayloadTooLarge(f"Payload size exceeds the limit of {self.max_payload_size} bytes")
            principal = self._authenticate(request) if route.authenticated else None
            if self.rate_limits is not None and principal is not None:
                self.rate_limits.check(principal, request.method, params)  # 429 (web/rate_limits.py)
        except NanoError as error:
            self._write_error(request, error)
            return NOT_DONE_YET
        api_request = ApiRequest(request, params, principal, self.clock)
        try:
            result = route.handler(api_request)
        except Exception:
            self._fail(request, Failure(), [])
            return NOT_DONE_YET
        # Handlers return a value, a Deferred or a coroutine; only the last needs ensureDeferred (the RPC handler,
        # the hot path, returns the actor's Deferred: no coroutine machinery per call).
        if type(result) is Deferred or isinstance(result, Deferred):  # isinstance alone: ABCMeta's slow check
            d = result
        elif iscoroutine(result):
            d = ensureDeferred(result)
        else:
            self._write(request, result, [])
            return NOT_DONE_YET
        gone: list[bool] = []
        if isinstance(request, LimitedRequest):  # the server's requests: a callable, not a Deferred per request
            request.on_lost = partial(_client_gone, None, gone, d)
        else:
            request.notifyFinish().addErrback(_client_gone, gone, d)
        self.waiting[request] = gone
        # One callback pair, bound methods and arguments: no closures per request.
        d.addCallbacks(self._answered, self._failed, callbackArgs=(request, gone), errbackArgs=(request, gone))
        return NOT_DONE_YET

    def _answered(self, value: Any, request: Request, gone: list[bool]) -> None:
        self.waiting.pop(request, None)
        self._write(request, value, gone)

    def _failed(self, failure: Failure, request: Request, gone: list[bool]) -> None:
        self.waiting.pop(request, None)
        self._fail(request, failure, gone)

    def refuse_waiting(self, error: NanoError) -> int:
        """Answer every request still waiting for its handler with ``error`` (at shutdown: a clear 503 rather
        than a dropped connection); their handlers' later results are discarded. Returns how many."""
        waiting = list(self.waiting.items())
        self.waiting.clear()
        for request, gone in waiting:
            if gone:
                continue
            gone.append(True)
            request.setHeader(b"connection", b"close")
            try:
                self._write_error(request, error)
            except Exception:  # the connection went away meanwhile: nothing to say
                pass
        return len(waiting)

    def _authenticate(self, request: Request) -> Principal:
        header = request.getHeader(b"x-authorization") or request.getHeader(b"authorization")
        if not header:
            raise AuthenticationFailed("Authentication failed")
        # ThingsBoard strips the first 7 characters ("Bearer ") without checking them; so do we.
        return self.tokens.verify_access(header[7:].strip())

    def _write(self, request: Request, value: Any, gone: list[bool]) -> None:
        if gone:
            return
        if isinstance(value, Response):
            body, content_type = value.body, value.content_type
            request.setResponseCode(value.status)
        else:  # a plain value (the RPC answer): 200 with its JSON, and no Response object per request
            body, content_type = value, b"application/json"
            if request.code != 200:  # a new request's code is 200 already
                request.setResponseCode(200)
        if body is NO_BODY:
            request.finish()
            return
        if isinstance(body, bytes):
            data = body
        else:
            data = compact(body)
        request.setHeader(b"content-type", content_type)
        # A length instead of chunked framing: one less write, and what HTTP/1.0 clients need anyway.
        request.setHeader(b"content-length", b"%d" % len(data))
        request.write(data)
        request.finish()

    def _fail(self, request: Request, failure: Failure, gone: list[bool]) -> None:
        if gone or failure.check(CancelledError):
            return
        error = unexpected(failure, log, "unhandled error in {method} {path}", method=request.method.decode(),
                           path=request.path.decode("utf-8", "replace"))
        self._write_error(request, error)

    def _write_error(self, request: Request, error: NanoError) -> None:
        body = error.to_json(int(self.clock.seconds() * 1000))
        request.setResponseCode(error.http_status)
        data = compact(body)
        for name, value in error.headers().items():
            request.setHeader(name, value)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(data))
        request.write(data)
        request.finish()


def _client_gone(_: Any, gone: list[bool], d: Deferred) -> None:
    """The caller went away before its answer: its handler's Deferred is cancelled (the answer is dropped)."""
    gone.append(True)
    d.cancel()


def _body_size(request: Request) -> int:
    content = request.content
    if content is None:
        return 0
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    return size
