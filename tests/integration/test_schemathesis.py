"""Schemathesis drives the real server on loopback from its own ``/api/openapi.json``: for every documented
operation a few generated requests (as the demo tenant administrator), each answer checked — no 5xx, a documented
status, the documented content type, a body that conforms to the documented schema.

Random ids mostly find nothing (404), so half the examples of an operation that does not delete use the demo
entities' real ids instead: the documented 200 bodies are checked too, and a tally makes sure they were.

Schemathesis is synchronous (requests): it runs in a worker thread while the reactor serves; the examples per
operation are bounded (``EXAMPLES``) and shrinking is off, so the whole run takes seconds, not minutes.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
import requests
import schemathesis
import treq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)
from twisted.internet.threads import deferToThread

from tests.fixtures.server_context import server_running

#: Generated requests per operation (about 50 operations).
EXAMPLES = 8
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
#: ms a generated command may wait for its (absent) device: the server's default too, so that calls end quickly.
COMMAND_TIMEOUT = 200


def checks_for(operation: Any, status: int) -> list[Any]:
    """A 5xx the operation documents (readiness 503, a command's 504) is its contract, not a server error."""
    documented = str(status) in operation.definition.raw.get("responses", {})
    return [check for check in CHECKS if not (documented and check is not_a_server_error)]


def bounded_wait(body: Any) -> None:
    """A generated command must not wait minutes for a device that is not there: its timeout is capped and its
    expiration time dropped (the default applies)."""
    if isinstance(body, dict):
        if isinstance(body.get("timeout"), int):
            body["timeout"] = max(0, min(body["timeout"], COMMAND_TIMEOUT))
        body.pop("expirationTime", None)


def run_schemathesis(document: dict[str, Any], base_url: str, jwt: str, real_ids: dict[str, str],
                     statuses: dict[int, int]) -> list[str]:
    """Every operation of ``document`` against ``base_url``; returns one line per operation that failed a check.
    ``real_ids``: path parameter -> an id that exists; ``statuses`` counts the answers by status."""
    schema = schemathesis.openapi.from_dict(document)
    failures: list[str] = []
    headers = {"X-Authorization": f"Bearer {jwt}"}
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            # Deleting or disabling the demo entities (the caller itself among them) would end the run early.
            may_use_real_ids = operation.method.upper() != "DELETE" and "userCredentialsEnabled" not in operation.path

            @given(case=operation.as_strategy(), use_real_ids=st.booleans())
            @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def exercise(case: Any, use_real_ids: bool) -> None:
                if use_real_ids and may_use_real_ids and case.path_parameters:
                    case.path_parameters = {name: real_ids.get(name, value)
                                            for name, value in case.path_parameters.items()}
                bounded_wait(case.body)
                response = case.call(base_url=base_url, session=session, headers=headers, timeout=10)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                case.validate_response(response, checks=checks_for(operation, response.status_code))

            try:
                exercise()
            except Exception as exc:  # a failed check, with the request that caused it
                failures.append(f"{operation.label}: {str(exc).strip()[:2000]}")
    return failures


@pytest_twisted.ensureDeferred
async def test_every_documented_operation_answers_as_documented(tmp_path):
    async with server_running(tmp_path, rpc_default_timeout=COMMAND_TIMEOUT) as server:
        await check_every_operation(server)


async def check_every_operation(server: Any) -> None:
    response = await treq.get(f"{server.http_url}/api/openapi.json")
    assert response.code == 200
    document = await response.json()
    jwt = await server.jwt("tenant")
    device_id, _ = await server.demo_device()
    status, me = await server.call("GET", "/api/auth/user")
    assert status == 200
    real_ids = {"deviceId": device_id, "userId": me["id"]["id"], "tenantId": me["tenantId"]["id"],
                "customerId": await demo_customer_id(server), "kind": "oneway"}
    statuses: dict[int, int] = {}
    failures = await deferToThread(run_schemathesis, document, server.http_url, jwt, real_ids, statuses)
    assert failures == [], "\n\n".join(failures)
    assert statuses.get(200, 0) >= 50, statuses  # the documented successes were reached and checked, not only errors


async def demo_customer_id(server: Any) -> str:
    """The demo customer's id, as its customer user sees it."""
    status, me = await server.call("GET", "/api/auth/user", who="customer")
    assert status == 200
    return me["customerId"]["id"]
