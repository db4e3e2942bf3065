"""The only module that talks to the database.

Every query runs on the repository's own thread pool (``deferToThreadPool``), never on the reactor thread, and
returns plain records from :mod:`nanoiot.persistence.records`, never ORM rows, so results can cross threads.
Each public method is a nested ``def thd(conn)`` run by :meth:`Repository._run` in one transaction (Buildbot's
``db`` layer is the model).

SQLite gets exactly one thread (it has one writer anyway; a second thread would only wait on the lock) and, for
file databases, write-ahead logging so that readers in other processes do not block it. PostgreSQL gets a few
threads (``pool_size``, default 4), one connection each.

Health: when the database cannot be reached, every query fails with
:class:`~nanoiot.persistence.errors.DatabaseUnavailable` (a 503 with ``Retry-After`` at every door, never the
driver's text) and the repository turns unhealthy (:attr:`Repository.healthy` False, :attr:`Repository.failing_since`
set). While unhealthy it probes the database every ``probe_interval`` seconds on the reactor clock; the first query
or probe that succeeds makes it healthy again and fires every :meth:`Repository.when_healthy` Deferred, which is how
the journal and the cluster port resume what they had to leave. :meth:`Repository.ping` is the readiness check.
"""

from __future__ import annotations

import enum
import json
import secrets
import string
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, Final, TypeVar
from uuid import UUID

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Row,
    Table,
    create_engine,
    delete,
    event,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (ArgumentError, DBAPIError, DisconnectionError, IntegrityError, InterfaceError,
                            OperationalError, SQLAlchemyError)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import StaticPool
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from nanoiot.errors import BadRequest, ConfigError, Conflict, InvalidArguments, NotFound
from nanoiot.persistence import schema
from nanoiot.persistence.errors import DatabaseUnavailable
from nanoiot.persistence.records import (
    NULL_UUID,
    Authority,
    Customer,
    Device,
    DeviceCredentials,
    Page,
    PageLink,
    RpcRecord,
    RpcStatus,
    SortOrder,
    Tenant,
    User,
)
from nanoiot.persistence.schema import customer as customers
from nanoiot.persistence.schema import device as devices
from nanoiot.persistence.schema import device_credentials as credentials_table
from nanoiot.persistence.schema import rpc as rpcs
from nanoiot.persistence.schema import tb_user as users
from nanoiot.persistence.schema import tenant as tenants

log = Logger(namespace="nanoiot.persistence")

T = TypeVar("T")

#: Threads (and connections) for PostgreSQL when the caller does not say.
DEFAULT_POSTGRES_THREADS = 4
#: How long a PostgreSQL connection attempt may take (seconds) unless the URL sets ``connect_timeout``.
POSTGRES_CONNECT_TIMEOUT = 10
#: How long SQLite waits for another process's write lock before reporting "database is locked" (milliseconds).
SQLITE_BUSY_TIMEOUT_MS = 5000
#: SQLite's page cache per connection (MiB, ``--sqlite-cache-mb``; SQLite's default is 2,000 KiB).
SQLITE_CACHE_MB = 64
#: WAL pages written before SQLite copies them back into the database file (SQLite's default is 1,000).
SQLITE_WAL_CHECKPOINT_PAGES = 10000
#: Attempts for a query that fails with a transient OperationalError (the first one included).
RETRY_ATTEMPTS = 4
#: Seconds before the first retry; doubled for each further one.
RETRY_DELAY = 0.05
#: ``Retry-After`` (seconds) of the 503 a client gets while the database is unreachable (``--db-retry-after``).
DEFAULT_RETRY_AFTER = 5.0
#: Seconds between two probes of an unreachable database.
DEFAULT_PROBE_INTERVAL = 1.0

TOKEN_LENGTH = 20
_TOKEN_ALPHABET = string.ascii_letters + string.digits

DUPLICATE_DEVICE_NAME = "Device with such name already exists!"
DUPLICATE_TOKEN = "Device credentials are already assigned to another device!"
DUPLICATE_CUSTOMER_TITLE = "Customer with such title already exists!"
DEVICE_CHANGED = "Device was already changed by someone else; reload it and try again"

DEVICE_SORTS: dict[str, ColumnElement[Any]] = {
    "createdTime": devices.c.created_time,
    "name": devices.c.name,
    "label": devices.c.label,
    "type": devices.c.type,
}
RPC_SORTS: dict[str, ColumnElement[Any]] = {
    "createdTime": rpcs.c.created_time,
    "expirationTime": rpcs.c.expiration_time,
    "request": rpcs.c.method,
    "response": rpcs.c.response,
}

ACTIVE_RPC_STATUSES: Final = tuple(s for s in RpcStatus if not s.is_terminal)
_ACTIVE_VALUES: Final = sorted(s.value for s in ACTIVE_RPC_STATUSES)
#: Every command not finished yet, in seq order: a scan of the partial index ``ix_rpc_active_seq`` alone.
ACTIVE_RPCS_QUERY: Final = select(rpcs).where(schema.ACTIVE_RPC).order_by(rpcs.c.seq)
TERMINAL_RPC_STATUSES: Final = tuple(s for s in RpcStatus if s.is_terminal)


class _Unchanged(enum.Enum):
    UNCHANGED = "UNCHANGED"


#: In :meth:`Repository.update_rpc_statuses`, "leave the stored response as it is" (None would store no response).
UNCHANGED: Final = _Unchanged.UNCHANGED

#: (rpc id, new status, new response or UNCHANGED, new retries / attempts or None to keep them)
RpcStatusChange = tuple[UUID, RpcStatus, Any, int | None, int | None]

# Messages of OperationalErrors worth another attempt: a lock held by another process, a dropped connection.
_TRANSIENT_MESSAGES = (
    "database is locked",
    "database table is locked",
    "server closed the connection unexpectedly",
    "terminating connection",
    "connection already closed",
    "connection not open",
    "could not receive data from server",
    "could not send data to server",
    "ssl syscall error",
)
# SQLite OperationalErrors that are a statement's fault, not the database's absence.
_STATEMENT_ERRORS = ("no such table", "no such column", "no such function", "syntax error", "has no column",
                     "already exists", "no such index")
# PostgreSQL SQLSTATEs of the same kind: serialization failure, deadlock, server shutting down or starting.
_TRANSIENT_PGCODES = frozenset({"40001", "40P01", "57P01", "57P02", "57P03"})


class Repository:
    """Tenants, customers, users, devices, credentials and RPCs, as Deferreds of records."""

    def __init__(self, url: str, reactor: Any = None, pool_size: int | None = None,
                 retry_after: float = DEFAULT_RETRY_AFTER, probe_interval: float = DEFAULT_PROBE_INTERVAL,
                 sqlite_cache_mb: int = SQLITE_CACHE_MB) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.url = url
        self._reactor = reactor
        self._pool_size = pool_size
        #: SQLite's page cache per connection, MiB (a bound on memory: pages are cached only as they are used).
        self.sqlite_cache_mb = sqlite_cache_mb
        self._pool: ThreadPool | None = None
        self._engine: Engine | None = None
        self._shutdown_trigger: Any = None
        #: Seconds a client is told to wait (``Retry-After``) while the database is unreachable.
        self.retry_after = retry_after
        #: Seconds between probes while unhealthy.
        self.probe_interval = probe_interval
        #: Reactor time of the last query that succeeded (None: none yet).
        self.last_success: float | None = None
        #: Reactor time the database became unreachable; None while healthy.
        self.failing_since: float | None = None
        self._recovery_waiters: list[Deferred[None]] = []
        self._probe_call: Any = None
        #: Set once the schema is in place: an unreachable database before that is a start-up error, not an outage.
        self._started = False

    # --- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Start the pool, connect, and create or upgrade the schema; a bad URL or database is a ConfigError."""
        if self._pool is not None:
            return defer.fail(RuntimeError("the repository is already started"))
        try:
            url = make_url(self.url)
            backend = url.get_backend_name()
        except (ArgumentError, ValueError) as exc:
            return defer.fail(ConfigError(f"invalid database URL {self.url!r}: {exc}"))
        if backend not in ("sqlite", "postgresql"):
            return defer.fail(ConfigError(f"unsupported database {backend!r} in {self.url!r}: "
                                          "use sqlite:///path or postgresql://user:password@host/database"))
        threads = 1 if backend == "sqlite" else (self._pool_size or DEFAULT_POSTGRES_THREADS)
        try:
            engine = _create_engine(url, threads, self.sqlite_cache_mb)
        except (SQLAlchemyError, ValueError, ImportError) as exc:
            return defer.fail(ConfigError(f"invalid database URL {self.url!r}: {_first_line(exc)}"))
        self._engine = engine
        self._pool = ThreadPool(minthreads=1, maxthreads=threads, name=f"nanoiot-db-{backend}")
        self._pool.start()
        # If the reactor stops without stop() (Ctrl-C under twistd), still join the threads so the process exits:
        # DURING shutdown, after every "before" trigger — the services' stopService among them — is done, so that
        # they can still flush the journal and leave the cluster.
        self._shutdown_trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self._stop_on_shutdown)

        def thd(conn: Connection) -> schema.Upgraded:
            return schema.upgrade(conn)

        def failed(failure: Any) -> Any:
            exc = failure.value
            if isinstance(exc, DatabaseUnavailable) and exc.__cause__ is not None:
                exc = exc.__cause__
            if isinstance(exc, schema.SchemaTooNew):
                failure = ConfigError(f"{_safe_url(url)}: {exc}")
            elif isinstance(exc, SQLAlchemyError):
                failure = ConfigError(f"cannot reach the database {_safe_url(url)}: {_first_line(exc)}")
            # Whatever went wrong, leave no threads behind.
            return self.stop().addBoth(lambda _: defer.fail(failure))

        def upgraded(done: schema.Upgraded) -> None:
            self._started = True
            if done.found is None:
                log.info("Created the database schema (revision {head}) in {url}", head=done.head,
                         url=_safe_url(url))
            elif done.found != done.head:
                was = f"schema version {done.legacy}" if done.legacy is not None else f"revision {done.found}"
                log.info("Upgraded the database schema from {was} to revision {head}", was=was, head=done.head)

        # No retries: an unreachable database at start is a configuration error to report at once.
        return self._run(thd, attempts=1).addCallbacks(upgraded, failed)

    def stop(self) -> Deferred[None]:
        """Let queued queries finish, then join the threads and close the connections, off the reactor thread."""
        pool, engine = self._pool, self._engine
        self._pool = self._engine = None
        self._started = False
        self._cancel_probe()
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        if pool is None:
            return defer.succeed(None)

        def shut_down() -> None:
            pool.stop()  # joins the workers once the queue is empty: blocking, so not on the reactor thread
            if engine is not None:
                engine.dispose()

        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), shut_down)

    def _stop_on_shutdown(self) -> Deferred[None]:
        self._shutdown_trigger = None
        return self.stop()

    # --- health ---------------------------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False from the moment a query found the database unreachable until a query or probe succeeds again
        (readiness checks read it; it costs nothing)."""
        return self.failing_since is None

    async def ping(self) -> None:
        """One round trip (``SELECT 1``): returns when the database answers, raises
        :class:`~nanoiot.persistence.errors.DatabaseUnavailable` (a ServiceUnavailable) when it does not, or when
        the repository is not running. For readiness checks; it updates :attr:`healthy` like any query."""
        if self._pool is None:
            raise DatabaseUnavailable("The database is not connected", retry_after=self.retry_after)
        await self._run(_select_one, attempts=1)

    def when_healthy(self) -> Deferred[None]:
        """Fires (on the reactor) once the database is reachable: at once while healthy, else after the query or
        probe that finds it back. What had to be left during an outage is resumed from here."""
        if self.healthy:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._recovery_waiters.append(d)
        return d

    def _succeeded(self) -> None:
        self.last_success = self._reactor.seconds()
        if self.failing_since is None:
            return
        log.info("The database is reachable again after {seconds:.1f} s", seconds=self.last_success -
                 self.failing_since)
        self.failing_since = None
        self._cancel_probe()
        waiters, self._recovery_waiters = self._recovery_waiters, []
        for d in waiters:
            d.callback(None)

    def _unreachable(self, exc: BaseException) -> DatabaseUnavailable:
        if self._started and self._pool is not None:
            if self.failing_since is None:
                self.failing_since = self._reactor.seconds()
                # The operator's log may name the host and port; a client never sees them.
                log.warn("The database is unreachable ({error}); answering 503 until it is back, probing every "
                         "{interval} s", error=_first_line(exc), interval=self.probe_interval)
            self._schedule_probe()
        error = DatabaseUnavailable(retry_after=self.retry_after)
        error.__cause__ = exc
        return error

    def _schedule_probe(self) -> None:
        if self._pool is None or (self._probe_call is not None and self._probe_call.active()):
            return
        self._probe_call = self._reactor.callLater(self.probe_interval, self._probe)

    def _probe(self) -> None:
        self._probe_call = None
        if self._pool is None or self.healthy:
            return
        # A failure marks the repository unhealthy again, which schedules the next probe.
        self._run(_select_one, attempts=1).addErrback(lambda f: f.trap(DatabaseUnavailable, RuntimeError))

    def _cancel_probe(self) -> None:
        call, self._probe_call = self._probe_call, None
        if call is not None and call.active():
            call.cancel()

    def get_schema_revision(self) -> Deferred[str | None]:
        """The Alembic revision recorded in the database (for diagnostics and tests)."""
        return self._run(schema.current_revision)

    # --- tenants, customers, users --------------------------------------------------------------------------------

    def create_tenant(self, title: str) -> Deferred[Tenant]:
        """A tenant owns the devices, customers and users below it (the demo and the tests create them)."""
        record = Tenant(uuid.uuid4(), self._now(), title)

        def thd(conn: Connection) -> Tenant:
            conn.execute(insert(tenants).values(id=record.id, created_time=record.created_time, title=title))
            return record

        return self._run(thd)

    def get_tenant(self, tenant_id: UUID) -> Deferred[Tenant | None]:
        """None when there is no such tenant: callers decide whether that is a 404."""

        def thd(conn: Connection) -> Tenant | None:
            row = conn.execute(select(tenants).where(tenants.c.id == tenant_id)).first()
            return _tenant(row) if row else None

        return self._run(thd)

    def create_customer(self, tenant_id: UUID, title: str) -> Deferred[Customer]:
        """A title already used in the tenant is a BadRequest, as in ThingsBoard."""
        record = Customer(uuid.uuid4(), self._now(), tenant_id, title)

        def thd(conn: Connection) -> Customer:
            try:
                conn.execute(insert(customers).values(id=record.id, created_time=record.created_time,
                                                     tenant_id=tenant_id, title=title))
            except IntegrityError as exc:
                raise _translate(exc) from None
            return record

        return self._run(thd)

    def update_customer(self, customer: Customer) -> Deferred[Customer]:
        """Store a new title (the only field that changes); NotFound if the customer was deleted meanwhile."""

        def thd(conn: Connection) -> Customer:
            where = customers.c.id == customer.id
            try:
                result = conn.execute(update(customers).where(where).values(title=customer.title))
            except IntegrityError as exc:
                raise _translate(exc) from None
            if result.rowcount == 0:
                raise NotFound()
            return _customer(conn.execute(select(customers).where(where)).one())

        return self._run(thd)

    def get_customer(self, customer_id: UUID) -> Deferred[Customer | None]:
        """None when there is no such customer."""

        def thd(conn: Connection) -> Customer | None:
            row = conn.execute(select(customers).where(customers.c.id == customer_id)).first()
            return _customer(row) if row else None

        return self._run(thd)

    def create_user(self, email: str, password_hash: bytes, authority: Authority, tenant_id: UUID,
                    customer_id: UUID, first_name: str | None = None,
                    last_name: str | None = None) -> Deferred[User]:
        """An e-mail already present, in any letter case, is a BadRequest: logins look e-mails up ignoring case."""
        record = User(uuid.uuid4(), self._now(), tenant_id, customer_id, email, Authority(authority), first_name,
                      last_name, password_hash)

        def thd(conn: Connection) -> User:
            try:
                conn.execute(insert(users).values(
                    id=record.id, created_time=record.created_time, tenant_id=tenant_id, customer_id=customer_id,
                    email=email, authority=record.authority.value, first_name=first_name, last_name=last_name,
                    password_hash=password_hash))
            except IntegrityError as exc:
                raise _translate(exc, email=email) from None
            return record

        return self._run(thd)

    def get_user(self, user_id: UUID) -> Deferred[User | None]:
        """None when the user was deleted (a token may outlive its user)."""

        def thd(conn: Connection) -> User | None:
            row = conn.execute(select(users).where(users.c.id == user_id)).first()
            return _user(row) if row else None

        return self._run(thd)

    def get_user_by_email(self, email: str) -> Deferred[User | None]:
        """Ignoring case; the database lowers both sides, exactly as its unique index does."""

        def thd(conn: Connection) -> User | None:
            query = select(users).where(func.lower(users.c.email) == func.lower(literal(email)))
            row = conn.execute(query).first()
            return _user(row) if row else None

        return self._run(thd)

    def count_users(self) -> Deferred[int]:
        """Zero means a first start, when the demo seeds its data."""

        def thd(conn: Connection) -> int:
            return conn.scalar(select(func.count()).select_from(users)) or 0

        return self._run(thd)

    # --- devices and credentials ----------------------------------------------------------------------------------

    def create_device(self, tenant_id: UUID, name: str, type: str = "default", label: str | None = None,
                      additional_info: Any = None, customer_id: UUID = NULL_UUID,
                      access_token: str | None = None) -> Deferred[tuple[Device, DeviceCredentials]]:
        """Device and credentials in one transaction, so that no device is ever without its token.

        Without ``access_token`` a random 20-character alphanumeric one is generated, as ThingsBoard does.
        """
        now = self._now()
        new_device = Device(uuid.uuid4(), now, tenant_id, customer_id, name, type, label, additional_info, 1)
        credentials = DeviceCredentials(uuid.uuid4(), now, new_device.id, access_token or generate_token())

        def thd(conn: Connection) -> tuple[Device, DeviceCredentials]:
            try:
                conn.execute(insert(devices).values(_device_values(new_device)))
                conn.execute(insert(credentials_table).values(_credentials_values(credentials)))
            except IntegrityError as exc:
                raise _translate(exc) from None
            return new_device, credentials

        return self._run(thd)

    def update_device(self, device: Device) -> Deferred[Device]:
        """Store name, type, label, customer and additional info, and bump ``version``.

        ``device.version`` must be the stored one (optimistic locking, as ThingsBoard): a stale copy is a Conflict,
        so that two editors never silently overwrite each other. NotFound if the device was deleted.
        """

        def thd(conn: Connection) -> Device:
            values = dict(name=device.name, type=device.type, label=device.label, customer_id=device.customer_id,
                          additional_info=_dump(device.additional_info), version=device.version + 1)
            try:
                result = conn.execute(update(devices).where(devices.c.id == device.id,
                                                            devices.c.version == device.version).values(values))
            except IntegrityError as exc:
                raise _translate(exc) from None
            if result.rowcount == 0:
                exists = conn.scalar(select(devices.c.id).where(devices.c.id == device.id))
                raise Conflict(DEVICE_CHANGED) if exists else NotFound()
            return _select_device(conn, device.id)

        return self._run(thd)

    def get_device(self, device_id: UUID) -> Deferred[Device | None]:
        """None when there is no such device."""

        def thd(conn: Connection) -> Device | None:
            row = conn.execute(select(devices).where(devices.c.id == device_id)).first()
            return _device(row) if row else None

        return self._run(thd)

    def get_tenant_device_by_name(self, tenant_id: UUID, name: str) -> Deferred[Device | None]:
        """Names are unique per tenant and compared exactly (``/api/tenant/devices?deviceName=``)."""
        if len(name) > 255 or "\x00" in name:
            return defer.succeed(None)  # no stored name is longer; PostgreSQL refuses NUL (a gateway's names too)

        def thd(conn: Connection) -> Device | None:
            row = conn.execute(select(devices).where(devices.c.tenant_id == tenant_id, devices.c.name == name)).first()
            return _device(row) if row else None

        return self._run(thd)

    def delete_device(self, device_id: UUID) -> Deferred[bool]:
        """Its credentials and RPCs go with it, in one transaction; False when there was no such device."""

        def thd(conn: Connection) -> bool:
            conn.execute(delete(rpcs).where(rpcs.c.device_id == device_id))
            conn.execute(delete(credentials_table).where(credentials_table.c.device_id == device_id))
            return conn.execute(delete(devices).where(devices.c.id == device_id)).rowcount > 0

        return self._run(thd)

    def get_device_by_token(self, token: str) -> Deferred[Device | None]:
        """How a connecting device is authenticated; None for an unknown token."""

        def thd(conn: Connection) -> Device | None:
            return _devices_by_tokens(conn, (token,)).get(token)

        return self._run(thd)

    def get_devices_by_tokens(self, tokens: Sequence[str]) -> Deferred[dict[str, Device]]:
        """Many connecting devices at once: one query for a whole reconnect wave instead of one per device."""
        wanted = list(tokens)

        def thd(conn: Connection) -> dict[str, Device]:
            return _devices_by_tokens(conn, wanted)

        return self._run(thd)

    def get_credentials(self, device_id: UUID) -> Deferred[DeviceCredentials | None]:
        """None when there is no such device."""

        def thd(conn: Connection) -> DeviceCredentials | None:
            row = conn.execute(select(credentials_table).where(credentials_table.c.device_id == device_id)).first()
            return _credentials(row) if row else None

        return self._run(thd)

    def update_credentials(self, device_id: UUID, token: str) -> Deferred[DeviceCredentials]:
        """Replace the access token (``version`` + 1); a token of another device is a BadRequest."""

        def thd(conn: Connection) -> DeviceCredentials:
            where = credentials_table.c.device_id == device_id
            try:
                result = conn.execute(update(credentials_table).where(where).values(
                    credentials_id=token, version=credentials_table.c.version + 1))
            except IntegrityError as exc:
                raise _translate(exc) from None
            if result.rowcount == 0:
                raise NotFound("Device credentials wasn't found!")
            return _credentials(conn.execute(select(credentials_table).where(where)).one())

        return self._run(thd)

    def list_tenant_devices(self, tenant_id: UUID, page_link: PageLink,
                            device_type: str | None = None) -> Deferred[Page[Device]]:
        """A page of the tenant's devices, optionally of one type (see :func:`_order_by` for the order)."""
        conditions = [devices.c.tenant_id == tenant_id]
        if device_type is not None:
            conditions.append(devices.c.type == device_type)
        return self._device_page(conditions, page_link)

    def list_customer_devices(self, tenant_id: UUID, customer_id: UUID,
                              page_link: PageLink) -> Deferred[Page[Device]]:
        """A page of the devices assigned to one customer; the tenant too, so no id from elsewhere can leak."""
        return self._device_page([devices.c.tenant_id == tenant_id, devices.c.customer_id == customer_id], page_link)

    def _device_page(self, conditions: list[ColumnElement[bool]], page_link: PageLink) -> Deferred[Page[Device]]:
        def thd(conn: Connection) -> Page[Device]:
            where = list(conditions)
            if page_link.text_search:
                where.append(_contains_ignoring_case(devices.c.name, page_link.text_search))
            order = _order_by(page_link, DEVICE_SORTS, default=devices.c.created_time,
                              tie_breakers=(devices.c.id,))
            return _page(conn, devices, where, order, page_link, _device)

        return self._run(thd)

    def assign_device(self, device_id: UUID, customer_id: UUID) -> Deferred[Device]:
        """Give the device to ``customer_id`` (NULL_UUID: to nobody), bumping ``version``; NotFound if missing."""

        def thd(conn: Connection) -> Device:
            result = conn.execute(update(devices).where(devices.c.id == device_id).values(
                customer_id=customer_id, version=devices.c.version + 1))
            if result.rowcount == 0:
                raise NotFound()
            return _select_device(conn, device_id)

        return self._run(thd)

    # --- RPCs -----------------------------------------------------------------------------------------------------

    def insert_rpcs(self, records: list[RpcRecord]) -> Deferred[list[RpcRecord]]:
        """Store new RPCs in one transaction (the writer batches them); returns them with ``seq`` assigned in list
        order (a record that already carries a ``seq`` keeps it), which is the order a device receives them in."""
        if not records:
            return defer.succeed([])
        return self._run(lambda conn: _insert_rpcs(conn, records))

    def update_rpc_statuses(self, changes: Sequence[RpcStatusChange]) -> Deferred[None]:
        """Apply ``(id, status, response | UNCHANGED, retries | None, attempts | None)`` changes in one transaction.

        Several changes of one RPC fold into one in list order, then rows that change the same columns are
        updated with one executemany: a device actor's burst of transitions costs a couple of statements.
        """
        groups = _fold_status_changes(changes)
        if not groups:
            return defer.succeed(None)
        return self._run(lambda conn: _apply_status_groups(conn, groups))

    def write_rpc_batch(self, inserts: list[RpcRecord], changes: Sequence[RpcStatusChange],
                        deletes: Sequence[UUID] = ()) -> Deferred[list[RpcRecord]]:
        """The journal's flush: new RPCs, then status changes, then deletions, all in ONE transaction, so a crash
        leaves either the whole batch or none of it. A change of an RPC inserted in the same batch is written as
        part of its insert (a persistent command to a connected device: QUEUED and SENT in one row write)."""
        inserts, changes = _fold_into_inserts(inserts, changes)
        groups = _fold_status_changes(changes)
        wanted = list(deletes)

        def thd(conn: Connection) -> list[RpcRecord]:
            stored = _insert_rpcs(conn, inserts) if inserts else []
            if groups:
                _apply_status_groups(conn, groups)
            if wanted:
                conn.execute(delete(rpcs).where(rpcs.c.id.in_(wanted)))
            return stored

        return self._run(thd)

    def max_rpc_seq(self) -> Deferred[int]:
        """The highest ``seq`` ever stored (0 for none): request ids continue above it after a restart."""

        def thd(conn: Connection) -> int:
            return int(conn.scalar(select(func.coalesce(func.max(rpcs.c.seq), 0))))

        return self._run(thd)

    def get_rpc(self, rpc_id: UUID) -> Deferred[RpcRecord | None]:
        """None when there is no such RPC (``GET /api/rpc/persistent/{id}`` answers 404)."""

        def thd(conn: Connection) -> RpcRecord | None:
            row = conn.execute(select(rpcs).where(rpcs.c.id == rpc_id)).first()
            return _rpc(row) if row else None

        return self._run(thd)

    def delete_rpc(self, rpc_id: UUID) -> Deferred[bool]:
        """False when there was no such RPC."""

        def thd(conn: Connection) -> bool:
            return conn.execute(delete(rpcs).where(rpcs.c.id == rpc_id)).rowcount > 0

        return self._run(thd)

    def list_device_rpcs(self, device_id: UUID, page_link: PageLink,
                         status: RpcStatus | None = None) -> Deferred[Page[RpcRecord]]:
        """A page of one device's RPCs, in ``seq`` order unless sorted; ``textSearch`` is ignored, as ThingsBoard
        does."""

        def thd(conn: Connection) -> Page[RpcRecord]:
            where = [rpcs.c.device_id == device_id]
            if status is not None:
                where.append(rpcs.c.status == RpcStatus(status).value)
            order = _order_by(page_link, RPC_SORTS, default=rpcs.c.seq, tie_breakers=(rpcs.c.seq, rpcs.c.id))
            return _page(conn, rpcs, where, order, page_link, _rpc)

        return self._run(thd)

    def load_active_rpcs(self, statuses: Iterable[RpcStatus] = ACTIVE_RPC_STATUSES) -> Deferred[list[RpcRecord]]:
        """The RPCs in these statuses, by device then ``seq``: each device's queue, to resume after a restart."""
        wanted = sorted(RpcStatus(s).value for s in statuses)
        # The active ones through their partial index (its literal condition), in seq order; by device here.
        query = (ACTIVE_RPCS_QUERY if wanted == _ACTIVE_VALUES
                 else select(rpcs).where(rpcs.c.status.in_(wanted)).order_by(rpcs.c.seq))

        def thd(conn: Connection) -> list[RpcRecord]:
            records = [_rpc(row) for row in conn.execute(query)]
            records.sort(key=_by_device)  # stable: each device's keep their seq order
            return records

        return self._run(thd)

    def load_device_active_rpcs(self, device_id: UUID) -> Deferred[list[RpcRecord]]:
        """One device's RPCs not yet finished, by (created_time, seq): its queue, for the node that just claimed it
        in cluster mode (the other devices' queues live on other nodes)."""
        wanted = [s.value for s in ACTIVE_RPC_STATUSES]

        def thd(conn: Connection) -> list[RpcRecord]:
            query = (select(rpcs)
                     .where(rpcs.c.device_id == device_id, rpcs.c.status.in_(wanted))
                     .order_by(rpcs.c.created_time, rpcs.c.seq))
            return [_rpc(row) for row in conn.execute(query)]

        return self._run(thd)

    def count_active_rpcs(self, device_id: UUID | None = None, tenant_id: UUID | None = None) -> Deferred[int]:
        """RPCs not yet in a terminal status, of one device, one tenant, or all (for limits and metrics)."""

        def thd(conn: Connection) -> int:
            query = select(func.count()).select_from(rpcs).where(schema.ACTIVE_RPC)
            if device_id is not None:
                query = query.where(rpcs.c.device_id == device_id)
            if tenant_id is not None:
                query = query.where(rpcs.c.tenant_id == tenant_id)
            return conn.scalar(query) or 0

        return self._run(thd)

    def delete_terminal_rpcs_older_than(self, cutoff_ms: int, batch: int = 10000) -> Deferred[int]:
        """Delete finished RPCs created before ``cutoff_ms``; returns how many.

        ``batch`` rows per transaction, so that a large clean-up never holds locks for long and other queries run
        between batches.
        """
        if batch < 1:
            return defer.fail(InvalidArguments(f"batch must be at least 1, got {batch}"))

        def thd(conn: Connection) -> int:
            doomed = (select(rpcs.c.id)
                      .where(rpcs.c.status.in_([s.value for s in TERMINAL_RPC_STATUSES]),
                             rpcs.c.created_time < cutoff_ms)
                      .limit(batch)
                      .scalar_subquery())
            return conn.execute(delete(rpcs).where(rpcs.c.id.in_(doomed))).rowcount

        async def clean_up() -> int:
            total = 0
            while True:
                deleted = await self._run(thd)
                total += deleted
                if deleted < batch:
                    return total

        return defer.ensureDeferred(clean_up())

    # --- internals ------------------------------------------------------------------------------------------------

    def _now(self) -> int:
        return round(self._reactor.seconds() * 1000)

    def _run(self, fn: Callable[[Connection], T], attempts: int = RETRY_ATTEMPTS) -> Deferred[T]:
        """Run ``fn(conn)`` in one transaction on the pool, off the reactor thread.

        A transient OperationalError (a lock held by another process, a dropped connection) is retried with
        backoff, the wait scheduled on the reactor so that no worker thread sleeps; every other error is final.
        """
        pool, engine = self._pool, self._engine
        if pool is None or engine is None:
            return defer.fail(RuntimeError("the repository is not started"))

        def transaction() -> T:
            with engine.begin() as conn:
                return fn(conn)

        async def with_retries() -> T:
            number = 1
            while True:
                try:
                    result = await deferToThreadPool(self._reactor, pool, transaction)
                except OperationalError as exc:
                    if number >= attempts or not _is_transient(exc):
                        if _is_unreachable(exc):
                            raise self._unreachable(exc) from exc
                        raise
                    delay = RETRY_DELAY * 2 ** (number - 1)
                    log.warn("Transient database error (attempt {number} of {attempts}), retrying in {delay}s: "
                             "{error}", number=number, attempts=attempts, delay=delay, error=_first_line(exc))
                    await task.deferLater(self._reactor, delay, lambda: None)
                    number += 1
                except (InterfaceError, DisconnectionError, PoolTimeout, DBAPIError) as exc:
                    if _is_unreachable(exc):
                        raise self._unreachable(exc) from exc
                    raise
                else:
                    self._succeeded()
                    return result

        return defer.ensureDeferred(with_retries())


def _select_one(conn: Connection) -> None:
    conn.exec_driver_sql("SELECT 1")


def generate_token() -> str:
    """A 20-character alphanumeric access token, as ThingsBoard's ``randomAlphanumeric(20)``."""
    return "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(TOKEN_LENGTH))


# --- engine -----------------------------------------------------------------------------------------------------------

def _create_engine(url: URL, threads: int, sqlite_cache_mb: int = 64) -> Engine:
    if url.get_backend_name() == "postgresql":
        connect_args = {} if "connect_timeout" in url.query else {"connect_timeout": POSTGRES_CONNECT_TIMEOUT}
        options: dict[str, Any] = {}
        if url.get_driver_name() == "psycopg2":
            # The journal's status updates are executemany UPDATEs: plain psycopg2 sends one round trip per row
            # (half of a PostgreSQL drain's server time); execute_batch pages them.
            options["executemany_mode"] = "values_plus_batch"
        return create_engine(url, pool_pre_ping=True, pool_size=threads, max_overflow=0, connect_args=connect_args,
                             **options)
    in_memory = url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"
    options: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
    if in_memory:
        options["poolclass"] = StaticPool  # one connection, or each new one would see an empty database
    engine = create_engine(url, **options)

    @event.listens_for(engine, "connect")
    def configure(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin (see "begin" below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if not in_memory:
            cursor.execute("PRAGMA journal_mode=WAL")  # readers in other processes do not block our writer
            cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; a power loss may only drop the last commits
            # The rpc table's indexes take random keys (uuid ids, device ids): a journal batch dirties a page per
            # row in each. A larger page cache and fewer WAL checkpoints (each copies every page written since the
            # last) cut the database thread's CPU per command by about a quarter at 50,000 rows (bench/throughput.py).
            cursor.execute(f"PRAGMA cache_size=-{sqlite_cache_mb * 1024}")
            cursor.execute(f"PRAGMA wal_autocheckpoint={SQLITE_WAL_CHECKPOINT_PAGES}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def begin(conn: Connection) -> None:
        # sqlite3 would only BEGIN before a write, so the reads of a transaction would see no consistent snapshot.
        conn.exec_driver_sql("BEGIN")

    return engine


def _is_transient(exc: OperationalError) -> bool:
    if exc.connection_invalidated:
        return True
    if getattr(exc.orig, "pgcode", None) in _TRANSIENT_PGCODES:
        return True
    text = str(exc.orig).lower()
    return any(message in text for message in _TRANSIENT_MESSAGES)


def _is_unreachable(exc: BaseException) -> bool:
    """The database itself is out of reach (a 503 for everyone until it is back), as opposed to a failed statement
    (a missing table, bad SQL: a bug, kept a 500 with an error id)."""
    if isinstance(exc, (InterfaceError, DisconnectionError, PoolTimeout)):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, OperationalError):
        return False
    code = getattr(exc.orig, "pgcode", None)
    if code:  # PostgreSQL answered: only its connection, shutdown and resource classes mean "not now"
        return code.startswith(("08", "53", "57P"))
    text = str(exc.orig).lower()
    # No SQLSTATE: psycopg2 could not connect or lost the connection; SQLite could not open, read or lock its file.
    return not any(bug in text for bug in _STATEMENT_ERRORS)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _safe_url(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _translate(exc: IntegrityError, email: str | None = None) -> Exception:
    """The client-facing error for a violated unique constraint (PostgreSQL names it; SQLite lists its columns)."""
    text = str(exc.orig)
    if schema.DEVICE_NAME_UNIQUE in text or "device.tenant_id, device.name" in text:
        return BadRequest(DUPLICATE_DEVICE_NAME)
    if schema.CREDENTIALS_ID_UNIQUE in text or "device_credentials.credentials_id" in text:
        return BadRequest(DUPLICATE_TOKEN)
    if schema.USER_EMAIL_UNIQUE in text:
        return BadRequest(f"User with email '{email}' already present in database!")
    if schema.CUSTOMER_TITLE_UNIQUE in text or "customer.tenant_id, customer.title" in text:
        return BadRequest(DUPLICATE_CUSTOMER_TITLE)
    return exc


#: Rows per multi-row INSERT on PostgreSQL (17 parameters each).
PG_INSERT_PAGE = 500
#: The rpc table's columns in the order of the journal's driver-level INSERT (``_rpc_rows``).
_RPC_COLUMNS: Final = ("id", "seq", "created_time", "tenant_id", "device_id", "expiration_time", "oneway", "method",
                       "params", "status", "response", "additional_info", "retries", "user_id", "attempts",
                       "initiator", "batch_id")
#: Status changes, by which columns they set besides ``status`` (response, retries, attempts).
StatusGroups = dict[tuple[bool, bool, bool], list[tuple[Any, ...]]]


def _driver_sql(conn: Connection, sql: str) -> str:
    """``sql`` written with ``?`` markers, in the driver's own style (sqlite3: qmark; psycopg2: format)."""
    return sql if conn.dialect.paramstyle == "qmark" else sql.replace("?", "%s")


def _uuid_key(conn: Connection) -> Callable[[UUID | None], Any]:
    """How the driver takes a ``Uuid`` column's value: SQLite stores CHAR(32) hex; PostgreSQL's uuid accepts the
    text form (psycopg2 sends it as a literal that the column's type coerces)."""
    if conn.dialect.name == "sqlite":
        return lambda value: None if value is None else value.hex
    return lambda value: None if value is None else str(value)


def _insert_rpcs(conn: Connection, records: list[RpcRecord]) -> list[RpcRecord]:
    """The rows as tuples through the driver's executemany: SQLAlchemy's per-row parameter processing (a dict
    and a bind processor per column) was a good part of the database thread's Python time per command."""
    missing = [r for r in records if not r.seq]
    seqs = iter(_next_seqs(conn, len(missing))) if missing else iter(())
    numbered = [r if r.seq else replace(r, seq=next(seqs)) for r in records]
    rows = _rpc_rows(numbered, _uuid_key(conn))
    head = f"INSERT INTO {rpcs.name} ({', '.join(_RPC_COLUMNS)}) VALUES "
    values = f"({', '.join('?' * len(_RPC_COLUMNS))})"
    if conn.dialect.name == "postgresql":
        # Multi-row INSERTs, as SQLAlchemy's insertmanyvalues wrote them: psycopg2's execute_batch (its executemany
        # here) would send one INSERT statement per row.
        for start in range(0, len(rows), PG_INSERT_PAGE):
            page = rows[start:start + PG_INSERT_PAGE]
            conn.exec_driver_sql(_driver_sql(conn, head + ", ".join([values] * len(page))),
                                 tuple(value for row in page for value in row))
    else:
        conn.exec_driver_sql(_driver_sql(conn, head + values), rows)
    return numbered


def _rpc_rows(records: Sequence[RpcRecord], key: Callable[[UUID | None], Any]) -> list[tuple[Any, ...]]:
    """The records as the driver-level INSERT's parameters, in ``_RPC_COLUMNS`` order. The JSON columns and the
    shared ids are converted once per object, not per row: a bulk RPC's commands share their params, origin,
    tenant and batch (the same objects), and JSON encoding was ~6 µs of the database thread per row. Keyed by
    ``id()``, valid while ``records`` holds the objects (this call)."""
    dump = _per_object(_dump)
    shared_key = _per_object(key)
    return [(key(r.id), r.seq, r.created_time, shared_key(r.tenant_id), key(r.device_id), r.expiration_time,
             bool(r.oneway), r.method, dump(r.params), _status_text(r.status), dump(r.response),
             dump(r.additional_info), r.retries, shared_key(r.user_id), r.attempts, dump(r.initiator),
             shared_key(r.batch_id)) for r in records]


def _per_object(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``convert`` remembering its result per object (by ``id()``: only while the caller holds the objects); None
    stays None."""
    done: dict[int, Any] = {}

    def converted(value: Any) -> Any:
        if value is None:
            return None
        found = done.get(id(value))
        if found is None:
            found = done[id(value)] = convert(value)
        return found

    return converted


def _status_text(status: Any) -> str:
    return status.value if type(status) is RpcStatus else RpcStatus(status).value


def _fold_into_inserts(inserts: list[RpcRecord], changes: Sequence[RpcStatusChange]
                       ) -> tuple[list[RpcRecord], Sequence[RpcStatusChange]]:
    """The inserts with the later changes of the same RPCs applied (in order), and the changes of other RPCs."""
    if not inserts or not changes:
        return inserts, changes
    index = {record.id: i for i, record in enumerate(inserts)}
    merged = list(inserts)
    others: list[RpcStatusChange] = []
    for change in changes:
        i = index.get(change[0])
        if i is None:
            others.append(change)
            continue
        _, status, response, retries, attempts = change
        record = merged[i]
        merged[i] = replace(record, status=RpcStatus(status),
                            response=record.response if response is UNCHANGED else response,
                            retries=record.retries if retries is None else retries,
                            attempts=record.attempts if attempts is None else attempts)
    return merged, others


def _fold_status_changes(changes: Sequence[RpcStatusChange]) -> StatusGroups:
    """Several changes of one RPC fold into its last status, the last response, retries and attempts given; then
    they are grouped by the columns they set, each as ``(status, [response], [retries], [attempts], id)``. Runs on
    the reactor thread for every change of a journal batch: the common change (a status alone) takes the short way."""
    folded: dict[UUID, RpcStatusChange] = {}
    for change in changes:
        rpc_id = change[0]
        old = folded.get(rpc_id)
        if old is not None:
            _, status, response, retries, attempts = change
            change = (rpc_id, status, old[2] if response is UNCHANGED else response,
                      old[3] if retries is None else retries, old[4] if attempts is None else attempts)
        folded[rpc_id] = change
    plain: list[tuple[Any, ...]] = []
    groups: StatusGroups = {(False, False, False): plain}
    for rpc_id, status, response, retries, attempts in folded.values():
        value = status.value if isinstance(status, RpcStatus) else RpcStatus(status).value
        if response is UNCHANGED and retries is None and attempts is None:
            plain.append((value, rpc_id))
            continue
        row: list[Any] = [value]
        if response is not UNCHANGED:
            row.append(_dump(response))
        if retries is not None:
            row.append(retries)
        if attempts is not None:
            row.append(attempts)
        row.append(rpc_id)
        key = (response is not UNCHANGED, retries is not None, attempts is not None)
        groups.setdefault(key, []).append(tuple(row))
    if not plain:
        del groups[(False, False, False)]
    return groups


def _apply_status_groups(conn: Connection, groups: StatusGroups) -> None:
    key = _uuid_key(conn)
    for (with_response, with_retries, with_attempts), rows in groups.items():
        columns = ["status"] + [name for name, wanted in (("response", with_response), ("retries", with_retries),
                                                          ("attempts", with_attempts)) if wanted]
        sql = f"UPDATE {rpcs.name} SET {', '.join(f'{c} = ?' for c in columns)} WHERE id = ?"
        conn.exec_driver_sql(_driver_sql(conn, sql), [(*row[:-1], key(row[-1])) for row in rows])


def _next_seqs(conn: Connection, count: int) -> list[int]:
    if conn.dialect.name == "postgresql":
        query = select(schema.RPC_SEQ.next_value()).select_from(func.generate_series(1, count))
        return sorted(conn.scalars(query))
    # SQLite has one writer at a time, and this transaction holds it once it inserts: max + 1 cannot collide.
    last = conn.scalar(select(func.coalesce(func.max(rpcs.c.seq), 0)))
    return list(range(last + 1, last + 1 + count))


# --- paging -----------------------------------------------------------------------------------------------------------

def _contains_ignoring_case(column: ColumnElement[Any], text: str) -> ColumnElement[bool]:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return func.lower(column).like(func.lower(literal(f"%{escaped}%")), escape="\\")


def _order_by(link: PageLink, sorts: dict[str, ColumnElement[Any]], default: ColumnElement[Any],
              tie_breakers: tuple[ColumnElement[Any], ...]) -> list[Any]:
    """ORDER BY for a page: the requested column, then unique tie-breakers, so that pages never overlap.

    NULLs sort as the largest value (PostgreSQL's default) on both databases.
    """
    if link.sort_property is None:
        column, descending = default, False
    else:
        column = sorts.get(link.sort_property)
        if column is None:
            allowed = ", ".join(sorts)
            raise InvalidArguments(f"Invalid sortProperty '{link.sort_property}': use one of {allowed}")
        descending = SortOrder(link.sort_order) is SortOrder.DESC
    columns = [column] + [c for c in tie_breakers if c is not column]
    if descending:
        return [c.desc().nulls_first() for c in columns]
    return [c.asc().nulls_last() for c in columns]


def _page(conn: Connection, table: Table, where: list[ColumnElement[bool]], order: list[Any], link: PageLink,
          convert: Callable[[Row[Any]], T]) -> Page[T]:
    if link.page_size < 1:
        raise InvalidArguments(f"Parameter 'pageSize' must be at least 1, got {link.page_size}")
    if link.page < 0:
        raise InvalidArguments(f"Parameter 'page' must be at least 0, got {link.page}")
    total = conn.scalar(select(func.count()).select_from(table).where(*where)) or 0
    query = select(table).where(*where).order_by(*order).limit(link.page_size).offset(link.page * link.page_size)
    return Page([convert(row) for row in conn.execute(query)], total, link.page_size, link.page)


# --- rows <-> records (the only place that knows both) ----------------------------------------------------------------

#: ``json.dumps(value, separators=(",", ":"))`` without a new encoder per call (that was half of its cost).
_encode_json = json.JSONEncoder(separators=(",", ":")).encode


def _dump(value: Any) -> str | None:
    """JSON text; ASCII-only so that any value (even a NUL character) survives PostgreSQL's text type."""
    return None if value is None else _encode_json(value)


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _tenant(row: Row[Any]) -> Tenant:
    return Tenant(row.id, row.created_time, row.title)


def _customer(row: Row[Any]) -> Customer:
    return Customer(row.id, row.created_time, row.tenant_id, row.title)


def _user(row: Row[Any]) -> User:
    # ``enabled`` (schema 5) read defensively: a row selected without it counts as enabled.
    return User(row.id, row.created_time, row.tenant_id, row.customer_id, row.email, Authority(row.authority),
                row.first_name, row.last_name, bytes(row.password_hash),
                bool(row._mapping.get("enabled", True)))


#: A connect storm's token lookups as plain SQL (``exec_driver_sql``: SQLAlchemy still wraps errors and notices a
#: lost connection): the select with an expanding IN cost ~240 µs per query to build, compile-cache and run, and
#: ~25 µs per row to wrap; this costs ~60 µs per query and ~10 µs per token.
_BY_TOKENS_SQL: Final = (
    f"SELECT d.id, d.created_time, d.tenant_id, d.customer_id, d.name, d.type, d.label, d.additional_info, "
    f"d.version, c.credentials_id FROM {devices.name} d JOIN {credentials_table.name} c ON c.device_id = d.id "
    f"WHERE c.credentials_id IN ({{}})"
)


def _devices_by_tokens(conn: Connection, tokens: Sequence[str]) -> dict[str, Device]:
    """token -> device for the tokens that have one, in one query on the driver's cursor.

    The IN list is padded (with the last token again) to a power of two, so that a driver caching prepared
    statements by text (sqlite3) sees a handful of distinct statements, not one per batch size."""
    if not tokens:
        return {}
    size = 1 << (len(tokens) - 1).bit_length()
    params = list(tokens)
    params.extend(params[-1:] * (size - len(params)))
    dialect = conn.dialect
    marker = "?" if dialect.paramstyle == "qmark" else "%s"
    rows = _driver_rows(conn, _BY_TOKENS_SQL.format(", ".join([marker] * size)), tuple(params))
    # Ids come back as text (SQLite's CHAR(32), psycopg2's uuid) or as UUIDs (psycopg 3); a wave's devices mostly
    # share their tenant and customer, so those become one UUID object each.
    ids: dict[Any, UUID] = {}

    def as_uuid(value: Any) -> UUID:
        found = ids.get(value)
        if found is None:
            found = ids[value] = value if isinstance(value, UUID) else UUID(value)
        return found

    return {row[9]: Device(_as_uuid(row[0]), row[1], as_uuid(row[2]), as_uuid(row[3]), row[4], row[5], row[6],
                           _load(row[7]), row[8]) for row in rows}


def _driver_rows(conn: Connection, statement: str, params: tuple[Any, ...]) -> list[Any]:
    """The rows of one query on the transaction's driver cursor, errors wrapped as SQLAlchemy wraps them.

    ``exec_driver_sql`` built a result description (names, types, processors of every column) for each query,
    ~60 µs of the database thread's time, i.e. a fifth of a connect storm's lookup; the rows are read by position
    here anyway. A driver error still becomes SQLAlchemy's (an ``OperationalError`` is retried by ``_run``), and a
    lost connection is invalidated as SQLAlchemy would."""
    dialect = conn.dialect
    raw = conn.connection
    cursor = raw.cursor()
    try:
        cursor.execute(statement, params)
        return cursor.fetchall()
    except dialect.loaded_dbapi.Error as exc:
        lost = dialect.is_disconnect(exc, raw.dbapi_connection, cursor)
        if lost:
            conn.invalidate(exc)
        raise DBAPIError.instance(statement, params, exc, dialect.loaded_dbapi.Error, connection_invalidated=lost,
                                  dialect=dialect) from exc
    finally:
        try:
            cursor.close()
        except dialect.loaded_dbapi.Error:
            pass  # its connection was lost meanwhile: nothing left to free


def _as_uuid(value: Any) -> UUID:
    return value if isinstance(value, UUID) else UUID(value)


def _device(row: Row[Any]) -> Device:
    return Device(row.id, row.created_time, row.tenant_id, row.customer_id, row.name, row.type, row.label,
                  _load(row.additional_info), row.version)


def _device_values(record: Device) -> dict[str, Any]:
    return dict(id=record.id, created_time=record.created_time, tenant_id=record.tenant_id,
                customer_id=record.customer_id, name=record.name, type=record.type, label=record.label,
                additional_info=_dump(record.additional_info), version=record.version)


def _select_device(conn: Connection, device_id: UUID) -> Device:
    return _device(conn.execute(select(devices).where(devices.c.id == device_id)).one())


def _credentials(row: Row[Any]) -> DeviceCredentials:
    return DeviceCredentials(row.id, row.created_time, row.device_id, row.credentials_id, row.credentials_type,
                             row.credentials_value, row.version)


def _credentials_values(record: DeviceCredentials) -> dict[str, Any]:
    return dict(id=record.id, created_time=record.created_time, device_id=record.device_id,
                credentials_type=record.credentials_type, credentials_id=record.credentials_id,
                credentials_value=record.credentials_value, version=record.version)


def _by_device(record: RpcRecord) -> UUID:
    return record.device_id


def _rpc(row: Row[Any]) -> RpcRecord:
    return RpcRecord(row.id, row.created_time, row.tenant_id, row.device_id, row.expiration_time, row.oneway,
                     row.method, _load(row.params), RpcStatus(row.status), _load(row.response),
                     _load(row.additional_info), row.retries, row.user_id, row.seq, row.attempts,
                     _load(row.initiator), row.batch_id)
