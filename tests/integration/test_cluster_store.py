"""Cluster mode's coordination rows (nodes, device ownership, shared settings, request ids, routed messages) on real
databases: every test runs on SQLite and on PostgreSQL (see tests/fixtures/database.py). On PostgreSQL the times
come from the database's clock, which a test cannot move, so a node is made stale by rewriting its heartbeat."""

from __future__ import annotations

import itertools
from typing import Any
from uuid import UUID, uuid4

import pytest
import pytest_twisted
from sqlalchemy import Connection, func, select, text, update
from twisted.internet import defer

from nanoiot.errors import InvalidArguments
from nanoiot.persistence import schema
from nanoiot.persistence.cluster_store import ClusterStore
from nanoiot.persistence.records import Claim, NodeRecord, Owner, RpcRecord, RpcStatus
from nanoiot.persistence.repository import Repository

DEAD_AFTER = 30_000  # ms without a heartbeat before a node counts as dead
LONG_AGO = 10 * 60_000


@pytest.fixture
def store(repository: Repository) -> ClusterStore:
    return ClusterStore(repository)


def age_heartbeat(repository: Repository, node_id: str, by_ms: int = LONG_AGO) -> Any:
    """Move a node's last heartbeat into the past (the database clock itself cannot be moved)."""

    def thd(conn: Connection) -> None:
        nodes = schema.cluster_node
        conn.execute(update(nodes).where(nodes.c.node_id == node_id).values(
            heartbeat_time=nodes.c.heartbeat_time - by_ms))

    return repository._run(thd)


def owner_rows(repository: Repository) -> Any:
    def thd(conn: Connection) -> dict[UUID, tuple[str, int]]:
        owners = schema.device_owner
        return {r.device_id: (r.node_id, r.epoch) for r in conn.execute(select(owners))}

    return repository._run(thd)


def make_rpc(tenant_id: UUID, device_id: UUID, created_time: int, status: RpcStatus = RpcStatus.QUEUED,
             method: str = "setGpio") -> RpcRecord:
    return RpcRecord(uuid4(), created_time, tenant_id, device_id, created_time + 60_000, False, method, {"pin": 7},
                     status)


# --- nodes ------------------------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_registered_node_is_listed_alive_with_its_address(store):
    node = await store.register_node("node-b", "10.0.0.6:8080")
    await store.register_node("node-a", "10.0.0.5:8080")
    assert isinstance(node, NodeRecord)
    assert (node.node_id, node.address, node.connected_devices, node.alive) == ("node-b", "10.0.0.6:8080", 0, True)
    assert node.started_time == node.heartbeat_time and node.started_time > 1_600_000_000_000
    listed = await store.list_nodes(DEAD_AFTER)
    assert [(n.node_id, n.address, n.alive) for n in listed] == [
        ("node-a", "10.0.0.5:8080", True), ("node-b", "10.0.0.6:8080", True)]
    assert listed[1] == node


@pytest_twisted.ensureDeferred
async def test_a_restarted_node_resets_its_start_time_and_address(store, repository):
    await store.register_node("node-a", "10.0.0.5:8080")
    await store.heartbeat("node-a", 42)

    def make_old(conn: Connection) -> None:
        nodes = schema.cluster_node
        conn.execute(update(nodes).values(started_time=nodes.c.started_time - LONG_AGO))

    await repository._run(make_old)
    [before] = await store.list_nodes(DEAD_AFTER)
    again = await store.register_node("node-a", "10.0.0.9:8080")
    assert again.started_time >= before.started_time + LONG_AGO
    assert (again.address, again.connected_devices) == ("10.0.0.9:8080", 0)
    assert await store.list_nodes(DEAD_AFTER) == [again]


@pytest_twisted.ensureDeferred
async def test_a_heartbeat_stores_the_time_and_the_device_count(store, repository):
    registered = await store.register_node("node-a", "10.0.0.5:8080")
    await age_heartbeat(repository, "node-a")
    beat = await store.heartbeat("node-a", 1234)
    assert beat >= registered.heartbeat_time
    [node] = await store.list_nodes(DEAD_AFTER)
    assert (node.heartbeat_time, node.connected_devices, node.started_time, node.alive) == (
        beat, 1234, registered.started_time, True)


@pytest_twisted.ensureDeferred
async def test_a_heartbeat_of_a_removed_node_puts_it_back(store, repository):
    await store.register_node("node-a", "10.0.0.5:8080")
    await ClusterStore(repository).remove_node("node-a")  # another node judged it dead and removed it
    assert await store.list_nodes(DEAD_AFTER) == []
    beat = await store.heartbeat("node-a", 3)
    beat_b = await ClusterStore(repository).heartbeat("node-b", 7)  # never registered: no address known
    listed = await store.list_nodes(DEAD_AFTER)
    assert [(n.node_id, n.address, n.connected_devices, n.alive) for n in listed] == [
        ("node-a", "10.0.0.5:8080", 3, True), ("node-b", "", 7, True)]
    assert (listed[0].heartbeat_time, listed[1].heartbeat_time) == (beat, beat_b)


@pytest_twisted.ensureDeferred
async def test_a_node_without_recent_heartbeats_is_dead(store, repository):
    for node_id in ("node-c", "node-a", "node-b"):
        await store.register_node(node_id, f"{node_id}:8080")
    await age_heartbeat(repository, "node-a")
    await age_heartbeat(repository, "node-c", DEAD_AFTER + 5_000)
    assert await store.dead_nodes(DEAD_AFTER) == ["node-a", "node-c"]
    assert [(n.node_id, n.alive) for n in await store.list_nodes(DEAD_AFTER)] == [
        ("node-a", False), ("node-b", True), ("node-c", False)]
    assert await store.dead_nodes(LONG_AGO + 60_000) == []  # a more patient judge
    await store.heartbeat("node-a", 0)
    assert await store.dead_nodes(DEAD_AFTER) == ["node-c"]


# --- device ownership -------------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_claims_bump_the_epoch_and_name_the_previous_node(store):
    d1, d2, d3 = uuid4(), uuid4(), uuid4()
    first = await store.claim_devices("node-a", [d1, d2])
    assert first == {d1: Claim(d1, 1, None), d2: Claim(d2, 1, None)}
    second = await store.claim_devices("node-b", [d2, d3, d2])  # a duplicate id counts once
    assert second == {d2: Claim(d2, 2, "node-a"), d3: Claim(d3, 1, None)}
    third = await store.claim_devices("node-a", [d1, d2, d3])
    assert third == {d1: Claim(d1, 2, "node-a"), d2: Claim(d2, 3, "node-b"), d3: Claim(d3, 2, "node-b")}
    assert await owner_rows(store._repository) == {d1: ("node-a", 2), d2: ("node-a", 3), d3: ("node-a", 2)}
    assert await store.claim_devices("node-a", []) == {}


@pytest_twisted.ensureDeferred
async def test_a_claim_of_thousands_of_devices_is_one_call(store):
    devices = [uuid4() for _ in range(2500)]
    await store.claim_devices("node-a", devices[:1200])
    claims = await store.claim_devices("node-b", devices)
    assert len(claims) == 2500
    assert all(claims[d] == Claim(d, 2, "node-a") for d in devices[:1200])
    assert all(claims[d] == Claim(d, 1, None) for d in devices[1200:])


@pytest_twisted.ensureDeferred
async def test_racing_claims_chain_epochs_and_previous_nodes_without_gaps(store):
    devices = [uuid4() for _ in range(300)]
    nodes = [f"node-{i}" for i in range(6)]
    # Overlapping sets in different orders, all at once (several connections on PostgreSQL).
    results = await defer.gatherResults([
        store.claim_devices(node, devices[i * 20:] + devices[:i * 20] if i % 2 else list(reversed(devices)))
        for i, node in enumerate(nodes)])
    for device in devices:
        chain = sorted(((result[device], node) for node, result in zip(nodes, results)), key=lambda c: c[0].epoch)
        # Claim k took the device from the node that made claim k - 1: no lost update, no wrong previous node.
        assert [claim.epoch for claim, _ in chain] == list(range(1, len(nodes) + 1))
        assert [claim.previous_node for claim, _ in chain] == [None] + [node for _, node in chain[:-1]]
    rows = await owner_rows(store._repository)
    assert all(rows[d][1] == len(nodes) for d in devices)


@pytest_twisted.ensureDeferred
async def test_a_stale_release_keeps_the_newer_claim(store):
    d1, d2, d3 = uuid4(), uuid4(), uuid4()
    await store.claim_devices("node-a", [d1, d2, d3])
    await store.claim_devices("node-b", [d1])  # d1 moves on: epoch 2 on node-b
    await store.claim_devices("node-a", [d2])  # node-a again: epoch 2, its epoch-1 release is stale
    released = await store.release_devices("node-a", [(d1, 1), (d2, 1), (d3, 1)])
    assert released == 1  # d3 only
    assert await owner_rows(store._repository) == {d1: ("node-b", 2), d2: ("node-a", 2)}
    assert await store.release_devices("node-a", [(d1, 2)]) == 0  # right epoch, wrong node
    assert await store.release_devices("node-b", [(d1, 2), (d2, 2)]) == 1
    assert await owner_rows(store._repository) == {d2: ("node-a", 2)}
    assert await store.release_devices("node-a", []) == 0


@pytest_twisted.ensureDeferred
async def test_releases_of_many_devices_are_batched(store):
    devices = [uuid4() for _ in range(2300)]
    claims = await store.claim_devices("node-a", devices)
    assert await store.release_devices("node-a", [(d, c.epoch) for d, c in claims.items()]) == 2300
    assert await owner_rows(store._repository) == {}


@pytest_twisted.ensureDeferred
async def test_owners_say_who_serves_a_device_and_whether_it_is_alive(store, repository):
    await store.register_node("node-a", "a:8080")
    await store.register_node("node-b", "b:8080")
    d1, d2, d3, nobodys = uuid4(), uuid4(), uuid4(), uuid4()
    await store.claim_devices("node-a", [d1, d2])
    await store.claim_devices("node-b", [d2])
    await store.claim_devices("node-x", [d3])  # a node that never registered (or was removed)
    wanted = [d1, d2, d3, nobodys]
    assert await store.owners(wanted, DEAD_AFTER) == {
        d1: Owner(d1, "node-a", 1, True), d2: Owner(d2, "node-b", 2, True), d3: Owner(d3, "node-x", 1, False)}
    await age_heartbeat(repository, "node-a")
    owners = await store.owners(wanted, DEAD_AFTER)
    assert (owners[d1].alive, owners[d2].alive) == (False, True)
    await store.heartbeat("node-a", 1)
    assert (await store.owners([d1], DEAD_AFTER))[d1].alive is True
    assert await store.owners([], DEAD_AFTER) == {}


@pytest_twisted.ensureDeferred
async def test_a_claim_for_commands_takes_only_devices_no_live_node_holds(store, repository):
    await store.register_node("node-a", "a:8080")
    await store.register_node("node-b", "b:8080")
    await store.register_node("node-c", "c:8080")
    held_by_a, held_by_c, mine, free = uuid4(), uuid4(), uuid4(), uuid4()
    await store.claim_devices("node-a", [held_by_a])
    await store.claim_devices("node-c", [held_by_c])
    await store.claim_devices("node-b", [mine])
    await age_heartbeat(repository, "node-c")  # node-c is dead: its device may be taken
    claims, held = await store.claim_free_devices("node-b", [held_by_a, held_by_c, mine, free], DEAD_AFTER)
    assert held == {held_by_a: Owner(held_by_a, "node-a", 1, True)}
    assert claims == {held_by_c: Claim(held_by_c, 2, "node-c"), mine: Claim(mine, 2, "node-b"),
                      free: Claim(free, 1, None)}
    assert (await owner_rows(repository))[held_by_a] == ("node-a", 1)  # untouched
    assert await store.claim_free_devices("node-b", [], DEAD_AFTER) == ({}, {})


@pytest_twisted.ensureDeferred
async def test_removing_a_node_drops_its_claims_only(store):
    await store.register_node("node-a", "a:8080")
    await store.register_node("node-b", "b:8080")
    mine, theirs = [uuid4() for _ in range(3)], [uuid4() for _ in range(2)]
    await store.claim_devices("node-a", mine)
    await store.claim_devices("node-b", theirs)
    await store.remove_node("node-a")
    assert [n.node_id for n in await store.list_nodes(DEAD_AFTER)] == ["node-b"]
    assert await owner_rows(store._repository) == {d: ("node-b", 1) for d in theirs}
    assert await store.owners(mine, DEAD_AFTER) == {}


@pytest_twisted.ensureDeferred
async def test_owned_elsewhere_finds_the_devices_another_node_took_among_30000(store):
    devices = [uuid4() for _ in range(30_000)]
    mine, unknown = devices[:20_000], devices[20_000:]
    await store.claim_devices("node-a", mine)
    taken = mine[::4]  # 5,000 spread over every chunk
    await store.claim_devices("node-b", taken)
    assert await store.owned_elsewhere("node-a", devices) == set(taken)
    assert await store.owned_elsewhere("node-b", devices) == set(mine) - set(taken)
    assert await store.owned_elsewhere("node-c", unknown) == set()
    assert await store.owned_elsewhere("node-a", []) == set()


# --- shared settings and request ids ----------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_shared_setting_is_made_once_and_read_by_everyone(store):
    made = []

    def make() -> str:
        made.append(uuid4().hex)
        return made[-1]

    values = await defer.gatherResults([
        ClusterStore(store._repository).shared_setting("jwt_signing_key", make) for _ in range(10)])
    assert len(set(values)) == 1 and values[0] in made
    assert await store.shared_setting("jwt_signing_key", lambda: "other") == values[0]
    assert await store.shared_setting("another", lambda: "its own") == "its own"


@pytest_twisted.ensureDeferred
async def test_request_ids_start_above_every_stored_rpc_seq(store, repository):
    tenant = await repository.create_tenant("Acme")
    device, _ = await repository.create_device(tenant.id, "Lamp")
    stored = await repository.insert_rpcs([make_rpc(tenant.id, device.id, 1_000 + i) for i in range(3)])
    top = max(r.seq for r in stored)
    assert await store.allocate_request_ids(10) == top + 1
    assert await store.allocate_request_ids(1) == top + 11
    assert await store.allocate_request_ids(5) == top + 12


@pytest_twisted.ensureDeferred
async def test_request_ids_start_at_1_on_an_empty_database(store):
    assert await store.allocate_request_ids(100) == 1
    assert await store.allocate_request_ids(100) == 101
    with pytest.raises(InvalidArguments):
        await store.allocate_request_ids(0)


@pytest_twisted.ensureDeferred
async def test_concurrent_request_id_blocks_never_overlap(store):
    sizes = [1, 7, 100, 1000, 3] * 8
    # Separate stores, as separate nodes would have, including for the very first (initialising) allocation.
    starts = await defer.gatherResults([
        ClusterStore(store._repository).allocate_request_ids(size) for size in sizes])
    blocks = sorted(zip(starts, sizes))
    for (start, size), (next_start, _) in itertools.pairwise(blocks):
        assert start + size <= next_start
    assert blocks[0][0] == 1
    assert sum(sizes) + 1 == blocks[-1][0] + blocks[-1][1]  # and no gaps either
    assert await store.allocate_request_ids(1) == sum(sizes) + 1


# --- routed messages --------------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_old_routed_messages_are_purged(store, repository):
    now = await store.heartbeat("node-a", 0)  # the clock purge_messages compares with

    def put(conn: Connection) -> list[int]:
        ids = []
        for age, payload in [(LONG_AGO, "old"), (LONG_AGO // 2, "older than a minute"), (0, "new")]:
            # Exactly the statement the notification bus uses.
            ids.append(conn.execute(text("INSERT INTO cluster_message (created_time, payload) VALUES "
                                         "(:created_time, :payload) RETURNING id"),
                                    dict(created_time=now - age, payload=payload)).scalar_one())
        return ids

    ids = await repository._run(put)
    assert ids == sorted(ids) and len(set(ids)) == 3

    def payloads(conn: Connection) -> list[str]:
        return list(conn.scalars(select(schema.cluster_message.c.payload).order_by(schema.cluster_message.c.id)))

    assert await store.purge_messages(LONG_AGO + 60_000) == 0
    assert await store.purge_messages(60_000) == 2
    assert await repository._run(payloads) == ["new"]
    assert await repository._run(lambda conn: conn.scalar(select(func.count()).select_from(
        schema.cluster_message))) == 1


# --- a claimed device's queue -----------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_one_devices_active_rpcs_load_by_created_time_then_seq(repository):
    tenant = await repository.create_tenant("Acme")
    lamp, _ = await repository.create_device(tenant.id, "Lamp")
    other, _ = await repository.create_device(tenant.id, "Other")
    plan = [(lamp.id, 3_000, RpcStatus.QUEUED, "late"), (lamp.id, 1_000, RpcStatus.SENT, "first"),
            (lamp.id, 2_000, RpcStatus.DELIVERED, "tie-1"), (lamp.id, 2_000, RpcStatus.QUEUED, "tie-2"),
            (lamp.id, 500, RpcStatus.SUCCESSFUL, "done"), (lamp.id, 600, RpcStatus.EXPIRED, "expired"),
            (lamp.id, 700, RpcStatus.FAILED, "failed"), (lamp.id, 800, RpcStatus.DELETED, "deleted"),
            (lamp.id, 2_500, RpcStatus.TIMEOUT, "timed out, still retried"),
            (other.id, 100, RpcStatus.QUEUED, "another device")]
    for device_id, created, status, method in plan:
        await repository.insert_rpcs([make_rpc(tenant.id, device_id, created, status, method)])
    loaded = await repository.load_device_active_rpcs(lamp.id)
    assert [r.method for r in loaded] == ["first", "tie-1", "tie-2", "timed out, still retried", "late"]
    assert all(r.device_id == lamp.id and not r.status.is_terminal for r in loaded)
    assert await repository.load_device_active_rpcs(uuid4()) == []
