"""Persistent RPC drain: queue N persistent two-way commands across a fleet while it is offline, then connect the
fleet and measure the time until every command is SUCCESSFUL, on SQLite and PostgreSQL.

    python bench/persistent_rpc.py --backend both --commands 100000 --devices 1000

For each backend it starts its own server (``twistd -n nanoiot``, a subprocess) and, for PostgreSQL, its own
PostgreSQL (initdb + pg_ctl in a temporary directory, run as the ``postgres`` OS user when we are root, fsync ON and
synchronous_commit ON: every journal batch is really flushed). It then

1. creates the devices through the REST API;
2. queues the commands through the REST API (``POST /api/rpc/twoway/{id}`` with ``"persistent": true``),
   ``--concurrency`` requests in flight on keep-alive connections, round-robin over the devices; each answer
   ``{"rpcId"}`` means the command is stored (the journal batch committed): the queueing rate is rpcIds per second;
3. starts the device fleet (``nanoiot.sim.fleet``, MQTT, answering every command with its echo) and measures the
   time from its start until every command is SUCCESSFUL in the database (counted with
   ``SELECT status, count(*) FROM rpc GROUP BY status`` on a separate connection every ``--poll`` seconds: that is
   what is durable, and it is far cheaper than paging the REST API);
4. checks the end state through the REST API (``GET /api/rpc/persistent/device/{id}?rpcStatus=SUCCESSFUL``,
   ``totalElements`` per device, must add up to N).

Results go to bench/results/persistent_rpc-<backend>.json. ``--profile`` samples the server with py-spy while the
fleet drains the queue and prints where its time went.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.common import RESULTS, Server, cpu_seconds, free_port, machine, write_result  # noqa: E402

console = Console(width=max(Console().width, 140))
RPC_TIMEOUT_MS = 6 * 3600 * 1000  # nothing may expire during the benchmark


# --- PostgreSQL -----------------------------------------------------------------------------------------------------


def pg_bin() -> Path:
    configured = os.environ.get("NANOIOT_PG_BIN")
    if configured:
        return Path(configured)
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if candidates:
        return candidates[-1].parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise SystemExit("PostgreSQL's initdb not found (set NANOIOT_PG_BIN)")


class Postgres:
    """A throw-away PostgreSQL cluster with the durability settings of production: fsync and synchronous_commit ON."""

    def __init__(self) -> None:
        self.bin = pg_bin()
        self.base = Path(tempfile.mkdtemp(prefix="nanoiot-bench-pg-"))
        self.data = self.base / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.base, account.pw_uid, account.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def run(self, tool: str, *args: str) -> None:
        result = subprocess.run(self.as_user + [str(self.bin / tool), *args], capture_output=True, text=True,
                                cwd=self.base, timeout=120)
        if result.returncode:
            raise RuntimeError(f"{tool} failed: {result.stderr or result.stdout}")

    def start(self) -> str:
        self.run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C")
        options = (f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=on "
                   f"-c synchronous_commit=on -c max_connections=100")
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "server.log"), "-w", "-o", options, "start")
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE nanoiot")
        connection.close()
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/nanoiot"

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def pids(self) -> list[int]:
        """The postmaster and its backends (for CPU accounting)."""
        try:
            master = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        children = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if ppid == master:
                    children.append(int(entry.name))
        return [master, *children]


# --- a small keep-alive HTTP/1.1 client on asyncio (the client must not be the bottleneck) -------------------------


class HttpConnection:
    def __init__(self, host: str, port: int, jwt: str) -> None:
        self.host, self.port, self.jwt = host, port, jwt
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body, separators=(",", ":")).encode() if body is not None else b""
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nX-Authorization: Bearer {self.jwt}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
        self.writer.write(head + data)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection")
        status = int(status_line.split()[1])
        length, chunked, close = None, False, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            elif name == "connection" and value.lower() == "close":
                close = True
        if chunked:
            payload = b""
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readline()
                    break
                payload += await self.reader.readexactly(size)
                await self.reader.readline()
        else:
            payload = await self.reader.readexactly(length or 0)
        if close:
            self.writer.close()
            self.writer = None
        return status, json.loads(payload) if payload else None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def run_requests(server: Server, jwt: str, jobs: list[tuple[str, str, Any]], concurrency: int,
                       progress: Progress | None = None, label: str = "") -> list[tuple[int, Any]]:
    """Every (method, path, body) job, ``concurrency`` connections at a time; results in job order."""
    url = urlsplit(server.url)
    results: list[tuple[int, Any]] = [(0, None)] * len(jobs)
    next_job = iter(range(len(jobs)))
    task = progress.add_task(label, total=len(jobs)) if progress is not None else None

    async def worker() -> None:
        connection = HttpConnection(url.hostname, url.port, jwt)
        try:
            for index in next_job:
                method, path, body = jobs[index]
                results[index] = await connection.request(method, path, body)
                if task is not None:
                    progress.advance(task)
        finally:
            connection.close()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(jobs)))))
    return results


# --- counting statuses in the database ------------------------------------------------------------------------------


class StatusCounter:
    def __init__(self, database: str) -> None:
        self.database = database
        if database.startswith("sqlite"):
            self.connection = sqlite3.connect(urlsplit(database).path, timeout=30)
        else:
            import psycopg2

            url = urlsplit(database.replace("postgresql+psycopg2", "postgresql"))
            self.connection = psycopg2.connect(host=url.hostname, port=url.port, user=url.username,
                                               dbname=url.path.lstrip("/"))
            self.connection.autocommit = True

    def counts(self) -> Counter:
        cursor = self.connection.cursor()
        cursor.execute("SELECT status, count(*) FROM rpc GROUP BY status")
        rows = cursor.fetchall()
        cursor.close()
        return Counter({status: count for status, count in rows})

    def close(self) -> None:
        self.connection.close()


# --- the benchmark --------------------------------------------------------------------------------------------------


def _stacks(raw: Path) -> Iterator[tuple[str, int]]:
    """(stack, sample count) from py-spy's collapsed stacks (``frame;frame;frame count``)."""
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if count.isdigit():
            yield stack, int(count)


def profile_summary(raw: Path, top: int = 15) -> list[tuple[str, float]]:
    """Self time per function."""
    totals: Counter = Counter()
    for stack, count in _stacks(raw):
        totals[stack.split(";")[-1]] += count
    samples = sum(totals.values())
    return [(frame, round(100 * n / samples, 1)) for frame, n in totals.most_common(top)] if samples else []


def inclusive_summary(raw: Path, needles: list[str]) -> dict[str, float]:
    """Share of samples whose stack contains each needle (inclusive time)."""
    totals: Counter = Counter()
    samples = 0
    for stack, count in _stacks(raw):
        samples += count
        for needle in needles:
            if needle in stack:
                totals[needle] += count
    return {needle: round(100 * totals[needle] / samples, 1) for needle in needles} if samples else {}


def bench_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    postgres = Postgres() if backend == "postgresql" else None
    per_device = math.ceil(args.commands / args.devices)
    limit = str(max(1000, per_device + 10))
    server = Server(extra=["--rpc-max-persistent-per-device", limit, "--rpc-max-pending", limit, "--coap-port", "0",
                           *args.server_arg])
    result_server_args = list(args.server_arg)
    fleet: subprocess.Popen | None = None
    result: dict[str, Any] = {"backend": backend, "commands": args.commands, "devices": args.devices,
                              "concurrency": args.concurrency, "machine": machine(),
                              "server_args": result_server_args}
    try:
        if postgres is not None:
            server.database = postgres.start()
            result["database"] = "PostgreSQL (own cluster, fsync=on, synchronous_commit=on)"
        else:
            server.database = f"sqlite:///{server.workdir / 'bench.db'}"
            result["database"] = "SQLite (WAL, synchronous=NORMAL: durable against a process crash)"
        console.print(f"[bold]{backend}[/]: {result['database']}; server in {server.workdir}")
        server.start()
        jwt = server.login()

        # 1. devices
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            created = asyncio.run(run_requests(server, jwt, [
                ("POST", f"/api/device?accessToken=bench-rpc-{i}", {"name": f"bench-rpc-{i}", "type": "bench"})
                for i in range(args.devices)], 32, progress, "creating devices"))
        bad = [r for r in created if r[0] != 200]
        assert not bad, bad[:3]
        device_ids = [body["id"]["id"] for _, body in created]
        tokens_file = server.workdir / "tokens.txt"
        tokens_file.write_text("".join(f"bench-rpc-{i}\n" for i in range(args.devices)))

        # 2. queue while the fleet is offline
        jobs = [("POST", f"/api/rpc/twoway/{device_ids[j % args.devices]}",
                 {"method": "echo", "params": {"n": j}, "persistent": True, "timeout": RPC_TIMEOUT_MS})
                for j in range(args.commands)]
        cpu_server, cpu_pg = cpu_seconds(server.pid), pg_cpu(postgres)
        started = time.perf_counter()
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[rate]}"), console=console) as progress:
            queued = asyncio.run(queue_with_rate(server, jwt, jobs, args.concurrency, progress))
        queue_seconds = time.perf_counter() - started
        bad = [r for r in queued if r[0] != 200 or "rpcId" not in (r[1] or {})]
        assert not bad, bad[:3]
        result["queue"] = {"seconds": round(queue_seconds, 2), "rate_per_s": round(args.commands / queue_seconds),
                           "server_cpu_s": round(cpu_seconds(server.pid) - cpu_server, 1),
                           "postgres_cpu_s": round(pg_cpu(postgres) - cpu_pg, 1) if postgres else None}
        counter = StatusCounter(server.database)
        before = counter.counts()
        assert before.get("QUEUED", 0) == args.commands, before

        # 3. connect the fleet; wait until every command is SUCCESSFUL
        cpu_server, cpu_pg = cpu_seconds(server.pid), pg_cpu(postgres)
        started = time.perf_counter()
        fleet = subprocess.Popen([sys.executable, "-m", "nanoiot.sim.fleet", "--port", str(server.mqtt_port),
                                  "--tokens-file", str(tokens_file), "--answer", "echo", "--json",
                                  "--concurrency", "200", "--hold", str(args.timeout)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        profiler = None
        raw_profile = RESULTS / f"persistent_rpc-{backend}{args.name}-drain.pyspy.txt"
        if args.profile:
            RESULTS.mkdir(parents=True, exist_ok=True)
            pyspy = str(Path(sys.executable).with_name("py-spy"))
            profiler = subprocess.Popen([pyspy, "record", "--pid", str(server.pid), "--format", "raw", "--rate", "200",
                                         "--output", str(raw_profile), "--nonblocking"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        connected_at = None
        deadline = started + args.timeout
        timeline = []
        with Progress(TextColumn("draining (SUCCESSFUL)"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[status]}"), console=console) as progress:
            task = progress.add_task("drain", total=args.commands, status="")
            os.set_blocking(fleet.stdout.fileno(), False)
            buffer = b""
            while True:
                try:
                    buffer += os.read(fleet.stdout.fileno(), 1 << 16)
                except BlockingIOError:
                    pass
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if event.get("event") == "connected" and connected_at is None:
                        connected_at = time.perf_counter()
                        result["fleet_connect"] = event
                counts = counter.counts()
                done = counts.get("SUCCESSFUL", 0)
                ended = sum(counts.get(status, 0) for status in ("SUCCESSFUL", "FAILED", "EXPIRED"))
                now = time.perf_counter()
                timeline.append({"s": round(now - started, 2), **counts})
                progress.update(task, completed=done, status=" ".join(f"{k}={v}" for k, v in sorted(counts.items())
                                                                      if k != "SUCCESSFUL"))
                if ended >= args.commands:
                    break  # every command ended: SUCCESSFUL, or not (then the result says so)
                if now > deadline or fleet.poll() is not None:
                    result["drain_incomplete"] = {"after_s": round(now - started, 1), "statuses": dict(counts),
                                                  "fleet_exit": fleet.poll()}
                    break
                time.sleep(args.poll)
        drained = time.perf_counter()
        drain_seconds = drained - started
        result["final_statuses"] = dict(counts)
        if done < args.commands:
            console.print(f"[bold red]not every command succeeded[/]: {dict(counts)}")
        result["drain"] = {
            "successful": done,
            "seconds_from_fleet_start": round(drain_seconds, 2),
            "rate_per_s": round(done / drain_seconds),
            "seconds_from_fleet_connected": round(drained - connected_at, 2) if connected_at else None,
            "server_cpu_s": round(cpu_seconds(server.pid) - cpu_server, 1),
            "postgres_cpu_s": round(pg_cpu(postgres) - cpu_pg, 1) if postgres else None,
            "poll_seconds": args.poll,
        }
        result["drain_timeline"] = timeline[:: max(1, len(timeline) // 120)] + timeline[-1:]
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            try:
                profiler.wait(30)
            except subprocess.TimeoutExpired:
                profiler.kill()
            if raw_profile.exists():
                result["profile"] = {
                    "file": str(raw_profile.relative_to(RESULTS.parent.parent)),
                    "self_time_top": profile_summary(raw_profile),
                    "inclusive": inclusive_summary(raw_profile, [
                        "write_rpc_batch", "_flush (nanoiot/persistence/journal.py", "dataReceived",
                        "send_command", "_apply_status_groups", "encode_publish", "on_receive",
                        "doPoll", "_written"]),
                }
        counter.close()

        # 4. the end state, through the REST API
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console) as p:
            pages = asyncio.run(run_requests(server, jwt, [
                ("GET", f"/api/rpc/persistent/device/{d}?pageSize=1&page=0&rpcStatus=SUCCESSFUL", None)
                for d in device_ids], 16, p, "checking through REST"))
        successful = sum(body["totalElements"] for _, body in pages)
        result["verified_successful_via_rest"] = successful
        assert successful == done, (successful, done)
        return result
    finally:
        if fleet is not None and fleet.poll() is None:
            fleet.terminate()
            try:
                fleet.wait(30)
            except subprocess.TimeoutExpired:
                fleet.kill()
        server.cleanup()
        if postgres is not None:
            postgres.stop()


def pg_cpu(postgres: Postgres | None) -> float:
    if postgres is None:
        return 0.0
    total = 0.0
    for pid in postgres.pids():
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total


async def queue_with_rate(server: Server, jwt: str, jobs: list[tuple[str, str, Any]], concurrency: int,
                          progress: Progress) -> list[tuple[int, Any]]:
    task = progress.add_task("queueing rpcIds", total=len(jobs), rate="")
    started = time.perf_counter()

    async def show_rate() -> None:
        while True:
            await asyncio.sleep(0.5)
            done = progress.tasks[task].completed
            progress.update(task, rate=f"{done / (time.perf_counter() - started):,.0f}/s")

    ticker = asyncio.ensure_future(show_rate())
    try:
        url = urlsplit(server.url)
        results: list[tuple[int, Any]] = [(0, None)] * len(jobs)
        next_job = iter(range(len(jobs)))

        async def worker() -> None:
            connection = HttpConnection(url.hostname, url.port, jwt)
            try:
                for index in next_job:
                    method, path, body = jobs[index]
                    results[index] = await connection.request(method, path, body)
                    progress.advance(task)
            finally:
                connection.close()

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(jobs)))))
        return results
    finally:
        ticker.cancel()


def report(results: list[dict[str, Any]]) -> None:
    table = Table(title="Persistent RPC drain")
    for column in ("backend", "server args", "commands", "devices", "queue s", "rpcIds/s", "drain s", "SUCCESSFUL",
                   "SUCCESSFUL/s", "other end states", "server CPU s q/d", "PostgreSQL CPU s q/d"):
        table.add_column(column, justify="right")
    for r in results:
        q, d = r["queue"], r["drain"]
        others = {k: v for k, v in r["final_statuses"].items() if k != "SUCCESSFUL"}
        table.add_row(r["backend"], " ".join(r["server_args"]) or "-", f"{r['commands']:,}", f"{r['devices']:,}",
                      str(q["seconds"]), f"{q['rate_per_s']:,}", str(d["seconds_from_fleet_start"]),
                      f"{d['successful']:,}", f"{d['rate_per_s']:,}", str(others or "-"),
                      f"{q['server_cpu_s']} / {d['server_cpu_s']}",
                      f"{q['postgres_cpu_s']} / {d['postgres_cpu_s']}" if q["postgres_cpu_s"] is not None else "-")
    console.print(table)
    for r in results:
        if "profile" in r:
            console.print(f"[bold]{r['backend']}[/]: server profile while draining (py-spy; self time, top frames):")
            for frame, share in r["profile"]["self_time_top"]:
                console.print(f"  {share:5.1f}%  {frame}")
            console.print(f"  inclusive: {r['profile']['inclusive']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--commands", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64, help="REST requests in flight while queueing")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between status counts while draining")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds the drain may take, at most")
    parser.add_argument("--profile", action="store_true", help="sample the server with py-spy while draining")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="an extra server option, repeatable, e.g. --server-arg=--rpc-ack-timeout=60000")
    parser.add_argument("--name", default="", help="suffix of the results file (persistent_rpc-<backend><name>.json)")
    args = parser.parse_args()
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    results = []
    for backend in backends:
        result = bench_backend(backend, args)
        result["command"] = " ".join(["python", "bench/persistent_rpc.py", *sys.argv[1:]])
        path = write_result(f"persistent_rpc-{backend}{args.name}", result)
        console.print(f"wrote {path}")
        results.append(result)
    report(results)


if __name__ == "__main__":
    main()
