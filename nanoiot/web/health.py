"""``GET /api/health``, ``/api/health/live`` and ``/api/health/ready``: probes for load balancers and Kubernetes.

The shape is Spring Boot's actuator health (what ThingsBoard serves at ``/actuator/health``): ``{"status": "UP"}``
with one entry per component under ``components``; 200 when UP, 503 with ``Retry-After`` when DOWN. No
authentication (probes carry none) and nothing internal in the body: no host names, no driver errors.

- ``live``: the process is up and its reactor turns (answering at all proves both). A failing liveness probe makes
  Kubernetes restart the pod, so the database is *not* part of it: a database outage must not restart every node.
- ``ready``: the database answers a round trip (``Repository.ping``), and in a cluster the node has joined and its
  NotifyBus is connected. A failing readiness probe only takes the node out of the load balancer.
- ``/api/health``: the readiness answer (the actuator's default group).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime

from nanoiot.web.context import WebContext
from nanoiot.web.routing import ApiRequest, Response, Router

UP, DOWN = "UP", "DOWN"
#: Seconds a database round trip may take before the database counts as DOWN (a probe must answer quickly).
PING_TIMEOUT = 3.0
#: Seconds a client is told to wait when DOWN (the repository's own hint when it has one).
DEFAULT_RETRY_AFTER = 5


class DatabaseCheck:
    """One database round trip at a time, shared by every probe that arrives meanwhile: an unauthenticated
    endpoint must not be a way to fill the database pool."""

    def __init__(self, repository: Any, clock: IReactorTime, timeout: float = PING_TIMEOUT) -> None:
        self.repository = repository
        self.clock = clock
        self.timeout = timeout
        self._waiting: list[Deferred] | None = None

    def check(self) -> Deferred:
        """Fires with True (the database answered) or False; never errbacks."""
        d: Deferred = Deferred()
        if self._waiting is not None:
            self._waiting.append(d)
            return d
        self._waiting = [d]
        ping = ensureDeferred(self._ping())
        ping.addTimeout(self.timeout, self.clock)
        ping.addCallbacks(lambda _: True, lambda _: False).addCallback(self._answer)
        return d

    async def _ping(self) -> None:
        ping = getattr(self.repository, "ping", None)
        if ping is not None:
            await ping()
        else:  # a repository without ping(): the same round trip through its query helper
            from sqlalchemy import text

            await self.repository._run(lambda conn: conn.execute(text("SELECT 1")).scalar(), attempts=1)

    def _answer(self, reachable: bool) -> None:
        waiting, self._waiting = self._waiting or [], None
        for d in waiting:
            d.callback(reachable)


class HealthApi:
    def __init__(self, context: WebContext) -> None:
        self.context = context
        self.database = DatabaseCheck(context.repository, context.clock)

    def register(self, router: Router) -> None:
        router.add("GET", "/api/health", self.ready, authenticated=False)
        router.add("GET", "/api/health/live", self.live, authenticated=False)
        router.add("GET", "/api/health/ready", self.ready, authenticated=False)

    def live(self, request: ApiRequest) -> dict[str, Any]:
        return {"status": UP, "components": {"livenessState": {"status": UP}}}

    async def ready(self, request: ApiRequest) -> Response:
        components: dict[str, Any] = {"livenessState": {"status": UP}}
        repository = self.context.repository
        # Known to be down (the repository saw a query fail and probes by itself): no round trip needed.
        known_down = getattr(repository, "healthy", True) is False
        reachable = False if known_down else await self.database.check()
        components["db"] = {"status": UP if reachable else DOWN}
        cluster = self.context.cluster
        if cluster is not None:
            components["cluster"] = cluster_health(cluster)
        status = UP if all(c["status"] == UP for c in components.values()) else DOWN
        body = {"status": status, "components": components}
        if status == UP:
            return Response(body=body)
        retry_after = getattr(repository, "retry_after", None) or DEFAULT_RETRY_AFTER
        request.request.setHeader(b"retry-after", b"%d" % max(1, round(retry_after)))
        return Response(status=503, body=body)


def cluster_health(cluster: Any) -> dict[str, Any]:
    """This node's view of the cluster: joined (registered, heartbeating) and its NotifyBus connected."""
    joined = bool(getattr(cluster, "joined", getattr(cluster, "_joined", False)))
    bus = getattr(cluster, "bus", None)
    connected = bool(getattr(bus, "connected", False))
    return {"status": UP if joined and connected else DOWN,
            "details": {"joined": joined, "notifyBus": UP if connected else DOWN}}
