"""bench.echo_fleet: the benchmarks' device fleet (bench/mqtt_echo_fleet.c when a C compiler is found, else
``nanoiot-sim``) sends the server what ``nanoiot-sim --answer echo`` sends, and answers a two-way RPC end to end.

Whichever fleet this machine gets is the one tested (CI without gcc tests the fallback), and the fallback itself is
tested by asking for it. The wire test plays the broker on a raw socket: it expects the bytes NanoIoT's own codec
encodes for the Python fleet, and feeds two commands in pieces (a packet split across reads, two in one read).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor

from bench.echo_fleet import compiler, fleet_command
from nanoiot.transports.mqtt import codec
from tests.fixtures.server import HOST, make_config, start_server, with_timeout

ROOT = Path(__file__).resolve().parents[2]
EXPECTED_KIND = "c" if compiler() else "sim"


def test_without_a_compiler_or_for_what_only_python_does_the_fleet_is_nanoiot_sim(tmp_path: Path,
                                                                                   capsys: Any) -> None:
    command, kind = fleet_command(1883, tmp_path / "tokens.txt", "echo", cc=None)
    assert kind == "sim" and command[:3] == [sys.executable, "-m", "nanoiot.sim.fleet"]
    assert "no C compiler" in capsys.readouterr().err
    command, kind = fleet_command(1883, tmp_path / "tokens.txt", "echo", ["--call-method", "x"])
    assert kind == "sim" and command[-2:] == ["--call-method", "x"]
    assert "cannot do" in capsys.readouterr().err


def _read(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        assert chunk, f"the fleet closed the connection after {data!r}"
        data += chunk
    return data


@pytest.mark.parametrize("level", [4, 5])
def test_the_fleet_sends_what_nanoiot_sim_sends(tmp_path: Path, level: int) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("  token-1 \n\n")
    with socket.create_server((HOST, 0)) as broker:
        command, kind = fleet_command(broker.getsockname()[1], tokens, "echo",
                                      ["--host", HOST, "--protocol", str(level)])
        assert kind == EXPECTED_KIND
        fleet = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        try:
            broker.settimeout(30)
            conn, _ = broker.accept()
            with conn:
                conn.settimeout(30)
                connect = codec.encode_connect("", protocol_level=level, username="token-1", keep_alive=300)
                assert _read(conn, len(connect)) == connect
                conn.sendall(codec.encode_connack(False, 0, level))
                subscribe = codec.encode_subscribe(1, [("v1/devices/me/rpc/request/+", 1)], level)
                assert _read(conn, len(subscribe)) == subscribe
                conn.sendall(codec.encode_suback(1, [1], level))
                first = b'{"method":"echo","params":{"i":1}}'
                second = b'{"method":"echo","params":{"s":"' + b"x" * 300 + b'"}}'  # a 2-byte remaining length
                packets = (codec.encode_publish("v1/devices/me/rpc/request/7", first, 1, 3, level)
                           + codec.encode_publish("v1/devices/me/rpc/request/18", second, 1, 4, level))
                split = len(packets) - len(second) - 30
                conn.sendall(packets[:split])
                expected = (codec.encode_puback(3, level)
                            + codec.encode_publish("v1/devices/me/rpc/response/7", first, 1, 2, level))
                assert _read(conn, len(expected)) == expected
                conn.sendall(packets[split:])
                expected = (codec.encode_puback(4, level)
                            + codec.encode_publish("v1/devices/me/rpc/response/18", second, 1, 3, level))
                assert _read(conn, len(expected)) == expected
        finally:
            fleet.kill()
            fleet.wait()


class FleetProcess(protocol.ProcessProtocol):
    """Follows the fleet's JSON lines: fires on ``connected`` and on the first ``answered`` with ``count`` >= 1."""

    def __init__(self) -> None:
        self.buffer = b""
        self.on_connected: defer.Deferred = defer.Deferred()
        self.on_answered: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()
        self.running = True

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            event = json.loads(line)
            if event["event"] == "connected" and not self.on_connected.called:
                self.on_connected.callback(event)
            if event["event"] == "answered" and event["count"] >= 1 and not self.on_answered.called:
                self.on_answered.callback(event)

    def processEnded(self, reason: Any) -> None:
        self.running = False
        for d in (self.on_connected, self.on_answered):
            if not d.called:
                d.errback(RuntimeError(f"the fleet ended early: {reason.value}"))
        self.ended.callback(None)


@pytest_twisted.ensureDeferred
async def test_the_fleet_answers_a_two_way_rpc_with_the_command_itself(tmp_path: Path) -> None:
    running = await start_server(make_config(f"sqlite:///{tmp_path / 'fleet.db'}", jwt_key_file=str(tmp_path / "k")))
    fleet = FleetProcess()
    process = None
    try:
        ids, tokens = [], []
        for i in range(3):
            status, body = await running.call("POST", "/api/device", body={"name": f"fleet-{i}", "type": "bench"})
            assert status == 200, body
            ids.append(body["id"]["id"])
            status, credentials = await running.call("GET", f"/api/device/{ids[-1]}/credentials")
            tokens.append(credentials["credentialsId"])
        (tmp_path / "tokens.txt").write_text("\n".join(tokens) + "\n")
        command, kind = fleet_command(running.mqtt_port, tmp_path / "tokens.txt", "echo", ["--host", HOST])
        assert kind == EXPECTED_KIND
        process = reactor.spawnProcess(fleet, command[0], command, env=dict(os.environ), path=str(ROOT))
        connected = await with_timeout(fleet.on_connected, 30)
        assert (connected["count"], connected["failed"]) == (3, 0)
        request = {"method": "echo", "params": {"n": 1, "text": "é"}, "timeout": 10000}
        status, body = await running.call("POST", f"/api/rpc/twoway/{ids[1]}", body=request)
        assert (status, body) == (200, {"method": "echo", "params": {"n": 1, "text": "é"}})
        answered = await with_timeout(fleet.on_answered, 10)
        assert (answered["count"], answered["commands"]) == (1, 1)
    finally:
        if process is not None and fleet.running:
            process.signalProcess("KILL")
            await with_timeout(fleet.ended, 30)
        await running.service.stopService()
