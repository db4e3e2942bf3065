"""Peers: the same MQTT loads against NanoIoT, Mosquitto and amqtt, in one run, as ratios.

    python bench/peers.py                                   # 3 rounds of both phases, all three servers
    python bench/peers.py --runs 1 --duration 5 --phases publish
    python bench/peers.py --runs 3 --phases connect --connect-count 10000 --output bench/results/peers-connect.json
    python bench/peers.py --phases connect --servers nanoiot baseline mosquitto --baseline /tmp/before   # A/B

Two phases, each measured by bench/loadgen.py on a server started afresh for it (on a free loopback port), which
is then stopped by its PID (SIGTERM, SIGKILL after 30 s) before a few seconds' pause. Before each measurement the
script waits (at most 120 s) for the machine's 1-minute load average to fall under 1.0, and the generator waits
for the server to idle. The figures are the median (min-max) over the rounds; the ratios NanoIoT/Mosquitto and
NanoIoT/amqtt are of those medians (and, for throughput and conn/s, per round).

- connect (``--connect-count``, 10,000; ``--connect-concurrency``, 100): the connect storm of bench/loadgen.py,
  one generator process: N MQTT 3.1.1 connections, at most C handshakes in progress, each TCP connect -> CONNECT
  (user name = token, keep-alive 300) -> CONNACK -> SUBSCRIBE ``v1/devices/me/rpc/request/+`` QoS 1 -> SUBACK, kept
  open. conn/s = connected / (first attempt -> last SUBACK); connect latency p50/p99 (TCP connect -> SUBACK);
  server CPU us per connection over the storm (/proc/PID/stat); the generator's own CPU us per connection; KB per
  connection = server VmRSS growth (before -> 2 s after the last SUBACK) / connected. amqtt's cost per connection
  grows with the number already connected (quadratic in total, see /work/shared/spec/peers.md), so it gets its
  own, smaller N (``--amqtt-connect-count``, 1,000): its ratios are at unequal N, and the output says so.
  1e6 / (server us per connection) is shown as the rate the server could reach with one core to itself.
- publish (``--connections`` 32 x ``--window`` 64 QoS 1 PUBLISHes in flight to ``v1/devices/me/rpc/response/1``,
  60-byte payload, 1 s warmup, 10 s window): PUBACK/s, publish->PUBACK p50/p99, server CPU us per PUBACK.

- NanoIoT: ``twistd -n nanoiot`` (bench.common.Server, SQLite), with one provisioned device per connection: it
  authenticates the user name as an access token. A publish to ``.../rpc/response/1`` is an answer to a command it
  never sent: decoded, routed to the device's actor, dropped there; PUBACK is sent by the protocol at once.
- baseline (``--baseline TREE``, with ``--servers ... baseline``): NanoIoT again, from the sources in TREE
  (PYTHONPATH), e.g. a copy of the tree before a change: an A/B in the same run, interleaved round by round.
- Mosquitto (Debian package, ``/usr/sbin/mosquitto``; installed with ``apt-get install -y mosquitto`` if missing):
  listener on 127.0.0.1, ``allow_anonymous true``, ``persistence false``, log to a directory owned by user
  ``mosquitto`` (it drops root and could not write a root-owned log file).
- amqtt (PyPI) in its own venv (``/tmp/amqtt-venv``, created on first use; never in the project's .venv), run by
  a small broker script with only anonymous authentication and WARNING logging, as in the peers study.
  Mosquitto and amqtt are anonymous: they get user names ``anon-0``, ``anon-1``, ...

The machine has 2 cores and the load generator shares it: against Mosquitto both processes are CPU-bound, so
Mosquitto's PUBACK/s and conn/s are floors; server CPU us per PUBACK or per connection is the figure that does not
depend on the generator. On loopback the kernel's receive work for a segment runs in the sender's system call, so
part of each side's TCP cost is charged to the other; that is the same for the three servers.
The results (machine, command, git commit, versions, settings, per-round figures, summary, ratios) go to
bench/results/peers.json or ``--output``: the publish phase under ``summary``/``ratios``/``runs`` as before, the
connect phase under ``connect``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.common import RESULTS, ROOT, Server, free_port, machine, provision_devices  # noqa: E402
from bench.loadgen import wait_for_quiet  # noqa: E402

MOSQUITTO = "/usr/sbin/mosquitto"
AMQTT_VENV = Path("/tmp/amqtt-venv")
LOADGEN = ROOT / "bench" / "loadgen.py"
#: One generator process holds at most ~20,000 descriptors here (hard RLIMIT_NOFILE).
MAX_CONNECT_COUNT = 15_000
PHASES = ("connect", "publish")

AMQTT_BROKER = '''\
"""amqtt broker for bench/peers.py: anonymous access only, WARNING logging (no per-connection lines)."""
import asyncio
import logging
import sys

from amqtt.broker import Broker


async def main(port):
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "max_connections": -1}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    logging.basicConfig(level=logging.WARNING)
    broker = Broker(config)
    await broker.start()
    await asyncio.Event().wait()


asyncio.run(main(int(sys.argv[1])))
'''

MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
max_connections -1
persistence false
log_dest file {log}
log_type error
log_type warning
log_type notice
connection_messages false
"""


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def wait_listening(port: int, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port} after {timeout} s")


def stop(process: subprocess.Popen, timeout: float = 30) -> str:
    """SIGTERM to this PID, SIGKILL to the same PID if it has not exited in ``timeout`` seconds."""
    if process.poll() is not None:
        return f"already exited ({process.returncode})"
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
        return "SIGTERM"
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return "SIGKILL"


def ensure_mosquitto(say: Callable[[str], None]) -> str:
    if not Path(MOSQUITTO).exists():
        say("installing mosquitto (apt-get install -y mosquitto)")
        subprocess.run(["apt-get", "install", "-y", "mosquitto"], check=True, stdout=subprocess.DEVNULL)
    out = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True)
    first = (out.stdout or out.stderr).splitlines()[0]
    return first.replace("mosquitto version ", "").strip()


def ensure_amqtt(say: Callable[[str], None]) -> str:
    python = AMQTT_VENV / "bin" / "python"
    if not python.exists():
        say(f"creating {AMQTT_VENV} and installing amqtt into it")
        subprocess.run(["python3", "-m", "venv", str(AMQTT_VENV)], check=True)
        subprocess.run([str(AMQTT_VENV / "bin" / "pip"), "install", "-q", "amqtt"], check=True)
    out = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('amqtt'))"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def run_loadgen(port: int, pid: int, label: str, tokens_file: Path, args: argparse.Namespace,
                phase: str, count: int = 0) -> dict[str, Any]:
    command = [sys.executable, str(LOADGEN), "--port", str(port), "--pid", str(pid), "--label", label,
               "--tokens-file", str(tokens_file), "--json"]
    if phase == "connect":
        command += ["--connect", str(count), "--concurrency", str(args.connect_concurrency),
                    "--settle", str(args.settle)]
        limit = 60 + 600 + args.settle + 120  # idle wait, the storm's cap, settle, closing
    else:
        command += ["--connections", str(args.connections), "--window", str(args.window),
                    "--warmup", str(args.warmup), "--duration", str(args.duration)]
        limit = args.warmup + args.duration + 120
    out = subprocess.run(command, capture_output=True, text=True, timeout=limit)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"load generator failed for {label}: {out.stderr[-2000:]}")
    result = json.loads(lines[-1])
    result["loadavg_1m_before"] = args._load
    return result


def anonymous_tokens(work: Path, count: int) -> Path:
    """User names for the anonymous brokers (they ignore them)."""
    path = work / f"anon-{count}.txt"
    if not path.exists():
        path.write_text("".join(f"anon-{i}\n" for i in range(count)))
    return path


@contextmanager
def nanoiot_server(work: Path, devices: int, stopped: dict[str, str],
                   tree: Path | None = None) -> Iterator[tuple[int, int, Path]]:
    """``twistd nanoiot`` from this tree, or from ``tree``'s sources (PYTHONPATH comes before the venv's)."""
    server = Server(workdir=Path(tempfile.mkdtemp(prefix="nanoiot-peers-", dir=work)), source=tree)
    server.start()
    try:
        tokens = provision_devices(server.database, devices, prefix="peer")
        tokens_file = server.workdir / "tokens.txt"
        tokens_file.write_text("\n".join(token for _, token in tokens) + "\n")
        yield server.mqtt_port, server.pid, tokens_file
    finally:
        assert server.process is not None
        stopped["stopped_by"] = stop(server.process)
        server.cleanup()


@contextmanager
def mosquitto_server(work: Path, devices: int, stopped: dict[str, str]) -> Iterator[tuple[int, int, Path]]:
    port = free_port()
    directory = Path(tempfile.mkdtemp(prefix="mosquitto-", dir=work))
    os.chmod(directory, 0o755)  # mosquitto drops root: it must reach its log directory
    logs = directory / "log"
    logs.mkdir()
    if os.geteuid() == 0:
        shutil.chown(logs, user="mosquitto")
    conf = directory / "mosquitto.conf"
    conf.write_text(MOSQUITTO_CONF.format(port=port, log=logs / "mosquitto.log"))
    process = subprocess.Popen([MOSQUITTO, "-c", str(conf)], preexec_fn=_raise_nofile,
                               stdout=subprocess.DEVNULL, stderr=open(directory / "stderr.log", "wb"))
    try:
        wait_listening(port, process)
        yield port, process.pid, anonymous_tokens(work, devices)
    finally:
        stopped["stopped_by"] = stop(process)


@contextmanager
def amqtt_server(work: Path, devices: int, stopped: dict[str, str]) -> Iterator[tuple[int, int, Path]]:
    port = free_port()
    directory = Path(tempfile.mkdtemp(prefix="amqtt-", dir=work))
    script = directory / "amqtt_broker.py"
    script.write_text(AMQTT_BROKER)
    process = subprocess.Popen([str(AMQTT_VENV / "bin" / "python"), str(script), str(port)],
                               preexec_fn=_raise_nofile, stdout=subprocess.DEVNULL,
                               stderr=open(directory / "stderr.log", "wb"))
    try:
        wait_listening(port, process)
        yield port, process.pid, anonymous_tokens(work, devices)
    finally:
        stopped["stopped_by"] = stop(process)


#: The tree of the ``baseline`` server (``--baseline``), set in main().
BASELINE_TREE: list[Path] = []


def baseline_server(work: Path, devices: int, stopped: dict[str, str]) -> Any:
    return nanoiot_server(work, devices, stopped, BASELINE_TREE[0])


SERVERS = {"nanoiot": nanoiot_server, "baseline": baseline_server, "mosquitto": mosquitto_server,
           "amqtt": amqtt_server}


def connect_count(name: str, args: argparse.Namespace) -> int:
    return args.amqtt_connect_count if name == "amqtt" else args.connect_count


def measure(name: str, phase: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """A fresh server, one load generator run against it, the server stopped."""
    count = connect_count(name, args) if phase == "connect" else 0
    devices = count if phase == "connect" else max(args.connections, 32)
    stopped: dict[str, str] = {}
    with SERVERS[name](work, devices, stopped) as (port, pid, tokens_file):
        result = run_loadgen(port, pid, name, tokens_file, args, phase, count)
    result["stopped_by"] = stopped.get("stopped_by")
    return result


LABELS = {"nanoiot": "NanoIoT", "baseline": "NanoIoT (baseline)", "mosquitto": "Mosquitto", "amqtt": "amqtt"}


def summarize(values: list[float | None]) -> dict[str, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(present), 2), "min": round(min(present), 2),
            "max": round(max(present), 2)}


def fmt(summary: dict[str, float | None], digits: int = 1) -> str:
    if summary["median"] is None:
        return "-"
    spec = f",.{digits}f"
    if summary["min"] == summary["max"]:
        return format(summary["median"], spec)
    return f"{format(summary['median'], spec)} ({format(summary['min'], spec)}–{format(summary['max'], spec)})"


PUBLISH_KEYS = ("puback_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_puback", "client_cpu_us_per_puback",
                "server_cpu_s", "client_cpu_s")
CONNECT_KEYS = ("conn_per_s", "p50_ms", "p99_ms", "max_ms", "server_cpu_us_per_conn", "client_cpu_us_per_conn",
                "kb_per_conn", "server_ceiling_conn_per_s", "connected", "failed", "storm_s", "server_cpu_s",
                "server_cpu_settle_s", "client_cpu_s", "rss_before_kb", "rss_after_kb", "listen_overflows")
TARGET_CONN_PER_S = 5000


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _per_round(runs: list[dict[str, Any]], peer: str, key: str, ours: str = "nanoiot") -> list[float]:
    return [round(a[key] / b[key], 3) for a in runs for b in runs
            if a["server"] == ours and b["server"] == peer and a["run"] == b["run"] and a[key] is not None
            and b[key]]


def _summarize_servers(runs: list[dict[str, Any]], servers: list[str], versions: dict[str, str],
                       keys: tuple[str, ...]) -> dict[str, Any]:
    """Median (min–max) of each key over the rounds, per server."""
    summary: dict[str, Any] = {}
    for name in servers:
        mine = [r for r in runs if r["server"] == name]
        summary[name] = {key: summarize([r.get(key) for r in mine]) for key in keys}
        summary[name]["version"] = versions.get(name)
    return summary


def _against_peers(summary: dict[str, Any], peers: tuple[str, ...],
                   ratios_of: Callable[[dict[str, Any], dict[str, Any], str, str], dict[str, Any]]) -> dict[str, Any]:
    """``nanoiot_over_<peer>``: NanoIoT's summary against each peer that ran (and ``baseline_over_<peer>``, and
    ``nanoiot_over_baseline``, in an A/B run)."""
    out = {}
    for ours in ("nanoiot", "baseline"):
        if ours in summary:
            out.update({f"{ours}_over_{peer}": ratios_of(summary[ours], summary[peer], peer, ours)
                        for peer in (*peers, "baseline") if peer in summary and peer != ours
                        and not (ours == "baseline" and peer == "nanoiot")})
    return out


def publish_summary(runs: list[dict[str, Any]], servers: list[str], versions: dict[str, str],
                    args: argparse.Namespace, console: Console) -> tuple[dict[str, Any], dict[str, Any]]:
    summary = _summarize_servers(runs, servers, versions, PUBLISH_KEYS)
    ratios = _against_peers(summary, ("amqtt", "mosquitto"), lambda ours, theirs, peer, who: {
        "throughput": _ratio(ours["puback_per_s"]["median"], theirs["puback_per_s"]["median"]),
        "throughput_per_round": _per_round(runs, peer, "puback_per_s", who),
        "cpu_per_puback": _ratio(ours["server_cpu_us_per_puback"]["median"],
                                 theirs["server_cpu_us_per_puback"]["median"]),
    })

    table = Table(title=f"MQTT publish/PUBACK, {args.connections} connections x {args.window} in flight, "
                        f"{args.duration:g} s window; median (min–max) of {args.runs} rounds")
    for column in ("server", "version", "PUBACK/s", "p50 ms", "p99 ms", "server µs/PUBACK", "server CPU s",
                   "loadgen CPU s"):
        table.add_column(column, justify="left" if column in ("server", "version") else "right")
    for name in servers:
        s = summary[name]
        table.add_row(LABELS[name], str(s["version"]), fmt(s["puback_per_s"], 0), fmt(s["p50_ms"]),
                      fmt(s["p99_ms"]), fmt(s["server_cpu_us_per_puback"]), fmt(s["server_cpu_s"], 2),
                      fmt(s["client_cpu_s"], 2))
    console.print(table)
    for key, ratio in ratios.items():
        if ratio["throughput"] is None or ratio["cpu_per_puback"] is None:
            continue
        console.print(f"{key.replace('_', ' ')}: throughput x{ratio['throughput']:.2f} "
                      f"(per round {', '.join(f'{x:.2f}' for x in ratio['throughput_per_round'])}); "
                      f"server CPU per PUBACK x{ratio['cpu_per_puback']:.2f}")
    if ratios.get("nanoiot_over_amqtt", {}).get("throughput") is not None:
        ok = ratios["nanoiot_over_amqtt"]["throughput"] >= 3.0
        console.print(f"target NanoIoT >= 3x amqtt: {'met' if ok else 'MISSED'}")
    return summary, ratios


def connect_summary(runs: list[dict[str, Any]], servers: list[str], versions: dict[str, str],
                    args: argparse.Namespace, console: Console) -> tuple[dict[str, Any], dict[str, Any]]:
    for r in runs:
        r["listen_overflows"] = r.get("tcp", {}).get("ListenOverflows")
        us = r.get("server_cpu_us_per_conn")
        r["server_ceiling_conn_per_s"] = round(1e6 / us, 1) if us else None
    summary = _summarize_servers(runs, servers, versions, CONNECT_KEYS)
    for name in servers:
        summary[name]["count"] = connect_count(name, args)
    ratios = _against_peers(summary, ("mosquitto", "amqtt"), lambda ours, theirs, peer, who: {
        "conn_per_s": _ratio(ours["conn_per_s"]["median"], theirs["conn_per_s"]["median"]),
        "conn_per_s_per_round": _per_round(runs, peer, "conn_per_s", who),
        "server_cpu_per_conn": _ratio(ours["server_cpu_us_per_conn"]["median"],
                                      theirs["server_cpu_us_per_conn"]["median"]),
        "server_cpu_per_conn_per_round": _per_round(runs, peer, "server_cpu_us_per_conn", who),
        "kb_per_conn": _ratio(ours["kb_per_conn"]["median"], theirs["kb_per_conn"]["median"]),
        "nanoiot_count": ours["count"], "peer_count": theirs["count"],
        "same_count": ours["count"] == theirs["count"],
    })

    counts = sorted({connect_count(name, args) for name in servers})
    table = Table(title=f"MQTT connect storm (CONNECT+SUBSCRIBE, kept open), {args.connect_concurrency} handshakes "
                        f"in progress at most; median (min–max) of {args.runs} rounds")
    for column in ("server", "version", "N", "connected (min)", "conn/s", "p50 ms", "p99 ms", "server µs/conn",
                   "generator µs/conn", "KB/conn", "1e6/server µs", "overflows"):
        table.add_column(column, justify="left" if column in ("server", "version") else "right")
    for name in servers:
        s = summary[name]
        connected = s["connected"]["min"]
        table.add_row(LABELS[name], str(s["version"]), f"{s['count']:,}",
                      f"{connected:,.0f}" if connected is not None else "-", fmt(s["conn_per_s"], 0),
                      fmt(s["p50_ms"]), fmt(s["p99_ms"]), fmt(s["server_cpu_us_per_conn"], 0),
                      fmt(s["client_cpu_us_per_conn"], 0), fmt(s["kb_per_conn"], 2),
                      fmt(s["server_ceiling_conn_per_s"], 0), fmt(s["listen_overflows"], 0))
    console.print(table)
    if len(counts) > 1:
        console.print(f"note: amqtt connected N = {args.amqtt_connect_count:,}, the others N = "
                      f"{args.connect_count:,} (amqtt's cost per connection grows with N): ratios to amqtt are at "
                      f"unequal N and flatter amqtt")
    for key, ratio in ratios.items():
        if ratio["conn_per_s"] is None:
            continue
        unequal = "" if ratio["same_count"] else f" [N {ratio['nanoiot_count']:,} vs {ratio['peer_count']:,}]"
        cpu = f"x{ratio['server_cpu_per_conn']:.2f}" if ratio["server_cpu_per_conn"] is not None else "-"
        kb = f"x{ratio['kb_per_conn']:.2f}" if ratio["kb_per_conn"] is not None else "-"
        console.print(f"{key.replace('_', ' ')}{unequal}: conn/s x{ratio['conn_per_s']:.2f} "
                      f"(per round {', '.join(f'{x:.2f}' for x in ratio['conn_per_s_per_round'])}); "
                      f"server CPU per connection {cpu}; KB per connection {kb}")
    if "nanoiot" in summary and summary["nanoiot"]["conn_per_s"]["median"] is not None:
        rate = summary["nanoiot"]["conn_per_s"]["median"]
        console.print(f"target NanoIoT >= {TARGET_CONN_PER_S:,} connections/s (generator included): "
                      f"{'met' if rate >= TARGET_CONN_PER_S else 'MISSED'} ({rate:,.0f}/s)")
    return summary, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="rounds; each starts every server afresh per phase")
    parser.add_argument("--servers", nargs="+", choices=tuple(SERVERS), default=list(SERVERS))
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES),
                        help="which loads, in this order within each round")
    parser.add_argument("--connect-count", type=int, default=10_000, help="connect phase: N for NanoIoT, Mosquitto")
    parser.add_argument("--amqtt-connect-count", type=int, default=1_000,
                        help="connect phase: N for amqtt (its cost per connection grows with N)")
    parser.add_argument("--connect-concurrency", type=int, default=100,
                        help="connect phase: handshakes in progress at most")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="connect phase: seconds after the last SUBACK before the server's RSS is read")
    parser.add_argument("--connections", type=int, default=32, help="publish phase: connections")
    parser.add_argument("--window", type=int, default=64, help="publish phase: QoS 1 PUBLISHes in flight each")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--pause", type=float, default=5.0, help="seconds between two servers")
    parser.add_argument("--max-load", type=float, default=1.0,
                        help="wait for the 1-minute load average to fall below this before each measurement")
    parser.add_argument("--load-wait", type=float, default=120.0, help="but wait at most this long (s)")
    parser.add_argument("--output", type=Path, default=RESULTS / "peers.json", help="where the JSON goes")
    parser.add_argument("--baseline", type=Path, metavar="TREE",
                        help="the sources of the 'baseline' server (e.g. a copy of the tree before a change)")
    args = parser.parse_args()
    if ("baseline" in args.servers) != (args.baseline is not None):
        parser.error("--baseline TREE and the server 'baseline' go together")
    if args.baseline is not None:
        if not (args.baseline / "nanoiot" / "__init__.py").exists():
            parser.error(f"--baseline {args.baseline}: no nanoiot package there")
        BASELINE_TREE.append(args.baseline.resolve())
    phases = list(dict.fromkeys(args.phases))
    if "connect" in phases:
        for option, value in (("--connect-count", args.connect_count),
                              ("--amqtt-connect-count", args.amqtt_connect_count)):
            if not 1 <= value <= MAX_CONNECT_COUNT:
                parser.error(f"{option} must be 1..{MAX_CONNECT_COUNT:,}: one generator process, hard "
                             f"RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)[1]:,}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop the servers
    console = Console(width=210)
    versions = {"nanoiot": _nanoiot_version(), "baseline": _nanoiot_version()}
    if "mosquitto" in args.servers:
        versions["mosquitto"] = ensure_mosquitto(console.print)
    if "amqtt" in args.servers:
        versions["amqtt"] = ensure_amqtt(console.print)
    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    os.chmod(work, 0o755)
    runs: dict[str, list[dict[str, Any]]] = {phase: [] for phase in phases}
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    try:
        for run in range(1, args.runs + 1):
            for phase in phases:
                for name in args.servers:
                    args._load = wait_for_quiet(args.max_load, args.load_wait, console.print)
                    what = f"{connect_count(name, args):,} connections" if phase == "connect" else "publish"
                    console.print(f"round {run}/{args.runs}, {what}: {LABELS[name]} (1-min load {args._load:.2f}) "
                                  f"...", end=" ")
                    result = measure(name, phase, args, work)
                    result["run"] = run
                    result["server"] = name
                    runs[phase].append(result)
                    if phase == "connect":
                        console.print(f"{result['connected']:,} connected, {result['failed']:,} failed, "
                                      f"{result['conn_per_s']:,.0f} conn/s, p50 {result['p50_ms']} ms, "
                                      f"p99 {result['p99_ms']} ms, {result['server_cpu_us_per_conn']} µs/conn "
                                      f"(generator {result['client_cpu_us_per_conn']}), "
                                      f"{result['kb_per_conn']} KB/conn")
                    else:
                        console.print(f"{result['puback_per_s']:,.0f} PUBACK/s, p50 {result['p50_ms']} ms, "
                                      f"p99 {result['p99_ms']} ms, {result['server_cpu_us_per_puback']} µs/PUBACK")
                    time.sleep(args.pause)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    finished = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())

    output: dict[str, Any] = {
        "machine": machine(), "started": started, "finished": finished,
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "git": _git_state(), "versions": versions,
        "phases": phases,
    }
    if "publish" in phases:
        summary, ratios = publish_summary(runs["publish"], args.servers, versions, args, console)
        output.update({"settings": {"connections": args.connections, "window": args.window,
                                    "warmup_s": args.warmup, "duration_s": args.duration, "runs": args.runs},
                       "summary": summary, "ratios": ratios, "runs": runs["publish"]})
    if "connect" in phases:
        summary, ratios = connect_summary(runs["connect"], args.servers, versions, args, console)
        output["connect"] = {
            "settings": {"count": args.connect_count, "amqtt_count": args.amqtt_connect_count,
                         "concurrency": args.connect_concurrency, "settle_s": args.settle, "runs": args.runs,
                         "target_conn_per_s": TARGET_CONN_PER_S},
            "summary": summary, "ratios": ratios, "runs": runs["connect"]}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(output, indent=2) + "\n")
    console.print(f"results written to {args.output}")


def _nanoiot_version() -> str:
    import nanoiot

    return getattr(nanoiot, "__version__", "?")


def _git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "dirty_nanoiot_files": git("status", "--short", "--", "nanoiot").splitlines()}


if __name__ == "__main__":
    main()
