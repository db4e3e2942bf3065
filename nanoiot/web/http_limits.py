"""What the HTTP port bounds that twisted.web does not: a body refused by its ``Content-Length`` before it is read,
a deadline for a request's headers and one for its body (a byte a second does not keep a slow client alive), and
open connections per address.

twisted.web's own ``timeout`` is an idle timeout (every byte resets it) and it reads a whole body before any resource
sees the request, so these live in the channel: :class:`LimitedChannel` (one per connection) and
:class:`LimitedRequest` (one per request), which the site builds (``nanoiot/web/site.py``).

The deadlines cost one timer per connection that is never cancelled on the hot path: each phase records when it
began, and the timer, when it fires, only checks the phase and comes back later if the deadline is not reached.
Once a request is complete (a long poll waiting, a WebSocket taken over) no deadline applies to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.server import Request

from nanoiot.errors import NanoError, PayloadTooLarge
from nanoiot.limits import Counter
from nanoiot.jsontext import compact

log = Logger(namespace="nanoiot.http")

#: Where ThingsBoard's HTTP device API lives (its bodies have their own, smaller limit).
DEVICE_API_PREFIX = b"/api/v1/"
#: After refusing a body: seconds and bytes of it read and thrown away (so that the client, still sending, reads
#: the answer instead of a reset), then the connection is cut.
LINGER_SECONDS = 2.0
LINGER_BYTES = 256 * 1024
#: Seconds a timed-out client has to take its 408 before the connection is aborted.
ABORT_GRACE = 5.0

IDLE, HEADERS, BODY, HANDLING, REFUSED = range(5)
_PHASE_NAMES = {HEADERS: "headers", BODY: "body"}


class RequestTimeout(NanoError):
    http_status = 408
    default_message = "Request timeout"


@dataclass(frozen=True)
class HttpLimits:
    """The HTTP port's bounds (from ``--max-payload-size``, ``--http-max-payload-size``, ``--http-header-timeout``,
    ``--http-body-timeout``, ``--http-body-min-rate`` and ``--http-max-connections-per-address``)."""

    clock: IReactorTime
    max_body: int = 16 * 1024 * 1024
    max_device_body: int = 65_536
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    #: Each this many bytes of body received add a second to ``body_timeout`` (0: a fixed deadline).
    body_min_rate: int = 500
    #: Open connections per client address (0: no limit).
    max_per_address: int = 0

    def body_limit(self, target: bytes) -> int:
        return self.max_device_body if target.startswith(DEVICE_API_PREFIX) else self.max_body

    @classmethod
    def from_config(cls, config: Any, clock: IReactorTime) -> HttpLimits:
        return cls(clock, config.max_payload_size, config.http_max_payload_size, config.http_header_timeout,
                   config.http_body_timeout, config.http_body_min_rate, config.http_max_connections_per_address)


def raw_error_response(error: NanoError, now_ms: int) -> bytes:
    """A whole HTTP response carrying ``error`` as ThingsBoard's JSON error body, for a request no resource saw."""
    body = compact(error.to_json(now_ms))
    reason = RESPONSES.get(error.http_status, b"Error")
    head = [b"HTTP/1.1 %d %s" % (error.http_status, reason), b"Content-Type: application/json",
            b"Content-Length: %d" % len(body), b"Connection: close"]
    head += [name + b": " + value for name, value in error.headers().items()]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class LimitedRequest(Request):
    """Counts a body as it arrives: a chunked body (no ``Content-Length``) is refused once it passes the limit."""

    body_limit = 0
    _body_received = 0
    #: Called once, with no argument, if the connection is lost before the response was finished: what an errback
    #: on ``notifyFinish()`` hears, without a Deferred per request (the JSON router's waiting requests use it).
    on_lost: Callable[[], None] | None = None

    def connectionLost(self, reason: Any) -> None:
        Request.connectionLost(self, reason)
        on_lost = self.on_lost
        if on_lost is not None:
            self.on_lost = None
            on_lost()

    def handleContentChunk(self, data: bytes) -> None:
        self._body_received += len(data)
        if self._body_received > self.body_limit:
            channel = self.channel
            if isinstance(channel, LimitedChannel):
                channel.refuse_body(self.body_limit)
                return
        Request.handleContentChunk(self, data)


class LimitedChannel(HTTPChannel):
    """One HTTP connection with a deadline per phase of each request and a body limit checked on its headers."""

    limits: HttpLimits
    #: The client's address, counted in ``connections`` (None: not counted).
    address: str | None = None
    connections: Counter | None = None
    _phase = IDLE
    _started = 0.0
    _received = 0
    _timer: IDelayedCall | None = None
    #: When ``_timer`` fires (clock seconds).
    _due = 0.0
    _discarded = 0

    # --- phases ---------------------------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self._begin(HEADERS)  # a new connection has --http-header-timeout to send its first request's headers

    def dataReceived(self, data: bytes) -> None:
        phase = self._phase
        if phase == REFUSED:
            self._discard(data)
            return
        if phase == IDLE:
            self._begin(HEADERS)  # the first bytes of the next request on a kept-alive connection
        elif phase == BODY:
            self._received += len(data)
        super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        if self._phase == REFUSED:
            self._discard(data)
            return
        super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        limits = self.limits
        limit = limits.max_device_body if self._path.startswith(DEVICE_API_PREFIX) else limits.max_body
        if self.length is not None and self.length > limit:
            self.refuse_body(limit)  # before one byte of it is read
            return
        request = self.requests[-1]
        request.body_limit = limit
        super().allHeadersReceived()
        if self.length != 0 and self._phase == HEADERS:
            self._received = 0
            self._begin(BODY)

    def allContentReceived(self) -> None:
        if self._phase == REFUSED:
            return  # a refused chunked body's last chunk
        self._phase = HANDLING  # complete: no deadline while it is answered (a long poll may wait minutes)
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        self._phase = IDLE  # between requests twisted.web's idle timeout (--http-idle-timeout) applies
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:
        self._phase = REFUSED
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.release()
        super().connectionLost(reason)

    # --- deadlines ------------------------------------------------------------------------------------------------

    def _allowed(self, phase: int) -> float:
        limits = self.limits
        if phase == HEADERS:
            return limits.header_timeout
        if limits.body_min_rate:
            return limits.body_timeout + self._received / limits.body_min_rate
        return limits.body_timeout

    def _begin(self, phase: int) -> None:
        """Per request, on the hot path: a clock reading, and a timer only when none is pending (or the pending one
        would come after this phase's deadline)."""
        self._phase = phase
        limits = self.limits
        self._started = now = limits.clock.seconds()
        allowed = limits.header_timeout if phase == HEADERS else limits.body_timeout
        if self._timer is None:
            self._arm(allowed, now)
        elif self._due > now + allowed:
            self._timer.reset(allowed)
            self._due = now + allowed

    def _arm(self, delay: float, now: float) -> None:
        self._timer = self.limits.clock.callLater(delay, self._check)
        self._due = now + delay

    def _check(self) -> None:
        self._timer = None
        phase = self._phase
        if phase != HEADERS and phase != BODY:
            return  # between requests, answering one, or closed: the next phase arms a timer again
        clock = self.limits.clock
        allowed = self._allowed(phase)
        now = clock.seconds()
        left = self._started + allowed - now
        if left > 0:
            self._arm(left, now)
            return
        log.debug("http: closing {peer}: its request {what} did not arrive within {seconds:g} s",
                 peer=self.address or "a client", what=_PHASE_NAMES[phase], seconds=allowed)
        error = RequestTimeout(f"The request {_PHASE_NAMES[phase]} did not arrive within {allowed:g} seconds")
        self._phase = REFUSED
        self.transport.write(raw_error_response(error, int(clock.seconds() * 1000)))
        self.loseConnection()
        self._abortingCall = clock.callLater(ABORT_GRACE, self.forceAbortClient)

    # --- twisted.web's idle timeout, without a DelayedCall per request ---------------------------------------------

    def setTimeout(self, period: float | None) -> float | None:
        """twisted.web turns its idle timeout off while a request is handled (``setTimeout(None)``: the call is
        cancelled) and on again once it is answered (a new ``callLater``): a DelayedCall made and cancelled per
        request. Here turning it off keeps the armed call and only sets ``timeOut`` to None (no byte resets it, and
        should it fire meanwhile, :meth:`timeoutConnection` lets it go); turning it on resets the kept call, which
        costs no reordering of the reactor's calls. A closing connection's call is cancelled as before."""
        if period is None and self._phase != REFUSED:
            previous, self.timeOut = self.timeOut, None
            return previous
        return super().setTimeout(period)

    def timeoutConnection(self) -> None:
        if self.timeOut is None:
            return  # the idle call kept while a request was handled: this connection was not idle
        super().timeoutConnection()

    # --- refusing a body ------------------------------------------------------------------------------------------

    def refuse_body(self, limit: int) -> None:
        """413 with ThingsBoard's error body, then the connection closes: nothing of the body is kept; what the
        client still sends is read and dropped for a moment (``LINGER_*``) so that it sees the answer."""
        if self._phase == REFUSED:
            return
        self._phase = REFUSED
        self._buffer = b""  # what came with the headers stays unparsed and unkept
        self._dataBuffer = []
        clock = self.limits.clock
        error = PayloadTooLarge(f"Payload size exceeds the limit of {limit} bytes")
        self.transport.write(raw_error_response(error, int(clock.seconds() * 1000)))
        close_write = getattr(self.transport, "loseWriteConnection", None)
        if close_write is not None:
            close_write()
        else:
            self.loseConnection()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = clock.callLater(LINGER_SECONDS, self._abort)

    def _discard(self, data: bytes) -> None:
        self._discarded += len(data)
        if self._discarded > LINGER_BYTES:
            self._abort()

    def _abort(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is not None:
            transport.abortConnection()

    # --- connections per address ----------------------------------------------------------------------------------

    def release(self) -> None:
        """Stop counting this connection (closed, or handed over to a WebSocket that releases it itself)."""
        connections, self.connections = self.connections, None
        if connections is not None and self.address is not None:
            connections.release(self.address)

    def hand_over(self) -> Callable[[], None]:
        """The release of this connection's count, for the protocol that takes the connection over (a WebSocket:
        this channel hears nothing more of it)."""
        connections, self.connections = self.connections, None
        address = self.address
        self._phase = REFUSED  # no deadline, no parsing: the connection is not HTTP any more
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if connections is None or address is None:
            return _nothing
        return lambda: connections.release(address)


def _nothing() -> None:
    pass


class Refused(Protocol):
    """A connection over ``--http-max-connections-per-address``: cut as soon as it is made. (Not ``None`` from
    ``buildProtocol``: under TLS the wrapping factory would wrap ``None`` and fail in the listening port.)"""

    def connectionMade(self) -> None:
        self.transport.abortConnection()
