"""RPC: two-way and one-way RPC through the REST API against K connected devices.

    python bench/rpc.py                                   # 1,000 devices, levels 1 8 32 64 128 256, 2 runs
    python bench/rpc.py --rate 500 1000 2000 3000         # plus open-loop fixed-rate points
    python bench/rpc.py --levels 64 --runs 1 --profile twoway:64   # py-spy the server during one level

What happens, per run (a fresh server each run):

1. ``twistd -n nanoiot`` (bench.common.Server, SQLite), K devices provisioned in bulk, a JWT from
   ``/api/auth/login`` (tenant admin).
2. For each mode: the K devices connect with ``nanoiot-sim --json`` (a subprocess). For ``twoway`` they answer
   every command with its own payload (``--answer echo``); for ``oneway`` they only PUBACK it (``--answer none``,
   as a device does with a one-way command: ``--oneway-answer echo`` makes them answer anyway).
3. Closed loop, for each concurrency level C: C keep-alive HTTP/1.1 connections, each sending
   ``POST /api/rpc/{mode}/{deviceId}`` ``{"method":"echo","params":{"i":n}}`` (device ids rotating over the K
   devices) and the next as soon as the answer is in. 1 s warmup, then a ``--duration`` window (10 s): RPC/s,
   latency p50/p95/p99 of every call, error rate (status other than 200, timeouts, socket errors), server CPU
   us per RPC (utime + stime from /proc/PID/stat), and the same for the simulator and the load generator.
4. Open loop (``--rate R ...``): calls start at a fixed rate R whether or not earlier ones have finished, spread
   over a pool of keep-alive connections; a call that finds no free connection waits in the client, and its
   latency is counted from the moment it was due (no coordinated omission).

The saturation point of a mode is the first level after which throughput grows by less than 5 %, or whose p99 is
above 1 s, or whose error rate is above 0.1 %.

The machine may be shared: each point also reports the CPU that other processes used meanwhile ("others' cores",
/proc/stat minus the server, the simulator and the load generator), and each run and mode first waits (at most
``--load-wait`` s) for the 1-minute load average to fall below ``--max-load``.

Load generator: ``wrk`` (C, one thread, a Lua script rotating device ids) for the closed loop when it is installed
(``apt-get install -y wrk``), as it costs the least CPU per request on a machine the server shares; an asyncio
HTTP/1.1 client on raw sockets (in this file) otherwise (``--client python``) and always for the open loop, which
wrk cannot do. Each row reports the load generator's own CPU per request so the two can be compared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.common import RESULTS, ROOT, Server, cpu_seconds, machine, provision_devices, write_result  # noqa: E402
from bench.common import start_fleet  # noqa: E402
from bench.loadgen import wait_for_quiet  # noqa: E402

WRK = shutil.which("wrk")
PYSPY = str(Path(sys.executable).with_name("py-spy"))

WRK_SCRIPT = r"""
-- bench/rpc.py: POST /api/rpc/<kind>/<deviceId>, device ids rotating, the JWT and ids from the environment.
local ids = {}
for line in io.lines(os.getenv("RPC_IDS")) do ids[#ids + 1] = line end
local kind = os.getenv("RPC_KIND")
local headers = {["Content-Type"] = "application/json",
                 ["X-Authorization"] = "Bearer " .. os.getenv("RPC_JWT")}
local counter = 0
local offset = 0
function init(args) offset = math.random(#ids) end
function request()
  counter = counter + 1
  return wrk.format("POST", "/api/rpc/" .. kind .. "/" .. ids[(counter + offset) % #ids + 1], headers,
                    '{"method":"echo","params":{"i":' .. counter .. '}}')
end
function done(summary, latency, requests)
  io.write(string.format('WRKJSON {"requests":%d,"duration_us":%d,"status_errors":%d,"timeouts":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"p50_us":%d,"p95_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f}\n', summary.requests, summary.duration, summary.errors.status,
    summary.errors.timeout, summary.errors.connect, summary.errors.read, summary.errors.write,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max, latency.mean))
end
"""


# --- the asyncio HTTP/1.1 keep-alive client ---------------------------------------------------------------------


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection, one request at a time; parses the status line, Content-Length or chunked."""

    def __init__(self, owner: "HttpLoad") -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.started = 0.0
        self.busy = False
        self.lost = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def send(self, request: bytes, started: float) -> None:
        self.busy = True
        self.started = started
        self.transport.write(request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buffer = self.buffer
        buffer += data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = int(buffer[9:12])
            head = bytes(buffer[:end]).lower()
            body_start = end + 4
            found = head.find(b"\r\ncontent-length:")
            if found >= 0:
                line_end = head.find(b"\r\n", found + 2)
                length = int(head[found + 17:line_end if line_end > 0 else len(head)])
                total = body_start + length
                if len(buffer) < total:
                    return
            elif b"\r\ntransfer-encoding: chunked" in head:
                pos = body_start
                while True:
                    line_end = buffer.find(b"\r\n", pos)
                    if line_end < 0:
                        return
                    size = int(bytes(buffer[pos:line_end]).split(b";")[0], 16)
                    if size == 0:
                        total = line_end + 4  # no trailers
                        break
                    pos = line_end + 2 + size + 2
                if len(buffer) < total:
                    return
            else:
                total = body_start
            del buffer[:total]
            self.busy = False
            self.owner.completed(self, status, now - self.started, now)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.busy:
            self.busy = False
            self.owner.failed(self, time.perf_counter())


class HttpLoad:
    """Closed loop (``rate`` None: every connection sends again at once) or open loop (calls due at ``rate``/s)."""

    def __init__(self, port: int, jwt: str, kind: str, device_ids: list[str], connections: int,
                 rate: float | None, warmup: float, duration: float, drain: float) -> None:
        self.port = port
        self.kind = kind
        self.connections = connections
        self.rate = rate
        self.warmup = warmup
        self.duration = duration
        self.drain = drain
        self.prefixes = [(f"POST /api/rpc/{kind}/{device_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                          f"X-Authorization: Bearer {jwt}\r\nContent-Type: application/json\r\n").encode()
                         for device_id in device_ids]
        self.counter = 0
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.socket_errors = 0
        self.window_start = self.window_end = 0.0
        self.stopping = False
        self.free: deque[HttpConnection] = deque()
        self.backlog: deque[float] = deque()
        self.outstanding = 0
        self.max_backlog = 0
        #: 200s received inside the window, whenever they were due: the achieved throughput.
        self.ok_in_window = 0
        #: Every answer, warmup and drain included: server CPU is read around all of them.
        self.total_done = 0
        #: Open loop: calls due inside the window (each must end in a counted answer or an error).
        self.due_in_window = 0

    def request(self) -> bytes:
        self.counter += 1
        n = self.counter
        body = b'{"method":"echo","params":{"i":%d}}' % n
        return self.prefixes[n % len(self.prefixes)] + b"Content-Length: %d\r\n\r\n" % len(body) + body

    def _counts(self, started: float, finished: float) -> bool:
        if self.rate is None:  # closed loop: the calls that finish inside the window
            return self.window_start <= finished < self.window_end
        return self.window_start <= started < self.window_end  # open loop: the calls due inside the window

    def completed(self, connection: HttpConnection, status: int, latency: float, now: float) -> None:
        self.outstanding -= 1
        self.total_done += 1
        if status == 200 and self.window_start <= now < self.window_end:
            self.ok_in_window += 1
        if self._counts(now - latency, now):
            self.latencies.append(latency)
            self.statuses[status] += 1
        self._next(connection, now)

    def failed(self, connection: HttpConnection, now: float) -> None:
        self.outstanding -= 1
        if self._counts(connection.started, now):
            self.socket_errors += 1

    def start_or_queue(self, due: float) -> None:
        """A call that is due: on a free connection, or queued in the client (its latency counts from ``due``)."""
        if self.free:
            self.outstanding += 1
            self.free.popleft().send(self.request(), due)
        else:
            self.backlog.append(due)
            if len(self.backlog) > self.max_backlog:
                self.max_backlog = len(self.backlog)

    def _next(self, connection: HttpConnection, now: float) -> None:
        if connection.lost:
            return
        if self.rate is None:
            if not self.stopping:
                self.outstanding += 1
                connection.send(self.request(), now)
        elif self.backlog:
            self.outstanding += 1
            connection.send(self.request(), self.backlog.popleft())
        else:
            self.free.append(connection)

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        conns = [HttpConnection(self) for _ in range(self.connections)]
        await asyncio.gather(*(loop.create_connection(lambda c=c: c, "127.0.0.1", self.port) for c in conns))
        begin = time.perf_counter()
        self.window_start = begin + self.warmup
        self.window_end = self.window_start + self.duration
        marks: dict[str, float] = {}
        loop.call_at(loop.time() + self.warmup, lambda: marks.__setitem__("cpu0", _own_cpu()))
        loop.call_at(loop.time() + self.warmup + self.duration, lambda: marks.__setitem__("cpu1", _own_cpu()))
        if self.rate is None:
            for c in conns:
                self.outstanding += 1
                c.send(self.request(), time.perf_counter())
            await asyncio.sleep(self.warmup + self.duration)
            self.stopping = True
        else:
            self.free.extend(conns)
            interval = 1.0 / self.rate
            due_index = 0
            end = self.window_end
            while True:
                now = time.perf_counter()
                if now >= end:
                    break
                due_until = int((now - begin) / interval) + 1
                while due_index < due_until:
                    due = begin + due_index * interval
                    due_index += 1
                    if self.window_start <= due < self.window_end:
                        self.due_in_window += 1
                    self.start_or_queue(due)
                # Sleep until the next call is due (the event loop's timer resolution is well under 1 ms).
                await asyncio.sleep(max(0.0, begin + due_index * interval - time.perf_counter()))
        # The schedule is over; calls still queued in the client go out as connections free up, for at most
        # ``drain`` seconds. Whatever is still queued or unanswered then counts as an error.
        deadline = time.perf_counter() + self.drain
        while (self.outstanding > 0 or self.backlog) and time.perf_counter() < deadline:
            await asyncio.sleep(0.02)
        unsent = len(self.backlog)
        self.backlog.clear()
        unfinished = self.outstanding
        for c in conns:
            if c.transport is not None:
                c.transport.close()
        ordered = sorted(self.latencies)
        done = len(ordered)
        ok = self.statuses.get(200, 0)
        errors = done - ok + self.socket_errors
        attempted = done + self.socket_errors
        if self.rate is not None:
            errors += max(0, self.due_in_window - attempted)  # never sent or never answered within the drain
            attempted = max(attempted, self.due_in_window)
        return {
            "requests": done, "ok": ok, "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "socket_errors": self.socket_errors, "errors": errors,
            "error_rate": round(errors / attempted, 5) if attempted else None,
            "rps": round(self.ok_in_window / self.duration, 1),
            "p50_ms": _pct(ordered, 0.50), "p95_ms": _pct(ordered, 0.95), "p99_ms": _pct(ordered, 0.99),
            "max_ms": round(ordered[-1] * 1000, 2) if ordered else None,
            "client_cpu_s": round(marks.get("cpu1", 0) - marks.get("cpu0", 0), 3),
            "total_calls": self.total_done, "unsent_at_end": unsent, "unfinished_after_drain": unfinished,
            "max_client_backlog": self.max_backlog,
        }


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _system_busy() -> float:
    """CPU seconds all processes of the machine used so far (every core; /proc/stat, idle and iowait excluded)."""
    values = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def _pct(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


# --- one measurement -------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.work = Path(tempfile.mkdtemp(prefix="bench-rpc-"))
        self.server: Server | None = None
        self.sim: subprocess.Popen | None = None
        self.jwt = ""
        self.device_ids: list[str] = []
        self.lua = self.work / "rpc.lua"
        self.lua.write_text(WRK_SCRIPT)
        self.profiles: list[dict[str, Any]] = []

    # processes

    def start_server(self) -> None:
        self.server = Server(workdir=Path(tempfile.mkdtemp(prefix="server-", dir=self.work))).start()
        devices = provision_devices(self.server.database, self.args.devices)
        self.device_ids = [device_id for device_id, _ in devices]
        (self.work / "tokens.txt").write_text("\n".join(token for _, token in devices) + "\n")
        (self.work / "ids.txt").write_text("\n".join(self.device_ids) + "\n")
        self.jwt = self.server.login()

    def start_sim(self, answer: str) -> None:
        assert self.server is not None
        out = self.work / f"sim-{answer}-{time.monotonic_ns()}.jsonl"
        self.sim_out = out
        self.sim, _ = start_fleet(self.server.mqtt_port, self.work / "tokens.txt", out, answer)

    def stop_sim(self) -> None:
        if self.sim is not None and self.sim.poll() is None:
            self.sim.terminate()
            try:
                self.sim.wait(30)
            except subprocess.TimeoutExpired:
                self.sim.kill()
                self.sim.wait()
        self.sim = None

    def close(self) -> None:
        self.stop_sim()
        if self.server is not None:
            self.server.cleanup()
            self.server = None
        shutil.rmtree(self.work, ignore_errors=True)

    # measuring

    def _wait_server_idle(self, limit: float = 30.0) -> None:
        assert self.server is not None
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            before = cpu_seconds(self.server.pid)
            time.sleep(0.5)
            if (cpu_seconds(self.server.pid) - before) / 0.5 < 0.05:
                return

    def measure(self, kind: str, level: int | None, rate: float | None) -> dict[str, Any]:
        assert self.server is not None and self.sim is not None
        self._wait_server_idle()
        load = open("/proc/loadavg").read().split()[0]
        profile = self._start_profile(kind, level, rate)
        server0, sim0 = cpu_seconds(self.server.pid), cpu_seconds(self.sim.pid)
        busy0, own0 = _system_busy(), _own_cpu()
        started = time.perf_counter()
        self._marks: tuple[float, float, float, float] | None = None
        if rate is None and self.args.client == "wrk":
            result = self._wrk(kind, level)  # type: ignore[arg-type]
            if self._marks is not None:  # wrk's warmup is a run of its own: read the CPU around the measured one
                server0, sim0, busy0, started = self._marks
        else:
            connections = level if rate is None else self.args.rate_connections
            load_gen = HttpLoad(self.server.http_port, self.jwt, kind, self.device_ids, connections, rate,
                                self.args.warmup, self.args.duration, self.args.drain)
            result = asyncio.run(load_gen.run())
            result["client"] = "python"
        elapsed = time.perf_counter() - started
        server_cpu = cpu_seconds(self.server.pid) - server0
        sim_cpu = cpu_seconds(self.sim.pid) - sim0
        busy = _system_busy() - busy0
        loadgen_cpu = result.pop("span_client_cpu_s", None)
        if loadgen_cpu is None:
            loadgen_cpu = _own_cpu() - own0
        # CPU the rest of the machine (other people's processes) took meanwhile: the noise on a shared box.
        others = max(0.0, busy - server_cpu - sim_cpu - loadgen_cpu)
        if profile is not None:
            self._finish_profile(profile)
        # CPU is read around warmup + window (+ drain): divide by every call answered in that span.
        calls = max(result.get("total_calls") or 0, 1)
        result.update({
            "kind": kind, "level": level, "rate": rate, "loadavg_1m_before": float(load),
            "server_cpu_s": round(server_cpu, 3), "sim_cpu_s": round(sim_cpu, 3), "span_s": round(elapsed, 2),
            "server_cpu_us_per_rpc": round(server_cpu / calls * 1e6, 1),
            "sim_cpu_us_per_rpc": round(sim_cpu / calls * 1e6, 1),
            "server_cpu_share": round(server_cpu / elapsed, 3),
            "other_cores": round(others / elapsed, 2),
            "client_cpu_us_per_rpc": round(result["client_cpu_s"] / max(result["requests"], 1) * 1e6, 1)
            if result.get("client_cpu_s") is not None else None,
        })
        return result

    def _wrk(self, kind: str, level: int) -> dict[str, Any]:
        assert self.server is not None
        env = dict(os.environ, RPC_JWT=self.jwt, RPC_IDS=str(self.work / "ids.txt"), RPC_KIND=kind)
        base = [WRK, "-t", "1", "-c", str(level), "--timeout", "30s", "-s", str(self.lua), self.server.url + "/"]
        if self.args.warmup > 0:
            subprocess.run(base[:1] + ["-d", f"{max(1, round(self.args.warmup))}s"] + base[1:], env=env,
                           capture_output=True)
        assert self.sim is not None
        self._marks = (cpu_seconds(self.server.pid), cpu_seconds(self.sim.pid), _system_busy(), time.perf_counter())
        cpu0 = _children_cpu()
        out = subprocess.run(base[:1] + ["-d", f"{max(1, round(self.args.duration))}s"] + base[1:], env=env,
                             capture_output=True, text=True)
        cpu1 = _children_cpu()
        found = re.search(r"^WRKJSON (\{.*\})$", out.stdout, re.M)
        if not found:
            raise RuntimeError(f"wrk failed: {out.stdout[-1000:]} {out.stderr[-1000:]}")
        w = json.loads(found.group(1))
        seconds = w["duration_us"] / 1e6
        socket_errors = w["connect_errors"] + w["read_errors"] + w["write_errors"] + w["timeouts"]
        errors = w["status_errors"] + socket_errors
        ok = w["requests"] - w["status_errors"]
        return {
            "client": "wrk", "requests": w["requests"], "ok": ok, "socket_errors": socket_errors, "errors": errors,
            "error_rate": round(errors / max(w["requests"] + socket_errors, 1), 5),
            "rps": round(ok / seconds, 1), "p50_ms": round(w["p50_us"] / 1000, 2),
            "p95_ms": round(w["p95_us"] / 1000, 2), "p99_ms": round(w["p99_us"] / 1000, 2),
            "max_ms": round(w["max_us"] / 1000, 2), "client_cpu_s": round(cpu1 - cpu0, 3),
            "span_client_cpu_s": cpu1 - cpu0,
            "wrk_seconds": round(seconds, 3), "total_calls": w["requests"],
        }

    # profiling

    def _start_profile(self, kind: str, level: int | None, rate: float | None) -> dict[str, Any] | None:
        wanted = f"{kind}:{level}" if rate is None else f"{kind}:rate{rate:g}"
        if wanted not in self.args.profile:
            return None
        assert self.server is not None
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"rpc-{kind}-{level if rate is None else f'rate{rate:g}'}.pyspy.txt"
        seconds = max(1, int(self.args.warmup + self.args.duration - 1))
        command = [PYSPY, "record", "-p", str(self.server.pid), "-f", "raw", "-o", str(path), "-d", str(seconds)]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return {"process": process, "path": path, "command": " ".join(command), "what": wanted}

    def _finish_profile(self, profile: dict[str, Any]) -> None:
        process: subprocess.Popen = profile.pop("process")
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait()
        profile["top"] = summarize_profile(profile["path"])
        profile["path"] = str(profile["path"].relative_to(ROOT))
        self.profiles.append(profile)


#: Where a sample of the reactor thread goes: the first of these markers found anywhere on its stack names its
#: category (so a JWT's own JSON decoding counts as JWT, a response written from an actor's callback as HTTP).
PROFILE_CATEGORIES = (
    ("TokenIssuer.verify_access", "JWT verification (PyJWT, every request)"),
    ("_parseContentType", "Content-Type parsing (twisted.web, via email.message)"),
    ("Request.finish", "HTTP response (headers, write, finish)"),
    ("Request.write", "HTTP response (headers, write, finish)"),
    ("JsonApi._write", "HTTP response (headers, write, finish)"),
    ("MqttSession.", "MQTT send (session, encode, write)"),
    ("MqttDeviceProtocol.dataReceived", "MQTT receive (framing, decode, routing)"),
    ("DeviceActor.on_receive", "device actor and RPC queue"),
    ("JSONDecoder", "JSON decoding (REST body)"),
    ("JSONEncoder", "JSON encoding"),
    ("RpcApi._send", "REST RPC handler (routing, body, catalog, tell)"),
    ("JsonApi.render", "REST RPC handler (routing, body, catalog, tell)"),
    ("HTTPChannel.dataReceived", "HTTP request parsing (twisted.web)"),
    ("HTTPChannel.connectionLost", "HTTP connection handling"),
    ("Dispatcher._drain", "actor dispatch (mailboxes)"),
    ("Deferred.", "Deferred callbacks"),
    ("_inlineCallbacks", "Deferred callbacks"),
    ("doWrite", "socket writes (send)"),
    ("Connection.doRead", "socket reads (recv)"),
    ("EPollReactor.doPoll", "reactor (epoll, dispatch)"),
    ("ReactorBase.runUntilCurrent", "reactor timers"),
)


def summarize_profile(path: Path, top: int = 25,
                      categories_of: tuple[tuple[str, str], ...] | None = None) -> dict[str, Any]:
    """py-spy raw (folded) output: the reactor thread's samples by category, and the busiest functions.

    Only stacks of the reactor thread (those under ``ReactorBase.run``) count: the database thread pool's idle
    waits are reported apart. Self = the sample's innermost frame; inclusive = anywhere on the stack.
    """
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    total = other = 0
    if not path.exists():
        return {"samples": 0, "other_thread_samples": 0, "categories": [], "self": [], "inclusive": []}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        if "ReactorBase.run " not in stack:
            other += n
            continue
        total += n
        frames = [re.sub(r" \((?:/[^)]*/)?(?:site-packages/)?([^)]*)\)$", r" (\1)", f) for f in stack.split(";")]
        self_counts[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
        category = "other"
        for marker, label in categories_of or PROFILE_CATEGORIES:
            if marker in stack:
                category = label
                break
        categories[category] += n
    share = (lambda n: round(100 * n / total, 1)) if total else (lambda n: 0)
    return {"samples": total, "other_thread_samples": other,
            "categories": [(c, share(n)) for c, n in categories.most_common()],
            "self": [(f, share(n)) for f, n in self_counts.most_common(top)],
            "inclusive": [(f, share(n)) for f, n in inclusive.most_common(top)]}


# --- runs, summary, table --------------------------------------------------------------------------------------


def one_run(args: argparse.Namespace, console: Console, run: int) -> tuple[list[dict[str, Any]], list[Any]]:
    load = wait_for_quiet(args.max_load, args.load_wait, console.print)
    console.print(f"[bold]run {run}/{args.runs}[/] (1-min load {load:.2f})")
    bench = Bench(args, console)
    rows: list[dict[str, Any]] = []
    try:
        bench.start_server()
        for index, kind in enumerate(args.modes):
            if index:
                wait_for_quiet(args.max_load, args.load_wait, console.print)
            answer = "echo" if kind == "twoway" else args.oneway_answer
            bench.start_sim(answer)
            points = [(level, None) for level in args.levels] + [(None, rate) for rate in args.rate]
            for level, rate in points:
                row = bench.measure(kind, level, rate)
                row["run"] = run
                rows.append(row)
                what = f"C={level}" if rate is None else f"rate {rate:g}/s"
                console.print(f"  {kind:6} {what:>12}: {row['rps']:>8,.0f} RPC/s  p50 {row['p50_ms']} "
                              f"p95 {row['p95_ms']} p99 {row['p99_ms']} ms  errors {row['error_rate']:.2%}  "
                              f"server {row['server_cpu_us_per_rpc']} µs/RPC ({row['server_cpu_share']:.0%} of a "
                              f"core)  sim {row['sim_cpu_us_per_rpc']} µs  {row['client']} "
                              f"{row['client_cpu_us_per_rpc']} µs  others {row['other_cores']} cores")
            bench.stop_sim()
    finally:
        bench.close()
    return rows, bench.profiles


def summarize(values: list[Any]) -> dict[str, Any]:
    present = [v for v in values if v is not None]
    if not present:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(present), 3), "min": min(present), "max": max(present)}


KEYS = ("rps", "p50_ms", "p95_ms", "p99_ms", "max_ms", "error_rate", "server_cpu_us_per_rpc", "sim_cpu_us_per_rpc",
        "client_cpu_us_per_rpc", "server_cpu_share", "other_cores")


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    points: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        points.setdefault((row["kind"], row["level"], row["rate"]), []).append(row)
    out = []
    for (kind, level, rate), group in points.items():
        entry: dict[str, Any] = {"kind": kind, "level": level, "rate": rate, "runs": len(group),
                                 "client": group[0]["client"]}
        for key in KEYS:
            entry[key] = summarize([r.get(key) for r in group])
        out.append(entry)
    return out


def saturation(points: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    """The first closed-loop level after which RPC/s grows < 5 %, or with p99 > 1 s or errors > 0.1 %."""
    levels = sorted((p for p in points if p["kind"] == kind and p["rate"] is None), key=lambda p: p["level"])
    if not levels:
        return None
    best = max(levels, key=lambda p: p["rps"]["median"] or 0)
    for i, p in enumerate(levels):
        reason = None
        if (p["p99_ms"]["median"] or 0) > 1000:
            reason = "p99 > 1 s"
        elif (p["error_rate"]["median"] or 0) > 0.001:
            reason = "errors > 0.1 %"
        elif i + 1 < len(levels) and (levels[i + 1]["rps"]["median"] or 0) < 1.05 * (p["rps"]["median"] or 0):
            reason = f"RPC/s grows < 5 % from C={p['level']} to C={levels[i + 1]['level']}"
        if reason:
            return {"level": p["level"], "rps": p["rps"]["median"], "p99_ms": p["p99_ms"]["median"],
                    "reason": reason, "max_rps": best["rps"]["median"], "max_rps_level": best["level"]}
    last = levels[-1]
    return {"level": last["level"], "rps": last["rps"]["median"], "p99_ms": last["p99_ms"]["median"],
            "reason": "still growing at the highest level", "max_rps": best["rps"]["median"],
            "max_rps_level": best["level"]}


def fmt(s: dict[str, Any], digits: int = 1, scale: float = 1.0, pct: bool = False) -> str:
    if s["median"] is None:
        return "-"
    spec = f",.{digits}f" + ("%" if pct else "")
    med, lo, hi = s["median"] * scale, s["min"] * scale, s["max"] * scale
    if pct:
        spec = f".{digits}%"
    if lo == hi:
        return format(med, spec)
    return f"{format(med, spec)} ({format(lo, spec)}–{format(hi, spec)})"


def print_tables(console: Console, points: list[dict[str, Any]], runs: int) -> None:
    for kind in ("oneway", "twoway"):
        mine = [p for p in points if p["kind"] == kind]
        if not mine:
            continue
        table = Table(title=f"{kind} RPC through REST, median (min–max) of {runs} run(s)")
        for column in ("load", "RPC/s", "p50 ms", "p95 ms", "p99 ms", "errors", "server µs/RPC", "server core",
                       "sim µs/RPC", "loadgen µs/RPC", "others' cores"):
            table.add_column(column, justify="right")
        for p in sorted(mine, key=lambda p: (p["rate"] is not None, p["level"] or 0, p["rate"] or 0)):
            load = f"C={p['level']}" if p["rate"] is None else f"{p['rate']:g}/s open"
            table.add_row(load, fmt(p["rps"], 0), fmt(p["p50_ms"]), fmt(p["p95_ms"]), fmt(p["p99_ms"]),
                          fmt(p["error_rate"], 2, pct=True), fmt(p["server_cpu_us_per_rpc"], 0),
                          fmt(p["server_cpu_share"], 0, pct=True), fmt(p["sim_cpu_us_per_rpc"], 0),
                          f"{p['client']} {fmt(p['client_cpu_us_per_rpc'], 0)}", fmt(p["other_cores"], 2))
        console.print(table)


def _git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "dirty_nanoiot_files": git("status", "--short", "--", "nanoiot").splitlines()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000, help="K: connected devices (default 1,000)")
    parser.add_argument("--levels", type=int, nargs="*", default=[1, 8, 32, 64, 128, 256],
                        help="closed-loop concurrency levels (keep-alive connections)")
    parser.add_argument("--rate", type=float, nargs="*", default=[],
                        help="open-loop fixed rates, RPC/s (e.g. --rate 2000)")
    parser.add_argument("--rate-connections", type=int, default=256, help="connection pool of the open loop")
    parser.add_argument("--modes", nargs="+", choices=("oneway", "twoway"), default=["oneway", "twoway"])
    parser.add_argument("--oneway-answer", choices=("none", "echo"), default="none",
                        help="what the devices do with a one-way command besides PUBACK")
    parser.add_argument("--client", choices=("wrk", "python"), default="wrk" if WRK else "python",
                        help="closed-loop load generator (default: wrk when installed)")
    parser.add_argument("--duration", type=float, default=10.0, help="measuring window per point, s")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--drain", type=float, default=15.0, help="open loop: wait this long for the last calls")
    parser.add_argument("--runs", type=int, default=2, help="fresh server per run; tables show the median")
    parser.add_argument("--profile", nargs="*", default=[],
                        help="py-spy the server during these points, e.g. twoway:64 or twoway:rate2000")
    parser.add_argument("--max-load", type=float, default=1.0,
                        help="wait for the 1-minute load average to fall below this before each run")
    parser.add_argument("--load-wait", type=float, default=180.0)
    parser.add_argument("--output", default="rpc", help="results file name in bench/results (default rpc.json)")
    args = parser.parse_args()
    if args.client == "wrk" and not WRK:
        parser.error("wrk is not installed (apt-get install -y wrk), use --client python")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop the server and sim
    console = Console(width=170)
    rows: list[dict[str, Any]] = []
    profiles: list[Any] = []
    for run in range(1, args.runs + 1):
        r, p = one_run(args, console, run)
        rows.extend(r)
        profiles.extend(p)
    points = aggregate(rows)
    print_tables(console, points, args.runs)
    sat = {kind: saturation(points, kind) for kind in args.modes}
    for kind, s in sat.items():
        if s:
            console.print(f"{kind} saturation: C={s['level']} at {s['rps']:,.0f} RPC/s, p99 {s['p99_ms']} ms "
                          f"({s['reason']}); highest {s['max_rps']:,.0f} RPC/s at C={s['max_rps_level']}")
    targets = []
    two = sat.get("twoway")
    if two:
        targets.append(("two-way >= 5,000 RPC/s", two["max_rps"], two["max_rps"] >= 5000))
    one = sat.get("oneway")
    if one:
        targets.append(("one-way >= 10,000 RPC/s", one["max_rps"], one["max_rps"] >= 10000))
    at2000 = [p for p in points if p["kind"] == "twoway" and p["rate"] == 2000]
    if at2000:
        p99 = at2000[0]["p99_ms"]["median"]
        targets.append(("two-way p99 <= 20 ms at 2,000 RPC/s", p99, p99 is not None and p99 <= 20))
    for name, value, ok in targets:
        console.print(f"target {name}: {value:,} -> {'met' if ok else 'MISSED'}")
    for profile in profiles:
        console.print(f"profile {profile['what']}: {profile['path']} ({profile['top']['samples']} samples)")
        for category, share in profile["top"]["categories"]:
            console.print(f"   {share:5.1f} %  {category}")
        for frame, share in profile["top"]["self"][:10]:
            console.print(f"   self {share:5.1f} %  {frame}")
    path = write_result(args.output, {
        "machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv]), "git": _git_state(),
        "settings": {k: v for k, v in vars(args).items()}, "summary": points, "saturation": sat,
        "targets": [{"target": n, "value": v, "met": ok} for n, v, ok in targets], "profiles": profiles,
        "runs": rows})
    console.print(f"results written to {path}")


if __name__ == "__main__":
    main()
