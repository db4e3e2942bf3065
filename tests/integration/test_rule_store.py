"""Rule chains and entity relations on real databases: every test runs on SQLite and on PostgreSQL (see
tests/fixtures/database.py), through :class:`~nanoiot.persistence.rule_store.RuleStore`."""

from __future__ import annotations

from uuid import UUID, uuid4

import pytest
import pytest_twisted
from twisted.internet import defer

from nanoiot.errors import BadRequest, Conflict, InvalidArguments, NotFound
from nanoiot.persistence.records import PageLink, RelationRecord, RuleChainRecord, SortOrder
from nanoiot.persistence.repository import Repository
from nanoiot.persistence.rule_store import ROOT_DELETE_REFUSED, RuleStore

TENANT, OTHER_TENANT = uuid4(), uuid4()
METADATA = {"firstNodeIndex": 0, "nodes": [{"id": {"entityType": "RULE_NODE", "id": str(uuid4())},
                                            "type": "org.thingsboard.rule.engine.action.TbLogNode", "name": "log",
                                            "configuration": {"jsScript": "return 'x';"}}],
            "connections": []}


@pytest.fixture
def store(repository: Repository) -> RuleStore:
    return RuleStore(repository)


def relation(from_id: UUID, to_id: UUID, relation_type: str = "Contains", from_type: str = "DEVICE",
             to_type: str = "DEVICE", tenant: UUID = TENANT, group: str = "COMMON",
             info: object = None) -> RelationRecord:
    return RelationRecord(tenant, from_id, from_type, to_id, to_type, relation_type, group, info)


# --- rule chains ------------------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_created_chain_reads_back_with_every_field_and_version_1(store):
    created = await store.create_rule_chain(TENANT, "Thermostats", "CORE", True, {"k": [1, 2]},
                                            {"description": "d"}, METADATA)
    assert isinstance(created, RuleChainRecord)
    assert (created.version, created.root) == (1, False)
    read = await store.get_rule_chain(created.id)
    assert read == created
    assert read.metadata == METADATA and read.configuration == {"k": [1, 2]}
    assert read.additional_info == {"description": "d"} and read.debug_mode is True


@pytest_twisted.ensureDeferred
async def test_a_chain_of_another_tenant_is_not_found_when_the_tenant_is_given(store):
    created = await store.create_rule_chain(TENANT, "mine")
    assert await store.get_rule_chain(created.id, OTHER_TENANT) is None
    assert (await store.get_rule_chain(created.id, TENANT)).id == created.id
    assert await store.get_rule_chain(uuid4()) is None


@pytest_twisted.ensureDeferred
async def test_a_chain_created_with_a_chosen_id_keeps_it_and_a_second_one_is_refused(store):
    chosen = uuid4()
    created = await store.create_rule_chain(TENANT, "imported", chain_id=chosen)
    assert created.id == chosen
    with pytest.raises(BadRequest):
        await store.create_rule_chain(TENANT, "again", chain_id=chosen)


@pytest_twisted.ensureDeferred
async def test_every_change_bumps_the_version_and_keeps_metadata_and_root(store):
    created = await store.create_rule_chain(TENANT, "a", metadata=METADATA)
    updated = await store.update_rule_chain(TENANT, created.id, "b", "CORE", False, None, {"description": "new"})
    assert (updated.name, updated.version, updated.metadata) == ("b", 2, METADATA)
    saved = await store.save_metadata(TENANT, created.id, {"firstNodeIndex": None, "nodes": [], "connections": []})
    assert saved.version == 3 and saved.name == "b" and saved.metadata["nodes"] == []


@pytest_twisted.ensureDeferred
async def test_an_update_naming_a_stale_version_is_a_conflict_and_changes_nothing(store):
    created = await store.create_rule_chain(TENANT, "a")
    await store.update_rule_chain(TENANT, created.id, "b", "CORE", False, None, None, expected_version=1)
    with pytest.raises(Conflict):
        await store.update_rule_chain(TENANT, created.id, "c", "CORE", False, None, None, expected_version=1)
    with pytest.raises(Conflict):
        await store.save_metadata(TENANT, created.id, METADATA, expected_version=1)
    assert (await store.get_rule_chain(created.id)).name == "b"


@pytest_twisted.ensureDeferred
async def test_changing_a_missing_chain_or_another_tenants_chain_is_not_found(store):
    theirs = await store.create_rule_chain(OTHER_TENANT, "theirs")
    for chain_id in (uuid4(), theirs.id):
        with pytest.raises(NotFound):
            await store.update_rule_chain(TENANT, chain_id, "x", "CORE", False, None, None)
        with pytest.raises(NotFound):
            await store.save_metadata(TENANT, chain_id, METADATA)
        with pytest.raises(NotFound):
            await store.set_root(TENANT, chain_id)
    assert (await store.get_rule_chain(theirs.id)).name == "theirs"


@pytest_twisted.ensureDeferred
async def test_chains_are_paged_per_tenant_with_text_search_and_sorting(store):
    for name in ("Charlie", "alpha", "Bravo", "alphabet"):
        await store.create_rule_chain(TENANT, name)
    await store.create_rule_chain(OTHER_TENANT, "alpha of another tenant")
    await store.create_rule_chain(TENANT, "edge one", type="EDGE")
    page = await store.list_rule_chains(TENANT, PageLink(2, 0, sort_property="name"))
    assert page.total_elements == 5 and page.has_next
    assert [c.name for c in page.data] == ["Bravo", "Charlie"]  # byte-wise order on both databases
    found = await store.list_rule_chains(TENANT, PageLink(10, 0, text_search="ALPHA", sort_property="name",
                                                           sort_order=SortOrder.DESC))
    assert [c.name for c in found.data] == ["alphabet", "alpha"]
    edge = await store.list_rule_chains(TENANT, PageLink(10), type="EDGE")
    assert [c.name for c in edge.data] == ["edge one"]
    with pytest.raises(InvalidArguments):
        await store.list_rule_chains(TENANT, PageLink(10, sort_property="nodes"))


@pytest_twisted.ensureDeferred
async def test_one_root_per_tenant_moves_with_set_root(store):
    first = await store.create_rule_chain(TENANT, "first")
    second = await store.create_rule_chain(TENANT, "second")
    theirs = await store.create_rule_chain(OTHER_TENANT, "theirs")
    assert await store.get_root(TENANT) is None
    rooted = await store.set_root(TENANT, first.id)
    assert rooted.root and rooted.version == 2
    await store.set_root(OTHER_TENANT, theirs.id)
    moved = await store.set_root(TENANT, second.id)
    assert moved.root
    assert (await store.get_root(TENANT)).id == second.id
    former = await store.get_rule_chain(first.id)
    assert not former.root and former.version == 3
    assert (await store.get_root(OTHER_TENANT)).id == theirs.id  # another tenant's root is untouched
    again = await store.set_root(TENANT, second.id)
    assert again.version == moved.version  # already root: nothing changes
    roots = await store.list_root_chains()
    assert {(c.tenant_id, c.id) for c in roots} == {(TENANT, second.id), (OTHER_TENANT, theirs.id)}


@pytest_twisted.ensureDeferred
async def test_concurrent_set_root_calls_leave_exactly_one_root(store):
    created = [await store.create_rule_chain(TENANT, f"c{i}") for i in range(6)]
    await defer.gatherResults([store.set_root(TENANT, c.id) for c in created], consumeErrors=True)
    page = await store.list_rule_chains(TENANT, PageLink(10))
    assert sum(c.root for c in page.data) == 1


@pytest_twisted.ensureDeferred
async def test_the_root_chain_cannot_be_deleted_and_another_one_can_with_its_relations(store):
    root = await store.create_rule_chain(TENANT, "root")
    await store.set_root(TENANT, root.id)
    other = await store.create_rule_chain(TENANT, "other")
    device = uuid4()
    await store.save_relation(relation(other.id, device, from_type="RULE_CHAIN"))
    await store.save_relation(relation(device, other.id, to_type="RULE_CHAIN"))
    await store.save_relation(relation(device, uuid4()))
    with pytest.raises(BadRequest, match=ROOT_DELETE_REFUSED):
        await store.delete_rule_chain(TENANT, root.id)
    assert await store.delete_rule_chain(OTHER_TENANT, other.id) is False  # not that tenant's
    assert await store.delete_rule_chain(TENANT, other.id) is True
    assert await store.get_rule_chain(other.id) is None
    assert await store.delete_rule_chain(TENANT, other.id) is False
    assert [r.to_type for r in await store.list_relations(TENANT, device, "DEVICE")] == ["DEVICE"]
    assert await store.list_relations(TENANT, device, "DEVICE", "TO") == []


# --- relations --------------------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_saved_relation_is_listed_from_its_source_and_to_its_target(store):
    a, b, c = uuid4(), uuid4(), uuid4()
    ab = await store.save_relation(relation(a, b, info={"note": 1}))
    await store.save_relation(relation(a, c, "Manages", to_type="ASSET"))
    assert await store.list_relations(TENANT, a, "DEVICE") == [
        relation(a, b, info={"note": 1}), relation(a, c, "Manages", to_type="ASSET")]
    assert await store.list_relations(TENANT, a, "DEVICE", relation_type="Manages") == [
        relation(a, c, "Manages", to_type="ASSET")]
    assert await store.list_relations(TENANT, b, "DEVICE", "TO") == [ab]
    assert await store.list_relations(TENANT, a, "ASSET") == []  # the type is part of the entity id
    assert await store.list_relations(OTHER_TENANT, a, "DEVICE") == []


@pytest_twisted.ensureDeferred
async def test_saving_the_same_relation_again_replaces_its_additional_info(store):
    a, b = uuid4(), uuid4()
    await store.save_relation(relation(a, b, info={"v": 1}))
    await store.save_relation(relation(a, b, info={"v": 2}))
    assert await store.list_relations(TENANT, a, "DEVICE") == [relation(a, b, info={"v": 2})]
    assert await store.get_relation(TENANT, a, "DEVICE", b, "DEVICE", "Contains") == relation(a, b, info={"v": 2})


@pytest_twisted.ensureDeferred
async def test_relation_type_groups_are_kept_apart(store):
    a, b = uuid4(), uuid4()
    await store.save_relation(relation(a, b))
    await store.save_relation(relation(a, b, group="RULE_NODE"))
    assert len(await store.list_relations(TENANT, a, "DEVICE")) == 1
    assert len(await store.list_relations(TENANT, a, "DEVICE", type_group=None)) == 2
    assert await store.delete_relation(TENANT, a, "DEVICE", b, "DEVICE", "Contains", "RULE_NODE") is True
    assert await store.list_relations(TENANT, a, "DEVICE") == [relation(a, b)]


@pytest_twisted.ensureDeferred
async def test_deleting_a_relation_reports_whether_there_was_one(store):
    a, b = uuid4(), uuid4()
    await store.save_relation(relation(a, b))
    assert await store.delete_relation(OTHER_TENANT, a, "DEVICE", b, "DEVICE", "Contains") is False
    assert await store.delete_relation(TENANT, a, "DEVICE", b, "DEVICE", "Manages") is False
    assert await store.delete_relation(TENANT, a, "DEVICE", b, "DEVICE", "Contains") is True
    assert await store.delete_relation(TENANT, a, "DEVICE", b, "DEVICE", "Contains") is False
    assert await store.get_relation(TENANT, a, "DEVICE", b, "DEVICE", "Contains") is None


@pytest_twisted.ensureDeferred
async def test_an_entitys_relations_are_deleted_by_direction(store):
    a, b, c = uuid4(), uuid4(), uuid4()
    await store.save_relation(relation(a, b))
    await store.save_relation(relation(c, a))
    assert await store.delete_entity_relations(TENANT, a, "DEVICE", "TO") == 1
    assert await store.list_relations(TENANT, a, "DEVICE", "TO") == []
    assert await store.list_relations(TENANT, a, "DEVICE") == [relation(a, b)]
    await store.save_relation(relation(c, a))
    assert await store.delete_entity_relations(TENANT, a, "DEVICE") == 2


@pytest_twisted.ensureDeferred
async def test_find_related_walks_levels_nearest_first_each_entity_once(store):
    # root -> a, b ; a -> c ; b -> c ; c -> root (a cycle)
    root, a, b, c = uuid4(), uuid4(), uuid4(), uuid4()
    for src, dst in ((root, a), (root, b), (a, c), (b, c), (c, root)):
        await store.save_relation(relation(src, dst))
    one = await store.find_related(TENANT, root, "DEVICE", "FROM", "Contains", 1)
    assert sorted(one) == sorted([("DEVICE", a), ("DEVICE", b)])
    two = await store.find_related(TENANT, root, "DEVICE", "FROM", "Contains", 2)
    assert sorted(two[:2]) == sorted([("DEVICE", a), ("DEVICE", b)]) and two[2:] == [("DEVICE", c)]
    unlimited = await store.find_related(TENANT, root, "DEVICE", "FROM", None, 0)
    assert len(unlimited) == 3  # the cycle back to root ends the walk; root itself is never returned
    last = await store.find_related(TENANT, root, "DEVICE", "FROM", "Contains", 2, fetch_last_level_only=True)
    assert last == [("DEVICE", c)]
    up = await store.find_related(TENANT, c, "DEVICE", "TO", "Contains", 1)
    assert sorted(up) == sorted([("DEVICE", a), ("DEVICE", b)])


@pytest_twisted.ensureDeferred
async def test_find_related_filters_by_relation_type_and_entity_type_but_walks_through_all(store):
    building, floor, sensor, valve = uuid4(), uuid4(), uuid4(), uuid4()
    await store.save_relation(relation(building, floor, "Has", "ASSET", "ASSET"))
    await store.save_relation(relation(floor, sensor, "Contains", "ASSET", "DEVICE"))
    await store.save_relation(relation(floor, valve, "Manages", "ASSET", "DEVICE"))
    contains = await store.find_related(TENANT, building, "ASSET", "FROM", "Contains", 2)
    assert contains == [("DEVICE", sensor)]
    devices = await store.find_related(TENANT, building, "ASSET", "FROM", None, 2, entity_types=["DEVICE"])
    assert sorted(devices) == sorted([("DEVICE", sensor), ("DEVICE", valve)])
    assert await store.find_related(TENANT, building, "ASSET", "FROM", "Contains", 1) == []
    assert await store.find_related(OTHER_TENANT, building, "ASSET", "FROM", None, 2) == []


@pytest_twisted.ensureDeferred
async def test_find_related_follows_many_entities_per_level(store):
    hub = uuid4()
    leaves = [uuid4() for _ in range(1200)]  # more than one IN (...) chunk on the next level
    for leaf in leaves:
        await store.save_relation(relation(hub, leaf))
    tips = []
    for leaf in leaves[-3:]:
        tip = uuid4()
        tips.append(tip)
        await store.save_relation(relation(leaf, tip, "Feeds"))
    found = await store.find_related(TENANT, hub, "DEVICE", "FROM", "Feeds", 2)
    assert sorted(found) == sorted(("DEVICE", t) for t in tips)


@pytest_twisted.ensureDeferred
async def test_relation_exists_with_both_ends_or_one(store):
    a, b = uuid4(), uuid4()
    await store.save_relation(relation(a, b, to_type="ASSET"))
    assert await store.relation_exists(TENANT, ("DEVICE", a), ("ASSET", b), "Contains") is True
    assert await store.relation_exists(TENANT, ("DEVICE", a), ("DEVICE", b), "Contains") is False
    assert await store.relation_exists(TENANT, ("DEVICE", a), ("ASSET", b), "Manages") is False
    assert await store.relation_exists(TENANT, ("DEVICE", a), None, "Contains") is True
    assert await store.relation_exists(TENANT, ("DEVICE", a), None, "Contains", to_type="ASSET") is True
    assert await store.relation_exists(TENANT, ("DEVICE", a), None, "Contains", to_type="DEVICE") is False
    assert await store.relation_exists(TENANT, None, ("ASSET", b), "Contains") is True
    assert await store.relation_exists(OTHER_TENANT, ("DEVICE", a), None, "Contains") is False
    with pytest.raises(InvalidArguments):
        await store.relation_exists(TENANT, None, None, "Contains")


@pytest_twisted.ensureDeferred
async def test_entities_are_found_by_name_within_the_tenant(store, repository):
    device, _ = await repository.create_device(TENANT, "Valve 7")
    customer = await repository.create_customer(TENANT, "Acme")
    user = await repository.create_user("Ops@Acme.io", b"x", "TENANT_ADMIN", TENANT, customer.id)
    chain = await store.create_rule_chain(TENANT, "Forwarder")
    assert await store.find_entity_by_name(TENANT, "DEVICE", "Valve 7") == ("DEVICE", device.id)
    assert await store.find_entity_by_name(TENANT, "CUSTOMER", "Acme") == ("CUSTOMER", customer.id)
    assert await store.find_entity_by_name(TENANT, "USER", "ops@acme.io") == ("USER", user.id)
    assert await store.find_entity_by_name(TENANT, "RULE_CHAIN", "Forwarder") == ("RULE_CHAIN", chain.id)
    assert await store.find_entity_by_name(OTHER_TENANT, "DEVICE", "Valve 7") is None
    assert await store.find_entity_by_name(TENANT, "DEVICE", "valve 7") is None  # names are exact
    assert await store.find_entity_by_name(TENANT, "ASSET", "Valve 7") is None
