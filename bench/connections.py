"""Connections: ramp N MQTT devices into one NanoIoT process; memory per connected device, connect rate, CPU.

    python bench/connections.py --devices 10000 --rate 2000
    python bench/connections.py --devices 10000 50000 100000 --rate 5000

Each device connects (MQTT 3.1.1, its own access token), subscribes to its RPC topic and stays connected. The
fleet is split over several simulator processes and loopback source addresses (127.0.0.2, .3, ...), because
one process has a limited number of descriptors and one source address about 28,000 ephemeral ports (a fresh
subnet of 127/8 each run, so that sockets still in TIME_WAIT from the last run do not get in the way).
RSS per device = (server VmRSS after the ramp and a settle - VmRSS before) / N, read from /proc like the peers
study did for Mosquitto and amqtt, so the figures compare.
"""

from __future__ import annotations

import argparse
import json
import random
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

from bench.common import (  # noqa: E402
    Server, cpu_seconds, machine, provision_devices, raise_nofile, rss_kb, write_result)

PER_PROCESS = 15_000


def run(count: int, rate: float, concurrency: int, settle: float, console: Console,
        sims: int = 0) -> dict[str, Any]:
    raise_nofile()
    server = Server().start()
    try:
        tokens = provision_devices(server.database, count)
        tokens_file = Path(tempfile.mkstemp(prefix="tokens-", suffix=".txt")[1])
        tokens_file.write_text("\n".join(token for _, token in tokens) + "\n")
        time.sleep(settle)
        rss_before = rss_kb(server.pid)
        cpu_before = cpu_seconds(server.pid)
        processes = []
        parts = max(sims, (count + PER_PROCESS - 1) // PER_PROCESS)
        share = (count + parts - 1) // parts
        # A fresh source subnet per run: the previous run's client sockets sit in TIME_WAIT for a minute, and
        # 10,000 of them on the same source address leave the next run's connects hunting for free ports.
        subnet = random.randint(1, 254)
        started = time.perf_counter()
        for part in range(parts):
            size = min(share, count - part * share)
            args = [sys.executable, "-m", "nanoiot.sim.fleet", "--port", str(server.mqtt_port),
                    "--tokens-file", str(tokens_file), "--skip", str(part * share), "--count", str(size),
                    "--concurrency", str(max(1, concurrency // parts)), "--rate", str(rate / parts),
                    "--answer", "none", "--hold", "600", "--bind", f"127.{subnet}.0.{2 + part}", "--json"]
            processes.append(subprocess.Popen(args, stdout=subprocess.PIPE, text=True))
        connected = failed = 0
        sim_cpu = 0.0
        with Progress(TextColumn("connecting"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("ramp", total=parts)
            for process in processes:
                for line in process.stdout:  # type: ignore[union-attr]
                    event = json.loads(line)
                    if event["event"] == "connected":
                        sim_cpu += cpu_seconds(process.pid)
                        connected += event["count"]
                        failed += event["failed"]
                        progress.advance(task)
                        break
        ramp = time.perf_counter() - started
        cpu_ramp = cpu_seconds(server.pid) - cpu_before
        time.sleep(settle)
        rss_after = rss_kb(server.pid)
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(60)
        return {
            "devices": count, "connected": connected, "failed": failed, "rate_asked": rate,
            "connect_rate": round(connected / ramp, 1), "ramp_seconds": round(ramp, 2),
            "server_cpu_seconds_ramp": round(cpu_ramp, 2),
            "server_cpu_us_per_connection": round(cpu_ramp / max(connected, 1) * 1e6, 1),
            "server_cpu_share_ramp": round(cpu_ramp / ramp, 2),
            # The simulators' CPU up to their "connected" event (start-up included): the load generator's cost.
            "sim_cpu_us_per_connection": round(sim_cpu / max(connected, 1) * 1e6, 1),
            "rss_before_mb": round(rss_before / 1024, 1), "rss_after_mb": round(rss_after / 1024, 1),
            "kb_per_device": round((rss_after - rss_before) / max(connected, 1), 2),
        }
    finally:
        server.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[10_000])
    parser.add_argument("--rate", type=float, default=5000, help="connections per second asked of the fleet")
    parser.add_argument("--concurrency", type=int, default=400, help="connections being opened at once")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait before reading RSS")
    parser.add_argument("--sims", type=int, default=0,
                        help="simulator processes (default: one per 15,000 devices; the load is split evenly)")
    parser.add_argument("--output", default="connections", help="name of the JSON in bench/results")
    args = parser.parse_args()
    console = Console(width=140)
    results = [run(n, args.rate, args.concurrency, args.settle, console, args.sims) for n in args.devices]
    table = Table(title="NanoIoT: connected MQTT devices in one process")
    columns = ("devices", "connected", "failed", "connect_rate", "server_cpu_us_per_connection",
               "server_cpu_share_ramp", "sim_cpu_us_per_connection", "rss_before_mb", "rss_after_mb", "kb_per_device")
    for column in columns:
        table.add_column(column)
    for r in results:
        table.add_row(*(str(r[c]) for c in columns))
    console.print(table)
    path = write_result(args.output, {"machine": machine(), "command": " ".join(sys.argv), "results": results})
    console.print(f"results written to {path}")


if __name__ == "__main__":
    main()
