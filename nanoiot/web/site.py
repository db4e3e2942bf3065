"""The twisted.web resource tree: ``/api/v1/...`` is the HTTP device API, the rest of ``/api`` a JSON router;
everything else is a JSON 404."""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from nanoiot.transports.http.device_api import DeviceApiResource
from nanoiot.web.auth import AuthApi
from nanoiot.web.bulk import BulkApi
from nanoiot.web.cluster import ClusterApi
from nanoiot.web.context import WebContext
from nanoiot.web.devices import DeviceApi
from nanoiot.web.routing import JsonApi, Router
from nanoiot.web.relations import RelationApi
from nanoiot.web.rpc import RpcApi
from nanoiot.web.rule_chains import RuleChainApi
from nanoiot.web.ws import websocket_resource


def build_router(context: WebContext) -> Router:
    router = Router()
    for api in (AuthApi(context), DeviceApi(context), BulkApi(context), RpcApi(context), ClusterApi(context)):
        api.register(router)
    RuleChainApi(context).register(router)
    RelationApi(context).register(router)
    return router


class QuietSite(Site):
    """Access logs cost a line per request: off unless asked for (``--log-level debug``)."""

    noisy = False

    def __init__(self, resource: Resource, access_log: bool = False, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.access_log = access_log

    def log(self, request: Request) -> None:
        if self.access_log:
            super().log(request)


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
    )


def build_site(context: WebContext, hub: Any = None) -> Site:
    """``hub``: the server's WebSocket event hub (``web/event_hub.py``); with it, ``/api/ws/rpc`` is served."""
    api = JsonApi(build_router(context), context.tokens, context.clock, context.config.max_payload_size)
    root = Resource()
    api_root = ApiRoot(api, build_device_api(context))
    if hub is not None:
        # A putChild child is found before ApiRoot.getChild is asked.
        api_root.putChild(b"ws", websocket_resource(hub, context.commands, context.catalog, context.tokens,
                                                    context.config, context.clock))
    root.putChild(b"api", api_root)
    root.putChild(b"", api)  # "/" answers with the API's JSON 404 instead of an HTML page
    # The JSON API never reads form fields: skip Twisted's per-POST Content-Type parsing (16 % of a REST RPC's CPU).
    return QuietSite(root, access_log=context.config.log_level == "debug", parsePOSTFormSubmission=False)
