"""Cluster mode end to end: several ``twistd nanoiot --cluster`` nodes on one PostgreSQL database; a device's actor
lives on the node holding its session, and REST calls at any node reach it there.

Every test starts its own nodes on a fresh database (tests/fixtures/cluster.py), with fast heartbeats
(``--heartbeat-interval 0.5 --dead-after 3``); devices are paho-mqtt clients. What is checked:

1. a lightweight two-way (v1 and v2) and one-way call at nodes 2 and 3 reaches a device connected to node 1;
2. persistent commands queued at node 3 for an offline device are delivered in order when it connects to node 2;
3. kill -9 of the device's node in the middle of 500 sequential persistent commands: the device reconnects to
   another node and every command ends SUCCESSFUL, first received in order, none more than twice;
4. once a dead node is known to be dead, a lightweight call for a device it held fails fast (DEVICE_OFFLINE);
5. a device connecting to node 2 takes its session over from node 1, which closes the old connection;
6. a 100 KB command is routed (beyond PostgreSQL's 8,000-byte NOTIFY payload);
7. two nodes with ``--reuse-port`` share their ports, both get devices, and every device is reachable;
8. ``GET /api/cluster/nodes`` lists the nodes; a stopped node is dropped or marked not alive.

``test_harness_single_node`` checks the harness itself on one node without cluster options (what the server
could do before cluster mode): start, REST, a paho device, kill -9 and restart with the device following.

Nothing sleeps: every wait is an event or a bounded poll through ``deferLater``.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web.client import HTTPConnectionPool

from tests.fixtures.cluster import (
    DEAD_AFTER, NO_ANSWER, Cluster, MqttDevice, Receipt, echo, new_database, running_cluster, stop_devices,
)
from tests.fixtures.processes import bounded, wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.cluster]

#: Long enough that no persistent command expires during a test.
PERSISTENT_TIMEOUT_MS = 300_000


@pytest.fixture
def cluster_database(postgres_server: str) -> str:
    """A fresh database on the suite's PostgreSQL, shared by the nodes of one test."""
    return new_database(postgres_server)


def answer_unless_notify(receipt: Receipt) -> Any:
    """Echoes two-way commands; methods named ``notify…`` are one-way and left unanswered."""
    if isinstance(receipt.method, str) and receipt.method.startswith("notify"):
        return NO_ANSWER
    return echo(receipt)


async def receipts_at_least(device: MqttDevice, count: int, seconds: float, what: str) -> None:
    await bounded(device.when(lambda: len(device.receipts) >= count), seconds,
                  f"{what} (device has {len(device.receipts)} receipts)")


# --------------------------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_harness_single_node(tmp_path, cluster_database):
    """The harness on one node with the options that exist without cluster mode."""
    async with running_cluster(tmp_path, cluster_database, size=1, cluster=False) as cluster:
        node = cluster[0]
        assert node.banner_ports.get("http") == node.http_port, node.banner_ports
        assert node.banner_ports.get("mqtt") == node.mqtt_port, node.banner_ports
        device_id, token = await cluster.create_device("smoke")
        device = MqttDevice(token, [node.mqtt_port], answer=answer_unless_notify, failover=True)
        try:
            await device.connect()
            status, body = await cluster.rpc(node, device_id, "getState", {"n": 1})
            assert (status, body) == (200, {"method": "getState", "params": {"n": 1}})
            status, body = await cluster.rpc(node, device_id, "getState", {"n": 2}, v1=True)
            assert (status, body) == (200, {"method": "getState", "params": {"n": 2}})
            status, body = await cluster.rpc(node, device_id, "notifyLed", {"on": True}, kind="oneway")
            assert (status, body) == (200, None)
            await receipts_at_least(device, 3, 10, "the one-way command")
            assert device.receipts[-1].method == "notifyLed"

            # kill -9 and a restart on the same ports: the device follows (fail-over to the only port it has).
            await node.kill()
            await bounded(device.current.closed, 10, "the device to see the killed node go")
            await node.start()
            await bounded(device.when(lambda: device.connection_count >= 2), 30, "the device to reconnect")
            status, body = await cluster.rpc(node, device_id, "getState", {"n": 3})
            assert (status, body) == (200, {"method": "getState", "params": {"n": 3}})
            connections = [(c.number, c.port, c.accepted, c.close_reason) for c in device.connections]
            assert [r.connection for r in device.receipts] == [1, 1, 1, device.current.number], connections

            # persistent command, read back
            status, body = await cluster.rpc(node, device_id, "getState", {"n": 4}, persistent=True,
                                             timeout=PERSISTENT_TIMEOUT_MS)
            assert status == 200, body
            rows = await cluster.wait_device_rpcs_final(node, device_id, 1, 20)
            assert [r["status"] for r in rows] == ["SUCCESSFUL"], rows
            assert rows[0]["id"]["id"] == body["rpcId"]
            assert device.errors == []
        finally:
            await device.stop()
        assert await node.stop(), f"no clean stop on SIGTERM:\n{node.tail()}"


# --------------------------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_lightweight_rpc_reaches_a_device_on_another_node(tmp_path, cluster_database):
    async with running_cluster(tmp_path, cluster_database, size=3) as cluster:
        n1, n2, n3 = cluster.nodes
        device_id, token = await cluster.create_device("routed", via=n3)
        device = MqttDevice(token, [n1.mqtt_port], answer=answer_unless_notify)
        try:
            await device.connect()
            calls = [(n2, False), (n3, True), (n3, False), (n2, True), (n1, False)]
            for i, (via, v1) in enumerate(calls):
                params = {"i": i, "via": via.node_id, "v1": v1}
                status, body = await cluster.rpc(via, device_id, "getState", params, v1=v1, timeout=10000)
                assert (status, body) == (200, {"method": "getState", "params": params}), \
                    f"two-way {'v1' if v1 else 'v2'} at {via.node_id} for a device on node-1"

            for i, (via, v1) in enumerate([(n2, False), (n3, True)]):
                before = len(device.receipts)
                params = {"i": i, "via": via.node_id}
                status, body = await cluster.rpc(via, device_id, "notifyLed", params, kind="oneway", v1=v1,
                                                 timeout=10000)
                assert (status, body) == (200, None), \
                    f"one-way {'v1' if v1 else 'v2'} at {via.node_id} for a device on node-1"
                await receipts_at_least(device, before + 1, 10, f"the one-way command from {via.node_id}")
                assert (device.receipts[-1].method, device.receipts[-1].params) == ("notifyLed", params)

            assert len(device.receipts) == len(calls) + 2
            assert {(r.connection, r.port) for r in device.receipts} == {(1, n1.mqtt_port)}
            assert device.connected and device.errors == []
        finally:
            await device.stop()


# --------------------------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_persistent_rpcs_queued_on_one_node_delivered_on_another(tmp_path, cluster_database):
    count = 10
    async with running_cluster(tmp_path, cluster_database, size=3) as cluster:
        n1, n2, n3 = cluster.nodes
        device_id, token = await cluster.create_device("offline", via=n1)
        rpc_ids = []
        for seq in range(count):
            kind = "oneway" if seq % 3 == 2 else "twoway"
            method = "notifyConfig" if kind == "oneway" else "readSensor"
            status, body = await cluster.rpc(n3, device_id, method, {"seq": seq}, kind=kind, persistent=True,
                                             timeout=PERSISTENT_TIMEOUT_MS)
            assert status == 200, (seq, body)
            rpc_ids.append(body["rpcId"])
        queued = await cluster.persistent_rpcs(n1, rpc_ids)
        assert [r["status"] for r in queued] == ["QUEUED"] * count, [r["status"] for r in queued]

        device = MqttDevice(token, [n2.mqtt_port],
                            answer=lambda r: NO_ANSWER if r.method == "notifyConfig" else {"seq": r.params["seq"]})
        try:
            await device.connect()
            await bounded(device.when(lambda: len(device.distinct()) >= count), 30,
                          "the queued commands to reach the device on node-2")
            rows = await bounded(_all_final(cluster, n3, rpc_ids), 30, "every command to end")
            assert [r["status"] for r in rows] == ["SUCCESSFUL"] * count, [(r["status"], r["response"]) for r in rows]
            for seq, row in enumerate(rows):
                if seq % 3 != 2:
                    assert row["response"] == {"seq": seq}, row
            first = {}
            for r in device.receipts:
                first.setdefault(r.request_id, r)
            assert [r.params["seq"] for r in first.values()] == list(range(count)), "delivered out of order"
            assert list(first) == sorted(first), "request ids not increasing"
            assert {r.port for r in device.receipts} == {n2.mqtt_port}
            assert device.errors == []
        finally:
            await device.stop()


async def _all_final(cluster: Cluster, via: Any, rpc_ids: list[str]) -> list[dict[str, Any]]:
    async def final() -> list[dict[str, Any]] | None:
        rows = await cluster.persistent_rpcs(via, rpc_ids)
        return rows if all(r["status"] in {"SUCCESSFUL", "FAILED", "EXPIRED"} for r in rows) else None

    return await wait_until(final, 60, "persistent RPCs to end", interval=0.25)


# --------------------------------------------------------------------------------------------------------------

SEQUENCE = 500
KILL_AFTER_ANSWERS = 100


def retries_of(seq: int) -> int | None:
    """Every fifth command is sent with ``"retries": 1``; the others with the server's default."""
    return 1 if seq % 5 == 0 else None


@pytest_twisted.ensureDeferred
async def test_kill_9_of_the_devices_node_during_sequential_delivery(tmp_path, cluster_database):
    options = ["--rpc-strategy", "SEQUENTIAL_ON_RESPONSE_FROM_DEVICE"]
    async with running_cluster(tmp_path, cluster_database, size=3, options=options) as cluster:
        n1, n2, n3 = cluster.nodes
        device_id, token = await cluster.create_device("sequence", via=n2)
        # On a lost connection the device goes to the next port: node-3 (commands are submitted at node-2).
        device = MqttDevice(token, [n1.mqtt_port, n3.mqtt_port, n2.mqtt_port], failover=True,
                            answer=lambda r: {"seq": r.params["seq"]})
        try:
            await device.connect()
            answers_at_kill: list[int] = []

            def kill_node_1(_: Any) -> Any:
                answers_at_kill.append(device.answered)
                return defer.ensureDeferred(n1.kill()) if n1.running else None

            kill = device.when(lambda: device.answered >= KILL_AFTER_ANSWERS).addCallback(kill_node_1)

            # Submitted one at a time (submission order is delivery order) at node-2, while the device is on node-1;
            # node-1 is killed as soon as the device answered KILL_AFTER_ANSWERS, wherever the submission is then.
            rpc_ids: list[str] = []

            async def submit() -> None:
                for seq in range(SEQUENCE):
                    extra = {} if retries_of(seq) is None else {"retries": retries_of(seq)}
                    status, body = await cluster.rpc(n2, device_id, "step", {"seq": seq}, persistent=True,
                                                     timeout=PERSISTENT_TIMEOUT_MS, **extra)
                    assert status == 200, (seq, status, body)
                    rpc_ids.append(body["rpcId"])

            await bounded(submit(), 120, "submitting the commands at node-2")
            await bounded(kill, 60, f"the device to answer {KILL_AFTER_ANSWERS} commands, then node-1's kill")
            assert answers_at_kill[0] < SEQUENCE, "every command was answered before the kill: nothing tested"
            await bounded(device.when(lambda: device.connection_count >= 2), 30,
                          "the device to reconnect to a surviving node")
            assert device.current.port in (n2.mqtt_port, n3.mqtt_port), device.current

            await bounded(device.when(lambda: len(device.distinct()) >= SEQUENCE), 90,
                          f"every command to reach the device ({len(device.distinct())} so far)")
            await cluster.wait_device_rpcs_final(n2, device_id, SEQUENCE, 60)
            rows = await cluster.persistent_rpcs(n2, rpc_ids)
            statuses = [(seq, r["status"]) for seq, r in enumerate(rows) if r["status"] != "SUCCESSFUL"]
            assert statuses == [], f"commands that did not end SUCCESSFUL: {statuses[:20]}"
            wrong = [(seq, r["response"]) for seq, r in enumerate(rows) if r["response"] != {"seq": seq}]
            assert wrong == [], wrong[:20]

            # What the device saw: the first receipt of each command in submission order, with increasing request
            # ids; a command received again only on a later connection (after the kill), and at most twice.
            first: dict[int, Receipt] = {}
            received: dict[int, list[Receipt]] = {}
            for r in device.receipts:
                first.setdefault(r.request_id, r)
                received.setdefault(r.params["seq"], []).append(r)
            assert [r.params["seq"] for r in first.values()] == list(range(SEQUENCE)), "not in submission order"
            assert list(first) == sorted(first), "request ids not increasing"
            ids_of = {seq: {r.request_id for r in rs} for seq, rs in received.items()}
            assert {seq: ids for seq, ids in ids_of.items() if len(ids) > 1} == {}, "a command under two ids"
            counts = {seq: len(rs) for seq, rs in received.items()}
            assert {seq: n for seq, n in counts.items() if n > 2} == {}, "a command received more than twice"
            once_retried = {seq: n for seq, n in counts.items() if retries_of(seq) == 1 and n > 2}
            assert once_retried == {}, "a command sent with retries 1 received more than twice"
            same_connection = [seq for seq, rs in received.items()
                               if len({r.connection for r in rs}) < len(rs)]
            assert same_connection == [], f"received twice on one connection: {same_connection}"
            ats = [r.at for r in device.receipts]
            gaps = sorted(((round(ats[i] - ats[i - 1], 2), device.receipts[i].params["seq"])
                           for i in range(1, len(ats))), reverse=True)[:3]
            print(f"\n[cluster kill -9] answers at the kill {answers_at_kill[0]}, receipts {len(device.receipts)} in "
                  f"{ats[-1] - ats[0]:.1f} s (longest gaps, s before seq: {gaps}), received twice "
                  f"{sorted(seq for seq, n in counts.items() if n == 2)}, connections "
                  f"{[(c.number, c.port, c.close_reason) for c in device.connections]}")
            assert device.errors == []
        finally:
            await device.stop()


# --------------------------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_call_for_a_device_of_a_dead_node_fails_fast(tmp_path, cluster_database):
    async with running_cluster(tmp_path, cluster_database, size=3) as cluster:
        n1, n2, n3 = cluster.nodes
        device_id, token = await cluster.create_device("orphan")
        device = MqttDevice(token, [n1.mqtt_port])  # no fail-over: it stays offline
        try:
            await device.connect()
            status, body = await cluster.rpc(n2, device_id, "ping", {})
            assert (status, body) == (200, {"method": "ping", "params": {}}), "routing before the kill"
            await n1.kill()
            await cluster.wait_not_alive("node-1", via=[n2, n3])

            began = reactor.seconds()
            status, body = await cluster.rpc(n2, device_id, "ping", {}, timeout=10000)
            elapsed = reactor.seconds() - began
            assert status == 504 and isinstance(body, dict) and body.get("rpcError") == "DEVICE_OFFLINE", \
                (status, body)
            assert elapsed < 5.0, f"v2 call for a device of a dead node took {elapsed:.1f} s"

            began = reactor.seconds()
            status, body = await cluster.rpc(n3, device_id, "ping", {}, v1=True, timeout=10000)
            elapsed = reactor.seconds() - began
            assert status == 409 and isinstance(body, dict) and body.get("rpcError") == "DEVICE_OFFLINE", \
                (status, body)
            assert elapsed < 5.0, f"v1 call for a device of a dead node took {elapsed:.1f} s"
        finally:
            await device.stop()


# --------------------------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_session_taken_over_across_nodes(tmp_path, cluster_database):
    async with running_cluster(tmp_path, cluster_database, size=3) as cluster:
        n1, n2, n3 = cluster.nodes
        device_id, token = await cluster.create_device("takeover")
        first = MqttDevice(token, [n1.mqtt_port], answer=lambda r: {"client": "first"}, name="first")
        second = MqttDevice(token, [n2.mqtt_port], answer=lambda r: {"client": "second"}, name="second")
        try:
            await first.connect()
            status, body = await cluster.rpc(n3, device_id, "whoIsThere", {})
            assert (status, body) == (200, {"client": "first"}), "routing to the first session"
            await second.connect()
            await bounded(first.current.closed, 10, "node-1 to close the first session once the device "
                                                    "connected to node-2")
            status, body = await cluster.rpc(n3, device_id, "whoIsThere", {})
            assert (status, body) == (200, {"client": "second"})
            assert len(first.receipts) == 1 and len(second.receipts) == 1
            assert second.connected and not first.connected
            assert first.errors == [] and second.errors == []
        finally:
            await stop_devices([first, second])


# --------------------------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_100_kb_command_routed(tmp_path, cluster_database):
    blob = "x" * 100_000
    async with running_cluster(tmp_path, cluster_database, size=3) as cluster:
        n1, n2, n3 = cluster.nodes
        device_id, token = await cluster.create_device("big")
        device = MqttDevice(token, [n1.mqtt_port], answer=lambda r: {"len": len(r.params["blob"])})
        try:
            await device.connect()
            status, body = await cluster.rpc(n2, device_id, "bigCommand", {"blob": blob}, timeout=10000)
            assert (status, body) == (200, {"len": 100_000})
            assert device.receipts[-1].params == {"blob": blob}

            status, body = await cluster.rpc(n3, device_id, "bigCommand", {"blob": blob}, persistent=True,
                                             timeout=PERSISTENT_TIMEOUT_MS)
            assert status == 200, body
            rows = await bounded(_all_final(cluster, n3, [body["rpcId"]]), 30, "the persistent 100 KB command")
            assert (rows[0]["status"], rows[0]["response"]) == ("SUCCESSFUL", {"len": 100_000})
            assert len(device.receipts) == 2 and device.errors == []
        finally:
            await device.stop()


# --------------------------------------------------------------------------------------------------------------

SHARED_PORT_DEVICES = 40


@pytest_twisted.ensureDeferred
async def test_two_nodes_share_their_ports_with_reuse_port(tmp_path, cluster_database):
    async with running_cluster(tmp_path, cluster_database, size=2, shared_ports=True,
                               options=["--reuse-port"]) as cluster:
        n1, n2 = cluster.nodes
        assert (n1.http_port, n1.mqtt_port, n1.coap_port) == (n2.http_port, n2.mqtt_port, n2.coap_port)
        assert n1.running and n2.running
        created = []
        for _ in range(SHARED_PORT_DEVICES):
            created.append(await cluster.create_device("shared"))
        devices = [MqttDevice(token, [n1.mqtt_port]) for _, token in created]
        # Fresh HTTP connections for every call, so that the kernel spreads them over both nodes too.
        spread = HTTPConnectionPool(reactor, persistent=False)
        try:
            limiter = defer.DeferredSemaphore(10)
            await bounded(defer.gatherResults(
                [limiter.run(lambda d=d: defer.ensureDeferred(d.connect())) for d in devices], consumeErrors=True),
                60, f"{SHARED_PORT_DEVICES} devices to connect to the shared MQTT port")

            listed = await cluster.wait_membership(
                lambda nodes: all(nodes.get(i, {}).get("alive") and nodes[i].get("connectedDevices", 0) > 0
                                  for i in ("node-1", "node-2"))
                and sum(nodes[i]["connectedDevices"] for i in ("node-1", "node-2")) == SHARED_PORT_DEVICES,
                n1, f"both nodes to hold some of the {SHARED_PORT_DEVICES} devices")
            held = {i: listed[i]["connectedDevices"] for i in ("node-1", "node-2")}

            async def call(k: int) -> tuple[int, Any]:
                return await cluster.rpc(n1, created[k][0], "where", {"k": k}, timeout=10000, pool=spread)

            results = await bounded(defer.gatherResults(
                [limiter.run(lambda k=k: defer.ensureDeferred(call(k))) for k in range(SHARED_PORT_DEVICES)],
                consumeErrors=True), 60, "a call to every device through the shared HTTP port")
            wrong = [(k, r) for k, r in enumerate(results) if r != (200, {"method": "where", "params": {"k": k}})]
            assert wrong == [], wrong[:5]
            print(f"\n[reuse-port] devices per node {held}")
        finally:
            await stop_devices(devices)
            await spread.closeCachedConnections()


# --------------------------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cluster_nodes_lists_members_and_drops_a_stopped_one(tmp_path, cluster_database):
    async with running_cluster(tmp_path, cluster_database, size=3) as cluster:
        n1, n2, n3 = cluster.nodes
        ids = {"node-1", "node-2", "node-3"}
        for via, who in [(n1, "sysadmin"), (n2, "tenant"), (n3, "tenant")]:
            listed = await cluster.cluster_nodes(via, who)
            by_id = {n["nodeId"]: n for n in listed}
            assert set(by_id) == ids, listed
            now_ms = reactor.seconds() * 1000
            for node_id, n in by_id.items():
                assert n["alive"] is True, n
                assert isinstance(n["address"], str) and re.fullmatch(r"[^\s]+:\d+", n["address"]), n
                assert isinstance(n["connectedDevices"], int) and n["connectedDevices"] >= 0, n
                assert isinstance(n["startedTime"], int) and isinstance(n["lastHeartbeat"], int), n
                assert n["startedTime"] <= n["lastHeartbeat"] <= now_ms + 5000, n
                assert now_ms - n["lastHeartbeat"] < (DEAD_AFTER + 5) * 1000, n
        status, body = await n1.call("GET", "/api/cluster/nodes", jwt="")
        assert status == 401, (status, body)

        # Heartbeats go on.
        before = {n["nodeId"]: n["lastHeartbeat"] for n in await cluster.cluster_nodes(n1)}
        await cluster.wait_membership(
            lambda nodes: all(nodes.get(i, {}).get("lastHeartbeat", 0) > before[i] for i in ids), n1,
            "every node's heartbeat to advance", timeout=10)

        assert await n3.stop(), f"node-3: no clean stop on SIGTERM:\n{n3.tail()}"
        # A clean stop leaves the cluster at once (it does not wait to be declared dead).
        listed = {n["nodeId"]: n for n in await cluster.cluster_nodes(n2)}
        assert "node-3" not in listed, listed
        assert listed["node-1"]["alive"] and listed["node-2"]["alive"], listed
