"""A user deleted on one node of a cluster is refused on the others at once: the user API's "user-changed" notice
makes every node forget what it cached about that user (two ``twistd nanoiot --cluster`` nodes on one PostgreSQL
database, the harness of tests/fixtures/cluster.py)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import pytest
import pytest_twisted

from tests.fixtures.cluster import new_database, running_cluster
from tests.fixtures.processes import wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.cluster]


@pytest.fixture
def cluster_database(postgres_server: str) -> str:
    return new_database(postgres_server)


@pytest_twisted.ensureDeferred
async def test_a_user_deleted_on_node_1_is_refused_on_node_2(tmp_path, cluster_database):
    async with running_cluster(tmp_path, cluster_database, size=2) as cluster:
        n1, n2 = cluster[0], cluster[1]
        admin = await cluster.login("tenant")
        status, user = await n1.call("POST", "/api/user", {"email": "roaming@nanoiot.io",
                                                           "authority": "TENANT_ADMIN"}, jwt=admin)
        assert status == 200, user
        status, link = await n1.call("GET", f"/api/user/{user['id']['id']}/activationLink", jwt=admin)
        token = parse_qs(urlparse(link).query)["activateToken"][0]
        status, pair = await n1.call("POST", "/api/noauth/activate", {"activateToken": token,
                                                                      "password": "roaming-pw"}, jwt="")
        assert status == 200, pair
        assert (await n2.call("GET", "/api/auth/user", jwt=pair["token"]))[0] == 200  # node 2 caches the user

        assert (await n1.call("DELETE", f"/api/user/{user['id']['id']}", jwt=admin))[0] == 200

        async def refused_on_node_2() -> bool:
            return (await n2.call("GET", "/api/tenant/devices?pageSize=1&page=0", jwt=pair["token"]))[0] == 401

        await wait_until(refused_on_node_2, 10, "node 2 refusing the deleted user's token")
