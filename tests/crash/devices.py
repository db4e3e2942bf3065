"""Devices for the crash test: a small asyncio MQTT fleet that records every command it receives.

Run as a subprocess by tests/integration/test_crash_recovery.py (``python tests/crash/devices.py --port P
--tokens-file F``). Each device connects with its access token, subscribes to commands, and for every command it
receives: first writes a record of it to stdout, then PUBACKs it and, when the command's params say
``"twoway": true``, answers it. With ``--hold-answers`` the devices keep their answers (as devices still working on
them) until the line ``release`` arrives on stdin; from then on they answer at once. Redeliveries are recorded and
answered again: de-duplication is the test's job, which sees every receipt.

Answers are published at QoS 1 and behave as in a usual MQTT client library (paho, for one): an answer is kept
until the server's PUBACK for it arrives; one that was due while the device was disconnected, or that was written
but never acknowledged, is published (again) as soon as the device is connected and subscribed again.

When the server goes away (the test kills it with SIGKILL) every device reconnects on its own, with a bounded
backoff, until it is connected again or ``--give-up`` seconds passed without a connection.

Output, one JSON object per line on stdout:
``{"event": "connected", "token": T, "connection": C}`` (C counts this device's successful connections from 1),
``{"event": "command", "token": T, "connection": C, "request_id": N, "t": epoch seconds, "method": M,
"twoway": B}``, ``{"event": "answered", "token": T, "connection": C, "request_id": N, "again": B}`` when an answer
is written, ``{"event": "answer_acked", "token": T, "connection": C, "request_id": N}`` when the server's PUBACK
for it came, ``{"event": "disconnected", "token": T, "connection": C}``, ``{"event": "gave_up", "token": T}``,
``{"event": "released"}`` once held answers were released and, on SIGTERM, ``{"event": "stopped", "commands": N}``
before a clean exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
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


class Fleet:
    def __init__(self, hold_answers: bool) -> None:
        self.holding_answers = hold_answers
        self.counters = Counters()
        self.devices: list[Device] = []

    def release_answers(self) -> None:
        self.holding_answers = False
        for device in self.devices:
            device.release_answers()
        emit("released")


class Device:
    """What outlives a connection: the device's answers not yet acknowledged by the server."""

    def __init__(self, token: str, fleet: Fleet) -> None:
        self.token = token
        self.fleet = fleet
        self.counters = fleet.counters
        #: request id -> answer payload, made but held until the fleet releases answers.
        self.held_answers: dict[int, bytes] = {}
        #: request id -> answer payload, in the order the answers were made; removed on the server's PUBACK.
        self.unacknowledged_answers: dict[int, bytes] = {}
        self.connection: DeviceConnection | None = None  # set while connected and subscribed

    def answer(self, request_id: int, answer: bytes) -> None:
        if self.fleet.holding_answers:
            self.held_answers[request_id] = answer
        else:
            self.answer_ready(request_id, answer)

    def release_answers(self) -> None:
        held, self.held_answers = self.held_answers, {}
        for request_id, answer in held.items():
            self.answer_ready(request_id, answer)

    def answer_ready(self, request_id: int, answer: bytes) -> None:
        self.unacknowledged_answers[request_id] = answer
        if self.connection is not None:
            self.connection.publish_answer(request_id, answer, again=False)

    def subscribed(self, connection: DeviceConnection) -> None:
        self.connection = connection
        for request_id, answer in list(self.unacknowledged_answers.items()):
            connection.publish_answer(request_id, answer, again=True)


class DeviceConnection(asyncio.Protocol):
    """One MQTT connection of one device; ``closed`` resolves when it ends, ``subscribed`` once SUBACK came."""

    def __init__(self, device: Device, connection: int) -> None:
        self.device = device
        self.token = device.token
        self.connection = connection
        self.reader = codec.FrameReader(16 * 1024 * 1024)
        self.transport: asyncio.Transport | None = None
        self.next_pid = 0
        #: packet id -> request id of an answer published on this connection, until its PUBACK.
        self.answers_in_flight: dict[int, int] = {}
        loop = asyncio.get_running_loop()
        self.subscribed: asyncio.Future = loop.create_future()
        self.closed: asyncio.Future = loop.create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(codec.encode_connect("", protocol_level=LEVEL, username=self.token, keep_alive=0))

    def data_received(self, data: bytes) -> None:
        try:
            for frame in self.reader.feed(data):
                if frame.packet_type == codec.CONNACK:
                    if codec.decode(frame, LEVEL).reason_code != 0:
                        self.transport.close()
                        return
                    self.transport.write(codec.encode_subscribe(self._packet_id(), [(RPC_FILTER, 1)], LEVEL))
                elif frame.packet_type == codec.SUBACK:
                    if not self.subscribed.done():
                        self.subscribed.set_result(True)
                elif frame.packet_type == codec.PUBLISH:
                    self._on_publish(codec.decode(frame, LEVEL))
                elif frame.packet_type == codec.PUBACK:
                    request_id = self.answers_in_flight.pop(codec.decode(frame, LEVEL).packet_id, None)
                    if request_id is not None:
                        self.device.unacknowledged_answers.pop(request_id, None)
                        emit("answer_acked", token=self.token, connection=self.connection, request_id=request_id)
        except Exception as exc:  # noqa: BLE001 - a bad frame ends this connection, visibly
            sys.stderr.write(f"device {self.token}: {exc!r}\n")
            self.transport.close()

    def _packet_id(self) -> int:
        self.next_pid = self.next_pid % 65535 + 1
        return self.next_pid

    def _on_publish(self, publish: Any) -> None:
        if not publish.topic.startswith(REQUEST_PREFIX):
            if publish.qos == 1:
                self.transport.write(codec.encode_puback(publish.packet_id, LEVEL))
            return
        request_id = int(publish.topic[len(REQUEST_PREFIX):])
        body = json.loads(publish.payload)
        params = body.get("params") or {}
        twoway = bool(params.get("twoway")) if isinstance(params, dict) else False
        # Recorded before anything is sent back: whatever the server learns, the test knows the device got it.
        self.device.counters.commands += 1
        emit("command", token=self.token, connection=self.connection, request_id=request_id, t=time.time(),
             method=body.get("method"), twoway=twoway)
        if publish.qos == 1:
            self.transport.write(codec.encode_puback(publish.packet_id, LEVEL))
        if twoway:
            self.device.answer(request_id, json.dumps({"method": body.get("method"), "ok": True}).encode())

    def publish_answer(self, request_id: int, answer: bytes, again: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # kept in unacknowledged_answers: published on the next connection
        packet_id = self._packet_id()
        self.answers_in_flight[packet_id] = request_id
        emit("answered", token=self.token, connection=self.connection, request_id=request_id, again=again)
        self.transport.write(codec.encode_publish(RESPONSE_PREFIX + str(request_id), answer, 1, packet_id, LEVEL))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.device.connection is self:
            self.device.connection = None
        if not self.subscribed.done():
            self.subscribed.set_result(False)
        if not self.closed.done():
            self.closed.set_result(None)


async def run_device(host: str, port: int, device: Device, give_up: float) -> None:
    loop = asyncio.get_running_loop()
    connections = 0
    delay = BACKOFF_FIRST
    last_connected = loop.time()
    while True:
        if loop.time() - last_connected > give_up:
            emit("gave_up", token=device.token)
            return
        try:
            transport, connection = await loop.create_connection(
                lambda: DeviceConnection(device, connections + 1), host, port)
        except OSError:
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
            continue
        try:
            ok = await asyncio.wait_for(asyncio.shield(connection.subscribed), 10)
        except asyncio.TimeoutError:
            ok = False
        if not ok:
            transport.close()
            await connection.closed
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
            continue
        connections += 1
        delay = BACKOFF_FIRST
        emit("connected", token=device.token, connection=connections)
        device.subscribed(connection)
        await connection.closed
        last_connected = loop.time()
        emit("disconnected", token=device.token, connection=connections)


async def follow_stdin(fleet: Fleet) -> None:
    """``release`` on stdin releases the held answers; the end of stdin is ignored."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            return
        if line.strip() == b"release":
            fleet.release_answers()


async def main_async(args: argparse.Namespace) -> int:
    with open(args.tokens_file) as handle:
        tokens = [line.strip() for line in handle if line.strip()]
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(None))
    fleet = Fleet(args.hold_answers)
    fleet.devices = [Device(t, fleet) for t in tokens]
    stdin = asyncio.ensure_future(follow_stdin(fleet))
    devices = [asyncio.ensure_future(run_device(args.host, args.port, d, args.give_up)) for d in fleet.devices]
    everyone_gave_up = asyncio.ensure_future(asyncio.gather(*devices, return_exceptions=True))
    await asyncio.wait([stop, everyone_gave_up], return_when=asyncio.FIRST_COMPLETED)
    for task in devices + [stdin]:
        task.cancel()
    emit("stopped", commands=fleet.counters.commands)
    return 0 if stop.done() else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens-file", required=True, help="one access token per line")
    parser.add_argument("--give-up", type=float, default=120.0,
                        help="seconds without a connection after which a device stops trying")
    parser.add_argument("--hold-answers", action="store_true",
                        help="keep the answers of two-way commands until 'release' arrives on stdin")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
