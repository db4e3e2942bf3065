"""Crash recovery of persistent RPCs: the server is killed with SIGKILL while commands are queued and while they
are delivered, restarted on the same database, and nothing acknowledged is lost, reordered or delivered twice.

The server runs as a real ``twistd`` subprocess; the devices are an asyncio fleet in another subprocess
(tests/crash/devices.py) that records every command it receives, PUBACKs it, answers the two-way ones and
reconnects by itself after the server dies. Everything here waits on events or polls through ``deferLater``,
bounded; nothing blocks the reactor.

What is checked, on SQLite and PostgreSQL:
- every rpcId the REST API returned ("acknowledged") exists afterwards and ended SUCCESSFUL;
- a request that was in flight at a kill may or may not have been stored; if it was, it ended SUCCESSFUL too;
- per device, the commands reached the device in submission order (first receipt of each request id), with
  strictly increasing request ids, and no command was received under two request ids;
- a request id received more than once (at-least-once on the wire) was only received again on a later connection,
  i.e. after a kill, and the number of such redeliveries is reported.

Kill points: once while queuing (devices offline, a third of the commands acknowledged), and three times while
delivering: "in flight" (as soon as the devices got a quarter of the commands: written, acknowledgements not yet
stored); "answers pending" (every command reached its device and is stored as acknowledged, DELIVERED for two-way
ones, while the devices still hold their answers); "answer acknowledged, not stored" (the devices answer while the
test holds the database's write lock, as a slow database would, and the server dies once it has acknowledged
(PUBACK) answers it could not store yet: the devices will not send those answers again, so the server has to get
those commands answered again after its restart).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from sqlalchemy.engine import make_url
from twisted.internet import defer, reactor, threads
from twisted.web.client import HTTPConnectionPool

from tests.fixtures.database import free_port
from tests.fixtures.processes import TWISTD, OutputProcess, bounded, sleep

DEVICES = 50
PER_DEVICE = 20
TOTAL = DEVICES * PER_DEVICE
#: Requests the test keeps in flight while queuing.
IN_FLIGHT = 20
#: Commands written to a device and not yet acknowledged, at most (QueueSettings.max_in_flight under BURST).
SERVER_MAX_IN_FLIGHT = 100
#: Generous: nothing may expire during the test; every command is expected to end SUCCESSFUL.
RPC_TIMEOUT_MS = 600_000
#: The kill while queuing comes once this fraction of the commands was acknowledged (see the module's docstring).
KILL_WHILE_QUEUING = 1 / 3
KILLS_WHILE_DELIVERING = 3
#: "answer acknowledged, not stored": seconds the database is held, at most (well below the server's SQLite busy
#: timeout of 5 s, after which its write would fail instead of waiting).
DATABASE_HOLD = 3.0
#: Settling fails early when nothing changed for this long (a stuck command would otherwise wait for its expiry).
STALL_TIMEOUT = 20.0

TERMINAL = {"SUCCESSFUL", "FAILED", "EXPIRED"}
JWT_KEY = "crash-test-signing-key-not-secret-" * 2
DEVICE_SCRIPT = str(Path(__file__).resolve().parents[1] / "crash" / "devices.py")
START_TIMEOUT = 60.0
REQUEST_TIMEOUT = 60.0
SETTLE_TIMEOUT = 90.0


class NanoServer:
    """The server under test: one twistd subprocess at a time, always on the same ports and database."""

    def __init__(self, workdir: Path, database_url: str) -> None:
        self.workdir = workdir
        self.database_url = database_url
        self.http_port = free_port()
        self.mqtt_port = free_port()
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.process: OutputProcess | None = None
        self.generation = 0
        self.log: list[str] = []  # every generation's output, in order, with markers
        self.jwt = ""
        self.pool: HTTPConnectionPool | None = None

    def argv(self) -> list[str]:
        return [
            TWISTD, "-n", "--pidfile=", "nanoiot",
            "--host", "127.0.0.1", "--http-port", str(self.http_port), "--mqtt-port", str(self.mqtt_port),
            "--coap-port", "0", "--database", self.database_url, "--demo",
            "--jwt-key", JWT_KEY, "--jwt-key-file", str(self.workdir / "nanoiot.key"),
            "--log-level", "info",
        ]

    async def start(self) -> None:
        self.generation += 1
        self.log.append(f"----- server generation {self.generation} starts")
        process = OutputProcess(f"server-{self.generation}")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        reactor.spawnProcess(process, TWISTD, self.argv(), env=env, path=str(self.workdir))
        self.process = process
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = IN_FLIGHT
        self.pool.retryAutomatically = False  # a request must never be sent twice behind the test's back
        waited = 0.0
        while True:
            if not process.running:
                self._collect(process)
                raise AssertionError(f"server generation {self.generation} exited at start:\n" + self.tail())
            try:
                response = await treq.post(f"{self.http_url}/api/auth/login", pool=self.pool, timeout=5,
                                           json={"username": "tenant@nanoiot.io", "password": "tenant"})
                body = await response.json()
                if response.code == 200:
                    self.jwt = body["token"]
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if waited > START_TIMEOUT:
                raise AssertionError(f"server generation {self.generation} not ready after {START_TIMEOUT:.0f} s:\n"
                                     + self.tail())
            await sleep(0.1)
            waited += 0.1

    async def kill(self) -> None:
        """kill -9, then wait until the process is gone and its output read."""
        process = self.process
        assert process is not None and process.running and process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
        await bounded(process.ended, 30, "the killed server to end")
        self._collect(process)
        self.log.append(f"----- server generation {self.generation} killed with SIGKILL")
        await self._drop_pool()

    async def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.running:
            process.signal("TERM")
            try:
                await process.ended.addTimeout(30, reactor)
            except defer.TimeoutError:
                process.signal("KILL")
                await process.ended
        self._collect(process)
        self.process = None
        await self._drop_pool()

    async def _drop_pool(self) -> None:
        if self.pool is not None:
            pool, self.pool = self.pool, None
            await pool.closeCachedConnections()

    def _collect(self, process: OutputProcess) -> None:
        # The start banner's indented lines (logins, curl examples) are left out.
        self.log.extend(line for line in process.lines if not line.startswith("\t"))
        process.lines = []

    def tail(self, n: int = 60) -> str:
        lines = list(self.log)
        if self.process is not None:
            lines += [line for line in self.process.lines if not line.startswith("\t")]
        return "\n".join(lines[-n:])

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"X-Authorization": [f"Bearer {self.jwt}"], "Content-Type": ["application/json"]}
        data = json.dumps(body).encode() if body is not None else None
        response = await treq.request(method, f"{self.http_url}{path}", data=data, headers=headers,
                                      pool=self.pool, timeout=REQUEST_TIMEOUT)
        text = await response.content()
        try:
            return response.code, json.loads(text) if text else None
        except ValueError:
            return response.code, text.decode("utf-8", "replace")


class Fleet(OutputProcess):
    """The device fleet; keeps every ``command`` record and fires waiters on the count of distinct commands."""

    def __init__(self) -> None:
        super().__init__("fleet")
        self.records: list[dict[str, Any]] = []
        self.distinct: set[int] = set()
        self.connected_tokens: set[str] = set()
        self.gave_up: list[str] = []
        self.stderr: list[str] = []
        self._waiters: list[tuple[int, defer.Deferred]] = []
        self.answers_written = 0
        self.answers_acked = 0
        #: request id -> [(event, device connection)] for "answered" and "answer_acked", in order.
        self.answer_events: dict[int, list[tuple[str, int]]] = defaultdict(list)
        self._answer_waiters: list[tuple[int, defer.Deferred]] = []

    def line_received(self, fd: int, line: str) -> None:
        if fd != 1:
            self.stderr.append(line)
            return
        if not line.strip():
            return
        event = json.loads(line)
        kind = event["event"]
        if kind == "command":
            self.records.append(event)
            self.distinct.add(event["request_id"])
            for waiter in [w for w in self._waiters if len(self.distinct) >= w[0]]:
                self._waiters.remove(waiter)
                waiter[1].callback(len(self.distinct))
        elif kind == "answer_acked":
            self.answer_events[event["request_id"]].append(("server PUBACKed the answer", event["connection"]))
            self.answers_acked += 1
            for waiter in [w for w in self._answer_waiters if self.answers_acked >= w[0]]:
                self._answer_waiters.remove(waiter)
                waiter[1].callback(self.answers_acked)
        elif kind == "answered":
            self.answer_events[event["request_id"]].append(("answer written", event["connection"]))
            self.answers_written += 1
        elif kind == "connected":
            self.connected_tokens.add(event["token"])
        elif kind == "disconnected":
            self.connected_tokens.discard(event["token"])
        elif kind == "gave_up":
            self.gave_up.append(event["token"])

    def processEnded(self, reason: Any) -> None:
        super().processEnded(reason)
        for _, d in self._waiters + self._answer_waiters:
            d.errback(AssertionError(f"device fleet ended early: {self.stderr[-20:]} {self.errors[-3:]}"))
        self._waiters = []
        self._answer_waiters = []

    def release_answers(self) -> None:
        """The devices answer what they hold, and from now on answer at once."""
        self.transport.write(b"release\n")

    def pause(self) -> None:
        if self.running and self.pid is not None:
            os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.running and self.pid is not None:
            os.kill(self.pid, signal.SIGCONT)

    def answers_acked_at_least(self, count: int) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        if self.answers_acked >= count:
            d.callback(self.answers_acked)
        else:
            self._answer_waiters.append((count, d))
        return d

    def distinct_at_least(self, count: int) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        if len(self.distinct) >= count:
            d.callback(len(self.distinct))
        else:
            self._waiters.append((count, d))
        return d


class DatabaseHold:
    """Holds the database's write lock from another connection, as a slow database would: the server's writes wait
    (SQLite: an open write transaction, which the server's busy timeout outlasts; PostgreSQL: the ``rpc`` table locked
    in SHARE mode, which blocks INSERT/UPDATE/DELETE but not reads)."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    @classmethod
    async def acquire(cls, database_url: str) -> DatabaseHold:
        url = make_url(database_url)

        def hold() -> Any:
            if url.get_backend_name() == "sqlite":
                connection = sqlite3.connect(url.database, timeout=10, isolation_level=None,
                                             check_same_thread=False)
                connection.execute("BEGIN IMMEDIATE")
                return connection
            import psycopg2

            connection = psycopg2.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                                          dbname=url.database, connect_timeout=10)
            with connection.cursor() as cursor:
                cursor.execute("SET lock_timeout = '10s'")
                cursor.execute("LOCK TABLE rpc IN SHARE MODE")  # the transaction stays open
            return connection

        return cls(await bounded(threads.deferToThread(hold), 30, "taking the database's write lock"))

    async def release(self) -> None:
        def release() -> None:
            try:
                self.connection.rollback()
            finally:
                self.connection.close()

        await bounded(threads.deferToThread(release), 30, "releasing the database's write lock")


class Gate:
    """Open while the server is up; submitting waits on it while the server is being killed and restarted."""

    def __init__(self) -> None:
        self.closed = False
        self._waiters: list[defer.Deferred] = []

    def close(self) -> None:
        self.closed = True

    def open(self) -> None:
        self.closed = False
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def wait(self) -> None:
        while self.closed:
            waiter: defer.Deferred = defer.Deferred()
            self._waiters.append(waiter)
            await waiter


def method_of(k: int, i: int) -> str:
    return f"cmd-{k}-{i}"


def parse_method(method: str) -> tuple[int, int]:
    _, k, i = method.split("-")
    return int(k), int(i)


class Submissions:
    """Phase A: every device's commands submitted in order, IN_FLIGHT at a time, with one kill -9 in the middle."""

    def __init__(self, server: NanoServer, device_ids: list[str]) -> None:
        self.server = server
        self.device_ids = device_ids
        self.acknowledged: dict[tuple[int, int], str] = {}  # (device, index) -> rpcId
        self.unacknowledged: set[tuple[int, int]] = set()  # in flight at the kill: stored or not, unknown
        self.limiter = defer.DeferredSemaphore(IN_FLIGHT)
        self.gate = Gate()
        self.kill_at = int(TOTAL * KILL_WHILE_QUEUING)
        self.killing: defer.Deferred | None = None
        self.generation_killed: set[int] = set()

    async def run(self) -> None:
        await defer.gatherResults([defer.ensureDeferred(self.device(k)) for k in range(DEVICES)],
                                  consumeErrors=True)
        if self.killing is not None:
            await self.killing

    async def device(self, k: int) -> None:
        for i in range(PER_DEVICE):
            await self.limiter.acquire()
            try:
                await self.gate.wait()
                await self.submit(k, i)
            finally:
                self.limiter.release()

    async def submit(self, k: int, i: int) -> None:
        generation = self.server.generation
        body = {"method": method_of(k, i), "params": {"k": k, "i": i, "twoway": (k + i) % 2 == 0},
                "persistent": True, "timeout": RPC_TIMEOUT_MS}
        kind = "twoway" if (k + i) % 2 == 0 else "oneway"
        try:
            status, answer = await self.server.call("POST", f"/api/rpc/{kind}/{self.device_ids[k]}", body)
        except Exception as exc:  # noqa: BLE001
            if generation in self.generation_killed:
                self.unacknowledged.add((k, i))  # in flight when the server died
                return
            raise AssertionError(f"{method_of(k, i)}: request failed without a kill: {exc!r}") from exc
        assert status == 200, (method_of(k, i), status, answer)
        self.acknowledged[(k, i)] = answer["rpcId"]
        if len(self.acknowledged) == self.kill_at and self.killing is None:
            # Synchronously, before any other request can start: nothing new is sent to the dying server.
            self.gate.close()
            self.generation_killed.add(self.server.generation)
            self.killing = defer.ensureDeferred(self.kill_and_restart())

    async def kill_and_restart(self) -> None:
        await self.server.kill()
        await self.server.start()
        self.gate.open()


async def create_devices(server: NanoServer, tokens_file: Path) -> tuple[list[str], list[str]]:
    device_ids, tokens = [], []
    for k in range(DEVICES):
        token = f"crash-token-{k}"
        status, body = await server.call("POST", f"/api/device?accessToken={token}",
                                         {"name": f"crash-device-{k}", "type": "crash"})
        assert status == 200, body
        device_ids.append(body["id"]["id"])
        tokens.append(token)
    tokens_file.write_text("\n".join(tokens) + "\n")
    return device_ids, tokens


async def stored_rpcs(server: NanoServer, device_ids: list[str]) -> dict[int, list[dict[str, Any]]]:
    """Every device's persistent RPCs, in seq order (one page: a device has at most PER_DEVICE)."""
    limiter = defer.DeferredSemaphore(10)

    async def one(k: int) -> list[dict[str, Any]]:
        status, page = await server.call(
            "GET", f"/api/rpc/persistent/device/{device_ids[k]}?pageSize={PER_DEVICE + 10}&page=0")
        assert status == 200, page
        assert not page["hasNext"], page
        return page["data"]

    pages = await defer.gatherResults(
        [limiter.run(lambda k=k: defer.ensureDeferred(one(k))) for k in range(DEVICES)], consumeErrors=True)
    return dict(enumerate(pages))


async def all_delivered(server: NanoServer, device_ids: list[str]) -> int:
    """Polls until no stored command waits to be sent or acknowledged (QUEUED, SENT, TIMEOUT) and some are
    DELIVERED; returns how many are DELIVERED."""
    while True:
        stored = await stored_rpcs(server, device_ids)
        statuses = [r["status"] for page in stored.values() for r in page]
        delivered = statuses.count("DELIVERED")
        if delivered and all(status == "DELIVERED" or status in TERMINAL for status in statuses):
            return delivered
        await sleep(0.1)


async def wait_until_settled(server: NanoServer, device_ids: list[str], acknowledged: dict[tuple[int, int], str],
                             fleet: Fleet, kills: list[str]) -> dict[int, list[dict[str, Any]]]:
    """Polls (bounded) until every stored RPC is terminal and every acknowledged one is among them."""
    wanted = set(acknowledged.values())
    waited = 0.0
    last_state: Any = None
    unchanged = 0.0
    while True:
        stored = await stored_rpcs(server, device_ids)
        rows = [r for page in stored.values() for r in page]
        present = {r["id"]["id"] for r in rows}
        open_rows = [r for r in rows if r["status"] not in TERMINAL]
        if not open_rows and wanted <= present:
            return stored
        state = sorted((r["id"]["id"], r["status"]) for r in rows)
        unchanged = unchanged + 0.25 if state == last_state else 0.0
        last_state = state
        if waited > SETTLE_TIMEOUT or unchanged > STALL_TIMEOUT or not fleet.running:
            print(f"\n[crash recovery on {server.database_url.split(':', 1)[0]}] kills while delivering: {kills}")
            by_status: dict[str, int] = defaultdict(int)
            for r in open_rows:
                by_status[r["status"]] += 1
            receipts: dict[int, list[int]] = defaultdict(list)
            for record in fleet.records:
                receipts[record["request_id"]].append(record["connection"])
            # (method, request id, status, the device connections on which the device received it, what became
            # of its answer on which connection)
            sample = [(r["request"]["body"]["method"], r["request"]["requestId"], r["status"],
                       receipts.get(r["request"]["requestId"], []), fleet.answer_events.get(r["request"]["requestId"]))
                      for r in open_rows[:10]]
            missing = sorted(wanted - present)[:20]
            raise AssertionError(
                f"not settled after {waited:.0f} s, no change for {unchanged:.0f} s (devices connected: "
                f"{len(fleet.connected_tokens)}, fleet running: {fleet.running}): {len(open_rows)} stored RPCs "
                f"not terminal {dict(by_status)}, e.g. {sample}; {len(wanted - present)} acknowledged rpcIds missing, "
                f"e.g. {missing}\nserver log tail:\n{server.tail()}")
        await sleep(0.25)
        waited += 0.25


@pytest_twisted.ensureDeferred
async def test_persistent_rpcs_survive_kill_9_while_queuing_and_while_delivering(tmp_path, database_url):
    server = NanoServer(tmp_path, database_url)
    fleet: Fleet | None = None
    try:
        await server.start()
        tokens_file = tmp_path / "tokens.txt"
        device_ids, tokens = await create_devices(server, tokens_file)

        # --- phase A: queue while the devices are offline; kill -9 after a third was acknowledged ------------------
        submissions = Submissions(server, device_ids)
        await bounded(submissions.run(), 120, "queuing the commands")
        acknowledged = submissions.acknowledged
        assert submissions.generation_killed, "the kill while queuing did not happen"
        assert len(acknowledged) + len(submissions.unacknowledged) == TOTAL

        # --- phase B: the fleet connects; kill -9 three times while commands are being delivered -------------------
        fleet = Fleet()
        reactor.spawnProcess(fleet, sys.executable, [
            sys.executable, DEVICE_SCRIPT, "--port", str(server.mqtt_port), "--tokens-file", str(tokens_file),
            "--give-up", "60", "--hold-answers",
        ], env=dict(os.environ, PYTHONUNBUFFERED="1"), path=str(tmp_path))
        kills_while_delivering: list[str] = []

        def record_kill(point: str, delivered: int | None = None) -> None:
            note = f"{point}: {len(fleet.distinct)} commands received, {fleet.answers_written} answers written, " \
                   f"{fleet.answers_acked} acknowledged by the server"
            kills_while_delivering.append(note if delivered is None else f"{note}, {delivered} stored as DELIVERED")

        # 1. "in flight": as soon as the devices got a quarter of the commands (their acks are not stored yet).
        await bounded(fleet.distinct_at_least(len(acknowledged) // 4), 60, "devices to receive a quarter")
        record_kill("in flight")
        await server.kill()
        await server.start()

        # 2. "answers pending": every command reached its device and is stored as acknowledged (one-way ones have
        # succeeded, two-way ones are DELIVERED); the devices are still working on their answers (held for now).
        await bounded(fleet.distinct_at_least(len(acknowledged) * 2 // 3), 60, "devices to receive two thirds")
        delivered = await bounded(all_delivered(server, device_ids), 60, "every command stored as delivered")
        record_kill("answers pending", delivered)
        await server.kill()

        # 3. "answer acknowledged, not stored": the devices answer (all at once) while the database is slow (the test
        # holds its write lock), so the server has acknowledged (PUBACK) answers it has not stored yet when it dies.
        # The fleet is paused until the lock is held, so that nothing reaches the restarted server before.
        fleet.pause()
        try:
            await server.start()
            hold = await DatabaseHold.acquire(database_url)
        finally:
            fleet.resume()
        try:
            acked = fleet.answers_acked
            fleet.release_answers()
            # The server acknowledges answers while it cannot store them: wait for the first acknowledgement, then
            # until every answer written so far was acknowledged (bounded).
            await defer.DeferredList([fleet.answers_acked_at_least(acked + 1), sleep(DATABASE_HOLD - 1)],
                                     fireOnOneCallback=True, fireOnOneErrback=True, consumeErrors=True)
            waited = 0.0
            while fleet.answers_acked < fleet.answers_written and waited < 1.0:
                await sleep(0.05)
                waited += 0.05
            record_kill("answer acknowledged, not stored")
            await server.kill()
        finally:
            await hold.release()
        await server.start()

        stored = await wait_until_settled(server, device_ids, acknowledged, fleet, kills_while_delivering)

        # Stop the fleet; once it has ended, every record it wrote has been read.
        fleet.signal("TERM")
        await bounded(fleet.ended, 30, "the device fleet to stop")
        records = fleet.records
        assert fleet.errors == [], fleet.errors[:3]

        # --- every acknowledged rpcId: stored, SUCCESSFUL, for the command that was sent ---------------------------
        limiter = defer.DeferredSemaphore(IN_FLIGHT)

        async def read(rpc_id: str) -> tuple[int, Any]:
            return await server.call("GET", f"/api/rpc/persistent/{rpc_id}")

        keys = sorted(acknowledged)
        reads = await defer.gatherResults(
            [limiter.run(lambda r=acknowledged[key]: defer.ensureDeferred(read(r))) for key in keys],
            consumeErrors=True)
        lost = [(method_of(*key), code) for key, (code, _) in zip(keys, reads) if code != 200]
        assert lost == [], f"acknowledged RPCs lost: {lost}"
        not_successful = [(method_of(*key), rpc["status"], rpc["response"]) for key, (_, rpc) in zip(keys, reads)
                          if rpc["status"] != "SUCCESSFUL"]
        assert not_successful == [], f"acknowledged RPCs that did not succeed: {not_successful}"
        wrong = [(method_of(*key), rpc["request"]["body"]["method"]) for key, (_, rpc) in zip(keys, reads)
                 if rpc["request"]["body"]["method"] != method_of(*key)]
        assert wrong == []

        # --- what is stored, per device: submitted commands only, each once, in submission order, all SUCCESSFUL --
        stored_ids: dict[str, int] = {}  # method -> request id
        for k, rows in stored.items():
            methods = [r["request"]["body"]["method"] for r in rows]
            assert len(set(methods)) == len(methods), f"device {k}: a command stored twice: {methods}"
            indexes = []
            for method in methods:
                owner, index = parse_method(method)
                assert owner == k, f"device {k} holds another device's command {method}"
                indexes.append(index)
            assert indexes == sorted(indexes), f"device {k}: stored out of submission order: {methods}"
            request_ids = [r["request"]["requestId"] for r in rows]
            assert request_ids == sorted(set(request_ids)), f"device {k}: request ids not increasing: {request_ids}"
            for r in rows:
                assert r["status"] == "SUCCESSFUL", (r["request"]["body"]["method"], r["status"], r["response"])
                stored_ids[r["request"]["body"]["method"]] = r["request"]["requestId"]
            for index in range(PER_DEVICE):
                if (k, index) in acknowledged:
                    assert method_of(k, index) in methods, f"acknowledged {method_of(k, index)} not stored"
        unacknowledged_stored = sorted(method_of(*key) for key in submissions.unacknowledged
                                       if method_of(*key) in stored_ids)

        # --- what the devices received ----------------------------------------------------------------------------
        by_token: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record in records:
            by_token[record["token"]].append(record)
        methods_by_id: dict[int, str] = {}
        ids_by_method: dict[str, set[int]] = defaultdict(set)
        redeliveries = 0
        redelivered_ids: set[int] = set()
        for record in records:
            rid, method = record["request_id"], record["method"]
            assert methods_by_id.setdefault(rid, method) == method, f"request id {rid} carried two commands"
            ids_by_method[method].add(rid)
        twice = {method: sorted(ids) for method, ids in ids_by_method.items() if len(ids) > 1}
        assert twice == {}, f"commands received under two different request ids (real duplicates): {twice}"
        for k, token in enumerate(tokens):
            connections: dict[int, list[int]] = {}  # request id -> the device connections that received it
            order: list[int] = []
            for record in by_token.get(token, []):
                rid = record["request_id"]
                if rid in connections:
                    redeliveries += 1
                    redelivered_ids.add(rid)
                    # At-least-once only across a reconnect (a kill): never twice on one connection.
                    assert record["connection"] > connections[rid][-1], (
                        f"device {k}: request {rid} ({record['method']}) received again on connection "
                        f"{record['connection']} after connections {connections[rid]}")
                    connections[rid].append(record["connection"])
                    continue
                connections[rid] = [record["connection"]]
                order.append(rid)
            received_methods = [methods_by_id[rid] for rid in order]
            expected = [r["request"]["body"]["method"] for r in stored[k]]
            # Everything stored ended SUCCESSFUL, so every stored command reached the device, and nothing else did.
            assert received_methods == expected, (
                f"device {k}: received (first receipts, in order) {received_methods}, stored in order {expected}")
            assert order == [stored_ids[m] for m in expected], f"device {k}: request ids {order}"
            assert order == sorted(order)

        # At-least-once on the wire, only for commands in flight at a kill: at most one in-flight window per device
        # per kill (and, by the check above, at most once per kill for any one command).
        bound = DEVICES * SERVER_MAX_IN_FLIGHT * KILLS_WHILE_DELIVERING
        print(f"\n[crash recovery on {database_url.split(':', 1)[0]}] submitted {TOTAL}, acknowledged "
              f"{len(acknowledged)}, in flight at the kill while queuing {len(submissions.unacknowledged)} "
              f"(stored anyway: {len(unacknowledged_stored)}); kills while delivering: {kills_while_delivering}; "
              f"device receipts {len(records)}, distinct request ids {len(methods_by_id)}; raw redeliveries of "
              f"the same request id {redeliveries} ({len(redelivered_ids)} ids); server generations "
              f"{server.generation}")
        assert redeliveries <= bound, (redeliveries, bound)
        assert not fleet.gave_up
        await server.stop()
        errors = [line for line in server.log if "Traceback" in line or "Unhandled" in line or "[critical]" in line
                  or "could not" in line]
        assert errors == [], "\n".join(server.log[-60:])
    finally:
        if fleet is not None and fleet.running:
            fleet.signal("KILL")
            await fleet.ended
        await server.stop()
