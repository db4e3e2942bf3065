"""Schema migrations with Alembic, on SQLite and the suite's PostgreSQL (every test gets a fresh database).

A database exactly as each older NanoIoT made it (tests/fixtures/old_schemas/, frozen from the git history) is
upgraded in place by the real Repository at start; an empty one is created at head, and ``create_all`` and the
revisions give the same schema; a database newer than the code is refused; cluster nodes starting at once on one
PostgreSQL upgrade in turn; ``nanoiot db`` does what the server does.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import Connection, insert, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SAWarning
from twisted.internet import defer, threads

from nanoiot.cli import main as cli
from nanoiot.errors import ConfigError
from nanoiot.persistence import schema
from nanoiot.persistence.cluster_store import ClusterStore
from nanoiot.persistence.records import NULL_UUID, Authority, RpcRecord, RpcStatus
from nanoiot.persistence.repository import UNCHANGED, Repository, _create_engine
from tests.fixtures import old_schemas
from tests.fixtures.database import create_database

T = TypeVar("T")
T0 = 1_764_633_600_000
TOKEN = "A1_TEST_TOKEN"


def on_database(url: str, fn: Callable[[Connection], T]) -> T:
    """``fn(conn)`` in one transaction on an engine made as the repository makes it (blocking: call in a thread)."""
    engine = _create_engine(make_url(url), 1)
    try:
        with engine.begin() as conn:
            return fn(conn)
    finally:
        engine.dispose()


def in_thread(url: str, fn: Callable[[Connection], T]) -> defer.Deferred[T]:
    return threads.deferToThread(on_database, url, fn)


@pytest.fixture
def other_database_url(database_url: str, request: Any, tmp_path: Path) -> str:
    """A second empty database of the same kind as ``database_url``."""
    if database_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'other.db'}"
    return create_database(request.getfixturevalue("postgres_server"), f"migrations_{uuid.uuid4().hex[:12]}")


# --- what a database looks like ---------------------------------------------------------------------------------------

def differences(conn: Connection) -> list[Any]:
    """What Alembic's autogenerate finds between the database and ``schema.metadata`` (types and defaults too)."""
    context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
    with warnings.catch_warnings():  # SQLite cannot reflect the lower(email) index: shape() compares its DDL
        warnings.simplefilter("ignore", (SAWarning, UserWarning))
        return compare_metadata(context, schema.metadata)


def shape(conn: Connection) -> dict[str, Any]:
    """Everything the inspector tells about the schema (columns in any order), plus SQLite's index DDL."""
    inspector = inspect(conn)
    tables: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SAWarning)
        for name in inspector.get_table_names():
            tables[name] = {
                "columns": sorted((c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                                  for c in inspector.get_columns(name)),
                "pk": inspector.get_pk_constraint(name),
                "unique": sorted((u["name"], tuple(u["column_names"])) for u in inspector.get_unique_constraints(name)),
                "indexes": sorted((i["name"], tuple(i["column_names"]), tuple(i.get("expressions") or ()),
                                   bool(i["unique"])) for i in inspector.get_indexes(name)),
                "foreign_keys": sorted((f["name"], tuple(f["constrained_columns"]), f["referred_table"],
                                        str(f.get("options"))) for f in inspector.get_foreign_keys(name)),
            }
    if conn.dialect.name == "sqlite":
        tables["(index DDL)"] = sorted(conn.exec_driver_sql(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL").all())
    else:
        tables["(sequences)"] = sorted(inspector.get_sequence_names())
    return tables


def legacy_row(conn: Connection) -> int | None:
    return conn.scalar(select(schema.schema_version.c.version))


# --- a database as an older NanoIoT left it -----------------------------------------------------------------------

class OldRows:
    """A tenant, a user, a device with its token and a queued persistent RPC, written as version N wrote them."""

    def __init__(self) -> None:
        self.tenant, self.user, self.device, self.credentials, self.rpc = (uuid.uuid4() for _ in range(5))
        self.seq = 0

    def write(self, conn: Connection) -> None:
        conn.execute(insert(schema.tenant).values(id=self.tenant, created_time=T0, title="Acme"))
        conn.execute(insert(schema.tb_user).values(
            id=self.user, created_time=T0, tenant_id=self.tenant, customer_id=NULL_UUID, email="Admin@Acme.io",
            authority=Authority.TENANT_ADMIN.value, first_name="Ada", last_name=None, password_hash=b"$2b$hash"))
        conn.execute(insert(schema.device).values(
            id=self.device, created_time=T0, tenant_id=self.tenant, customer_id=NULL_UUID, name="Lamp",
            type="default", label=None, additional_info='{"gateway": false}', version=1))
        conn.execute(insert(schema.device_credentials).values(
            id=self.credentials, created_time=T0, device_id=self.device, credentials_type="ACCESS_TOKEN",
            credentials_id=TOKEN, credentials_value=None, version=1))
        postgres = conn.dialect.name == "postgresql"
        self.seq = conn.scalar(select(schema.RPC_SEQ.next_value())) if postgres else 1
        # Only the columns every version had: what each version's own INSERT would have written.
        conn.execute(insert(schema.rpc).values(
            id=self.rpc, seq=self.seq, created_time=T0, tenant_id=self.tenant, device_id=self.device,
            expiration_time=T0 + 3_600_000, oneway=False, method="setGpio", params='{"pin": 7}',
            status=RpcStatus.QUEUED.value, response=None, additional_info=None, retries=3, user_id=self.user))


def build_old_database(version: int, rows: OldRows) -> Callable[[Connection], None]:
    def build(conn: Connection) -> None:
        old_schemas.create(conn, version)
        rows.write(conn)
    return build


@pytest.mark.parametrize("version", old_schemas.VERSIONS)
@pytest_twisted.ensureDeferred
async def test_a_database_of_an_older_nanoiot_is_upgraded_in_place(database_url: str, version: int) -> None:
    rows = OldRows()
    await in_thread(database_url, build_old_database(version, rows))
    assert await in_thread(database_url, schema.current_revision) is None

    repo = Repository(database_url)
    await repo.start()
    try:
        assert await repo.get_schema_revision() == schema.head_revision()
        # The rows are kept, and the columns added since have their defaults.
        assert (await repo.get_tenant(rows.tenant)).title == "Acme"
        user = await repo.get_user_by_email("admin@acme.io")
        assert (user.id, user.first_name, user.password_hash, user.enabled) == (rows.user, "Ada", b"$2b$hash", True)
        assert (await repo.get_device_by_token(TOKEN)).id == rows.device
        old = await repo.get_rpc(rows.rpc)
        assert (old.method, old.params, old.status, old.retries, old.seq) == (
            "setGpio", {"pin": 7}, RpcStatus.QUEUED, 3, rows.seq)
        assert (old.attempts, old.initiator, old.batch_id) == (0, None, None)

        # The schema is the head's, exactly, and the old version table is kept as a guard (see schema.py).
        assert await repo._run(differences) == []
        assert await repo._run(legacy_row) == schema.LEGACY_GUARD

        # The server works on it: a new persistent RPC queues behind the old one, statuses and attempts are stored,
        # and the tables of later versions (cluster, bulk batches) are usable.
        batch = uuid.uuid4()
        new = RpcRecord(uuid.uuid4(), T0 + 1, rows.tenant, rows.device, T0 + 60_000, False, "getTime", {},
                        RpcStatus.QUEUED, initiator={"type": "BULK", "batchId": str(batch)}, batch_id=batch)
        [stored] = await repo.insert_rpcs([new])
        assert [r.id for r in await repo.load_device_active_rpcs(rows.device)] == [rows.rpc, stored.id]
        await repo.update_rpc_statuses([(rows.rpc, RpcStatus.TIMEOUT, UNCHANGED, None, 2)])
        assert ((await repo.get_rpc(rows.rpc)).status, (await repo.get_rpc(rows.rpc)).attempts) == (
            RpcStatus.TIMEOUT, 2)
        assert (await repo.get_rpc(stored.id)).batch_id == batch
        store = ClusterStore(repo)
        assert (await store.register_node("node-a", "10.0.0.5:8080")).alive
        assert (await store.claim_devices("node-a", [rows.device]))[rows.device].epoch == 1

        def post_two_messages(conn: Connection) -> list[int]:  # ids number themselves on both databases
            return [conn.execute(text("INSERT INTO cluster_message (created_time, payload) VALUES (1, 'x') "
                                      "RETURNING id")).scalar_one() for _ in range(2)]

        first, second = await repo._run(post_two_messages)
        assert first >= 1 and second == first + 1
    finally:
        await repo.stop()

    # Starting again changes nothing.
    again = Repository(database_url)
    await again.start()
    try:
        assert await again.get_schema_revision() == schema.head_revision()
        assert (await again.get_rpc(rows.rpc)).attempts == 2
    finally:
        await again.stop()


# --- a new database ---------------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_create_all_and_running_every_revision_give_the_same_schema(database_url: str,
                                                                          other_database_url: str) -> None:
    # The server on an empty database: create_all, the guard row, stamped at head.
    repo = Repository(database_url)
    await repo.start()
    try:
        assert await repo.get_schema_revision() == schema.head_revision()
        assert await repo._run(legacy_row) == schema.LEGACY_GUARD
    finally:
        await repo.stop()

    # Every revision from the baseline.
    def run_every_revision(conn: Connection) -> None:
        command.upgrade(schema.alembic_config(conn), "head")

    await in_thread(other_database_url, run_every_revision)

    created = await in_thread(database_url, shape)
    migrated = await in_thread(other_database_url, shape)
    assert created == migrated
    assert "enabled" in {column[0] for column in created["tb_user"]["columns"]}
    assert await in_thread(database_url, differences) == []
    assert await in_thread(other_database_url, differences) == []
    assert await in_thread(other_database_url, legacy_row) == schema.LEGACY_GUARD
    assert await in_thread(other_database_url, schema.current_revision) == schema.head_revision()


@pytest_twisted.ensureDeferred
async def test_the_revisions_go_down_to_nothing_and_up_again(database_url: str) -> None:
    def down_and_up(conn: Connection) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
        config = schema.alembic_config(conn)
        command.upgrade(config, "head")
        before = shape(conn)
        command.downgrade(config, "base")
        left = inspect(conn).get_table_names()
        command.upgrade(config, "head")
        return left, before, shape(conn)

    left, before, after = await in_thread(database_url, down_and_up)
    assert left == ["alembic_version"]
    assert before == after


# --- refusals and concurrency -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("marker", ["revision", "old version table"])
@pytest_twisted.ensureDeferred
async def test_a_database_newer_than_the_code_is_refused_with_one_line(database_url: str, marker: str) -> None:
    def newer(conn: Connection) -> None:
        if marker == "revision":
            schema.upgrade(conn)
            conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        else:  # a database made before Alembic by a version we never had
            old_schemas.create(conn, 4)
            conn.execute(text(f"UPDATE schema_version SET version = {max(schema.LEGACY_REVISIONS) + 1}"))

    await in_thread(database_url, newer)
    repo = Repository(database_url)
    with pytest.raises(ConfigError, match="newer than this NanoIoT understands") as refused:
        await repo.start()
    assert "\n" not in str(refused.value)
    assert ("9999" if marker == "revision" else "schema version 6") in str(refused.value)
    # Nothing was changed.
    assert await in_thread(database_url, schema.current_revision) == ("9999" if marker == "revision" else None)


@pytest.mark.postgres
@pytest_twisted.ensureDeferred
async def test_nodes_starting_at_once_on_one_postgresql_upgrade_in_turn(postgres_server: str) -> None:
    url = create_database(postgres_server, f"migrations_{uuid.uuid4().hex[:12]}")
    rows = OldRows()
    await in_thread(url, build_old_database(1, rows))
    nodes = [Repository(url, pool_size=1) for _ in range(4)]
    try:
        await defer.gatherResults([node.start() for node in nodes], consumeErrors=True)
        assert {await node.get_schema_revision() for node in nodes} == {schema.head_revision()}
        assert (await nodes[0].get_rpc(rows.rpc)).attempts == 0
    finally:
        await defer.gatherResults([node.stop() for node in nodes])


# --- nanoiot db -------------------------------------------------------------------------------------------------------

def test_nanoiot_db_upgrades_an_old_database_and_tells_where_it_is(database_url: str, monkeypatch: Any) -> None:
    on_database(database_url, build_old_database(3, OldRows()))
    runner = CliRunner()
    head = schema.head_revision()

    before = runner.invoke(cli, ["db", "--database", database_url, "current"])
    assert (before.exit_code, before.output) == (0, "none: schema version 3 of a NanoIoT before Alembic "
                                                    "(run nanoiot db upgrade)\n")
    monkeypatch.setenv("NANOIOT_DATABASE", database_url)  # the server's own variable, as the server reads it
    upgraded = runner.invoke(cli, ["db", "upgrade"])
    assert (upgraded.exit_code, upgraded.output) == (0, f"Upgraded from schema version 3 to revision {head}\n")
    again = runner.invoke(cli, ["db", "upgrade"])
    assert again.output == f"Already at revision {head} (head)\n"
    assert runner.invoke(cli, ["db", "current"]).output == f"{head} (head)\n"

    history = runner.invoke(cli, ["db", "history"]).output.splitlines()
    assert [line.split()[0] for line in history] == [f"{n:04d}" for n in range(int(head), 0, -1)]
    assert history[0].startswith(f"{head} (head)")
    assert on_database(database_url, differences) == []


def test_nanoiot_db_reports_a_database_it_cannot_use_in_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(cli, ["db", "--database", "mysql://x@y/z", "upgrade"])
    assert bad.exit_code == 1 and "only sqlite and postgresql URLs are supported" in bad.output
    url = f"sqlite:///{tmp_path / 'newer.db'}"

    def newer(conn: Connection) -> None:
        schema.upgrade(conn)
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))

    on_database(url, newer)
    refused = runner.invoke(cli, ["db", "--database", url, "upgrade"])
    assert refused.exit_code == 1
    assert refused.output.count("\n") == 1 and "newer than this NanoIoT understands" in refused.output
    current = runner.invoke(cli, ["db", "--database", url, "current"]).output
    assert current == (f"9999 (unknown to this NanoIoT, whose head is {schema.head_revision()}: "
                       "written by a newer one?)\n")
