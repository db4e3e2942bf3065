"""``nanoiot-sim``: a fleet of simulated devices in one asyncio process, over MQTT, HTTP or CoAP.

Each device connects with its access token, subscribes to commands and answers them the way it is told: echo the
command, answer after a delay, fail at random, never answer, or drop the connection mid-command (and come back).
Devices can also call the server (device-to-server RPC) at an interval. Devices come from a token file or are
created through the REST API (``--create N``).

``--transport`` picks how devices talk (default ``mqtt``):

* ``mqtt`` (this module, on NanoIoT's own MQTT codec): connected = SUBACK received; ``disconnect`` drops the
  connection before the PUBACK, so the server sends the command again after the device is back (1 s later).
* ``http`` (``nanoiot.sim.http_devices``): a long poll ``GET /api/v1/{token}/rpc?timeout=--poll-timeout`` per
  device on one keep-alive connection; connected = TCP up and the first poll sent. ``disconnect``: the device takes
  the command, does not answer, closes its connection and polls again 1 s later (an HTTP command counts as
  delivered once its poll response was written, so the server does not resend it).
* ``coap`` (``nanoiot.sim.coap_devices``): one UDP socket per device, an observation of ``/api/v1/{token}/rpc``;
  connected = 2.03 received. ``disconnect`` answers the command's notification with an RST (the observation ends,
  the command goes back to the queue) and registers again 1 s later.

Devices connect to ``--host``/``--port``: by default 127.0.0.1 and 1883 (MQTT) or 5683 (CoAP); for HTTP, the host
and port of ``--url``.

With ``--json`` the process reports JSON lines on stdout for tests and benchmarks:
``{"event": "connected", "count": N, ...}``, ``{"event": "answered", "count": N}``, ``{"event": "done", ...}``.
Without it, a progress bar while connecting and a summary table at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from nanoiot.transports.mqtt import codec

RPC_FILTER = "v1/devices/me/rpc/request/+"
REPLY_FILTER = "v1/devices/me/rpc/response/+"
REQUEST_PREFIX = "v1/devices/me/rpc/request/"
RESPONSE_PREFIX = "v1/devices/me/rpc/response/"


@dataclass
class Behaviour:
    answer: str = "echo"  # echo | ok | delay | fail | none | disconnect
    delay_ms: float = 100.0
    fail_rate: float = 0.1
    call_method: str | None = None
    call_interval: float = 10.0
    level: int = 4


@dataclass
class FleetStats:
    connected: int = 0
    failed: int = 0
    commands: int = 0
    answered: int = 0
    failures_sent: int = 0
    disconnects: int = 0
    reconnects: int = 0
    calls: int = 0
    call_answers: int = 0
    connect_latencies: list[float] = field(default_factory=list)
    call_latencies: list[float] = field(default_factory=list)


class SimulatedDevice(asyncio.Protocol):
    """One device: CONNECT, SUBSCRIBE, then PUBACK and answer every command it gets."""

    def __init__(self, token: str, stats: FleetStats, behaviour: Behaviour, ready: asyncio.Future,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.token = token
        self.stats = stats
        self.behaviour = behaviour
        self.level = behaviour.level
        self.ready = ready
        self.loop = loop
        self.reader = codec.FrameReader(16 * 1024 * 1024)
        self.transport: asyncio.Transport | None = None
        self.next_pid = 0
        self.call_id = 0
        self.calls: dict[str, float] = {}
        self.lost: asyncio.Future = loop.create_future()
        self.call_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(codec.encode_connect("", protocol_level=self.level, username=self.token, keep_alive=300))

    def _pid(self) -> int:
        self.next_pid = self.next_pid % 65535 + 1
        return self.next_pid

    def data_received(self, data: bytes) -> None:
        for frame in self.reader.feed(data):
            if frame.packet_type == codec.CONNACK:
                connack = codec.decode(frame, self.level)
                if connack.reason_code != 0:
                    self._finish(False)
                    return
                filters = [(RPC_FILTER, 1)]
                if self.behaviour.call_method:
                    filters.append((REPLY_FILTER, 1))
                self.transport.write(codec.encode_subscribe(self._pid(), filters, self.level))
            elif frame.packet_type == codec.SUBACK:
                self._finish(True)
                if self.behaviour.call_method:
                    self._schedule_call()
            elif frame.packet_type == codec.PUBLISH:
                self._on_publish(codec.decode(frame, self.level))

    def _on_publish(self, publish: Any) -> None:
        if publish.topic.startswith(RESPONSE_PREFIX):
            started = self.calls.pop(publish.topic[len(RESPONSE_PREFIX):], None)
            if started is not None:
                self.stats.call_answers += 1
                self.stats.call_latencies.append(time.perf_counter() - started)
            if publish.qos == 1:
                self.transport.write(codec.encode_puback(publish.packet_id, self.level))
            return
        if not publish.topic.startswith(REQUEST_PREFIX):
            return
        self.stats.commands += 1
        mode = self.behaviour.answer
        if mode == "disconnect":
            # Drop the connection before acknowledging: the server must send the command again later.
            self.stats.disconnects += 1
            self.transport.close()
            return
        if publish.qos == 1:
            self.transport.write(codec.encode_puback(publish.packet_id, self.level))
        if mode == "none":
            return
        request_id = publish.topic[len(REQUEST_PREFIX):]
        if mode == "delay":
            self.loop.call_later(self.behaviour.delay_ms / 1000.0, self._answer, request_id, publish.payload)
        elif mode == "fail" and random.random() < self.behaviour.fail_rate:
            self.stats.failures_sent += 1
            self._answer(request_id, b'{"error":"simulated failure"}')
        elif mode == "ok":
            self._answer(request_id, b'{"ok":true}')
        else:
            self._answer(request_id, publish.payload)

    def _answer(self, request_id: str, body: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(codec.encode_publish(RESPONSE_PREFIX + request_id, body, 1, self._pid(), self.level))
        self.stats.answered += 1

    def _schedule_call(self) -> None:
        jitter = random.uniform(0.5, 1.5) * self.behaviour.call_interval
        self.call_timer = self.loop.call_later(jitter, self._call)

    def _call(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.call_id += 1
        request_id = str(self.call_id)
        self.calls[request_id] = time.perf_counter()
        body = json.dumps({"method": self.behaviour.call_method, "params": {}}).encode()
        self.transport.write(codec.encode_publish(REQUEST_PREFIX + request_id, body, 1, self._pid(), self.level))
        self.stats.calls += 1
        self._schedule_call()

    def _finish(self, ok: bool) -> None:
        if not self.ready.done():
            self.ready.set_result(ok)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(False)
        if self.call_timer is not None:
            self.call_timer.cancel()
        if not self.lost.done():
            self.lost.set_result(None)


class Fleet:
    def __init__(self, args: argparse.Namespace, tokens: list[str]) -> None:
        self.args = args
        self.tokens = tokens
        self.stats = FleetStats()
        self.behaviour = Behaviour(args.answer, args.delay_ms, args.fail_rate, args.call_method,
                                   args.call_interval, args.protocol)
        self.devices: list[SimulatedDevice | None] = [None] * len(tokens)
        self.running = True

    async def connect(self, index: int) -> bool:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future = loop.create_future()
        started = time.perf_counter()
        device = SimulatedDevice(self.tokens[index], self.stats, self.behaviour, ready, loop)
        try:
            await loop.create_connection(lambda: device, self.args.host, self.args.port,
                                         local_addr=(self.args.bind, 0) if self.args.bind else None)
            ok = await asyncio.wait_for(ready, 30)
        except (OSError, asyncio.TimeoutError):
            return False
        if ok:
            self.devices[index] = device
            self.stats.connect_latencies.append(time.perf_counter() - started)
            if self.behaviour.answer == "disconnect":
                asyncio.ensure_future(self._reconnect_after_loss(index, device))
        elif device.transport is not None:
            device.transport.close()
        return ok

    async def _reconnect_after_loss(self, index: int, device: SimulatedDevice) -> None:
        await device.lost
        if not self.running:
            return
        await asyncio.sleep(1.0)
        if await self.connect(index):
            self.stats.reconnects += 1

    def close(self) -> None:
        self.running = False
        for device in self.devices:
            if device is not None and device.transport is not None:
                device.transport.close()


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


def make_fleet(args: argparse.Namespace, tokens: list[str]) -> Any:
    """The fleet for ``--transport``: ``connect(index) -> bool`` (awaitable), ``close()``, ``stats``."""
    if args.transport == "mqtt":
        return Fleet(args, tokens)
    behaviour = Behaviour(args.answer, args.delay_ms, args.fail_rate, args.call_method, args.call_interval,
                          args.protocol)
    if args.transport == "http":
        from nanoiot.sim.http_devices import HttpFleet

        return HttpFleet(args, tokens, FleetStats(), behaviour)
    from nanoiot.sim.coap_devices import CoapFleet

    return CoapFleet(args, tokens, FleetStats(), behaviour)


def resolve_address(args: argparse.Namespace) -> None:
    """Fill in ``--host``/``--port`` left out: per transport, for HTTP from ``--url``."""
    if args.transport == "http":
        url = urlsplit(args.url)
        default_host = url.hostname or "127.0.0.1"
        default_port = url.port or 80  # plain HTTP: the simulated devices speak no TLS
    else:
        default_host = "127.0.0.1"
        default_port = 1883 if args.transport == "mqtt" else 5683
    if args.host is None:
        args.host = default_host
    if args.port is None:
        args.port = default_port


def create_devices(url: str, user: str, password: str, count: int, prefix: str) -> list[str]:
    """Devices through the REST API (as any ThingsBoard client would), returning their access tokens."""
    login = urllib.request.Request(f"{url}/api/auth/login", json.dumps({"username": user, "password": password})
                                   .encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(login, timeout=10) as response:
        jwt = json.loads(response.read())["token"]
    headers = {"Content-Type": "application/json", "X-Authorization": f"Bearer {jwt}"}
    tokens = []
    for i in range(count):
        body = json.dumps({"name": f"{prefix}-{i}", "type": "simulated"}).encode()
        with urllib.request.urlopen(urllib.request.Request(f"{url}/api/device", body, headers), timeout=10) as r:
            device_id = json.loads(r.read())["id"]["id"]
        request = urllib.request.Request(f"{url}/api/device/{device_id}/credentials", headers=headers)
        with urllib.request.urlopen(request, timeout=10) as r:
            tokens.append(json.loads(r.read())["credentialsId"])
    return tokens


async def run_fleet(args: argparse.Namespace) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200_000, 200_000))  # allowed for root
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.create:
        tokens = create_devices(args.url, args.user, args.password, args.create, args.prefix)
        if args.tokens_file:
            with open(args.tokens_file, "w") as handle:
                handle.write("\n".join(tokens) + "\n")
    else:
        with open(args.tokens_file) as handle:
            tokens = [line.strip() for line in handle if line.strip()][args.skip:]
    if args.count:
        tokens = tokens[: args.count]
    fleet = make_fleet(args, tokens)
    stats = fleet.stats
    limit = asyncio.Semaphore(args.concurrency)
    started = time.perf_counter()
    progress = None
    if not args.json:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("connecting"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn())
        progress.start()
        task = progress.add_task("connect", total=len(tokens))

    async def guarded(index: int) -> None:
        if args.rate:
            # A steady ramp: connection i starts i/rate seconds in.
            delay = started + index / args.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        async with limit:
            if await fleet.connect(index):
                stats.connected += 1
            else:
                stats.failed += 1
        if progress is not None:
            progress.advance(task)

    await asyncio.gather(*(guarded(i) for i in range(len(tokens))))
    if progress is not None:
        progress.stop()
    elapsed = time.perf_counter() - started
    connect_summary = dict(count=stats.connected, failed=stats.failed, seconds=round(elapsed, 3),
                           rate=round(stats.connected / elapsed, 1) if elapsed else None,
                           p50_ms=percentile(stats.connect_latencies, 0.5),
                           p99_ms=percentile(stats.connect_latencies, 0.99))
    if args.json:
        emit("connected", **connect_summary)
    deadline = time.monotonic() + args.hold
    last: Any = None
    while time.monotonic() < deadline:
        if ((args.expect_commands or args.expect_call_answers) and stats.commands >= args.expect_commands
                and stats.call_answers >= args.expect_call_answers):
            break
        if args.json and (stats.answered, stats.commands) != last:
            last = (stats.answered, stats.commands)
            # ``commands``/``t``: what benchmarks of one-way commands count (bench/throughput.py).
            emit("answered", count=stats.answered, commands=stats.commands, t=round(time.time(), 3))
        await asyncio.sleep(args.report_interval)
    summary = dict(connected=stats.connected, failed=stats.failed, commands=stats.commands,
                   answered=stats.answered, failures_sent=stats.failures_sent, disconnects=stats.disconnects,
                   reconnects=stats.reconnects, calls=stats.calls, call_answers=stats.call_answers,
                   call_p50_ms=percentile(stats.call_latencies, 0.5), call_p99_ms=percentile(stats.call_latencies,
                                                                                           0.99))
    await asyncio.sleep(0.5)  # let the last answers leave the socket buffers
    fleet.close()
    if args.json:
        emit("done", **summary)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="nanoiot-sim summary" if args.transport == "mqtt" else
                      f"nanoiot-sim summary ({args.transport})")
        table.add_column("what")
        table.add_column("value", justify="right")
        for key, value in {**{f"connect {k}": v for k, v in connect_summary.items()}, **summary}.items():
            table.add_row(key, str(value))
        Console().print(table)
    return 0 if stats.failed == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nanoiot-sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transport", choices=("mqtt", "http", "coap"), default="mqtt",
                        help="how the devices talk to the server")
    parser.add_argument("--host", default=None, help="server address (default 127.0.0.1; for http, --url's host)")
    parser.add_argument("--port", type=int, default=None,
                        help="server port (default: mqtt 1883, coap 5683, http --url's port)")
    parser.add_argument("--tokens-file", help="one access token per line (written when --create is used)")
    parser.add_argument("--create", type=int, default=0, help="create N devices through the REST API first")
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="REST API, for --create (and where http devices "
                        "connect unless --host/--port say otherwise)")
    parser.add_argument("--user", default="tenant@nanoiot.io")
    parser.add_argument("--password", default="tenant")
    parser.add_argument("--prefix", default="sim", help="name prefix of created devices")
    parser.add_argument("--count", type=int, default=0, help="use only N tokens")
    parser.add_argument("--skip", type=int, default=0, help="skip the first N tokens (to split a fleet)")
    parser.add_argument("--concurrency", type=int, default=200, help="connections being opened at once")
    parser.add_argument("--rate", type=float, default=0, help="connections started per second (0: as fast as "
                        "--concurrency allows)")
    parser.add_argument("--bind", default=None, help="local address to connect from, e.g. 127.0.0.2 (each "
                        "source address has its own ~28k ephemeral ports)")
    parser.add_argument("--answer", choices=("echo", "ok", "delay", "fail", "none", "disconnect"), default="echo")
    parser.add_argument("--delay-ms", type=float, default=100.0, help="for --answer delay")
    parser.add_argument("--fail-rate", type=float, default=0.1, help="for --answer fail: share answered with an error")
    parser.add_argument("--call-method", default=None, help="device-to-server method to call, e.g. getCurrentTime")
    parser.add_argument("--call-interval", type=float, default=10.0, help="seconds between calls per device")
    parser.add_argument("--protocol", type=int, choices=(4, 5), default=4)
    parser.add_argument("--poll-timeout", type=int, default=30000, help="http: ms each long poll asks to wait")
    parser.add_argument("--expect-commands", type=int, default=0, help="stop after this many commands")
    parser.add_argument("--expect-call-answers", type=int, default=0,
                        help="stop once the server answered this many device calls (and --expect-commands came)")
    parser.add_argument("--hold", type=float, default=120.0, help="seconds to stay connected, at most")
    parser.add_argument("--json", action="store_true", help="JSON-line events instead of a progress bar")
    parser.add_argument("--report-interval", type=float, default=0.2, help="seconds between --json progress lines")
    args = parser.parse_args(argv)
    if not args.create and not args.tokens_file:
        parser.error("give --tokens-file or --create N")
    resolve_address(args)
    return asyncio.run(run_fleet(args))


if __name__ == "__main__":
    raise SystemExit(main())
