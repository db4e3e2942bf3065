"""The twisted.web resource tree: ``/api`` is a JSON router; everything else is a JSON 404."""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from nanoiot.web.auth import AuthApi
from nanoiot.web.context import WebContext
from nanoiot.web.devices import DeviceApi
from nanoiot.web.routing import JsonApi, Router
from nanoiot.web.rpc import RpcApi


def build_router(context: WebContext) -> Router:
    router = Router()
    for api in (AuthApi(context), DeviceApi(context), RpcApi(context)):
        api.register(router)
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


def build_site(context: WebContext) -> Site:
    api = JsonApi(build_router(context), context.tokens, context.clock, context.config.max_payload_size)
    root = Resource()
    root.putChild(b"api", api)
    root.putChild(b"", api)  # "/" answers with the API's JSON 404 instead of an HTML page
    return QuietSite(root, access_log=context.config.log_level == "debug")
