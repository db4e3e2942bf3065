"""Simulated devices on ThingsBoard's HTTP device API, for ``nanoiot-sim --transport http``.

Each device is one asyncio task on one keep-alive HTTP/1.1 connection (raw asyncio streams, a tiny client below: no
dependency beyond the standard library). It long-polls ``GET /api/v1/{token}/rpc?timeout=<ms>``; a 200 carries
``{"id","method","params"}``: the device applies its answer behaviour and answers with
``POST /api/v1/{token}/rpc/{id}`` on the same connection, then polls again; a 408 (nothing came in time) polls
again at once. A device counts as connected once its TCP connection is up and its first poll was sent.

Answer behaviours are MQTT's (echo, ok, delay, fail, none) except ``disconnect``: HTTP has no way to refuse a
command once its poll response was written (the server counts it delivered then), so an HTTP device told to
``disconnect`` takes the command, does not answer it, closes its connection and comes back (polls again) after
1 s. The command then ends as NO_RESPONSE on the server, not resent.

Device-to-server calls (``--call-method``) use a second keep-alive connection of the same device, opened at the
first call: a poll occupies the first one for up to ``--poll-timeout`` ms and HTTP/1.1 answers in order.

Also here: :func:`plan_answer`, the answer behaviour shared by the HTTP and CoAP devices.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import argparse

#: A response head larger than this is not from our server.
MAX_HEAD = 64 * 1024
#: A response body larger than this either (the device API caps bodies at 64 KiB; commands may be larger).
MAX_BODY = 64 * 1024 * 1024
#: Seconds to wait for a TCP connection.
CONNECT_TIMEOUT = 30.0
#: Seconds between a lost connection (or the ``disconnect`` behaviour) and the device's return.
RECONNECT_DELAY = 1.0


def echo_body(command: dict[str, Any]) -> bytes:
    """What an echoing device answers: the command as MQTT devices get it, ``{"method","params"}``."""
    return json.dumps({"method": command.get("method"), "params": command.get("params")},
                      separators=(",", ":")).encode()


def plan_answer(behaviour: Any, stats: Any, command: dict[str, Any]) -> tuple[float, bytes] | None:
    """(seconds to wait, answer body) for one command under the echo|ok|delay|fail|none behaviours; None: no answer.

    ``disconnect`` is the caller's business (each transport drops its own way).
    """
    mode = behaviour.answer
    if mode == "none" or mode == "disconnect":
        return None
    if mode == "delay":
        return behaviour.delay_ms / 1000.0, echo_body(command)
    if mode == "fail" and random.random() < behaviour.fail_rate:
        stats.failures_sent += 1
        return 0.0, b'{"error":"simulated failure"}'
    if mode == "ok":
        return 0.0, b'{"ok":true}'
    return 0.0, echo_body(command)


def call_body(behaviour: Any) -> bytes:
    return json.dumps({"method": behaviour.call_method, "params": {}}).encode()


# --- a tiny HTTP/1.1 client -----------------------------------------------------------------------------------------


class HttpError(Exception):
    """A response we cannot read: the connection is not usable any more."""


class HttpConnection:
    """One keep-alive HTTP/1.1 connection: one request at a time, Content-Length or chunked response bodies."""

    def __init__(self, host: str, port: int, bind: str | None = None) -> None:
        self.host = host
        self.port = port
        self.bind = bind
        self.host_header = f"{host}:{port}".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        #: False once either side said ``Connection: close`` or the connection failed.
        self.usable = False

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=MAX_HEAD,
                                    local_addr=(self.bind, 0) if self.bind else None),
            CONNECT_TIMEOUT)
        self.usable = True

    async def send(self, method: str, target: str, body: bytes | None = None) -> None:
        if self.writer is None or not self.usable:
            raise ConnectionResetError("connection closed")
        head = [f"{method} {target} HTTP/1.1".encode(), b"Host: " + self.host_header]
        if body is not None:
            head += [b"Content-Type: application/json", b"Content-Length: " + str(len(body)).encode()]
        self.writer.write(b"\r\n".join(head) + b"\r\n\r\n" + (body or b""))
        await self.writer.drain()

    async def read_response(self) -> tuple[int, bytes]:
        """(status, body) of the next response on the connection."""
        reader = self.reader
        if reader is None:
            raise ConnectionResetError("connection closed")
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                raise HttpError("response head too large") from None
            lines = head[:-4].split(b"\r\n")
            parts = lines[0].split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
                raise HttpError(f"bad status line {lines[0][:80]!r}")
            status = int(parts[1])
            if 100 <= status < 200:
                continue  # 100 Continue and friends: the real response follows
            break
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        connection = headers.get(b"connection", b"").lower()
        if connection == b"close" or (parts[0] == b"HTTP/1.0" and connection != b"keep-alive"):
            self.usable = False
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            body = await self._read_chunked(reader)
        elif b"content-length" in headers:
            try:
                length = int(headers[b"content-length"])
            except ValueError:
                raise HttpError("bad Content-Length") from None
            if not 0 <= length <= MAX_BODY:
                raise HttpError(f"Content-Length {length}")
            body = await reader.readexactly(length)
        elif status in (204, 304):
            body = b""
        else:  # framed by the end of the connection
            self.usable = False
            body = await reader.read(MAX_BODY)
            while len(body) < MAX_BODY and not reader.at_eof():
                more = await reader.read(MAX_BODY - len(body))
                if not more:
                    break
                body += more
        return status, body

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        chunks = []
        total = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise HttpError("bad chunk size") from None
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                return b"".join(chunks)
            total += size
            if total > MAX_BODY:
                raise HttpError("chunked body too large")
            chunks.append((await reader.readexactly(size + 2))[:-2])

    async def request(self, method: str, target: str, body: bytes | None = None) -> tuple[int, bytes]:
        await self.send(method, target, body)
        return await self.read_response()

    def close(self) -> None:
        self.usable = False
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


#: What makes a connection unusable: the peer closed it, it reset, or it spoke something we cannot read.
CONNECTION_ERRORS = (OSError, EOFError, asyncio.IncompleteReadError, asyncio.TimeoutError, HttpError)


# --- devices --------------------------------------------------------------------------------------------------------


class HttpDevice:
    """One device: a poll loop on one connection, plus a call loop on another when it calls the server."""

    def __init__(self, fleet: HttpFleet, token: str) -> None:
        self.fleet = fleet
        self.stats = fleet.stats
        self.behaviour = fleet.behaviour
        self.token = token
        quoted = urllib.parse.quote(token, safe="")
        self.rpc_path = f"/api/v1/{quoted}/rpc"
        self.poll_target = f"{self.rpc_path}?timeout={fleet.poll_timeout_ms}"
        self.connection: HttpConnection | None = None
        self.call_connection: HttpConnection | None = None
        self.tasks: list[asyncio.Task] = []
        self.running = True

    def _connection(self) -> HttpConnection:
        return HttpConnection(self.fleet.host, self.fleet.port, self.fleet.bind)

    async def start(self) -> bool:
        """Connect and send the first poll; True when both happened (the device then runs on its own)."""
        connection = self._connection()
        try:
            await connection.open()
            await connection.send("GET", self.poll_target)
        except CONNECTION_ERRORS:
            connection.close()
            return False
        self.connection = connection
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(self._poll_loop()))
        if self.behaviour.call_method:
            self.tasks.append(loop.create_task(self._call_loop()))
        return True

    async def _poll_loop(self) -> None:
        poll_sent = True  # start() sent the first one
        while self.running:
            connection = self.connection
            try:
                if connection is None:
                    raise ConnectionResetError("not connected")
                if not poll_sent:
                    await connection.send("GET", self.poll_target)
                poll_sent = False
                status, body = await connection.read_response()
                if status == 200:
                    poll_sent = await self._on_command(connection, body)
            except CONNECTION_ERRORS:
                poll_sent = await self._reconnect()
                continue
            if status in (200, 408):
                pass  # handled, or nothing came within the poll's timeout: poll again
            elif status == 401:
                # The server does not know this token: the device was counted connected (its poll went out), it is
                # a failed one after all; nothing more to do.
                self.fleet.unauthorized += 1
                self.stats.connected -= 1
                self.stats.failed += 1
                self.stop()
                return
            else:
                await asyncio.sleep(RECONNECT_DELAY)  # 5xx, 429...: back off a little
            if self.connection is not None and not self.connection.usable:
                poll_sent = await self._reconnect()

    async def _reconnect(self) -> bool:
        """Close the connection and come back after a pause; True when the first poll on the new one was sent."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        while self.running:
            await asyncio.sleep(RECONNECT_DELAY)
            if not self.running:
                break
            connection = self._connection()
            try:
                await connection.open()
                await connection.send("GET", self.poll_target)
            except CONNECTION_ERRORS:
                connection.close()
                continue
            self.connection = connection
            self.stats.reconnects += 1
            return True
        return False

    async def _on_command(self, connection: HttpConnection, body: bytes) -> bool:
        """Handle one command; True when the device already sent its next poll (it came back after dropping)."""
        try:
            command = json.loads(body)
            request_id = int(command["id"])
        except (ValueError, TypeError, KeyError):
            return False  # not a command: poll again
        self.stats.commands += 1
        if self.behaviour.answer == "disconnect":
            self.stats.disconnects += 1
            return await self._reconnect()
        plan = plan_answer(self.behaviour, self.stats, command)
        if plan is None:
            return False
        delay, answer = plan
        if delay > 0:
            await asyncio.sleep(delay)
        status, _ = await connection.request("POST", f"{self.rpc_path}/{request_id}", answer)
        if status == 200:
            self.stats.answered += 1
        return False

    async def _call_loop(self) -> None:
        body = call_body(self.behaviour)
        while self.running:
            await asyncio.sleep(random.uniform(0.5, 1.5) * self.behaviour.call_interval)
            if not self.running:
                break
            connection = self.call_connection
            try:
                if connection is None or not connection.usable:
                    if connection is not None:
                        connection.close()
                    connection = self.call_connection = self._connection()
                    await connection.open()
                self.stats.calls += 1
                started = time.perf_counter()
                status, _ = await connection.request("POST", self.rpc_path, body)
            except CONNECTION_ERRORS:
                if self.call_connection is not None:
                    self.call_connection.close()
                self.call_connection = None
                continue
            if status == 200:
                self.stats.call_answers += 1
                self.stats.call_latencies.append(time.perf_counter() - started)

    def stop(self) -> None:
        self.running = False
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()
        for connection in (self.connection, self.call_connection):
            if connection is not None:
                connection.close()
        self.connection = self.call_connection = None


class HttpFleet:
    """The HTTP devices of one ``nanoiot-sim`` process; the same interface as the MQTT ``Fleet``."""

    def __init__(self, args: argparse.Namespace, tokens: list[str], stats: Any, behaviour: Any) -> None:
        self.args = args
        self.tokens = tokens
        self.stats = stats
        self.behaviour = behaviour
        self.host = args.host
        self.port = args.port
        self.bind = args.bind
        self.poll_timeout_ms = args.poll_timeout
        self.devices: list[HttpDevice | None] = [None] * len(tokens)
        #: Devices the server answered 401 (they stop).
        self.unauthorized = 0
        self.running = True

    async def connect(self, index: int) -> bool:
        started = time.perf_counter()
        device = HttpDevice(self, self.tokens[index])
        if not await device.start():
            return False
        self.devices[index] = device
        self.stats.connect_latencies.append(time.perf_counter() - started)
        return True

    def close(self) -> None:
        self.running = False
        for device in self.devices:
            if device is not None:
                device.stop()
