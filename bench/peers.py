"""Peers: the same MQTT publish/PUBACK load against NanoIoT, Mosquitto and amqtt, in one run, as ratios.

    python bench/peers.py                 # 3 rounds, each: NanoIoT, Mosquitto, amqtt (fresh process each)
    python bench/peers.py --runs 1 --duration 5

Each round starts every server afresh on a free loopback port, points bench/loadgen.py at it (32 connections x 64
QoS 1 PUBLISHes in flight to ``v1/devices/me/rpc/response/1``, 60-byte payload, 1 s warmup, 10 s window), stops
the server by its PID (SIGTERM, SIGKILL after 30 s) and sleeps a few seconds. The figures are the median (min-max)
over the rounds; the ratios NanoIoT/amqtt and NanoIoT/Mosquitto are of those medians.

- NanoIoT: ``twistd -n nanoiot`` (bench.common.Server, SQLite), with one provisioned device per connection: it
  authenticates the user name as an access token. A publish to ``.../rpc/response/1`` is an answer to a command it
  never sent: decoded, routed to the device's actor, dropped there; PUBACK is sent by the protocol at once.
- Mosquitto (Debian package, ``/usr/sbin/mosquitto``; installed with ``apt-get install -y mosquitto`` if missing):
  listener on 127.0.0.1, ``allow_anonymous true``, ``persistence false``, log to a directory owned by user
  ``mosquitto`` (it drops root and could not write a root-owned log file).
- amqtt (PyPI) in its own venv (``/tmp/amqtt-venv``, created on first use; never in the project's .venv), run by
  a small broker script with only anonymous authentication and WARNING logging, as in the peers study.

The machine has 2 cores and the load generator shares it: against Mosquitto both processes are CPU-bound, so
Mosquitto's PUBACK/s is a floor; server CPU us per PUBACK (from /proc/PID/stat) is the generator-independent figure.
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
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.common import ROOT, Server, free_port, machine, provision_devices, write_result  # noqa: E402
from bench.loadgen import wait_for_quiet  # noqa: E402

MOSQUITTO = "/usr/sbin/mosquitto"
AMQTT_VENV = Path("/tmp/amqtt-venv")
LOADGEN = ROOT / "bench" / "loadgen.py"

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


def run_loadgen(port: int, pid: int, label: str, tokens_file: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, str(LOADGEN), "--port", str(port), "--pid", str(pid), "--label", label,
               "--tokens-file", str(tokens_file), "--connections", str(args.connections),
               "--window", str(args.window), "--warmup", str(args.warmup), "--duration", str(args.duration),
               "--json"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=args.warmup + args.duration + 120)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"load generator failed for {label}: {out.stderr[-2000:]}")
    result = json.loads(lines[-1])
    result["loadavg_1m_before"] = args._load
    return result


def measure_nanoiot(args: argparse.Namespace, tokens_file: Path, work: Path) -> dict[str, Any]:
    server = Server(workdir=Path(tempfile.mkdtemp(prefix="nanoiot-peers-", dir=work))).start()
    try:
        tokens = provision_devices(server.database, max(args.connections, 32), prefix="peer")
        tokens_file.write_text("\n".join(token for _, token in tokens) + "\n")
        result = run_loadgen(server.mqtt_port, server.pid, "nanoiot", tokens_file, args)
    finally:
        assert server.process is not None
        result_stop = stop(server.process)
        server.cleanup()
    result["stopped_by"] = result_stop
    return result


def measure_mosquitto(args: argparse.Namespace, tokens_file: Path, work: Path) -> dict[str, Any]:
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
        result = run_loadgen(port, process.pid, "mosquitto", tokens_file, args)
    finally:
        how = stop(process)
    result["stopped_by"] = how
    return result


def measure_amqtt(args: argparse.Namespace, tokens_file: Path, work: Path) -> dict[str, Any]:
    port = free_port()
    directory = Path(tempfile.mkdtemp(prefix="amqtt-", dir=work))
    script = directory / "amqtt_broker.py"
    script.write_text(AMQTT_BROKER)
    process = subprocess.Popen([str(AMQTT_VENV / "bin" / "python"), str(script), str(port)],
                               preexec_fn=_raise_nofile, stdout=subprocess.DEVNULL,
                               stderr=open(directory / "stderr.log", "wb"))
    try:
        wait_listening(port, process)
        result = run_loadgen(port, process.pid, "amqtt", tokens_file, args)
    finally:
        how = stop(process)
    result["stopped_by"] = how
    return result


MEASURES = {"nanoiot": measure_nanoiot, "mosquitto": measure_mosquitto, "amqtt": measure_amqtt}
LABELS = {"nanoiot": "NanoIoT", "mosquitto": "Mosquitto", "amqtt": "amqtt"}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="rounds; each starts every server afresh")
    parser.add_argument("--servers", nargs="+", choices=tuple(MEASURES), default=list(MEASURES))
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--pause", type=float, default=5.0, help="seconds between two servers")
    parser.add_argument("--max-load", type=float, default=1.0,
                        help="wait for the 1-minute load average to fall below this before each measurement")
    parser.add_argument("--load-wait", type=float, default=120.0, help="but wait at most this long (s)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop the servers
    console = Console(width=150)
    versions = {"nanoiot": _nanoiot_version()}
    if "mosquitto" in args.servers:
        versions["mosquitto"] = ensure_mosquitto(console.print)
    if "amqtt" in args.servers:
        versions["amqtt"] = ensure_amqtt(console.print)
    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    os.chmod(work, 0o755)
    tokens_file = work / "tokens.txt"
    runs: list[dict[str, Any]] = []
    try:
        for run in range(1, args.runs + 1):
            for name in args.servers:
                args._load = wait_for_quiet(args.max_load, args.load_wait, console.print)
                console.print(f"round {run}/{args.runs}: {LABELS[name]} (1-min load {args._load:.2f}) ...", end=" ")
                result = MEASURES[name](args, tokens_file, work)
                result["run"] = run
                result["server"] = name
                runs.append(result)
                console.print(f"{result['puback_per_s']:,.0f} PUBACK/s, p50 {result['p50_ms']} ms, "
                              f"p99 {result['p99_ms']} ms, {result['server_cpu_us_per_puback']} µs/PUBACK")
                time.sleep(args.pause)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary: dict[str, Any] = {}
    for name in args.servers:
        mine = [r for r in runs if r["server"] == name]
        summary[name] = {key: summarize([r[key] for r in mine]) for key in (
            "puback_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_puback", "client_cpu_us_per_puback",
            "server_cpu_s", "client_cpu_s")}
        summary[name]["version"] = versions.get(name)
    ratios: dict[str, Any] = {}
    if "nanoiot" in summary:
        ours = summary["nanoiot"]
        for peer in ("amqtt", "mosquitto"):
            if peer not in summary:
                continue
            theirs = summary[peer]
            per_round = [a["puback_per_s"] / b["puback_per_s"] for a in runs for b in runs
                         if a["server"] == "nanoiot" and b["server"] == peer and a["run"] == b["run"]
                         and b["puback_per_s"]]
            ratios[f"nanoiot_over_{peer}"] = {
                "throughput": round(ours["puback_per_s"]["median"] / theirs["puback_per_s"]["median"], 3),
                "throughput_per_round": [round(x, 3) for x in per_round],
                "cpu_per_puback": round(ours["server_cpu_us_per_puback"]["median"]
                                        / theirs["server_cpu_us_per_puback"]["median"], 3),
            }

    table = Table(title=f"MQTT publish/PUBACK, {args.connections} connections x {args.window} in flight, "
                        f"{args.duration:g} s window; median (min–max) of {args.runs} rounds")
    for column in ("server", "version", "PUBACK/s", "p50 ms", "p99 ms", "server µs/PUBACK", "server CPU s",
                   "loadgen CPU s"):
        table.add_column(column, justify="left" if column in ("server", "version") else "right")
    for name in args.servers:
        s = summary[name]
        table.add_row(LABELS[name], str(s["version"]), fmt(s["puback_per_s"], 0), fmt(s["p50_ms"]),
                      fmt(s["p99_ms"]), fmt(s["server_cpu_us_per_puback"]), fmt(s["server_cpu_s"], 2),
                      fmt(s["client_cpu_s"], 2))
    console.print(table)
    for key, ratio in ratios.items():
        console.print(f"{key.replace('_', ' ')}: throughput x{ratio['throughput']:.2f} "
                      f"(per round {', '.join(f'{x:.2f}' for x in ratio['throughput_per_round'])}); "
                      f"server CPU per PUBACK x{ratio['cpu_per_puback']:.2f}")
    if "nanoiot_over_amqtt" in ratios:
        ok = ratios["nanoiot_over_amqtt"]["throughput"] >= 3.0
        console.print(f"target NanoIoT >= 3x amqtt: {'met' if ok else 'MISSED'}")
    path = write_result("peers", {"machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
                                  "git": _git_state(), "versions": versions, "settings": {
                                      "connections": args.connections, "window": args.window,
                                      "warmup_s": args.warmup, "duration_s": args.duration, "runs": args.runs},
                                  "summary": summary, "ratios": ratios, "runs": runs})
    console.print(f"results written to {path}")


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
