"""``GET /metrics``: the server's Prometheus registry in the text exposition format (or OpenMetrics when the scraper
asks for it), optionally behind a bearer token (``--metrics-token``).

Rendered on the reactor thread, not by prometheus-client's own ``MetricsResource`` (a WSGI app on a thread pool):
the gauges read actor and journal state, which only the reactor thread may touch.

Kubernetes and most Prometheus set-ups scrape without credentials from inside the cluster network, so the default is
open; a server whose HTTP port faces the internet should set a token (Prometheus: ``authorization: {credentials:
...}`` in the scrape config) or run with ``--metrics off``.
"""

from __future__ import annotations

import hmac
import json
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from twisted.web.resource import Resource
from twisted.web.server import Request


class MetricsPage(Resource):
    """The registry's metrics; with a ``token``, only for ``Authorization: Bearer <token>`` (else 401, JSON)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry, token: str = "") -> None:
        super().__init__()
        self.registry = registry
        self.token = token.encode()

    def render_GET(self, request: Request) -> bytes:
        if self.token and not self._authorized(request):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm="metrics"')
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"status": 401, "message": "Authentication failed: a bearer token is required",
                               "errorCode": 10}).encode()
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        request.setHeader(b"content-type", content_type.encode())
        return encoder(self.registry)

    def _authorized(self, request: Request) -> bool:
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)


def metrics_resource(registry: CollectorRegistry, token: str = "") -> Resource:
    return MetricsPage(registry, token)
