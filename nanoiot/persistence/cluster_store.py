"""The database side of cluster mode: nodes and their heartbeats, device ownership with fencing epochs, settings all
nodes share, cluster-wide RPC request ids, and the clean-up of routed messages.

Several NanoIoT processes (nodes) share one PostgreSQL database; every coordination decision is a row in it, so the
database is the only thing nodes must agree on. Each method is one transaction on the repository's thread pool
(through :meth:`Repository._run`, with its retries of transient errors) and returns plain records.

Time: heartbeats, start and claim times, and every "is this node alive" comparison use the DATABASE's clock on
PostgreSQL (:data:`DB_NOW_MS_SQL`), so clock skew between machines cannot make a healthy node look dead. On SQLite
(one machine; cluster mode itself requires PostgreSQL, but the code stays portable for tests) the repository's
clock is used instead.

Concurrency (PostgreSQL, READ COMMITTED): claims lock the existing rows in device-id order and fence their upsert
on the epoch that was read, so a claim racing another one never reports a wrong previous node or skips an epoch;
the request-id counter is one row bumped with ``UPDATE ... RETURNING``, which serialises concurrent callers.
SQLite has a single writer, which makes the same statements safe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, TypeVar
from uuid import UUID

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Text,
    cast,
    delete,
    func,
    literal,
    literal_column,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from twisted.internet import defer
from twisted.internet.defer import Deferred

from nanoiot.errors import InvalidArguments
from nanoiot.persistence.records import Claim, NodeRecord, Owner
from nanoiot.persistence.repository import Repository
from nanoiot.persistence.schema import cluster_message, cluster_node, cluster_setting, device_owner, rpc

T = TypeVar("T")

#: The database's clock in epoch milliseconds, on PostgreSQL (also for raw SQL elsewhere, e.g. cluster_message).
DB_NOW_MS_SQL: Final = "(extract(epoch from clock_timestamp()) * 1000)::bigint"
#: The cluster_setting row that holds the next unallocated RPC request id.
NEXT_REQUEST_ID: Final = "next_request_id"
#: Ids per ``IN (...)`` list: well below SQLite's 32766 bound parameters, and one statement per few thousand ids.
IN_CHUNK: Final = 5000
#: Rows per multi-row VALUES or row-value IN list (several parameters each).
ROW_CHUNK: Final = 1000
#: Rounds of claim_devices before giving up: a round repeats only for devices another node inserted meanwhile.
CLAIM_ROUNDS: Final = 10


class ClusterStore:
    """Cluster coordination rows, on a started :class:`Repository`; every method returns a Deferred."""

    def __init__(self, repository: Repository) -> None:
        self._repository = repository
        #: Addresses given to register_node, so that a heartbeat can re-create a row removed as dead.
        self._addresses: dict[str, str] = {}

    # --- nodes ----------------------------------------------------------------------------------------------------

    def register_node(self, node_id: str, address: str) -> Deferred[NodeRecord]:
        """Insert or reset this node's row at start: a node restarted under the same id gets a new started_time
        and a fresh heartbeat (its previous life's device claims are not touched here)."""
        self._addresses[node_id] = address
        fallback = self._repository._now()

        def thd(conn: Connection) -> NodeRecord:
            now = _db_now(conn, fallback)  # one value, so that started_time == heartbeat_time
            values = dict(node_id=node_id, address=address, started_time=now, heartbeat_time=now,
                          connected_devices=0)
            statement = _insert(conn, cluster_node).values(values)
            statement = statement.on_conflict_do_update(
                index_elements=[cluster_node.c.node_id],
                set_={name: getattr(statement.excluded, name) for name in values if name != "node_id"},
            ).returning(*cluster_node.c)
            row = conn.execute(statement).one()
            return _node(row, alive=True)

        return self._run(thd)

    def heartbeat(self, node_id: str, connected_devices: int) -> Deferred[int]:
        """Say this node is alive; returns the heartbeat time (the database's clock on PostgreSQL, in ms).

        A row removed meanwhile (another node judged this one dead) is created again, with the address given to
        :meth:`register_node` and a new started_time.
        """
        address = self._addresses.get(node_id, "")
        fallback = self._repository._now()

        def thd(conn: Connection) -> int:
            now = _now_sql(conn, fallback)
            statement = _insert(conn, cluster_node).values(
                node_id=node_id, address=address, started_time=now, heartbeat_time=now,
                connected_devices=connected_devices)
            statement = statement.on_conflict_do_update(
                index_elements=[cluster_node.c.node_id],
                set_=dict(heartbeat_time=statement.excluded.heartbeat_time,
                          connected_devices=statement.excluded.connected_devices),
            ).returning(cluster_node.c.heartbeat_time)
            return int(conn.execute(statement).scalar_one())

        return self._run(thd)

    def list_nodes(self, dead_after_ms: int) -> Deferred[list[NodeRecord]]:
        """Every node row, by node_id; ``alive`` when it heartbeat within the last ``dead_after_ms``."""
        fallback = self._repository._now()

        def thd(conn: Connection) -> list[NodeRecord]:
            alive = _fresh(cluster_node.c.heartbeat_time, _now_sql(conn, fallback), dead_after_ms)
            query = select(*cluster_node.c, alive.label("alive")).order_by(cluster_node.c.node_id)
            return [_node(row, alive=bool(row.alive)) for row in conn.execute(query)]

        return self._run(thd)

    def dead_nodes(self, dead_after_ms: int) -> Deferred[list[str]]:
        """Nodes whose last heartbeat is older than ``dead_after_ms``: their devices may be taken over."""
        fallback = self._repository._now()

        def thd(conn: Connection) -> list[str]:
            heartbeat = cluster_node.c.heartbeat_time
            stale = or_(heartbeat.is_(None), heartbeat < _now_sql(conn, fallback) - dead_after_ms)
            query = select(cluster_node.c.node_id).where(stale).order_by(cluster_node.c.node_id)
            return list(conn.scalars(query))

        return self._run(thd)

    def remove_node(self, node_id: str) -> Deferred[None]:
        """A clean shutdown (or the removal of a dead node): its row and all its device claims, together."""
        self._addresses.pop(node_id, None)

        def thd(conn: Connection) -> None:
            conn.execute(delete(device_owner).where(device_owner.c.node_id == node_id))
            conn.execute(delete(cluster_node).where(cluster_node.c.node_id == node_id))

        return self._run(thd)

    # --- device ownership -----------------------------------------------------------------------------------------

    def claim_devices(self, node_id: str, device_ids: Sequence[UUID]) -> Deferred[dict[UUID, Claim]]:
        """Make ``node_id`` the owner of these devices, whoever owned them, in one transaction.

        Each device's epoch becomes the previous one + 1 (1 for a device nobody owned), and the result says which
        node owned it before, so that the caller can tell that node to let go. Batched: two statements per
        thousand devices. The existing rows are locked first, in device-id order (no deadlock between two
        claimers); the upsert then changes a row only if its epoch is still the one read, and a device inserted
        by another node in between is simply claimed again in a further round.
        """
        d = self._claim(node_id, device_ids, None)
        return d.addCallback(lambda result: result[0])

    def claim_free_devices(self, node_id: str, device_ids: Sequence[UUID],
                           dead_after_ms: int) -> Deferred[tuple[dict[UUID, Claim], dict[UUID, Owner]]]:
        """Claim only the devices no live node holds (nobody, this node, or a node silent for ``dead_after_ms``);
        the others come back as their live owners. A command never takes a device away from the node holding
        its session: only a session does (:meth:`claim_devices`)."""
        return self._claim(node_id, device_ids, dead_after_ms)

    def _claim(self, node_id: str, device_ids: Sequence[UUID],
               keep_live_owners_ms: int | None) -> Deferred[tuple[dict[UUID, Claim], dict[UUID, Owner]]]:
        wanted = sorted(set(device_ids), key=lambda d: d.int)
        fallback = self._repository._now()

        def thd(conn: Connection) -> tuple[dict[UUID, Claim], dict[UUID, Owner]]:
            now = _now_sql(conn, fallback)
            claims: dict[UUID, Claim] = {}
            held: dict[UUID, Owner] = {}
            pending = wanted
            for _ in range(CLAIM_ROUNDS):
                missed: list[UUID] = []
                for chunk in _chunks(pending, ROW_CHUNK):
                    query = select(device_owner.c.device_id, device_owner.c.node_id, device_owner.c.epoch).where(
                        device_owner.c.device_id.in_(chunk)).order_by(device_owner.c.device_id)
                    if conn.dialect.name == "postgresql":
                        query = query.with_for_update()
                    old = {row.device_id: (row.node_id, row.epoch) for row in conn.execute(query)}
                    if keep_live_owners_ms is not None:
                        others = {old[d][0] for d in chunk if d in old and old[d][0] != node_id}
                        live = set(conn.scalars(select(cluster_node.c.node_id).where(
                            cluster_node.c.node_id.in_(others),
                            _fresh(cluster_node.c.heartbeat_time, now, keep_live_owners_ms)))) if others else set()
                        for d in chunk:
                            if d in old and old[d][0] in live:
                                held[d] = Owner(d, old[d][0], int(old[d][1]), True)
                        chunk = [d for d in chunk if d not in held]
                        if not chunk:
                            continue
                    rows = [dict(device_id=d, node_id=node_id, epoch=old[d][1] + 1 if d in old else 1,
                                 claimed_time=now) for d in chunk]
                    statement = _insert(conn, device_owner).values(rows)
                    statement = statement.on_conflict_do_update(
                        index_elements=[device_owner.c.device_id],
                        set_=dict(node_id=statement.excluded.node_id, epoch=device_owner.c.epoch + 1,
                                  claimed_time=statement.excluded.claimed_time),
                        # Fencing: update only the row version that was read (its epoch is the one we expect).
                        where=device_owner.c.epoch + 1 == statement.excluded.epoch,
                    ).returning(device_owner.c.device_id, device_owner.c.epoch)
                    done = {row.device_id: int(row.epoch) for row in conn.execute(statement)}
                    for d in chunk:
                        if d in done:
                            claims[d] = Claim(d, done[d], old[d][0] if d in old else None)
                        else:
                            missed.append(d)
                if not missed:
                    return claims, held
                pending = missed
            raise RuntimeError(f"could not claim {len(pending)} devices in {CLAIM_ROUNDS} rounds: "
                               "other nodes keep claiming them")

        if not wanted:
            return defer.succeed(({}, {}))
        return self._run(thd)

    def release_devices(self, node_id: str, releases: Sequence[tuple[UUID, int]]) -> Deferred[int]:
        """Give up devices claimed under the given epochs; returns how many rows went.

        A row goes only if it still names this node AND that epoch: a late release never removes a newer claim
        (of another node, or of this one).
        """
        wanted = list(dict.fromkeys((d, int(e)) for d, e in releases))

        def thd(conn: Connection) -> int:
            deleted = 0
            for chunk in _chunks(wanted, ROW_CHUNK):
                deleted += conn.execute(delete(device_owner).where(
                    device_owner.c.node_id == node_id,
                    tuple_(device_owner.c.device_id, device_owner.c.epoch).in_(chunk))).rowcount
            return deleted

        if not wanted:
            return defer.succeed(0)
        return self._run(thd)

    def owners(self, device_ids: Sequence[UUID], dead_after_ms: int) -> Deferred[dict[UUID, Owner]]:
        """Who owns these devices (devices nobody owns are absent); ``alive`` is False when the owner has not
        heartbeat within ``dead_after_ms`` or has no node row at all."""
        wanted = list(dict.fromkeys(device_ids))
        fallback = self._repository._now()

        def thd(conn: Connection) -> dict[UUID, Owner]:
            alive = _fresh(cluster_node.c.heartbeat_time, _now_sql(conn, fallback), dead_after_ms)
            found: dict[UUID, Owner] = {}
            for chunk in _chunks(wanted, IN_CHUNK):
                query = (select(device_owner.c.device_id, device_owner.c.node_id, device_owner.c.epoch,
                                alive.label("alive"))
                         .select_from(device_owner.outerjoin(
                             cluster_node, cluster_node.c.node_id == device_owner.c.node_id))
                         .where(device_owner.c.device_id.in_(chunk)))
                for row in conn.execute(query):
                    found[row.device_id] = Owner(row.device_id, row.node_id, int(row.epoch), bool(row.alive))
            return found

        if not wanted:
            return defer.succeed({})
        return self._run(thd)

    def owned_elsewhere(self, node_id: str, device_ids: Sequence[UUID]) -> Deferred[set[UUID]]:
        """Which of these devices another node now owns: the sessions this node must close (chunked, so that a
        node can check all of its devices at once)."""
        wanted = list(dict.fromkeys(device_ids))

        def thd(conn: Connection) -> set[UUID]:
            taken: set[UUID] = set()
            for chunk in _chunks(wanted, IN_CHUNK):
                taken.update(conn.scalars(select(device_owner.c.device_id).where(
                    device_owner.c.device_id.in_(chunk), device_owner.c.node_id != node_id)))
            return taken

        if not wanted:
            return defer.succeed(set())
        return self._run(thd)

    # --- shared settings and counters -----------------------------------------------------------------------------

    def shared_setting(self, name: str, make_value: Callable[[], str]) -> Deferred[str]:
        """The cluster-wide value of ``name``; the first node to ask stores ``make_value()`` and every other one
        reads that (nodes starting together agree: the insert is insert-if-absent, then everyone reads).

        ``make_value`` is called on a database thread and only when the setting is absent.
        """

        def thd(conn: Connection) -> str:
            query = select(cluster_setting.c.value).where(cluster_setting.c.name == name)
            value = conn.scalar(query)
            if value is not None:
                return value
            conn.execute(_insert(conn, cluster_setting).values(name=name, value=make_value())
                         .on_conflict_do_nothing(index_elements=[cluster_setting.c.name]))
            return conn.execute(query).scalar_one()

        return self._run(thd)

    def allocate_request_ids(self, block: int) -> Deferred[int]:
        """Take ``block`` RPC request ids no other node will use: returns ``start`` of ``[start, start + block)``.

        Blocks only increase. The counter starts, on first use, above every stored ``rpc.seq`` (the ids a single
        node used before cluster mode); the bump is one ``UPDATE ... RETURNING``, serialised by the row lock.
        """
        if block < 1:
            return defer.fail(InvalidArguments(f"block must be at least 1, got {block}"))

        def thd(conn: Connection) -> int:
            bump = (update(cluster_setting)
                    .where(cluster_setting.c.name == NEXT_REQUEST_ID)
                    .values(value=cast(cast(cluster_setting.c.value, BigInteger) + block, Text))
                    .returning(cluster_setting.c.value))
            after = conn.scalar(bump)
            if after is None:
                first = int(conn.scalar(select(func.coalesce(func.max(rpc.c.seq), 0)))) + 1
                conn.execute(_insert(conn, cluster_setting).values(name=NEXT_REQUEST_ID, value=str(first))
                             .on_conflict_do_nothing(index_elements=[cluster_setting.c.name]))
                after = conn.execute(bump).scalar_one()
            return int(after) - block

        return self._run(thd)

    # --- routed messages ------------------------------------------------------------------------------------------

    def purge_messages(self, older_than_ms: int) -> Deferred[int]:
        """Delete routed messages created more than ``older_than_ms`` ago (by the database's clock on PostgreSQL,
        so ``created_time`` should be written with :data:`DB_NOW_MS_SQL`); returns how many. Their receivers have
        read them long before: this only bounds the table."""
        fallback = self._repository._now()

        def thd(conn: Connection) -> int:
            cutoff = _now_sql(conn, fallback) - older_than_ms
            return conn.execute(delete(cluster_message).where(cluster_message.c.created_time < cutoff)).rowcount

        return self._run(thd)

    def _run(self, fn: Callable[[Connection], T]) -> Deferred[T]:
        return self._repository._run(fn)


# --- helpers --------------------------------------------------------------------------------------------------------

def _insert(conn: Connection, table: Any) -> Any:
    """An INSERT with ``on_conflict_do_update`` / ``on_conflict_do_nothing`` for the connection's dialect."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def _now_sql(conn: Connection, fallback_ms: int) -> ColumnElement[int]:
    """Now in epoch ms as SQL: the database's clock on PostgreSQL, ``fallback_ms`` (the repository's) elsewhere."""
    if conn.dialect.name == "postgresql":
        return literal_column(DB_NOW_MS_SQL, BigInteger)
    return literal(fallback_ms, BigInteger)


def _db_now(conn: Connection, fallback_ms: int) -> int:
    """Now in epoch ms as a value (one round trip on PostgreSQL)."""
    if conn.dialect.name == "postgresql":
        return int(conn.execute(select(literal_column(DB_NOW_MS_SQL, BigInteger))).scalar_one())
    return fallback_ms


def _fresh(heartbeat: ColumnElement[Any], now: ColumnElement[int], dead_after_ms: int) -> ColumnElement[bool]:
    """True when ``heartbeat`` is within ``dead_after_ms`` of ``now``; NULL (never alive) without a heartbeat."""
    return heartbeat >= now - dead_after_ms


def _chunks(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def _node(row: Any, alive: bool) -> NodeRecord:
    return NodeRecord(row.node_id, row.address, row.started_time, row.heartbeat_time, row.connected_devices, alive)
