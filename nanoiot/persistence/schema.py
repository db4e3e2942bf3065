"""The database schema (SQLAlchemy Core), identical on SQLite and PostgreSQL, and how a database is brought up to it.

Portability choices:

* ids are ``sqlalchemy.Uuid``: a native ``uuid`` on PostgreSQL, ``CHAR(32)`` (lower-case hex) on SQLite. Both
  compare byte-wise, so ``ORDER BY id`` (our paging tie-breaker) gives the same order on both.
* times are epoch milliseconds in ``BigInteger`` columns, as ThingsBoard sends them.
* JSON values (``additional_info``, RPC ``params``/``response``) are ``Text`` written with our own ``json.dumps``:
  the value a client sent is the value it reads back, on either database, with no dialect-specific JSON type.
* ``rpc.seq`` orders a device's RPCs even when their ``created_time`` ties. PostgreSQL draws it from the sequence
  :data:`RPC_SEQ`; SQLite (a single writer) from ``max(seq) + 1`` inside the inserting transaction.

Versioning: :func:`upgrade` creates a fresh database with ``metadata.create_all`` and records
:data:`SCHEMA_VERSION` in the ``schema_version`` table. A later change to the schema must NOT edit an existing
database through ``create_all`` (which only adds missing tables): bump :data:`SCHEMA_VERSION` and add a numbered
step to :data:`MIGRATIONS` that takes a version N-1 database to version N (plain SQL or Alembic operations run on
the given connection). :func:`upgrade` runs the missing steps in order, in the start-up transaction.
"""

from __future__ import annotations

from collections.abc import Callable

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
    update,
)

#: The version this code writes and understands.
SCHEMA_VERSION = 4

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
    Index(None, "device_id", "status", "seq"),  # a device's queue, in order
    Index(None, "batch_id"),  # a batch's commands
    Index(None, "tenant_id", "status"),  # active counts
    Index(None, "status", "expiration_time"),  # expiry scans
    Index(None, "status", "created_time"),  # clean-up of old finished RPCs
)

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

CLUSTER_TABLES = (cluster_node, device_owner, cluster_setting, cluster_message)

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

SCHEMA_4_TABLES = (rule_chain, entity_relation, rpc_batch)

schema_version = Table(
    "schema_version", metadata,
    Column("id", Integer, primary_key=True),  # always 1: a single row
    Column("version", Integer, nullable=False),
)

#: ``MIGRATIONS[n]`` upgrades a version n-1 database to version n. Version 1 is ``create_all`` on an empty database.
def _add_rpc_attempts(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE rpc ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0"))


def _add_cluster_tables(conn: Connection) -> None:
    # checkfirst: a database once at version 3 and marked back down (as tests do) still upgrades.
    metadata.create_all(conn, tables=list(CLUSTER_TABLES), checkfirst=True)


def _add_rules_relations_and_batches(conn: Connection) -> None:
    # Each part only if missing: a database once at version 4 and marked back down (as tests do) still upgrades.
    columns = {c["name"] for c in inspect(conn).get_columns("rpc")}
    if "initiator" not in columns:
        conn.execute(text("ALTER TABLE rpc ADD COLUMN initiator TEXT"))
    if "batch_id" not in columns:
        uuid_type = "UUID" if conn.dialect.name == "postgresql" else "CHAR(32)"
        conn.execute(text(f"ALTER TABLE rpc ADD COLUMN batch_id {uuid_type}"))
    if "ix_rpc_batch_id" not in {i["name"] for i in inspect(conn).get_indexes("rpc")}:
        conn.execute(text("CREATE INDEX ix_rpc_batch_id ON rpc (batch_id)"))
    metadata.create_all(conn, tables=list(SCHEMA_4_TABLES), checkfirst=True)


MIGRATIONS: dict[int, Callable[[Connection], None]] = {2: _add_rpc_attempts, 3: _add_cluster_tables,
                                                       4: _add_rules_relations_and_batches}


class SchemaTooNew(Exception):
    """The database was written by a newer NanoIoT: refusing to guess what its extra columns mean."""

    def __init__(self, found: int) -> None:
        super().__init__(f"the database schema is version {found}, newer than this NanoIoT understands "
                         f"({SCHEMA_VERSION}); upgrade NanoIoT")
        self.found = found


def upgrade(conn: Connection) -> int:
    """Bring the database behind ``conn`` to :data:`SCHEMA_VERSION` (idempotent); returns the version found.

    0 means the database was new. Runs inside the caller's transaction, so a failed upgrade changes nothing.
    """
    if not inspect(conn).has_table(schema_version.name):
        # A new database (create_all and the version row commit together, so there are no half-made ones).
        metadata.create_all(conn)
        conn.execute(insert(schema_version).values(id=1, version=SCHEMA_VERSION))
        return 0
    found = conn.scalar(select(schema_version.c.version).where(schema_version.c.id == 1)) or 0
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(found)
    for version in range(found + 1, SCHEMA_VERSION + 1):
        MIGRATIONS[version](conn)
    if found < SCHEMA_VERSION:
        conn.execute(update(schema_version).where(schema_version.c.id == 1).values(version=SCHEMA_VERSION))
    return found


def current_version(conn: Connection) -> int | None:
    """The recorded schema version, or None on a database that has none."""
    if not inspect(conn).has_table(schema_version.name):
        return None
    return conn.scalar(select(schema_version.c.version).where(schema_version.c.id == 1))
