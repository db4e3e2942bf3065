"""Devices for the crash test: a small asyncio MQTT fleet that records every command it receives.

Run as a subprocess by tests/integration/test_crash_recovery.py (``python tests/crash/devices.py --port P
--tokens-file F``). Each device connects with its access token, subscribes to commands, and for every command it
receives: first writes a record of it to stdout, then PUBACKs it and, when the command's params say
``"twoway": true``, answers it. Redeliveries are recorded and answered again: de-duplication is the test's job,
which sees every receipt.

When the server goes away (the test kills it with SIGKILL) every device reconnects on its own, with a bounded
backoff, until it is connected again or ``--give-up`` seconds passed without a connection.

Output, one JSON object per line on stdout:
``{"event": "connected", "token": T, "connection": C}`` (C counts this device's successful connections from 1),
``{"event": "command", "token": T, "connection": C, "request_id": N, "method": M, "twoway": B}``,
``{"event": "disconnected", "token": T, "connection": C}``, ``{"event": "gave_up", "token": T}`` and, on SIGTERM,
``{"event": "stopped", "commands": N}`` before a clean exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

from nanoiot.transports.mqtt import codec

RPC_FILTER = "v1/devices/me/rpc/request/+"
REQUEST_PREFIX = "v1/devices/me/rpc/request/"
RESPONSE_PREFIX = "v1/devices/me/rpc/response/"
LEVEL = 4  # MQTT 3.1.1

BACKOFF_FIRST = 0.05
BACKOFF_MAX = 1.0


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Counters:
    commands = 0


class DeviceConnection(asyncio.Protocol):
    """One MQTT connection of one device; ``closed`` resolves when it ends, ``subscribed`` once SUBACK came."""

    def __init__(self, token: str, connection: int, counters: Counters) -> None:
        self.token = token
        self.connection = connection
        self.counters = counters
        self.reader = codec.FrameReader(16 * 1024 * 1024)
        self.transport: asyncio.Transport | None = None
        self.next_pid = 0
        loop = asyncio.get_running_loop()
        self.subscribed: asyncio.Future = loop.create_future()
        self.closed: asyncio.Future = loop.create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(codec.encode_connect("", protocol_level=LEVEL, username=self.token, keep_alive=0))

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
            for frame in frames:
                if frame.packet_type == codec.CONNACK:
                    if codec.decode(frame, LEVEL).reason_code != 0:
                        self.transport.close()
                        return
                    self.next_pid += 1
                    self.transport.write(codec.encode_subscribe(self.next_pid, [(RPC_FILTER, 1)], LEVEL))
                elif frame.packet_type == codec.SUBACK:
                    if not self.subscribed.done():
                        self.subscribed.set_result(True)
                elif frame.packet_type == codec.PUBLISH:
                    self._on_publish(codec.decode(frame, LEVEL))
        except Exception as exc:  # noqa: BLE001 - a bad frame ends this connection, visibly
            sys.stderr.write(f"device {self.token}: {exc!r}\n")
            self.transport.close()

    def _on_publish(self, publish: Any) -> None:
        if not publish.topic.startswith(REQUEST_PREFIX):
            if publish.qos == 1:
                self.transport.write(codec.encode_puback(publish.packet_id, LEVEL))
            return
        request_id = publish.topic[len(REQUEST_PREFIX):]
        body = json.loads(publish.payload)
        params = body.get("params") or {}
        twoway = bool(params.get("twoway")) if isinstance(params, dict) else False
        # Recorded before anything is sent back: whatever the server learns, the test knows the device got it.
        self.counters.commands += 1
        emit("command", token=self.token, connection=self.connection, request_id=int(request_id),
             method=body.get("method"), twoway=twoway)
        if publish.qos == 1:
            self.transport.write(codec.encode_puback(publish.packet_id, LEVEL))
        if twoway:
            self.next_pid = self.next_pid % 65535 + 1
            answer = json.dumps({"method": body.get("method"), "ok": True}).encode()
            self.transport.write(codec.encode_publish(RESPONSE_PREFIX + request_id, answer, 1, self.next_pid, LEVEL))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.subscribed.done():
            self.subscribed.set_result(False)
        if not self.closed.done():
            self.closed.set_result(None)


async def run_device(host: str, port: int, token: str, give_up: float, counters: Counters) -> None:
    loop = asyncio.get_running_loop()
    connections = 0
    delay = BACKOFF_FIRST
    last_connected = loop.time()
    while True:
        if loop.time() - last_connected > give_up:
            emit("gave_up", token=token)
            return
        try:
            transport, device = await loop.create_connection(
                lambda: DeviceConnection(token, connections + 1, counters), host, port)
        except OSError:
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
            continue
        try:
            ok = await asyncio.wait_for(asyncio.shield(device.subscribed), 10)
        except asyncio.TimeoutError:
            ok = False
        if not ok:
            transport.close()
            await device.closed
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
            continue
        connections += 1
        delay = BACKOFF_FIRST
        emit("connected", token=token, connection=connections)
        await device.closed
        last_connected = loop.time()
        emit("disconnected", token=token, connection=connections)


async def main_async(args: argparse.Namespace) -> int:
    with open(args.tokens_file) as handle:
        tokens = [line.strip() for line in handle if line.strip()]
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(None))
    counters = Counters()
    devices = [asyncio.ensure_future(run_device(args.host, args.port, t, args.give_up, counters)) for t in tokens]
    everyone_gave_up = asyncio.ensure_future(asyncio.gather(*devices))
    await asyncio.wait([stop, everyone_gave_up], return_when=asyncio.FIRST_COMPLETED)
    for task in devices:
        task.cancel()
    emit("stopped", commands=counters.commands)
    return 0 if stop.done() else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens-file", required=True, help="one access token per line")
    parser.add_argument("--give-up", type=float, default=120.0,
                        help="seconds without a connection after which a device stops trying")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
