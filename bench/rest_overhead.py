"""REST RPC overhead: a two-way RPC's server CPU against a bare twisted.web JSON request, in the same run.

    python bench/rest_overhead.py                  # 3 runs x 5 rounds of 5 s windows, C=64, 1,000 devices (~10 min)
    python bench/rest_overhead.py --short          # regression: 1 run x 5 rounds of 4 s windows (~2.5 min)
    python bench/rest_overhead.py --baseline /tmp/before   # A/B: also a NanoIoT from a copy of the tree before a change
    python bench/rest_overhead.py --runs 1 --rounds 2 --profile   # py-spy NanoIoT during its last window
    python bench/rest_overhead.py --runs 1 --baseline-args "--metrics off"   # this tree with other server options
    python bench/rest_overhead.py --runs 2 --floors floor,floor+jwt,floor+flush,floor+flush+jwt   # every floor

Every request is the same, made by wrk with bench/rpc.py's Lua script (``POST /api/rpc/twoway/<deviceId>``,
``{"method":"echo","params":{"i":n}}``, an ``X-Authorization: Bearer`` header, device ids rotating), over C
keep-alive connections from one wrk thread; each window is preceded by a 1 s wrk warmup. The targets:

- **bare**: this file's ``--bare-server PORT``: a twisted.web ``Site`` (epoll reactor as under twistd,
  ``parsePOSTFormSubmission=False``, no access log, as NanoIoT's site) whose one leaf resource parses the JSON POST
  and answers it as JSON with a Content-Length. The floor of any REST request on this machine.
- **floor** (``--floors``, default ``floor``; ``--floors ''`` leaves it out): this file's ``--floor-server``: the
  least any server can do for the same request as a two-way RPC. The bare target's site (same QuietSite settings)
  whose leaf parses the JSON POST, takes the device id from the URL, writes one MQTT 3.1.1 PUBLISH QoS 1
  (``v1/devices/me/rpc/request/<n>``, the ``{"method","params"}`` JSON) to that device's connection, returns
  NOT_DONE_YET, and answers with the payload of the device's ``v1/devices/me/rpc/response/<n>`` PUBLISH (PUBACKed);
  plus the least MQTT server the devices need (CONNECT with the access token as user name -> CONNACK, SUBSCRIBE ->
  SUBACK, PINGREQ -> PINGRESP, the device's PUBACK ignored), TCP_NODELAY on the device sockets. No JWT check, no
  validation beyond what keeps it working, Twisted's own ``transport.write``. Its K devices (ids and tokens of its
  own, made as provision_devices makes them) are connected by the same fleet as nanoiot's. Variants: ``floor+jwt``
  verifies the Bearer token with PyJWT as nanoiot does (HS512, its claims and key; the signature once per token,
  then a dict lookup and the expiry, as nanoiot's TokenIssuer caches it); ``floor+flush`` listens through
  nanoiot.transports.tcp.listen_tcp (a turn's writes to a socket in one ``send``, no ``epoll_ctl`` per write, as
  nanoiot does); ``floor+flush+jwt`` both.
- **nanoiot**: ``twistd -n nanoiot`` (SQLite, ``--demo``; bench.common.Server), K devices provisioned in bulk and
  connected with ``nanoiot-sim --answer echo`` (bench.common.start_fleet; QoS 1 both ways): every request is a
  two-way RPC through the JSON router, JWT, active-user check, command service, device actor, MQTT and the answer.
- **baseline** (``--baseline TREE``): the same from the sources in TREE (PYTHONPATH), for an A/B in one run; with
  ``--baseline-args``, started with those server options (from TREE, or from this tree when no TREE is given).

The machine may be shared, and CPU per request moves with what else runs (caches, the sibling hyperthread, the
kernel's loopback work done in ``send``): every target runs at once and the windows interleave, target after
target, round after round (``--rounds``), so that a busy spell falls on all of them. Server CPU = utime + stime of
the server process (/proc/PID/stat) over a window, divided by the requests wrk completed in it; the simulator's CPU
is reported apart and not counted. Per run each target's median window is kept; the table shows the median of the
runs (min–max), and the ratio nanoiot/bare is taken per run (``summary.ratio``; each target's ``ratio`` is to
bare; ``summary.ratios`` has the floors against bare and nanoiot against the floors, per run; ``summary.paired`` the
same window by window).
"""

from __future__ import annotations

import argparse
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
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, ROOT, Server, cpu_seconds, free_port, machine, provision_devices  # noqa: E402
from bench.common import start_fleet, write_result  # noqa: E402
from bench.loadgen import wait_for_quiet  # noqa: E402
from bench.rpc import PYSPY, WRK, WRK_SCRIPT, summarize_profile  # noqa: E402


# --- the bare twisted.web server (run as a subprocess of this file) --------------------------------------------


def bare_server(port: int) -> None:
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class Echo(Resource):
        isLeaf = True

        def render_POST(self, request: Any) -> bytes:
            body = json.loads(request.content.read())
            data = json.dumps({"method": body.get("method"), "params": body.get("params")},
                              separators=(",", ":")).encode()
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"%d" % len(data))
            return data

    class QuietSite(Site):
        noisy = False

        def log(self, request: Any) -> None:
            pass

    reactor.listenTCP(port, QuietSite(Echo(), parsePOSTFormSubmission=False), interface="127.0.0.1")
    reactor.run()


# --- the floor: a bare twisted.web site that does the contract's MQTT round trip (a subprocess of this file) -----

REQUEST_TOPIC = b"v1/devices/me/rpc/request/"
RESPONSE_TOPIC = b"v1/devices/me/rpc/response/"
#: The claims nanoiot's TokenIssuer verifies (nanoiot/web/tokens.py): floor+jwt checks a token the same way.
JWT_ALGORITHM, JWT_ISSUER = "HS512", "nanoiot.io"
BENCH_JWT_KEY = "bench-key-" + "x" * 60  # bench.common.Server's --jwt-key


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if not n:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def floor_server(variant: str, http_port: int, mqtt_port: int, devices_file: str) -> None:
    """The least any server can do for the benchmark's request: take the device id from the URL, PUBLISH the
    command (MQTT 3.1.1, QoS 1) to that device's connection, answer the HTTP request with the device's answer.

    Nothing else: no validation beyond what keeps it working, no persistence, no timeouts, no queue, no actor, no
    JWT check. ``variant`` "floor" plus any of "+jwt": the Bearer token verified with PyJWT as nanoiot's
    TokenIssuer does (the signature once per token, then a dict lookup and the expiry); "+flush": both ports
    listen through nanoiot.transports.tcp.listen_tcp (one TurnFlusher), so a turn's writes to a socket go out in
    one ``send`` without the poller, as in nanoiot; without it, Twisted's own transport.write (buffer, then
    ``epoll_ctl`` + ``send`` + ``epoll_ctl`` on the next poll), as the bare target. MQTT sockets are TCP_NODELAY
    (as nanoiot's: else a command waits for the device's delayed ACK)."""
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor

    device_of_token = {}
    for line in Path(devices_file).read_text().splitlines():
        if line.strip():
            device_id, token = line.split()
            device_of_token[token.encode()] = device_id.encode()
    site, mqtt = floor_site(variant, device_of_token)
    if "+flush" in variant:
        from nanoiot.transports.tcp import TurnFlusher, listen_tcp

        flusher = TurnFlusher(reactor)
        listen_tcp(reactor, mqtt_port, mqtt, 1024, "127.0.0.1", flusher=flusher)
        listen_tcp(reactor, http_port, site, 50, "127.0.0.1", flusher=flusher)
    else:
        reactor.listenTCP(mqtt_port, mqtt, interface="127.0.0.1", backlog=1024)
        reactor.listenTCP(http_port, site, interface="127.0.0.1")
    reactor.run()


def floor_site(variant: str, device_of_token: dict[bytes, bytes]) -> tuple[Any, Any]:
    """The floor's twisted.web Site and MQTT factory (see floor_server); ``device_of_token``: access token -> device
    id, as bytes."""
    from twisted.internet.protocol import Factory, Protocol
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Site

    jwt_key = BENCH_JWT_KEY if "+jwt" in variant else None
    connections: dict[bytes, Any] = {}  # device id (bytes, as in the URL) -> its connection

    class Device(Protocol):
        def __init__(self) -> None:
            self.buffer = b""
            self.device_id = b""
            self.next_id = 0
            self.waiting: dict[bytes, Any] = {}  # request number (topic suffix) -> the HTTP request

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)

        def command(self, payload: bytes, request: Any) -> None:
            self.next_id += 1
            number = b"%d" % self.next_id
            topic = REQUEST_TOPIC + number
            body = len(topic).to_bytes(2, "big") + topic + ((self.next_id - 1) % 65535 + 1).to_bytes(2, "big")
            self.waiting[number] = request
            self.transport.write(b"\x32" + _remaining_length(len(body) + len(payload)) + body + payload)

        def dataReceived(self, data: bytes) -> None:
            buffer = self.buffer + data if self.buffer else data
            end, at = len(buffer), 0
            while end - at >= 2:
                length, shift, i = 0, 0, at + 1
                while i < end:
                    byte = buffer[i]
                    i += 1
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                else:
                    break
                if i + length > end:
                    break
                self.packet(buffer[at], buffer[i:i + length])
                at = i + length
            self.buffer = buffer[at:]

        def packet(self, first: int, body: bytes) -> None:
            kind = first >> 4
            if kind == 3:  # PUBLISH: the device's answer
                size = int.from_bytes(body[:2], "big")
                topic = body[2:2 + size]
                at = 2 + size
                if first & 0x06:  # QoS 1: PUBACK it
                    self.transport.write(b"\x40\x02" + body[at:at + 2])
                    at += 2
                request = self.waiting.pop(topic[len(RESPONSE_TOPIC):], None) \
                    if topic.startswith(RESPONSE_TOPIC) else None
                if request is not None:
                    payload = body[at:]
                    request.setHeader(b"content-type", b"application/json")
                    request.setHeader(b"content-length", b"%d" % len(payload))
                    request.write(payload)
                    try:
                        request.finish()
                    except RuntimeError:  # wrk closed that connection at the end of its run
                        pass
            elif kind == 4:  # PUBACK of a command: nothing to do
                pass
            elif kind == 1:  # CONNECT (3.1.1): the user name is the device's access token
                at = 12 + int.from_bytes(body[10:12], "big")  # after "MQTT", level, flags, keep-alive, client id
                flags = body[7]
                if flags & 0x04:  # a will: topic and message
                    at += 2 + int.from_bytes(body[at:at + 2], "big")
                    at += 2 + int.from_bytes(body[at:at + 2], "big")
                token = body[at + 2:at + 2 + int.from_bytes(body[at:at + 2], "big")] if flags & 0x80 else b""
                self.device_id = device_of_token.get(token, b"")
                if not self.device_id:
                    self.transport.write(b"\x20\x02\x00\x05")  # not authorized
                    self.transport.loseConnection()
                    return
                connections[self.device_id] = self
                self.transport.write(b"\x20\x02\x00\x00")
            elif kind == 8:  # SUBSCRIBE: grant QoS 1 to every filter
                at, granted = 2, b""
                while at < len(body):
                    at += 3 + int.from_bytes(body[at:at + 2], "big")
                    granted += b"\x01"
                self.transport.write(b"\x90" + _remaining_length(2 + len(granted)) + body[:2] + granted)
            elif kind == 12:  # PINGREQ
                self.transport.write(b"\xd0\x00")
            elif kind == 14:  # DISCONNECT
                self.transport.loseConnection()

        def connectionLost(self, reason: Any = None) -> None:
            if connections.get(self.device_id) is self:
                del connections[self.device_id]

    verified: dict[bytes, int] = {}  # floor+jwt: a token verified once, then only its expiry checked (as nanoiot)
    if jwt_key is not None:
        import jwt

    def refused(request: Any, status: int, message: bytes) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return b'{"message":"%s"}' % message

    class TwoWay(Resource):
        isLeaf = True

        def render_POST(self, request: Any) -> Any:
            if jwt_key is not None:
                header = request.getHeader(b"x-authorization") or b""
                token = header[7:] if header.startswith(b"Bearer ") else b""
                expires = verified.get(token)
                if expires is None:
                    try:
                        claims = jwt.decode(token, jwt_key, algorithms=[JWT_ALGORITHM], issuer=JWT_ISSUER,
                                            options={"require": ["exp", "iat", "sub"], "verify_exp": False,
                                                     "verify_iat": False})
                    except jwt.PyJWTError:
                        return refused(request, 401, b"Invalid JWT token")
                    expires = verified[token] = int(claims["exp"])
                if expires <= time.time():
                    return refused(request, 401, b"Token has expired")
            body = json.loads(request.content.read())
            device = connections.get(request.path.rpartition(b"/")[2])
            if device is None:
                return refused(request, 504, b"Device is offline")
            device.command(json.dumps({"method": body["method"], "params": body["params"]},
                                      separators=(",", ":")).encode(), request)
            return NOT_DONE_YET

    class QuietSite(Site):
        noisy = False

        def log(self, request: Any) -> None:
            pass

    mqtt = Factory.forProtocol(Device)
    mqtt.noisy = False
    return QuietSite(TwoWay(), parsePOSTFormSubmission=False), mqtt


class Subprocess:
    """A reference server run from this file (``--bare-server`` or ``--floor-server``), up once its HTTP port is."""

    def __init__(self, what: str, *extra: str) -> None:
        self.what = what
        self.port = free_port()
        if extra:
            self.mqtt_port = free_port()
            argv = ["--floor-server", what, str(self.port), str(self.mqtt_port), *extra]
        else:
            argv = ["--bare-server", str(self.port)]
        self.process = subprocess.Popen([sys.executable, __file__, *argv])
        deadline = time.monotonic() + 20
        import socket
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"the {what} twisted.web server did not start")

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


# --- measuring -------------------------------------------------------------------------------------------------


def run_wrk(url: str, level: int, seconds: float, env: dict[str, str], lua: Path) -> dict[str, Any]:
    command = [WRK, "-t", "1", "-c", str(level), "-d", f"{max(1, round(seconds))}s", "--timeout", "30s",
               "-s", str(lua), url + "/"]
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    found = re.search(r"^WRKJSON (\{.*\})$", out.stdout, re.M)
    if not found:
        raise RuntimeError(f"wrk failed: {out.stdout[-1000:]} {out.stderr[-1000:]}")
    return json.loads(found.group(1))


def measure(what: str, url: str, pid: int, sim_pid: int | None, args: argparse.Namespace, env: dict[str, str],
            lua: Path, profile: Path | None = None) -> dict[str, Any]:
    run_wrk(url, args.connections, args.warmup, env, lua)
    spy = None
    if profile is not None:
        # The folded samples (summarized here) and, from a second sampler, the flame graph.
        spy = [subprocess.Popen([PYSPY, "record", *extra, "-p", str(pid), "-r", "250", "-d",
                                 str(int(args.duration)), "-f", form, "-o", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for form, out, extra in (("raw", profile, []),
                                        ("flamegraph", profile.with_suffix(".svg"), ["--nonblocking"]))]
        time.sleep(1.0)  # py-spy attaching
    cpu0 = cpu_seconds(pid)
    sim0 = cpu_seconds(sim_pid) if sim_pid else 0.0
    w = run_wrk(url, args.connections, args.duration, env, lua)
    cpu = cpu_seconds(pid) - cpu0
    sim = (cpu_seconds(sim_pid) - sim0) if sim_pid else None
    for process in spy or ():
        process.wait(60)
    seconds = w["duration_us"] / 1e6
    errors = (w["status_errors"] + w["connect_errors"] + w["read_errors"] + w["write_errors"] + w["timeouts"])
    requests = max(w["requests"], 1)
    return {"what": what, "requests": w["requests"], "errors": errors, "rps": round(w["requests"] / seconds, 1),
            "p50_ms": round(w["p50_us"] / 1000, 2), "p99_ms": round(w["p99_us"] / 1000, 2),
            "server_cpu_s": round(cpu, 3), "server_us_per_op": round(cpu / requests * 1e6, 1),
            "server_core": round(cpu / seconds, 3),
            "sim_us_per_op": round(sim / requests * 1e6, 1) if sim is not None else None,
            "loadavg": float(open("/proc/loadavg").read().split()[0])}


def _shown(path: Path) -> str:
    """A result path as the JSON names it: relative to the repository, or absolute outside it (--output /tmp/x)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def start_nanoiot(work: Path, args: argparse.Namespace, tree: Path | None,
                  extra: list[str] | None = None) -> tuple[Server, Any, dict[str, str]]:
    """A server (from ``tree``'s sources when given: the baseline of an A/B run; with ``extra`` server options) with
    K devices connected."""
    server = Server(workdir=Path(tempfile.mkdtemp(prefix="server-", dir=work)), extra=list(extra or []),
                    source=tree)  # twistd imports nanoiot from ``tree`` when given
    server.start()
    devices = provision_devices(server.database, args.devices)
    (work / "tokens.txt").write_text("\n".join(token for _, token in devices) + "\n")
    (work / "ids.txt").write_text("\n".join(device_id for device_id, _ in devices) + "\n")
    env = dict(os.environ, RPC_JWT=server.login(), RPC_IDS=str(work / "ids.txt"), RPC_KIND="twoway")
    sim, _ = start_fleet(server.mqtt_port, work / "tokens.txt", work / f"sim-{time.monotonic_ns()}.jsonl", "echo")
    return server, sim, env


def bench_jwt() -> str:
    """An access token shaped as nanoiot's (claims of TokenIssuer.issue, HS512, the benchmark server's key), valid
    for floor+jwt: the floor targets get a header of the same size as nanoiot's."""
    import jwt

    now = time.time()
    claims = {"sub": "tenant@nanoiot.io", "userId": str(uuid.uuid4()), "scopes": ["TENANT_ADMIN"],
              "sessionId": str(uuid.uuid4()), "firstName": None, "lastName": None, "enabled": True,
              "isPublic": False, "tenantId": str(uuid.uuid4()), "customerId": "13814000-1dd2-11b2-8080-808080808080",
              "iss": JWT_ISSUER, "iat": int(now), "iatMs": int(now * 1000), "exp": int(now) + 9000}
    return jwt.encode(claims, BENCH_JWT_KEY, algorithm=JWT_ALGORITHM)


def start_floor(work: Path, args: argparse.Namespace, what: str) -> tuple[Subprocess, Any, dict[str, str]]:
    """A floor server (floor_server's variants) with K devices of its own, ids and tokens made as
    provision_devices makes them, connected by the same fleet as nanoiot's (bench.common.start_fleet)."""
    sub = work / what.replace("+", "-")
    sub.mkdir(exist_ok=True)
    devices = [(str(uuid.uuid4()), f"bench-{i}-{uuid.uuid4().hex[:8]}") for i in range(args.devices)]
    (sub / "devices.txt").write_text("".join(f"{device_id} {token}\n" for device_id, token in devices))
    (sub / "tokens.txt").write_text("".join(f"{token}\n" for _, token in devices))
    (sub / "ids.txt").write_text("".join(f"{device_id}\n" for device_id, _ in devices))
    server = Subprocess(what, str(sub / "devices.txt"))
    try:
        sim, _ = start_fleet(server.mqtt_port, sub / "tokens.txt", sub / f"sim-{time.monotonic_ns()}.jsonl", "echo")
    except Exception:
        server.stop()
        raise
    env = dict(os.environ, RPC_JWT=bench_jwt(), RPC_IDS=str(sub / "ids.txt"), RPC_KIND="twoway")
    return server, sim, env


FLOORS = ("floor", "floor+jwt", "floor+flush", "floor+flush+jwt")


def floors(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FLOORS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown floor target(s) {', '.join(unknown)}: one of {', '.join(FLOORS)}")
    return names


def targets_of(args: argparse.Namespace) -> list[str]:
    return (["bare"] + args.floors + ["nanoiot"] + (["baseline"] if args.baseline or args.baseline_args else []))


def one_run(index: int, args: argparse.Namespace, work: Path, lua: Path) -> list[dict[str, Any]]:
    """Every target up at once; ``--rounds`` rounds of one window each, in rotating order, so that the load the
    shared machine carries meanwhile falls on every target alike. One row per target: its median window."""
    targets = targets_of(args)
    started: dict[str, tuple[str, int, int | None, dict[str, str]]] = {}
    stops: list[Any] = []
    windows: dict[str, list[dict[str, Any]]] = {what: [] for what in targets}
    try:
        for what in targets:
            tree = None
            if what.startswith("floor"):
                floor, sim, env = start_floor(work, args, what)
                stops.append(floor.stop)
                stops.append(lambda sim=sim: (sim.terminate(), sim.wait(30)))
                started[what] = (floor.url, floor.pid, sim.pid, env)
                continue
            if what == "bare":
                bare = Subprocess("bare")
                stops.append(bare.stop)
                (work / "bare-ids.txt").write_text("\n".join(str(uuid.uuid4()) for _ in range(args.devices)) + "\n")
                env = dict(os.environ, RPC_JWT="x" * 200, RPC_IDS=str(work / "bare-ids.txt"), RPC_KIND="twoway")
                started[what] = (bare.url, bare.pid, None, env)
                continue
            if what == "baseline" and args.baseline:
                tree = Path(args.baseline)
            sub = work / what
            sub.mkdir(exist_ok=True)
            extra = args.baseline_args.split() if what == "baseline" and args.baseline_args else None
            server, sim, env = start_nanoiot(sub, args, tree, extra)
            stops.append(server.cleanup)
            stops.append(lambda sim=sim: (sim.terminate(), sim.wait(30)))
            started[what] = (server.url, server.pid, sim.pid, env)
        for round_ in range(args.rounds):
            shift = (index + round_) % len(targets)
            for what in targets[shift:] + targets[:shift]:
                wait_for_quiet(args.max_load, args.load_wait, print)
                url, pid, sim_pid, env = started[what]
                profile = None
                if args.profile and what == "nanoiot" and round_ == args.rounds - 1:
                    RESULTS.mkdir(parents=True, exist_ok=True)
                    profile = RESULTS / f"{args.output}-nanoiot.pyspy.txt"
                row = measure(what, url, pid, sim_pid, args, env, lua, profile)
                if profile is not None:
                    row["profile"] = summarize_profile(profile)
                    svg = profile.with_suffix(".svg")
                    row["profile"]["path"] = _shown(profile)
                    row["profile"]["svg"] = _shown(svg) if svg.exists() else None
                    continue  # a profiled window's CPU includes the sampler's pauses: not counted
                windows[what].append(row)
    finally:
        for stop in reversed(stops):
            try:
                stop()
            except Exception as error:  # noqa: BLE001 - tear down the rest anyway
                print(f"stopping: {error!r}")
    rows = []
    for what in targets:
        got = sorted(windows[what], key=lambda r: r["server_us_per_op"])
        row = dict(got[len(got) // 2])
        row["windows_us_per_op"] = [r["server_us_per_op"] for r in windows[what]]
        row["run"] = index
        rows.append(row)
        print(f"run {index} {what:15}: {row['rps']:>8,.0f} req/s  p50 {row['p50_ms']} p99 {row['p99_ms']} ms  "
              f"server {row['server_us_per_op']} µs/op ({row['server_core']:.0%} core; windows "
              f"{', '.join(f'{v:.0f}' for v in row['windows_us_per_op'])})  errors {row['errors']}"
              + (f"  sim {row['sim_us_per_op']} µs/op" if row["sim_us_per_op"] is not None else ""), flush=True)
    return rows


#: The ratios the summary gives (per run, and window by window), when both targets ran.
PAIRS = (("nanoiot", "bare"), ("baseline", "bare"), ("nanoiot", "baseline"),
         *((floor, "bare") for floor in FLOORS), ("floor+jwt", "floor"), ("floor+flush", "floor"),
         ("floor+flush+jwt", "floor+flush"), *(("nanoiot", floor) for floor in FLOORS), ("baseline", "floor"))


def med(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bare-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--floor-server", nargs=4, help=argparse.SUPPRESS)  # VARIANT HTTP MQTT DEVICES
    parser.add_argument("--floors", default="floor", type=floors,
                        help="the floor targets, comma-separated, from floor, floor+jwt, floor+flush, "
                             "floor+flush+jwt (default: floor; '' for none): see floor_server")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--connections", "-c", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0, help="one measured window, s")
    parser.add_argument("--warmup", type=float, default=1.0, help="wrk run before each window, s")
    parser.add_argument("--runs", type=int, default=3, help="fresh servers per run; the tables show the median")
    parser.add_argument("--rounds", type=int, default=5, help="windows per target and run (interleaved)")
    parser.add_argument("--short", action="store_true", help="regression mode: 1 run of 5 rounds of 4 s windows")
    parser.add_argument("--profile", action="store_true", help="py-spy NanoIoT during its window (last run's kept)")
    parser.add_argument("--max-load", type=float, default=1.5)
    parser.add_argument("--load-wait", type=float, default=30.0)
    parser.add_argument("--baseline", metavar="TREE",
                        help="also measure a NanoIoT started from the sources in TREE (a copy of the tree before a "
                             "change): an A/B comparison in the same run")
    parser.add_argument("--baseline-args", metavar="OPTIONS", default="",
                        help="server options for the baseline (e.g. '--metrics off'); alone: this tree with them")
    parser.add_argument("--output", default="rest_overhead", help="bench/results/<output>.json")
    args = parser.parse_args()
    if args.bare_server:
        bare_server(args.bare_server)
        return
    if args.floor_server:
        variant, http_port, mqtt_port, devices = args.floor_server
        floor_server(variant, int(http_port), int(mqtt_port), devices)
        return
    if not WRK:
        parser.error("wrk is not installed (apt-get install -y wrk)")
    if args.short:
        args.runs, args.duration, args.warmup = 1, 4.0, 1.0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="bench-rest-overhead-"))
    lua = work / "rpc.lua"
    lua.write_text(WRK_SCRIPT)
    rows: list[dict[str, Any]] = []
    try:
        for index in range(1, args.runs + 1):
            rows.extend(one_run(index, args, work, lua))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by_run: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_run.setdefault(row["run"], {})[row["what"]] = row
    targets = targets_of(args)
    summary: dict[str, Any] = {what: {key: med([r[key] for r in rows if r["what"] == what])
                                      for key in ("server_us_per_op", "rps", "p50_ms", "p99_ms", "server_core")}
                               for what in targets}
    for what in targets[1:]:
        summary[what]["sim_us_per_op"] = med([r["sim_us_per_op"] for r in rows if r["what"] == what])
        summary[what]["ratio"] = med([r[what]["server_us_per_op"] / r["bare"]["server_us_per_op"]
                                      for r in by_run.values()])
    summary["ratio"] = summary["nanoiot"]["ratio"]
    # Window by window (the targets' windows of one round are neighbours in time): the steadiest comparison.
    windows = {what: [w for r in rows if r["what"] == what for w in r["windows_us_per_op"]] for what in targets}
    summary["paired"] = {f"{a}/{b}": med([x / y for x, y in zip(windows[a], windows[b])])
                         for a, b in PAIRS if a in windows and b in windows}
    # Per run, as summary[what]["ratio"] is to bare: the floors against bare, nanoiot against the floors.
    summary["ratios"] = {f"{a}/{b}": med([r[a]["server_us_per_op"] / r[b]["server_us_per_op"]
                                          for r in by_run.values()])
                         for a, b in PAIRS if a in targets and b in targets}
    print(f"\nmedian of {args.runs} run(s), C={args.connections}, {args.devices} devices, {args.duration:g} s windows")
    print(f"{'':16}{'server µs/op':>22}{'req/s':>22}{'p50 ms':>20}{'p99 ms':>20}")
    for what in targets:
        s = summary[what]
        print(f"{what:16}" + "".join(f"{s[k]['median']:>10,.1f} ({s[k]['min']:,.0f}–{s[k]['max']:,.0f})".rjust(22)
                                     for k in ("server_us_per_op", "rps")) +
              "".join(f"{s[k]['median']:>8.2f} ({s[k]['min']:.1f}–{s[k]['max']:.1f})".rjust(20)
                      for k in ("p50_ms", "p99_ms")))
    r = summary["ratio"]
    print(f"ratio nanoiot/bare server CPU per op: {r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f})  "
          f"target <= 1.5: {'met' if r['median'] <= 1.5 else 'MISSED'}")
    if "baseline" in targets:
        b = summary["baseline"]["ratio"]
        print(f"ratio baseline/bare: {b['median']:.2f} ({b['min']:.2f}–{b['max']:.2f})")
    for pair, value in summary["ratios"].items():
        if "floor" in pair:
            print(f"ratio {pair}: {value['median']:.2f} ({value['min']:.2f}–{value['max']:.2f})")
    for pair, value in summary["paired"].items():
        print(f"paired windows {pair}: median {value['median']:.3f} ({value['min']:.2f}–{value['max']:.2f})")
    for row in rows:
        if "profile" in row:
            print(f"profile: {row['profile']['path']} svg {row['profile']['svg']}")
            for category, share in row["profile"]["categories"]:
                print(f"   {share:5.1f} %  {category}")
            for frame, share in row["profile"]["self"][:15]:
                print(f"   self {share:5.1f} %  {frame}")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    path = write_result(args.output, {"machine": machine(), "command": " ".join([Path(sys.executable).name,
                                                                                 *sys.argv]),
                                      "commit": git.stdout.strip(), "settings": vars(args), "summary": summary,
                                      "runs": rows})
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
