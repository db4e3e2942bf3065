"""The CoAP listener: ThingsBoard's CoAP device-RPC API on a Twisted ``DatagramProtocol``.

Resources (``/api/v1/{token}`` is the device's access token):

* ``GET  /api/v1/{token}/rpc`` with Observe=0 registers for commands: 2.03 Valid with Observe; every command then
  arrives as a 2.05 notification ``{"id","method","params"}``, CON when the registration was CON (its ACK marks
  the command DELIVERED), NON otherwise (delivered on write). Observe=1 deregisters (2.05).
* ``POST /api/v1/{token}/rpc/{requestId}`` answers a command: 2.01 Created.
* ``POST /api/v1/{token}/rpc`` is a device-to-server call ``{"method","params"}``: 2.05 with the server's answer,
  piggy-backed when it is ready within 500 ms, else an empty ACK first and a separate response.
* Unknown token 4.01; bad path or bad JSON 4.00; other methods 4.05; a body over ``max_payload`` 4.13.

A datagram that does not decode is dropped with one (rate-limited) log line; a CON whose header was readable is
rejected with an RST. ``datagramReceived`` never raises.

How a session meets its device actor (through the device port, ``nanoiot/port/``): ``attach(device, session,
exclusive)`` returns the session's :class:`~nanoiot.port.link.DeviceLink`, and the session reports through it. The
observe registration creates a :class:`CoapSession`, attached with ``exclusive=True`` (a newer registration of the
same device replaces it; the old observation gets a final 2.02 Deleted without Observe), then ``link.subscribed()``;
an ACK to a CON notification (or a queued NON notification written) is ``link.acked``, an answer ``link.answered``,
the observation ending (RST, no ACK, deregistration, server stop) ``link.closed``. Answers without an observation and
calls use a short-lived :class:`CoapRequestSession`, attached with ``exclusive=False`` (``link.answered`` or
``link.called``) and closed once done, so that a registration racing with a call never evicts the call; its
``transport`` is ``"coap-request"`` for that reason. Once a session's link is closed, or the actor closed the session,
the session drops its link (``NO_LINK``).

One CON notification in flight per observer: a command sent while one is unacknowledged (or while the device is
still fetching the Block2 blocks of the previous one) waits in a bounded per-observer queue (``max_queued``) and the
session answers ``Delivery.AWAITING_ACK``; ``Delivery.NOT_SENT`` only when that queue is full. A command the actor
sends again while it is queued or in flight is not duplicated.
"""

from __future__ import annotations

import json
import math
import random as _random
from collections import Counter
from typing import Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from nanoiot.errors import ServiceUnavailable
from nanoiot.limits import KeyedLimiter
from nanoiot.port.link import NO_LINK, Attach, DeviceLink
from nanoiot.port.session import Delivery, next_session_id
from nanoiot.transports.coap import codec
from nanoiot.transports.coap.blockwise import (
    MAX_SZX,
    Block1Assembler,
    Block1Status,
    Block2Store,
    Representation,
    clamp_szx,
    split,
)
from nanoiot.transports.coap.messages import Address, Exchange, MessageLayer, Sweeper
from nanoiot.transports.coap.observe import MAX_QUEUED, Observer, ObserveRegistry
from nanoiot.jsontext import compact

log = Logger(namespace="nanoiot.coap")

#: ThingsBoard's client-side RPC timeout: a call the server has not answered by then gets {"error":"timeout"}.
CALL_TIMEOUT = 60.0
#: The largest UDP payload there is (IPv4).
MAX_DATAGRAM = 65535
#: Block1 transfers in progress at most (each holds up to ``max_payload`` bytes).
MAX_BLOCK1_TRANSFERS = 1000


class _LogBudget:
    """At most ``limit`` lines per ``window`` seconds for one kind of noise, then one line saying how many were not."""

    def __init__(self, clock: IReactorTime, limit: int = 10, window: float = 60.0) -> None:
        self.clock = clock
        self.limit = limit
        self.window = window
        self.start = -window
        self.used = 0
        self.suppressed = 0

    def allow(self) -> bool:
        now = self.clock.seconds()
        if now >= self.start + self.window:
            if self.suppressed:
                log.info("coap: {n} more bad datagrams were dropped without a log line", n=self.suppressed)
            self.start, self.used, self.suppressed = now, 0, 0
        if self.used < self.limit:
            self.used += 1
            return True
        self.suppressed += 1
        return False


def _route(path: tuple[str, ...]) -> tuple[str, str | None] | None:
    """(access token, request id segment or None) for ``api/v1/{token}/rpc[/{id}]``; None for any other path."""
    if len(path) in (4, 5) and path[0] == "api" and path[1] == "v1" and path[2] and path[3] == "rpc":
        return path[2], (path[4] if len(path) == 5 else None)
    return None


def _parse_request_id(segment: str) -> int | None:
    if not segment.isascii() or not segment.isdigit() or len(segment) > 10:
        return None
    value = int(segment)
    return value if value <= 0x7FFFFFFF else None


def _is_json(payload: bytes) -> bool:
    try:
        json.loads(payload)
    except (ValueError, RecursionError):
        return False
    return True




class CoapSession:
    """A device's observation of ``/rpc``: commands go out as notifications on it."""

    transport = "coap"

    def __init__(self, server: CoapServer, device: Any) -> None:
        self.session_id = next_session_id()
        self.server = server
        self.device = device
        #: What ``attach`` returned; ``NO_LINK`` before that and once closed.
        self.link: DeviceLink = NO_LINK
        self.observer: Observer | None = None
        self.closed = False

    def send_command(self, request_id: int, method: str, params: Any, qos: int) -> Delivery:
        """Confirmability follows the registration (ThingsBoard), not ``qos``."""
        observer = self.observer
        if self.closed or observer is None:
            return Delivery.NOT_SENT
        payload = compact({"id": request_id, "method": method, "params": params})
        return self.server._notify(observer, request_id, payload)

    def send_reply(self, request_id: int, body: bytes) -> None:
        # Calls come through their own CoapRequestSession; nothing is waiting for this on an observation.
        log.debug("coap: reply {request_id} for an observe session dropped", request_id=request_id)

    def close(self, reason: str) -> None:
        self.server._close_session(self, reason)


class CoapRequestSession:
    """One answer or call exchange, attached non-exclusively for as long as it needs the actor."""

    transport = "coap-request"

    def __init__(self, server: CoapServer, device: Any, exchange: Exchange | None,
                 options: list[tuple[int, Any]] | None = None) -> None:
        self.session_id = next_session_id()
        self.server = server
        self.device = device
        self.exchange = exchange
        self.options = options or []
        #: What ``attach`` returned; ``NO_LINK`` before that and once done.
        self.link: DeviceLink = NO_LINK
        self.timer: IDelayedCall | None = None
        self.done = exchange is None

    def send_command(self, request_id: int, method: str, params: Any, qos: int) -> Delivery:
        return Delivery.NOT_SENT  # never subscribed; the actor has no reason to send here

    def send_reply(self, request_id: int, body: bytes) -> None:
        self._finish(codec.CONTENT, body)

    def close(self, reason: str) -> None:
        self.link = NO_LINK  # the actor already forgot this session
        if not self.done:
            self._finish(codec.SERVICE_UNAVAILABLE, b"")

    def timed_out(self) -> None:
        self.timer = None
        self._finish(codec.CONTENT, b'{"error":"timeout"}')

    def _finish(self, response_code: int, body: bytes) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.server.calls.discard(self)
        if self.exchange is not None:
            self.server._respond(self.exchange, response_code, body, self.options,
                                 content_format=codec.JSON_FORMAT if body else None)
        link, self.link = self.link, NO_LINK
        link.closed()


class CoapServer(DatagramProtocol):
    noisy = False

    def __init__(
        self,
        authenticate: Callable[[str], Deferred],
        attach: Attach,
        clock: IReactorTime,
        max_payload: int = 65536,
        random: Callable[[], float] = _random.random,
        block_szx: int = MAX_SZX,
        call_timeout: float = CALL_TIMEOUT,
        max_queued: int = MAX_QUEUED,
        rate_limiter: KeyedLimiter | None = None,
    ) -> None:
        self.authenticate = authenticate
        self.attach = attach
        self.clock = clock
        self.max_payload = max_payload
        self.block_szx = clamp_szx(block_szx)
        self.call_timeout = call_timeout
        self.max_queued = max_queued
        #: Requests per device (--coap-device-rate-limit): over it 4.29 Too Many Requests, Max-Age = when to retry.
        self.rate_limiter = rate_limiter
        self.sweeper = Sweeper(clock)
        self.messages = MessageLayer(clock, self._write, random, self.sweeper)
        self.observers = ObserveRegistry()
        self.block2 = Block2Store(self.sweeper)
        self.block1 = Block1Assembler(self.sweeper, max_payload, max_transfers=MAX_BLOCK1_TRANSFERS)
        self.calls: set[CoapRequestSession] = set()
        self.stats: Counter[str] = Counter()
        self._bad_datagrams = _LogBudget(clock)
        self._stopped = False

    # --- Twisted hooks --------------------------------------------------------------------------------------------

    def startProtocol(self) -> None:
        self._stopped = False
        # Twisted's UDP port reads 8192 bytes per datagram unless told otherwise; a longer one would be truncated
        # silently. Read whole datagrams (a single-datagram body may be up to max_payload).
        if getattr(self.transport, "maxPacketSize", MAX_DATAGRAM) < MAX_DATAGRAM:
            self.transport.maxPacketSize = MAX_DATAGRAM

    def stopProtocol(self) -> None:
        """Cancel every timer; report every CoAP session closed."""
        self._stopped = True
        for observer in self.observers.all():
            self._drop_observer(observer, report_closed=True)
        for call in list(self.calls):
            call.exchange = None
            call._finish(codec.SERVICE_UNAVAILABLE, b"")
        self.messages.stop()
        self.block2.entries.clear()
        self.block1.buffers.clear()
        self.sweeper.stop()

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if self._stopped:
            return
        try:
            self._datagram(data, (addr[0], addr[1]))
        except Exception:
            self.stats["errors"] += 1
            if self._bad_datagrams.allow():
                log.failure("coap: error handling a datagram from {addr}", Failure(), addr=addr)

    # --- inbound --------------------------------------------------------------------------------------------------

    def _datagram(self, data: bytes, addr: Address) -> None:
        self.stats["datagrams"] += 1
        try:
            message = codec.decode(data, addr)
        except codec.CoapBadOption as exc:
            self.stats["bad_option"] += 1
            response = codec.build(None, codec.BAD_OPTION, token=exc.token)
            if exc.mtype == codec.CON:
                response.type, response.mid = codec.ACK, exc.mid
                self._write(codec.encode(response), addr)
            else:
                self.messages.send_non(response, addr)
            return
        except codec.CoapDecodeError as exc:
            self.stats["dropped"] += 1
            if self._bad_datagrams.allow():
                log.info("coap: dropped a {n}-byte datagram from {addr}: {reason}", n=len(data), addr=addr,
                         reason=exc.reason)
            if exc.mtype == codec.CON and exc.mid is not None:
                self._write(codec.empty(codec.RST, exc.mid), addr)
            return
        exchange = self.messages.receive(message, addr)
        if exchange is not None:
            self._request(exchange)
            exchange.start_piggyback_timer()

    def _request(self, exchange: Exchange) -> None:
        request = exchange.request
        path = codec.uri_path(request)
        method = request.code
        block2 = codec.block_value(request, codec.BLOCK2)
        if block2 is not None and block2[0] > 0:
            self._serve_block(exchange, path, block2)
            return
        route = _route(path)
        if route is None:
            self._respond(exchange, codec.BAD_REQUEST)
            return
        access_token, request_id_segment = route
        if method not in (codec.GET, codec.POST) or (method == codec.GET and request_id_segment is not None):
            self._respond(exchange, codec.METHOD_NOT_ALLOWED)
            return
        payload = request.payload or b""
        echo: list[tuple[int, Any]] = []
        block1 = codec.block_value(request, codec.BLOCK1)
        if block1 is not None:
            key = (exchange.addr, method, path)
            size1 = codec.option_value(request, codec.SIZE1)
            status, body = self.block1.feed(key, block1, payload, size1, self.clock.seconds())
            num, _, szx = block1
            if status is Block1Status.CONTINUE:
                self._respond(exchange, codec.CONTINUE, options=[(codec.BLOCK1, codec.block_option(num, True, szx))])
                return
            if status is Block1Status.TOO_LARGE:
                self._respond(exchange, codec.REQUEST_ENTITY_TOO_LARGE, options=[(codec.SIZE1, self.max_payload)])
                return
            if status is Block1Status.INCOMPLETE:
                self._respond(exchange, codec.REQUEST_ENTITY_INCOMPLETE)
                return
            if status is Block1Status.BAD:
                self._respond(exchange, codec.BAD_REQUEST)
                return
            payload = body
            echo.append((codec.BLOCK1, codec.block_option(num, False, szx)))
        elif len(payload) > self.max_payload:
            self._respond(exchange, codec.REQUEST_ENTITY_TOO_LARGE, options=[(codec.SIZE1, self.max_payload)])
            return

        if method == codec.GET:
            observe = codec.observe_value(request)
            if observe not in (0, 1):
                self._respond(exchange, codec.BAD_REQUEST)  # the rpc resource is only observed, never read
                return
            handler = self._register if observe == 0 else self._deregister
            self._authenticated(exchange, access_token, handler, path, echo)
        elif request_id_segment is not None:
            request_id = _parse_request_id(request_id_segment)
            if request_id is None or not _is_json(payload):
                self._respond(exchange, codec.BAD_REQUEST)
                return
            self._authenticated(exchange, access_token, self._answer, request_id, payload, echo)
        else:
            if not _is_json(payload):
                self._respond(exchange, codec.BAD_REQUEST)
                return
            self._authenticated(exchange, access_token, self._call, payload, echo)

    def _authenticated(self, exchange: Exchange, access_token: str, handler: Callable[..., None],
                       *args: Any) -> None:
        def found(device: Any) -> None:
            if self._stopped or exchange.responded:
                return
            if device is None:
                self.stats["unauthorized"] += 1
                self._respond(exchange, codec.UNAUTHORIZED)
                return
            wait = self.rate_limiter.take(device.id) if self.rate_limiter is not None else 0.0
            if wait:
                self.stats["rate_limited"] += 1
                self._respond(exchange, codec.code(4, 29), options=[(codec.MAX_AGE, max(1, math.ceil(wait)))])
                return
            handler(exchange, device, *args)

        def failed(failure: Failure) -> None:
            unavailable = failure.check(ServiceUnavailable)
            if unavailable and not self._stopped:
                # The database is out of reach: 5.03, Max-Age saying when to try again (RFC 7252 §5.9.3.4).
                retry_after = max(1, math.ceil(failure.value.retry_after or 1))
                self._respond(exchange, codec.SERVICE_UNAVAILABLE, options=[(codec.MAX_AGE, retry_after)])
                return
            log.failure("coap: token lookup failed", failure)
            if not self._stopped:
                self._respond(exchange, codec.INTERNAL_SERVER_ERROR)

        d = maybeDeferred(self.authenticate, access_token)
        d.addCallbacks(found, failed)
        d.addErrback(self._handler_failed, exchange)

    def _handler_failed(self, failure: Failure, exchange: Exchange) -> None:
        log.failure("coap: request handling failed", failure)
        if not self._stopped and not exchange.responded:
            self._respond(exchange, codec.INTERNAL_SERVER_ERROR)

    # --- observe registration -------------------------------------------------------------------------------------

    def _register(self, exchange: Exchange, device: Any, path: tuple[str, ...], echo: list) -> None:
        request = exchange.request
        token = request.token or b""
        confirmable = request.type == codec.CON
        block2 = codec.block_value(request, codec.BLOCK2)
        szx = clamp_szx(min(block2[2], self.block_szx)) if block2 is not None else self.block_szx
        existing = self.observers.get(exchange.addr, token)
        if existing is not None and existing.device_id == device.id and existing.session is not None:
            # A re-registration (same endpoint and token, RFC 7641 §4.1): the same observation goes on.
            existing.confirmable = confirmable
            existing.block_szx = szx
            self._respond(exchange, codec.VALID, options=echo + [(codec.OBSERVE, existing.next_number())])
            existing.session.link.subscribed()
            return
        if existing is not None:
            self._drop_observer(existing, report_closed=True)
        session = CoapSession(self, device)
        observer = Observer(exchange.addr, token, confirmable, path, device.id, session, block_szx=szx)
        session.observer = observer
        try:
            session.link = self.attach(device, session, True)
        except Exception:
            log.failure("coap: attaching a session of device {device_id} failed", Failure(), device_id=device.id)
            self._respond(exchange, codec.SERVICE_UNAVAILABLE)
            return
        self.observers.add(observer)
        self.stats["registrations"] += 1
        # The 2.03 goes out before the actor can send the first notification (its mail is handled later).
        self._respond(exchange, codec.VALID, options=echo + [(codec.OBSERVE, observer.number)])
        session.link.subscribed()

    def _deregister(self, exchange: Exchange, device: Any, path: tuple[str, ...], echo: list) -> None:
        observer = self.observers.get(exchange.addr, exchange.request.token or b"")
        if observer is not None and observer.device_id == device.id:
            self._drop_observer(observer, report_closed=True)
        self._respond(exchange, codec.CONTENT, options=echo)

    # --- answers and calls ----------------------------------------------------------------------------------------

    def _answer(self, exchange: Exchange, device: Any, request_id: int, payload: bytes, echo: list) -> None:
        observer = self.observers.for_device(device.id)
        session = observer.session if observer is not None else None
        if session is not None and not session.closed:
            session.link.answered(request_id, payload)
        else:
            transient = CoapRequestSession(self, device, None)
            try:
                link = self.attach(device, transient, False)
            except Exception:
                log.failure("coap: attaching an answer of device {device_id} failed", Failure(),
                            device_id=device.id)
                self._respond(exchange, codec.SERVICE_UNAVAILABLE)
                return
            link.answered(request_id, payload)
            link.closed()
        self.stats["answers"] += 1
        self._respond(exchange, codec.CREATED, options=echo)

    def _call(self, exchange: Exchange, device: Any, payload: bytes, echo: list) -> None:
        call = CoapRequestSession(self, device, exchange, echo)
        try:
            call.link = self.attach(device, call, False)
        except Exception:
            log.failure("coap: attaching a call of device {device_id} failed", Failure(), device_id=device.id)
            self._respond(exchange, codec.SERVICE_UNAVAILABLE)
            return
        self.calls.add(call)
        self.stats["calls"] += 1
        call.timer = self.clock.callLater(self.call_timeout, call.timed_out)
        call.link.called(0, payload)

    # --- notifications --------------------------------------------------------------------------------------------

    def _notify(self, observer: Observer, request_id: int, payload: bytes) -> Delivery:
        if self.observers.get(observer.addr, observer.token) is not observer:
            return Delivery.NOT_SENT
        if observer.holds(request_id):
            return Delivery.AWAITING_ACK  # the actor retried: it is already on its way
        if observer.busy:
            if len(observer.queue) >= self.max_queued:
                return Delivery.NOT_SENT
            observer.queue.append((request_id, payload))
            return Delivery.AWAITING_ACK
        self._send_notification(observer, request_id, payload, queued=False)
        return Delivery.AWAITING_ACK if observer.confirmable else Delivery.DELIVERED

    def _send_notification(self, observer: Observer, request_id: int, payload: bytes, queued: bool) -> None:
        options: list[tuple[int, Any]] = [(codec.OBSERVE, observer.next_number()),
                                          (codec.CONTENT_FORMAT, codec.JSON_FORMAT)]
        body = payload
        if len(payload) > codec.szx_size(observer.block_szx):
            key = (observer.addr, codec.GET, observer.path)
            representation = self.block2.put(key, payload, self.clock.seconds(), codec.CONTENT, codec.JSON_FORMAT,
                                             on_done=lambda completed: self._transfer_done(observer, key))
            observer.transfer_key = key
            chunk, _ = split(payload, 0, observer.block_szx)  # type: ignore[misc]
            options += [(codec.BLOCK2, codec.block_option(0, True, observer.block_szx)),
                        (codec.SIZE2, len(payload)), (codec.ETAG, representation.etag)]
            body = chunk
        message = codec.build(None, codec.CONTENT, token=observer.token, options=options, payload=body)
        self.stats["notifications"] += 1
        if observer.confirmable:
            observer.in_flight_request = request_id
            observer.in_flight = self.messages.send_con(
                message, observer.addr,
                on_ack=lambda ack: self._notification_acked(observer),
                on_reset=lambda: self._observer_lost(observer, "reset"),
                on_timeout=lambda: self._observer_lost(observer, "no ACK"),
            )
        else:
            self.messages.send_non(message, observer.addr, on_reset=lambda: self._observer_lost(observer, "reset"))
            if queued and observer.session is not None:
                # It was reported AWAITING_ACK when queued; a NON counts as delivered once written.
                observer.session.link.acked(request_id)

    def _notification_acked(self, observer: Observer) -> None:
        request_id = observer.in_flight_request
        observer.in_flight = None
        observer.in_flight_request = None
        if observer.session is not None and request_id is not None:
            observer.session.link.acked(request_id)
        self._pump(observer)

    def _transfer_done(self, observer: Observer, key: Any) -> None:
        if observer.transfer_key == key:
            observer.transfer_key = None
            self._pump(observer)

    def _pump(self, observer: Observer) -> None:
        if self.observers.get(observer.addr, observer.token) is not observer:
            return
        while observer.queue and not observer.busy:
            request_id, payload = observer.queue.popleft()
            self._send_notification(observer, request_id, payload, queued=True)

    def _observer_lost(self, observer: Observer, why: str) -> None:
        """RST to a notification, or a CON notification never acknowledged: the observation is over."""
        if self.observers.get(observer.addr, observer.token) is not observer:
            return
        log.debug("coap: observation of device {device_id} at {addr} cancelled: {why}", device_id=observer.device_id,
                  addr=observer.addr, why=why)
        self.stats["observers_lost"] += 1
        self._drop_observer(observer, report_closed=True)

    def _drop_observer(self, observer: Observer, report_closed: bool) -> None:
        self.observers.remove(observer)
        self.messages.cancel(observer.in_flight)
        observer.in_flight = None
        observer.in_flight_request = None
        observer.queue.clear()
        if observer.transfer_key is not None:
            self.block2.discard(observer.transfer_key)
            observer.transfer_key = None
        session = observer.session
        if session is not None and not session.closed:
            session.closed = True
            link, session.link = session.link, NO_LINK
            if report_closed:
                link.closed()

    def _close_session(self, session: CoapSession, reason: str) -> None:
        """The actor closes the session (replaced by a newer registration, device deleted)."""
        if session.closed:
            return
        observer = session.observer
        if observer is None or self.observers.get(observer.addr, observer.token) is not observer:
            session.closed = True
            session.link = NO_LINK
            return
        self._drop_observer(observer, report_closed=False)
        if "replaced" in reason:
            final = codec.DELETED
        elif "deleted" in reason:
            final = codec.NOT_FOUND
        else:
            final = codec.SERVICE_UNAVAILABLE
        # A response without Observe ends the observation on the device's side (RFC 7641 §3.2).
        self.messages.send_non(codec.build(None, final, token=observer.token), observer.addr)

    # --- responses ------------------------------------------------------------------------------------------------

    def _respond(self, exchange: Exchange, response_code: int, payload: bytes = b"",
                 options: list[tuple[int, Any]] | None = None, content_format: int | None = None) -> None:
        if exchange.responded:
            return
        request = exchange.request
        options = list(options or [])
        if content_format is not None:
            options.append((codec.CONTENT_FORMAT, content_format))
        block2 = codec.block_value(request, codec.BLOCK2)
        szx = clamp_szx(min(block2[2], self.block_szx)) if block2 is not None else self.block_szx
        if len(payload) > codec.szx_size(szx):
            key = (exchange.addr, request.code, codec.uri_path(request))
            representation = self.block2.put(key, payload, self.clock.seconds(), response_code, content_format)
            chunk, _ = split(payload, 0, szx)  # type: ignore[misc]
            options += [(codec.BLOCK2, codec.block_option(0, True, szx)), (codec.SIZE2, len(payload)),
                        (codec.ETAG, representation.etag)]
            payload = chunk
        self._send_response(exchange, response_code, payload, options)

    def _send_response(self, exchange: Exchange, response_code: int, payload: bytes,
                       options: list[tuple[int, Any]]) -> None:
        exchange.respond(codec.build(None, response_code, options=options, payload=payload))

    def _serve_block(self, exchange: Exchange, path: tuple[str, ...], block2: tuple[int, bool, int]) -> None:
        key = (exchange.addr, exchange.request.code, path)
        now = self.clock.seconds()
        representation: Representation | None = self.block2.get(key, now)
        if representation is None:
            self._respond(exchange, codec.REQUEST_ENTITY_INCOMPLETE)  # nothing (any more) to continue
            return
        num, _, szx = block2
        szx = clamp_szx(szx)
        block = split(representation.payload, num, szx)
        if block is None:
            self._respond(exchange, codec.BAD_OPTION)
            return
        chunk, more = block
        options: list[tuple[int, Any]] = [(codec.BLOCK2, codec.block_option(num, more, szx)),
                                          (codec.ETAG, representation.etag)]
        if representation.content_format is not None:
            options.append((codec.CONTENT_FORMAT, representation.content_format))
        self._send_response(exchange, representation.code, chunk, options)
        self.block2.served(key, representation, more, now)

    def _write(self, data: bytes, addr: Address) -> None:
        transport = self.transport
        if transport is None:
            return
        try:
            transport.write(data, addr)
        except Exception as exc:  # EMSGSIZE, unreachable networks, a closed port: the peer's problem, not ours
            self.stats["write_errors"] += 1
            if self._bad_datagrams.allow():
                log.info("coap: could not send {n} bytes to {addr}: {error}", n=len(data), addr=addr, error=str(exc))
