"""Direct links between real cluster nodes (``nanoiot/cluster/direct.py``): two ``twistd nanoiot --cluster`` nodes
on one PostgreSQL database link up over loopback TCP after the later one announces itself on the NOTIFY bus, and
routed calls then travel over the link; a restarted node is dialled again; with ``--cluster-link-host ''`` every
call goes through NOTIFY as before.

Which way a call went is read from the nodes' logs: "direct link to/from node X up" when a link comes up, and the
count of envelopes sent over links and over the bus that each node logs when it stops.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import pytest_twisted

from tests.fixtures.cluster import Cluster, MqttDevice, echo, new_database, running_cluster
from tests.fixtures.processes import wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.cluster]

CALLS = 20


@pytest.fixture
def cluster_database(postgres_server: str) -> str:
    return new_database(postgres_server)


def link_lines(node: Any, direction: str, peer: str) -> int:
    return sum(1 for line in node.output() if f"direct link {direction} node {peer} up" in line)


def sent_counts(node: Any) -> tuple[int, int]:
    """(over links, over the bus) from the node's last stop."""
    found = [re.search(r"(\d+) envelopes sent over direct links, (\d+) over the bus", line) for line in node.output()]
    counts = [(int(m.group(1)), int(m.group(2))) for m in found if m]
    assert counts, f"{node.node_id} logged no counts:\n{node.tail()}"
    return counts[-1]


async def routed_calls(cluster: Cluster, via: Any, device_id: str, tag: str) -> None:
    for i in range(CALLS):
        params = {"i": i, "tag": tag}
        status, body = await cluster.rpc(via, device_id, "getState", params, timeout=10000)
        assert (status, body) == (200, {"method": "getState", "params": params})


@pytest_twisted.ensureDeferred
async def test_routed_calls_take_the_direct_link_and_a_restarted_node_is_dialled_again(tmp_path, cluster_database):
    async with running_cluster(tmp_path, cluster_database, size=2) as cluster:
        n1, n2 = cluster.nodes
        # node-2 started after node-1: node-1 heard its announcement and dialled it
        await wait_until(lambda: link_lines(n1, "to", "node-2") and link_lines(n2, "from", "node-1"), 20,
                         "the link between node-1 and node-2")
        device_id, token = await cluster.create_device("linked", via=n1)
        device = MqttDevice(token, [n2.mqtt_port], answer=echo)
        try:
            await device.connect()
            await routed_calls(cluster, n1, device_id, "first")  # node-1 -> node-2 -> device -> node-2 -> node-1

            await n1.stop()
            direct, _ = sent_counts(n1)
            assert direct >= CALLS, f"node-1 sent {direct} envelopes over its link for {CALLS} routed calls"

            await n1.start()  # announces itself again, with a new secret and port: node-2 dials it this time
            await wait_until(lambda: link_lines(n2, "to", "node-1"), 20, "node-2 dialling the restarted node-1")
            await routed_calls(cluster, n1, device_id, "after restart")
            assert len(device.receipts) == 2 * CALLS and device.errors == []
        finally:
            await device.stop()
        await cluster.stop()
        direct, _ = sent_counts(n2)
        assert direct >= 2 * CALLS, f"node-2 sent {direct} answers over its links for {2 * CALLS} routed calls"


@pytest_twisted.ensureDeferred
async def test_without_a_link_host_every_call_goes_through_notify(tmp_path, cluster_database):
    async with running_cluster(tmp_path, cluster_database, size=2, options=["--cluster-link-host", ""]) as cluster:
        n1, n2 = cluster.nodes
        device_id, token = await cluster.create_device("bus only", via=n1)
        device = MqttDevice(token, [n2.mqtt_port], answer=echo)
        try:
            await device.connect()
            await routed_calls(cluster, n1, device_id, "bus")
        finally:
            await device.stop()
    for node in (n1, n2):
        assert not any("direct link" in line for line in node.output()), node.tail()
