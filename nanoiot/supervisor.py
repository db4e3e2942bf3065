"""A small process supervisor for ``nanoiot run --processes N``: N nodes of one cluster on one host.

Python runs one thread of Python at a time, so one host's cores are used by several processes, each a cluster node
sharing the ports (SO_REUSEPORT) and the PostgreSQL database. The supervisor only keeps them running: it relays
their output (their log lines already name their node), restarts one that dies after a back-off, forwards
SIGTERM/SIGINT (and SIGHUP) and waits for them; a node that exits at once with code 2 has a bad configuration,
which a restart cannot fix, so then everything stops with code 2.

Standard library only: a thread waits for each child and two relay its output; the main thread owns every
decision, fed by one queue (``SimpleQueue.put`` is safe in a signal handler).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any, Mapping, Sequence

#: twistd exits with 2 when the options or the configuration are wrong (twisted/plugins/nanoiot_plugin.py).
CONFIG_ERROR = 2
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass
class Backoff:
    """Delay before restarting a child: ``first``, doubling up to ``most``; a child that ran ``stable`` seconds or
    more starts again from ``first`` (it was not crashing in a loop)."""

    first: float = 1.0
    most: float = 30.0
    stable: float = 60.0
    current: float = 0.0

    def next_delay(self, ran_for: float) -> float:
        if not self.current or ran_for >= self.stable:
            self.current = self.first
        delay = self.current
        self.current = min(self.current * 2, self.most)
        return delay


@dataclass
class _Child:
    index: int
    command: list[str]
    backoff: Backoff
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float | None = None
    threads: list[threading.Thread] = field(default_factory=list)


class Supervisor:
    """Runs ``commands`` (one child process each) until a stop signal or a configuration error.

    ``run()`` returns the exit code for the supervisor itself: 0 after a stop signal, 2 when a child reported a bad
    configuration, 1 when a child could not be started at all.
    """

    def __init__(
        self,
        commands: Sequence[Sequence[str]],
        *,
        env: Mapping[str, str] | None = None,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        stable_after: float = 60.0,
        config_error_window: float = 10.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self.children = [
            _Child(i, list(command), Backoff(backoff, max_backoff, stable_after)) for i, command in enumerate(commands, 1)
        ]
        # Children's output goes through pipes: unbuffered, so that a line is relayed when it is written.
        self.env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.config_error_window = config_error_window
        self.stop_timeout = stop_timeout
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._output_lock = threading.Lock()
        self._stopping = False
        self._signum: int = signal.SIGTERM

    # -- public -------------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Start every child and supervise them; returns the supervisor's exit code once they have all stopped."""
        previous = self._install_signal_handlers()
        try:
            try:
                for child in self.children:
                    self._start(child)
            except OSError as exc:
                self._say(f"cannot start {exc.filename or 'a child'}: {exc.strerror or exc}")
                return 1
            return self._supervise()
        finally:
            self._stop_all()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop (the children get ``signum``); safe from a signal handler or another thread."""
        self._events.put(("stop", signum))

    # -- the main thread's loop -----------------------------------------------------------------------------------

    def _supervise(self) -> int:
        while True:
            waiting = [c.restart_at for c in self.children if c.restart_at is not None]
            timeout = max(0.0, min(waiting) - time.monotonic()) if waiting else None
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                self._restart_due()
                continue
            if event[0] == "stop":
                # twistd stops cleanly on SIGTERM and SIGINT; SIGHUP (the terminal went away) would just kill it.
                self._signum = event[1] if event[1] in (signal.SIGTERM, signal.SIGINT) else signal.SIGTERM
                return 0
            _, child, process, code = event
            if process is not child.process:
                continue
            ran_for = time.monotonic() - child.started
            child.process = None
            if code == CONFIG_ERROR and ran_for < self.config_error_window:
                self._say(f"node {child.index} exited with code {code} at start (bad configuration?): stopping all")
                return CONFIG_ERROR
            delay = child.backoff.next_delay(ran_for)
            child.restart_at = time.monotonic() + delay
            self._say(f"node {child.index} (pid {process.pid}) exited with code {code} after {ran_for:.1f} s; "
                      f"restarting in {delay:g} s")

    def _restart_due(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.restart_at is not None and child.restart_at <= now:
                child.restart_at = None
                try:
                    self._start(child)
                except OSError as exc:
                    delay = child.backoff.next_delay(0.0)
                    child.restart_at = time.monotonic() + delay
                    self._say(f"cannot restart node {child.index}: {exc}; trying again in {delay:g} s")

    def _start(self, child: _Child) -> None:
        process = subprocess.Popen(
            child.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which forwards it once.
            process_group=0,
        )
        child.process, child.started = process, time.monotonic()
        child.threads = [
            threading.Thread(target=self._relay, args=(process.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._relay, args=(process.stderr, self.stderr), daemon=True),
            threading.Thread(target=self._wait, args=(child, process), daemon=True),
        ]
        for thread in child.threads:
            thread.start()

    def _stop_all(self) -> None:
        """Forward the stop signal to the running children, wait for them, kill the ones that outstay the timeout."""
        self._stopping = True
        signum = self._signum
        running = [c for c in self.children if c.process is not None and c.process.poll() is None]
        for child in running:
            assert child.process is not None
            _signal(child.process, signum)
        deadline = time.monotonic() + self.stop_timeout
        for child in running:
            assert child.process is not None
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._say(f"node {child.index} (pid {child.process.pid}) did not stop in {self.stop_timeout:g} s: "
                          "killing it")
                _signal(child.process, signal.SIGKILL)
                child.process.wait()
        for child in self.children:
            for thread in child.threads:
                thread.join(timeout=5)  # the last lines a stopping node wrote

    # -- threads and signal handlers --------------------------------------------------------------------------------

    def _wait(self, child: _Child, process: subprocess.Popen[bytes]) -> None:
        self._events.put(("exit", child, process, process.wait()))

    def _relay(self, pipe: IO[bytes], target: IO[str]) -> None:
        with pipe:
            for line in iter(pipe.readline, b""):
                text = line.decode("utf-8", "replace")
                if not text.endswith("\n"):
                    text += "\n"
                with self._output_lock:
                    try:
                        target.write(text)
                        target.flush()
                    except (OSError, ValueError):
                        pass  # our own output is gone: keep draining, or the child blocks on a full pipe

    def _say(self, message: str) -> None:
        with self._output_lock:
            self.stderr.write(f"nanoiot supervisor: {message}\n")
            self.stderr.flush()

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}  # embedded (tests): stop() is the way in
        return {signum: signal.signal(signum, self._on_signal) for signum in _STOP_SIGNALS}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stopping:
            # A second signal while the nodes stop: do not wait for them.
            for child in self.children:
                if child.process is not None:
                    _signal(child.process, signal.SIGKILL)
            return
        self.stop(signum)


def _signal(process: subprocess.Popen[bytes], signum: int) -> None:
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        pass
