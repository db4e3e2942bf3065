"""The database schema (SQLAlchemy Core), identical on SQLite and PostgreSQL, and how a database is brought up to it.

Portability choices:

* ids are ``sqlalchemy.Uuid``: a native ``uuid`` on PostgreSQL, ``CHAR(32)`` (lower-case hex) on SQLite. Both
  compare byte-wise, so ``ORDER BY id`` (our paging tie-breaker) gives the same order on both.
* times are epoch milliseconds in ``BigInteger`` columns, as ThingsBoard sends them.
* JSON values (``additional_info``, RPC ``params``/``response``) are ``Text`` written with our own ``json.dumps``:
  the value a client sent is the value it reads back, on either database, with no dialect-specific JSON type.
* ``rpc.seq`` orders a device's RPCs even when their ``created_time`` ties. PostgreSQL draws it from the sequence
  :data:`RPC_SEQ`; SQLite (a single writer) from ``max(seq) + 1`` inside the inserting transaction.

Migrations: Alembic, with its environment inside the package (``migrations/env.py``, ``migrations/versions/``,
configured in code by :func:`alembic_config`: no ``alembic.ini``). At start :func:`upgrade` brings the database
to the head revision; ``nanoiot db upgrade|current|history`` does the same for an operator. Revisions are numbered
``0001`` (the baseline, schema version 1 of the releases before Alembic), ``0002``...

To change the schema, never edit a revision that has shipped (nor rely on ``create_all``, which only adds missing
tables): change the Tables here, then let Alembic draft the next revision from the difference, against a database
at the current head, and review it (autogenerate misses renames, and server defaults need a look)::

    nanoiot db --database sqlite:////tmp/dev.db upgrade
    nanoiot db --database sqlite:////tmp/dev.db revision -m "add device.firmware" --autogenerate

That writes ``migrations/versions/0007_add_device_firmware.py``. Write it so that it runs on SQLite and
PostgreSQL (``op.batch_alter_table`` for what SQLite's ALTER TABLE cannot do), then run
``tests/integration/test_migrations.py``: it checks on both databases that the revisions give exactly what
``create_all`` gives, and that databases of every older release are upgraded in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Sequence,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    insert,
    inspect,
    select,
    text,
    true,
)

from nanoiot.rpc.model import RpcStatus


#: Deterministic constraint names: the repository recognises a violated constraint by its name.
metadata = MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})

tenant = Table(
    "tenant", metadata,
    Column("id", Uuid, primary_key=True),
    Column("created_time", BigInteger, nullable=False),
    Column("title", String(255), nullable=False),
)

customer = Table(
    "customer", metadata,
    Column("id", Uuid, primary_key=True),
    Column("created_time", BigInteger, nullable=False),
    Column("tenant_id", Uuid, nullable=False),
    Column("title", String(255), nullable=False),
    UniqueConstraint("tenant_id", "title"),
)
CUSTOMER_TITLE_UNIQUE = "uq_customer_tenant_id_title"

tb_user = Table(
    "tb_user", metadata,
    Column("id", Uuid, primary_key=True),
    Column("created_time", BigInteger, nullable=False),
    # No foreign keys on tenant_id/customer_id: the system administrator and unassigned users carry NULL_UUID.
    Column("tenant_id", Uuid, nullable=False),
    Column("customer_id", Uuid, nullable=False),
    Column("email", String(255), nullable=False),
    Column("authority", String(32), nullable=False),
    Column("first_name", String(255)),
    Column("last_name", String(255)),
    Column("password_hash", LargeBinary, nullable=False),
    #: False for a disabled user (schema 5): their tokens stop working and they cannot log in.
    Column("enabled", Boolean, nullable=False, server_default=true()),
)
#: E-mail addresses are unique regardless of case (login looks them up case-insensitively).
USER_EMAIL_UNIQUE = "uq_tb_user_lower_email"
Index(USER_EMAIL_UNIQUE, func.lower(tb_user.c.email), unique=True)

device = Table(
    "device", metadata,
    Column("id", Uuid, primary_key=True),
    Column("created_time", BigInteger, nullable=False),
    Column("tenant_id", Uuid, nullable=False),
    Column("customer_id", Uuid, nullable=False),  # NULL_UUID when not assigned to a customer
    Column("name", String(255), nullable=False),
    Column("type", String(255), nullable=False),
    Column("label", String(255)),
    Column("additional_info", Text),
    Column("version", BigInteger, nullable=False, default=1),
    UniqueConstraint("tenant_id", "name"),
    Index(None, "tenant_id", "created_time"),
    Index(None, "customer_id"),
)
DEVICE_NAME_UNIQUE = "uq_device_tenant_id_name"

device_credentials = Table(
    "device_credentials", metadata,
    Column("id", Uuid, primary_key=True),
    Column("created_time", BigInteger, nullable=False),
    Column("device_id", Uuid, ForeignKey("device.id", ondelete="CASCADE"), nullable=False),
    Column("credentials_type", String(32), nullable=False),
    Column("credentials_id", String(255), nullable=False),  # the access token
    Column("credentials_value", Text),
    Column("version", BigInteger, nullable=False, default=1),
    UniqueConstraint("device_id"),
    UniqueConstraint("credentials_id"),
)
CREDENTIALS_ID_UNIQUE = "uq_device_credentials_credentials_id"

#: PostgreSQL's source of ``rpc.seq`` (``create_all`` skips it on SQLite, which has no sequences).
RPC_SEQ = Sequence("rpc_seq_counter", metadata=metadata)

rpc = Table(
    "rpc", metadata,
    Column("id", Uuid, primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("created_time", BigInteger, nullable=False),
    Column("tenant_id", Uuid, nullable=False),
    Column("device_id", Uuid, nullable=False),
    Column("expiration_time", BigInteger, nullable=False),
    Column("oneway", Boolean, nullable=False),
    Column("method", String(255), nullable=False),
    Column("params", Text),
    Column("status", String(16), nullable=False),
    Column("response", Text),
    Column("additional_info", Text),
    Column("retries", Integer),
    Column("user_id", Uuid),
    #: Resends after an acknowledgement timeout so far (schema 2): a resumed command keeps what it had used.
    Column("attempts", Integer, nullable=False, server_default="0"),
    #: Who sent it (schema 4), JSON: {"type": "USER" | "DEVICE" | "RULE_CHAIN" | "BULK", ...ids}.
    Column("initiator", Text),
    #: The bulk batch it belongs to (schema 4).
    Column("batch_id", Uuid),
    # No index holds ``status`` but the partial one below: a command's status changes two or three times, and each
    # index keyed by it had to move the row's entry every time (schema 6; bench/throughput.py --channels bulk).
    Index(None, "device_id", "seq"),  # a device's commands, in order (its queue: with ACTIVE_RPC below)
    Index(None, "batch_id"),  # a batch's commands
    Index(None, "created_time"),  # clean-up of old finished RPCs
    Index(None, "seq"),  # SQLite's next seq (max + 1) without reading every row; appended to, never moved
)

#: The literal condition of the active-commands index: a query uses that index only when its WHERE has this very
#: condition (SQLite cannot match bound parameters against a partial index's literals).
ACTIVE_RPC = text("status IN (" + ", ".join(f"'{s.value}'" for s in RpcStatus if not s.is_terminal) + ")")

#: The commands not finished yet, in order (started back after a restart): only they are in this index, so a
#: finished command leaves it once and a table of millions of finished ones is not scanned at start.
Index("ix_rpc_active_seq", rpc.c.seq, sqlite_where=ACTIVE_RPC, postgresql_where=ACTIVE_RPC)

# --- cluster mode (schema 3): several nodes sharing one PostgreSQL database ------------------------------------------

#: One row per running node; a node whose ``heartbeat_time`` is too old is dead and its devices may be claimed.
cluster_node = Table(
    "cluster_node", metadata,
    Column("node_id", String(255), primary_key=True),
    Column("address", String(255)),  # host:port of the node's HTTP server, for operators
    Column("started_time", BigInteger),
    Column("heartbeat_time", BigInteger),
    Column("connected_devices", Integer),
)

#: Which node serves a device. ``epoch`` grows by one per claim, so a node's late release (or write) made under an
#: older claim is recognised as stale (fencing).
device_owner = Table(
    "device_owner", metadata,
    Column("device_id", Uuid, primary_key=True),
    Column("node_id", String(255), nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("claimed_time", BigInteger),
    Index(None, "node_id"),  # a node's devices, removed with it
)

#: Values every node must agree on (the JWT signing key, the request-id counter): first writer wins.
cluster_setting = Table(
    "cluster_setting", metadata,
    Column("name", String(255), primary_key=True),
    Column("value", Text, nullable=False),
)

#: Routed messages too large for a NOTIFY payload: the notification carries the id. INTEGER on SQLite, so that the
#: id is the rowid and numbers itself (SQLite assigns no value to a BIGINT primary key); BIGSERIAL on PostgreSQL.
cluster_message = Table(
    "cluster_message", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("created_time", BigInteger, nullable=False),
    Column("payload", Text, nullable=False),
)

# --- rule chains, relations and bulk RPC (schema 4) -----------------------------------------------------------------

#: A tenant's rule chains as ThingsBoard exports them: the chain's fields here, ``metadata`` (firstNodeIndex, nodes,
#: connections) as JSON text.
rule_chain = Table(
    "rule_chain", metadata,
    Column("id", Uuid, primary_key=True),
    Column("created_time", BigInteger, nullable=False),
    Column("tenant_id", Uuid, nullable=False),
    Column("name", String(255), nullable=False),
    Column("type", String(32), nullable=False, server_default="CORE"),
    Column("root", Boolean, nullable=False, server_default="0"),
    Column("debug_mode", Boolean, nullable=False, server_default="0"),
    Column("configuration", Text),
    Column("additional_info", Text),
    Column("metadata", Text),
    Column("version", BigInteger, nullable=False, server_default="1"),
    Index(None, "tenant_id", "root"),
)

#: ThingsBoard's entity relations (``from`` -> ``to`` of a type, in a type group), per tenant.
entity_relation = Table(
    "entity_relation", metadata,
    Column("tenant_id", Uuid, nullable=False),
    Column("from_id", Uuid, primary_key=True),
    Column("from_type", String(32), primary_key=True),
    Column("to_id", Uuid, primary_key=True),
    Column("to_type", String(32), primary_key=True),
    Column("relation_type_group", String(32), primary_key=True),
    Column("relation_type", String(255), primary_key=True),
    Column("additional_info", Text),
    Index(None, "to_id", "to_type"),
)

#: One bulk RPC: the command it sends, who sent it, how many devices it targets; its commands carry its id.
rpc_batch = Table(
    "rpc_batch", metadata,
    Column("id", Uuid, primary_key=True),
    Column("created_time", BigInteger, nullable=False),
    Column("tenant_id", Uuid, nullable=False),
    Column("total", Integer, nullable=False),
    Column("request", Text),
    Column("initiator", Text),
)

#: The version table of the releases before Alembic. Kept, and set to :data:`LEGACY_GUARD` for good, so that such a
#: release started on a database this code has upgraded refuses it ("newer than this NanoIoT understands") instead of
#: writing to it. Nothing here reads it except :func:`upgrade`, once, on a database that has no Alembic revision yet.
schema_version = Table(
    "schema_version", metadata,
    Column("id", Integer, primary_key=True),  # always 1: a single row
    Column("version", Integer, nullable=False),
)
LEGACY_GUARD = 5

#: The revision that a database recorded at old schema version N is at (5: the guard revision 0005 writes).
LEGACY_REVISIONS = {1: "0001", 2: "0002", 3: "0003", 4: "0004", 5: "0005"}

#: The Alembic environment (env.py, versions/) shipped inside the package.
MIGRATIONS = Path(__file__).with_name("migrations")

#: PostgreSQL advisory lock held by the upgrade transaction: nodes of a cluster starting at once upgrade in turn.
UPGRADE_LOCK = 0x4E616E6F496F54  # "NanoIoT"


class SchemaTooNew(Exception):
    """The database was written by a newer NanoIoT: refusing to guess what its extra columns mean."""

    def __init__(self, found: str) -> None:
        super().__init__(f"the database schema is at {found}, newer than this NanoIoT understands "
                         f"(revision {head_revision()}); upgrade NanoIoT")
        self.found = found


@dataclass(frozen=True)
class Upgraded:
    """What :func:`upgrade` found and did."""

    #: The revision the database was at (after recognising an old version table); None if the database was empty.
    found: str | None
    head: str
    #: The old ``schema_version`` the database had instead of a revision, if it had one.
    legacy: int | None = None


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """Alembic's configuration in code (no alembic.ini): env.py runs on ``connection``, else connects to ``url``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    config.attributes.update(connection=connection, url=url)
    return config


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def revisions() -> list[Script]:
    """Every revision, newest first."""
    return list(_scripts().walk_revisions())


def head_revision() -> str:
    """The revision this code writes and understands."""
    head = _scripts().get_current_head()
    assert head is not None
    return head


def upgrade(conn: Connection) -> Upgraded:
    """Bring the database behind ``conn`` to the head revision (idempotent).

    Runs inside the caller's transaction, so a failed upgrade changes nothing (SQLite and PostgreSQL both have
    transactional DDL). An empty database is created at head by ``create_all`` and stamped (the tests check that
    this equals running every revision); one made before Alembic is stamped at the revision of its
    ``schema_version`` and upgraded from there. On PostgreSQL an advisory lock makes concurrent starts take turns.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": UPGRADE_LOCK})
    scripts, head = _scripts(), head_revision()
    context = MigrationContext.configure(conn)
    found, legacy = context.get_current_revision(), None
    if found is None:
        legacy = legacy_version(conn)
        if legacy is None:
            metadata.create_all(conn)
            conn.execute(insert(schema_version).values(id=1, version=LEGACY_GUARD))
            context.stamp(scripts, head)
            return Upgraded(None, head)
        if legacy > max(LEGACY_REVISIONS):
            raise SchemaTooNew(f"schema version {legacy}")
        found = LEGACY_REVISIONS[legacy]
        context.stamp(scripts, found)
    try:
        scripts.get_revision(found)
    except CommandError:
        raise SchemaTooNew(f"revision {found}") from None
    if found != head:
        command.upgrade(alembic_config(conn), "head")
    return Upgraded(found, head, legacy)


def legacy_version(conn: Connection) -> int | None:
    """The old ``schema_version`` (releases before Alembic), or None on a database without one."""
    if not inspect(conn).has_table(schema_version.name):
        return None
    return conn.scalar(select(schema_version.c.version).where(schema_version.c.id == 1))


def current_revision(conn: Connection) -> str | None:
    """The Alembic revision recorded in the database, or None on a database that has none."""
    return MigrationContext.configure(conn).get_current_revision()
