"""Soak: does the server's memory stay bounded under a steady two-way RPC load? RSS over 10 minutes, recorded.

    python bench/soak.py                                          # 1,000 devices, 1,500 RPC/s, 60 s + 600 s, churn 20/s
    python bench/soak.py --rate 1500 --duration 600 --churn 0     # the same without device churn
    python bench/soak.py --duration 40 --warmup 10 --rate 300 --devices 200   # a smoke test of the script

What happens (one fresh server):

1. ``twistd -n nanoiot`` (bench.common.Server, SQLite), K devices (``--devices``, 1,000) provisioned in bulk, a JWT
   from ``/api/auth/login``, and the K devices connected with ``nanoiot-sim --json --answer echo`` (a subprocess),
   all through ``bench.rpc.Bench``, as ``bench/rpc.py`` does for its two-way points (except that the server's CoAP
   port is a free one too, not 5683, so that the soak can start while another benchmark's server is up).
2. Open loop at a fixed rate R (``--rate``, 1,500/s: about half the two-way saturation measured by bench/rpc.py
   after the JWT cache, ~3,200/s at C=64): ``POST /api/rpc/twoway/{deviceId}`` ``{"method":"echo",...}``, device
   ids rotating over the K devices, started on schedule whether or not earlier calls have finished, over a pool of
   ``--connections`` keep-alive connections (the asyncio client of bench/rpc.py; a call that finds no free
   connection waits in the client and its latency counts from the moment it was due). A connection the server
   closes is replaced. ``--warmup`` s (60) of load first, then the measured window of ``--duration`` s (600).
3. Churn (``--churn N``, 20/s; 0 turns it off): N devices per second, from a separate pool of devices that get no
   RPCs, connect over MQTT (CONNECT, SUBSCRIBE, with the simulator's own device class
   ``nanoiot.sim.fleet.SimulatedDevice``, in this process), stay ``--churn-hold`` s (2) and leave with DISCONNECT.
   The pool is N x ``--churn-cycle`` devices (65 s x 20 = 1,300) taken round robin, so each churn device comes back
   every ~65 s: longer than the server's ``--device-idle-timeout`` (60 s), so its device actor has been passivated
   in between and every cycle creates and drops a session and an actor. The first pass over the pool ends
   ``--churn-cycle`` s in (65 s, 5 s after the default warmup): until then every churn connect is a device seen
   for the first time (device cache entry, new actor; a few KB each), so ~100 of them, a few hundred KB, still fall
   inside the window: small against the threshold below. Make ``--warmup`` longer than ``--churn-cycle`` to avoid
   even that.
4. Every ``--sample`` s (5) one record: elapsed s, server RSS (VmRSS, /proc/PID/status), the server's share of a
   core (utime + stime, /proc/PID/stat), RPCs answered in the interval (200s) and RPC/s, errors in the interval
   (status other than 200, socket errors), p50/p99 of the latencies of the calls answered in the interval, calls
   in flight and queued in the client, churn connects/failures, the CPU share of this client and of the simulator,
   and "others' cores" (CPU other processes of this shared machine used: /proc/stat minus the server, the
   simulator and this process). A sample at 0 s (devices connected, no load yet), one at the end of the warmup and
   one at the end are always taken. (Python object counts are not recorded: the server is another process.)
5. After the window the client waits at most ``--drain`` s (15) for calls still open; calls due in the window that
   were never sent or never answered count as errors.

Verdict: a least-squares line through (time, RSS) of the samples of the measured window (the end-of-warmup sample
included). Growth = slope x window length. **Flat** if growth < ``--flat-threshold`` % (5) of the RSS at the end
of the warmup. Why 5 %: RSS moves in steps (pymalloc arenas, 256 KB; malloc trimming; SQLite's page cache) and a
shared machine adds noise, so a few MB up or down are not a leak; while at 1,500 RPC/s for 600 s (900,000 calls)
5 % of a ~80 MB process is ~4 MB, i.e. ~4-5 bytes per RPC, or ~350 bytes per churned session (12,000 of them):
a leak of even one small object per call, or of a session's state, crosses it. The report also gives the growth
per RPC in bytes (all of it charged to the RPCs, churn included). If the load was not sustained (achieved rate
< 95 % of R, or errors > 0.1 %) the verdict is printed with that caveat.

Output: a rich table and the verdict; ``bench/results/<--output>.json`` (machine, command, git commit, settings,
samples, summary) and ``bench/results/<--output>.png`` (RSS in MB with the fit, RPC/s and p99 against time; only
when matplotlib is installed: ``pip install -e '.[bench]'``). Ctrl-C stops the run early: the server and the
simulator are stopped, temporary directories removed, and what was measured is reported and written to
``<--output>-partial.json``.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import math
import signal
import socket
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.common import (RESULTS, Server, cpu_seconds, machine, provision_devices, raise_nofile, rss_kb,  # noqa: E402
                          write_result)
from bench.loadgen import wait_for_quiet  # noqa: E402
from bench.rpc import Bench, HttpConnection, HttpLoad, _git_state, _own_cpu, _pct, _system_busy  # noqa: E402
from nanoiot.sim.fleet import Behaviour, FleetStats, SimulatedDevice  # noqa: E402
from nanoiot.transports.mqtt import codec  # noqa: E402


# --- the load: bench.rpc's open-loop client, counting per sample interval --------------------------------------


@dataclass
class Bucket:
    """What was answered between two samples (by the time the answer came in)."""

    ok: int = 0
    errors: int = 0
    socket_errors: int = 0
    statuses: Counter = field(default_factory=Counter)
    latencies: array.array = field(default_factory=lambda: array.array("d"))


class SoakConnection(HttpConnection):
    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.owner.lost_connection(self)  # type: ignore[attr-defined]


class SoakLoad(HttpLoad):
    """Two-way calls due at ``rate``/s for as long as the soak runs; answers go to the current :class:`Bucket`."""

    def __init__(self, port: int, jwt: str, device_ids: list[str], connections: int, rate: float) -> None:
        super().__init__(port, jwt, "twoway", device_ids, connections, rate, warmup=0.0, duration=0.0, drain=0.0)
        self.bucket = Bucket()
        self.reconnects = 0
        self.due = 0

    def completed(self, connection: HttpConnection, status: int, latency: float, now: float) -> None:
        self.outstanding -= 1
        self.total_done += 1
        bucket = self.bucket
        if status == 200:
            bucket.ok += 1
        else:
            bucket.errors += 1
            bucket.statuses[status] += 1
        bucket.latencies.append(latency)
        self._next(connection, now)

    def failed(self, connection: HttpConnection, now: float) -> None:
        self.outstanding -= 1
        self.bucket.errors += 1
        self.bucket.socket_errors += 1

    def take_bucket(self) -> Bucket:
        bucket, self.bucket = self.bucket, Bucket()
        return bucket

    def lost_connection(self, connection: HttpConnection) -> None:
        try:
            self.free.remove(connection)
        except ValueError:
            pass
        if not self.stopping:
            asyncio.ensure_future(self._replace())

    async def _replace(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping:
            connection = SoakConnection(self)
            try:
                await loop.create_connection(lambda: connection, "127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(1.0)
                continue
            self.reconnects += 1
            self._next(connection, time.perf_counter())
            return

    async def open(self) -> list[SoakConnection]:
        loop = asyncio.get_running_loop()
        self.connections_list = [SoakConnection(self) for _ in range(self.connections)]
        await asyncio.gather(*(loop.create_connection(lambda c=c: c, "127.0.0.1", self.port)
                               for c in self.connections_list))
        self.free.extend(self.connections_list)
        return self.connections_list

    async def schedule(self, begin: float, end: float, check: Any) -> None:
        """Start a call every 1/rate s from ``begin`` to ``end``; ``check()`` is called between calls."""
        interval = 1.0 / self.rate  # type: ignore[operator]
        while True:
            now = time.perf_counter()
            if now >= end:
                return
            check()
            due_until = int((now - begin) / interval) + 1
            while self.due < due_until:
                due = begin + self.due * interval
                self.due += 1
                self.start_or_queue(due)
            await asyncio.sleep(max(0.0, begin + self.due * interval - time.perf_counter()))

    def close(self) -> None:
        self.stopping = True
        for connection in getattr(self, "connections_list", []):
            if connection.transport is not None:
                connection.transport.close()


# --- churn: devices that connect, stay a moment and leave --------------------------------------------------------


class Churn:
    """``per_second`` MQTT devices a second from ``tokens`` (round robin): connect, subscribe, hold, DISCONNECT."""

    def __init__(self, port: int, tokens: list[str], per_second: float, hold: float) -> None:
        self.port = port
        self.tokens = tokens
        self.per_second = per_second
        self.hold = hold
        self.free: deque[int] = deque(range(len(tokens)))
        self.stats = FleetStats()
        self.behaviour = Behaviour(answer="none")
        self.connects = self.failed = self.disconnects = self.skipped = 0
        self.tasks: set[asyncio.Future] = set()
        self.devices: set[SimulatedDevice] = set()

    async def run(self, begin: float, end: float) -> None:
        interval = 1.0 / self.per_second
        started = 0
        while True:
            due = begin + started * interval
            if due >= end:
                return
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            started += 1
            if not self.free:
                self.skipped += 1  # every pool device is still in its cycle: the pool is too small
                continue
            task = asyncio.ensure_future(self._cycle(self.free.popleft()))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _cycle(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future = loop.create_future()
        device = SimulatedDevice(self.tokens[index], self.stats, self.behaviour, ready, loop)
        self.devices.add(device)
        try:
            try:
                await loop.create_connection(lambda: device, "127.0.0.1", self.port)
                ok = await asyncio.wait_for(ready, 30)
            except (OSError, asyncio.TimeoutError):
                ok = False
            if not ok:
                self.failed += 1
                return
            self.connects += 1
            await asyncio.sleep(self.hold)
            if device.transport is not None and not device.transport.is_closing():
                device.transport.write(codec.encode_disconnect(4))
                self.disconnects += 1
        finally:
            if device.transport is not None:
                device.transport.close()
            self.devices.discard(device)
            self.free.append(index)

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for device in list(self.devices):
            if device.transport is not None:
                device.transport.close()


class SoakBench(Bench):
    """bench.rpc's Bench with the server's CoAP port on a free UDP port too.

    bench.common.Server leaves ``--coap-port`` at its default, 5683: a second server on the machine (another
    benchmark running) then fails with "Address already in use". A copy of Bench.start_server with that one change.
    """

    def start_server(self) -> None:
        extra = ["--coap-port", str(free_udp_port())]
        self.server = Server(workdir=Path(tempfile.mkdtemp(prefix="server-", dir=self.work)), extra=extra).start()
        devices = provision_devices(self.server.database, self.args.devices)
        self.device_ids = [device_id for device_id, _ in devices]
        (self.work / "tokens.txt").write_text("\n".join(token for _, token in devices) + "\n")
        (self.work / "ids.txt").write_text("\n".join(self.device_ids) + "\n")
        self.jwt = self.server.login()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the soak -----------------------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, bench: SoakBench, churn_tokens: list[str], console: Console) -> None:
        assert bench.server is not None and bench.sim is not None
        self.args = args
        self.bench = bench
        self.console = console
        self.pid = bench.server.pid
        self.load = SoakLoad(bench.server.http_port, bench.jwt, bench.device_ids, args.connections, args.rate)
        self.churn = Churn(bench.server.mqtt_port, churn_tokens, args.churn, args.churn_hold) if churn_tokens else None
        self.samples: list[dict[str, Any]] = []
        #: Latencies of every call answered after the warmup (the drain included).
        self.window_latencies = array.array("d")
        self.window_statuses: Counter = Counter()
        self.drain: dict[str, Any] = {}
        self.finished = False
        self.progress: Progress | None = None
        self.task: Any = None

    def marks(self) -> list[float]:
        total = self.args.warmup + self.args.duration
        step = self.args.sample
        marks = {round(k * step, 6) for k in range(1, int(total / step) + 1)} | {self.args.warmup, total}
        return sorted(m for m in marks if 0 < m <= total)

    def _reading(self) -> dict[str, float]:
        assert self.bench.sim is not None
        return {"t": time.perf_counter(), "rss": rss_kb(self.pid), "server": cpu_seconds(self.pid),
                "sim": cpu_seconds(self.bench.sim.pid), "own": _own_cpu(), "busy": _system_busy()}

    def _check_alive(self) -> None:
        server = self.bench.server
        assert server is not None and server.process is not None
        if server.process.poll() is not None:
            log = (server.workdir / "server.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the server exited ({server.process.returncode}) during the soak:\n{log}")
        if self.bench.sim is not None and self.bench.sim.poll() is not None:
            raise RuntimeError(f"nanoiot-sim exited ({self.bench.sim.returncode}) during the soak")

    def _record(self, mark: float, before: dict[str, float], now: dict[str, float],
                churn_before: tuple[int, int], churn: tuple[int, int]) -> dict[str, Any]:
        bucket = self.load.take_bucket()
        dt = now["t"] - before["t"]
        ordered = sorted(bucket.latencies)
        phase = "warmup" if mark <= self.args.warmup else "soak"
        if phase == "soak":
            self.window_latencies.extend(bucket.latencies)
            self.window_statuses.update(bucket.statuses)
        server, sim, own = now["server"] - before["server"], now["sim"] - before["sim"], now["own"] - before["own"]
        sample = {
            "t_s": round(mark, 3), "phase": phase, "interval_s": round(dt, 3),
            "rss_mb": round(now["rss"] / 1024, 2), "rss_kb": now["rss"],
            "server_cpu_share": round(server / dt, 3) if dt else None,
            "client_cpu_share": round(own / dt, 3) if dt else None, "sim_cpu_share": round(sim / dt, 3) if dt else None,
            "rpcs": bucket.ok, "rps": round(bucket.ok / dt, 1) if dt else None,
            "errors": bucket.errors, "socket_errors": bucket.socket_errors,
            "statuses": {str(k): v for k, v in sorted(bucket.statuses.items())},
            "p50_ms": _pct(ordered, 0.50), "p99_ms": _pct(ordered, 0.99),
            "in_flight": self.load.outstanding, "client_backlog": len(self.load.backlog),
            "churn_connects": churn[0] - churn_before[0], "churn_failed": churn[1] - churn_before[1],
            "others_cores": round(max(0.0, now["busy"] - before["busy"] - server - sim - own) / dt, 2) if dt else None,
        }
        self.samples.append(sample)
        return sample

    def _show(self, s: dict[str, Any]) -> None:
        line = (f"{s['t_s']:7.1f} s {s['phase']:6}  RSS {s['rss_mb']:7.1f} MB  {s['rps'] or 0:7,.0f} RPC/s  "
                f"p50 {s['p50_ms']} p99 {s['p99_ms']} ms  errors {s['errors']}  server {s['server_cpu_share']:.0%}  "
                f"client {s['client_cpu_share']:.0%}  "
                f"in flight {s['in_flight']} queued {s['client_backlog']}  churn +{s['churn_connects']}"
                f"{'/' + str(s['churn_failed']) + ' failed' if s['churn_failed'] else ''}  "
                f"others {s['others_cores']}")
        if self.progress is not None:
            self.progress.console.print(line)
            self.progress.update(self.task, completed=s["t_s"], description=s["phase"],
                                 status=f"RSS {s['rss_mb']:.1f} MB, {s['rps'] or 0:,.0f} RPC/s, p99 {s['p99_ms']} ms")
        else:
            self.console.print(line)

    async def _sampler(self, begin: float, before: dict[str, float]) -> None:
        churn_before = (0, 0)
        for mark in self.marks():
            await asyncio.sleep(max(0.0, begin + mark - time.perf_counter()))
            self._check_alive()
            now = self._reading()
            churn_now = (self.churn.connects, self.churn.failed) if self.churn else (0, 0)
            sample = self._record(mark, before, now, churn_before, churn_now)
            self._show(sample)
            before, churn_before = now, churn_now

    async def run(self) -> None:
        total = self.args.warmup + self.args.duration
        await self.load.open()
        # Sample 0: devices connected, no load yet.
        zero = self._reading()
        self.samples.append({"t_s": 0.0, "phase": "idle", "interval_s": 0.0, "rss_mb": round(zero["rss"] / 1024, 2),
                             "rss_kb": zero["rss"], "server_cpu_share": None, "client_cpu_share": None,
                             "sim_cpu_share": None, "rpcs": 0, "rps": 0.0, "errors": 0,
                             "socket_errors": 0, "statuses": {}, "p50_ms": None, "p99_ms": None, "in_flight": 0,
                             "client_backlog": 0, "churn_connects": 0, "churn_failed": 0, "others_cores": None})
        begin = time.perf_counter()
        end = begin + total
        sampler = asyncio.ensure_future(self._sampler(begin, self._reading()))
        churn = asyncio.ensure_future(self.churn.run(begin, end)) if self.churn else None

        def check() -> None:
            if sampler.done():
                sampler.result()  # raises what stopped it (the server died)

        try:
            await self.load.schedule(begin, end, check)
            await sampler
            if churn is not None:
                await churn
            self.finished = True
            # Calls still open or queued: at most --drain s more; whatever is left then counts as an error.
            deadline = time.perf_counter() + self.args.drain
            while (self.load.outstanding > 0 or self.load.backlog) and time.perf_counter() < deadline:
                await asyncio.sleep(0.05)
            late = self.load.take_bucket()
            self.window_latencies.extend(late.latencies)
            self.window_statuses.update(late.statuses)
            self.drain = {"answered_ok": late.ok, "errors": late.errors, "unsent": len(self.load.backlog),
                          "unanswered": self.load.outstanding,
                          "seconds": round(self.args.drain - max(0.0, deadline - time.perf_counter()), 2)}
        finally:
            for task in (sampler, churn):
                if task is not None and not task.done():
                    task.cancel()
            self.load.backlog.clear()
            self.load.close()
            if self.churn is not None:
                self.churn.close()
            await asyncio.sleep(0.1)

    def run_with_progress(self) -> None:
        total = self.args.warmup + self.args.duration
        if self.console.is_terminal:
            self.progress = Progress(TextColumn("[bold]{task.description:6}"), BarColumn(),
                                     TextColumn("{task.completed:>5.0f}/{task.total:.0f} s"), TimeElapsedColumn(),
                                     TextColumn("{task.fields[status]}"), console=self.console)
            self.task = self.progress.add_task("warmup", total=total, status="")
            with self.progress:
                asyncio.run(self.run())
        else:
            asyncio.run(self.run())


# --- the verdict ------------------------------------------------------------------------------------------------------


def in_window(samples: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The samples of the measured window: the one at the end of the warmup, then every later one."""
    start = round(args.warmup, 3)
    return [s for s in samples if s["t_s"] >= start]


def fit_slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x."""
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def summarize(soak: Soak, args: argparse.Namespace) -> dict[str, Any]:
    samples = soak.samples
    window = in_window(samples, args)
    warmup = [s for s in samples if s["phase"] == "warmup"]
    at_warmup = window[0] if window else None  # the sample taken at the end of the warmup
    measured = [s for s in window if s["phase"] == "soak"]  # intervals after the warmup (answers counted there)
    window_s = (window[-1]["t_s"] - window[0]["t_s"]) if len(window) > 1 else 0.0
    slope_kb_s = fit_slope([(s["t_s"], s["rss_kb"]) for s in window])
    ok = sum(s["rpcs"] for s in measured)
    errors = sum(s["errors"] for s in measured)
    drain = soak.drain
    if drain:
        errors += drain["errors"] + drain["unsent"] + drain["unanswered"]
    ordered = sorted(soak.window_latencies)
    rss = [s["rss_kb"] for s in window]
    summary: dict[str, Any] = {
        "completed": soak.finished, "window_s": round(window_s, 1), "samples_in_window": len(window),
        "rss_idle_mb": samples[0]["rss_mb"] if samples else None,
        "rss_end_of_warmup_mb": at_warmup["rss_mb"] if at_warmup else None,
        "rss_end_mb": window[-1]["rss_mb"] if window else None,
        "rss_max_mb": round(max(rss) / 1024, 2) if rss else None,
        "rss_min_mb": round(min(rss) / 1024, 2) if rss else None,
        "rss_slope_kb_per_min": round(slope_kb_s * 60, 1) if slope_kb_s is not None else None,
        "rpcs_answered_ok": ok + (drain.get("answered_ok", 0) if drain else 0),
        "achieved_rps": round(ok / window_s, 1) if window_s else None, "asked_rps": args.rate,
        "errors": errors, "error_rate": round(errors / max(ok + errors, 1), 5),
        "statuses": {str(k): v for k, v in sorted(soak.window_statuses.items())},
        "p50_ms": _pct(ordered, 0.50), "p99_ms": _pct(ordered, 0.99),
        "max_ms": round(ordered[-1] * 1000, 2) if ordered else None,
        "warmup_rpcs_ok": sum(s["rpcs"] for s in warmup), "warmup_errors": sum(s["errors"] for s in warmup),
        "max_client_backlog": soak.load.max_backlog, "http_reconnects": soak.load.reconnects, "drain": drain,
        "server_cpu_share_mean": round(sum(s["server_cpu_share"] or 0 for s in measured) / len(measured), 3)
        if measured else None,
        "client_cpu_share_mean": round(sum(s["client_cpu_share"] or 0 for s in measured) / len(measured), 3)
        if measured else None,
        "others_cores_mean": round(sum(s["others_cores"] or 0 for s in measured) / len(measured), 2)
        if measured else None,
    }
    if soak.churn is not None:
        summary["churn"] = {"connects": soak.churn.connects, "failed": soak.churn.failed,
                            "disconnects": soak.churn.disconnects, "skipped_pool_empty": soak.churn.skipped,
                            "pool": len(soak.churn.tokens)}
    if slope_kb_s is not None and at_warmup:
        growth_kb = slope_kb_s * window_s
        threshold_kb = args.flat_threshold / 100 * at_warmup["rss_kb"]
        summary.update({
            "rss_growth_fit_mb": round(growth_kb / 1024, 2), "threshold_mb": round(threshold_kb / 1024, 2),
            "threshold": f"{args.flat_threshold:g} % of the RSS at the end of the warmup",
            "rss_growth_bytes_per_rpc": round(growth_kb * 1024 / ok, 2) if ok else None,
            "flat": growth_kb < threshold_kb,
        })
        sustained = (summary["achieved_rps"] or 0) >= 0.95 * args.rate and summary["error_rate"] <= 0.001
        summary["load_sustained"] = sustained
        verdict = "flat" if summary["flat"] else "GROWING"
        if not soak.finished:
            verdict += " (the run stopped early: incomplete)"
        elif not sustained:
            verdict += f" (but the load was not sustained: {summary['achieved_rps']:,} of {args.rate:g} RPC/s, " \
                       f"error rate {summary['error_rate']:.2%})"
        summary["verdict"] = verdict
    else:
        summary.update({"flat": None, "verdict": "not enough samples for a fit"})
    return summary


def print_summary(console: Console, summary: dict[str, Any], args: argparse.Namespace) -> None:
    table = Table(title=f"Soak: {args.rate:g} two-way RPC/s, {args.devices:,} devices, churn {args.churn:g}/s, "
                        f"window {summary['window_s']:g} s after {args.warmup:g} s warmup")
    table.add_column("what")
    table.add_column("value", justify="right")

    def mb(v: Any) -> str:
        return "-" if v is None else f"{v:,.1f} MB"

    rows = [
        ("RSS idle (devices connected, before load)", mb(summary["rss_idle_mb"])),
        ("RSS at end of warmup", mb(summary["rss_end_of_warmup_mb"])),
        ("RSS at end", mb(summary["rss_end_mb"])),
        ("RSS max / min in window", f"{mb(summary['rss_max_mb'])} / {mb(summary['rss_min_mb'])}"),
        ("RSS slope (least squares)", "-" if summary["rss_slope_kb_per_min"] is None
         else f"{summary['rss_slope_kb_per_min']:,.1f} KB/min"),
        ("growth over window (slope x window)", mb(summary.get("rss_growth_fit_mb"))),
        ("threshold", f"{mb(summary.get('threshold_mb'))} ({args.flat_threshold:g} % of end-of-warmup RSS)"),
        ("growth per RPC", "-" if summary.get("rss_growth_bytes_per_rpc") is None
         else f"{summary['rss_growth_bytes_per_rpc']:,.2f} bytes"),
        ("RPCs answered 200 (window + drain)", f"{summary['rpcs_answered_ok']:,}"),
        ("achieved rate", "-" if summary["achieved_rps"] is None
         else f"{summary['achieved_rps']:,.1f} of {args.rate:g} RPC/s"),
        ("errors", f"{summary['errors']:,} ({summary['error_rate']:.3%}) {summary['statuses'] or ''}"),
        ("latency p50 / p99 / max", f"{summary['p50_ms']} / {summary['p99_ms']} / {summary['max_ms']} ms"),
        ("server share of a core (mean)", "-" if summary["server_cpu_share_mean"] is None
         else f"{summary['server_cpu_share_mean']:.0%}"),
        ("this client's share of a core (mean)", "-" if summary["client_cpu_share_mean"] is None
         else f"{summary['client_cpu_share_mean']:.0%}"),
        ("others' cores (mean)", str(summary["others_cores_mean"])),
        ("client queue max / HTTP reconnects", f"{summary['max_client_backlog']} / {summary['http_reconnects']}"),
    ]
    if "churn" in summary:
        c = summary["churn"]
        rows.append(("churn connects / failed / skipped (pool)",
                     f"{c['connects']:,} / {c['failed']} / {c['skipped_pool_empty']} ({c['pool']:,})"))
    for what, value in rows:
        table.add_row(what, value)
    console.print(table)
    style = "bold green" if summary.get("flat") else "bold red"
    console.print(f"verdict: [{style}]{summary['verdict']}[/]")


def plot(path: Path, samples: list[dict[str, Any]], summary: dict[str, Any], args: argparse.Namespace,
         console: Console) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        console.print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    top.plot(t, [s["rss_mb"] for s in samples], "o-", ms=2.5, color="tab:blue", label="server RSS (VmRSS)")
    slope = summary.get("rss_slope_kb_per_min")
    window = in_window(samples, args)
    if slope is not None and len(window) > 1:
        xs = [s["t_s"] for s in window]
        mx = sum(xs) / len(xs)
        my = sum(s["rss_mb"] for s in window) / len(window)
        per_s = slope / 60 / 1024
        top.plot([xs[0], xs[-1]], [my + per_s * (xs[0] - mx), my + per_s * (xs[-1] - mx)], "--", color="tab:red",
                 label=f"least squares: {slope:,.1f} KB/min -> {summary['verdict'].split(' (')[0]}")
    threshold = summary.get("threshold_mb")
    if threshold is not None and window:
        base = window[0]["rss_mb"]
        top.fill_between([window[0]["t_s"], window[-1]["t_s"]], base, base + threshold, color="tab:green",
                         alpha=0.12, label=f"flat: growth < {threshold:.1f} MB ({args.flat_threshold:g} %)")
    for ax in (top, bottom):
        ax.axvspan(0, args.warmup, color="0.9", label="warmup" if ax is top else None)
        ax.grid(True, alpha=0.3)
    top.set_ylabel("RSS, MB")
    top.set_ylim(bottom=0)
    top.legend(loc="lower right", fontsize=8)
    top.set_title(f"NanoIoT soak: {args.rate:g} two-way RPC/s, {args.devices:,} devices, churn {args.churn:g}/s")
    # Interval values: each holds from the previous sample to its own (steps-pre).
    bottom.plot(t, [s["rps"] for s in samples], "-", drawstyle="steps-pre", color="tab:green",
                label="RPC/s answered (200)")
    errors = [(s["t_s"], s["errors"] / s["interval_s"]) for s in samples if s["errors"] and s["interval_s"]]
    if errors:
        bottom.plot(*zip(*errors), "x", color="tab:red", label="errors/s")
    bottom.set_ylabel("RPC/s")
    bottom.set_xlabel("time, s")
    bottom.set_ylim(bottom=0)
    right = bottom.twinx()
    right.plot(t, [s["p99_ms"] for s in samples], ":", drawstyle="steps-pre", color="tab:orange",
               label="p99 ms (right)")
    right.set_ylabel("p99 latency, ms")
    right.set_ylim(bottom=0)
    lines = bottom.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    bottom.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=1500.0, help="two-way RPC/s, open loop (default 1,500)")
    parser.add_argument("--duration", type=float, default=600.0, help="measured window, s (default 600)")
    parser.add_argument("--warmup", type=float, default=60.0, help="load before the window, s (default 60)")
    parser.add_argument("--devices", type=int, default=1000, help="K: connected devices that answer (default 1,000)")
    parser.add_argument("--connections", type=int, default=256, help="keep-alive HTTP connections of the client")
    parser.add_argument("--churn", type=float, default=20.0,
                        help="devices per second that connect, stay --churn-hold s and disconnect (0: none)")
    parser.add_argument("--churn-hold", type=float, default=2.0, help="seconds a churn device stays connected")
    parser.add_argument("--churn-cycle", type=float, default=65.0,
                        help="seconds before a churn device comes back (pool = churn x cycle devices); keep it "
                             "above the server's --device-idle-timeout (60 s) so actors are dropped in between")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--drain", type=float, default=15.0, help="wait this long for the last calls, s")
    parser.add_argument("--flat-threshold", type=float, default=5.0,
                        help="flat if fitted growth over the window < this %% of the end-of-warmup RSS (default 5)")
    parser.add_argument("--max-load", type=float, default=1.0,
                        help="wait for the 1-minute load average to fall below this before starting")
    parser.add_argument("--load-wait", type=float, default=180.0)
    parser.add_argument("--output", default="soak", help="name in bench/results (default soak: .json and .png)")
    args = parser.parse_args()
    if args.rate <= 0 or args.duration <= 0 or args.warmup < 0 or args.sample <= 0:
        parser.error("--rate, --duration and --sample must be > 0, --warmup >= 0")
    # SIGTERM: run the finally blocks (stop the server and the simulator, remove the temporary directories).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise_nofile()
    console = Console(width=170)
    pool = math.ceil(args.churn * args.churn_cycle) if args.churn > 0 else 0
    if args.churn > 0 and args.warmup < args.churn_cycle:
        console.print(f"note: the first pass over the {pool:,} churn devices ends at {args.churn_cycle:g} s, after "
                      f"the {args.warmup:g} s warmup: the server's device cache still fills a little in the window")
    load = wait_for_quiet(args.max_load, args.load_wait, console.print)
    console.print(f"soak: {args.rate:g} two-way RPC/s for {args.warmup:g} + {args.duration:g} s, "
                  f"{args.devices:,} devices, churn {args.churn:g}/s over {pool:,} more (1-min load {load:.2f})")
    bench = SoakBench(args, console)  # Bench reads args.devices
    soak: Soak | None = None
    interrupted = False
    failure: str | None = None
    try:
        bench.start_server()
        assert bench.server is not None
        churn_tokens = [token for _, token in provision_devices(bench.server.database, pool, prefix="churn")] \
            if pool else []
        bench.start_sim("echo")
        soak = Soak(args, bench, churn_tokens, console)
        try:
            soak.run_with_progress()
        except KeyboardInterrupt:
            interrupted = True
            console.print("[bold]interrupted[/]: stopping the server and the simulator")
        except Exception as exc:  # the server or the simulator died: report what was measured until then
            failure = f"{type(exc).__name__}: {exc}"
            console.print(f"[bold red]soak stopped[/]: {failure}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave the server running
        bench.close()
    assert soak is not None
    summary = summarize(soak, args)
    print_summary(console, summary, args)
    name = args.output + ("-partial" if interrupted or failure or not soak.finished else "")
    settings = dict(vars(args), churn_pool=pool, kind="twoway", server="bench.common.Server (SQLite)")
    path = write_result(name, {
        "machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv]), "git": _git_state(),
        "settings": settings, "loadavg_1m_before": load, "interrupted": interrupted, "failure": failure,
        "summary": summary, "samples": soak.samples})
    console.print(f"results written to {path}")
    png = plot(RESULTS / f"{name}.png", soak.samples, summary, args, console)
    if png is not None:
        console.print(f"plot written to {png}")
    if interrupted:
        raise SystemExit(130)
    if failure:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
