"""Cluster: two-way RPC routed between nodes against served locally, and one process against two, on PostgreSQL.

    python bench/cluster.py                                    # defaults: 200 devices, C = 1 8 32, 2 runs (~6 min)
    python bench/cluster.py --runs 1 --levels 8 --phases routed --profile routed:8 --output cluster-profile

One throw-away PostgreSQL 15 cluster (tests.fixtures.database.PostgresServer: initdb + pg_ctl in a temporary
directory, run as ``postgres``; fsync on unless ``--pg-fsync off``) serves the whole command; every configuration
below gets a fresh database of its own on it. Every node is ``twistd -n --pidfile= nanoiot --cluster --node-id N
--database postgresql+psycopg2://... --jwt-key K --heartbeat-interval S --dead-after S`` (log level info, so that
the node logs name what went wrong; nothing is logged per call at that level).

The devices (``--fleet``): ``c`` (the default when a C compiler is found), bench/mqtt_echo_fleet.c built by
bench.echo_fleet: the same packets as ``nanoiot-sim --answer echo`` (MQTT 3.1.1, QoS 1 both ways, one write per
packet) for ~20 µs of CPU per RPC, where the Python ``nanoiot-sim`` (``--fleet sim``) takes 55-80 µs on the same
cores as the nodes (on a 2-core box that alone capped two processes at ~1.36x one). The fleet is in the JSON
(``fleet``) and its CPU per call too (``sim_cpu_us_per_rpc``, whichever fleet it was). Per run:

1. **routed** - two nodes, A and B, each on its own ports. K devices (``--devices``, 200) are inserted into the
   database (bench.common.provision_devices) and connect to A's MQTT port as ``nanoiot-sim --answer echo`` devices
   (every command answered with its own payload; the fleet is above): A holds them all. Closed loop at each level C
   (``--levels``, 1 8 32): ``POST /api/rpc/twoway/{deviceId}`` ``{"method":"echo","params":{"i":n}}``, device ids
   rotating over the K devices, C keep-alive connections, the next call as soon as the answer is in; once to A
   (*local*: served by A's device actor) and once to B (*routed*: B's REST front end sends the command to A over
   PostgreSQL NOTIFY, A's actor sends it to the device, and the answer goes back to B the same way). The order of
   the two alternates from run to run.
2. **scale** - the same load against one node holding every device (``single``: still ``--cluster`` on
   PostgreSQL, as a cluster needs it), then against two nodes sharing the HTTP, MQTT and CoAP ports with
   ``--reuse-port`` (``dual``: what ``nanoiot run --processes 2`` starts): the devices connect through the shared
   MQTT port, so the kernel spreads them over both nodes, and the HTTP connections through the shared HTTP port, so
   about half the calls are for a device held by the other node and are routed.
   With ``--dual-bus`` a third setup, ``dual-bus``, runs the same two processes with ``--cluster-link-host ''``:
   every routed call over PostgreSQL NOTIFY instead of the nodes' direct links (links against NOTIFY, same run).

Each point: 1 s warmup (``--warmup``), then a ``--duration`` window (8 s): RPC/s, latency p50/p95/p99 of every
call (wrk's), errors (status other than 2xx/3xx with the status codes counted, socket errors, timeouts), and CPU
(utime + stime from /proc/PID/stat) over the window per call answered: each node, PostgreSQL (the postmaster and
every backend), the device fleet, the load generator, and "others' cores" (the rest of the machine, /proc/stat: the
noise of a shared box). Before each point the script waits (at most 30 s) for the nodes to idle, then (at most
``--quiet-wait`` s, 90) until the other processes of the machine used less than ``--max-others`` cores (0.25) over
one second (recorded per point); a point during which they used more than ``--max-others-during`` (0.3) is
measured again, at most ``--retries`` times (2), and the quietest attempt is kept (the others stay in the JSON).
Before the first run it waits (at most ``--load-wait`` s) for the 1-minute load average to fall below
``--max-load``. Other engineers edit the same work tree while this runs: every node, the simulator and the
provisioning load a copy of nanoiot/ taken at the start (PYTHONPATH), so that every configuration measures the same
code: by default the committed code (``--code head``: ``git archive HEAD``), or the work tree with its uncommitted
edits (``--code tree``); its fingerprint and the git state at the copy are in the JSON.

Server CPU per call, as the targets count it: local = A's; routed = A's + B's; single = the node's; dual = both
nodes'. PostgreSQL's CPU per call is reported beside it (routing goes through it) and in the "incl. PostgreSQL"
figures.

Targets, each from the medians over ``--runs`` (paired within a run where a ratio or a difference is taken):
routing adds <= 1.5 ms to the p50 (routed p50 - local p50, at every level); routed server CPU <= 1.5x local; and
the routed calls/s. Two processes >= 1.3x the two-way RPC/s of one (best level of each; each level shown too).

Load generator: ``wrk`` (one thread, bench/rpc.py's Lua script plus a count of every status other than 200)
when installed (``apt-get install -y wrk``), bench/rpc.py's asyncio client otherwise (``--client python``).

``--profile routed:8`` (and/or ``local:8``, ``dual:32``, ...) runs ``py-spy record`` on every node during those
points and stores a summary of each node's reactor thread by category in the JSON (py-spy slows the nodes: profile
in a run of its own, not in the run whose figures you quote). The node logs' warnings and errors go into the JSON
(``node_logs``); with ``--keep-work`` the whole work directory (node logs, sim output, py-spy stacks) is kept.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.common import ROOT, TWISTD, Server, cpu_seconds, free_port, free_udp_port, machine, provision_devices  # noqa: E402
from bench.common import write_result  # noqa: E402
from bench.echo_fleet import compiler, fleet_command, start_fleet  # noqa: E402
from bench.loadgen import loadavg, wait_for_quiet  # noqa: E402
from bench.rpc import PYSPY, WRK, HttpLoad, _children_cpu, _own_cpu, _system_busy  # noqa: E402
from bench.rpc import summarize_profile as rpc_summarize_profile  # noqa: E402
from tests.fixtures.database import PostgresServer, create_database, find_pg_bin  # noqa: E402

JWT_KEY = "bench-cluster-key-" + "x" * 60

#: bench/rpc.py's script, and a count of every status other than 200 (per thread, summed in ``done``).
WRK_SCRIPT = r"""
-- bench/cluster.py: POST /api/rpc/twoway/<deviceId>, device ids rotating; JWT and ids from the environment.
local ids = {}
for line in io.lines(os.getenv("RPC_IDS")) do ids[#ids + 1] = line end
local headers = {["Content-Type"] = "application/json",
                 ["X-Authorization"] = "Bearer " .. os.getenv("RPC_JWT")}
local counter = 0
local offset = 0
local threads = {}
statuses = {}
function setup(thread) table.insert(threads, thread) end
function init(args) offset = math.random(#ids) end
function request()
  counter = counter + 1
  return wrk.format("POST", "/api/rpc/twoway/" .. ids[(counter + offset) % #ids + 1], headers,
                    '{"method":"echo","params":{"i":' .. counter .. '}}')
end
function response(status, headers, body)
  if status ~= 200 then statuses[status] = (statuses[status] or 0) + 1 end
end
function done(summary, latency, requests)
  local parts = {}
  for _, thread in ipairs(threads) do
    local counts = thread:get("statuses")
    if counts then
      for status, n in pairs(counts) do parts[#parts + 1] = string.format('"%d":%d', status, n) end
    end
  end
  io.write("WRKSTATUS {" .. table.concat(parts, ",") .. "}\n")
  io.write(string.format('WRKJSON {"requests":%d,"duration_us":%d,"status_errors":%d,"timeouts":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"p50_us":%d,"p95_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f}\n', summary.requests, summary.duration, summary.errors.status,
    summary.errors.timeout, summary.errors.connect, summary.errors.read, summary.errors.write,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max, latency.mean))
end
"""

#: Log lines kept in the JSON: anything above info, and the info lines that tell of a device changing node.
LOG_KEEP = re.compile(r"\[(warn|error|critical)\]|Traceback|Unhandled|taken over|letting it go|declared dead")


# --- PostgreSQL ----------------------------------------------------------------------------------------------------


class Postgres(PostgresServer):
    """tests.fixtures.database.PostgresServer, with fsync a choice (on by default: a benchmark, not a test)."""

    def __init__(self, bin_dir: Path, fsync: bool) -> None:
        super().__init__(bin_dir)
        self.fsync = fsync

    def start(self) -> None:
        self.run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C",
                 "--no-sync")
        last_error: Exception | None = None
        for _ in range(3):
            self.port = free_port()
            options = (f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 "
                       f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=200")
            try:
                self.run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options,
                         "start", timeout=70)
                return
            except RuntimeError as exc:
                last_error = exc
        raise RuntimeError(str(last_error))

    @property
    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def version(self) -> str:
        out = subprocess.run([str(self.bin_dir / "postgres"), "--version"], capture_output=True, text=True)
        return out.stdout.strip()


def _ppid(pid: str) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def pg_cpu(postmaster: int) -> dict[int, float]:
    """CPU seconds of the postmaster and each of its children (backends, walwriter, ...), by PID."""
    out: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid == postmaster or _ppid(entry) == postmaster:
            try:
                out[pid] = cpu_seconds(pid)
            except (OSError, IndexError, ValueError):
                pass
    return out


def pg_cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """A backend started in between counts from 0 (its connection set-up included); one that ended is lost."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


# --- nodes ---------------------------------------------------------------------------------------------------------


class Node(Server):
    """One cluster node: bench.common.Server's process handling, started with the cluster options and ready once
    it logged its banner (with shared ports a login may be answered by the other node)."""

    node_id: str = ""
    cluster_options: list[str] = []
    env: dict[str, str] = {}

    @classmethod
    def make(cls, node_id: str, database: str, workdir: Path, http_port: int, mqtt_port: int, coap_port: int,
             args: argparse.Namespace, reuse_port: bool) -> "Node":
        node = cls(database=database, workdir=workdir, http_port=http_port, mqtt_port=mqtt_port,
                   coap_port=coap_port)
        node.node_id = node_id
        node.cluster_options = ["--cluster", "--node-id", node_id, "--heartbeat-interval",
                                str(args.heartbeat_interval), "--dead-after", str(args.dead_after)]
        if reuse_port:
            node.cluster_options.append("--reuse-port")
        return node

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def start(self, timeout: float = 90) -> "Node":
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [TWISTD, "-n", "--pidfile=", "nanoiot", "--host", "127.0.0.1", "--http-port", str(self.http_port),
                "--mqtt-port", str(self.mqtt_port), "--coap-port", str(self.coap_port), "--database",
                str(self.database), "--demo", "--jwt-key", JWT_KEY, "--log-level", "info", *self.cluster_options]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(args, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                        env=self.env or None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node {self.node_id} exited: {self.log_path.read_text()[-3000:]}")
            if "is ready" in self.log_path.read_text(errors="replace"):
                self.login()  # the port answers (this node's, or a sibling's on a shared port)
                return self
            time.sleep(0.2)
        raise RuntimeError(f"node {self.node_id} was not ready in {timeout:.0f} s: "
                           f"{self.log_path.read_text()[-3000:]}")

    def kept_log_lines(self, limit: int = 100) -> dict[str, Any]:
        """The log's entries (a line and its tab-indented continuation lines) that are warnings, errors or tell of
        a device changing node; at most ``limit`` of them, and how many there were."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return {"lines": 0, "kept": [], "kept_total": 0}
        entries: list[list[str]] = []
        for line in lines:
            if line.startswith("\t") and entries:
                entries[-1].append(line)
            else:
                entries.append([line])
        kept = ["\n".join(entry) for entry in entries if any(LOG_KEEP.search(line) for line in entry)]
        return {"lines": len(lines), "kept_total": len(kept), "kept": kept[:limit]}


def code_fingerprint(base: Path = ROOT) -> str:
    """sha1 of every nanoiot/**/*.py under ``base``: what a node started now loads from there."""
    import hashlib

    digest = hashlib.sha1()
    for path in sorted((base / "nanoiot").rglob("*.py")):
        digest.update(str(path.relative_to(base)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def snapshot_code(work: Path, what: str) -> Path:
    """A copy of nanoiot/ which every node, the simulator and the provisioning load (PYTHONPATH, and a working
    directory outside the work tree): other engineers edit the same tree while the benchmark runs, and every
    configuration of a run must measure the same code. ``head``: the committed code (``git archive HEAD``, read
    only); ``tree``: the work tree as it is now, uncommitted edits included."""
    code = work / "code"
    if what == "head":
        code.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", "--format=tar", "HEAD", "nanoiot"], cwd=ROOT,
                                 capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(code)], input=archive.stdout, check=True)
    else:
        source = ROOT if what == "tree" else Path(what)  # --code PATH: that directory's nanoiot/
        shutil.copytree(source / "nanoiot", code / "nanoiot", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return code


def cluster_nodes(url: str, jwt: str) -> list[dict[str, Any]]:
    request = urllib.request.Request(f"{url}/api/cluster/nodes", headers={"X-Authorization": f"Bearer {jwt}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


# --- one configuration: database, nodes, devices -------------------------------------------------------------------


@dataclass
class Target:
    """Where the load goes and whose CPU counts as the server's."""

    mode: str  # local | routed | single | dual
    port: int
    counted: list[Node]


class Setup:
    """A fresh database, its nodes, K devices in it, the simulator connected to ``mqtt_port``."""

    def __init__(self, name: str, pg: Postgres, args: argparse.Namespace, work: Path, run: int,
                 code: Path | None) -> None:
        self.name = name
        self.code_dir = code
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NANOIOT_")}
        self.env.pop("PYTHONPATH", None)
        if code is not None:
            self.env["PYTHONPATH"] = str(code)
        self.pg = pg
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix=f"{name}-run{run}-", dir=work))
        self.database = create_database(pg.url("postgres"), f"bench_{name}_{run}_{os.getpid()}")
        self.nodes: list[Node] = []
        self.sim: subprocess.Popen | None = None
        self.jwt = ""
        self.device_ids: list[str] = []
        self.ids_file = self.work / "ids.txt"
        self.lua = self.work / "rpc.lua"
        self.lua.write_text(WRK_SCRIPT)

    def start_nodes(self, names: list[str], shared: bool, bus_only: bool = False) -> None:
        self.code = code_fingerprint(self.code_dir or ROOT)
        ports = (free_port(), free_port(), free_udp_port())
        for name in names:
            http, mqtt, coap = ports if shared else (free_port(), free_port(), free_udp_port())
            node = Node.make(name, self.database, self.work / name, http, mqtt, coap, self.args, reuse_port=shared)
            if bus_only:
                node.cluster_options += ["--cluster-link-host", ""]
            node.env = self.env
            self.nodes.append(node)
            node.start()  # one at a time: the first creates the schema and seeds the demo tenant
        devices = self._provision()
        self.device_ids = [device_id for device_id, _ in devices]
        (self.work / "tokens.txt").write_text("\n".join(token for _, token in devices) + "\n")
        self.ids_file.write_text("\n".join(self.device_ids) + "\n")
        self.jwt = self.nodes[0].login()

    def _provision(self) -> list[tuple[str, str]]:
        """bench.common.provision_devices, in a subprocess that loads the nodes' code (its schema)."""
        if self.code_dir is None:
            return provision_devices(self.database, self.args.devices, prefix=self.name)
        env = dict(self.env, PYTHONPATH=f"{self.code_dir}{os.pathsep}{ROOT}")
        script = ("import json, sys; from bench.common import provision_devices; "
                  "print(json.dumps(provision_devices(sys.argv[1], int(sys.argv[2]), sys.argv[3])))")
        out = subprocess.run([sys.executable, "-c", script, self.database, str(self.args.devices), self.name],
                             env=env, cwd=self.work, capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"provisioning failed: {out.stderr[-2000:]}")
        return [tuple(pair) for pair in json.loads(out.stdout.strip().splitlines()[-1])]  # type: ignore[misc]

    def start_sim(self, mqtt_port: int) -> float:
        out = self.work / "sim.jsonl"
        self.sim_out = out
        self.sim, elapsed = start_fleet(mqtt_port, self.work / "tokens.txt", out, cwd=self.work, env=self.env,
                                        fleet=self.args.fleet)
        return elapsed

    def devices_per_node(self) -> dict[str, int]:
        """connectedDevices of each node as its last heartbeat stored it."""
        time.sleep(self.args.heartbeat_interval + 0.5)
        try:
            return {n["nodeId"]: n["connectedDevices"] for n in cluster_nodes(self.nodes[0].url, self.jwt)}
        except OSError as exc:
            return {"error": str(exc)}  # type: ignore[dict-item]

    def wait_quiet(self) -> tuple[float, float]:
        """Wait (at most ``--quiet-wait`` s) until the rest of the machine (every process but the nodes,
        PostgreSQL and the simulator) used less than ``--max-others`` cores over one second; returns (seconds
        waited, the others' cores last seen)."""
        began = time.monotonic()
        while True:
            before = self._ours(), _system_busy()
            time.sleep(1.0)
            after = self._ours(), _system_busy()
            others = max(0.0, (after[1] - before[1]) - (after[0] - before[0]))
            waited = time.monotonic() - began
            if others < self.args.max_others or waited >= self.args.quiet_wait:
                return round(waited, 1), round(others, 2)

    def _ours(self) -> float:
        assert self.sim is not None
        return (sum(cpu_seconds(n.pid) for n in self.nodes) + sum(pg_cpu(self.pg.postmaster_pid).values())
                + cpu_seconds(self.sim.pid))

    def wait_idle(self, limit: float = 30.0) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            before = sum(cpu_seconds(n.pid) for n in self.nodes)
            time.sleep(0.5)
            if (sum(cpu_seconds(n.pid) for n in self.nodes) - before) / 0.5 < 0.05 * len(self.nodes):
                return

    def close(self, keep: bool) -> dict[str, Any]:
        if self.sim is not None and self.sim.poll() is None:
            self.sim.terminate()
            try:
                self.sim.wait(30)
            except subprocess.TimeoutExpired:
                self.sim.kill()
                self.sim.wait()
        logs: dict[str, Any] = {}
        for node in self.nodes:
            node.stop()
            logs[node.node_id] = node.kept_log_lines()
            logs[node.node_id]["exit_code"] = node.process.returncode if node.process else None
        if not keep:
            shutil.rmtree(self.work, ignore_errors=True)
        return logs

    # --- one point ---------------------------------------------------------------------------------------------

    def measure(self, target: Target, level: int, profile: bool) -> dict[str, Any]:
        assert self.sim is not None
        self.wait_idle()
        waited, others_before = self.wait_quiet()
        load = loadavg()
        if self.args.client == "wrk":
            result, marks = self._wrk(target.port, level, profile)
        else:
            marks = self._marks()
            spies = self._start_profile(target.mode, level) if profile else []
            load_gen = HttpLoad(target.port, self.jwt, "twoway", self.device_ids, level, None, self.args.warmup,
                                self.args.duration, 0.0)
            own0 = _own_cpu()
            result = asyncio.run(load_gen.run())
            result["client"] = "python"
            result["span_client_cpu_s"] = _own_cpu() - own0
            marks["spies"] = spies
        end = self._marks()
        elapsed = end["t"] - marks["t"]
        node_cpu = {n.node_id: end["nodes"][n.node_id] - marks["nodes"][n.node_id] for n in self.nodes}
        pg = pg_cpu_between(marks["pg"], end["pg"])
        sim = end["sim"] - marks["sim"]
        busy = end["busy"] - marks["busy"]
        loadgen = result.pop("span_client_cpu_s")
        others = max(0.0, busy - sum(node_cpu.values()) - pg - sim - loadgen)
        calls = max(result.get("total_calls") or 0, 1)  # every call answered in the span the CPU was read over
        counted = sum(node_cpu[n.node_id] for n in target.counted)
        per = lambda seconds: round(seconds / calls * 1e6, 1)  # noqa: E731
        row = {
            "config": self.name, "mode": target.mode, "level": level, "fleet": self.args.fleet,
            "loadavg_1m_before": round(load, 2),
            "quiet_wait_s": waited, "others_cores_before": others_before,
            **result,
            "span_s": round(elapsed, 2),
            "server_cpu_us_per_rpc": per(counted),
            "server_pg_cpu_us_per_rpc": per(counted + pg),
            "node_cpu_us_per_rpc": {name: per(s) for name, s in node_cpu.items()},
            "node_core_share": {name: round(s / elapsed, 3) for name, s in node_cpu.items()},
            "pg_cpu_us_per_rpc": per(pg), "pg_core_share": round(pg / elapsed, 3),
            "sim_cpu_us_per_rpc": per(sim), "client_cpu_us_per_rpc": per(loadgen),
            "other_cores": round(others / elapsed, 2), "busy_cores": round(busy / elapsed, 2),
        }
        if marks.get("spies"):
            row["profiles"] = self._finish_profile(marks["spies"])
        return row

    def _marks(self) -> dict[str, Any]:
        assert self.sim is not None
        return {"nodes": {n.node_id: cpu_seconds(n.pid) for n in self.nodes}, "pg": pg_cpu(self.pg.postmaster_pid),
                "sim": cpu_seconds(self.sim.pid), "busy": _system_busy(), "t": time.perf_counter()}

    def _wrk(self, port: int, level: int, profile: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        env = dict(os.environ, RPC_JWT=self.jwt, RPC_IDS=str(self.ids_file))
        base = [WRK, "-t", "1", "-c", str(level), "--timeout", "30s", "-s", str(self.lua), f"http://127.0.0.1:{port}/"]
        if self.args.warmup > 0:  # a run of its own: the owner lookups, connections and caches happen here
            warm = subprocess.run(base[:1] + ["-d", f"{max(1, round(self.args.warmup))}s"] + base[1:], env=env,
                                  capture_output=True, text=True)
            self.last_warmup = _parse_wrk(warm.stdout)
        spies = self._start_profile(self.current_mode, level) if profile else []
        marks = self._marks()
        marks["spies"] = spies
        cpu0 = _children_cpu()
        out = subprocess.run(base[:1] + ["-d", f"{max(1, round(self.args.duration))}s"] + base[1:], env=env,
                             capture_output=True, text=True)
        cpu1 = _children_cpu()
        w = _parse_wrk(out.stdout)
        if w is None:
            raise RuntimeError(f"wrk failed: {out.stdout[-1000:]} {out.stderr[-1000:]}")
        seconds = w["duration_us"] / 1e6
        socket_errors = w["connect_errors"] + w["read_errors"] + w["write_errors"] + w["timeouts"]
        errors = w["status_errors"] + socket_errors
        ok = w["requests"] - w["status_errors"]
        result = {
            "client": "wrk", "requests": w["requests"], "ok": ok, "statuses": w["statuses"],
            "socket_errors": socket_errors, "timeouts": w["timeouts"], "errors": errors,
            "error_rate": round(errors / max(w["requests"] + socket_errors, 1), 5),
            "rps": round(ok / seconds, 1), "p50_ms": round(w["p50_us"] / 1000, 3),
            "p95_ms": round(w["p95_us"] / 1000, 3), "p99_ms": round(w["p99_us"] / 1000, 3),
            "max_ms": round(w["max_us"] / 1000, 2), "mean_ms": round(w["mean_us"] / 1000, 3),
            "client_cpu_s": round(cpu1 - cpu0, 3), "span_client_cpu_s": cpu1 - cpu0,
            "wrk_seconds": round(seconds, 3), "total_calls": w["requests"],
            "warmup_errors": (self.last_warmup or {}).get("status_errors") if self.args.warmup > 0 else None,
            "warmup_statuses": (self.last_warmup or {}).get("statuses") if self.args.warmup > 0 else None,
        }
        return result, marks

    # --- py-spy ------------------------------------------------------------------------------------------------

    current_mode = ""
    last_warmup: dict[str, Any] | None = None

    def _start_profile(self, mode: str, level: int) -> list[dict[str, Any]]:
        seconds = max(1, int(self.args.duration - 1))
        spies = []
        for node in self.nodes:
            path = self.work / f"{mode}-{level}-{node.node_id}.pyspy.txt"
            command = [PYSPY, "record", "-p", str(node.pid), "-f", "raw", "-o", str(path), "-d", str(seconds)]
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            spies.append({"node": node.node_id, "process": process, "path": path, "command": " ".join(command)})
        return spies

    def _finish_profile(self, spies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for spy in spies:
            process: subprocess.Popen = spy.pop("process")
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.terminate()
                process.wait()
            spy["top"] = summarize_profile(spy["path"])
            spy["path"] = str(spy["path"])
            out.append(spy)
        return out


def _parse_wrk(stdout: str) -> dict[str, Any] | None:
    found = re.search(r"^WRKJSON (\{.*\})$", stdout, re.M)
    if not found:
        return None
    w = json.loads(found.group(1))
    statuses = re.search(r"^WRKSTATUS (\{.*\})$", stdout, re.M)
    w["statuses"] = json.loads(statuses.group(1)) if statuses else {}
    return w


#: Categories of a node's reactor-thread samples: the cluster's own code first (so that a routed call's extra
#: work is counted where it is, whatever called it), then bench/rpc.py's.
PROFILE_CATEGORIES = (
    ("cluster/codec.py", "cluster: envelope encoding/decoding (codec)"),
    ("cluster/notify.py", "cluster: LISTEN/NOTIFY bus (psycopg2, batching)"),
    ("cluster/router.py", "cluster: router"),
    ("cluster/port.py", "cluster: port (routing, tracking, replies)"),
    ("cluster_store.py", "cluster: store (database)"),
    ("cluster/node.py", "cluster: node (heartbeat, ids)"),
    ("TokenIssuer.verify_access", "JWT verification"),
    ("Request.finish", "HTTP response (headers, write, finish)"),
    ("Request.write", "HTTP response (headers, write, finish)"),
    ("JsonApi._write", "HTTP response (headers, write, finish)"),
    ("MqttSession.", "MQTT send (session, encode, write)"),
    ("MqttDeviceProtocol.dataReceived", "MQTT receive (framing, decode, routing)"),
    ("DeviceActor.on_receive", "device actor and RPC queue"),
    ("JSONDecoder", "JSON decoding"),
    ("JSONEncoder", "JSON encoding"),
    ("RpcApi._send", "REST RPC handler (routing, body, catalog, tell)"),
    ("JsonApi.render", "REST RPC handler (routing, body, catalog, tell)"),
    ("HTTPChannel.dataReceived", "HTTP request parsing (twisted.web)"),
    ("HTTPChannel.connectionLost", "HTTP connection handling"),
    ("Dispatcher._drain", "actor dispatch (mailboxes)"),
    ("Deferred.", "Deferred callbacks"),
    ("doWrite", "socket writes (send)"),
    ("Connection.doRead", "socket reads (recv)"),
    ("EPollReactor.doPoll", "reactor (epoll, dispatch)"),
    ("ReactorBase.runUntilCurrent", "reactor timers"),
)


def summarize_profile(path: Path, top: int = 20) -> dict[str, Any]:
    """bench/rpc.py's summary of py-spy raw stacks (reactor thread only), with the cluster's categories."""
    return rpc_summarize_profile(path, top, PROFILE_CATEGORIES)


# --- the phases ----------------------------------------------------------------------------------------------------


class Runner:
    def __init__(self, args: argparse.Namespace, console: Console, pg: Postgres, work: Path,
                 code: Path | None) -> None:
        self.code = code
        self.args = args
        self.console = console
        self.pg = pg
        self.work = work
        self.rows: list[dict[str, Any]] = []
        self.discarded: list[dict[str, Any]] = []
        self.setups: list[dict[str, Any]] = []
        self.progress: Progress | None = None
        self.task: Any = None

    def points_per_run(self) -> int:
        n = 0
        if "routed" in self.args.phases:
            n += 2 * len(self.args.levels)
        if "scale" in self.args.phases:
            n += (3 if self.args.dual_bus else 2) * len(self.args.levels)
        return n

    def say(self, text: str) -> None:
        self.console.print(text)

    def _point(self, setup: Setup, target: Target, level: int, run: int) -> None:
        assert self.progress is not None
        self.progress.update(self.task, description=f"run {run}: {setup.name} {target.mode} C={level}")
        setup.current_mode = target.mode
        profile = f"{target.mode}:{level}" in self.args.profile
        attempts: list[dict[str, Any]] = []
        for attempt in range(self.args.retries + 1):
            row = setup.measure(target, level, profile)
            row["run"] = run
            row["attempt"] = attempt + 1
            attempts.append(row)
            if row["other_cores"] <= self.args.max_others_during:
                break
            if attempt < self.args.retries:
                self.say(f"  [yellow]run {run} {setup.name} {target.mode} C={level}: other processes used "
                         f"{row['other_cores']:.2f} cores meanwhile (> {self.args.max_others_during}, "
                         f"{row['rps']:,.0f} RPC/s); measuring again[/]")
        row = min(attempts, key=lambda r: r["other_cores"])  # the quietest attempt is kept
        self.discarded.extend(r for r in attempts if r is not row)
        self.rows.append(row)
        nodes = " ".join(f"{k} {v:.0%}" for k, v in row["node_core_share"].items())
        status = "" if not row["errors"] else f" [red]errors {row['errors']} {row.get('statuses')}[/]"
        self.say(f"  run {run} {setup.name:6} {target.mode:6} C={level:<3} {row['rps']:>7,.0f} RPC/s  "
                 f"p50 {row['p50_ms']:.2f} p99 {row['p99_ms']:.2f} ms  server {row['server_cpu_us_per_rpc']:.0f} "
                 f"µs/RPC (+pg {row['pg_cpu_us_per_rpc']:.0f})  cores: {nodes} pg {row['pg_core_share']:.0%}  "
                 f"sim {row['sim_cpu_us_per_rpc']:.0f} µs  {row['client']} {row['client_cpu_us_per_rpc']:.0f} µs  "
                 f"others {row['other_cores']:.2f}{status}"
                 + (f" (waited {row['quiet_wait_s']:.0f} s for a quiet machine)" if row["quiet_wait_s"] > 2 else ""))
        for spy in row.get("profiles", []):
            self.say(f"    py-spy {spy['node']}: {spy['top']['samples']} samples: " + "; ".join(
                f"{c} {s}%" for c, s in spy["top"]["categories"][:8]))
        self.progress.advance(self.task)

    def _configure(self, name: str, run: int) -> Setup:
        return Setup(name, self.pg, self.args, self.work, run, self.code)

    def _finish(self, setup: Setup, info: dict[str, Any]) -> None:
        info["code"] = getattr(setup, "code", None)
        info["node_logs"] = setup.close(self.args.keep_work)
        for node, log in info["node_logs"].items():
            if log["kept_total"]:
                self.say(f"  [yellow]{setup.name} {node}: {log['kept_total']} warning/error line(s) in its log, "
                         f"e.g. {log['kept'][0][:200]}[/]")
        self.setups.append(info)

    def routed(self, run: int) -> None:
        setup = self._configure("routed", run)
        info: dict[str, Any] = {"config": "routed", "run": run}
        try:
            setup.start_nodes(["A", "B"], shared=False)
            a, b = setup.nodes
            info["connect_s"] = round(setup.start_sim(a.mqtt_port), 2)
            info["devices_per_node_before"] = setup.devices_per_node()
            targets = [Target("local", a.http_port, [a]), Target("routed", b.http_port, [a, b])]
            if run % 2 == 0:
                targets.reverse()
            for target in targets:
                for level in self.args.levels:
                    self._point(setup, target, level, run)
            info["devices_per_node_after"] = setup.devices_per_node()
        finally:
            self._finish(setup, info)

    def scale(self, run: int) -> None:
        configs = [("single", ["solo"]), ("dual", ["P1", "P2"])]
        if self.args.dual_bus:  # the same two processes with every message through NOTIFY (no direct links)
            configs.append(("dual-bus", ["P1", "P2"]))
        for name, nodes in configs:
            setup = self._configure(name, run)
            info: dict[str, Any] = {"config": name, "run": run}
            try:
                setup.start_nodes(nodes, shared=name != "single", bus_only=name == "dual-bus")
                info["connect_s"] = round(setup.start_sim(setup.nodes[0].mqtt_port), 2)
                info["devices_per_node_before"] = setup.devices_per_node()
                target = Target(name, setup.nodes[0].http_port, list(setup.nodes))
                for level in self.args.levels:
                    self._point(setup, target, level, run)
                info["devices_per_node_after"] = setup.devices_per_node()
                self.say(f"  run {run} {name}: devices per node {info['devices_per_node_after']}")
            finally:
                self._finish(setup, info)

    def run_all(self) -> None:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=self.console) as progress:
            self.progress = progress
            self.task = progress.add_task("starting", total=self.points_per_run() * self.args.runs)
            for run in range(1, self.args.runs + 1):
                self.say(f"[bold]run {run}/{self.args.runs}[/] (1-min load {loadavg():.2f})")
                if "routed" in self.args.phases:
                    self.routed(run)
                if "scale" in self.args.phases:
                    self.scale(run)


# --- summary -------------------------------------------------------------------------------------------------------


def summarize(values: list[Any]) -> dict[str, Any]:
    present = [v for v in values if v is not None]
    if not present:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(present), 3), "min": min(present), "max": max(present)}


KEYS = ("rps", "p50_ms", "p95_ms", "p99_ms", "max_ms", "error_rate", "server_cpu_us_per_rpc", "pg_cpu_us_per_rpc",
        "server_pg_cpu_us_per_rpc", "pg_core_share", "sim_cpu_us_per_rpc", "client_cpu_us_per_rpc", "other_cores", "busy_cores")


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    points: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        points.setdefault((row["mode"], row["level"]), []).append(row)
    out = []
    for (mode, level), group in points.items():
        entry: dict[str, Any] = {"mode": mode, "level": level, "runs": len(group), "client": group[0]["client"],
                                 "errors": sum(r["errors"] for r in group)}
        for key in KEYS:
            entry[key] = summarize([r.get(key) for r in group])
        nodes = sorted({n for r in group for n in r["node_core_share"]})
        entry["node_core_share"] = {n: summarize([r["node_core_share"].get(n) for r in group]) for n in nodes}
        entry["node_cpu_us_per_rpc"] = {n: summarize([r["node_cpu_us_per_rpc"].get(n) for r in group])
                                        for n in nodes}
        statuses: Counter[str] = Counter()
        for r in group:
            statuses.update(r.get("statuses") or {})
        entry["statuses"] = dict(statuses)
        out.append(entry)
    order = {"local": 0, "routed": 1, "single": 2, "dual": 3, "dual-bus": 4}
    return sorted(out, key=lambda p: (order.get(p["mode"], 9), p["level"]))


def paired(rows: list[dict[str, Any]], a: str, b: str, level: int | None, f: Any) -> list[float]:
    """f(row of mode a, row of mode b) for each run that has both (at ``level``; None: each mode's best level)."""
    out = []
    for run in sorted({r["run"] for r in rows}):
        mine = [r for r in rows if r["run"] == run]
        if level is None:
            ra = max((r for r in mine if r["mode"] == a), key=lambda r: r["rps"], default=None)
            rb = max((r for r in mine if r["mode"] == b), key=lambda r: r["rps"], default=None)
        else:
            ra = next((r for r in mine if r["mode"] == a and r["level"] == level), None)
            rb = next((r for r in mine if r["mode"] == b and r["level"] == level), None)
        if ra is not None and rb is not None:
            out.append(f(ra, rb))
    return out


def targets(rows: list[dict[str, Any]], levels: list[int]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    modes = {r["mode"] for r in rows}
    if {"local", "routed"} <= modes:
        for level in levels:
            diff = summarize(paired(rows, "local", "routed", level, lambda l, r: r["p50_ms"] - l["p50_ms"]))
            if diff["median"] is not None:
                out.append({"target": f"routing adds <= 1.5 ms p50 (C={level})", "value": diff, "unit": "ms",
                            "met": diff["median"] <= 1.5})
        for level in levels:
            ratio = summarize(paired(rows, "local", "routed", level,
                                     lambda l, r: r["server_cpu_us_per_rpc"] / l["server_cpu_us_per_rpc"]))
            if ratio["median"] is not None:
                out.append({"target": f"routed CPU (A+B) <= 1.5x local (A) (C={level})", "value": ratio,
                            "unit": "x", "met": ratio["median"] <= 1.5})
        for level in levels:
            ratio = summarize(paired(rows, "local", "routed", level,
                                     lambda l, r: r["server_pg_cpu_us_per_rpc"] / l["server_pg_cpu_us_per_rpc"]))
            if ratio["median"] is not None:
                out.append({"target": f"(info) routed CPU incl. PostgreSQL / local incl. PostgreSQL (C={level})",
                            "value": ratio, "unit": "x", "met": None})
        for level in levels:
            rps = summarize([r["rps"] for r in rows if r["mode"] == "routed" and r["level"] == level])
            out.append({"target": f"(info) routed calls/s (C={level})", "value": rps, "unit": "RPC/s", "met": None})
    if {"single", "dual"} <= modes:
        best = summarize(paired(rows, "single", "dual", None, lambda s, d: d["rps"] / s["rps"]))
        out.append({"target": "2 processes >= 1.3x the two-way RPC/s of 1 (best level of each)", "value": best,
                    "unit": "x", "met": best["median"] is not None and best["median"] >= 1.3})
        for level in levels:
            ratio = summarize(paired(rows, "single", "dual", level, lambda s, d: d["rps"] / s["rps"]))
            if ratio["median"] is not None:
                out.append({"target": f"(info) 2 processes / 1, RPC/s at C={level}", "value": ratio, "unit": "x",
                            "met": None})
    if {"dual", "dual-bus"} <= modes:
        for level in levels:
            ratio = summarize(paired(rows, "dual-bus", "dual", level, lambda b, d: d["rps"] / b["rps"]))
            cpu = summarize(paired(rows, "dual-bus", "dual", level,
                                   lambda b, d: d["server_pg_cpu_us_per_rpc"] / b["server_pg_cpu_us_per_rpc"]))
            if ratio["median"] is not None:
                out.append({"target": f"(info) direct links / NOTIFY only, RPC/s at C={level}", "value": ratio,
                            "unit": "x", "met": None})
                out.append({"target": f"(info) direct links / NOTIFY only, CPU incl. PostgreSQL per RPC at "
                            f"C={level}", "value": cpu, "unit": "x", "met": None})
    return out


def fmt(s: dict[str, Any], digits: int = 1, pct: bool = False) -> str:
    if s is None or s.get("median") is None:
        return "-"
    spec = f".{digits}%" if pct else f",.{digits}f"
    med, lo, hi = s["median"], s["min"], s["max"]
    if lo == hi:
        return format(med, spec)
    return f"{format(med, spec)} ({format(lo, spec)}–{format(hi, spec)})"


def print_tables(console: Console, points: list[dict[str, Any]], found: list[dict[str, Any]], runs: int) -> None:
    table = Table(title=f"two-way RPC through REST, median (min–max) of {runs} run(s)")
    for column in ("mode", "C", "RPC/s", "p50 ms", "p95 ms", "p99 ms", "errors", "server µs/RPC", "pg µs/RPC",
                   "node cores", "pg core", "sim µs/RPC", "loadgen µs/RPC", "others' cores"):
        table.add_column(column, justify="right")
    for p in points:
        cores = " ".join(f"{n} {fmt(s, 0, pct=True)}" for n, s in p["node_core_share"].items())
        table.add_row(p["mode"], str(p["level"]), fmt(p["rps"], 0), fmt(p["p50_ms"], 2), fmt(p["p95_ms"], 2),
                      fmt(p["p99_ms"], 2), str(p["errors"]) + (f" {p['statuses']}" if p["statuses"] else ""),
                      fmt(p["server_cpu_us_per_rpc"], 0), fmt(p["pg_cpu_us_per_rpc"], 0), cores,
                      fmt(p["pg_core_share"], 0, pct=True),
                      fmt(p["sim_cpu_us_per_rpc"], 0), f"{p['client']} {fmt(p['client_cpu_us_per_rpc'], 0)}",
                      fmt(p["other_cores"], 2))
    console.print(table)
    t = Table(title="targets (median of the runs, min–max)")
    t.add_column("target")
    t.add_column("value", justify="right")
    t.add_column("verdict")
    for item in found:
        verdict = "" if item["met"] is None else ("[green]met[/]" if item["met"] else "[red]MISSED[/]")
        t.add_row(item["target"], f"{fmt(item['value'], 2)} {item['unit']}", verdict)
    console.print(t)


def _git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted": git("status", "--short").splitlines()}


def _versions(pg: Postgres | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        import psycopg2
        import sqlalchemy
        import twisted

        out.update(twisted=twisted.__version__, sqlalchemy=sqlalchemy.__version__,
                   psycopg2=psycopg2.__version__.split()[0])
    except Exception:  # noqa: BLE001
        pass
    if pg is not None:
        out["postgresql"] = pg.version()
    if WRK:
        out["wrk"] = subprocess.run([WRK, "-v"], capture_output=True, text=True).stdout.splitlines()[:1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=200, help="K: connected devices (default 200)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="closed-loop concurrency levels")
    parser.add_argument("--duration", type=float, default=8.0, help="measuring window per point, s")
    parser.add_argument("--warmup", type=float, default=1.0, help="warmup before each point, s")
    parser.add_argument("--runs", type=int, default=2, help="repeat everything; tables show median (min–max)")
    parser.add_argument("--phases", nargs="+", choices=("routed", "scale"), default=["routed", "scale"])
    parser.add_argument("--client", choices=("wrk", "python"), default="wrk" if WRK else "python",
                        help="load generator (default: wrk when installed)")
    parser.add_argument("--heartbeat-interval", type=float, default=2.0, help="the nodes' --heartbeat-interval")
    parser.add_argument("--dead-after", type=float, default=10.0, help="the nodes' --dead-after")
    parser.add_argument("--pg-fsync", choices=("on", "off"), default="on")
    parser.add_argument("--profile", nargs="*", default=[],
                        help="py-spy every node during these points, e.g. routed:8 local:8 dual:32")
    parser.add_argument("--max-load", type=float, default=1.0,
                        help="before the first run, wait for the 1-minute load average to fall below this")
    parser.add_argument("--load-wait", type=float, default=60.0)
    parser.add_argument("--max-others", type=float, default=0.25,
                        help="before each point, wait until other processes use less than this many cores")
    parser.add_argument("--quiet-wait", type=float, default=90.0, help="... for at most this many seconds")
    parser.add_argument("--max-others-during", type=float, default=0.3,
                        help="a point during which other processes used more cores than this is measured again")
    parser.add_argument("--retries", type=int, default=2, help="... at most this many times (the last one is kept)")
    parser.add_argument("--dual-bus", action="store_true",
                        help="scale: also two processes with --cluster-link-host '' (every message over NOTIFY)")
    parser.add_argument("--keep-work", action="store_true", help="keep node logs, sim output, py-spy stacks")
    parser.add_argument("--code", default="head",
                        help="what the nodes run: head = a copy of the committed nanoiot/ (git archive HEAD), tree "
                             "= a copy of the work tree's nanoiot/ taken at the start, live = the work tree itself "
                             "(which other engineers edit meanwhile), or a PATH: a copy of PATH/nanoiot/ taken at the "
                             "start (an A/B against another version, e.g. a `git archive` of the baseline)")
    parser.add_argument("--fleet", choices=("c", "sim"), default="c" if compiler() else "sim",
                        help="the devices: c = bench/mqtt_echo_fleet.c (the same packets as nanoiot-sim, ~20 µs "
                             "of CPU per RPC; default when a C compiler is found), sim = nanoiot-sim (Python)")
    parser.add_argument("--output", default="cluster", help="results file in bench/results (default cluster.json)")
    args = parser.parse_args()
    if args.code not in ("head", "tree", "live") and not (Path(args.code) / "nanoiot").is_dir():
        parser.error(f"--code: head, tree, live or a directory holding nanoiot/, not {args.code!r}")
    if args.client == "wrk" and not WRK:
        parser.error("wrk is not installed (apt-get install -y wrk), use --client python")
    if args.profile and not Path(PYSPY).exists():
        parser.error(f"--profile needs py-spy ({PYSPY}): .venv/bin/pip install py-spy")
    if args.dead_after <= 2 * args.heartbeat_interval:
        parser.error("--dead-after must be more than twice --heartbeat-interval")
    if args.fleet == "c" and fleet_command(0, Path("tokens.txt"))[1] != "c":
        parser.error("--fleet c needs a C compiler (cc, gcc, clang or $CC)")
    bin_dir, why = find_pg_bin()
    if bin_dir is None:
        parser.error(f"PostgreSQL not found: {why}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    console = Console(width=200)
    started = time.time()
    load = wait_for_quiet(args.max_load, args.load_wait, console.print)
    git_at_start = _git_state()
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    pg = Postgres(bin_dir, fsync=args.pg_fsync == "on")
    runner = None
    try:
        pg.start()
        console.print(f"PostgreSQL {pg.version()} on port {pg.port} (fsync={args.pg_fsync}); work in {work}; "
                      f"1-min load {load:.2f}")
        code = snapshot_code(work, args.code) if args.code != "live" else None
        snapshot = {"fingerprint": code_fingerprint(code or ROOT), "git_status_at_copy": _git_state()}
        runner = Runner(args, console, pg, work, code)
        runner.run_all()
        versions = _versions(pg)
    finally:
        pg.stop()
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    points = aggregate(runner.rows)
    found = targets(runner.rows, args.levels)
    print_tables(console, points, found, args.runs)
    codes = {s.get("code") for s in runner.setups}
    if len(codes) > 1:
        console.print(f"[red]the nanoiot/ code changed on disk during the run: fingerprints {sorted(codes)} "
                      "(see setups[].code)[/]")
    path = write_result(args.output, {
        "machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv]), "git": git_at_start,
        "git_at_end": _git_state(),
        "versions": versions, "settings": vars(args), "fleet": args.fleet,
        "elapsed_s": round(time.time() - started, 1),
        "summary": points, "targets": found, "setups": runner.setups, "runs": runner.rows,
        "discarded_noisy_points": runner.discarded, "code": {"mode": args.code, **snapshot},
        "work": str(work) if args.keep_work else None})
    console.print(f"results written to {path} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
