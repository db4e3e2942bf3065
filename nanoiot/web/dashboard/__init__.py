"""NanoIoT's web dashboard: static files (plain ES modules, no build step) served by twisted.web.

``/`` is ``index.html``; ``/static/...`` its scripts and styles. The dashboard only calls the public REST API and the
WebSocket (``/api/ws/rpc``), so it needs nothing of the server but these files. Every answer carries a strict
Content-Security-Policy (scripts, styles and connections from this origin only) and ``Cache-Control: no-cache``:
the file names carry no version, so browsers revalidate (``Last-Modified``) instead of running stale code after an
upgrade.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from twisted.web import static
from twisted.web.resource import Resource
from twisted.web.server import Request

from nanoiot.errors import MethodNotAllowed

STATIC_DIR = Path(__file__).with_name("static")

#: Same-origin only. ``connect-src`` names this host's WebSocket URLs too: not every browser counts a ``ws:`` URL
#: to its own origin as ``'self'``.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src {connect}; "
    "manifest-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_HOST = re.compile(rb"([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")


def content_security_policy(host: bytes | None) -> bytes:
    """The policy for a page asked for with this ``Host`` header (none or a malformed one: ``'self'`` alone)."""
    connect = "'self'"
    if host and _HOST.fullmatch(host):
        name = host.decode("ascii")
        connect = f"'self' ws://{name} wss://{name}"
    return CONTENT_SECURITY_POLICY.format(connect=connect).encode()


SECURITY_HEADERS = {
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
    b"Cache-Control": b"no-cache",
}

#: Explicit types: a module script must be served as JavaScript, whatever the host's mime.types says.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}


class DashboardFile(static.File):
    """A static file (or the static directory) with the dashboard's headers; no directory listings, and a missing
    file answers with ``not_found`` (the API's JSON 404)."""

    contentTypes = CONTENT_TYPES
    #: The server's clock (``seconds()``), for the timestamp of an error body.
    clock: Any = None

    def createSimilarFile(self, path: str) -> static.File:
        similar = super().createSimilarFile(path)
        similar.clock = self.clock
        return similar

    def render(self, request: Request) -> Any:
        """GET and HEAD; any other method is a JSON 405 (as the API answers), not Twisted's HTML page."""
        if request.method in (b"GET", b"HEAD"):
            return super().render(request)
        error = MethodNotAllowed(f"Method {request.method.decode('latin-1')} is not allowed: the dashboard's files "
                                 "are read with GET")
        request.setResponseCode(error.http_status)
        request.setHeader(b"Allow", b"GET, HEAD")
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(error.to_json(int(self.clock.seconds() * 1000))).encode()

    def render_GET(self, request: Request) -> Any:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        request.setHeader(b"Content-Security-Policy", content_security_policy(request.getHeader(b"host")))
        if self.isdir():
            return self.childNotFound.render(request)
        return super().render_GET(request)

    render_HEAD = render_GET

    def directoryListing(self) -> Resource:
        return self.childNotFound


class SiteRoot(Resource):
    """The site's root: ``/`` the dashboard's index page, ``/static`` its files, the children put later (``/api``),
    and for any other path ``not_found`` (the API's JSON 404, never an HTML page)."""

    def __init__(self, not_found: Resource, clock: Any) -> None:
        super().__init__()
        self.not_found = not_found
        index = DashboardFile(str(STATIC_DIR / "index.html"))
        files = DashboardFile(str(STATIC_DIR))
        for resource in (index, files):
            resource.childNotFound = not_found
            resource.clock = clock
        files.indexNames = []
        self.putChild(b"", index)
        self.putChild(b"static", files)

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self.not_found
