"""The OpenAPI document against the real router: every route the server serves is documented, and nothing else is
(a new route without documentation fails here). Served unauthenticated at /api/openapi.json, in memory."""

from __future__ import annotations

import json
import re
from typing import Any

import schemathesis
from treq.testing import StubTreq
from twisted.internet import task

from nanoiot.config import Config
from nanoiot.web.context import WebContext
from nanoiot.web.openapi import build_document, documented_routes
from nanoiot.web.site import build_router, build_site
from nanoiot.web.tokens import TokenIssuer
from tests.fixtures.untouched import Untouched




def context() -> WebContext:
    clock = task.Clock()
    return WebContext(config=Config(), clock=clock, repository=Untouched("repository"),  # type: ignore[arg-type]
                      catalog=Untouched("catalog"), directory=Untouched("directory"),  # type: ignore[arg-type]
                      tokens=TokenIssuer(b"unit-test-signing-key-" * 3, 9000, 604800, clock),
                      commands=Untouched("commands"))  # type: ignore[arg-type]


def template_of(pattern: re.Pattern[str]) -> str:
    """The router's compiled pattern back to its template: ``^/api/device/(?P<deviceId>[^/]+)$`` ->
    ``/api/device/{deviceId}``."""
    return re.sub(r"\(\?P<(\w+)>\[\^/\]\+\)", r"{\1}", pattern.pattern).removeprefix("^").removesuffix("$")


def served_routes() -> set[tuple[str, str]]:
    return {(route.method.decode(), template_of(route.pattern)) for route in build_router(context()).routes}


def test_every_route_the_router_serves_is_documented_and_nothing_more():
    served, documented = served_routes(), documented_routes(build_document())
    assert served - documented == set(), "routes without documentation in nanoiot/web/openapi.py"
    assert documented - served == set(), "documented routes the server does not serve"


def test_the_router_templates_are_read_back_exactly():
    assert template_of(re.compile(r"^/api/customer/(?P<customerId>[^/]+)/device/(?P<deviceId>[^/]+)$")) == \
        "/api/customer/{customerId}/device/{deviceId}"


def test_every_path_parameter_is_declared_and_every_operation_has_an_error_response():
    document = build_document()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"\{(\w+)\}", path)), (method, path)
            assert operation["responses"]["default"]["content"]["application/json"]["schema"] == \
                {"$ref": "#/components/schemas/Error"}, (method, path)


def test_the_operations_without_security_are_exactly_the_routes_that_need_no_token():
    document = build_document()
    public = {(method.upper(), path) for path, item in document["paths"].items()
              for method, operation in item.items() if operation.get("security") == []}
    unauthenticated = {(route.method.decode(), template_of(route.pattern))
                       for route in build_router(context()).routes if not route.authenticated}
    assert public == unauthenticated
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "apiKey", "in": "header", "name": "X-Authorization",
        "description": "`Bearer <JWT>` (ThingsBoard's header; `Authorization` works too)"}


def test_the_document_is_valid_openapi_that_schemathesis_loads():
    schema = schemathesis.openapi.from_dict(build_document())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == len(documented_routes(build_document()))


def test_the_document_is_served_without_a_token():
    stub = StubTreq(build_site(context()).resource)
    response = stub.get("http://nanoiot.test/api/openapi.json")
    stub.flush()
    results: list[Any] = []
    response.addCallback(lambda r: stub.content(r).addCallback(lambda body: results.append((r, body))))
    stub.flush()
    [(answer, body)] = results
    assert answer.code == 200
    assert answer.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert json.loads(body) == build_document()
