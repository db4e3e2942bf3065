"""``/api/health``, ``/api/health/live`` and ``/api/health/ready`` in memory: treq's StubTreq over the real site, a
fake repository whose ``ping`` the test answers, a ``task.Clock`` for the ping's deadline. No sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from nanoiot.config import Config
from nanoiot.errors import ServiceUnavailable
from nanoiot.web.context import WebContext
from nanoiot.web.health import PING_TIMEOUT
from nanoiot.web.site import build_site
from nanoiot.web.tokens import TokenIssuer

SECRET_DETAIL = "could not connect to server: db.internal.example:5432"


class FakeRepository:
    """``ping`` and ``healthy`` as nanoiot/persistence/repository.py has them; each ping is a Deferred the test
    fires (``answer``) or leaves hanging."""

    def __init__(self) -> None:
        self.healthy = True
        self.retry_after = 7.0
        self.pings: list[Deferred] = []

    def ping(self) -> Deferred:
        d: Deferred = Deferred()
        self.pings.append(d)
        return d

    def answer(self, up: bool) -> None:
        for d in self.pings:
            if not d.called:
                if up:
                    d.callback(None)
                else:
                    d.errback(ServiceUnavailable(SECRET_DETAIL))


class QueryOnlyRepository:
    """A repository without ``ping``: the check falls back to one ``SELECT 1`` through ``_run``."""

    def __init__(self, up: bool) -> None:
        self.up = up
        self.queries = 0

    def _run(self, fn: Any, attempts: int = 1) -> Deferred:
        self.queries += 1
        d: Deferred = Deferred()
        if self.up:
            d.callback(1)
        else:
            d.errback(RuntimeError(SECRET_DETAIL))
        return d


class FakeBus:
    connected = True


class FakeCluster:
    def __init__(self, joined: bool, connected: bool) -> None:
        self._joined = joined
        self.bus = FakeBus()
        self.bus.connected = connected


class Untouched:
    """What a health probe must not reach: the attributes the site wiring reads exist, calling them fails."""

    def __getattr__(self, attribute: str) -> Any:
        def called(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"{attribute} was called")

        return called


class Probe:
    def __init__(self, repository: Any, cluster: Any = None) -> None:
        self.clock = task.Clock()
        self.repository = repository
        context = WebContext(config=Config(), clock=self.clock, repository=repository, catalog=Untouched(),
                             directory=Untouched(), tokens=TokenIssuer(b"k" * 32, 9000, 604800, self.clock),
                             commands=Untouched(), cluster=cluster)  # type: ignore[arg-type]
        self.stub = StubTreq(build_site(context).resource)

    def start(self, path: str) -> list[Any]:
        """Sends the probe; the returned list gets (status, headers, body) once it is answered."""
        answers: list[Any] = []

        def read(response: Any) -> Deferred:
            return self.stub.content(response).addCallback(
                lambda body: answers.append((response.code, response.headers, json.loads(body))))

        self.stub.get(f"http://nanoiot.test{path}").addCallback(read).addErrback(answers.append)
        self.stub.flush()
        return answers

    def get(self, path: str, up: bool | None = None) -> tuple[int, Any, Any]:
        answers = self.start(path)
        if up is not None:
            self.repository.answer(up)
            self.stub.flush()
        assert len(answers) == 1, "no answer"
        if isinstance(answers[0], Failure):
            answers[0].raiseException()
        return answers[0]


@pytest.mark.parametrize("path", ["/api/health", "/api/health/ready"])
def test_ready_is_200_up_when_the_database_answers(path):
    probe = Probe(FakeRepository())
    status, headers, body = probe.get(path, up=True)
    assert status == 200
    assert body == {"status": "UP", "components": {"livenessState": {"status": "UP"}, "db": {"status": "UP"}}}
    assert headers.getRawHeaders(b"content-type") == [b"application/json"]


@pytest.mark.parametrize("path", ["/api/health", "/api/health/ready"])
def test_ready_is_503_down_with_retry_after_when_the_database_does_not_answer(path):
    probe = Probe(FakeRepository())
    status, headers, body = probe.get(path, up=False)
    assert status == 503
    assert body == {"status": "DOWN", "components": {"livenessState": {"status": "UP"}, "db": {"status": "DOWN"}}}
    assert headers.getRawHeaders(b"retry-after") == [b"7"]
    assert "5432" not in json.dumps(body)  # nothing of the driver's error reaches the body


def test_a_repository_that_already_knows_the_database_is_down_is_not_pinged():
    repository = FakeRepository()
    repository.healthy = False
    status, _, body = Probe(repository).get("/api/health")
    assert (status, body["components"]["db"]) == (503, {"status": "DOWN"})
    assert repository.pings == []


def test_a_ping_that_hangs_counts_as_down_after_the_deadline():
    probe = Probe(FakeRepository())
    answers = probe.start("/api/health/ready")
    assert answers == []
    probe.clock.advance(PING_TIMEOUT)
    probe.stub.flush()
    [(status, _, body)] = answers
    assert (status, body["status"]) == (503, "DOWN")


def test_probes_arriving_together_share_one_database_round_trip():
    repository = FakeRepository()
    probe = Probe(repository)
    first, second = probe.start("/api/health"), probe.start("/api/health/ready")
    assert len(repository.pings) == 1
    repository.answer(True)
    probe.stub.flush()
    assert [a[0] for a in first + second] == [200, 200]
    probe.get("/api/health", up=True)  # the next probe asks again
    assert len(repository.pings) == 2


def test_liveness_does_not_ask_the_database():
    repository = FakeRepository()
    repository.healthy = False
    status, _, body = Probe(repository).get("/api/health/live")
    assert (status, body) == (200, {"status": "UP", "components": {"livenessState": {"status": "UP"}}})
    assert repository.pings == []


@pytest.mark.parametrize("up", [True, False])
def test_a_repository_without_ping_is_checked_with_one_query(up):
    repository = QueryOnlyRepository(up)
    status, _, body = Probe(repository).get("/api/health")
    assert (status, body["components"]["db"]["status"]) == ((200, "UP") if up else (503, "DOWN"))
    assert repository.queries == 1


@pytest.mark.parametrize("joined, connected, status", [(True, True, 200), (False, True, 503), (True, False, 503)])
def test_a_cluster_node_is_ready_once_joined_with_its_notify_bus_connected(joined, connected, status):
    probe = Probe(FakeRepository(), FakeCluster(joined, connected))
    answered, _, body = probe.get("/api/health", up=True)
    assert answered == status
    assert body["components"]["cluster"] == {
        "status": "UP" if status == 200 else "DOWN",
        "details": {"joined": joined, "notifyBus": "UP" if connected else "DOWN"}}


def test_health_needs_no_token_and_other_routes_still_do():
    probe = Probe(FakeRepository())
    assert probe.get("/api/health", up=True)[0] == 200
    assert probe.get("/api/auth/user")[0] == 401
