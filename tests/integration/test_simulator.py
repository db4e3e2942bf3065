"""``nanoiot-sim`` over each transport against the real server: devices connect, answer commands, call the server.

The simulator runs as a subprocess (``python -m nanoiot.sim.fleet --json``) followed through its JSON-line events;
the test waits on those events and on REST answers, always bounded, never on sleeps.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor

from tests.fixtures.server import HOST, RunningServer, make_config, start_server, with_timeout

DEVICES = 20
ROOT = Path(__file__).resolve().parents[2]


class FleetProcess(protocol.ProcessProtocol):
    """Follows the simulator's JSON-line events."""

    def __init__(self) -> None:
        self.buffer = b""
        self.events: dict[str, defer.Deferred] = {"connected": defer.Deferred(), "done": defer.Deferred()}
        self.seen: list[dict[str, Any]] = []
        self.ended: defer.Deferred = defer.Deferred()
        self.running = True
        self.stderr = b""

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            event = json.loads(line)
            self.seen.append(event)
            d = self.events.get(event["event"])
            if d is not None and not d.called:
                d.callback(event)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Any) -> None:
        self.running = False
        for d in self.events.values():
            if not d.called:
                d.errback(RuntimeError(f"simulator ended early: {self.stderr.decode()[-2000:]}"))
        self.ended.callback(reason.value.exitCode)


async def create_devices(running: RunningServer, tokens_file: Path, prefix: str) -> list[str]:
    """DEVICES devices through the REST API; their tokens go to ``tokens_file``; returns their ids."""
    ids, tokens = [], []
    for i in range(DEVICES):
        status, body = await running.call("POST", "/api/device", body={"name": f"{prefix}-{i}", "type": "sim"})
        assert status == 200, body
        ids.append(body["id"]["id"])
        status, credentials = await running.call("GET", f"/api/device/{ids[-1]}/credentials")
        assert status == 200, credentials
        tokens.append(credentials["credentialsId"])
    tokens_file.write_text("\n".join(tokens) + "\n")
    return ids


def transport_address(running: RunningServer, transport: str) -> tuple[str, int]:
    if transport == "mqtt":
        return HOST, running.mqtt_port
    if transport == "coap":
        return HOST, running.service.coap_port.getHost().port  # type: ignore[union-attr]
    return HOST, running.service.http_port.getHost().port  # type: ignore[union-attr]


@pytest.mark.parametrize("transport", ["mqtt", "http", "coap"])
@pytest_twisted.ensureDeferred
async def test_simulated_devices_answer_every_command_and_call_the_server(tmp_path: Path, transport: str) -> None:
    running = await start_server(make_config(f"sqlite:///{tmp_path / 'sim.db'}", jwt_key_file=str(tmp_path / "k")))
    fleet = FleetProcess()
    process = None
    try:
        tokens_file = tmp_path / "tokens.txt"
        device_ids = await create_devices(running, tokens_file, f"sim-{transport}")
        host, port = transport_address(running, transport)
        args = [sys.executable, "-m", "nanoiot.sim.fleet", "--transport", transport, "--host", host,
                "--port", str(port), "--tokens-file", str(tokens_file), "--rate", "200", "--concurrency", "10",
                "--answer", "echo", "--call-method", "getCurrentTime", "--call-interval", "0.5",
                "--expect-commands", str(DEVICES), "--expect-call-answers", str(DEVICES), "--hold", "60", "--json"]
        process = reactor.spawnProcess(fleet, sys.executable, args, env=dict(os.environ), path=str(ROOT))
        connected = await with_timeout(fleet.events["connected"], 60)
        assert (connected["count"], connected["failed"]) == (DEVICES, 0)

        async def one_call(index: int) -> tuple[int, Any]:
            return await running.call("POST", f"/api/rpc/twoway/{device_ids[index]}",
                                      body={"method": "echo", "params": {"n": index}, "timeout": 20000})

        results = await with_timeout(defer.gatherResults([defer.ensureDeferred(one_call(i))
                                                          for i in range(DEVICES)]), 60)
        failures = [(i, r) for i, r in enumerate(results) if r != (200, {"method": "echo", "params": {"n": i}})]
        assert failures == []

        done = await with_timeout(fleet.events["done"], 60)
        assert done["connected"] == DEVICES and done["failed"] == 0
        assert done["commands"] == DEVICES
        assert done["call_answers"] > 0
        assert done["calls"] >= done["call_answers"]
        assert await with_timeout(fleet.ended, 30) == 0
    finally:
        if process is not None and fleet.running:
            process.signalProcess("KILL")
            await with_timeout(fleet.ended, 30)
        await running.service.stopService()
