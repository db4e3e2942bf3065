"""MQTT load generator, two modes: a publish/PUBACK load and a connect storm (both asyncio, one process).

    python bench/loadgen.py --port 1883 --pid SERVER_PID --label nanoiot --tokens-file tokens.txt
    python bench/loadgen.py --port 18831 --pid MOSQUITTO_PID --label mosquitto --token 'dev{i}'
    python bench/loadgen.py --port 1883 --pid SERVER_PID --tokens-file tokens.txt --connect 10000 --concurrency 100

Modelled on the peers study (/work/shared/spec/peers.md) so that NanoIoT, Mosquitto and amqtt are measured by the
same code (bench/peers.py runs both modes against all three). Every connection does TCP connect -> CONNECT (MQTT
3.1.1, clean session, user name = a device token, unique client id, keep-alive 300) -> CONNACK -> SUBSCRIBE
``v1/devices/me/rpc/request/+`` QoS 1 -> SUBACK.

Publish mode (default): C connections (``--connections``, 32), each keeping W (``--window``, 64) QoS 1 PUBLISHes to
``v1/devices/me/rpc/response/1`` (60-byte JSON payload) unacknowledged and sending a new one for every PUBACK.
After a warmup (1 s) comes the measuring window (10 s): PUBACK/s counts the PUBACKs that arrive inside it, p50/p99
are the publish->PUBACK latencies of those PUBACKs. Then the refills stop and the outstanding PUBLISHes drain (at
most 5 s). Cheap per message: the 65,535 possible PUBLISH packets are encoded once, each received chunk is stamped
with one clock read, and all refills a chunk causes leave in one write.

Connect mode (``--connect N``): opens N connections, at most ``--concurrency`` handshakes in progress at once, and
keeps them open. Cheap per connection: raw non-blocking sockets on the asyncio loop's selector (no transport,
protocol, coroutine or future per connection), the CONNECT of every token encoded before the clock starts, one
SUBSCRIBE packet shared by all, and no decoding beyond checking the 4-byte CONNACK and the 5-byte SUBACK. Reports
connected and failed (by cause; a handshake that takes over 30 s is a failure), conn/s = connected / (time from the
first attempt to the last SUBACK), connect latency p50/p99 (TCP connect start -> SUBACK), the generator's own CPU
us per connection and, with ``--pid``, the server's CPU us per connection over the same interval (plus, separately,
what it spent in the settle after it) and its VmRSS before the storm and 2 s (``--settle``) after the last SUBACK:
KB per connection = (after - before) / connected, as in the peers study. Also the system-wide TcpExt
ListenOverflows/ListenDrops/TCPTimeouts deltas (an overflowing accept queue costs a client a 1 s SYN retransmit).
The connections are then held ``--hold`` seconds and closed with DISCONNECT.
Each storm binds its sockets to a fresh random loopback source subnet, 127.X.0.2, .3, ... (X random; one address
per 20,000 connections, an address has ~28,000 ephemeral ports): the previous storm's sockets sit in TIME_WAIT for
60 s on theirs. The generator raises RLIMIT_NOFILE to the hard limit (20,000 here), so keep N <= ~15,000 per
generator process.

With ``--pid`` it waits (at most 60 s) until the server uses under 5 % of a core, and reads the server's CPU time
(utime + stime of all its threads, /proc/PID/stat) at the start and end of the measurement: server CPU us per PUBACK
or per connection is the figure that does not depend on the load generator, which shares the machine.

NanoIoT checks the user name against its device tokens; Mosquitto and amqtt with anonymous access ignore it, so the
same tokens do for all three. It prints one JSON line (``--json``) or a short summary.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import errno
import ipaddress
import json
import os
import random
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanoiot.transports.mqtt import codec  # noqa: E402

TOPIC = "v1/devices/me/rpc/response/1"
COMMAND_FILTER = "v1/devices/me/rpc/request/+"
PAYLOAD = b'{"ts":1700000000000,"temperature":21.5,"humidity":40,"ok":1}'
assert len(PAYLOAD) == 60, len(PAYLOAD)

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def server_cpu(pid: int | None) -> float | None:
    """utime + stime of a process (all its threads) in seconds, from /proc/PID/stat."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_for_quiet(max_load: float, limit: float, say: Any = None) -> float:
    """The machine is shared: wait (at most ``limit`` s) until the 1-minute load average is under ``max_load``.

    Returns the load average when measuring starts (the caller records it next to the figures).
    """
    deadline = time.monotonic() + limit
    load = loadavg()
    told = False
    while load >= max_load and time.monotonic() < deadline:
        if say is not None and not told:
            say(f"1-minute load {load:.2f} >= {max_load}: waiting up to {limit:.0f} s for the machine to quieten")
            told = True
        time.sleep(5)
        load = loadavg()
    return load


def _publish_table() -> list[bytes]:
    """Every QoS 1 PUBLISH we can send, indexed by packet id (1..65535): encoded once, shared by all connections."""
    table = [b""]
    for packet_id in range(1, 65536):
        table.append(codec.encode_publish(TOPIC, PAYLOAD, 1, packet_id, 4))
    return table


class Stats:
    def __init__(self) -> None:
        self.in_window = False
        self.refill = True
        self.window_acks = 0
        self.latencies = array.array("d")
        self.acked = 0
        self.sent = 0
        self.unknown = 0
        self.lost = 0


class PublishConnection(asyncio.Protocol):
    """One client: CONNECT, SUBSCRIBE, then W PUBLISHes in flight, one new PUBLISH per PUBACK."""

    def __init__(self, token: str, client_id: str, window: int, stats: Stats, table: list[bytes],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.token = token
        self.client_id = client_id
        self.window = window
        self.stats = stats
        self.table = table
        self.reader = codec.FrameReader(1 << 20)
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future = loop.create_future()
        self.closed: asyncio.Future = loop.create_future()
        self.sent_at = [0.0] * 65536
        self.next_pid = 0
        self.inflight = 0
        self.publishing = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(codec.encode_connect(self.client_id, 4, username=self.token, keep_alive=300))

    def start(self) -> None:
        self.publishing = True
        self._send(self.window, time.perf_counter())

    def _send(self, count: int, now: float) -> None:
        table, sent_at = self.table, self.sent_at
        pid = self.next_pid
        parts = []
        for _ in range(count):
            pid = pid + 1 if pid < 65535 else 1
            sent_at[pid] = now
            parts.append(table[pid])
        self.next_pid = pid
        self.inflight += count
        self.stats.sent += count
        self.transport.write(b"".join(parts))  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        try:
            frames = self.reader.feed(data)
        except codec.MqttError:
            self.transport.close()  # type: ignore[union-attr]
            return
        stats = self.stats
        sent_at = self.sent_at
        acks = 0
        for kind, _flags, body in frames:
            if kind == codec.PUBACK:
                pid = body[0] << 8 | body[1]
                started = sent_at[pid]
                if started == 0.0:
                    stats.unknown += 1
                    continue
                sent_at[pid] = 0.0
                acks += 1
                if stats.in_window:
                    stats.latencies.append(now - started)
            elif kind == codec.CONNACK:
                if len(body) < 2 or body[1] != 0:
                    self.transport.close()  # type: ignore[union-attr]
                    return
                self.transport.write(codec.encode_subscribe(1, [(COMMAND_FILTER, 1)], 4))  # type: ignore[union-attr]
            elif kind == codec.SUBACK:
                if not self.ready.done():
                    self.ready.set_result(True)
        if acks:
            self.inflight -= acks
            stats.acked += acks
            if stats.in_window:
                stats.window_acks += acks
            if stats.refill and self.publishing:
                self._send(acks, now)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.publishing:
            self.stats.lost += 1
        if not self.ready.done():
            self.ready.set_result(False)
        if not self.closed.done():
            self.closed.set_result(None)


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


async def wait_idle(pid: int, threshold: float = 0.05, limit: float = 60.0) -> float:
    """Wait until the server uses under ``threshold`` of a core (0.5 s samples), at most ``limit`` seconds."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before = server_cpu(pid)
        await asyncio.sleep(0.5)
        after = server_cpu(pid)
        if before is None or after is None or (after - before) / 0.5 < threshold:
            break
    return round(time.monotonic() - started, 2)


async def publish_load(host: str, port: int, tokens: list[str], connections: int = 32, window: int = 64,
                       warmup: float = 1.0, duration: float = 10.0, drain: float = 5.0, pid: int | None = None,
                       label: str = "") -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    if len(tokens) < connections:
        raise SystemExit(f"need {connections} tokens, got {len(tokens)}")
    idle_wait = await wait_idle(pid) if pid else 0.0
    stats = Stats()
    table = _publish_table()
    tag = f"lg{os.getpid()}"
    clients = [PublishConnection(tokens[i], f"{tag}-{i}", window, stats, table, loop) for i in range(connections)]

    async def connect(client: PublishConnection) -> bool:
        try:
            await loop.create_connection(lambda: client, host, port)
            return await asyncio.wait_for(client.ready, 30)
        except (OSError, asyncio.TimeoutError):
            return False

    connect_started = time.perf_counter()
    results = await asyncio.gather(*(connect(c) for c in clients))
    connect_seconds = time.perf_counter() - connect_started
    live = [c for c, ok in zip(clients, results) if ok]
    marks: dict[str, Any] = {}

    def open_window() -> None:
        stats.in_window = True
        marks["t0"] = time.perf_counter()
        marks["server0"] = server_cpu(pid)
        marks["client0"] = own_cpu()

    def close_window() -> None:
        stats.in_window = False
        marks["t1"] = time.perf_counter()
        marks["server1"] = server_cpu(pid)
        marks["client1"] = own_cpu()
        marks["acks"] = stats.window_acks

    if live:
        for client in live:
            client.start()
        opened = loop.create_future()
        loop.call_later(warmup, lambda: (open_window(), None))
        loop.call_later(warmup + duration, lambda: (close_window(), opened.set_result(None)))
        await opened
        stats.refill = False
        deadline = time.monotonic() + drain
        while time.monotonic() < deadline and any(c.inflight > 0 and not c.closed.done() for c in live):
            await asyncio.sleep(0.05)
    unacked = sum(c.inflight for c in live)
    for client in clients:
        client.publishing = False
        if client.transport is not None and not client.transport.is_closing():
            client.transport.write(codec.encode_disconnect(4))
            client.transport.close()
    await asyncio.sleep(0.2)

    window_seconds = (marks["t1"] - marks["t0"]) if live else 0.0
    acks = marks.get("acks", 0)
    ordered = sorted(stats.latencies)
    server_seconds = (marks["server1"] - marks["server0"]) if live and pid and marks["server0"] is not None \
        and marks["server1"] is not None else None
    client_seconds = (marks["client1"] - marks["client0"]) if live else None
    return {
        "label": label, "host": host, "port": port, "server_pid": pid,
        "connections": connections, "connected": len(live), "window_per_connection": window,
        "warmup_s": warmup, "duration_s": duration, "idle_wait_s": idle_wait,
        "connect_seconds": round(connect_seconds, 3),
        "pubacks": acks, "window_s": round(window_seconds, 3),
        "puback_per_s": round(acks / window_seconds, 1) if window_seconds else 0.0,
        "p50_ms": _percentile(ordered, 0.50), "p99_ms": _percentile(ordered, 0.99),
        "max_ms": round(ordered[-1] * 1000, 2) if ordered else None,
        "server_cpu_s": round(server_seconds, 3) if server_seconds is not None else None,
        "server_cpu_us_per_puback": round(server_seconds / acks * 1e6, 2) if server_seconds and acks else None,
        "client_cpu_s": round(client_seconds, 3) if client_seconds is not None else None,
        "client_cpu_us_per_puback": round(client_seconds / acks * 1e6, 2) if client_seconds and acks else None,
        "sent": stats.sent, "acked": stats.acked, "unacked_after_drain": unacked,
        "unknown_pubacks": stats.unknown, "lost_connections": stats.lost,
    }


# --- connect storm ------------------------------------------------------------------------------------------------

SUBSCRIBE_PACKET = codec.encode_subscribe(1, [(COMMAND_FILTER, 1)], 4)
DISCONNECT_PACKET = codec.encode_disconnect(4)
#: Connections per loopback source address: one address has ~28,000 ephemeral ports (32768-60999).
PER_SOURCE_ADDRESS = 20_000
#: Linux 4.2+: bind() takes the address only and the port is picked at connect(), by the whole 4-tuple.
_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_AWAITING_CONNACK, _AWAITING_SUBACK, _ESTABLISHED, _CLOSED = 0, 1, 2, 3


def raise_nofile_to_hard() -> int:
    """RLIMIT_NOFILE soft limit up to the hard limit (which an unprivileged process cannot raise); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def source_addresses(count: int, bind: str | list[str] | None = None) -> list[str]:
    """The given source address(es), else a fresh random subnet 127.X.0.2, .3, ... (one per 20,000 connections)."""
    if bind:
        return [bind] if isinstance(bind, str) else list(bind)
    subnet = random.randint(1, 254)
    return [f"127.{subnet}.0.{2 + k}" for k in range(max(1, -(-count // PER_SOURCE_ADDRESS)))]


def tcp_counters() -> dict[str, int]:
    """System-wide (this network namespace) TcpExt counters that show an overflowing accept queue."""
    wanted = ("ListenOverflows", "ListenDrops", "TCPTimeouts")
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    for header, values in zip(lines[::2], lines[1::2]):
        if header.startswith("TcpExt:"):
            table = dict(zip(header.split()[1:], values.split()[1:]))
            return {name: int(table[name]) for name in wanted if name in table}
    return {}


def _rss_kb(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class _Handshake:
    """One storm connection: a raw non-blocking socket, its reader callback and a 3-state handshake."""

    __slots__ = ("storm", "sock", "fd", "started", "state", "buffer", "pending_out")

    def __init__(self, storm: "_Storm", sock: socket.socket, started: float) -> None:
        self.storm = storm
        self.sock = sock
        self.fd = sock.fileno()
        self.started = started
        self.state = _AWAITING_CONNACK
        self.buffer = b""
        self.pending_out = b""

    def writable(self) -> None:
        """Only when the CONNECT could not be written at once (the TCP handshake was not finished yet)."""
        try:
            sent = self.sock.send(self.pending_out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.storm.fail(self, errno.errorcode.get(exc.errno or 0, type(exc).__name__))
            return
        self.pending_out = self.pending_out[sent:]
        if not self.pending_out:
            self.storm.loop.remove_writer(self.fd)

    def readable(self) -> None:
        try:
            data = self.sock.recv(256)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.storm.fail(self, errno.errorcode.get(exc.errno or 0, type(exc).__name__))
            return
        state = self.state
        if not data:
            if state == _ESTABLISHED:
                self.storm.lose(self)
            else:
                self.storm.fail(self, "closed before CONNACK" if state == _AWAITING_CONNACK else
                                "closed before SUBACK")
            return
        if state == _ESTABLISHED:
            return
        if self.buffer:
            data = self.buffer + data
            self.buffer = b""
        if state == _AWAITING_CONNACK:
            if len(data) < 4:
                self.buffer = data
                return
            if data[0] != 0x20 or data[1] != 2:
                self.storm.fail(self, "not a CONNACK")
                return
            if data[3] != 0:
                self.storm.fail(self, f"CONNACK return code {data[3]}")
                return
            try:
                self.sock.send(SUBSCRIBE_PACKET)  # 34 bytes into an empty send buffer: all or an error
            except OSError as exc:
                self.storm.fail(self, errno.errorcode.get(exc.errno or 0, type(exc).__name__))
                return
            self.state = _AWAITING_SUBACK
            data = data[4:]
            if not data:
                return
        if len(data) < 5:
            self.buffer = data
            return
        if data[0] != 0x90 or data[1] != 3 or data[2] != 0 or data[3] != 1 or data[4] >= 0x80:
            self.storm.fail(self, "SUBACK refused or malformed")
            return
        self.storm.succeed(self, time.perf_counter())

    def close(self, goodbye: bool) -> None:
        loop = self.storm.loop
        if self.state != _CLOSED:
            loop.remove_reader(self.fd)
            if self.pending_out:
                loop.remove_writer(self.fd)
            if goodbye:
                try:
                    self.sock.send(DISCONNECT_PACKET)
                except OSError:
                    pass
            self.state = _CLOSED
        self.sock.close()


class _Storm:
    """Opens ``len(connects)`` connections, at most ``concurrency`` handshakes at a time, callbacks only."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int, connects: list[bytes],
                 sources: list[str], concurrency: int, timeout: float) -> None:
        self.loop = loop
        self.address = (host, port)
        self.connects = connects
        self.count = len(connects)
        self.sources = sources
        self.concurrency = concurrency
        self.timeout = timeout
        self.next = 0
        self.pending: set[_Handshake] = set()
        self.established: list[_Handshake] = []
        self.latencies = array.array("d")
        self.failures: dict[str, int] = {}
        self.lost = 0
        self.first = 0.0
        self.last = 0.0
        self.done: asyncio.Future = loop.create_future()
        self._pumping = False
        self._sweeper: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.first = time.perf_counter()
        self.pump()
        self._sweeper = self.loop.call_later(1.0, self.sweep)

    def pump(self) -> None:
        """Start handshakes until ``concurrency`` are in progress (a synchronous failure just starts the next)."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while len(self.pending) < self.concurrency and self.next < self.count:
                index = self.next
                self.next += 1
                self._open(index)
        finally:
            self._pumping = False
        if not self.pending and self.next >= self.count and not self.done.done():
            if self._sweeper is not None:
                self._sweeper.cancel()
            self.done.set_result(None)

    def _open(self, index: int) -> None:
        started = time.perf_counter()
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            self._count_failure(errno.errorcode.get(exc.errno or 0, type(exc).__name__))
            return
        handshake = _Handshake(self, sock, started)
        packet = self.connects[index]
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_IP, _BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.sources[index // PER_SOURCE_ADDRESS % len(self.sources)], 0))
            code = sock.connect_ex(self.address)
            if code and code != errno.EINPROGRESS:
                raise OSError(code, os.strerror(code))
            # On loopback the TCP handshake is over when connect() returns: the CONNECT goes out at once.
            try:
                sent = sock.send(packet)
            except (BlockingIOError, InterruptedError):
                sent = 0
        except OSError as exc:
            sock.close()
            self._count_failure(errno.errorcode.get(exc.errno or 0, type(exc).__name__))
            return
        self.pending.add(handshake)
        self.loop.add_reader(handshake.fd, handshake.readable)
        if sent < len(packet):
            handshake.pending_out = packet[sent:]
            self.loop.add_writer(handshake.fd, handshake.writable)

    def _count_failure(self, cause: str) -> None:
        self.failures[cause] = self.failures.get(cause, 0) + 1

    def succeed(self, handshake: _Handshake, now: float) -> None:
        handshake.state = _ESTABLISHED
        self.pending.discard(handshake)
        self.established.append(handshake)
        self.latencies.append(now - handshake.started)
        self.last = now
        self.pump()

    def fail(self, handshake: _Handshake, cause: str) -> None:
        if handshake.state == _ESTABLISHED:
            self.lose(handshake)
            return
        self.pending.discard(handshake)
        handshake.close(goodbye=False)
        self._count_failure(cause)
        self.pump()

    def lose(self, handshake: _Handshake) -> None:
        """An established connection the server closed (or reset) while we held it."""
        self.lost += 1
        handshake.close(goodbye=False)

    def sweep(self) -> None:
        now = time.perf_counter()
        for handshake in [h for h in self.pending if now - h.started > self.timeout]:
            self.fail(handshake, "timeout")
        if not self.done.done():
            self._sweeper = self.loop.call_later(1.0, self.sweep)

    def abandon(self, cause: str) -> None:
        """The phase cap was reached: no new handshakes, the ones in progress count as failed."""
        if self.next < self.count:
            self.failures[f"{cause} (not attempted)"] = self.count - self.next
        self.next = self.count
        for handshake in list(self.pending):
            self.fail(handshake, cause)

    def close_all(self) -> None:
        for handshake in self.established:
            handshake.close(goodbye=True)
        self.established.clear()


async def connect_storm(host: str, port: int, tokens: list[str], count: int, concurrency: int,
                        bind: str | list[str] | None = None, pid: int | None = None, settle: float = 2.0,
                        hold: float = 0.0, timeout: float = 30.0, cap: float = 600.0,
                        label: str = "") -> dict[str, Any]:
    """Open ``count`` MQTT connections (CONNECT as ``tokens[i]``, SUBSCRIBE), ``concurrency`` at a time; measure.

    The connections stay open through ``settle`` (then the server's RSS is read) and ``hold`` seconds, and are
    closed with DISCONNECT before this returns.
    """
    loop = asyncio.get_running_loop()
    if len(tokens) < count:
        raise SystemExit(f"need {count} tokens, got {len(tokens)}")
    if concurrency < 1:
        raise SystemExit("concurrency must be >= 1")
    nofile = raise_nofile_to_hard()
    if count + 64 > nofile:
        raise SystemExit(f"{count} connections need more descriptors than RLIMIT_NOFILE {nofile}: split the storm "
                         f"over several generator processes")
    sources = source_addresses(count, bind)
    tag = f"cs{os.getpid():x}{random.getrandbits(16):04x}"
    connects = [codec.encode_connect(f"{tag}-{i}", 4, username=tokens[i], keep_alive=300) for i in range(count)]
    idle_wait = await wait_idle(pid) if pid else 0.0
    storm = _Storm(loop, host, port, connects, sources, concurrency, timeout)
    rss_before = _rss_kb(pid)
    counters_before = tcp_counters()
    server0, client0 = server_cpu(pid), own_cpu()
    storm.start()
    try:
        await asyncio.wait_for(asyncio.shield(storm.done), cap)
    except asyncio.TimeoutError:
        storm.abandon("phase cap")
    finished = time.perf_counter()
    server1, client1 = server_cpu(pid), own_cpu()
    counters_after = tcp_counters()
    await asyncio.sleep(settle)
    rss_after = _rss_kb(pid)
    server2 = server_cpu(pid)
    lost_in_settle = storm.lost
    if hold > 0:
        await asyncio.sleep(hold)
    still_open = len(storm.established) - storm.lost
    storm.close_all()

    connected = len(storm.latencies)
    failed = sum(storm.failures.values())
    elapsed = (storm.last if connected else finished) - storm.first
    ordered = sorted(storm.latencies)
    server_seconds = server1 - server0 if server0 is not None and server1 is not None else None
    settle_seconds = server2 - server1 if server1 is not None and server2 is not None else None
    client_seconds = client1 - client0
    grown = rss_after - rss_before if rss_before is not None and rss_after is not None else None
    return {
        "label": label, "host": host, "port": port, "server_pid": pid, "mode": "connect",
        "count": count, "concurrency": concurrency, "sources": sources, "rlimit_nofile": nofile,
        "timeout_s": timeout, "settle_s": settle, "idle_wait_s": idle_wait,
        "connected": connected, "failed": failed, "failures": storm.failures,
        "storm_s": round(elapsed, 3), "conn_per_s": round(connected / elapsed, 1) if connected and elapsed else 0.0,
        "p50_ms": _percentile(ordered, 0.50), "p90_ms": _percentile(ordered, 0.90),
        "p99_ms": _percentile(ordered, 0.99), "max_ms": round(ordered[-1] * 1000, 2) if ordered else None,
        "server_cpu_s": round(server_seconds, 3) if server_seconds is not None else None,
        "server_cpu_us_per_conn": round(server_seconds / connected * 1e6, 1)
        if server_seconds is not None and connected else None,
        "server_cpu_settle_s": round(settle_seconds, 3) if settle_seconds is not None else None,
        "client_cpu_s": round(client_seconds, 3),
        "client_cpu_us_per_conn": round(client_seconds / connected * 1e6, 1) if connected else None,
        "rss_before_kb": rss_before, "rss_after_kb": rss_after,
        "kb_per_conn": round(grown / connected, 2) if grown is not None and connected else None,
        "lost_in_settle": lost_in_settle, "still_open_at_close": still_open,
        "tcp": {name: counters_after.get(name, 0) - counters_before.get(name, 0) for name in counters_before},
    }


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pid", type=int, default=None, help="server PID: wait for it to idle, read its CPU")
    parser.add_argument("--label", default="")
    parser.add_argument("--connections", "-c", type=int, default=32, help="publish mode: connections")
    parser.add_argument("--window", "-w", type=int, default=64, help="QoS 1 PUBLISHes in flight per connection")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--drain", type=float, default=5.0)
    parser.add_argument("--connect", type=int, default=0, metavar="N",
                        help="connect mode: open N connections (instead of the publish load)")
    parser.add_argument("--concurrency", type=int, default=100, help="connect mode: handshakes in progress at most")
    parser.add_argument("--bind", nargs="+", default=None, metavar="ADDR",
                        help="connect mode: source address(es) (default: a random 127.X.0.2, .3, ...)")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="connect mode: seconds after the last SUBACK before reading the server's RSS")
    parser.add_argument("--hold", type=float, default=0.0, help="connect mode: then keep them open this long")
    parser.add_argument("--timeout", type=float, default=30.0, help="connect mode: per-handshake timeout (s)")
    parser.add_argument("--cap", type=float, default=600.0, help="connect mode: the whole storm at most (s)")
    parser.add_argument("--tokens-file", help="one user name (device token) per line")
    parser.add_argument("--token", default="dev{i}", help="user name pattern when no --tokens-file ({i}: index)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    if not _is_loopback(args.host):
        parser.error("loopback addresses only: the load generator shares the machine by design")
    if args.tokens_file:
        tokens = [line.strip() for line in Path(args.tokens_file).read_text().splitlines() if line.strip()]
    else:
        tokens = [args.token.format(i=i) for i in range(max(args.connections, args.connect))]
    if args.connect:
        result = asyncio.run(connect_storm(args.host, args.port, tokens, args.connect, args.concurrency, args.bind,
                                           args.pid, args.settle, args.hold, args.timeout, args.cap, args.label))
        ok = result["connected"] == args.connect
    else:
        if args.window < 1 or args.window > 65535:
            parser.error("--window must be 1..65535")
        result = asyncio.run(publish_load(args.host, args.port, tokens, args.connections, args.window, args.warmup,
                                          args.duration, args.drain, args.pid, args.label))
        ok = result["connected"] == args.connections and bool(result["pubacks"])
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        for key, value in result.items():
            print(f"{key:28} {value}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
