"""The server's Prometheus metrics in memory: events driven through a real EventStream, the scrape read from a
per-test CollectorRegistry and from the ``/metrics`` resource (StubTreq), journal writes timed on a task.Clock."""

from __future__ import annotations

import gc
from typing import Any
from uuid import uuid4

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from treq.testing import StubTreq
from twisted.internet import task
from twisted.internet.defer import Deferred

from nanoiot.commands.events import DeviceCalled, DeviceOffline, DeviceOnline, EventStream, RpcStatusChanged
from nanoiot.metrics import ServerMetrics, pending_commands
from nanoiot.persistence.records import RpcRecord
from nanoiot.rpc.model import RpcStatus
from nanoiot.web.metrics import metrics_resource
from nanoiot.commands.presence import PresenceBook

T0 = 1_700_000_000.0
TENANT, CUSTOMER = uuid4(), uuid4()


class Harness:
    def __init__(self, node: str = "") -> None:
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.registry = CollectorRegistry()
        self.events = EventStream()
        self.metrics = ServerMetrics(self.registry, self.clock, node=node, process=False)
        self.book = PresenceBook(self.clock, node)
        self.book.start(self.events)
        self.metrics.start(self.events, self.book)

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def rpc(self, *statuses: RpcStatus, persistent: bool = False, after: float = 0.0) -> None:
        """One command through ``statuses``; the last one ``after`` seconds after its submission."""
        record = RpcRecord(id=uuid4(), created_time=int(self.clock.seconds() * 1000), tenant_id=TENANT,
                           device_id=uuid4(), expiration_time=0, oneway=False, method="m", params=None,
                           status=RpcStatus.QUEUED)
        for index, status in enumerate(statuses):
            if index == len(statuses) - 1:
                self.clock.advance(after)
            self.events.publish(RpcStatusChanged(_with_status(record, status), persistent))

    def presence(self, kind: type, device: Any, transport: str, node: str = "") -> None:
        self.events.publish(kind(device, TENANT, CUSTOMER, transport, node))


def _with_status(record: RpcRecord, status: RpcStatus) -> RpcRecord:
    from dataclasses import replace

    return replace(record, status=status)


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.metrics.stop()


def test_every_status_change_is_counted_and_the_outcome_once_per_command(harness):
    harness.rpc(RpcStatus.QUEUED, RpcStatus.SENT, RpcStatus.DELIVERED, RpcStatus.SUCCESSFUL)
    harness.rpc(RpcStatus.QUEUED, RpcStatus.SENT, RpcStatus.TIMEOUT, RpcStatus.EXPIRED, persistent=True)
    assert harness.value("nanoiot_rpc_status_changes_total", status="QUEUED", persistent="false") == 1
    assert harness.value("nanoiot_rpc_status_changes_total", status="TIMEOUT", persistent="true") == 1
    assert harness.value("nanoiot_rpcs_total", outcome="SUCCESSFUL", persistent="false") == 1
    assert harness.value("nanoiot_rpcs_total", outcome="EXPIRED", persistent="true") == 1
    assert harness.value("nanoiot_rpcs_total", outcome="DELIVERED", persistent="false") is None  # not an end


def test_latency_runs_from_submission_to_the_final_outcome_on_the_servers_clock(harness):
    harness.rpc(RpcStatus.QUEUED, RpcStatus.SENT, RpcStatus.SUCCESSFUL, after=0.2)
    harness.rpc(RpcStatus.QUEUED, RpcStatus.EXPIRED, after=45)
    assert harness.value("nanoiot_rpc_latency_seconds_count", outcome="SUCCESSFUL") == 1
    assert harness.value("nanoiot_rpc_latency_seconds_sum", outcome="SUCCESSFUL") == pytest.approx(0.2)
    assert harness.value("nanoiot_rpc_latency_seconds_bucket", outcome="SUCCESSFUL", le="0.25") == 1
    assert harness.value("nanoiot_rpc_latency_seconds_bucket", outcome="EXPIRED", le="30.0") == 0
    assert harness.value("nanoiot_rpc_latency_seconds_bucket", outcome="EXPIRED", le="60.0") == 1


def test_a_deleted_command_counts_as_an_outcome_but_not_as_latency(harness):
    harness.rpc(RpcStatus.QUEUED, RpcStatus.DELETED, persistent=True, after=5)
    assert harness.value("nanoiot_rpcs_total", outcome="DELETED", persistent="true") == 1
    assert harness.value("nanoiot_rpc_latency_seconds_count", outcome="DELETED") is None


def test_devices_connected_by_the_transport_that_brought_them_online(harness):
    a, b, c = uuid4(), uuid4(), uuid4()
    harness.presence(DeviceOnline, a, "mqtt")
    harness.presence(DeviceOnline, b, "mqtt")
    harness.presence(DeviceOnline, c, "coap")
    harness.presence(DeviceOffline, b, "http")  # its last session was HTTP: it still leaves the MQTT count
    assert harness.value("nanoiot_devices_connected", transport="mqtt") == 1
    assert harness.value("nanoiot_devices_connected", transport="coap") == 1
    assert harness.value("nanoiot_devices_connected", transport="http") == 0


def test_in_a_cluster_only_the_devices_this_node_holds_are_counted():
    h = Harness(node="node-a")
    try:
        h.presence(DeviceOnline, uuid4(), "mqtt", node="node-a")
        h.presence(DeviceOnline, uuid4(), "mqtt", node="node-b")
        assert h.value("nanoiot_devices_connected", transport="mqtt") == 1
    finally:
        h.metrics.stop()


def test_other_events_and_a_stopped_listener_change_nothing(harness):
    harness.events.publish(DeviceCalled(uuid4(), TENANT, CUSTOMER, "mqtt", "getTime"))
    harness.metrics.stop()
    harness.book.stop()
    assert not harness.events.has_listeners
    harness.rpc(RpcStatus.QUEUED, RpcStatus.SUCCESSFUL)
    assert harness.value("nanoiot_rpcs_total", outcome="SUCCESSFUL", persistent="false") is None


def test_gauges_are_read_at_scrape_time_and_a_failing_one_is_left_out(harness):
    depth = [3]
    harness.metrics.gauge("nanoiot_journal_pending", "pending", lambda: depth[0])
    harness.metrics.gauge("nanoiot_broken", "fails", lambda: 1 / 0)
    assert harness.value("nanoiot_journal_pending") == 3
    depth[0] = 0
    assert harness.value("nanoiot_journal_pending") == 0
    assert harness.value("nanoiot_broken") is None


class FakeRepository:
    def __init__(self) -> None:
        self.writes: list[Deferred] = []
        self.url = "sqlite://"

    def write_rpc_batch(self, inserts: Any, changes: Any, deletes: Any) -> Deferred:
        d: Deferred = Deferred()
        self.writes.append(d)
        return d


def test_journal_batch_writes_are_timed_through_the_repository_the_journal_is_given(harness):
    repository = FakeRepository()
    timed = harness.metrics.timed_repository(repository)
    assert timed.url == "sqlite://"  # everything else is the repository's own
    results: list[Any] = []
    timed.write_rpc_batch([], [], []).addBoth(results.append)
    harness.clock.advance(0.03)
    repository.writes[0].callback(["inserted"])
    assert results == [["inserted"]]
    failed = timed.write_rpc_batch([], [], [])
    failed.addErrback(results.append)
    repository.writes[1].errback(RuntimeError("database gone"))
    assert harness.value("nanoiot_journal_write_seconds_count") == 1
    assert harness.value("nanoiot_journal_write_seconds_sum") == pytest.approx(0.03)
    assert harness.value("nanoiot_journal_write_failures_total") == 1
    assert results[1].check(RuntimeError)


def test_full_collections_are_timed_while_started(harness):
    gc.collect()
    assert harness.value("nanoiot_gc_full_pause_seconds_count") >= 1
    harness.metrics.stop()
    seen = harness.value("nanoiot_gc_full_pause_seconds_count")
    gc.collect()
    assert harness.value("nanoiot_gc_full_pause_seconds_count") == seen


class FakeActor:
    def __init__(self, pending: int) -> None:
        self.queue = [object()] * pending


class FakeInbox:
    def __init__(self, actor: Any) -> None:
        self.actor = actor


class FakeRef:
    def __init__(self, actor: Any) -> None:
        self.actor_inbox = FakeInbox(actor)


def test_pending_commands_sum_the_actors_queues_and_skip_retired_actors():
    assert pending_commands([FakeRef(FakeActor(2)), FakeRef(None), FakeRef(FakeActor(3))]) == 5


def test_two_servers_in_one_process_keep_separate_registries():
    first, second = Harness(), Harness()
    try:
        first.rpc(RpcStatus.QUEUED, RpcStatus.SUCCESSFUL)
        assert first.value("nanoiot_rpcs_total", outcome="SUCCESSFUL", persistent="false") == 1
        assert second.value("nanoiot_rpcs_total", outcome="SUCCESSFUL", persistent="false") is None
    finally:
        first.metrics.stop()
        second.metrics.stop()


def scrape(resource: Any, headers: dict[bytes, list[bytes]] | None = None) -> tuple[int, Any, bytes]:
    stub = StubTreq(resource)
    got: list[Any] = []
    stub.get("http://nanoiot.test/metrics", headers=headers).addCallback(
        lambda r: stub.content(r).addCallback(lambda body: got.append((r.code, r.headers, body))))
    stub.flush()
    [answer] = got
    return answer


def test_the_scrape_is_prometheus_text_with_the_servers_metrics(harness):
    harness.rpc(RpcStatus.QUEUED, RpcStatus.SUCCESSFUL)
    harness.presence(DeviceOnline, uuid4(), "http")
    status, headers, body = scrape(metrics_resource(harness.registry))
    assert status == 200
    assert headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    text = body.decode()
    assert 'nanoiot_rpcs_total{outcome="SUCCESSFUL",persistent="false"} 1.0' in text
    assert 'nanoiot_devices_connected{transport="http"} 1.0' in text
    assert "# TYPE nanoiot_rpc_latency_seconds histogram" in text
    assert body == generate_latest(harness.registry)


@pytest.mark.parametrize("header, status", [
    (None, 401), (b"Bearer wrong", 401), (b"Basic c2VjcmV0", 401), (b"Bearer s3cret-token", 200),
    (b"bearer s3cret-token", 200),
])
def test_with_a_token_only_a_scrape_carrying_it_is_answered(harness, header, status):
    headers = {b"Authorization": [header]} if header is not None else None
    answered, response_headers, body = scrape(metrics_resource(harness.registry, "s3cret-token"), headers)
    assert answered == status
    if status == 401:
        assert response_headers.getRawHeaders(b"www-authenticate") == [b'Bearer realm="metrics"']
        assert b"bearer token" in body and b"nanoiot_" not in body
    else:
        assert b"nanoiot_rpc_latency_seconds" in body


def test_a_device_actors_status_changes_are_counted_as_published_ones_are(harness):
    # The actor's path (EventStream.status_changed: no event object for the metrics) and the published one agree.
    harness.rpc(RpcStatus.QUEUED, RpcStatus.SUCCESSFUL, after=0.2)
    created = int(harness.clock.seconds() * 1000)
    harness.clock.advance(0.2)
    for status in (RpcStatus.QUEUED, RpcStatus.SUCCESSFUL):
        harness.events.status_changed(status, created, False, lambda: None)
    assert harness.value("nanoiot_rpc_status_changes_total", status="QUEUED", persistent="false") == 2
    assert harness.value("nanoiot_rpcs_total", outcome="SUCCESSFUL", persistent="false") == 2
    assert harness.value("nanoiot_rpc_latency_seconds_count", outcome="SUCCESSFUL") == 2
    assert harness.value("nanoiot_rpc_latency_seconds_sum", outcome="SUCCESSFUL") == pytest.approx(0.4)
    assert harness.value("nanoiot_rpc_latency_seconds_bucket", outcome="SUCCESSFUL", le="0.1") == 0
    assert harness.value("nanoiot_rpc_latency_seconds_bucket", outcome="SUCCESSFUL", le="+Inf") == 2
    assert harness.value("nanoiot_rpc_status_changes_created", status="QUEUED", persistent="false") > 0
