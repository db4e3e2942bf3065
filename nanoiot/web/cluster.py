"""``GET /api/cluster/nodes``: the nodes of a cluster as the database sees them (for operators and dashboards)."""

from __future__ import annotations

from typing import Any

from nanoiot.errors import NotFound
from nanoiot.persistence.records import Authority, NodeRecord
from nanoiot.web.access import require_authority
from nanoiot.web.context import WebContext
from nanoiot.web.routing import ApiRequest, Router


def node_json(node: NodeRecord) -> dict[str, Any]:
    return {
        "nodeId": node.node_id,
        "address": node.address,
        "startedTime": node.started_time,
        "lastHeartbeat": node.heartbeat_time,
        "connectedDevices": node.connected_devices or 0,
        "alive": node.alive,
    }


class ClusterApi:
    def __init__(self, context: WebContext) -> None:
        self.context = context

    def register(self, router: Router) -> None:
        router.add("GET", "/api/cluster/nodes", self.list_nodes)

    async def list_nodes(self, request: ApiRequest) -> list[dict[str, Any]]:
        require_authority(request.user, Authority.SYS_ADMIN, Authority.TENANT_ADMIN)
        if self.context.cluster is None:
            raise NotFound("This server is not part of a cluster (start it with --cluster)")
        return [node_json(node) for node in await self.context.cluster.nodes()]
