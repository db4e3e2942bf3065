"""Rule chains and entity relations: the ``rule_chain`` and ``entity_relation`` tables of schema 4.

Built on :meth:`Repository._run` like every other query (a ``def thd(conn)`` per method, one transaction, on the
repository's thread pool, transient errors retried) and returning the frozen records of
:mod:`nanoiot.persistence.records`. Everything is scoped by tenant: a query never reaches another tenant's rows.

Rule chains: a tenant has at most one *root* chain; :meth:`RuleStore.set_root` moves the flag in one transaction
(so two concurrent calls still leave exactly one). Every change bumps ``version``; an update that names the version
it read is refused with ``Conflict`` when someone else changed the chain meanwhile (ThingsBoard's optimistic lock).

Relations: ThingsBoard's ``from -> to`` of a type in a type group (``COMMON`` unless said). :meth:`find_related`
walks them breadth first, one query per level, as ThingsBoard's relation query does (the traversal follows every
relation of the group; the relation type and entity types filter what is returned).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Final
from uuid import UUID

from sqlalchemy import ColumnElement, Connection, and_, delete, func, insert, literal, or_, select, update
from sqlalchemy.exc import IntegrityError
from twisted.internet.defer import Deferred, fail

from nanoiot.errors import BadRequest, Conflict, InvalidArguments, NotFound
from nanoiot.persistence.records import Page, PageLink, RelationRecord, RuleChainRecord
from nanoiot.persistence.repository import Repository, _contains_ignoring_case, _dump, _load, _order_by, _page
from nanoiot.persistence.schema import customer as customers
from nanoiot.persistence.schema import device as devices
from nanoiot.persistence.schema import entity_relation as relations
from nanoiot.persistence.schema import rule_chain as chains
from nanoiot.persistence.schema import tb_user as users

#: ThingsBoard's messages, as its clients already show them.
ROOT_DELETE_REFUSED: Final = "Deletion of Root Tenant Rule Chain is prohibited!"
CHAIN_CHANGED: Final = "Rule chain was already changed by someone else; reload it and try again"
CHAIN_NOT_FOUND: Final = "Rule chain with requested id wasn't found!"

RULE_CHAIN_SORTS: Final[dict[str, ColumnElement[Any]]] = {
    "createdTime": chains.c.created_time,
    "name": chains.c.name,
    "root": chains.c.root,
    "type": chains.c.type,
}

#: Relation directions, as ThingsBoard names them: FROM follows ``from -> to``, TO goes the other way.
FROM: Final = "FROM"
TO: Final = "TO"
COMMON: Final = "COMMON"
#: The deepest a relation query goes (ThingsBoard's ``maxLevel`` 0 means "no limit": this is ours).
MAX_LEVEL: Final = 50
#: Entities one relation query visits at most: a relation graph with cycles or fans stays bounded.
MAX_VISITED: Final = 10_000
#: Ids per ``IN (...)`` list.
IN_CHUNK: Final = 900

EntityRef = tuple[str, UUID]


class RuleStore:
    """Rule chains and relations on a started :class:`Repository`; every method returns a Deferred."""

    def __init__(self, repository: Repository) -> None:
        self._repository = repository

    def _run(self, fn: Any) -> Deferred[Any]:
        return self._repository._run(fn)

    # --- rule chains ------------------------------------------------------------------------------------------------

    def create_rule_chain(self, tenant_id: UUID, name: str, type: str = "CORE", debug_mode: bool = False,
                          configuration: Any = None, additional_info: Any = None, metadata: Any = None,
                          chain_id: UUID | None = None) -> Deferred[RuleChainRecord]:
        """A new, non-root chain (version 1); ``chain_id`` when the caller chose it (an import keeping its id)."""
        record = RuleChainRecord(chain_id or uuid.uuid4(), self._repository._now(), tenant_id, name, type, False,
                                 debug_mode, configuration, additional_info, metadata, 1)

        def thd(conn: Connection) -> RuleChainRecord:
            try:
                conn.execute(insert(chains).values(_chain_values(record)))
            except IntegrityError:
                raise BadRequest(f"Rule chain with id {record.id} already exists") from None
            return record

        return self._run(thd)

    def update_rule_chain(self, tenant_id: UUID, chain_id: UUID, name: str, type: str, debug_mode: bool,
                          configuration: Any, additional_info: Any,
                          expected_version: int | None = None) -> Deferred[RuleChainRecord]:
        """New fields (metadata and root flag unchanged), version + 1; ``expected_version``: Conflict if stale."""
        values = dict(name=name, type=type, debug_mode=debug_mode, configuration=_dump(configuration),
                      additional_info=_dump(additional_info))
        return self._change(tenant_id, chain_id, values, expected_version)

    def save_metadata(self, tenant_id: UUID, chain_id: UUID, metadata: Any,
                      expected_version: int | None = None) -> Deferred[RuleChainRecord]:
        """Store the chain's nodes and connections (validated by the caller), version + 1."""
        return self._change(tenant_id, chain_id, dict(metadata=_dump(metadata)), expected_version)

    def _change(self, tenant_id: UUID, chain_id: UUID, values: dict[str, Any],
                expected_version: int | None) -> Deferred[RuleChainRecord]:
        def thd(conn: Connection) -> RuleChainRecord:
            where = [chains.c.id == chain_id, chains.c.tenant_id == tenant_id]
            if expected_version is not None:
                where.append(chains.c.version == expected_version)
            result = conn.execute(update(chains).where(*where).values(version=chains.c.version + 1, **values))
            if result.rowcount == 0:
                exists = conn.scalar(select(chains.c.id).where(chains.c.id == chain_id,
                                                               chains.c.tenant_id == tenant_id))
                raise Conflict(CHAIN_CHANGED) if exists else NotFound(CHAIN_NOT_FOUND)
            return _chain(conn.execute(select(chains).where(chains.c.id == chain_id)).one())

        return self._run(thd)

    def get_rule_chain(self, chain_id: UUID, tenant_id: UUID | None = None) -> Deferred[RuleChainRecord | None]:
        """None when there is no such chain (or, with ``tenant_id``, none in that tenant)."""

        def thd(conn: Connection) -> RuleChainRecord | None:
            query = select(chains).where(chains.c.id == chain_id)
            if tenant_id is not None:
                query = query.where(chains.c.tenant_id == tenant_id)
            row = conn.execute(query).first()
            return _chain(row) if row else None

        return self._run(thd)

    def list_rule_chains(self, tenant_id: UUID, link: PageLink,
                         type: str | None = None) -> Deferred[Page[RuleChainRecord]]:
        """A page of the tenant's chains; ``textSearch`` matches the name, ignoring case."""

        def thd(conn: Connection) -> Page[RuleChainRecord]:
            where: list[ColumnElement[bool]] = [chains.c.tenant_id == tenant_id]
            if type is not None:
                where.append(chains.c.type == type)
            if link.text_search:
                where.append(_contains_ignoring_case(chains.c.name, link.text_search))
            order = _order_by(link, RULE_CHAIN_SORTS, default=chains.c.created_time, tie_breakers=(chains.c.id,))
            return _page(conn, chains, where, order, link, _chain)

        return self._run(thd)

    def delete_rule_chain(self, tenant_id: UUID, chain_id: UUID) -> Deferred[bool]:
        """Delete a chain and its relations; the root chain is refused (BadRequest, as ThingsBoard); False when
        there was no such chain in the tenant."""

        def thd(conn: Connection) -> bool:
            row = conn.execute(select(chains.c.root).where(chains.c.id == chain_id,
                                                           chains.c.tenant_id == tenant_id)).first()
            if row is None:
                return False
            if row.root:
                raise BadRequest(ROOT_DELETE_REFUSED)
            conn.execute(delete(relations).where(relations.c.tenant_id == tenant_id, or_(
                and_(relations.c.from_id == chain_id, relations.c.from_type == "RULE_CHAIN"),
                and_(relations.c.to_id == chain_id, relations.c.to_type == "RULE_CHAIN"))))
            return conn.execute(delete(chains).where(chains.c.id == chain_id, chains.c.root.is_(False))).rowcount > 0

        return self._run(thd)

    def set_root(self, tenant_id: UUID, chain_id: UUID) -> Deferred[RuleChainRecord]:
        """Make ``chain_id`` the tenant's one root chain (the previous root loses the flag, both versions + 1);
        NotFound when the tenant has no such chain. Already root: unchanged."""

        def thd(conn: Connection) -> RuleChainRecord:
            # Every chain row of the tenant locked, in id order: a concurrent set_root of the same tenant waits here
            # and then sees this one's root (a lock on the target alone would let both set their own flag).
            conn.execute(select(chains.c.id).where(chains.c.tenant_id == tenant_id).order_by(chains.c.id)
                         .with_for_update()).all()
            row = conn.execute(select(chains).where(chains.c.id == chain_id, chains.c.tenant_id == tenant_id)).first()
            if row is None:
                raise NotFound(CHAIN_NOT_FOUND)
            if row.root:
                return _chain(row)
            conn.execute(update(chains).where(chains.c.tenant_id == tenant_id, chains.c.root.is_(True))
                         .values(root=False, version=chains.c.version + 1))
            conn.execute(update(chains).where(chains.c.id == chain_id)
                         .values(root=True, version=chains.c.version + 1))
            return _chain(conn.execute(select(chains).where(chains.c.id == chain_id)).one())

        return self._run(thd)

    def get_root(self, tenant_id: UUID) -> Deferred[RuleChainRecord | None]:
        """The tenant's root chain, or None when it has none stored."""

        def thd(conn: Connection) -> RuleChainRecord | None:
            row = conn.execute(select(chains).where(chains.c.tenant_id == tenant_id, chains.c.root.is_(True))
                               .order_by(chains.c.created_time, chains.c.id)).first()
            return _chain(row) if row else None

        return self._run(thd)

    def list_root_chains(self) -> Deferred[list[RuleChainRecord]]:
        """Every tenant's stored root chain (what a server loads at start)."""

        def thd(conn: Connection) -> list[RuleChainRecord]:
            query = select(chains).where(chains.c.root.is_(True)).order_by(chains.c.tenant_id, chains.c.created_time)
            found: dict[UUID, RuleChainRecord] = {}
            for row in conn.execute(query):
                found.setdefault(row.tenant_id, _chain(row))
            return list(found.values())

        return self._run(thd)

    # --- relations --------------------------------------------------------------------------------------------------

    def save_relation(self, relation: RelationRecord) -> Deferred[RelationRecord]:
        """Create the relation, or replace the additional info of the same one (ThingsBoard's save is an upsert)."""
        values = _relation_values(relation)

        def thd(conn: Connection) -> RelationRecord:
            where = _relation_key(relation.tenant_id, relation.from_id, relation.from_type, relation.to_id,
                                  relation.to_type, relation.type, relation.type_group)
            if conn.execute(update(relations).where(*where)
                            .values(additional_info=values["additional_info"])).rowcount == 0:
                conn.execute(insert(relations).values(values))
            return relation

        return self._run(thd)

    def get_relation(self, tenant_id: UUID, from_id: UUID, from_type: str, to_id: UUID, to_type: str,
                     relation_type: str, type_group: str = COMMON) -> Deferred[RelationRecord | None]:
        def thd(conn: Connection) -> RelationRecord | None:
            row = conn.execute(select(relations).where(*_relation_key(
                tenant_id, from_id, from_type, to_id, to_type, relation_type, type_group))).first()
            return _relation(row) if row else None

        return self._run(thd)

    def delete_relation(self, tenant_id: UUID, from_id: UUID, from_type: str, to_id: UUID, to_type: str,
                        relation_type: str, type_group: str = COMMON) -> Deferred[bool]:
        """False when there was no such relation."""

        def thd(conn: Connection) -> bool:
            return conn.execute(delete(relations).where(*_relation_key(
                tenant_id, from_id, from_type, to_id, to_type, relation_type, type_group))).rowcount > 0

        return self._run(thd)

    def delete_entity_relations(self, tenant_id: UUID, entity_id: UUID, entity_type: str,
                                direction: str | None = None, relation_type: str | None = None,
                                type_group: str | None = None) -> Deferred[int]:
        """Every relation from (``direction`` FROM), to (TO) or either way (None) of an entity; how many."""
        def thd(conn: Connection) -> int:
            _check_direction(direction, allow_none=True)
            sides = []
            if direction in (None, FROM):
                sides.append(and_(relations.c.from_id == entity_id, relations.c.from_type == entity_type))
            if direction in (None, TO):
                sides.append(and_(relations.c.to_id == entity_id, relations.c.to_type == entity_type))
            where = [relations.c.tenant_id == tenant_id, or_(*sides)]
            if relation_type is not None:
                where.append(relations.c.relation_type == relation_type)
            if type_group is not None:
                where.append(relations.c.relation_type_group == type_group)
            return conn.execute(delete(relations).where(*where)).rowcount

        return self._run(thd)

    def list_relations(self, tenant_id: UUID, entity_id: UUID, entity_type: str, direction: str = FROM,
                       relation_type: str | None = None,
                       type_group: str | None = COMMON) -> Deferred[list[RelationRecord]]:
        """The relations from (FROM) or to (TO) an entity, optionally of one type; ``type_group`` None: any."""
        def thd(conn: Connection) -> list[RelationRecord]:
            _check_direction(direction)
            if direction == FROM:
                where = [relations.c.from_id == entity_id, relations.c.from_type == entity_type]
                order = (relations.c.relation_type, relations.c.to_type, relations.c.to_id)
            else:
                where = [relations.c.to_id == entity_id, relations.c.to_type == entity_type]
                order = (relations.c.relation_type, relations.c.from_type, relations.c.from_id)
            where.append(relations.c.tenant_id == tenant_id)
            if relation_type is not None:
                where.append(relations.c.relation_type == relation_type)
            if type_group is not None:
                where.append(relations.c.relation_type_group == type_group)
            return [_relation(row) for row in conn.execute(select(relations).where(*where).order_by(*order))]

        return self._run(thd)

    def find_related(self, tenant_id: UUID, entity_id: UUID, entity_type: str, direction: str = FROM,
                     relation_type: str | None = None, max_level: int = 1,
                     entity_types: Iterable[str] | None = None, fetch_last_level_only: bool = False,
                     type_group: str = COMMON) -> Deferred[list[EntityRef]]:
        """The entities related to one entity within ``max_level`` steps (< 1: up to :data:`MAX_LEVEL`), nearest
        first (then by type and id), each once, never the entity itself.

        As ThingsBoard's relation query: the walk follows every relation of ``type_group``; ``relation_type`` and
        ``entity_types`` (empty: any) select which of the entities reached are returned (a reached entity is
        returned if the relation it was reached by has that type); ``fetch_last_level_only`` keeps the deepest
        level only.
        """
        depth = MAX_LEVEL if max_level < 1 else min(max_level, MAX_LEVEL)
        wanted_types = {t for t in entity_types or () if t}

        def thd(conn: Connection) -> list[EntityRef]:
            _check_direction(direction)
            start: EntityRef = (entity_type, entity_id)
            seen: set[EntityRef] = {start}
            frontier: list[EntityRef] = [start]
            found: list[tuple[int, EntityRef]] = []
            for level in range(1, depth + 1):
                if not frontier or len(seen) >= MAX_VISITED:
                    break
                step = _neighbours(conn, tenant_id, frontier, direction, type_group)
                next_frontier: list[EntityRef] = []
                for neighbour, via_type in sorted(step, key=lambda pair: (pair[0][0], str(pair[0][1]), pair[1])):
                    matches = ((relation_type is None or via_type == relation_type)
                               and (not wanted_types or neighbour[0] in wanted_types))
                    if neighbour in seen:
                        if matches and not any(entity == neighbour for _, entity in found):
                            found.append((level, neighbour))  # first reached by another relation type
                        continue
                    seen.add(neighbour)
                    next_frontier.append(neighbour)
                    if matches:
                        found.append((level, neighbour))
                frontier = next_frontier
            found = [(level, entity) for level, entity in found if entity != start]
            if fetch_last_level_only and found:
                deepest = max(level for level, _ in found)
                found = [(level, entity) for level, entity in found if level == deepest]
            return [entity for _, entity in found]

        return self._run(thd)

    def find_entity_by_name(self, tenant_id: UUID, entity_type: str, name: str) -> Deferred[EntityRef | None]:
        """The tenant's entity of that type and name: a DEVICE or RULE_CHAIN by name, a CUSTOMER by title, a USER
        by e-mail (ignoring case); None when there is none (or the type has no entities here)."""

        def thd(conn: Connection) -> EntityRef | None:
            if entity_type == "DEVICE":
                query = select(devices.c.id).where(devices.c.tenant_id == tenant_id, devices.c.name == name)
            elif entity_type == "CUSTOMER":
                query = select(customers.c.id).where(customers.c.tenant_id == tenant_id, customers.c.title == name)
            elif entity_type == "USER":
                query = select(users.c.id).where(users.c.tenant_id == tenant_id,
                                                 func.lower(users.c.email) == func.lower(literal(name)))
            elif entity_type == "RULE_CHAIN":
                query = select(chains.c.id).where(chains.c.tenant_id == tenant_id, chains.c.name == name)
            else:
                return None
            found = conn.scalar(query.limit(1))
            return (entity_type, found) if found is not None else None

        return self._run(thd)

    def relation_exists(self, tenant_id: UUID, from_: EntityRef | None, to: EntityRef | None, relation_type: str,
                        type_group: str = COMMON, from_type: str | None = None,
                        to_type: str | None = None) -> Deferred[bool]:
        """Whether a relation of ``relation_type`` exists from ``from_`` to ``to``; either end may be None (any
        entity, optionally of ``from_type`` / ``to_type``), but not both."""
        if from_ is None and to is None:
            return fail(InvalidArguments("relation_exists needs at least one end of the relation"))

        def thd(conn: Connection) -> bool:
            where = [relations.c.tenant_id == tenant_id, relations.c.relation_type == relation_type,
                     relations.c.relation_type_group == type_group]
            if from_ is not None:
                where += [relations.c.from_type == from_[0], relations.c.from_id == from_[1]]
            elif from_type:
                where.append(relations.c.from_type == from_type)
            if to is not None:
                where += [relations.c.to_type == to[0], relations.c.to_id == to[1]]
            elif to_type:
                where.append(relations.c.to_type == to_type)
            return conn.execute(select(relations.c.from_id).where(*where).limit(1)).first() is not None

        return self._run(thd)


# --- helpers ----------------------------------------------------------------------------------------------------------

def _check_direction(direction: str | None, allow_none: bool = False) -> None:
    if direction is None and allow_none:
        return
    if direction not in (FROM, TO):
        raise InvalidArguments(f"Invalid relation direction {direction!r}: use FROM or TO")


def _neighbours(conn: Connection, tenant_id: UUID, frontier: Sequence[EntityRef], direction: str,
                type_group: str) -> list[tuple[EntityRef, str]]:
    """(entity one step away, the type of the relation that leads there) for every entity of ``frontier``."""
    if direction == FROM:
        near_id, near_type, far_id, far_type = (relations.c.from_id, relations.c.from_type, relations.c.to_id,
                                                relations.c.to_type)
    else:
        near_id, near_type, far_id, far_type = (relations.c.to_id, relations.c.to_type, relations.c.from_id,
                                                relations.c.from_type)
    found: list[tuple[EntityRef, str]] = []
    for start in range(0, len(frontier), IN_CHUNK):
        chunk = frontier[start:start + IN_CHUNK]
        ids = list({entity_id for _, entity_id in chunk})
        query = (select(near_id.label("near_id"), near_type.label("near_type"), far_id.label("far_id"),
                        far_type.label("far_type"), relations.c.relation_type)
                 .where(relations.c.tenant_id == tenant_id, relations.c.relation_type_group == type_group,
                        near_id.in_(ids)))
        wanted = set(chunk)
        for row in conn.execute(query):
            if (row.near_type, row.near_id) in wanted:
                found.append(((row.far_type, row.far_id), row.relation_type))
    return found


def _relation_key(tenant_id: UUID, from_id: UUID, from_type: str, to_id: UUID, to_type: str, relation_type: str,
                  type_group: str) -> list[ColumnElement[bool]]:
    return [relations.c.tenant_id == tenant_id, relations.c.from_id == from_id, relations.c.from_type == from_type,
            relations.c.to_id == to_id, relations.c.to_type == to_type, relations.c.relation_type == relation_type,
            relations.c.relation_type_group == type_group]


def _chain(row: Any) -> RuleChainRecord:
    return RuleChainRecord(row.id, row.created_time, row.tenant_id, row.name, row.type, bool(row.root),
                           bool(row.debug_mode), _load(row.configuration), _load(row.additional_info),
                           _load(row.metadata), row.version)


def _chain_values(record: RuleChainRecord) -> dict[str, Any]:
    return dict(id=record.id, created_time=record.created_time, tenant_id=record.tenant_id, name=record.name,
                type=record.type, root=record.root, debug_mode=record.debug_mode,
                configuration=_dump(record.configuration), additional_info=_dump(record.additional_info),
                metadata=_dump(record.metadata), version=record.version)


def _relation(row: Any) -> RelationRecord:
    return RelationRecord(row.tenant_id, row.from_id, row.from_type, row.to_id, row.to_type, row.relation_type,
                          row.relation_type_group, _load(row.additional_info))


def _relation_values(record: RelationRecord) -> dict[str, Any]:
    return dict(tenant_id=record.tenant_id, from_id=record.from_id, from_type=record.from_type, to_id=record.to_id,
                to_type=record.to_type, relation_type=record.type, relation_type_group=record.type_group,
                additional_info=_dump(record.additional_info))
