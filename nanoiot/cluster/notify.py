"""A message bus between the nodes of a cluster over PostgreSQL's LISTEN/NOTIFY: transport only.

The nodes already share one PostgreSQL database, so it routes their messages too, with no broker to run. Each bus
holds two psycopg2 connections in asynchronous mode, driven by the reactor (never a thread, never a blocking call):

* the *listening* connection runs ``LISTEN`` for every registered channel and hands each notification to that
  channel's callback on the reactor thread;
* the *sending* connection (``synchronous_commit = off``: a notification is worth nothing after a crash anyway)
  sends everything queued by :meth:`NotifyBus.notify` in one statement per round trip, one statement in flight at
  a time; whatever is queued meanwhile goes out together in the next one. This batching is what makes the bus fast
  (tens of thousands of request/reply pairs a second between two nodes, where one statement each would allow
  a few thousand).

Wire encoding of a notification's payload (the first character says which form it is, so a caller's payload may
start with any character at all):

* ``"=" + payload`` - the payload itself;
* ``"#<n>=" + payload`` - the same, for the n-th repeat (n >= 1) of an identical (channel, payload) within one
  batch: PostgreSQL folds identical notifications of one transaction into one, and every notify() must arrive;
* ``"@<id>"`` - the payload was longer than ``max_payload`` UTF-8 bytes (PostgreSQL's limit is 8000): it is in row
  ``<id>`` of ``cluster_message``, inserted by the same statement that notifies. The receiver deletes the row and
  returns its payload (``DELETE ... RETURNING``), holding later notifications of that channel back meanwhile so
  that callbacks see the order of sending. On a channel several nodes listen to (a broadcast: ``listen(...,
  shared=True)`` on every one of them) the receivers only read the row. Rows left behind (shared, or never
  fetched) are removed by :meth:`NotifyBus.purge_older_than`.

Delivery is at most once: a notification sent while a node's listening connection is down is lost (PostgreSQL
keeps nothing for absent listeners), and a batch in flight when the sending connection breaks is dropped, since it
may or may not have been committed and sending it twice could run a command twice. Callers keep their own
deadlines; :attr:`NotifyBus.on_reconnect` tells them when a gap happened.
"""

from __future__ import annotations

import ipaddress
import os
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Final

import psycopg2
import psycopg2.extensions
from psycopg2 import sql
from sqlalchemy.engine import make_url
from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger(namespace="nanoiot.cluster")

#: ``application_name`` of the bus's connections (with ``:<name>`` appended when the bus is given a name), so that
#: pg_stat_activity tells them apart from the repository's connections.
APPLICATION_NAME: Final = "nanoiot-bus"
#: PostgreSQL refuses notification payloads of 8000 bytes or more.
PG_PAYLOAD_LIMIT: Final = 8000
#: The largest ``max_payload`` accepted: room is left for the longest prefix (``#9999=``).
MAX_INLINE_PAYLOAD: Final = 7990
#: PostgreSQL identifiers (hence channel names) are at most NAMEDATALEN - 1 bytes.
MAX_CHANNEL_BYTES: Final = 63
#: Reconnect delays double from ``reconnect_delay`` up to this many seconds.
MAX_RECONNECT_DELAY: Final = 10.0
#: Seconds a connection attempt may take: libpq ignores connect_timeout in asynchronous mode, so the bus times it.
CONNECT_TIMEOUT: Final = 10.0

# One statement carries at most this many notifications / about this many characters of payload, so that a long
# queue (after a reconnect) goes out in several statements of reasonable size rather than one huge one.
_MAX_BATCH_ITEMS: Final = 5000
_MAX_BATCH_CHARS: Final = 4_000_000

_SMALL: Final = "="
_REPEAT: Final = "#"
_ROW: Final = "@"

_NOTIFY_SQL: Final = "SELECT count(pg_notify(c, p)) FROM unnest(%s::text[], %s::text[]) t(c, p)"
_NOTIFY_ROW_SQL: Final = (
    "WITH m AS (INSERT INTO cluster_message (created_time, payload) VALUES (%s, %s) RETURNING id) "
    "SELECT pg_notify(%s, '@' || m.id) FROM m"
)
_TAKE_SQL: Final = "DELETE FROM cluster_message WHERE id = ANY(%s::bigint[]) RETURNING id, payload"
_READ_SQL: Final = "SELECT id, payload FROM cluster_message WHERE id = ANY(%s::bigint[])"
_PURGE_SQL: Final = "DELETE FROM cluster_message WHERE created_time < %s"

# TCP keepalives, unless the URL sets them: an idle listening connection whose peer vanished (no RST) would
# otherwise look healthy forever.
_KEEPALIVES: Final = {"keepalives": "1", "keepalives_idle": "30", "keepalives_interval": "10", "keepalives_count": "3"}


class BusNotConnected(ConnectionError):
    """The bus has no working connection for this request right now."""


def connect_kwargs(dsn: str) -> dict[str, Any]:
    """psycopg2 connect keywords from a SQLAlchemy URL, so that the bus takes the same setting as the repository."""
    url = make_url(dsn)
    if url.get_backend_name() != "postgresql":
        raise ValueError(f"the cluster bus needs a PostgreSQL URL, not {url.get_backend_name()!r}")
    kwargs: dict[str, Any] = dict(_KEEPALIVES)
    kwargs["client_encoding"] = "UTF8"
    for key, value in url.query.items():
        kwargs[key] = ",".join(value) if isinstance(value, tuple) else value
    if url.host:
        kwargs["host"] = url.host
    if url.port:
        kwargs["port"] = url.port
    if url.username:
        kwargs["user"] = url.username
    if url.password is not None:
        kwargs["password"] = str(url.password)
    if url.database:
        kwargs["dbname"] = url.database
    return kwargs


def check_channel(channel: str) -> None:
    """Raise ValueError unless ``channel`` can be a PostgreSQL channel: pg_notify would fail a whole batch."""
    if not isinstance(channel, str) or not channel:
        raise ValueError(f"a channel must be a non-empty string, not {channel!r}")
    if "\x00" in channel:
        raise ValueError("a channel cannot contain NUL characters")
    if len(channel.encode("utf-8")) > MAX_CHANNEL_BYTES:  # UnicodeEncodeError (a ValueError) for lone surrogates
        raise ValueError(f"channel {channel!r} is longer than {MAX_CHANNEL_BYTES} bytes")


def _utf8_length_over(text: str, limit: int) -> bool:
    """Whether ``text`` is longer than ``limit`` bytes in UTF-8, without encoding it when the length decides."""
    if len(text) > limit:
        return True
    if len(text) * 4 <= limit:
        return False
    return len(text.encode("utf-8", "surrogatepass")) > limit


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_lost(failure: Failure) -> bool:
    return failure.check(ConnectionLost, ConnectionDone) is not None


def _one_line(failure: Failure) -> str:
    """libpq's messages span lines; a log line should not."""
    return " ".join(str(failure.value).split()) or repr(failure.value)


_CONNECTING = "connecting"
_READY = "ready"
_CLOSED = "closed"

# (rows or None, rowcount) of a finished statement
_Result = tuple[list[tuple[Any, ...]] | None, int]


@implementer(IReadDescriptor, IWriteDescriptor)
class _PgConnection:
    """One psycopg2 asynchronous connection whose socket the reactor watches: statements run one at a time, FIFO.

    The reactor watches a duplicate of libpq's socket, not the socket itself: libpq closes its descriptor by itself
    (a broken connection, another address tried while connecting), and a descriptor closed under the reactor's
    feet cannot be unregistered cleanly (and its number may be reused at once). The duplicate stays ours to close.
    """

    def __init__(self, reactor: Any, kwargs: dict[str, Any], label: str, *, timeout: float,
                 on_lost: Callable[[_PgConnection, Failure], None],
                 on_notifies: Callable[[list[Any]], None] | None = None) -> None:
        self._reactor = reactor
        self._kwargs = kwargs
        self._label = label
        self._timeout = timeout
        self._on_lost = on_lost
        self._on_notifies = on_notifies
        self._state = _CONNECTING
        self._conn: Any = None
        self._cursor: Any = None
        self._fd = -1
        self._reading = False
        self._writing = False
        self._pumping = False
        self._connected: Deferred[None] | None = None
        self._timer: Any = None
        self._ops: deque[tuple[bytes, Deferred[_Result]]] = deque()
        self._current: Deferred[_Result] | None = None

    # -- public ---------------------------------------------------------------------------------------------------

    def connect(self) -> Deferred[None]:
        """Start connecting (libpq's non-blocking PQconnectStart/PQconnectPoll); fires once the connection is up."""
        d = self._connected = Deferred()
        try:
            self._conn = psycopg2.connect(async_=True, **self._kwargs)
        except Exception as exc:  # noqa: BLE001 - a bad option, out of memory: the attempt failed
            self._state = _CLOSED
            self._connected = None
            return fail(exc)
        self._timer = self._reactor.callLater(self._timeout, self._connect_timed_out)
        self._pump(poll_first=True)
        return d

    def mogrify(self, query: str, params: Any) -> bytes:
        """The statement with its parameters quoted by psycopg2 (client-side: no round trip)."""
        return self._cursor.mogrify(query, params)

    def quote_identifier(self, name: str) -> str:
        return sql.Identifier(name).as_string(self._conn)

    def run(self, query: bytes | str) -> Deferred[_Result]:
        """Queue a statement (already quoted); fires with (rows or None, rowcount) or fails with its error."""
        if self._state is _CLOSED:
            return fail(ConnectionDone("the connection is closed"))
        d: Deferred[_Result] = Deferred()
        self._ops.append((query if isinstance(query, bytes) else query.encode("utf-8"), d))
        if self._state is _READY and self._current is None and not self._pumping:
            self._pump(poll_first=False)
        return d

    def close(self) -> None:
        """Close now; queued and running statements fail with ConnectionDone. Does not call on_lost."""
        if self._state is _CLOSED:
            return
        self._shut(Failure(ConnectionDone("the connection was closed")))

    # -- IReadDescriptor / IWriteDescriptor ----------------------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return self._label

    def doRead(self) -> None:
        self._on_io()

    def doWrite(self) -> None:
        self._on_io()

    def connectionLost(self, reason: Failure) -> None:
        """The reactor saw the socket hang up (and already stopped watching it)."""
        self._reading = self._writing = False
        if self._state is _CONNECTING:
            self._on_io()  # libpq may move on to the next address; otherwise poll() reports the error
        elif self._state is _READY:
            self._lose(reason)

    # -- the poll loop ------------------------------------------------------------------------------------------

    def _on_io(self) -> None:
        if self._state is _CLOSED or self._pumping:
            return
        try:
            self._pump(poll_first=True)
        except Exception:  # noqa: BLE001 - a bug here must not reach the reactor, which would drop the descriptor
            log.failure("{label}: unexpected error while polling", label=self._label)
            self._lose(Failure())

    def _pump(self, poll_first: bool) -> None:
        """Poll until libpq has to wait for the socket; complete finished statements and send the next ones."""
        self._pumping = True
        try:
            self._pump_loop(poll_first)
        finally:
            self._pumping = False

    def _pump_loop(self, need_poll: bool) -> None:
        while self._state is not _CLOSED:
            if need_poll:
                need_poll = False
                try:
                    state = self._conn.poll()
                except Exception as exc:  # noqa: BLE001 - psycopg2 reports both SQL errors and lost connections
                    self._deliver_notifies()
                    if self._state is _CLOSED or not self._poll_failed(exc):
                        return
                    continue
                self._deliver_notifies()
                if self._state is _CLOSED:
                    return
                if self._state is _CONNECTING:
                    if state != psycopg2.extensions.POLL_OK:
                        # libpq may have opened another socket (next address): watch whichever is current.
                        self._watch(read=state == psycopg2.extensions.POLL_READ,
                                    write=state == psycopg2.extensions.POLL_WRITE, new_socket=True)
                        return
                    self._became_ready()
                    continue
                if state == psycopg2.extensions.POLL_OK:
                    self._watch(read=True, write=False)
                    if self._current is not None:
                        d, self._current = self._current, None
                        cursor = self._cursor
                        rows = cursor.fetchall() if cursor.description is not None else None
                        d.callback((rows, cursor.rowcount))
                        continue
                elif state == psycopg2.extensions.POLL_WRITE:
                    self._watch(read=True, write=True)
                    return
                else:
                    self._watch(read=True, write=False)
                    return
            if self._state is not _READY or self._current is not None or not self._ops:
                return
            query, d = self._ops.popleft()
            try:
                self._cursor.execute(query)
            except Exception as exc:  # noqa: BLE001
                if self._broken():
                    self._current = d
                    self._lose(Failure(exc))
                    return
                d.errback(Failure(exc))
                continue
            self._current = d
            need_poll = True

    def _became_ready(self) -> None:
        self._state = _READY
        self._cancel_timer()
        self._cursor = self._conn.cursor()
        self._watch(read=True, write=False, new_socket=True)
        d, self._connected = self._connected, None
        if d is not None:
            d.callback(None)

    def _poll_failed(self, exc: Exception) -> bool:
        """Handle an exception from poll(); True if the loop should go on (a statement failed, not the connection)."""
        if self._state is _CONNECTING:
            self._shut(Failure(exc))
            return False
        if self._broken() or self._current is None:
            self._lose(Failure(exc))
            return False
        d, self._current = self._current, None
        self._watch(read=True, write=False)
        d.errback(Failure(exc))
        return True

    def _broken(self) -> bool:
        try:
            return bool(self._conn.closed)
        except Exception:  # noqa: BLE001
            return True

    def _deliver_notifies(self) -> None:
        conn = self._conn
        if conn is None or not conn.notifies:
            return
        notifies, conn.notifies = conn.notifies, []
        if self._on_notifies is not None:
            self._on_notifies(notifies)

    def _connect_timed_out(self) -> None:
        self._timer = None
        if self._state is _CONNECTING:
            self._shut(Failure(TimeoutError(f"{self._label}: no connection after {self._timeout} s")))

    # -- socket watching and shutdown ---------------------------------------------------------------------------

    def _watch(self, read: bool, write: bool, new_socket: bool = False) -> None:
        if new_socket or self._fd < 0:
            self._unwatch()
            self._fd = os.dup(self._conn.fileno())
        if read != self._reading:
            (self._reactor.addReader if read else self._reactor.removeReader)(self)
            self._reading = read
        if write != self._writing:
            (self._reactor.addWriter if write else self._reactor.removeWriter)(self)
            self._writing = write

    def _unwatch(self) -> None:
        if self._reading:
            self._reading = False
            self._reactor.removeReader(self)
        if self._writing:
            self._writing = False
            self._reactor.removeWriter(self)
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            timer, self._timer = self._timer, None
            if timer.active():
                timer.cancel()

    def _lose(self, reason: Failure) -> None:
        """The connection broke: tell the owner first (so that failing statements see it down), then fail them."""
        if self._state is _CLOSED:
            return
        was_ready = self._state is _READY
        lost = Failure(ConnectionLost(_one_line(reason)))
        self._shut(lost, notify_failure=False)
        if was_ready:
            self._on_lost(self, reason)
        self._fail_ops(lost)

    def _shut(self, reason: Failure, notify_failure: bool = True) -> None:
        self._state = _CLOSED
        self._cancel_timer()
        try:
            self._unwatch()
        finally:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    conn.close()  # PQfinish: a non-blocking best-effort Terminate message, then close
                except Exception:  # noqa: BLE001
                    pass
        d, self._connected = self._connected, None
        if d is not None:
            d.errback(reason)
        if notify_failure:
            self._fail_ops(reason)

    def _fail_ops(self, reason: Failure) -> None:
        pending = [d for d in [self._current] if d is not None] + [d for _, d in self._ops]
        self._current = None
        self._ops.clear()
        for d in pending:
            d.errback(reason)


class _Pending:
    """A notification held back on its channel until its row (or an earlier one's) has been fetched."""

    __slots__ = ("row_id", "payload", "ready", "fetching", "shared")

    def __init__(self, row_id: int | None, payload: str | None, ready: bool, shared: bool = False) -> None:
        self.row_id = row_id
        self.payload = payload
        self.ready = ready
        self.fetching = False
        self.shared = shared  # read the row, do not take it: other nodes listen on the channel too


class _Link:
    """One of the bus's two connections, with its reconnect schedule."""

    def __init__(self, role: str, delay: float) -> None:
        self.role = role
        self.initial_delay = delay
        self.delay = delay
        self.conn: _PgConnection | None = None  # connected: statements may be queued (setup goes first)
        self.attempt: _PgConnection | None = None
        self.up = False  # connected and set up (synchronous_commit, LISTENs)
        self.retry: Any = None

    def next_delay(self) -> float:
        delay = self.delay
        self.delay = min(self.delay * 2, max(MAX_RECONNECT_DELAY, self.initial_delay))
        return delay

    def cancel_retry(self) -> None:
        if self.retry is not None:
            retry, self.retry = self.retry, None
            if retry.active():
                retry.cancel()

    def close(self) -> None:
        self.up = False
        self.cancel_retry()
        for conn in (self.attempt, self.conn):
            if conn is not None:
                conn.close()
        self.attempt = self.conn = None


class NotifyBus:
    """This node's end of the cluster's LISTEN/NOTIFY bus: callbacks per channel in, batched notifications out.

    Everything runs on the reactor thread and nothing blocks it. The bus knows nothing of what the payloads mean.
    """

    def __init__(self, dsn: str, reactor: Any, *, max_payload: int = 7900, max_queued: int = 100_000,
                 reconnect_delay: float = 1.0, name: str = "", connect_timeout: float | None = None) -> None:
        """``name`` is appended to the connections' application_name (``nanoiot-bus:<name>``) to find them."""
        if not 0 <= max_payload <= MAX_INLINE_PAYLOAD:
            raise ValueError(f"max_payload must be between 0 and {MAX_INLINE_PAYLOAD} bytes")
        if max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        if reconnect_delay <= 0:
            raise ValueError("reconnect_delay must be positive")
        self._reactor = reactor
        self._kwargs = connect_kwargs(dsn)
        self.application_name = f"{APPLICATION_NAME}:{name}" if name else APPLICATION_NAME
        self._kwargs["application_name"] = self.application_name
        if connect_timeout is None:
            connect_timeout = float(self._kwargs.get("connect_timeout") or CONNECT_TIMEOUT)
        self._connect_timeout = connect_timeout
        self._max_payload = max_payload
        self._max_queued = max_queued
        #: Called (no arguments) once both connections are back after a loss and every LISTEN is restored.
        self.on_reconnect: Callable[[], None] | None = None
        #: Notification statements sent so far (each carries every notification queued when it went out).
        self.statements_sent = 0
        #: Notifications refused by notify() (queue full or bus stopped), and dropped after being queued.
        self.dropped = 0

        self._running = False
        self._stopped = False  # a bus not started yet queues (start() sends); a stopped one refuses
        self._starting: Deferred[None] | None = None
        self._had_loss = False
        self._listener = _Link("listening", reconnect_delay)
        self._sender = _Link("sending", reconnect_delay)

        self._channels: dict[str, Callable[[str], None]] = {}
        self._shared: set[str] = set()
        self._listen_waiters: list[Deferred[None]] = []
        self._backlog: dict[str, deque[_Pending]] = {}

        self._queue: deque[tuple[str, str, bool]] = deque()  # (channel, payload, goes through cluster_message)
        self._good_channels: set[str] = set()
        self._in_flight = 0
        self._flush_call: Any = None
        self._accepted = 0
        self._processed = 0  # sent, or given up on
        self._flush_waiters: deque[tuple[int, Deferred[None]]] = deque()
        self._refused_unlogged = 0
        self._last_refusal_log = float("-inf")

    # -- life cycle ---------------------------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Open both connections; fires once they are up and every channel registered so far is LISTENed.

        Fails if the first attempt fails (a wrong URL should stop the node's start, not retry forever); after
        that, lost connections are re-established by the bus itself.
        """
        if self._running:
            raise RuntimeError("the bus is already started")
        self._running = True
        self._stopped = False
        self._had_loss = False
        for link in (self._listener, self._sender):
            link.delay = link.initial_delay
        self._starting = starting = Deferred()
        opened = gatherResults([self._open(self._listener, True), self._open(self._sender, True)],
                               consumeErrors=True)

        def started(_: Any) -> None:
            if self._starting is starting:
                self._starting = None
                starting.callback(None)

        def failed(failure: Failure) -> None:
            reason = getattr(failure.value, "subFailure", failure)
            if self._starting is starting:
                self._starting = None
                self._shutdown(reason)
                starting.errback(reason)

        opened.addCallbacks(started, failed)
        return starting

    def stop(self) -> Deferred[None]:
        """Close both connections and stop reconnecting; queued notifications are dropped (see flushed())."""
        self._shutdown(Failure(CancelledError("the bus was stopped")))
        return succeed(None)

    def _shutdown(self, reason: Failure) -> None:
        self._running = False
        self._stopped = True
        if self._flush_call is not None:
            call, self._flush_call = self._flush_call, None
            if call.active():
                call.cancel()
        self._listener.close()
        self._sender.close()
        self._backlog.clear()
        if self._queue:
            log.info("Cluster bus stopped with {count} notifications unsent", count=len(self._queue))
            self.dropped += len(self._queue)
            self._processed += len(self._queue)
            self._queue.clear()
        waiters, self._listen_waiters = self._listen_waiters, []
        flush_waiters, self._flush_waiters = list(self._flush_waiters), deque()
        starting, self._starting = self._starting, None
        for d in waiters + [d for _, d in flush_waiters] + ([starting] if starting is not None else []):
            d.errback(reason)

    @property
    def connected(self) -> bool:
        """Both connections up (and every LISTEN in place)."""
        return self._listener.up and self._sender.up

    # -- receiving ----------------------------------------------------------------------------------------------

    def listen(self, channel: str, callback: Callable[[str], None], *, shared: bool = False) -> Deferred[None]:
        """Call ``callback(payload)`` for every notification on ``channel``; fires once LISTEN is active.

        One callback per channel: listening again replaces it. Before start() or while the listening connection
        is down, the Deferred fires when the channel is LISTENed on the (re)established connection.

        ``shared``: other nodes listen on this channel too (a broadcast), so a large payload's row is read, not
        taken (the first node to take it would leave the others nothing); purge_older_than() removes it later.
        Every listener of a shared channel must say so.
        """
        check_channel(channel)
        self._channels[channel] = callback
        if shared:
            self._shared.add(channel)
        else:
            self._shared.discard(channel)
        d: Deferred[None] = Deferred()
        conn = self._listener.conn
        if conn is None:
            self._listen_waiters.append(d)
            return d

        def failed(failure: Failure) -> None:
            if _is_lost(failure) and self._running:
                self._listen_waiters.append(d)  # the next connection LISTENs every registered channel
            else:
                d.errback(failure)

        conn.run("LISTEN " + conn.quote_identifier(channel)).addCallbacks(lambda _: d.callback(None), failed)
        return d

    def unlisten(self, channel: str) -> Deferred[None]:
        """Stop delivering ``channel`` (at once, including notifications held back for a row) and UNLISTEN it."""
        self._channels.pop(channel, None)
        self._shared.discard(channel)
        self._backlog.pop(channel, None)
        conn = self._listener.conn
        if conn is None:
            return succeed(None)  # the next connection will not LISTEN it

        def failed(failure: Failure) -> Failure | None:
            return None if _is_lost(failure) else failure

        d = conn.run("UNLISTEN " + conn.quote_identifier(channel))
        return d.addCallbacks(lambda _: None, failed)

    def _on_notifies(self, notifies: list[Any]) -> None:
        """Decode a batch of notifications from the listening connection and deliver them in order per channel."""
        to_fetch: list[_Pending] = []
        channels = self._channels
        backlog = self._backlog
        for notify in notifies:
            channel = notify.channel
            callback = channels.get(channel)
            if callback is None:
                continue  # an UNLISTEN on its way
            wire = notify.payload
            kind = wire[:1]
            if kind == _SMALL:
                payload = wire[1:]
            elif kind == _REPEAT and "=" in wire:
                payload = wire[wire.index("=") + 1:]
            elif kind == _ROW:
                try:
                    row_id = int(wire[1:])
                except ValueError:
                    log.warn("Cluster bus: malformed payload {wire!r} on {channel!r} ignored",
                             wire=wire[:80], channel=channel)
                    continue
                entry = _Pending(row_id, None, False, channel in self._shared)
                backlog.setdefault(channel, deque()).append(entry)
                to_fetch.append(entry)
                continue
            else:
                log.warn("Cluster bus: payload {wire!r} on {channel!r} is not from a bus; ignored",
                         wire=wire[:80], channel=channel)
                continue
            queue = backlog.get(channel)
            if queue is None:
                self._call(channel, callback, payload)
            else:
                queue.append(_Pending(None, payload, True))
        if to_fetch:
            self._fetch(to_fetch)

    def _call(self, channel: str, callback: Callable[[str], None], payload: str) -> None:
        try:
            callback(payload)
        except Exception:  # noqa: BLE001 - one broken callback must not stop the others
            log.failure("Cluster bus: callback for channel {channel!r} failed", channel=channel)

    def _drain(self, channel: str) -> None:
        """Deliver the held-back notifications of ``channel`` up to the first whose row is still being fetched."""
        queue = self._backlog.get(channel)
        while queue and queue[0].ready:
            entry = queue.popleft()
            callback = self._channels.get(channel)
            if callback is None or self._backlog.get(channel) is not queue:
                return  # unlistened (perhaps by a callback)
            if entry.payload is not None:
                self._call(channel, callback, entry.payload)
        if queue is not None and not queue and self._backlog.get(channel) is queue:
            del self._backlog[channel]

    def _fetch(self, entries: list[_Pending]) -> None:
        """Fetch the rows of large payloads (one statement for all, or two if some are shared); deliver them."""
        taken = [entry for entry in entries if not entry.shared]
        if taken:
            self._fetch_rows(taken, _TAKE_SQL)
        if len(taken) < len(entries):
            self._fetch_rows([entry for entry in entries if entry.shared], _READ_SQL)

    def _fetch_rows(self, entries: list[_Pending], query: str) -> None:
        conn = self._listener.conn
        if conn is None:
            return  # fetched once the listening connection is back
        for entry in entries:
            entry.fetching = True
        ids = [entry.row_id for entry in entries]

        def fetched(result: _Result) -> None:
            rows = dict(result[0] or ())
            for entry in entries:
                entry.fetching = False
                entry.payload = rows.get(entry.row_id)
                entry.ready = True
                if entry.payload is None:
                    log.warn("Cluster bus: message row {id} is gone (purged, or taken by another listener)",
                             id=entry.row_id)
            self._drain_all()

        def failed(failure: Failure) -> None:
            for entry in entries:
                entry.fetching = False
            if _is_lost(failure):
                return  # fetched again once the listening connection is back
            log.failure("Cluster bus: could not fetch message rows {ids}", failure, ids=ids)
            for entry in entries:
                entry.ready = True
            self._drain_all()

        conn.run(conn.mogrify(query, (ids,))).addCallbacks(fetched, failed)

    def _drain_all(self) -> None:
        for channel in list(self._backlog):
            self._drain(channel)

    # -- sending ------------------------------------------------------------------------------------------------

    def notify(self, channel: str, payload: str) -> bool:
        """Queue ``payload`` for ``channel``; False (dropped) if the queue is full or the bus stopped. Never blocks.

        Raises ValueError for a channel PostgreSQL would refuse or a payload with NUL characters: either would
        make the whole batch fail.
        """
        if len(self._queue) >= self._max_queued or self._stopped:
            self._refuse()
            return False
        if channel not in self._good_channels:
            check_channel(channel)
            if len(self._good_channels) > 10_000:
                self._good_channels.clear()
            self._good_channels.add(channel)
        if "\x00" in payload:
            raise ValueError("a payload cannot contain NUL characters")
        self._queue.append((channel, payload, _utf8_length_over(payload, self._max_payload)))
        self._accepted += 1
        if self._flush_call is None and not self._in_flight and self._sender.up:
            # Not at once: every notify() of this reactor turn goes into the same statement.
            self._flush_call = self._reactor.callLater(0, self._flush)
        return True

    def notify_many(self, items: Iterable[tuple[str, str]]) -> int:
        """notify() for each (channel, payload); returns how many were queued."""
        return sum(1 for channel, payload in items if self.notify(channel, payload))

    def flushed(self) -> Deferred[None]:
        """Fires once every notification queued so far has been sent (or dropped: see the module's docstring)."""
        if self._processed >= self._accepted:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._flush_waiters.append((self._accepted, d))
        return d

    def purge_older_than(self, ms: int) -> Deferred[int]:
        """Delete cluster_message rows older than ``ms`` milliseconds: never taken, or read by a shared channel.

        Fires with the number of rows deleted.
        """
        conn = self._sender.conn
        if conn is None or not self._sender.up:
            return fail(BusNotConnected("the bus's sending connection is down"))
        threshold = round(self._reactor.seconds() * 1000) - ms
        return conn.run(conn.mogrify(_PURGE_SQL, (threshold,))).addCallback(lambda result: result[1])

    def _refuse(self) -> None:
        """Count a refused notification; log at most once a second, since refusals come in floods."""
        self.dropped += 1
        self._refused_unlogged += 1
        now = self._reactor.seconds()
        if now - self._last_refusal_log >= 1.0:
            why = "the bus is stopped" if self._stopped else f"{self._max_queued} notifications are queued"
            log.warn("Cluster bus: {count} notification(s) refused since the last report: {why}",
                     count=self._refused_unlogged, why=why)
            self._refused_unlogged = 0
            self._last_refusal_log = now

    def _flush(self) -> None:
        """Send everything queued (up to a batch's size) in one statement, unless one is already in flight."""
        self._flush_call = None
        while self._queue and not self._in_flight and self._sender.up:
            conn = self._sender.conn
            assert conn is not None
            query, count = self._build_batch(conn)
            if query is None:
                self._done(count)
                continue
            self._in_flight = count
            self.statements_sent += 1
            conn.run(query).addBoth(self._batch_done, count)

    def _build_batch(self, conn: _PgConnection) -> tuple[bytes | None, int]:
        """Take notifications off the queue into one query: (query or None if all were unsendable, how many)."""
        queue = self._queue
        segments: list[bytes] = []
        channels: list[str] = []
        payloads: list[str] = []
        seen: dict[tuple[str, str], int] = {}
        count = chars = 0
        now_ms = round(self._reactor.seconds() * 1000)
        while queue and count < _MAX_BATCH_ITEMS and chars < _MAX_BATCH_CHARS:
            channel, payload, large = queue.popleft()
            count += 1
            chars += len(payload)
            if large:
                if channels:
                    segments.append(self._small_segment(conn, channels, payloads))
                    channels, payloads = [], []
                try:
                    segments.append(conn.mogrify(_NOTIFY_ROW_SQL, (now_ms, payload, channel)))
                except UnicodeEncodeError:
                    self._unsendable(channel)
                continue
            key = (channel, payload)
            repeat = seen.get(key, 0)
            seen[key] = repeat + 1
            channels.append(channel)
            payloads.append(f"{_REPEAT}{repeat}={payload}" if repeat else _SMALL + payload)
        if channels:
            segments.append(self._small_segment(conn, channels, payloads))
        segments = [segment for segment in segments if segment]
        return (b";".join(segments) if segments else None), count

    def _small_segment(self, conn: _PgConnection, channels: list[str], payloads: list[str]) -> bytes:
        try:
            return conn.mogrify(_NOTIFY_SQL, (channels, payloads))
        except UnicodeEncodeError:
            # A payload with a lone surrogate (not UTF-8): drop just that one rather than the whole batch.
            kept = [(c, p) for c, p in zip(channels, payloads) if self._encodable(c, p)]
            if not kept:
                return b""
            return conn.mogrify(_NOTIFY_SQL, ([c for c, _ in kept], [p for _, p in kept]))

    def _encodable(self, channel: str, payload: str) -> bool:
        try:
            payload.encode("utf-8")
        except UnicodeEncodeError:
            self._unsendable(channel)
            return False
        return True

    def _unsendable(self, channel: str) -> None:
        self.dropped += 1
        log.warn("Cluster bus: a payload for {channel!r} is not valid UTF-8 (lone surrogate); dropped",
                 channel=channel)

    def _batch_done(self, result: _Result | Failure, count: int) -> None:
        self._in_flight = 0
        if isinstance(result, Failure):
            self.dropped += count
            if _is_lost(result):
                if self._running:
                    log.warn("Cluster bus: connection lost with {count} notifications in flight; dropped "
                             "(they may or may not have been delivered)", count=count)
            else:
                log.failure("Cluster bus: a statement of {count} notifications failed; dropped", result,
                            count=count)
        self._done(count)
        if self._queue and self._flush_call is None:
            self._flush()

    def _done(self, count: int) -> None:
        self._processed += count
        waiters = self._flush_waiters
        while waiters and waiters[0][0] <= self._processed:
            waiters.popleft()[1].callback(None)

    # -- connections --------------------------------------------------------------------------------------------

    def _open(self, link: _Link, initial: bool) -> Deferred[None]:
        """One connection attempt for ``link``: resolve, connect, set up; fires once the link is up.

        A failed initial attempt fails (start() reports it); a failed reconnect schedules the next one.
        """
        d = self._resolve()
        d.addCallback(self._connect, link)

        def failed(failure: Failure) -> Failure | None:
            if not self._running:
                return None
            if initial:
                return failure
            delay = link.next_delay()
            log.warn("Cluster bus: could not open the {role} connection ({error}); retrying in {delay:g} s",
                     role=link.role, error=_one_line(failure), delay=delay)
            link.retry = self._reactor.callLater(delay, self._retry, link)
            return None

        return d.addErrback(failed)

    def _retry(self, link: _Link) -> None:
        link.retry = None
        if self._running:
            self._open(link, False)

    def _resolve(self) -> Deferred[dict[str, Any]]:
        """Connect keywords with the host name resolved by the reactor: libpq would resolve it blocking."""
        kwargs = self._kwargs
        host = str(kwargs.get("host") or "")
        if not host or "hostaddr" in kwargs or "," in host or host.startswith("/") or _is_ip_address(host):
            return succeed(kwargs)
        return self._reactor.resolve(host).addCallback(lambda address: {**kwargs, "hostaddr": address})

    def _connect(self, kwargs: dict[str, Any], link: _Link) -> Deferred[None]:
        if not self._running:
            return fail(CancelledError("the bus was stopped"))
        listening = link is self._listener
        conn = _PgConnection(self._reactor, kwargs, f"{self.application_name} ({link.role})",
                             timeout=self._connect_timeout, on_lost=self._lost,
                             on_notifies=self._on_notifies if listening else None)
        link.attempt = conn

        def connected(_: None) -> Deferred[Any]:
            link.attempt = None
            link.conn = conn  # statements may be queued from now on, after the set-up
            setup = ["SET synchronous_commit = off"]
            if listening:
                setup += ["LISTEN " + conn.quote_identifier(channel) for channel in self._channels]
            return conn.run("; ".join(setup))

        def ready(_: Any) -> None:
            link.up = True
            link.delay = link.initial_delay
            self._link_up(link)

        def failed(failure: Failure) -> Failure:
            if link.attempt is conn:
                link.attempt = None
            if link.conn is conn:
                link.conn = None
            conn.close()
            return failure

        return conn.connect().addCallback(connected).addCallbacks(ready, failed)

    def _link_up(self, link: _Link) -> None:
        if link is self._listener:
            waiters, self._listen_waiters = self._listen_waiters, []
            for d in waiters:
                d.callback(None)
            pending = [entry for queue in self._backlog.values() for entry in queue
                       if not entry.ready and not entry.fetching]
            if pending:
                self._fetch(pending)
        elif self._queue and self._flush_call is None:
            self._flush()
        if self.connected and self._had_loss and self._starting is None:
            self._had_loss = False
            log.info("Cluster bus: reconnected")
            if self.on_reconnect is not None:
                try:
                    self.on_reconnect()
                except Exception:  # noqa: BLE001
                    log.failure("Cluster bus: on_reconnect failed")

    def _lost(self, conn: _PgConnection, reason: Failure) -> None:
        """A connection that was up broke: reconnect it after a delay."""
        for link in (self._listener, self._sender):
            if link.conn is conn:
                break
        else:
            return
        was_up = link.up
        link.conn = None
        link.up = False
        if not self._running or not was_up:
            return  # not set up yet: the set-up statement fails and _open handles it
        self._had_loss = True
        delay = link.next_delay()
        log.warn("Cluster bus: lost the {role} connection ({error}); reconnecting in {delay:g} s",
                 role=link.role, error=_one_line(reason), delay=delay)
        link.retry = self._reactor.callLater(delay, self._retry, link)
