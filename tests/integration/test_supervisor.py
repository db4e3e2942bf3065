"""The ``nanoiot run --processes N`` supervisor with tiny ``python -c`` children instead of servers: output relayed,
crashes restarted with a growing back-off, a configuration error (exit 2) stopping everything, signals forwarded;
and the twistd command line each node gets.

The supervisor runs in a subprocess of its own, so that it gets real signals in its main thread. Every child
carries a token in its command line: once the supervisor has exited, no process may still carry it.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from nanoiot import cli
from nanoiot.supervisor import Backoff

TIMEOUT = 20

SUPERVISOR = (
    "import json, sys\n"
    "from nanoiot.supervisor import Supervisor\n"
    "sys.exit(Supervisor(json.loads(sys.argv[1]), backoff=0.05, max_backoff=0.2, stop_timeout=10).run())\n"
)

# Serves until SIGTERM or SIGINT, then says which and exits 0.
SERVING = (
    "import os, signal, sys\n"
    "name = sys.argv[1]\n"
    "def bye(signum, frame):\n"
    "    print('bye', name, signal.Signals(signum).name, flush=True)\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, bye)\n"
    "signal.signal(signal.SIGINT, bye)\n"
    "print('ready', name, os.getpid(), flush=True)\n"
    "while True:\n"
    "    signal.pause()\n"
)

CRASHING = "import os, sys\nprint('up', sys.argv[1], os.getpid(), flush=True)\nsys.exit(1)\n"

BAD_CONFIG = "import sys\nprint('nanoiot: --cluster needs a PostgreSQL --database', file=sys.stderr)\nsys.exit(2)\n"


class Running:
    """A supervisor subprocess whose stdout and stderr lines are read as they come."""

    def __init__(self, children: list[tuple[str, str]]) -> None:
        self.token = f"nanoiot-test-{uuid.uuid4().hex}"
        commands = [[sys.executable, "-c", script, name, self.token] for script, name in children]
        self.process = subprocess.Popen(
            [sys.executable, "-c", SUPERVISOR, json.dumps(commands)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        self.lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self.seen: list[tuple[str, str]] = []
        self.readers = [threading.Thread(target=self._read, args=(stream, name), daemon=True)
                        for stream, name in ((self.process.stdout, "out"), (self.process.stderr, "err"))]
        for reader in self.readers:
            reader.start()

    def _read(self, stream, name: str) -> None:
        for line in stream:
            self.lines.put((name, line.rstrip("\n")))

    def expect(self, matches: Callable[[str, str], bool], count: int = 1) -> list[str]:
        """Wait (at most TIMEOUT) until ``count`` lines, counting those already read, match; those lines.

        (stdout and stderr are read by two threads: their lines may be queued in either order.)
        """
        found = [line for stream, line in self.seen if matches(stream, line)]
        deadline = time.monotonic() + TIMEOUT
        while len(found) < count:
            try:
                stream, line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"waited {TIMEOUT} s for {count} matching line(s); saw {self.seen}")
            self.seen.append((stream, line))
            if matches(stream, line):
                found.append(line)
        return found

    def finish(self) -> tuple[int, list[tuple[str, str]]]:
        """Wait for the supervisor to exit; its exit code and every line not yet read."""
        code = self.process.wait(timeout=TIMEOUT)
        for reader in self.readers:
            reader.join(timeout=TIMEOUT)
        rest = []
        while not self.lines.empty():
            rest.append(self.lines.get())
        self.seen += rest
        return code, rest

    def children_left(self) -> list[int]:
        """Processes still carrying this run's token (none, once the supervisor has stopped them all)."""
        left = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != self.process.pid:
                try:
                    if self.token.encode() in (entry / "cmdline").read_bytes():
                        left.append(int(entry.name))
                except OSError:
                    pass
        return left

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in self.children_left():
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def start():
    started: list[Running] = []

    def starting(children: list[tuple[str, str]]) -> Running:
        started.append(Running(children))
        return started[-1]

    yield starting
    for running in started:
        running.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_is_forwarded_and_every_child_stopped_before_the_supervisor_exits(start, signum) -> None:
    run = start([(SERVING, "a"), (SERVING, "b")])
    ready = run.expect(lambda stream, line: stream == "out" and line.startswith("ready "), count=2)
    assert sorted(line.split()[1] for line in ready) == ["a", "b"]
    assert len(run.children_left()) == 2
    run.process.send_signal(signum)
    code, rest = run.finish()
    assert code == 0
    assert sorted(line for stream, line in rest if line.startswith("bye ")) == [
        f"bye a {signum.name}", f"bye b {signum.name}"
    ]
    assert run.children_left() == []


def test_a_crashing_child_is_restarted_with_a_doubling_back_off_and_the_others_left_alone(start) -> None:
    run = start([(SERVING, "steady"), (CRASHING, "flaky")])
    ups = run.expect(lambda stream, line: line.startswith("up flaky "), count=4)
    assert len({line.split()[2] for line in ups}) == 4  # four processes, one after another
    restarts = run.expect(lambda stream, line: stream == "err" and "restarting in" in line, count=3)
    assert [line.rsplit("restarting in ", 1)[1] for line in restarts[:3]] == ["0.05 s", "0.1 s", "0.2 s"]
    assert all("node 2" in line and "exited with code 1" in line for line in restarts)
    run.process.send_signal(signal.SIGTERM)
    code, _ = run.finish()
    assert code == 0
    readies = [line for _, line in run.seen if line.startswith("ready ")]
    assert len(readies) == 1 and readies[0].startswith("ready steady ")  # the steady one was never restarted
    assert run.children_left() == []


def test_a_child_that_exits_2_at_start_stops_everything_with_code_2_and_no_restart(start) -> None:
    run = start([(SERVING, "a"), (BAD_CONFIG, "bad"), (SERVING, "c")])
    code, _ = run.finish()
    assert code == 2
    errors = [line for stream, line in run.seen if stream == "err"]
    assert errors.count("nanoiot: --cluster needs a PostgreSQL --database") == 1  # relayed, and not restarted
    assert any("node 2 exited with code 2 at start" in line for line in errors)
    assert run.children_left() == []


def test_the_back_off_doubles_up_to_its_cap_and_resets_after_a_long_run() -> None:
    backoff = Backoff(first=1.0, most=30.0, stable=60.0)
    assert [backoff.next_delay(0.5) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.next_delay(60.5) == 1
    assert backoff.next_delay(3) == 2


# -- the command line of each node -----------------------------------------------------------------------------------


class FakeSupervisor:
    commands: list[list[str]] = []
    code = 0

    def __init__(self, commands: list[list[str]]) -> None:
        FakeSupervisor.commands = commands

    def run(self) -> int:
        return FakeSupervisor.code


@pytest.fixture
def nanoiot_run(monkeypatch):
    for name in [n for n in os.environ if n.startswith("NANOIOT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr("nanoiot.supervisor.Supervisor", FakeSupervisor)
    monkeypatch.setattr("socket.gethostname", lambda: "gw7")
    FakeSupervisor.commands, FakeSupervisor.code = [], 0

    def invoke(*args: str, env: dict[str, str] | None = None):
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        return CliRunner().invoke(cli.main, ["run", *args])

    return invoke


TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
POSTGRES = "postgresql://nanoiot@db.example/nanoiot"


def test_each_node_gets_the_options_plus_cluster_reuse_port_and_its_own_node_id(nanoiot_run) -> None:
    result = nanoiot_run("--processes", "3", "--http-port", "9000", "--database", POSTGRES)
    assert result.exit_code == 0, result.output
    assert FakeSupervisor.commands == [
        [TWISTD, "-n", "--pidfile=", "nanoiot", "--http-port", "9000", "--database", POSTGRES,
         "--cluster", "--reuse-port", "--node-id", f"gw7:9000-{i}"]
        for i in (1, 2, 3)
    ]


def test_a_given_node_id_is_the_base_and_is_not_passed_twice(nanoiot_run) -> None:
    result = nanoiot_run("--node-id=edge", "--database", POSTGRES, "--processes", "2", "--cluster")
    assert result.exit_code == 0, result.output
    assert FakeSupervisor.commands == [
        [TWISTD, "-n", "--pidfile=", "nanoiot", "--database", POSTGRES, "--cluster", "--reuse-port",
         "--node-id", f"edge-{i}"]
        for i in (1, 2)
    ]


def test_the_base_name_comes_from_the_environment_when_not_given(nanoiot_run) -> None:
    assert nanoiot_run("--processes", "2", env={"NANOIOT_HTTP_PORT": "8181"}).exit_code == 0
    assert [command[-1] for command in FakeSupervisor.commands] == ["gw7:8181-1", "gw7:8181-2"]
    assert nanoiot_run("--processes", "2", env={"NANOIOT_NODE_ID": "rack"}).exit_code == 0
    assert [command[-1] for command in FakeSupervisor.commands] == ["rack-1", "rack-2"]


def test_the_default_http_port_names_the_nodes(nanoiot_run) -> None:
    assert nanoiot_run("--processes", "2").exit_code == 0
    assert [command[-1] for command in FakeSupervisor.commands] == ["gw7:8080-1", "gw7:8080-2"]


def test_the_supervisors_exit_code_is_the_commands(nanoiot_run) -> None:
    FakeSupervisor.code = 2
    assert nanoiot_run("--processes", "2").exit_code == 2


def test_one_process_is_plain_twistd_as_before(nanoiot_run, monkeypatch) -> None:
    execs: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(os, "execv", lambda path, argv: execs.append((path, list(argv))))
    assert nanoiot_run("--http-port", "9000", "--demo").exit_code == 0
    assert execs == [(TWISTD, [TWISTD, "-n", "--pidfile=", "nanoiot", "--http-port", "9000", "--demo"])]
    assert FakeSupervisor.commands == []


def test_zero_processes_is_a_usage_error(nanoiot_run) -> None:
    assert nanoiot_run("--processes", "0").exit_code == 2


def test_real_nodes_on_sqlite_refuse_to_start_and_nanoiot_run_exits_2(tmp_path) -> None:
    """End to end through twistd: each node rejects --cluster on SQLite (exit 2), so the supervisor stops with 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOIOT_")}
    result = subprocess.run(
        [sys.executable, "-m", "nanoiot.cli", "run", "--processes", "2", "--database", f"sqlite:///{tmp_path}/x.db"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "--cluster needs a PostgreSQL --database" in result.stderr
    assert "exited with code 2 at start" in result.stderr
