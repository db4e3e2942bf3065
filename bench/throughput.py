"""One-way command throughput per channel that carries many commands per connection, with the server on ONE core.

    python bench/throughput.py                       # ws and bulk, 1,000 devices, 10 s windows, 3 runs
    python bench/throughput.py --short               # the regression run: 1 run, 4 s windows (about 1 minute)
    python bench/throughput.py --channels ws --runs 1 --profile ws   # py-spy the server during the ws window

What happens, per run (a fresh server each run):

1. ``twistd -n nanoiot`` (bench.common.Server, SQLite) started pinned to CPU 0 (``--server-cpu``; its database
   threads inherit it), so "one core" is literal; this process, the simulated fleet and py-spy run on CPU 1
   (``--load-cpu``). N devices (``--devices``) are provisioned straight into the database and connected with
   ``nanoiot-sim --answer none`` (they PUBACK each command, as a device does a one-way command, and answer none).
2. For each channel, ``--warmup`` s of load, then a ``--duration`` s window:

   * ``ws``: ``--connections`` WebSocket connections (``/api/ws/rpc``, tenant admin) each keeping ``--window``
     ``{"cmd":"rpc","oneway":true,...}`` frames in flight (the device ids rotating over the N devices; frames
     encoded once, sent in batches as the answers come back). A raw-socket client (this file): its CPU is not the
     server's and it would otherwise be the bottleneck on the load core.
   * ``bulk``: ``POST /api/rpc/bulk`` ``{"deviceType": "bench", "oneway": true, ...}`` (one persistent one-way
     command to every device), the next POST as soon as fewer than ``--bulk-backlog`` commands are posted but not
     yet received by the devices.
   * ``d2d``: device-to-device calls: every device calls the server method ``benchRelay`` (``--rpc-methods
     benchRelay=bench.relay_method:relay``) every ``--call-interval`` s; the method sends ``--fanout`` one-way
     commands to other devices with ``context.send_rpc``. (Only when ``d2d`` is in ``--channels``: its fleet
     calls, so it runs on a fleet of its own after the others.)

   Measured in the window: **commands received by the devices per second** (the fleet's own count, every 0.2 s),
   **server CPU µs per command** (utime + stime of the twistd process from /proc/PID/stat: every thread; the fleet
   and the load generator are other processes), errors answered (ws: a status other than 200), and the other
   processes' CPU on the machine ("others' cores", it is shared).

Results: bench/results/throughput.json (``--output``). ``--profile CHANNEL`` records the server with py-spy during
that channel's window (bench/results/<output>-<channel>.pyspy.txt) and prints where the reactor thread's time went.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, ROOT, Server, cpu_seconds, machine, provision_devices, rest, write_result  # noqa: E402
from bench.common import start_fleet as start_sim_fleet  # noqa: E402

PYSPY = str(Path(sys.executable).with_name("py-spy"))
TIMEOUT_MS = 6 * 3600 * 1000  # nothing expires during the benchmark
CHANNELS = ("ws", "bulk", "d2d")


# --- the fleet's count -------------------------------------------------------------------------------------------

class FleetCount:
    """The commands the simulated devices received, from ``nanoiot-sim --json``'s progress lines (with their time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = open(path)
        self.buffer = ""
        self.commands = 0
        self.calls = 0
        self.at = time.time()

    def poll(self) -> tuple[float, int]:
        self.buffer += self.handle.read()
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            if line.startswith("{"):
                event = json.loads(line)
                if "commands" in event:
                    self.commands, self.at = event["commands"], event["t"]
        return self.at, self.commands

    def fresh(self, after: float, limit: float = 5.0) -> tuple[float, int]:
        """The first count reported after ``after`` (wall clock)."""
        deadline = time.monotonic() + limit
        while True:
            at, count = self.poll()
            if at > after or time.monotonic() > deadline:
                return at, count
            time.sleep(0.02)


def start_fleet(mqtt_port: int, tokens: Path, out: Path, extra: list[str] | None = None) -> subprocess.Popen:
    """The fleet that counts what it receives (``--answer none``, a report every 0.2 s)."""
    sim, _ = start_sim_fleet(mqtt_port, tokens, out, answer="none",
                                extra=["--report-interval", "0.2", *(extra or [])])
    return sim


def stop(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- the WebSocket load -------------------------------------------------------------------------------------------

def client_frame(payload: bytes) -> bytes:
    """A masked text frame (a client must mask; the zero key leaves the payload as it is)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x81, 0x80 | n))
    elif n < 65536:
        head = bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x81, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


class WsLoad(asyncio.Protocol):
    """One WebSocket connection keeping ``window`` one-way commands in flight."""

    def __init__(self, frames: list[bytes], offset: int, window: int, stats: dict[str, int],
                 opened: asyncio.Future) -> None:
        self.frames = frames
        self.next = offset
        self.window = window
        self.stats = stats
        self.opened = opened
        self.buffer = b""
        self.upgraded = False
        self.inflight = 0
        self.running = True
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def send(self, count: int) -> None:
        frames, n, i = self.frames, len(self.frames), self.next
        out = []
        for _ in range(count):
            out.append(frames[i])
            i = i + 1 if i + 1 < n else 0
        self.next = i
        self.inflight += count
        self.stats["sent"] += count
        self.transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        if not self.upgraded:
            head, sep, rest = buffer.partition(b"\r\n\r\n")
            if not sep:
                self.buffer = buffer
                return
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                self.opened.set_exception(RuntimeError(f"upgrade refused: {buffer[:500]!r}"))
                return
            self.upgraded = True
            buffer = rest
            self.opened.set_result(None)
        pos, end, done, errors = 0, len(buffer), 0, 0
        while end - pos >= 2:
            length = buffer[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if end - pos < 4:
                    break
                length = int.from_bytes(buffer[pos + 2:pos + 4], "big")
                start = pos + 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buffer[pos + 2:pos + 10], "big")
                start = pos + 10
            if end < start + length:
                break
            if buffer[pos] & 0x0F == 1:
                done += 1
                if b'"status":200' not in buffer[start:start + 40]:
                    errors += 1
                    if self.stats["errors"] < 3:
                        print("ws error frame:", buffer[start:start + length][:300])
            pos = start + length
        self.buffer = buffer[pos:]
        if done:
            self.inflight -= done
            self.stats["answered"] += done
            self.stats["errors"] += errors
            if self.running and self.inflight <= self.window // 2:
                self.send(self.window - self.inflight)


async def ws_load(port: int, jwt: str, device_ids: list[str], connections: int, window: int,
                  stop_at: threading.Event, stats: dict[str, int]) -> None:
    loop = asyncio.get_running_loop()
    frames = [client_frame(json.dumps({"cmd": "rpc", "id": i, "deviceId": device_id, "oneway": True,
                                       "method": "setLed", "params": {"on": True}, "timeout": 10000},
                                      separators=(",", ":")).encode())
              for i, device_id in enumerate(device_ids)]
    protocols = []
    for c in range(connections):
        opened: asyncio.Future = loop.create_future()
        protocol = WsLoad(frames, c * len(frames) // connections, window, stats, opened)
        transport, _ = await loop.create_connection(lambda: protocol, "127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write((f"GET /api/ws/rpc?token={jwt} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                        .encode())
        await asyncio.wait_for(opened, 10)
        protocols.append(protocol)
    for protocol in protocols:
        protocol.send(window)
    while not stop_at.is_set():
        await asyncio.sleep(0.05)
    for protocol in protocols:
        protocol.running = False
    deadline = time.monotonic() + 10
    while any(p.inflight for p in protocols) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for protocol in protocols:
        protocol.transport.close()


# --- the bulk load ------------------------------------------------------------------------------------------------

def bulk_load(url: str, jwt: str, devices: int, backlog: int, count: FleetCount, base: int, stop_at: threading.Event,
              stats: dict[str, int]) -> None:
    body = {"deviceType": "bench", "oneway": True, "method": "setLed", "params": {"on": True}, "timeout": TIMEOUT_MS}
    while not stop_at.is_set():
        _, received = count.poll()
        if stats["sent"] - (received - base) >= backlog:
            time.sleep(0.01)
            continue
        status, answer = rest(url, jwt, "POST", "/api/rpc/bulk", body, timeout=60)
        if status != 200:
            stats["errors"] += devices
            print("bulk POST refused:", status, answer)
            time.sleep(0.5)
            continue
        stats["sent"] += answer["total"]
        stats["posts"] += 1


# --- one run ------------------------------------------------------------------------------------------------------

def others_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def own_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total


def reactor_cpu(pid: int) -> float:
    """CPU seconds of the server's main thread (the reactor's; the rest is its database and other threads)."""
    return cpu_seconds_of(f"/proc/{pid}/task/{pid}/stat")


def cpu_seconds_of(path: str) -> float:
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin(pid: int, cpu: int) -> None:
    """Every thread of ``pid`` on ``cpu`` (threads started later inherit it from the thread that starts them)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except OSError:
            pass


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="nanoiot-throughput-"))
        self.server: Server | None = None
        self.sim: subprocess.Popen | None = None

    def start(self, d2d: bool = False) -> None:
        args = self.args
        extra = ["--rpc-methods", "benchRelay=bench.relay_method:relay"] if d2d else []
        extra += args.server_args.split()
        # The relay method's module and its device list (the file is written below, before any device calls).
        # ``--code``: the server loads that copy of nanoiot/ (an A/B against other code in the same half hour).
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (code_root(args.code), str(ROOT)) if p)
        os.environ["NANOIOT_BENCH_RELAY_IDS"] = str(self.work / "ids.txt")
        os.environ["NANOIOT_BENCH_RELAY_FANOUT"] = str(args.fanout)
        os.sched_setaffinity(0, {args.server_cpu})  # the server inherits it
        try:
            self.server = Server(workdir=Path(tempfile.mkdtemp(prefix="server-", dir=self.work)), extra=extra,
                                 ).start()
        finally:
            os.sched_setaffinity(0, {args.load_cpu})
        pin(self.server.pid, args.server_cpu)
        devices = provision_devices(self.server.database, args.devices)
        self.device_ids = [device_id for device_id, _ in devices]
        tokens = self.work / "tokens.txt"
        tokens.write_text("\n".join(token for _, token in devices) + "\n")
        (self.work / "ids.txt").write_text("\n".join(self.device_ids) + "\n")
        self.jwt = self.server.login()
        out = self.work / f"sim-{time.monotonic_ns()}.jsonl"
        fleet_extra = []
        if d2d:
            fleet_extra = ["--call-method", "benchRelay", "--call-interval", str(args.call_interval)]
        self.sim = start_fleet(self.server.mqtt_port, tokens, out, fleet_extra)
        self.count = FleetCount(out)

    def close(self) -> None:
        stop(self.sim)
        self.sim = None
        if self.server is not None:
            self.server.cleanup()
            self.server = None
        shutil.rmtree(self.work, ignore_errors=True)

    def settle(self, limit: float = 30.0) -> None:
        """Until the devices stop receiving (what a channel queued is delivered before the next one starts)."""
        deadline = time.monotonic() + limit
        _, last = self.count.fresh(time.time())
        while time.monotonic() < deadline:
            time.sleep(0.5)
            _, now = self.count.fresh(time.time())
            if now == last:
                return
            last = now

    def measure(self, channel: str) -> dict[str, Any]:
        args = self.args
        assert self.server is not None
        stop_at = threading.Event()
        stats = {"sent": 0, "answered": 0, "errors": 0, "posts": 0}
        _, base = self.count.fresh(time.time())
        if channel == "ws":
            load = threading.Thread(target=lambda: asyncio.run(ws_load(
                self.server.http_port, self.jwt, self.device_ids, args.connections, args.window, stop_at, stats)))
        elif channel == "bulk":
            load = threading.Thread(target=bulk_load, args=(self.server.url, self.jwt, args.devices,
                                                            args.bulk_backlog, self.count, base, stop_at, stats))
        else:
            load = None  # the fleet calls by itself
        if load is not None:
            load.start()
        time.sleep(args.warmup)
        profile = self._start_profile(channel)
        pids = [self.server.pid]
        load_pids = [self.sim.pid, os.getpid()]
        t0, c0 = self.count.fresh(time.time())
        cpu0, busy0, main0 = own_cpu(pids), others_busy(), reactor_cpu(self.server.pid)
        sim_cpu0, load_cpu0 = own_cpu([self.sim.pid]), own_cpu(load_pids)
        time.sleep(args.duration)
        t1, c1 = self.count.fresh(time.time())
        cpu1, busy1, main1 = own_cpu(pids), others_busy(), reactor_cpu(self.server.pid)
        sim_cpu1, load_cpu1 = own_cpu([self.sim.pid]), own_cpu(load_pids)
        stop_at.set()
        if load is not None:
            load.join(60)
        if profile is not None:
            self._finish_profile(profile)
        commands = c1 - c0
        seconds = t1 - t0
        ticks = os.sysconf("SC_CLK_TCK")
        busy_cores = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]) * (os.cpu_count() or 1)
        own = ((cpu1 - cpu0) + (load_cpu1 - load_cpu0)) / seconds
        result = {
            "channel": channel, "commands": commands, "seconds": round(seconds, 3),
            "commands_per_s": round(commands / seconds, 1) if seconds else None,
            "server_cpu_us_per_command": round((cpu1 - cpu0) / commands * 1e6, 1) if commands else None,
            "server_cores": round((cpu1 - cpu0) / seconds, 3),
            "reactor_thread_share": round((main1 - main0) / (cpu1 - cpu0), 3) if cpu1 > cpu0 else None,
            "fleet_cores": round((sim_cpu1 - sim_cpu0) / seconds, 3),
            "load_cores": round((load_cpu1 - load_cpu0) / seconds, 3),
            "others_cores": round(max(0.0, busy_cores - own), 2), "errors": stats["errors"],
            "sent": stats["sent"], "posts": stats["posts"], "ticks": ticks,
        }
        if profile is not None:
            result["profile"] = profile
        self.settle()
        return result

    def _start_profile(self, channel: str) -> dict[str, Any] | None:
        if channel not in self.args.profile:
            return None
        assert self.server is not None
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{self.args.output}-{channel}.pyspy.txt"
        command = [PYSPY, "record", "-p", str(self.server.pid), "-f", "raw", "-r", "200", "-o", str(path),
                   "-d", str(max(1, int(self.args.duration)))]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return {"process": process, "path": path}

    def _finish_profile(self, profile: dict[str, Any]) -> None:
        from bench.rpc import summarize_profile

        process: subprocess.Popen = profile.pop("process")
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait()
        summary = summarize_profile(profile["path"], top=30)
        path = profile["path"]
        profile["path"] = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
        profile["self"] = summary["self"]
        profile["inclusive"] = summary["inclusive"]
        profile["samples"] = summary["samples"]
        profile["other_thread_samples"] = summary["other_thread_samples"]


def code_root(code: str) -> str:
    """The directory to put first on the server's path for ``--code``: the one holding ``nanoiot/``. Given the
    package directory itself (``/tmp/copy/nanoiot``), its parent: on the path as given, ``import nanoiot`` would
    quietly load this tree's copy instead."""
    if not code:
        return ""
    path = Path(code).resolve()
    if (path / "__init__.py").exists() and path.name == "nanoiot":
        path = path.parent
    if not (path / "nanoiot" / "__init__.py").exists():
        raise SystemExit(f"--code {code}: no nanoiot/ package there")
    return str(path)


def one_run(args: argparse.Namespace, number: int) -> list[dict[str, Any]]:
    rows = []
    plain = [c for c in args.channels if c != "d2d"]
    for d2d, channels in ((False, plain), (True, ["d2d"] if "d2d" in args.channels else [])):
        if not channels:
            continue
        run = Run(args)
        try:
            run.start(d2d=d2d)
            for channel in channels:
                row = run.measure(channel)
                row["run"] = number
                rows.append(row)
                print(f"run {number} {channel:5s} {row['commands_per_s']:>9,.0f} commands/s  "
                      f"{row['server_cpu_us_per_command']} us/command  server {row['server_cores']} cores  "
                      f"fleet {row['fleet_cores']}  others {row['others_cores']}  errors {row['errors']}",
                      flush=True)
                if "profile" in row:
                    for frame, share in row["profile"]["inclusive"][:30]:
                        print(f"    {share:5.1f}%  {frame}")
        finally:
            run.close()
    return rows


def git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted": bool(git("status", "--short", "--", "nanoiot"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", default="ws,bulk", help=f"comma-separated, of {', '.join(CHANNELS)}")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=2, help="ws: WebSocket connections")
    parser.add_argument("--window", type=int, default=500, help="ws: commands in flight per connection")
    parser.add_argument("--bulk-backlog", type=int, default=5000,
                        help="bulk: commands posted but not yet received, at most")
    parser.add_argument("--call-interval", type=float, default=1.0, help="d2d: seconds between a device's calls")
    parser.add_argument("--fanout", type=int, default=10, help="d2d: one-way commands each call sends")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--code", default="", help="a directory holding another copy of nanoiot/ for the server")
    parser.add_argument("--server-args", default="", help="more server options, e.g. \"--metrics off\" (an A/B)")
    parser.add_argument("--profile", default="", help="channels to py-spy (comma-separated)")
    parser.add_argument("--short", action="store_true", help="regression run: 1 run, 2 s warmup, 4 s windows")
    parser.add_argument("--output", default="throughput")
    args = parser.parse_args()
    args.channels = [c for c in args.channels.split(",") if c]
    args.profile = [c for c in args.profile.split(",") if c]
    if args.short:
        args.runs, args.warmup, args.duration = 1, 2.0, 4.0
    for channel in args.channels:
        if channel not in CHANNELS:
            parser.error(f"unknown channel {channel!r}")
    if (os.cpu_count() or 1) < 2:
        parser.error("needs two CPUs: the server on one, the load on the other")
    os.sched_setaffinity(0, {args.load_cpu})
    began = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows: list[dict[str, Any]] = []
    for number in range(1, args.runs + 1):
        rows.extend(one_run(args, number))
    summary = {}
    for channel in args.channels:
        mine = [r for r in rows if r["channel"] == channel and r["commands_per_s"]]
        if mine:
            summary[channel] = {
                "commands_per_s_median": statistics.median(r["commands_per_s"] for r in mine),
                "commands_per_s": [r["commands_per_s"] for r in mine],
                "server_cpu_us_per_command_median": statistics.median(r["server_cpu_us_per_command"] for r in mine),
                "server_cpu_us_per_command": [r["server_cpu_us_per_command"] for r in mine],
            }
            print(f"{channel:5s} median {summary[channel]['commands_per_s_median']:,.0f} commands/s, "
                  f"{summary[channel]['server_cpu_us_per_command_median']} us/command "
                  f"(runs: {summary[channel]['commands_per_s']})")
    path = write_result(args.output, {"machine": machine(), "started": began, "git": git_state(),
                                      "args": {k: v for k, v in vars(args).items()}, "summary": summary,
                                      "rows": rows})
    print(f"-> {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
