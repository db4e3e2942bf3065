"""10,000 devices connect over MQTT and each answers one two-way RPC: correctness at scale, bounded in time.

No timing asserts here (benchmarks live in bench/); the bounds only keep a hang from stalling the suite.
"""

from __future__ import annotations

import json
import sys

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, protocol, reactor
from twisted.web.client import HTTPConnectionPool

from tests.fixtures.server import make_config, start_server, with_timeout

DEVICES = 10_000
CONCURRENCY = 200


class FleetProcess(protocol.ProcessProtocol):
    """Follows the simulator's JSON-line events."""

    def __init__(self) -> None:
        self.buffer = b""
        self.events: dict[str, defer.Deferred] = {"connected": defer.Deferred(), "done": defer.Deferred()}
        self.ended: defer.Deferred = defer.Deferred()
        self.stderr = b""

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            event = json.loads(line)
            d = self.events.get(event["event"])
            if d is not None and not d.called:
                d.callback(event)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason) -> None:
        for d in self.events.values():
            if not d.called:
                d.errback(RuntimeError(f"simulator ended early: {self.stderr.decode()[-2000:]}"))
        self.ended.callback(reason.value.exitCode)


@pytest.mark.scale
@pytest_twisted.ensureDeferred
async def test_ten_thousand_devices_connect_and_each_answers_one_two_way_call(tmp_path):
    running = await start_server(make_config(f"sqlite:///{tmp_path / 'scale.db'}", jwt_key_file=str(tmp_path / "k"),
                                             rpc_ack_timeout=30000, rpc_default_timeout=60000))
    try:
        tenant = await running.service.repository.get_user_by_email("tenant@nanoiot.io")
        catalog = running.service.catalog
        device_ids = []
        tokens_file = tmp_path / "tokens.txt"
        with tokens_file.open("w") as handle:
            for i in range(DEVICES):
                device, credentials = await catalog.create_device(tenant.tenant_id, f"scale-{i}",
                                                                  access_token=f"scale-token-{i}")
                device_ids.append(str(device.id))
                handle.write(credentials.credentials_id + "\n")

        fleet = FleetProcess()
        reactor.spawnProcess(fleet, sys.executable, [
            sys.executable, "-m", "nanoiot.sim.fleet", "--port", str(running.mqtt_port),
            "--tokens-file", str(tokens_file), "--concurrency", "200", "--answer", "echo",
            "--expect-commands", str(DEVICES), "--hold", "300", "--json",
        ], env=None)
        connected = await with_timeout(fleet.events["connected"], 300)
        assert (connected["count"], connected["failed"]) == (DEVICES, 0)

        jwt = await running.jwt("tenant")
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = CONCURRENCY
        limiter = defer.DeferredSemaphore(CONCURRENCY)
        headers = {"X-Authorization": [f"Bearer {jwt}"], "Content-Type": ["application/json"]}

        async def one_call(index: int) -> tuple[int, object]:
            body = json.dumps({"method": "echo", "params": {"n": index}}).encode()
            response = await treq.post(f"{running.http_url}/api/rpc/twoway/{device_ids[index]}", data=body,
                                       headers=headers, pool=pool)
            return response.code, await response.json()

        results = await with_timeout(defer.gatherResults([
            limiter.run(lambda i=i: defer.ensureDeferred(one_call(i))) for i in range(DEVICES)
        ]), 600)
        failures = [(i, r) for i, r in enumerate(results) if r != (200, {"method": "echo", "params": {"n": i}})]
        assert failures == []
        done = await with_timeout(fleet.events["done"], 120)
        assert done["commands"] == DEVICES
        assert await with_timeout(fleet.ended, 60) == 0
        await pool.closeCachedConnections()
    finally:
        await running.service.stopService()
