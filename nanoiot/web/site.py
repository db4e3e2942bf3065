"""The twisted.web resource tree: ``/api/v1/...`` is the HTTP device API, the rest of ``/api`` a JSON router; ``/``
and ``/static`` the web dashboard (``web/dashboard``)."""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from nanoiot.limits import Counter
from nanoiot.transports.http.device_api import DeviceApiResource
from nanoiot.web.active_users import guard_routes
from nanoiot.web.auth import AuthApi
from nanoiot.web.bulk import BulkApi
from nanoiot.web.cluster import ClusterApi
from nanoiot.web.context import WebContext
from nanoiot.web.dashboard import SiteRoot
from nanoiot.web.http_limits import HttpLimits, LimitedChannel, LimitedRequest, Refused
from nanoiot.web.rate_limits import RestRateLimits
from nanoiot.web.devices import DeviceApi
from nanoiot.web.health import HealthApi
from nanoiot.web.openapi import OpenApiDocument
from nanoiot.web.log_masking import masked_log_formatter
from nanoiot.web.routing import JsonApi, Router
from nanoiot.web.relations import RelationApi
from nanoiot.web.rpc import RpcApi
from nanoiot.web.rule_chains import RuleChainApi
from nanoiot.web.tenants import TenantApi
from nanoiot.web.users import UserApi
from nanoiot.web.ws import websocket_resource


def build_router(context: WebContext) -> Router:
    router = Router()
    for api in (AuthApi(context), DeviceApi(context), BulkApi(context), RpcApi(context), ClusterApi(context)):
        api.register(router)
    RuleChainApi(context).register(router)
    RelationApi(context).register(router)
    HealthApi(context).register(router)
    OpenApiDocument().register(router)
    TenantApi(context).register(router)
    UserApi(context).register(router)
    if context.tokens.users is not None:  # a deleted or disabled user's tokens stop working at once
        guard_routes(router, context.tokens.users)
    return router


class QuietSite(Site):
    """Access logs cost a line per request: off unless asked for (``--log-level debug``). Connections are
    :class:`LimitedChannel`: bodies refused by their length, header and body deadlines, connections per address."""

    noisy = False
    protocol = LimitedChannel  # HTTP/1.1 only (twisted.web's HTTP/2 needs the h2 package, not installed)
    requestFactory = LimitedRequest
    limits: HttpLimits | None = None
    connections: Counter[str] | None = None
    json_api: JsonApi | None = None
    websockets: Any = None

    def __init__(self, resource: Resource, access_log: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("logFormatter", masked_log_formatter)  # no device token or JWT in the access log
        super().__init__(resource, **kwargs)
        self.access_log = access_log

    def log(self, request: Request) -> None:
        if self.access_log:
            super().log(request)

    def set_limits(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.connections = Counter(limits.max_per_address) if limits.max_per_address else None

    def buildProtocol(self, addr: Any) -> Any:
        """A channel, or :class:`Refused` (cut at once) when its address has --http-max-connections-per-address."""
        address = getattr(addr, "host", None)
        connections = self.connections
        if connections is not None and address is not None and not connections.acquire(address):
            return Refused()
        channel = super().buildProtocol(addr)
        channel.limits = self.limits if self.limits is not None else HttpLimits(self.reactor)
        channel.address, channel.connections = address, connections
        return channel


class ApiRoot(Resource):
    """``/api``: ``v1`` (ThingsBoard's device API, token in the path) goes to the device API, the rest to the JSON
    router, which routes on the whole path as before."""

    def __init__(self, json_api: JsonApi, device_api: Resource) -> None:
        super().__init__()
        self.json_api = json_api
        self.device_api = device_api

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self.device_api if path == b"v1" else self.json_api

    def render(self, request: Request) -> Any:
        return self.json_api.render(request)


def build_device_api(context: WebContext) -> DeviceApiResource:
    return DeviceApiResource(
        authenticate=context.catalog.device_for_token,
        attach=context.directory.attach,
        clock=context.clock,
        max_poll_ms=context.config.http_max_poll_timeout,
        default_poll_ms=context.config.http_poll_timeout,
        max_payload=context.config.http_max_payload_size,
        rate_limit=context.config.http_device_rate_limit,
        max_open_per_device=context.config.http_max_requests_per_device,
    )


def build_site(context: WebContext, hub: Any = None, metrics: Resource | None = None) -> Site:
    """``hub``: the server's WebSocket event hub (``web/event_hub.py``); with it, ``/api/ws/rpc`` is served.
    ``metrics``: the Prometheus resource (``web/metrics.py``), served at ``/metrics``."""
    api = JsonApi(build_router(context), context.tokens, context.clock, context.config.max_payload_size)
    api.rate_limits = RestRateLimits.from_config(context.config, context.clock)
    # "/" is the web dashboard (index.html), "/static" its files; any other path outside /api the API's JSON 404.
    root = SiteRoot(api, context.clock)
    api_root = ApiRoot(api, build_device_api(context))
    ws_root = None
    if hub is not None:
        # A putChild child is found before ApiRoot.getChild is asked.
        ws_root = websocket_resource(hub, context.commands, context.catalog, context.tokens, context.config,
                                     context.clock)
        api_root.putChild(b"ws", ws_root)
        ws_root.factory.rate_limits = api.rate_limits
    root.putChild(b"api", api_root)
    if metrics is not None:
        root.putChild(b"metrics", metrics)
    # The JSON API never reads form fields: skip Twisted's per-POST Content-Type parsing (16 % of a REST RPC's CPU).
    site = QuietSite(root, access_log=context.config.log_level == "debug", parsePOSTFormSubmission=False,
                     timeout=context.config.http_idle_timeout)
    site.set_limits(HttpLimits.from_config(context.config, context.clock))
    # What a graceful shutdown needs to reach: REST callers still waiting, open WebSockets.
    site.json_api = api
    site.websockets = ws_root.factory if ws_root is not None else None
    return site
