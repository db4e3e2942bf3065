"""Fleet memory: N MQTT devices held by one NanoIoT process, past this machine's descriptor limit.

    python bench/fleet_memory.py --devices 10000 100000

Why it exists: the issue asks for 100,000 connected MQTT devices in one process at <= 20 KB RSS each, and this
sandbox caps a process at 20,000 descriptors (hard ``RLIMIT_NOFILE``, ``CAP_SYS_RESOURCE`` dropped), so
``bench/connections.py`` stops at ~19,990 real sockets. Here the server is the real one — ``NanoService`` with its
SQLite catalog, MQTT factory and protocol, sessions, device actors, timers, collector policy — started in this
process on the reactor, and every device goes through the real CONNECT (token looked up in the database, batched
per reactor turn) and SUBSCRIBE path, byte for byte. Only the socket is replaced by an in-memory transport that
counts what is written (every CONNACK and SUBACK is checked).

What a real socket adds on top is measured by running the same N both ways where sockets fit: this script at
10,000 and ``bench/connections.py`` at 10,000 (the difference is the socket transport's own Python objects; the
kernel's socket buffers are not in RSS either way, as for Mosquitto and amqtt in the peers study).

Reported per N and per ``--gc-freeze`` setting of the server (on, the default, and off): RSS per device (VmRSS
after - before, /proc/self/status), GC-tracked objects per device, the full (generation 2) collections that ran
while the fleet connected and the longest of them (the reactor stands still meanwhile), the time of one full
``gc.collect()`` afterwards, and the setup rate (no sockets: an upper bound of the connect path's Python cost).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402

from bench.common import machine, provision_devices, write_result  # noqa: E402
from nanoiot.config import Config  # noqa: E402
from nanoiot.service import NanoService  # noqa: E402
from nanoiot.transports.mqtt import codec  # noqa: E402

SUBSCRIBE = codec.encode_subscribe(1, [("v1/devices/me/rpc/request/+", 1)], 4)


class MemoryTransport:
    """What MqttDeviceProtocol uses of a socket transport; keeps the byte count, drops the bytes."""

    __slots__ = ("written", "peer", "producer", "closed", "batch")

    def __init__(self, port: int, batch: "Batch") -> None:
        self.batch = batch
        self.written = 0
        self.peer = IPv4Address("TCP", "127.0.0.2", port)
        self.producer: Any = None
        self.closed = False

    def write(self, data: bytes) -> None:
        if not self.written:
            self.batch.answered()
        self.written += len(data)

    def writeSequence(self, data: list[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def loseConnection(self) -> None:
        self.closed = True

    abortConnection = loseConnection

    def getPeer(self) -> IPv4Address:
        return self.peer

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 1883)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


class Batch:
    """Fires ``done`` once every connection of a batch got its first bytes (the CONNACK). Waiting on this, not on
    reactor turns: a reactor spinning through empty turns would hold the GIL the database thread needs."""

    def __init__(self, size: int) -> None:
        self.missing = size
        self.done: defer.Deferred = defer.Deferred()

    def answered(self) -> None:
        self.missing -= 1
        if self.missing == 0:
            self.done.callback(None)


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def next_turns(n: int = 1) -> defer.Deferred:
    return task.deferLater(reactor, 0, lambda: None) if n <= 1 else \
        task.deferLater(reactor, 0, lambda: None).addCallback(lambda _: next_turns(n - 1))


def timed_collect() -> float:
    started = time.perf_counter()
    gc.collect()
    return round((time.perf_counter() - started) * 1000, 1)


class FullCollections:
    """The gen-2 collections (count, longest ms) that happen while the fleet connects: the reactor's pauses."""

    def __init__(self) -> None:
        self.count = 0
        self.longest_ms = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.count += 1
            self.longest_ms = max(self.longest_ms, (time.perf_counter() - self._started) * 1000)


async def measure(count: int, console: Console, batch: int, freeze: bool) -> dict[str, Any]:
    gc.unfreeze()  # a previous measurement's freeze must not help this one
    gc.collect()
    work = Path(tempfile.mkdtemp(prefix="fleet-memory-"))
    database = f"sqlite:///{work / 'fleet.db'}"
    config = Config(host="127.0.0.1", http_port=0, mqtt_port=0, coap_port=0, database=database, demo=True,
                    jwt_key="bench-key-" + "x" * 60, log_level="warn", gc_freeze=freeze)
    service = NanoService(config, reactor)
    service.startService()
    await service.ready
    try:
        tokens = [token for _, token in provision_devices(database, count)]
        factory = service.mqtt_factory
        connect_packets = [codec.encode_connect(f"c{i}", protocol_level=4, username=token, keep_alive=300)
                           for i, token in enumerate(tokens)]
        del tokens
        gc.collect()
        await next_turns(3)
        before = rss_kb()
        objects_before = len(gc.get_objects()) + gc.get_freeze_count()
        transports: list[MemoryTransport] = []
        full = FullCollections()
        gc.callbacks.append(full)
        started = time.perf_counter()
        with Progress(TextColumn(f"{count:,} devices"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,}"),
                      TimeElapsedColumn(), console=console) as progress:
            bar = progress.add_task("connect", total=count)
            for first in range(0, count, batch):
                chunk = []
                waiting = Batch(min(count, first + batch) - first)
                for i in range(first, min(count, first + batch)):
                    protocol = factory.buildProtocol(None)
                    transport = MemoryTransport(10000 + i % 50000, waiting)
                    protocol.makeConnection(transport)
                    protocol.dataReceived(connect_packets[i])
                    chunk.append((protocol, transport))
                # The token lookups of this batch are answered together on the next reactor turns.
                await waiting.done
                for protocol, _ in chunk:
                    protocol.dataReceived(SUBSCRIBE)
                transports.extend(t for _, t in chunk)
                connect_packets[first:first + batch] = [b""] * len(chunk)
                await next_turns(2)  # the actors take their AttachSession / SubscribeCommands
                progress.advance(bar, len(chunk))
        elapsed = time.perf_counter() - started
        gc.callbacks.remove(full)
        refused = sum(1 for t in transports if t.closed)
        # CONNACK (4 bytes) + SUBACK (5 bytes) for each, nothing else.
        answered = sum(1 for t in transports if t.written == 9)
        del connect_packets
        await task.deferLater(reactor, 2.0, lambda: None)  # the collector policy checks every second
        await next_turns(3)
        after = rss_kb()
        tracked = len(gc.get_objects()) + gc.get_freeze_count() - objects_before
        collect_ms = timed_collect()
        frozen = gc.get_freeze_count()
        gc.unfreeze()
        unfrozen_collect_ms = timed_collect()
        if freeze:
            gc.freeze()
        result = {
            "devices": count, "gc_freeze": freeze, "connected": len(service.mqtt_factory.connected), "refused": refused,
            "answered_connack_suback": answered, "actors": len(service.directory),
            "setup_seconds": round(elapsed, 2), "setup_rate": round(count / elapsed, 1),
            "rss_before_mb": round(before / 1024, 1), "rss_after_mb": round(after / 1024, 1),
            "kb_per_device": round((after - before) / count, 2),
            "gc_objects_per_device": round(tracked / count, 1),
            "full_gcs_during_setup": full.count, "longest_full_gc_ms_during_setup": round(full.longest_ms, 1),
            "full_gc_ms_after": collect_ms, "full_gc_ms_all_unfrozen": unfrozen_collect_ms,
            "frozen_objects": frozen, "collector_freezes": service.collector.freezes if service.collector else 0,
        }
        for protocol in list(service.mqtt_factory.connected.values()):
            protocol.connectionLost(None)
        return result
    finally:
        await service.stopService()


def measure_in_child(count: int, freeze: bool, batch: int) -> dict[str, Any]:
    """Each measurement in a fresh process: RSS never shrinks, so a second fleet in one process would reuse the
    first one's memory and look cheap."""
    args = [sys.executable, __file__, "--child", "--devices", str(count), "--gc-freeze", "on" if freeze else "off",
            "--batch", str(batch)]
    out = subprocess.run(args, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


async def child_main(args: argparse.Namespace) -> None:
    result = await measure(args.devices[0], Console(stderr=True, width=140), args.batch, args.gc_freeze[0] == "on")
    print(json.dumps(result), flush=True)


def report(args: argparse.Namespace, console: Console) -> None:
    results = []
    for count in args.devices:
        for freeze in args.gc_freeze:
            results.append(measure_in_child(count, freeze == "on", args.batch))
            console.print(json.dumps(results[-1]))
    table = Table(title="NanoIoT: MQTT devices held in one process (in-memory transports, real server otherwise)")
    columns = ("devices", "gc_freeze", "connected", "answered_connack_suback", "kb_per_device",
               "gc_objects_per_device", "full_gcs_during_setup", "longest_full_gc_ms_during_setup",
               "full_gc_ms_after", "setup_rate")
    for column in columns:
        table.add_column(column)
    for r in results:
        table.add_row(*(("on" if r[c] else "off") if isinstance(r[c], bool) else f"{r[c]:,}" if isinstance(r[c], int)
                        else str(r[c]) for c in columns))
    console.print(table)
    path = write_result(args.output, {"machine": machine(), "command": " ".join(sys.argv), "results": results})
    console.print(f"results written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--batch", type=int, default=1000, help="devices connected per step")
    parser.add_argument("--gc-freeze", nargs="+", choices=("on", "off"), default=["on", "off"],
                        help="the server's --gc-freeze setting(s) to measure each N with")
    parser.add_argument("--output", default="fleet_memory", help="name of the JSON in bench/results")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.child:
        report(args, Console(width=140))
        return
    failure: list[Any] = []

    def run() -> None:
        d = defer.ensureDeferred(child_main(args))
        d.addErrback(failure.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    if failure:
        failure[0].printTraceback()
        raise SystemExit(1)


if __name__ == "__main__":
    main()
