"""What every benchmark needs: a NanoIoT server subprocess, devices provisioned in bulk, process readings."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TWISTD = str(Path(sys.executable).with_name("twistd"))


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_udp_port() -> int:
    return free_port(socket.SOCK_DGRAM)


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem_kb / 1024 / 1024, 1),
            "python": platform.python_version(), "kernel": platform.release(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def raise_nofile(wanted: int = 1_048_576) -> int:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (wanted, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard) if limit > hard else hard))
            return limit
        except (ValueError, OSError):
            continue
    return soft


@dataclass
class Server:
    """``twistd -n nanoiot`` in a temporary directory, on free loopback ports."""

    database: str | None = None
    extra: list[str] = field(default_factory=list)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="nanoiot-bench-")))
    http_port: int = field(default_factory=free_port)
    mqtt_port: int = field(default_factory=free_port)
    #: Its own CoAP port too, so that two benchmark servers (or a test run) can share the machine.
    coap_port: int = field(default_factory=free_udp_port)
    #: twistd's own options (before ``nanoiot``), e.g. ``["--profile", "out", "--profiler", "cprofile"]``.
    twistd_options: list[str] = field(default_factory=list)
    #: A directory holding another copy of ``nanoiot/`` to run instead of this tree's (an A/B in one run): it goes
    #: first on the server's PYTHONPATH, before the venv's.
    source: Path | None = None
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60) -> "Server":
        self.database = self.database or f"sqlite:///{self.workdir / 'bench.db'}"
        args = [TWISTD, "-n", "--pidfile=", *self.twistd_options, "nanoiot", "--host", "127.0.0.1",
                "--http-port", str(self.http_port), "--mqtt-port", str(self.mqtt_port),
                "--coap-port", str(self.coap_port), "--database", self.database, "--demo",
                "--jwt-key", "bench-key-" + "x" * 60, "--log-level", "warn", *self.extra]
        log = open(self.workdir / "server.log", "ab")
        env = None if self.source is None else {**os.environ, "PYTHONPATH": str(self.source)}
        self.process = subprocess.Popen(args, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {(self.workdir / 'server.log').read_text()[-2000:]}")
            try:
                self.login()
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def login(self, user: str = "tenant") -> str:
        body = json.dumps({"username": f"{user}@nanoiot.io", "password": user}).encode()
        request = urllib.request.Request(f"{self.url}/api/auth/login", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())["token"]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def provision_devices(database: str, count: int, prefix: str = "bench") -> list[tuple[str, str]]:
    """Insert ``count`` devices and their tokens for the demo tenant in one transaction.

    Going around the REST API is deliberate: creating 100,000 devices one request at a time would measure the
    set-up, not the server. The rows are exactly what the repository writes.
    """
    from sqlalchemy import create_engine, insert, select

    from nanoiot.persistence import schema
    from nanoiot.persistence.records import NULL_UUID

    engine = create_engine(database)
    now = int(time.time() * 1000)
    devices, credentials, out = [], [], []
    with engine.begin() as conn:
        tenant_id = conn.execute(select(schema.tb_user.c.tenant_id).where(
            schema.tb_user.c.email == "tenant@nanoiot.io")).scalar_one()
        for i in range(count):
            device_id = uuid.uuid4()
            token = f"{prefix}-{i}-{uuid.uuid4().hex[:8]}"
            devices.append(dict(id=device_id, created_time=now, tenant_id=tenant_id, customer_id=NULL_UUID,
                                name=f"{prefix}-{i}", type="bench", label=None, additional_info=None, version=1))
            credentials.append(dict(id=uuid.uuid4(), created_time=now, device_id=device_id,
                                    credentials_type="ACCESS_TOKEN", credentials_id=token, credentials_value=None,
                                    version=1))
            out.append((str(device_id), token))
        for start in range(0, count, 5000):
            conn.execute(insert(schema.device), devices[start:start + 5000])
            conn.execute(insert(schema.device_credentials), credentials[start:start + 5000])
    engine.dispose()
    return out


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def start_fleet(mqtt_port: int, tokens_file: Path, out: Path, answer: str = "echo", cwd: Path | None = None,
                env: dict[str, str] | None = None, extra: list[str] | None = None,
                command: list[str] | None = None) -> tuple[subprocess.Popen, float]:
    """``nanoiot-sim`` connecting every token of ``tokens_file`` (JSON lines to ``out``; ``extra``: more of its
    options); returns the process and the seconds until every device was connected, once their subscriptions had a
    second to settle. ``command``: another fleet's argv with the same JSON lines (bench.echo_fleet's C fleet)."""
    began = time.monotonic()
    sim = subprocess.Popen(
        command or [sys.executable, "-m", "nanoiot.sim.fleet", "--port", str(mqtt_port), "--tokens-file",
                    str(tokens_file), "--answer", answer, "--hold", "100000", "--concurrency", "200", "--json",
                    *(extra or [])],
        stdout=open(out, "w"), stderr=subprocess.STDOUT, cwd=cwd or ROOT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if sim.poll() is not None:
            raise RuntimeError(f"the device fleet exited: {out.read_text()[-2000:]}")
        for line in out.read_text().splitlines():
            if line.startswith("{") and json.loads(line).get("event") == "connected":
                event = json.loads(line)
                if event["failed"]:
                    raise RuntimeError(f"{event['failed']} simulated devices failed to connect")
                elapsed = time.monotonic() - began
                time.sleep(1.0)  # let the SUBSCRIBEs (and, in a cluster, the claims) reach the device actors
                return sim, elapsed
        time.sleep(0.2)
    sim.kill()
    raise RuntimeError("the simulated devices did not connect in 120 s")


def rest(url: str, jwt: str, method: str, path: str, body: Any = None, timeout: float = 120) -> tuple[int, Any]:
    """One blocking REST call with a JWT: (status, parsed JSON body) — for the benchmarks' control calls."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{url}{path}", data, method=method, headers={
        "Content-Type": "application/json", "X-Authorization": f"Bearer {jwt}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")
