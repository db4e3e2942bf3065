"""twistd daemon mode: the server's own quiet observer writes where twistd was told (--logfile), not to the
daemon's /dev/null standard output, SIGUSR1 rotates that file (as twistd's own log), and SIGTERM stops the daemon
cleanly (its pid file goes)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.fixtures.database import free_port
from tests.fixtures.processes import TWISTD


async def until(check, seconds: float, what: str) -> None:  # type: ignore[no-untyped-def]
    """Poll ``check`` every 0.1 s through the reactor (the daemon is another process), at most ``seconds``."""
    for _ in range(int(seconds * 10)):
        if check():
            return
        await deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"timed out after {seconds} s: {what}")


@pytest_twisted.ensureDeferred
async def test_a_daemonized_server_writes_its_log_file_and_stops_on_sigterm(tmp_path: Path) -> None:
    log_file, pid_file = tmp_path / "nanoiot.log", tmp_path / "twistd.pid"
    command = [TWISTD, f"--logfile={log_file}", f"--pidfile={pid_file}", "nanoiot",
               "--host", "127.0.0.1", "--http-port", str(free_port()), "--mqtt-port", str(free_port()),
               "--coap-port", "0", "--database", f"sqlite:///{tmp_path / 'nanoiot.db'}",
               "--jwt-key-file", str(tmp_path / "nanoiot.key")]
    started = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr  # twistd forked the daemon and returned
    try:
        await until(lambda: log_file.exists() and "is ready" in log_file.read_text(), 30, "the ready line in the log")
        pid = int(pid_file.read_text().strip())
        # logrotate's postrotate: SIGUSR1 moves the file aside and the daemon writes a new one.
        os.kill(pid, signal.SIGUSR1)
        rotated = tmp_path / "nanoiot.log.1"
        await until(rotated.exists, 30, "the log file rotated on SIGUSR1")
        os.kill(pid, signal.SIGTERM)
        await until(lambda: not pid_file.exists(), 30, "the daemon to stop and remove its pid file")
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
    text = rotated.read_text() + log_file.read_text()
    assert "[nanoiot#info] NanoIoT" in rotated.read_text() and "Traceback" not in text
