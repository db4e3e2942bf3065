"""ThingsBoard's HTTP device-RPC API as one twisted.web resource, mounted at ``/api/v1`` on the REST port.

* ``GET  /api/v1/{token}/rpc?timeout=<ms>`` long-polls for one command: 200 ``{"id","method","params"}``, or 408
  with an empty body when none came in time. ``timeout`` 0 or absent means ``default_poll_ms``; above
  ``max_poll_ms`` it is clamped; anything but a whole number is 400.
* ``POST /api/v1/{token}/rpc/{requestId}`` answers a command (the body is the answer, any bytes): 200, empty body.
* ``POST /api/v1/{token}/rpc`` ``{"method","params"}`` calls the server: 200 with the answer (application/json);
  ThingsBoard's ``{"error":"timeout"}`` if the server has not answered within ``default_poll_ms``.
* Unknown token 401 (empty body, as ThingsBoard); a body over ``max_payload`` 413; a bad ``requestId``, bad
  ``timeout`` or a call body that is not JSON 400; other paths 404; other methods 405. Errors other than 401/408
  carry ThingsBoard's JSON error body; empty responses carry no Content-Type.

How a request meets its device actor (through the device port, ``nanoiot/port/``): every request is a short-lived
:class:`~nanoiot.port.session.DeviceSession`, attached with ``attach(device, session, False)`` (non-exclusive: an HTTP
device may poll and call at once; nothing replaces anything), and reports through the
:class:`~nanoiot.port.link.DeviceLink` that returned, which always reaches the device's live actor.

* A poll is a one-shot :class:`HttpPollSession`: attached, then ``link.subscribed(one_shot=True)``, so the actor
  hands it at most one command. Writing that command finishes the response and answers
  ``Delivery.AWAITING_ACK``; once twisted.web reports the response written (``notifyFinish`` succeeded) the session
  reports ``link.acked`` and then ``link.closed``. When the client went away first (``notifyFinish`` failed) the
  session only reports ``link.closed``: the actor puts what was in flight on it back in the queue for the next poll.
  A command that reaches a poll already ended (timed out, client gone) gets ``Delivery.NOT_SENT``; the
  ``link.closed`` reported when it ended follows and returns the command to the queue. A command queued while no
  poll is open simply waits in the actor's queue.
* A device-to-server call is an :class:`HttpCallSession`: attached, then ``link.called``; the actor's
  ``send_reply`` becomes the response body, then the session closes its link (also when the client goes away first).
* An answer attaches a session just long enough to report ``link.answered`` (the actor parses the answer).

Once a session reported ``closed``, or the actor closed it (``close``), it drops its link (``NO_LINK``): nothing more
is reported.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from nanoiot.errors import (
    BadRequest,
    MethodNotAllowed,
    NanoError,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
    unexpected,
)
from nanoiot.limits import Counter, KeyedLimiter, parse_rates
from nanoiot.port.link import NO_LINK, Attach, DeviceLink
from nanoiot.port.session import Delivery, next_session_id
from nanoiot.jsontext import compact

log = Logger(namespace="nanoiot.http")

#: ThingsBoard's ``transport.http.request_timeout`` and ``max_request_timeout``, ms.
DEFAULT_POLL_MS = 60_000
MAX_POLL_MS = 300_000
#: ThingsBoard's cap on ``/api/v1/*/rpc/**`` bodies.
MAX_PAYLOAD = 65_536
#: ``requestId`` is a Java Integer in ThingsBoard.
_INT32 = re.compile(rb"[+-]?[0-9]{1,10}")
_WHOLE = re.compile(rb"[+-]?[0-9]+")
#: The answer to a device-to-server call the server did not answer in time (ThingsBoard's client-side timeout).
CALL_TIMEOUT_BODY = b'{"error":"timeout"}'

Authenticate = Callable[[str], Deferred]

OPEN, ANSWERED, ENDED = "open", "answered", "ended"


class _Session:
    """What the three kinds of request session share: the link to the actor, and noticing the client leave."""

    transport = "http"

    def __init__(self, api: DeviceApiResource, request: Any, device: Any) -> None:
        self.session_id = next_session_id()
        self.api = api
        self.request = request
        self.device = device
        #: What ``attach`` returned; ``NO_LINK`` before that, once detached, and once the actor closed this session
        #: itself (it already forgot it: report nothing more).
        self.link: DeviceLink = NO_LINK
        self.state = OPEN

    def attach(self) -> None:
        self.link = self.api.attach(self.device, self, False)

    def detach(self) -> None:
        link, self.link = self.link, NO_LINK
        link.closed()

    # --- DeviceSession defaults -----------------------------------------------------------------------------------

    def send_command(self, request_id: int, method: str, params: Any, qos: int) -> Delivery:
        return Delivery.NOT_SENT  # only a poll takes commands

    def send_reply(self, request_id: int, body: bytes) -> None:
        pass

    def close(self, reason: str) -> None:
        self.link = NO_LINK


class HttpPollSession(_Session):
    """One long poll: takes at most one command, then the poll ends."""

    def __init__(self, api: DeviceApiResource, request: Any, device: Any, timeout_ms: int) -> None:
        super().__init__(api, request, device)
        self.timeout_ms = timeout_ms
        self.sent_request_id: int | None = None
        self.timer: IDelayedCall | None = None

    def start(self) -> None:
        self.attach()
        self.timer = self.api.clock.callLater(self.timeout_ms / 1000.0, self._timed_out)
        self.request.notifyFinish().addCallbacks(self._written, self._gone)
        self.link.subscribed(one_shot=True)

    def send_command(self, request_id: int, method: str, params: Any, qos: int) -> Delivery:
        if self.state != OPEN:
            return Delivery.NOT_SENT  # timed out or the client left: the detach that follows re-queues it
        body = compact({"id": request_id, "method": method, "params": params})
        self.state = ANSWERED
        self.sent_request_id = request_id
        self._cancel_timer()
        try:
            self.request.setResponseCode(200)
            self.request.setHeader(b"content-type", b"application/json")
            self.request.write(body)
            self.request.finish()
        except Exception:  # the connection died under us without telling notifyFinish first
            log.failure("http: writing a command to a poll failed")
            self.sent_request_id = None
            if self.state == ANSWERED:
                self.state = ENDED
                self.detach()
            return Delivery.NOT_SENT
        return Delivery.AWAITING_ACK

    def close(self, reason: str) -> None:
        """The actor ends the poll (device deleted): no command, as when it times out."""
        super().close(reason)
        if self.state == OPEN:
            self._end(408)

    def _timed_out(self) -> None:
        self.timer = None
        if self.state == OPEN:
            self._end(408)  # ThingsBoard: 408 with an empty body

    def _end(self, status: int) -> None:
        self.state = ENDED
        self._cancel_timer()
        finish_empty(self.request, status)

    def _written(self, _: Any) -> None:
        """The response was handed to the connection: the command (if any) counts as acknowledged."""
        self._cancel_timer()
        self.state = ENDED
        if self.sent_request_id is not None:
            self.link.acked(self.sent_request_id)
        self.detach()

    def _gone(self, reason: Failure) -> None:
        """The client left before a response was written: whatever was in flight goes back to the queue."""
        self._cancel_timer()
        self.state = ENDED
        self.sent_request_id = None
        self.detach()

    def _cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class HttpCallSession(_Session):
    """One device-to-server call: the actor's reply is the response."""

    def __init__(self, api: DeviceApiResource, request: Any, device: Any, timeout_ms: int) -> None:
        super().__init__(api, request, device)
        self.timeout_ms = timeout_ms
        self.timer: IDelayedCall | None = None

    def start(self, payload: bytes) -> None:
        self.attach()
        self.timer = self.api.clock.callLater(self.timeout_ms / 1000.0, self._timed_out)
        self.request.notifyFinish().addBoth(self._finished)
        self.link.called(0, payload)  # ThingsBoard: an HTTP call's request id is 0

    def send_reply(self, request_id: int, body: bytes) -> None:
        self._respond(body)

    def close(self, reason: str) -> None:
        super().close(reason)
        self._respond(json.dumps({"error": reason}).encode())

    def _timed_out(self) -> None:
        self.timer = None
        self._respond(CALL_TIMEOUT_BODY)

    def _respond(self, body: bytes) -> None:
        if self.state != OPEN:
            return
        self.state = ANSWERED
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.request.setResponseCode(200)
        self.request.setHeader(b"content-type", b"application/json")
        self.request.write(body)
        self.request.finish()

    def _finished(self, _: Any) -> None:
        """Answered or the client left: either way this session is done."""
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.state = ENDED
        self.detach()


class HttpAnswerSession(_Session):
    """Lives for one answer: attached only so that the answer reaches the actor through a session."""

    def start(self, request_id: int, payload: bytes) -> None:
        self.attach()
        self.link.answered(request_id, payload)
        self.state = ENDED
        self.detach()


class DeviceApiResource(Resource):
    """A leaf below ``/api/v1``: ``request.postpath`` is ``[token, b"rpc", ...]``."""

    isLeaf = True

    def __init__(
        self,
        authenticate: Authenticate,
        attach: Attach,
        clock: IReactorTime,
        max_poll_ms: int = MAX_POLL_MS,
        default_poll_ms: int = DEFAULT_POLL_MS,
        max_payload: int = MAX_PAYLOAD,
        rate_limit: str = "",
        max_open_per_device: int = 0,
    ) -> None:
        super().__init__()
        self.authenticate = authenticate
        #: (device, session, exclusive) -> the session's link; every request session attaches non-exclusively.
        self.attach = attach
        self.clock = clock
        self.max_poll_ms = max(1, max_poll_ms)
        self.default_poll_ms = max(1, min(default_poll_ms, self.max_poll_ms))
        self.max_payload = max_payload
        #: Requests per device (``--http-device-rate-limit``, ThingsBoard's syntax); None: no limit.
        self.limiter: KeyedLimiter | None = None
        if rate_limit:
            self.limiter = KeyedLimiter(parse_rates(rate_limit), clock.seconds)
        #: Long polls and calls open per device (``--http-max-requests-per-device``; 0: no limit): each holds a
        #: session on the device's actor until it ends.
        self.open_requests: Counter = Counter(max_open_per_device)

    # --- twisted.web ----------------------------------------------------------------------------------------------

    def render(self, request: Any) -> Any:
        try:
            handler, token, argument = self._route(request)
        except NanoError as error:
            self._write_error(request, error)
            return NOT_DONE_YET
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        if token is None:
            d: Deferred = succeed(None)
        else:
            d = maybeDeferred(self.authenticate, token)
        d.addCallback(self._authenticated, request, handler, argument, gone)
        d.addErrback(self._failed, request, gone)
        return NOT_DONE_YET

    # --- routing and validation -----------------------------------------------------------------------------------

    def _route(self, request: Any) -> tuple[Callable[..., None], str | None, Any]:
        """(handler, token, validated argument); raises the error to answer with."""
        path = list(request.postpath or [])
        method = request.method
        if len(path) < 2 or not path[0] or path[1] != b"rpc":
            raise NotFound(f"No handler for {_text(method)} {_path(request)}")
        if _body_size(request) > self.max_payload:
            raise PayloadTooLarge(f"Payload size exceeds the limit of {self.max_payload} bytes")
        try:
            token: str | None = path[0].decode("utf-8")
        except UnicodeDecodeError:
            token = None  # no device has it
        if token is not None and "\x00" in token:
            token = None  # nor this (and PostgreSQL refuses NUL in a string parameter)
        if len(path) == 2:
            if method == b"GET":
                return self._poll, token, self._poll_timeout(request)
            if method == b"POST":
                body = _read_body(request)
                try:
                    json.loads(body)
                except (ValueError, RecursionError):
                    raise BadRequest("Invalid request body: expected JSON {\"method\", \"params\"}") from None
                return self._call, token, body
            raise MethodNotAllowed(f"Request method '{_text(method)}' is not supported")
        if len(path) == 3 and path[2]:
            if method != b"POST":
                raise MethodNotAllowed(f"Request method '{_text(method)}' is not supported")
            request_id = _request_id(path[2])
            body = _read_body(request)
            _guard_nesting(body)
            return self._answer, token, (request_id, body)
        raise NotFound(f"No handler for {_text(method)} {_path(request)}")

    def _poll_timeout(self, request: Any) -> int:
        values = (request.args or {}).get(b"timeout")
        raw = values[0] if values else b""
        if not raw:
            return self.default_poll_ms  # Spring: an empty value takes the default, like an absent one
        if _WHOLE.fullmatch(raw) is None:
            raise BadRequest("Invalid timeout: expected a whole number of milliseconds")
        digits = raw.lstrip(b"+-").lstrip(b"0")
        if not digits:
            return self.default_poll_ms  # 0: ThingsBoard's default request timeout
        if raw.startswith(b"-"):
            raise BadRequest("Invalid timeout: must be zero or more milliseconds")
        if len(digits) > 18:  # larger than any long: clamped like any other large value
            return self.max_poll_ms
        return min(int(digits), self.max_poll_ms)

    # --- handlers (after authentication) --------------------------------------------------------------------------

    def _authenticated(self, device: Any, request: Any, handler: Callable[..., None], argument: Any,
                       gone: list[Failure]) -> None:
        if gone:
            return  # the client left while we looked the token up
        if device is None:
            finish_empty(request, 401)  # ThingsBoard: 401 with an empty body
            return
        if self.limiter is not None:
            wait = self.limiter.take(device.id)
            if wait:
                self._write_error(request, TooManyRequests("Too many requests for current device!",
                                                           retry_after=wait))
                return
        handler(request, device, argument)

    def _poll(self, request: Any, device: Any, timeout_ms: int) -> None:
        if self._opened(request, device):
            HttpPollSession(self, request, device, timeout_ms).start()

    def _call(self, request: Any, device: Any, payload: bytes) -> None:
        if self._opened(request, device):
            HttpCallSession(self, request, device, self.default_poll_ms).start(payload)

    def _opened(self, request: Any, device: Any) -> bool:
        """Counts a long-lived request of ``device`` until it ends; False (answered 429) over the limit."""
        opened = self.open_requests
        if not opened.acquire(device.id):
            self._write_error(request, TooManyRequests(
                f"Too many open requests for this device (limit {opened.maximum})", limit=opened.maximum))
            return False
        request.notifyFinish().addBoth(lambda _: opened.release(device.id))
        return True

    def _answer(self, request: Any, device: Any, argument: tuple[int, bytes]) -> None:
        request_id, payload = argument
        HttpAnswerSession(self, request, device).start(request_id, payload)
        finish_empty(request, 200)

    # --- errors ---------------------------------------------------------------------------------------------------

    def _failed(self, failure: Failure, request: Any, gone: list[Failure]) -> None:
        if gone:
            return
        error = unexpected(failure, log, "http: device API request failed")
        try:
            self._write_error(request, error)
        except Exception:  # the response was already (partly) written: nothing more to say
            log.failure("http: could not write the error response")

    def _write_error(self, request: Any, error: NanoError) -> None:
        request.setResponseCode(error.http_status)
        body = error.to_json(int(self.clock.seconds() * 1000))
        for name, value in error.headers().items():
            request.setHeader(name, value)
        request.setHeader(b"content-type", b"application/json")
        request.write(compact(body))
        request.finish()


def finish_empty(request: Any, status: int) -> None:
    """An empty response, with no Content-Type (twisted.web would otherwise say text/html)."""
    request.defaultContentType = None
    request.setResponseCode(status)
    request.finish()


def _request_id(segment: bytes) -> int:
    if _INT32.fullmatch(segment) is None:
        raise BadRequest("Invalid requestId: expected an integer")
    value = int(segment)
    if not -(2**31) <= value < 2**31:
        raise BadRequest("Invalid requestId: expected an integer")
    return value


def _guard_nesting(body: bytes) -> None:
    """An answer may be any bytes, but one nested too deep for the JSON parser would crash the device actor that
    parses it (``RecursionError`` is not a ``ValueError``): refuse it here."""
    try:
        json.loads(body)
    except RecursionError:
        raise BadRequest("Invalid answer: nested too deeply") from None
    except ValueError:
        pass


def _body_size(request: Any) -> int:
    content = getattr(request, "content", None)
    if content is None:
        return 0
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    return size


def _read_body(request: Any) -> bytes:
    content = getattr(request, "content", None)
    if content is None:
        return b""
    content.seek(0)
    return content.read()


def _path(request: Any) -> str:
    path = getattr(request, "path", None)
    if not path:
        path = b"/" + b"/".join(list(getattr(request, "prepath", None) or []) + list(request.postpath or []))
    return _text(path)


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")
