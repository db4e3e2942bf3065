"""A fleet of simulated MQTT devices in one asyncio process, built on NanoIoT's own codec.

Each device connects with its access token, subscribes to commands and answers them (echo by default). The
process reports progress as JSON lines on stdout so that a test or benchmark can follow it without parsing logs:
``{"event": "connected", "count": N, ...}``, ``{"event": "answered", "count": N}``, ``{"event": "done", ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from nanoiot.transports.mqtt import codec

RPC_FILTER = "v1/devices/me/rpc/request/+"
REQUEST_PREFIX = "v1/devices/me/rpc/request/"
RESPONSE_PREFIX = "v1/devices/me/rpc/response/"


@dataclass
class FleetStats:
    connected: int = 0
    failed: int = 0
    commands: int = 0
    answered: int = 0
    connect_latencies: list[float] = field(default_factory=list)


class SimulatedDevice(asyncio.Protocol):
    """One device: CONNECT, SUBSCRIBE, then PUBACK and answer every command it gets."""

    def __init__(self, token: str, stats: FleetStats, answer: str, level: int, ready: asyncio.Future) -> None:
        self.token = token
        self.stats = stats
        self.answer = answer
        self.level = level
        self.ready = ready
        self.reader = codec.FrameReader(16 * 1024 * 1024)
        self.transport: asyncio.Transport | None = None
        self.next_pid = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(codec.encode_connect("", protocol_level=self.level, username=self.token, keep_alive=300))

    def data_received(self, data: bytes) -> None:
        for frame in self.reader.feed(data):
            if frame.packet_type == codec.CONNACK:
                connack = codec.decode(frame, self.level)
                if connack.reason_code != 0:
                    self._finish(False)
                    return
                self.next_pid += 1
                self.transport.write(codec.encode_subscribe(self.next_pid, [(RPC_FILTER, 1)], self.level))
            elif frame.packet_type == codec.SUBACK:
                self._finish(True)
            elif frame.packet_type == codec.PUBLISH:
                self._on_publish(codec.decode(frame, self.level))

    def _on_publish(self, publish: Any) -> None:
        if publish.qos == 1:
            self.transport.write(codec.encode_puback(publish.packet_id, self.level))
        if not publish.topic.startswith(REQUEST_PREFIX):
            return
        self.stats.commands += 1
        if self.answer == "none":
            return
        request_id = publish.topic[len(REQUEST_PREFIX):]
        body = publish.payload if self.answer == "echo" else b'{"ok":true}'
        self.next_pid = self.next_pid % 65535 + 1
        self.transport.write(codec.encode_publish(RESPONSE_PREFIX + request_id, body, 1, self.next_pid, self.level))
        self.stats.answered += 1

    def _finish(self, ok: bool) -> None:
        if not self.ready.done():
            self.ready.set_result(ok)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(False)


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def connect_one(loop: asyncio.AbstractEventLoop, host: str, port: int, token: str, stats: FleetStats,
                      answer: str, level: int, bind: str | None = None) -> Any:
    ready: asyncio.Future = loop.create_future()
    started = time.perf_counter()
    try:
        transport, _ = await loop.create_connection(
            lambda: SimulatedDevice(token, stats, answer, level, ready), host, port,
            local_addr=(bind, 0) if bind else None)
        ok = await asyncio.wait_for(ready, 30)
    except (OSError, asyncio.TimeoutError):
        stats.failed += 1
        return None
    if ok:
        stats.connected += 1
        stats.connect_latencies.append(time.perf_counter() - started)
        return transport
    stats.failed += 1
    transport.close()
    return None


async def run_fleet(args: argparse.Namespace) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200_000, 200_000))  # allowed for root
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with open(args.tokens_file) as handle:
        tokens = [line.strip() for line in handle if line.strip()][args.skip:]
    if args.count:
        tokens = tokens[: args.count]
    loop = asyncio.get_running_loop()
    stats = FleetStats()
    limit = asyncio.Semaphore(args.concurrency)
    started = time.perf_counter()

    async def guarded(index: int, token: str) -> Any:
        if args.rate:
            # A steady ramp: connection i starts i/rate seconds in.
            delay = started + index / args.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        async with limit:
            return await connect_one(loop, args.host, args.port, token, stats, args.answer, args.protocol,
                                     args.bind)

    transports = await asyncio.gather(*(guarded(i, t) for i, t in enumerate(tokens)))
    elapsed = time.perf_counter() - started
    latencies = sorted(stats.connect_latencies)
    emit("connected", count=stats.connected, failed=stats.failed, seconds=round(elapsed, 3),
         p50_ms=round(latencies[len(latencies) // 2] * 1000, 2) if latencies else None)
    deadline = time.monotonic() + args.hold
    last = -1
    while time.monotonic() < deadline:
        if args.expect_commands and stats.commands >= args.expect_commands:
            break
        if stats.answered != last:
            last = stats.answered
            emit("answered", count=stats.answered)
        await asyncio.sleep(0.2)
    emit("done", connected=stats.connected, failed=stats.failed, commands=stats.commands, answered=stats.answered)
    await asyncio.sleep(0.5)  # let the last answers leave the socket buffers
    for transport in transports:
        if transport is not None:
            transport.close()
    return 0 if stats.failed == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--tokens-file", required=True, help="one access token per line")
    parser.add_argument("--count", type=int, default=0, help="use only N tokens")
    parser.add_argument("--skip", type=int, default=0, help="skip the first N tokens (to split a fleet)")
    parser.add_argument("--rate", type=float, default=0, help="connections started per second (0: as fast as "
                        "--concurrency allows)")
    parser.add_argument("--bind", default=None, help="local address to connect from, e.g. 127.0.0.2 (each "
                        "source address has its own ~28k ephemeral ports)")
    parser.add_argument("--concurrency", type=int, default=200, help="connections being opened at once")
    parser.add_argument("--answer", choices=("echo", "ok", "none"), default="echo")
    parser.add_argument("--protocol", type=int, choices=(4, 5), default=4)
    parser.add_argument("--expect-commands", type=int, default=0, help="stop after this many commands")
    parser.add_argument("--hold", type=float, default=120.0, help="seconds to stay connected, at most")
    return asyncio.run(run_fleet(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
