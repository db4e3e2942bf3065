"""``/metrics`` and ``/api/health`` of a real server on loopback: a real RPC over MQTT (paho-mqtt as the device,
treq as the REST client) moves the counters a Prometheus scrape then reads."""

from __future__ import annotations

import json

import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer

from tests.fixtures.server import PahoDevice, with_timeout
from tests.fixtures.server_context import server_running

RPC = "v1/devices/me/rpc/request/+"


async def scrape(server, token: str | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample of ``/metrics``, as {(name, sorted labels): value}."""
    headers = {"Authorization": [f"Bearer {token}"]} if token else None
    response = await treq.get(f"{server.http_url}/metrics", headers=headers)
    assert response.code == 200, await response.text()
    text = await response.text()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def sample(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest_twisted.ensureDeferred
async def test_a_two_way_call_over_mqtt_moves_the_counters_a_scrape_reads(tmp_path):
    async with server_running(tmp_path) as server:
        await exercise_and_scrape(server)


async def exercise_and_scrape(server) -> None:
    before = await scrape(server)
    assert sample(before, "nanoiot_devices_connected", transport="mqtt") == 0
    device_id, token = await server.demo_device()
    device = PahoDevice(server.mqtt_port, token)
    try:
        await device.connect()
        assert await device.subscribe(RPC) == [1]
        call = defer.ensureDeferred(server.call("POST", f"/api/rpc/twoway/{device_id}", body={"method": "getTime"}))
        topic, _, _ = await device.next_message()
        await device.publish(f"v1/devices/me/rpc/response/{topic.rsplit('/', 1)[1]}", {"time": 1})
        assert await with_timeout(call) == (200, {"time": 1})
        status, body = await server.call("POST", f"/api/rpc/oneway/{device_id}",
                                         body={"method": "reboot", "persistent": True})
        assert status == 200, body
        await device.next_message()
        await server.service.journal.flushed()
        after = await scrape(server)
    finally:
        device.stop()
    assert sample(after, "nanoiot_devices_connected", transport="mqtt") == 1
    assert sample(after, "nanoiot_rpcs_total", outcome="SUCCESSFUL", persistent="false") == \
        sample(before, "nanoiot_rpcs_total", outcome="SUCCESSFUL", persistent="false") + 1
    assert sample(after, "nanoiot_rpc_status_changes_total", status="SENT", persistent="true") >= 1
    assert sample(after, "nanoiot_rpc_latency_seconds_count", outcome="SUCCESSFUL") >= 1
    assert sample(after, "nanoiot_journal_write_seconds_count") > sample(before, "nanoiot_journal_write_seconds_count")
    assert sample(after, "nanoiot_database_up") == 1
    assert sample(after, "nanoiot_device_actors") >= 1
    assert ("nanoiot_journal_pending", ()) in after and ("nanoiot_rpc_pending", ()) in after
    assert sample(after, "process_resident_memory_bytes") > 0  # prometheus-client's process collector


@pytest_twisted.ensureDeferred
async def test_health_is_up_on_a_running_server_without_a_token(tmp_path):
    async with server_running(tmp_path) as server:
        for path in ("/api/health", "/api/health/ready", "/api/health/live"):
            response = await treq.get(f"{server.http_url}{path}")
            assert response.code == 200
            body = json.loads(await response.content())
            assert body["status"] == "UP"


@pytest_twisted.ensureDeferred
async def test_metrics_can_be_switched_off_or_put_behind_a_token(tmp_path):
    async with server_running(tmp_path, metrics=False) as off:
        response = await treq.get(f"{off.http_url}/metrics")
        assert response.code == 404
        await response.content()
    async with server_running(tmp_path, metrics_token="scrape-me") as protected:
        response = await treq.get(f"{protected.http_url}/metrics")
        assert response.code == 401
        await response.content()
        assert ("nanoiot_database_up", ()) in await scrape(protected, token="scrape-me")


@pytest_twisted.ensureDeferred
async def test_readiness_is_503_with_retry_after_once_the_database_is_gone_and_liveness_stays_up(tmp_path):
    async with server_running(tmp_path) as server:
        await server.service.repository.stop()  # the database connection is gone
        ready = await treq.get(f"{server.http_url}/api/health/ready")
        body = json.loads(await ready.content())
        assert (ready.code, body["status"], body["components"]["db"]) == (503, "DOWN", {"status": "DOWN"})
        assert int(ready.headers.getRawHeaders(b"retry-after")[0]) >= 1
        live = await treq.get(f"{server.http_url}/api/health/live")
        assert live.code == 200
        await live.content()
