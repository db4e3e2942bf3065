"""The dashboard's resources in memory, through the real site tree (StubTreq): ``/`` is index.html, files under
``/static`` have the right content types, every answer carries the Content-Security-Policy and no-cache, a path that
names no file is the API's JSON 404, and the files are declared as package data (an installed nanoiot serves them)."""

from __future__ import annotations

import configparser
import fnmatch
import re
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet import task
from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest
from twisted.python.failure import Failure

from nanoiot.config import Config
from nanoiot.web.context import WebContext
from nanoiot.web.dashboard import STATIC_DIR, content_security_policy
from nanoiot.web.site import build_site
from nanoiot.web.tokens import TokenIssuer
from tests.fixtures.untouched import Untouched

REPO = Path(__file__).resolve().parents[2]




@pytest.fixture
def site() -> Any:
    clock = task.Clock()
    context = WebContext(config=Config(), clock=clock, repository=Untouched("repository"),  # type: ignore[arg-type]
                         catalog=Untouched("catalog"), directory=Untouched("directory"),  # type: ignore[arg-type]
                         tokens=TokenIssuer(b"unit-test-signing-key-" * 3, 9000, 604800, clock),
                         commands=Untouched("commands"))  # type: ignore[arg-type]
    return build_site(context)


@pytest.fixture
def client(site: Any) -> StubTreq:
    return StubTreq(site.resource)


def get(client: StubTreq, path: str) -> tuple[Any, bytes]:
    """One GET through the in-memory site (JSON answers): (response, body)."""
    answers: list[Any] = []
    d = client.get(f"http://nanoiot.test{path}")
    d.addCallback(lambda response: client.content(response).addCallback(lambda body: (response, body)))
    d.addBoth(answers.append)
    client.flush()
    assert len(answers) == 1, f"GET {path}: no answer"
    if isinstance(answers[0], Failure):
        answers[0].raiseException()
    return answers[0]


POLICY = content_security_policy(b"nanoiot.test:8080").decode()


def get_file(root: Any, path: str) -> tuple[DummyRequest, bytes]:
    """One GET of a file through the real resource tree with a DummyRequest (it drives static.File's producer,
    which StubTreq's memory transport does not)."""
    request = DummyRequest([segment.encode() for segment in path.removeprefix("/").split("/")])
    request.path = path.encode()
    request.requestHeaders.setRawHeaders(b"host", [b"nanoiot.test:8080"])
    resource = getChildForRequest(root, request)
    result = resource.render(request)
    if result is not NOT_DONE_YET:
        request.write(result)
        request.finish()
    assert request.finished, f"GET {path}: not finished"
    return request, b"".join(request.written)


def header(response: Any, name: str) -> str | None:
    headers = response.responseHeaders if isinstance(response, DummyRequest) else response.headers
    values = headers.getRawHeaders(name)
    return values[0] if values else None


def test_the_root_is_the_dashboards_index_page(site: Any) -> None:
    response, body = get_file(site.resource, "/")
    assert response.responseCode in (None, 200)
    assert header(response, "Content-Type") == "text/html; charset=utf-8"
    assert body == (STATIC_DIR / "index.html").read_bytes()
    assert b'<script type="module" src="/static/app.js">' in body
    assert header(response, "Content-Security-Policy") == POLICY
    assert header(response, "Cache-Control") == "no-cache"
    assert header(response, "X-Content-Type-Options") == "nosniff"


@pytest.mark.parametrize("path, content_type", [
    ("/static/app.js", "text/javascript; charset=utf-8"),
    ("/static/pages/device.js", "text/javascript; charset=utf-8"),
    ("/static/style.css", "text/css; charset=utf-8"),
    ("/static/favicon.svg", "image/svg+xml"),
])
def test_static_files_have_their_content_type_and_the_policy(site: Any, path: str, content_type: str) -> None:
    response, body = get_file(site.resource, path)
    assert response.responseCode in (None, 200)
    assert header(response, "Content-Type") == content_type
    assert body == (STATIC_DIR / path.removeprefix("/static/")).read_bytes()
    assert header(response, "Content-Security-Policy") == POLICY


@pytest.mark.parametrize("path", ["/static/missing.js", "/static/", "/static", "/static/pages/", "/index.html/x",
                                  "/unknown", "/static/%2e%2e/__init__.py"])
def test_a_path_naming_no_file_is_the_apis_json_404_and_no_listing(client: StubTreq, path: str) -> None:
    response, body = get(client, path)
    assert response.code == 404
    assert header(response, "Content-Type").startswith("application/json")
    assert b'"status":404' in body.replace(b" ", b"")


def test_another_method_than_get_is_a_json_405(client: StubTreq) -> None:
    answers: list[Any] = []
    d = client.post("http://nanoiot.test/static/app.js", data=b"{}")
    d.addCallback(lambda response: client.json_content(response).addCallback(lambda body: (response, body)))
    d.addBoth(answers.append)
    client.flush()
    response, body = answers[0]
    assert response.code == 405
    assert header(response, "Allow") == "GET, HEAD"
    assert body["status"] == 405 and "POST" in body["message"]


def test_the_api_is_still_the_api(client: StubTreq) -> None:
    response, body = get(client, "/api/auth/user")
    assert response.code == 401
    assert header(response, "Content-Type").startswith("application/json")


def test_the_policy_allows_this_origin_only_and_no_inline_code() -> None:
    directives = dict(part.strip().split(" ", 1) for part in POLICY.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self' ws://nanoiot.test:8080 wss://nanoiot.test:8080"
    assert directives["frame-ancestors"] == "'none'"
    for host in (None, b"", b"evil; script-src *", b"a b", b"host\n", b"[::1]x"):
        assert "connect-src 'self';" in content_security_policy(host).decode(), host
    assert "ws://[::1]:8080 " in content_security_policy(b"[::1]:8080").decode()
    # Nothing in the page needs more: no inline scripts, handlers or styles, no other origin.
    for path in STATIC_DIR.rglob("*"):
        if path.suffix in (".html", ".js"):
            text = path.read_text()
            assert not re.search(r"<script(?![^>]*\bsrc=)", text), path
            assert not re.search(r"\son[a-z]+=\"", text), path
            assert "style=" not in text and "innerHTML" not in text, path
            assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), path


def test_every_static_file_is_package_data() -> None:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    patterns = [p.strip() for p in config["options.package_data"]["nanoiot.web.dashboard"].split(",")]
    files = [p.relative_to(STATIC_DIR.parent).as_posix() for p in STATIC_DIR.rglob("*") if p.is_file()]
    assert files
    unpackaged = [f for f in files if not any(fnmatch.fnmatch(f, p) and f.count("/") == p.count("/") for p in patterns)]
    assert unpackaged == []


def test_every_module_import_names_a_file_that_exists() -> None:
    for path in STATIC_DIR.rglob("*.js"):
        for target in re.findall(r'^import .* from "(\.[^"]+)";$', path.read_text(), re.MULTILINE):
            assert (path.parent / target).resolve().is_file(), (path, target)
