"""MQTT flood: device->server QoS 1 publishes as fast as the generator goes, NanoIoT and Mosquitto in the same run.

    python bench/mqtt_flood.py                 # 60 s flood against each server (about 3.5 minutes in all)
    python bench/mqtt_flood.py --short         # 20 s: the regression run
    python bench/mqtt_flood.py --source /tmp/before --servers nanoiot   # another tree (e.g. `git archive` of HEAD)

The load is bench/loadgen.py's publish mode (the same code bench/peers.py uses): ``--connections`` (32) devices,
each keeping ``--window`` (64) QoS 1 PUBLISHes to ``v1/devices/me/rpc/response/1`` unacknowledged and sending a new
one for every PUBACK, a 1 s warmup, then the measuring window (``--duration``). NanoIoT hands each such publish to
the device's actor (an answer to a command it never sent: parsed and dropped there) and, since the bounded inbound
path, writes the PUBACK only once the actor has handled it.

Reported per server: PUBACK/s, publish->PUBACK p50/p99/max, server CPU us per PUBACK (/proc/PID/stat), the server's
RSS sampled every second from the moment the flood starts (its level at 10 s, then the lowest and highest after
that: the bound is "within 10 % of the 10 s level"), and for NanoIoT the full-collection pauses: every one of 20 ms
or more is logged by the server (``gc_pause``, nanoiot/collector.py), and the Prometheus histogram
``nanoiot_gc_full_pause_seconds`` at /metrics counts them all.

Two more phases on the same server: the latency phase (``--latency-window``, 8 in flight per connection, 10 s),
because with 32 x 64 = 2,048 publishes in flight the mean latency is 2,048 / rate (Little's law): p99 <= 20 ms needs
~100,000 PUBACK/s there, whatever the server; and, for NanoIoT only, a QoS 0 phase (``--qos0-duration``, 20 s):
the same devices write QoS 0 publishes as fast as their sockets take them (nothing to wait for), which is where an
unbounded inbound path shows at once (issue 11 measured 320 -> 629 MB in 28 s).

Then the ratios NanoIoT / Mosquitto, and the targets of issue 12: >= 0.5x Mosquitto's PUBACK/s, p99 <= 20 ms at
>= 40,000 PUBACK/s, no GC pause over 20 ms, RSS within 10 %. The machine has 2 cores and the generator shares them
(see bench/peers.py): Mosquitto's rate is a floor. Results go to bench/results/mqtt_flood.json (or ``--output``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, Server, machine, provision_devices, rss_kb  # noqa: E402
from bench.loadgen import PAYLOAD, TOPIC, server_cpu, wait_for_quiet  # noqa: E402
from nanoiot.transports.mqtt import codec  # noqa: E402
from bench.peers import LOADGEN, ensure_mosquitto, mosquitto_server, stop  # noqa: E402

GC_PAUSE = re.compile(r"gc_pause generation=2 ms=(\d+)")
#: Server CPU (share of one core) that says the flood has begun: RSS is sampled from then on.
BUSY = 0.3


class RssSampler(threading.Thread):
    """Samples a process's RSS every ``interval`` seconds, from the moment it gets busy (the flood started)."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (seconds since the flood started, KB)
        self.started_at: float | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        last_cpu = server_cpu(self.pid)
        while not self.halt.wait(self.interval):
            cpu = server_cpu(self.pid)
            now = time.monotonic()
            if cpu is None:
                return
            if self.started_at is None:
                if last_cpu is not None and (cpu - last_cpu) / self.interval >= BUSY:
                    self.started_at = now - self.interval
                last_cpu = cpu
                if self.started_at is None:
                    continue
            try:
                self.samples.append((round(now - self.started_at, 1), rss_kb(self.pid)))
            except OSError:
                return

    def summary(self, until: float) -> dict[str, Any]:
        """RSS at 10 s and its range from then until ``until`` seconds (the end of the measuring window)."""
        window = [(t, kb) for t, kb in self.samples if t <= until]
        after = [kb for t, kb in window if t >= 10]
        if not after:
            return {"rss_samples_kb": window}
        level = after[0]
        low, high = min(after), max(after)
        return {
            "rss_at_10s_mb": round(level / 1024, 1),
            "rss_min_after_10s_mb": round(low / 1024, 1),
            "rss_max_after_10s_mb": round(high / 1024, 1),
            "rss_first_mb": round(window[0][1] / 1024, 1) if window else None,
            "rss_drift_pct": round(max(high - level, level - low) / level * 100, 1),
            "rss_mb_over_time": [(t, round(kb / 1024, 1)) for t, kb in window],
        }


@contextmanager
def nanoiot_server(work: Path, devices: int, source: Path | None, extra: list[str]) -> Iterator[Server]:
    env_path = os.environ.get("PYTHONPATH")
    if source is not None:
        os.environ["PYTHONPATH"] = str(source) + (os.pathsep + env_path if env_path else "")
    try:
        server = Server(workdir=Path(tempfile.mkdtemp(prefix="nanoiot-flood-", dir=work)), extra=extra).start()
    finally:
        if source is not None:
            if env_path is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = env_path
    try:
        tokens = provision_devices(server.database, devices, prefix="flood")
        (server.workdir / "tokens.txt").write_text("\n".join(token for _, token in tokens) + "\n")
        yield server
    finally:
        assert server.process is not None
        stop(server.process)
        server.cleanup()


def gc_histogram(url: str) -> dict[str, Any]:
    """Counts of full collections by duration from /metrics (None if the server has no such metric)."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return {}
    buckets = {}
    for line in text.splitlines():
        match = re.match(r'nanoiot_gc_full_pause_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)', line)
        if match:
            buckets[match.group(1)] = int(float(match.group(2)))
    if not buckets:
        return {}
    total = buckets.get("+Inf", 0)
    return {"gc_full_collections": total,
            "gc_full_over_10ms": total - buckets.get("0.01", total),
            "gc_full_over_25ms": total - buckets.get("0.025", total)}


def loadgen(port: int, pid: int, label: str, tokens_file: Path, args: argparse.Namespace, window: int,
            duration: float) -> dict[str, Any]:
    command = [sys.executable, str(LOADGEN), "--port", str(port), "--pid", str(pid), "--label", label,
               "--tokens-file", str(tokens_file), "--json", "--connections", str(args.connections),
               "--window", str(window), "--warmup", str(args.warmup), "--duration", str(duration)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=duration + 200)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"load generator failed for {label}: {out.stderr[-2000:]}")
    return json.loads(lines[-1])


class Qos0Flooder(asyncio.Protocol):
    """One device sending QoS 0 publishes as fast as its socket takes them (no acknowledgement to wait for): what
    bounds it is the server reading, or not reading, its socket."""

    def __init__(self, token: str, batch: bytes) -> None:
        self.token = token
        self.batch = batch
        self.sent = 0
        self.connected = asyncio.get_running_loop().create_future()
        self.writable = asyncio.Event()
        self.writable.set()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=256 * 1024)
        transport.write(codec.encode_connect("", 4, username=self.token, keep_alive=300))

    def data_received(self, data: bytes) -> None:
        if not self.connected.done() and data[:1] == b"\x20":
            self.connected.set_result(len(data) >= 4 and data[3] == 0)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connected.done():
            self.connected.set_result(False)
        self.writable.set()

    async def flood(self, until: float) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < until and not self.transport.is_closing():
            await self.writable.wait()
            self.transport.write(self.batch)
            self.sent += 64
            await asyncio.sleep(0)


async def qos0_flood(port: int, tokens: list[str], connections: int, duration: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    batch = codec.encode_publish(TOPIC, PAYLOAD, 0, None, 4) * 64
    clients = [Qos0Flooder(token, batch) for token in tokens[:connections]]
    for client in clients:
        await loop.create_connection(lambda c=client: c, "127.0.0.1", port)
    ok = await asyncio.gather(*(c.connected for c in clients))
    until = loop.time() + duration
    await asyncio.gather(*(c.flood(until) for c in clients if c.transport is not None))
    for client in clients:
        client.transport.abort()
    return {"connected": sum(ok), "qos0_sent": sum(c.sent for c in clients)}


def run_qos0(port: int, pid: int, tokens_file: Path, args: argparse.Namespace) -> dict[str, Any]:
    """QoS 0 publishes as fast as each socket takes them: RSS sampled as during the QoS 1 flood."""
    tokens = [line for line in tokens_file.read_text().split() if line]
    sampler = RssSampler(pid)
    sampler.start()
    started = time.monotonic()
    try:
        outcome = asyncio.run(qos0_flood(port, tokens, args.connections, args.qos0_duration))
    finally:
        sampler.halt.set()
        sampler.join()
    seconds = time.monotonic() - started
    rss = sampler.summary(args.qos0_duration)
    return {"duration_s": args.qos0_duration, "qos0_sent_per_s": round(outcome["qos0_sent"] / seconds),
            "connected": outcome["connected"], **{k: v for k, v in rss.items() if k != "rss_mb_over_time"},
            "rss_mb_over_time": rss.get("rss_mb_over_time")}


def run_flood(port: int, pid: int, label: str, tokens_file: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The flood (RSS sampled meanwhile), then the latency phase: the same clients with fewer in flight."""
    sampler = RssSampler(pid)
    sampler.start()
    try:
        result = loadgen(port, pid, label, tokens_file, args, args.window, args.duration)
    finally:
        sampler.halt.set()
        sampler.join()
    result.update(sampler.summary(args.warmup + args.duration))
    if args.latency_window:
        latency = loadgen(port, pid, label, tokens_file, args, args.latency_window, args.latency_duration)
        result["latency_phase"] = {key: latency[key] for key in (
            "window_per_connection", "puback_per_s", "p50_ms", "p99_ms", "max_ms", "server_cpu_us_per_puback")}
    if args.qos0_duration and label == "nanoiot":
        result["qos0_phase"] = run_qos0(port, pid, tokens_file, args)
    return result


def measure(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    args._load = wait_for_quiet(1.0, 120, print)
    if name == "mosquitto":
        stopped: dict[str, str] = {}
        with mosquitto_server(work, args.connections, stopped) as (port, pid, tokens_file):
            result = run_flood(port, pid, name, tokens_file, args)
        return result
    with nanoiot_server(work, args.connections, args.source, args.server_args) as server:
        result = run_flood(server.mqtt_port, server.pid, name, server.workdir / "tokens.txt", args)
        result.update(gc_histogram(server.url))
        log = (server.workdir / "server.log").read_text(errors="replace")
    pauses = [int(ms) for ms in GC_PAUSE.findall(log)]
    result["gc_pauses_logged_ms"] = pauses[:50]
    result["gc_max_logged_ms"] = max(pauses) if pauses else None
    result["loadavg_1m_before"] = args._load
    return result


def verdict(nano: dict[str, Any], mosquitto: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rate = nano.get("puback_per_s") or 0
    out["flood_rate_ge_40k"] = rate >= 40_000
    latency = nano.get("latency_phase")
    if latency:
        out["latency_phase_p99_le_20ms_at_40k"] = (latency["p99_ms"] is not None and latency["p99_ms"] <= 20
                                                   and latency["puback_per_s"] >= 40_000)
    if mosquitto and mosquitto.get("puback_per_s"):
        out["ratio_puback_per_s"] = round(rate / mosquitto["puback_per_s"], 2)
        out["ratio_ge_0.5"] = out["ratio_puback_per_s"] >= 0.5
        if nano.get("server_cpu_us_per_puback") and mosquitto.get("server_cpu_us_per_puback"):
            out["ratio_cpu_per_puback"] = round(nano["server_cpu_us_per_puback"]
                                                / mosquitto["server_cpu_us_per_puback"], 2)
    out["no_gc_pause_over_20ms"] = not nano.get("gc_pauses_logged_ms")
    drift = nano.get("rss_drift_pct")
    out["rss_within_10pct"] = drift is not None and drift <= 10
    if nano.get("qos0_phase"):
        drift = nano["qos0_phase"].get("rss_drift_pct")
        out["qos0_rss_within_10pct"] = drift is not None and drift <= 10
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="20 s instead of 60 s (the regression run)")
    parser.add_argument("--duration", type=float, default=None, help="measuring window, s (default 60, --short 20)")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--latency-window", type=int, default=8,
                        help="then the same connections with this many in flight each, for p99 at a given rate "
                             "(0: no such phase): at 32 x 64 in flight, p99 <= 20 ms needs ~100,000 PUBACK/s")
    parser.add_argument("--latency-duration", type=float, default=10.0)
    parser.add_argument("--qos0-duration", type=float, default=20.0,
                        help="then QoS 0 publishes as fast as the sockets take them, NanoIoT only (0: no such "
                             "phase): RSS must stay flat (its level at 10 s, then its range)")
    parser.add_argument("--servers", default="nanoiot,mosquitto")
    parser.add_argument("--source", type=Path, default=None,
                        help="run NanoIoT from this source tree instead (PYTHONPATH), e.g. an export of an older commit")
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="extra nanoiot options, e.g. --server-args --mqtt-max-inflight-in 32")
    parser.add_argument("--output", type=Path, default=RESULTS / "mqtt_flood.json")
    args = parser.parse_args()
    if args.duration is None:
        args.duration = 20.0 if args.short else 60.0
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    versions = {}
    if "mosquitto" in servers:
        versions["mosquitto"] = ensure_mosquitto(print)
    work = Path(tempfile.mkdtemp(prefix="mqtt-flood-"))
    results: dict[str, Any] = {}
    for name in servers:
        print(f"{name}: {args.duration:.0f} s flood, {args.connections} x {args.window} in flight", flush=True)
        results[name] = measure(name, args, work)
        r = results[name]
        print(f"  {r['puback_per_s']:,.0f} PUBACK/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  "
              f"max {r['max_ms']} ms  server {r['server_cpu_us_per_puback']} us/PUBACK  "
              f"RSS@10s {r.get('rss_at_10s_mb')} MB range {r.get('rss_min_after_10s_mb')}-"
              f"{r.get('rss_max_after_10s_mb')} MB ({r.get('rss_drift_pct')} %)"
              + (f"  GC >=20ms: {r.get('gc_pauses_logged_ms')}  full GCs {r.get('gc_full_collections')}"
                 if name == "nanoiot" else ""), flush=True)
        if "latency_phase" in r:
            lp = r["latency_phase"]
            print(f"  latency phase ({lp['window_per_connection']} in flight per connection): "
                  f"{lp['puback_per_s']:,.0f} PUBACK/s  p50 {lp['p50_ms']} ms  p99 {lp['p99_ms']} ms", flush=True)
        if "qos0_phase" in r:
            q = r["qos0_phase"]
            print(f"  QoS 0 phase: {q['qos0_sent_per_s']:,} sent/s  RSS first {q.get('rss_first_mb')} MB, "
                  f"@10s {q.get('rss_at_10s_mb')} MB, range {q.get('rss_min_after_10s_mb')}-"
                  f"{q.get('rss_max_after_10s_mb')} MB ({q.get('rss_drift_pct')} %)", flush=True)
    summary = verdict(results["nanoiot"], results.get("mosquitto")) if "nanoiot" in results else {}
    print(json.dumps(summary))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent).stdout.strip()
    record = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "commit": commit, "source": str(args.source) if args.source else None, "machine": machine(),
              "versions": versions, "settings": {"duration_s": args.duration, "connections": args.connections,
                                                 "window": args.window, "server_args": args.server_args},
              "results": results, "verdict": summary}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1))
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
