"""The cluster's LISTEN/NOTIFY bus on a real PostgreSQL: delivery, order, batching, large payloads, lost connections.

Every test gets a fresh database with a ``cluster_message`` table and buses whose connections carry a unique
``application_name``, so a test can kill exactly its own connections (``pg_terminate_backend``) or keep them from
coming back (``ALTER DATABASE ... ALLOW_CONNECTIONS false``). Waiting is always a Deferred with a timeout.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import psycopg2
import pytest
import pytest_twisted
from sqlalchemy.engine import make_url
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList

from nanoiot.cluster.notify import NotifyBus, _PgConnection
from tests.fixtures.database import create_database

pytestmark = pytest.mark.postgres

TIMEOUT = 15  # seconds for anything to arrive; everything here takes milliseconds

CREATE_MESSAGE_TABLE = """
CREATE TABLE IF NOT EXISTS cluster_message (
    id BIGSERIAL PRIMARY KEY,
    created_time BIGINT NOT NULL,
    payload TEXT NOT NULL
)
"""

_numbers = itertools.count(1)


def run_sql(url: str, query: str, params: Any = None, database: str | None = None) -> list[tuple[Any, ...]] | None:
    """One statement on a connection of its own (autocommit): the test's view of the database."""
    u = make_url(url)
    conn = psycopg2.connect(host=u.host, port=u.port, user=u.username, dbname=database or u.database,
                            connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(query, params)
            return cursor.fetchall() if cursor.description is not None else None
    finally:
        conn.close()


def database_of(url: str) -> str:
    return str(make_url(url).database)


def terminate(url: str, bus: NotifyBus) -> int:
    """Kill the bus's backends, as a server restart or a DBA would; returns how many were killed."""
    rows = run_sql(url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = %s AND datname = %s", (bus.application_name, database_of(url)),
                   database="postgres")  # from another database: the test's may be refusing connections
    return len(rows or [])


def backends(url: str, bus: NotifyBus) -> int:
    rows = run_sql(url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND datname = %s",
                   (bus.application_name, database_of(url)), database="postgres")
    assert rows is not None
    return int(rows[0][0])


def allow_connections(url: str, allowed: bool) -> None:
    run_sql(url, f'ALTER DATABASE "{database_of(url)}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}',
            database="postgres")


def message_rows(url: str) -> int:
    rows = run_sql(url, "SELECT count(*) FROM cluster_message")
    assert rows is not None
    return int(rows[0][0])


def until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> Deferred[None]:
    """Fires once ``predicate()`` is true, checking every 10 ms on the reactor; fails after ``timeout``."""
    d: Deferred[None] = Deferred()
    call: list[Any] = []

    def check() -> None:
        call.clear()
        if predicate():
            d.callback(None)
        else:
            call.append(reactor.callLater(0.01, check))

    def cancel(result: Any) -> Any:
        for pending in call:
            if pending.active():
                pending.cancel()
        return result

    check()
    d.addTimeout(timeout, reactor)
    d.addBoth(cancel)
    return d


class Inbox:
    """A channel callback that records payloads; ``wait(n)`` fires once ``n`` have arrived."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._waits: list[tuple[int, Deferred[list[str]]]] = []

    def __call__(self, payload: str) -> None:
        self.items.append(payload)
        for entry in list(self._waits):
            if len(self.items) >= entry[0]:
                self._waits.remove(entry)
                entry[1].callback(self.items)

    def wait(self, count: int, timeout: float = TIMEOUT) -> Deferred[list[str]]:
        if len(self.items) >= count:
            d: Deferred[list[str]] = Deferred()
            d.callback(self.items)
            return d
        d = Deferred()
        self._waits.append((count, d))
        d.addTimeout(timeout, reactor)
        return d


def reconnected(bus: NotifyBus) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    bus.on_reconnect = lambda: None if d.called else d.callback(None)
    d.addTimeout(TIMEOUT, reactor)
    return d


def owned_by_bus(bus: NotifyBus, obj: Any) -> bool:
    owner = getattr(obj, "__self__", None)
    return owner is bus or isinstance(owner, _PgConnection)


def leftovers(bus: NotifyBus) -> list[Any]:
    """Delayed calls, readers and writers that belong to the bus (or any bus connection)."""
    calls = [c for c in reactor.getDelayedCalls() if owned_by_bus(bus, c.func)]
    descriptors = [d for d in reactor.getReaders() + reactor.getWriters() if isinstance(d, _PgConnection)]
    return calls + descriptors


@pytest.fixture
def bus_url(postgres_server: str) -> str:
    """A fresh database with the cluster_message table."""
    url = create_database(postgres_server, f"cluster_notify_{next(_numbers)}")
    run_sql(url, CREATE_MESSAGE_TABLE)
    return url


@pytest_twisted.async_yield_fixture
async def make_bus(bus_url: str) -> Any:
    """make_bus(**options) -> a NotifyBus (not started) on the test's database, stopped after the test."""
    buses: list[NotifyBus] = []
    test_number = next(_numbers)

    def make(**options: Any) -> NotifyBus:
        options.setdefault("reconnect_delay", 0.05)
        bus = NotifyBus(bus_url, reactor, name=f"t{test_number}-{len(buses)}", **options)
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.stop()


async def started(make_bus: Callable[..., NotifyBus], **options: Any) -> NotifyBus:
    bus = make_bus(**options)
    await bus.start().addTimeout(TIMEOUT, reactor)
    return bus


# -- delivery and order ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_thousand_notifications_arrive_in_order(make_bus: Any) -> None:
    a = await started(make_bus)
    b = await started(make_bus)
    inbox = Inbox()
    await a.listen("x", inbox)
    payloads = [f"message {i}" for i in range(1000)]
    for i, payload in enumerate(payloads):
        assert b.notify("x", payload)
        if i % 100 == 99:
            await b.flushed()  # several statements, so that order across statements is tested too
    assert await inbox.wait(1000) == payloads
    assert a.connected and b.connected


@pytest_twisted.ensureDeferred
async def test_request_reply_between_two_buses(make_bus: Any) -> None:
    a = await started(make_bus)
    b = await started(make_bus)
    node_a, node_b = "nanoiot:Node-A:8080", "nanoiot:Node-B:8080"

    def serve(payload: str) -> None:  # node A answers every request on node B's channel
        request_id, _, body = payload.partition(" ")
        a.notify(node_b, f"{request_id} reply to {body}")

    await a.listen(node_a, serve)
    replies = Inbox()
    await b.listen(node_b, replies)
    for i in range(50):  # one at a time: each reply before the next request
        b.notify(node_a, f"{i} request-{i}")
        await replies.wait(i + 1)
    assert replies.items == [f"{i} reply to request-{i}" for i in range(50)]


@pytest_twisted.ensureDeferred
async def test_channel_names_are_case_sensitive_and_may_hold_any_character(make_bus: Any) -> None:
    a = await started(make_bus)
    b = await started(make_bus)
    exact, lower, odd = Inbox(), Inbox(), Inbox()
    await a.listen("NanoIoT:Node-1:8080", exact)
    await a.listen("nanoiot:node-1:8080", lower)
    await a.listen('we"ird ch;annel', odd)  # a quote and a semicolon: only proper quoting makes LISTEN work
    b.notify("NANOIOT:NODE-1:8080", "nobody listens")
    b.notify("nanoiot:node-1:8080", "lower")
    b.notify('we"ird ch;annel', "odd")
    b.notify("NanoIoT:Node-1:8080", "exact")
    assert await exact.wait(1) == ["exact"]
    # Sent earlier in the same statement, so they would have arrived by now.
    assert lower.items == ["lower"]
    assert odd.items == ["odd"]


@pytest_twisted.ensureDeferred
async def test_payloads_may_start_with_any_character(make_bus: Any) -> None:
    a = await started(make_bus)
    b = await started(make_bus)
    inbox = Inbox()
    await a.listen("x", inbox)
    payloads = ["", "=", "@12", "#1=x", "@", "#", "plain", "ünïcødé ✓ 😀", "line\nbreak", "'quoted' \"too\""]
    assert b.notify_many(("x", p) for p in payloads) == len(payloads)
    assert await inbox.wait(len(payloads)) == payloads


@pytest_twisted.ensureDeferred
async def test_identical_notifications_in_one_batch_all_arrive(make_bus: Any) -> None:
    """PostgreSQL folds identical notifications of one transaction into one; the bus must not lose them."""
    a = await started(make_bus)
    b = await started(make_bus)
    inbox = Inbox()
    await a.listen("x", inbox)
    before = b.statements_sent
    for _ in range(300):
        b.notify("x", "same")
        b.notify("x", "#1=same")  # looks like the bus's repeat marker: must still arrive as it is
    assert await inbox.wait(600) == ["same", "#1=same"] * 300
    assert b.statements_sent - before == 1


@pytest_twisted.ensureDeferred
async def test_callback_errors_do_not_stop_delivery(make_bus: Any) -> None:
    a = await started(make_bus)
    b = await started(make_bus)
    seen: list[str] = []

    def fragile(payload: str) -> None:
        seen.append(payload)
        if payload == "boom":
            raise RuntimeError("callback bug")

    other = Inbox()
    await a.listen("x", fragile)
    await a.listen("y", other)
    b.notify_many([("x", "one"), ("x", "boom"), ("y", "other"), ("x", "two")])
    await other.wait(1)
    await until(lambda: len(seen) == 3)
    assert seen == ["one", "boom", "two"]
    b.notify("y", "still listening")
    assert await other.wait(2) == ["other", "still listening"]
    assert a.connected


# -- batching -------------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_notifications_of_one_reactor_turn_share_one_statement(make_bus: Any) -> None:
    a = await started(make_bus)
    b = await started(make_bus)
    inbox = Inbox()
    await a.listen("x", inbox)
    before = b.statements_sent
    for i in range(500):
        assert b.notify("x", str(i))
    assert b.statements_sent == before  # nothing sent synchronously: notify() only queues
    await b.flushed().addTimeout(TIMEOUT, reactor)
    assert b.statements_sent - before <= 2
    assert await inbox.wait(500) == [str(i) for i in range(500)]


@pytest_twisted.ensureDeferred
async def test_notifications_queued_during_a_statement_go_out_together_in_the_next(make_bus: Any) -> None:
    a = await started(make_bus)
    b = await started(make_bus)
    inbox = Inbox()
    await a.listen("x", inbox)
    before = b.statements_sent
    b.notify("x", "first")
    await until(lambda: b.statements_sent > before)  # the first statement is in flight (or done)
    for i in range(200):
        b.notify("x", str(i))
    await b.flushed().addTimeout(TIMEOUT, reactor)
    assert b.statements_sent - before <= 3
    assert await inbox.wait(201) == ["first"] + [str(i) for i in range(200)]


# -- payloads too large for NOTIFY ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_large_payloads_arrive_intact_and_in_order(bus_url: str, make_bus: Any) -> None:
    a = await started(make_bus)
    b = await started(make_bus)
    inbox, other = Inbox(), Inbox()
    await a.listen("nanoiot:Node-1:8080", inbox)
    await a.listen("y", other)
    big = "".join(chr(ord("a") + i % 26) for i in range(100_000))
    unicode_big = ("héllo wörld ✓ 😀 " * 1300)[:20_000]
    assert len(unicode_big.encode("utf-8")) > 20_000
    sent = ["before", big, "between", unicode_big, "after", "@1"]
    # one reactor turn (one statement with two inserts in the middle) ...
    for payload in sent:
        b.notify("nanoiot:Node-1:8080", payload)
    b.notify("y", "other channel")
    # ... and across statements: a small one queued after a large one must not overtake it
    await b.flushed()
    b.notify("nanoiot:Node-1:8080", big)
    await b.flushed()
    b.notify("nanoiot:Node-1:8080", "last")
    received = await inbox.wait(len(sent) + 2)
    assert received == sent + [big, "last"]
    assert await other.wait(1) == ["other channel"]
    assert message_rows(bus_url) == 0  # every row was taken by its receiver


@pytest_twisted.ensureDeferred
async def test_payload_size_limit_counts_utf8_bytes(bus_url: str, make_bus: Any) -> None:
    """Only payloads over max_payload bytes go through cluster_message: nobody listens, so their rows stay."""
    b = await started(make_bus, max_payload=100)
    b.notify("nobody", "x" * 100)   # 100 bytes: inline
    b.notify("nobody", "é" * 50)    # 50 characters, 100 bytes: inline
    b.notify("nobody", "x" * 101)   # 101 bytes: a row
    b.notify("nobody", "é" * 51)    # 51 characters, 102 bytes: a row
    b.notify("nobody", "😀" * 26)   # 26 characters, 104 bytes: a row
    await b.flushed().addTimeout(TIMEOUT, reactor)
    assert message_rows(bus_url) == 3


@pytest_twisted.ensureDeferred
async def test_purge_removes_rows_nobody_fetched(bus_url: str, make_bus: Any) -> None:
    b = await started(make_bus, max_payload=10)
    for i in range(3):
        b.notify("nobody", f"a long enough payload {i}")
    await b.flushed().addTimeout(TIMEOUT, reactor)
    assert await b.purge_older_than(60_000) == 0  # all of them are younger than a minute
    assert message_rows(bus_url) == 3
    assert await b.purge_older_than(-1000) == 3  # "older than one second from now": all of them
    assert message_rows(bus_url) == 0


@pytest_twisted.ensureDeferred
async def test_large_payloads_on_a_shared_channel_reach_every_listener(bus_url: str, make_bus: Any) -> None:
    """A broadcast: each node reads the row (the first to take it would leave the others nothing); purge removes it."""
    a1 = await started(make_bus)
    a2 = await started(make_bus)
    b = await started(make_bus)
    inbox1, inbox2, own = Inbox(), Inbox(), Inbox()
    await a1.listen("broadcast", inbox1, shared=True)
    await a2.listen("broadcast", inbox2, shared=True)
    await a1.listen("a1 only", own)
    big = "B" * 10_000
    b.notify_many([("broadcast", "small"), ("broadcast", big), ("a1 only", big), ("broadcast", "after")])
    assert await inbox1.wait(3) == ["small", big, "after"]
    assert await inbox2.wait(3) == ["small", big, "after"]
    assert await own.wait(1) == [big]
    assert message_rows(bus_url) == 1  # the broadcast's row stays (the unshared one was taken) ...
    assert await b.purge_older_than(-1000) == 1  # ... until purged
    assert message_rows(bus_url) == 0


# -- connections lost and restored ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_listener_reconnects_after_its_backends_are_killed(bus_url: str, make_bus: Any) -> None:
    a = await started(make_bus)
    b = await started(make_bus)
    inbox, later = Inbox(), Inbox()
    await a.listen("x", inbox)
    b.notify("x", "before")
    await inbox.wait(1)

    back = reconnected(a)
    assert terminate(bus_url, a) == 2
    await back
    assert a.connected
    assert backends(bus_url, a) == 2
    b.notify("x", "after")  # the restored LISTEN works ...
    assert await inbox.wait(2) == ["before", "after"]
    await a.listen("y", later)  # ... and so does a new one
    b.notify("y", "new channel")
    assert await later.wait(1) == ["new channel"]
    a.notify("y", "from the reconnected sender")
    assert await later.wait(2) == ["new channel", "from the reconnected sender"]


@pytest_twisted.ensureDeferred
async def test_notifications_queued_while_disconnected_are_sent_after_reconnect(bus_url: str,
                                                                                make_bus: Any) -> None:
    a = await started(make_bus)
    b = await started(make_bus, max_queued=5)
    inbox = Inbox()
    await a.listen("x", inbox)
    back = reconnected(b)
    allow_connections(bus_url, False)  # a's connections stay; b's cannot come back until allowed again
    try:
        assert terminate(bus_url, b) == 2
        await until(lambda: not b.connected)
        assert [b.notify("x", f"queued {i}") for i in range(5)] == [True] * 5
        assert not b.notify("x", "one too many")  # max_queued reached: dropped
        assert b.notify_many([("x", "also too many"), ("x", "and this")]) == 0
        assert not b.connected
    finally:
        allow_connections(bus_url, True)
    await back
    assert await inbox.wait(5) == [f"queued {i}" for i in range(5)]
    b.notify("x", "afterwards")
    assert await inbox.wait(6) == [f"queued {i}" for i in range(5)] + ["afterwards"]
    assert b.dropped == 3


@pytest_twisted.ensureDeferred
async def test_a_fetch_cut_by_a_lost_connection_is_retried_after_reconnect(bus_url: str, make_bus: Any) -> None:
    """The row of a large payload is still there when the DELETE taking it dies with the connection: fetched later.

    A trigger makes the DELETE wait for an advisory lock the test holds, so the connection is killed exactly while
    the fetch is in flight; the small notification sent after the large one must wait for it meanwhile.
    """
    run_sql(bus_url, """
        CREATE FUNCTION wait_for_test() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN OLD; END $$;
        CREATE TRIGGER wait_for_test BEFORE DELETE ON cluster_message FOR EACH ROW EXECUTE FUNCTION wait_for_test();
    """)
    a = await started(make_bus)
    b = await started(make_bus)
    inbox = Inbox()
    await a.listen("x", inbox)
    u = make_url(bus_url)
    holder = psycopg2.connect(host=u.host, port=u.port, user=u.username, dbname=u.database, connect_timeout=10)
    try:
        holder.autocommit = True
        with holder.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(4242)")
        b.notify_many([("x", "small"), ("x", "L" * 9000), ("x", "held back")])

        def fetch_waiting() -> bool:
            rows = run_sql(bus_url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                                    "AND wait_event_type = 'Lock' AND query LIKE 'DELETE FROM cluster_message%%'",
                           (a.application_name,))
            return bool(rows and rows[0][0])

        await until(fetch_waiting)
        assert inbox.items == ["small"]  # "held back" waits behind the large one
        back = reconnected(a)
        assert terminate(bus_url, a) == 2
        await back
        await until(fetch_waiting)  # fetched again on the new connection
        assert inbox.items == ["small"]
        assert message_rows(bus_url) == 1
    finally:
        holder.close()  # releases the lock
    assert await inbox.wait(3) == ["small", "L" * 9000, "held back"]
    assert message_rows(bus_url) == 0


# -- listen, unlisten, start and stop ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unlisten_stops_delivery(make_bus: Any) -> None:
    a = await started(make_bus)
    b = await started(make_bus)
    x, y = Inbox(), Inbox()
    await a.listen("x", x)
    await a.listen("y", y)
    b.notify("x", "x1")
    await x.wait(1)
    await a.unlisten("x")
    b.notify("x", "x2")
    b.notify("y", "y1")  # sent after x2 in the same statement: once it is here, x2 would be too
    await y.wait(1)
    assert x.items == ["x1"]
    await a.listen("x", x)
    b.notify("x", "x3")
    assert await x.wait(2) == ["x1", "x3"]


@pytest_twisted.ensureDeferred
async def test_listen_and_notify_before_start(make_bus: Any) -> None:
    a = make_bus()
    b = make_bus()
    inbox = Inbox()
    listening = a.listen("x", inbox)
    assert not listening.called
    assert b.notify("x", "queued before start")
    await a.start().addTimeout(TIMEOUT, reactor)
    assert listening.called  # start() fired after the LISTEN
    await b.start().addTimeout(TIMEOUT, reactor)
    assert await inbox.wait(1) == ["queued before start"]


@pytest_twisted.ensureDeferred
async def test_stop_closes_connections_and_leaves_nothing_on_the_reactor(bus_url: str, make_bus: Any) -> None:
    a = await started(make_bus)
    await a.listen("x", Inbox())
    a.notify("x", "unsent")  # a flush is scheduled
    assert backends(bus_url, a) == 2
    await a.stop()
    assert not a.connected
    assert leftovers(a) == []
    assert not a.notify("x", "after stop")
    await until(lambda: backends(bus_url, a) == 0)


@pytest_twisted.ensureDeferred
async def test_stop_while_reconnecting_leaves_nothing_on_the_reactor(bus_url: str, make_bus: Any) -> None:
    a = await started(make_bus, reconnect_delay=0.05)
    allow_connections(bus_url, False)
    try:
        terminate(bus_url, a)
        await until(lambda: not a.connected)
        await until(lambda: any(owned_by_bus(a, c.func) for c in reactor.getDelayedCalls()))  # a retry is due
    finally:
        allow_connections(bus_url, True)
    await a.stop()
    assert leftovers(a) == []
    await until(lambda: backends(bus_url, a) == 0)


@pytest_twisted.ensureDeferred
async def test_start_fails_when_the_server_is_unreachable(postgres_server: str) -> None:
    dead_url = make_url(postgres_server).set(port=1).render_as_string(hide_password=False)
    bus = NotifyBus(dead_url, reactor, name="unreachable", reconnect_delay=0.05)
    with pytest.raises(psycopg2.OperationalError):
        await bus.start().addTimeout(TIMEOUT, reactor)
    assert not bus.connected
    assert leftovers(bus) == []
    await bus.stop()


@pytest_twisted.ensureDeferred
async def test_flushed_fires_at_once_when_nothing_is_queued(make_bus: Any) -> None:
    b = await started(make_bus)
    assert b.flushed().called
    b.notify("x", "one")
    pending = b.flushed()
    assert not pending.called
    await pending.addTimeout(TIMEOUT, reactor)
    results = await DeferredList([b.flushed(), b.flushed()])
    assert all(ok for ok, _ in results)
