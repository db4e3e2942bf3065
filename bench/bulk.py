"""Bulk RPC queueing: one ``POST /api/rpc/bulk`` to N devices, and how fast its N persistent commands are stored.

    python bench/bulk.py --backend sqlite --devices 10000
    python bench/bulk.py --backend both --devices 10000 --batches 3

For each backend it starts its own server (``twistd -n nanoiot``, a subprocess; for PostgreSQL its own cluster
with fsync and synchronous_commit ON, as ``bench/persistent_rpc.py`` does), provisions N devices of type ``bench``
straight into the database (``bench.common.provision_devices``: the set-up is not what is measured), then sends
``--batches`` bulk RPCs one after the other, each ``{"deviceType": "bench", "method": ..., "timeout": 6 h}`` to
every device (offline: the commands stay QUEUED). For each batch it measures

* the POST's answer time (the devices resolved in one query, the batch row stored);
* **commands queued per second**: N / the time from sending the POST until all N rows of that batch are QUEUED in
  the database (``SELECT count(*) FROM rpc WHERE batch_id = ?`` on a separate connection every ``--poll`` s: what
  is durable), with a timeline of that count;
* the server's CPU seconds over the same time, per command (and PostgreSQL's);
* how long small requests wait meanwhile (every 10 ms each, on connections of their own): one the router answers
  alone (a JSON 404: the reactor's responsiveness), one that reads the database (``GET /api/auth/user``: it queues
  behind the journal's transactions);
* then checks ``GET /api/rpc/bulk/{batchId}``: ``statusCounts.QUEUED == total``, ``queueing`` false, N rpcIds.

The machine may be shared: before each batch it waits (``--quiet-wait``) until the other processes use fewer than
``--max-others`` cores, and records what they used during the batch ("others' cores"). Server CPU per command is the
figure that noise disturbs least.

The first batch also starts N device actors (offline devices have none); later batches find them alive (their
commands are pending). Results: bench/results/bulk.json (``--output``; one entry per backend, a run of one backend
keeps the other's). ``--profile`` samples the server with py-spy during the first batch (collapsed stacks in
bench/results/<output>-<backend>.pyspy.txt) and prints where its time went.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, ROOT, Server, cpu_seconds, machine, provision_devices, rest, write_result  # noqa: E402
from bench.persistent_rpc import Postgres, inclusive_summary, pg_cpu, profile_summary  # noqa: E402

RPC_TIMEOUT_MS = 6 * 3600 * 1000  # nothing expires during the benchmark
#: Frames whose inclusive share of the samples a profile reports (py-spy names them "Class.method (file:line)").
PROFILE_FRAMES = ["BulkRpc._queue (", "CommandService.submit (", "Actor.start (", "Dispatcher._drain (",
                  "DeviceActor._submit (", "RpcJournal._written (", "DeviceActor._answer_persistent (",
                  "Repository.write_rpc_batch.<locals>.thd (", "DefaultDialect.do_executemany (",
                  "DefaultDialect.do_commit (", "BatchStore.devices_of_type.<locals>.thd (",
                  "CollectorPolicy.freeze (", "EPollReactor.doPoll ("]


class BatchCounter:
    """Rows of one batch, counted on a connection of our own (what the journal made durable)."""

    def __init__(self, database: str) -> None:
        self.sqlite = database.startswith("sqlite")
        if self.sqlite:
            self.connection = sqlite3.connect(urlsplit(database).path, timeout=30)
        else:
            import psycopg2

            url = urlsplit(database.replace("postgresql+psycopg2", "postgresql"))
            self.connection = psycopg2.connect(host=url.hostname, port=url.port, user=url.username,
                                               dbname=url.path.lstrip("/"))
            self.connection.autocommit = True

    def count(self, batch_id: str) -> int:
        cursor = self.connection.cursor()
        # SQLite keeps UUIDs as 32 hex characters (SQLAlchemy's Uuid without native support).
        value = batch_id.replace("-", "") if self.sqlite else batch_id
        cursor.execute("SELECT count(*) FROM rpc WHERE batch_id = " + ("?" if self.sqlite else "%s"), (value,))
        (count,) = cursor.fetchone()
        cursor.close()
        return count

    def close(self) -> None:
        self.connection.close()


def system_busy() -> float:
    """CPU seconds the whole machine spent busy so far (/proc/stat: every state but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def ours(server: Server, postgres: Any) -> float:
    return cpu_seconds(server.pid) + pg_cpu(postgres) + resource.getrusage(resource.RUSAGE_SELF).ru_utime \
        + resource.getrusage(resource.RUSAGE_SELF).ru_stime


def wait_quiet(server: Server, postgres: Any, max_others: float, limit: float) -> tuple[float, float]:
    """The machine is shared: wait (at most ``limit`` s) until the other processes used less than ``max_others``
    cores over one second. Returns (seconds waited, the others' cores last seen)."""
    began = time.monotonic()
    while True:
        before = ours(server, postgres), system_busy()
        time.sleep(1.0)
        after = ours(server, postgres), system_busy()
        others = max(0.0, (after[1] - before[1]) - (after[0] - before[0]))
        waited = time.monotonic() - began
        if others < max_others or waited >= limit:
            return round(waited, 1), round(others, 2)


class Pinger(threading.Thread):
    """A small request every ``interval`` s while a batch is queued, on a keep-alive connection of its own: how long
    the server keeps it waiting. ``/api/ping-404`` is answered by the router alone (the reactor's responsiveness);
    ``/api/auth/user`` reads the user from the database (it waits behind the journal's transactions)."""

    def __init__(self, server: Server, jwt: str, path: str, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.url = urlsplit(server.url)
        self.jwt = jwt
        self.path = path
        self.interval = interval
        self.latencies: list[float] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        import http.client

        connection = http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=30)
        headers = {"X-Authorization": f"Bearer {self.jwt}"}
        while not self.stopping.is_set():
            started = time.perf_counter()
            connection.request("GET", self.path, headers=headers)
            response = connection.getresponse()
            response.read()
            self.latencies.append(time.perf_counter() - started)
            self.stopping.wait(self.interval)
        connection.close()

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        if not ordered:
            return {}
        return {"requests": len(ordered), "p50_ms": round(ordered[len(ordered) // 2] * 1000, 1),
                "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 1),
                "max_ms": round(ordered[-1] * 1000, 1)}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "?"
    except OSError:
        return "?"


def one_batch(server: Server, jwt: str, counter: BatchCounter, devices: int, poll: float, postgres: Any,
              index: int, profile: Path | None, args: argparse.Namespace) -> dict[str, Any]:
    waited, others_before = wait_quiet(server, postgres, args.max_others, args.quiet_wait)
    profiler = None
    if profile is not None:
        pyspy = str(Path(sys.executable).with_name("py-spy"))
        profiler = subprocess.Popen([pyspy, "record", "--pid", str(server.pid), "--format", "raw", "--rate", "250",
                                     "--output", str(profile), "--nonblocking"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attaches
    cpu_server, cpu_pg = cpu_seconds(server.pid), pg_cpu(postgres)
    ours_before, busy_before = ours(server, postgres), system_busy()
    pingers = {"no_database": Pinger(server, jwt, "/api/ping-404"), "database_read": Pinger(server, jwt,
                                                                                           "/api/auth/user")}
    for pinger in pingers.values():
        pinger.start()
    started = time.perf_counter()
    status, body = rest(server.url, jwt, "POST", "/api/rpc/bulk", {
        "deviceType": "bench", "method": "setState", "params": {"batch": index, "on": True},
        "timeout": RPC_TIMEOUT_MS})
    answered = time.perf_counter()
    assert status == 200, (status, body)
    batch_id = body["batchId"]
    assert body["total"] == devices, body
    timeline = []
    while True:
        queued = counter.count(batch_id)
        now = time.perf_counter()
        timeline.append({"s": round(now - started, 3), "queued": queued})
        if queued >= devices:
            break
        if now - started > 600:
            raise RuntimeError(f"only {queued} of {devices} queued after 600 s")
        time.sleep(poll)
    done = time.perf_counter()
    for pinger in pingers.values():
        pinger.stopping.set()
        pinger.join()
    others = max(0.0, (system_busy() - busy_before) - (ours(server, postgres) - ours_before))
    server_cpu = cpu_seconds(server.pid) - cpu_server
    postgres_cpu = pg_cpu(postgres) - cpu_pg if postgres else None
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)
        try:
            profiler.wait(30)
        except subprocess.TimeoutExpired:
            profiler.kill()
    seconds = done - started
    get_started = time.perf_counter()
    status, view = rest(server.url, jwt, "GET", f"/api/rpc/bulk/{batch_id}")
    get_seconds = time.perf_counter() - get_started
    assert status == 200, (status, view)
    assert view["statusCounts"]["QUEUED"] == devices and view["total"] == devices, view["statusCounts"]
    assert len(view["rpcIds"]) == devices and not view["queueing"], (len(view["rpcIds"]), view["queueing"])
    result = {
        "batch": index + 1,
        "batch_id": batch_id,
        "post_answer_s": round(answered - started, 3),
        "all_queued_s": round(seconds, 3),
        "commands_per_s": round(devices / seconds),
        "queueing_after_answer_per_s": round(devices / (done - answered)),
        "server_cpu_s": round(server_cpu, 2),
        "server_cpu_us_per_command": round(server_cpu / devices * 1e6, 1),
        "postgres_cpu_s": round(postgres_cpu, 2) if postgres_cpu is not None else None,
        "get_s": round(get_seconds, 3),
        "small_request_latency_while_queueing": {name: p.summary() for name, p in pingers.items()},
        "quiet_wait_s": waited,
        "others_cores_before": others_before,
        "others_cores_during": round(others / seconds, 2),
        "get_status_counts": view["statusCounts"],
        "timeline": timeline[:: max(1, len(timeline) // 60)] + timeline[-1:],
    }
    if profile is not None and profile.exists():
        result["profile"] = {
            "file": str(profile.relative_to(ROOT)),
            "self_time_top": profile_summary(profile, 20),
            "inclusive": inclusive_summary(profile, PROFILE_FRAMES),
        }
    return result


def bench_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    postgres = Postgres() if backend == "postgresql" else None
    server = Server(extra=["--coap-port", "0", *args.server_arg])
    result: dict[str, Any] = {"backend": backend, "devices": args.devices, "machine": machine(),
                              "commit": git_commit(), "server_args": list(args.server_arg)}
    counter = None
    try:
        if postgres is not None:
            server.database = postgres.start()
            result["database"] = "PostgreSQL (own cluster, fsync=on, synchronous_commit=on)"
        else:
            server.database = f"sqlite:///{server.workdir / 'bench.db'}"
            result["database"] = "SQLite (WAL, synchronous=NORMAL)"
        print(f"{backend}: {result['database']}; server in {server.workdir}", flush=True)
        server.start()
        jwt = server.login()
        started = time.perf_counter()
        provision_devices(server.database, args.devices, prefix="bulk")
        print(f"  {args.devices} devices provisioned in {time.perf_counter() - started:.1f} s", flush=True)
        counter = BatchCounter(server.database)
        batches = []
        for index in range(args.batches):
            profile = None
            if args.profile and index == 0:
                RESULTS.mkdir(parents=True, exist_ok=True)
                profile = RESULTS / f"{args.output}-{backend}.pyspy.txt"
            batch = one_batch(server, jwt, counter, args.devices, args.poll, postgres, index, profile, args)
            batches.append(batch)
            print(f"  batch {index + 1}: POST answered in {batch['post_answer_s']} s, all {args.devices} QUEUED "
                  f"after {batch['all_queued_s']} s: {batch['commands_per_s']:,} commands/s; server CPU "
                  f"{batch['server_cpu_s']} s ({batch['server_cpu_us_per_command']} µs/command)"
                  + (f", PostgreSQL CPU {batch['postgres_cpu_s']} s" if postgres else "")
                  + f"; GET {batch['get_s']} s; others' cores {batch['others_cores_during']}; a small request "
                  f"meanwhile {batch['small_request_latency_while_queueing']}", flush=True)
            if "profile" in batch:
                for frame, share in batch["profile"]["self_time_top"]:
                    print(f"      {share:5.1f}%  {frame}")
                print(f"      inclusive: {batch['profile']['inclusive']}")
        result["batches"] = batches
        return result
    finally:
        if counter is not None:
            counter.close()
        server.cleanup()
        if postgres is not None:
            postgres.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="sqlite")
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--batches", type=int, default=3, help="bulk RPCs sent one after the other")
    parser.add_argument("--poll", type=float, default=0.02, help="seconds between counts of the batch's rows")
    parser.add_argument("--profile", action="store_true", help="sample the server with py-spy (first batch)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="an extra server option, repeatable, e.g. --server-arg=--rpc-bulk-max-devices=200000")
    parser.add_argument("--output", default="bulk", help="results file name in bench/results (without .json)")
    parser.add_argument("--max-others", type=float, default=0.3,
                        help="before each batch, wait until the machine's other processes use fewer cores than this")
    parser.add_argument("--quiet-wait", type=float, default=120.0, help="... for at most this many seconds")
    args = parser.parse_args()
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    results = []
    for backend in backends:
        result = bench_backend(backend, args)
        result["command"] = " ".join(["python", "bench/bulk.py", *sys.argv[1:]])
        results.append(result)
    # One entry per backend: a run of one backend keeps the other's last entry.
    previous = RESULTS / f"{args.output}.json"
    kept = []
    if previous.exists():
        try:
            kept = [r for r in json.loads(previous.read_text()).get("results", []) if r["backend"] not in backends]
        except (ValueError, KeyError, AttributeError):
            kept = []
    path = write_result(args.output, {"results": kept + results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
