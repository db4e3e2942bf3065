"""MQTT publish/PUBACK load generator: C connections x W in-flight QoS 1 PUBLISHes, refilled on every PUBACK.

    python bench/loadgen.py --port 1883 --pid SERVER_PID --label nanoiot --tokens-file tokens.txt
    python bench/loadgen.py --port 18831 --pid MOSQUITTO_PID --label mosquitto --token 'dev{i}'

Modelled on the peers study (/work/shared/spec/peers.md) so that NanoIoT, Mosquitto and amqtt are measured by the
same code: every connection does TCP connect -> CONNECT (MQTT 3.1.1, clean session, user name = a device token,
unique client id, keep-alive 300) -> CONNACK -> SUBSCRIBE ``v1/devices/me/rpc/request/+`` QoS 1 -> SUBACK. Then
each keeps W QoS 1 PUBLISHes to ``v1/devices/me/rpc/response/1`` (60-byte JSON payload) unacknowledged and sends a
new one for every PUBACK. After a warmup (1 s) comes the measuring window (10 s): PUBACK/s counts the PUBACKs that
arrive inside it, p50/p99 are the publish->PUBACK latencies of those PUBACKs. Then the refills stop and the
outstanding PUBLISHes drain (at most 5 s).

With ``--pid`` it waits (at most 60 s) until the server uses under 5 % of a core, and reads the server's CPU time
(utime + stime of all its threads, /proc/PID/stat) at the start and end of the window: server CPU us per PUBACK is
the figure that does not depend on the load generator, which shares the machine.

NanoIoT checks the user name against its device tokens; Mosquitto and amqtt with anonymous access ignore it, so the
same tokens do for all three. It prints one JSON line (``--json``) or a short summary.

Cheap per message by design: the 65,535 possible PUBLISH packets are encoded once, each received chunk is stamped
with one clock read, and all refills a chunk causes leave in one write.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import ipaddress
import json
import os
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
    parser.add_argument("--connections", "-c", type=int, default=32)
    parser.add_argument("--window", "-w", type=int, default=64, help="QoS 1 PUBLISHes in flight per connection")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--drain", type=float, default=5.0)
    parser.add_argument("--tokens-file", help="one user name (device token) per line")
    parser.add_argument("--token", default="dev{i}", help="user name pattern when no --tokens-file ({i}: index)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    if not _is_loopback(args.host):
        parser.error("loopback addresses only: the load generator shares the machine by design")
    if args.tokens_file:
        tokens = [line.strip() for line in Path(args.tokens_file).read_text().splitlines() if line.strip()]
    else:
        tokens = [args.token.format(i=i) for i in range(args.connections)]
    if args.window < 1 or args.window > 65535:
        parser.error("--window must be 1..65535")
    result = asyncio.run(publish_load(args.host, args.port, tokens, args.connections, args.window, args.warmup,
                                      args.duration, args.drain, args.pid, args.label))
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        for key, value in result.items():
            print(f"{key:28} {value}")
    return 0 if result["connected"] == args.connections and result["pubacks"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
