"""REST API call: an outgoing HTTP request built from the message (ThingsBoard's TbRestApiCallNode, version 4).

The request: URL, query parameters, header names and values and the body template take ``${metadata}`` and
``$[data]`` patterns; POST, PUT, PATCH and DELETE send a body (unless ``ignoreRequestBody``): the template if set,
else the message data. The reply: 2xx -> Success with the response body as data (``{}`` when empty) and metadata
``status`` (e.g. "OK"), ``statusCode``, ``statusReason`` and each response header; other codes -> Failure with the
same metadata plus ``error_body``; no response at all -> Failure with metadata ``error`` ("<class>: <message>").

The HTTP itself is the server's (``ctx.http_request``, treq), with its own address policy. Not supported, refused
when the chain loads: proxies and credentials other than anonymous and basic.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from twisted.internet.defer import Deferred, DeferredSemaphore, maybeDeferred, succeed
from twisted.python.failure import Failure

from nanoiot.rules.message import SUCCESS, RuleMessage
from nanoiot.rules.nodes.base import BaseNode, InvalidConfig, NodeSpec, Outputs, failure
from nanoiot.rules.patterns import process_pattern

__all__ = ["HttpCall", "RestApiCallNode", "build_request", "response_outputs", "status_name"]

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE")
BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")
#: Used when ``readTimeoutMs`` is 0 (ThingsBoard: no read timeout); a request must end somewhere.
DEFAULT_TIMEOUT_S = 60.0
#: Keys that version 4 keeps (the v3 -> v4 upgrade drops all others; ``queryParams`` is not among them: an
#: upgraded legacy configuration keeps its query string inside the URL).
KNOWN_KEYS = frozenset({
    "restEndpointUrlPattern", "requestMethod", "headers", "readTimeoutMs", "maxParallelRequestsCount",
    "parseToPlainText", "enableProxy", "useSystemProxyProperties", "proxyHost", "proxyPort", "proxyUser",
    "proxyPassword", "credentials", "ignoreRequestBody", "requestBodyTemplate", "maxInMemoryBufferSizeInKb",
})
#: Spring's HttpStatus names where Python's differ.
_SPRING_NAMES = {413: "PAYLOAD_TOO_LARGE", 414: "URI_TOO_LONG", 416: "REQUESTED_RANGE_NOT_SATISFIABLE",
                 418: "I_AM_A_TEAPOT"}


def status_name(code: int, reason: str) -> tuple[str, str]:
    """(``status``, ``statusReason``) metadata for a status code, in Spring's words."""
    try:
        status = HTTPStatus(code)
    except ValueError:
        return str(code), reason
    return _SPRING_NAMES.get(code, status.name), status.phrase


def plain_text(data: str) -> str:
    """ThingsBoard's ``toPlainText``: a JSON string loses its quotes, anything else stays."""
    if len(data) >= 2 and data.startswith('"') and data.endswith('"'):
        try:
            value = json.loads(data)
        except ValueError:
            return data
        if isinstance(value, str):
            return value
    return data


class HttpCall:
    """One request, ready for ``ctx.http_request``."""

    __slots__ = ("body", "headers", "method", "timeout", "url")

    def __init__(self, method: str, url: str, headers: dict[str, str], body: bytes | None, timeout: float) -> None:
        self.method, self.url, self.headers, self.body, self.timeout = method, url, headers, body, timeout

    def __repr__(self) -> str:
        return f"HttpCall({self.method} {self.url} {self.headers} {self.body!r})"


class RequestError(ValueError):
    """A message that makes no valid request (bad URL, template that is not JSON)."""


def build_request(config: Mapping[str, Any], msg: RuleMessage, timeout: float) -> HttpCall:
    """The request ``msg`` makes under ``config`` (a version-4 configuration); raises RequestError."""
    url = process_pattern(config.get("restEndpointUrlPattern") or "", msg)
    if not url:
        raise RequestError("Url string cannot be empty!")
    params = config.get("queryParams")
    if params is None:
        # Legacy: the query string is part of the URL; characters that are not allowed in a URL are encoded.
        url = quote(url, safe=":/?#[]@!$&'()*+,;=%~")
    elif params:
        query = urlencode([(process_pattern(p["key"], msg), process_pattern(p["value"], msg)) for p in params])
        url = f"{url}{'&' if '?' in url else '?'}{query}"
    parts = urlsplit(url)
    if not parts.scheme:
        raise RequestError("Transport scheme(protocol) must be provided!")
    if not parts.netloc or not parts.hostname:
        raise RequestError("Url string is invalid!")
    headers = {process_pattern(k, msg): process_pattern(str(v), msg) for k, v in (config.get("headers") or {}).items()}
    credentials = config.get("credentials") or {}
    if credentials.get("type") == "basic":
        token = f"{credentials.get('username') or ''}:{credentials.get('password') or ''}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(token).decode("ascii")
    method = config.get("requestMethod") or "POST"
    body: bytes | None = None
    if method in BODY_METHODS and not config.get("ignoreRequestBody"):
        plain = bool(config.get("parseToPlainText"))
        template = config.get("requestBodyTemplate")
        if isinstance(template, str) and template.strip():
            text = process_pattern(template, msg, escape_json=not plain)
            if not plain:
                try:
                    json.loads(text)
                except ValueError:
                    raise RequestError(f"Request body template produced invalid JSON: {text}") from None
        elif plain:
            text = plain_text(msg.data)
        else:
            try:
                json.loads(msg.data)
            except ValueError:
                raise RequestError("Message data is not JSON (set parseToPlainText to send it as text)") from None
            text = msg.data
        body = text.encode("utf-8")
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "text/plain;charset=UTF-8" if plain else "application/json"
    return HttpCall(method, url, headers, body, timeout)


def response_outputs(msg: RuleMessage, status: int, reason: str, headers: Mapping[str, str],
                     body: bytes) -> Outputs:
    """The message a response makes: Success for 2xx, else Failure with ``error_body``."""
    metadata = msg.metadata_dict()
    name, phrase = status_name(status, reason)
    metadata.update(status=name, statusCode=str(status), statusReason=phrase)
    text = body.decode("utf-8", "replace")
    if 200 <= status < 300:
        metadata.update(headers)
        return [(SUCCESS, msg.with_(data=text or "{}", metadata=metadata))]
    metadata["error_body"] = text
    metadata.update(headers)
    return [failure(msg.with_(metadata=metadata), f"HTTP {status} {phrase}")]


def exception_outputs(msg: RuleMessage, error: BaseException) -> Outputs:
    metadata = msg.metadata_dict()
    metadata["error"] = f"{type(error).__name__}: {error}"
    return [failure(msg.with_(metadata=metadata), metadata["error"])]


class RestApiCallNode(BaseNode):
    """ThingsBoard's "rest api call"."""

    type = "org.thingsboard.rule.engine.rest.TbRestApiCallNode"
    version = 4
    default_config = {
        "restEndpointUrlPattern": "http://localhost/api", "requestMethod": "POST",
        "headers": {"Content-Type": "application/json"}, "queryParams": [], "readTimeoutMs": 0,
        "maxParallelRequestsCount": 0, "parseToPlainText": False, "enableProxy": False,
        "useSystemProxyProperties": False, "proxyHost": None, "proxyPort": 0, "proxyUser": None,
        "proxyPassword": None, "credentials": {"type": "anonymous"}, "ignoreRequestBody": False,
        "requestBodyTemplate": None, "maxInMemoryBufferSizeInKb": 256,
    }

    @classmethod
    def upgrade(cls, from_version: int, config: dict[str, Any]) -> dict[str, Any]:
        """ThingsBoard's steps, each applying to every older version (its switch falls through)."""
        if from_version <= 0 and "parseToPlainText" not in config and "trimDoubleQuotes" in config:
            config["parseToPlainText"] = bool(config.pop("trimDoubleQuotes"))
        if from_version <= 1 and "useRedisQueueForMsgPersistence" in config:
            for key in ("useRedisQueueForMsgPersistence", "trimQueue", "maxQueueSize"):
                config.pop(key, None)
        if from_version <= 2:
            config.setdefault("maxInMemoryBufferSizeInKb", 256)
        if from_version <= 3:
            config.setdefault("requestBodyTemplate", None)
            for key in list(config):
                if key not in KNOWN_KEYS:
                    del config[key]
        return config

    def __init__(self, spec: NodeSpec) -> None:
        super().__init__(spec)
        # queryParams: absent or null means the legacy URL (ThingsBoard's null); not taken from the defaults.
        self.config["queryParams"] = spec.configuration.get("queryParams")
        problems = []
        method = self.config.get("requestMethod")
        if method not in METHODS:
            problems.append(f"'requestMethod' must be one of {', '.join(METHODS)}")
        if not isinstance(self.config.get("restEndpointUrlPattern"), str) or not self.config["restEndpointUrlPattern"]:
            problems.append("'restEndpointUrlPattern' must be set")
        headers = self.config.get("headers")
        if headers is None:
            self.config["headers"] = {}
        elif not isinstance(headers, Mapping):
            problems.append("'headers' must be an object")
        params = self.config["queryParams"]
        if params is not None and (not isinstance(params, list) or not all(
                isinstance(p, Mapping) and isinstance(p.get("key"), str) and isinstance(p.get("value"), str)
                for p in params)):
            problems.append("query parameter names and values must be non-null")
        if self.flag("enableProxy"):
            problems.append("proxies are not supported here")
        credentials = self.config.get("credentials") or {"type": "anonymous"}
        if not isinstance(credentials, Mapping) or credentials.get("type") not in ("anonymous", "basic"):
            kind = credentials.get("type") if isinstance(credentials, Mapping) else credentials
            problems.append(f"credentials of type {kind!r} are not supported here (only anonymous and basic)")
        try:
            read_timeout_ms = self.number("readTimeoutMs", 0)
            parallel = self.number("maxParallelRequestsCount", 0)
        except InvalidConfig as e:
            problems.extend(e.messages)
            read_timeout_ms = parallel = 0
        if problems:
            raise InvalidConfig(*problems)
        self.timeout = read_timeout_ms / 1000 if read_timeout_ms > 0 else DEFAULT_TIMEOUT_S
        self.semaphore = DeferredSemaphore(parallel) if parallel > 0 else None

    def deadline(self, msg: RuleMessage, now: int, default: float) -> float | None:
        return None  # the request has its own timeout; a call that ends without response is a Failure

    def on_message(self, msg: RuleMessage, ctx: Any) -> Deferred[Outputs]:
        if self.semaphore is not None:
            return self.semaphore.run(self._call, msg, ctx)
        return self._call(msg, ctx)

    def _call(self, msg: RuleMessage, ctx: Any) -> Deferred[Outputs]:
        try:
            call = build_request(self.config, msg, self.timeout)
        except RequestError as e:
            return succeed(exception_outputs(msg, e))
        d = maybeDeferred(ctx.http_request, call.method, call.url, call.headers, call.body, call.timeout)
        # A guard for an http_request that never ends: its own timeout, and a little more.
        d.addTimeout(call.timeout + 1.0, ctx.clock)

        def answered(response: tuple[int, str, dict[str, str], bytes]) -> Outputs:
            status, reason, headers, body = response
            return response_outputs(msg, status, reason, headers, body)

        def failed(f: Failure) -> Outputs:
            return exception_outputs(msg, f.value)

        return d.addCallbacks(answered, failed)
