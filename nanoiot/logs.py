"""Structured, quiet-by-default logging: our events at the chosen level, Twisted's chatter only when it matters.

In a cluster several nodes often write to one terminal or one collector, so each line can carry its node's name.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LegacyLogObserverWrapper,
    LogLevelFilterPredicate,
    eventAsJSON,
    formatEventAsClassicLogText,
    formatTime,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.logger._flatten import flattenEvent
from twisted.python.logfile import LogFile

_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error,
           "critical": LogLevel.critical}


_QUIETER = ("warn", "error", "critical")


def _text_with_node(stream: IO[str], node: str) -> FileLogObserver:
    """Twisted's classic text line with ``[node]`` after the timestamp: ``<time> [node-1] [namespace#level] text``."""

    def format_event(event: Any) -> str | None:
        return formatEventAsClassicLogText(event, formatTime=lambda when: f"{formatTime(when)} [{node}]")

    return FileLogObserver(stream, format_event)


def _json_with_node(stream: IO[str], node: str) -> FileLogObserver:
    """Twisted's JSON record with a top-level ``"node"``.

    An event may have a ``node`` field of its own ("answer for {node} dropped"); the event is flattened first, so
    that its message still renders from ``log_flattened`` once ``"node"`` names the node that wrote the line.
    """

    def format_event(event: Any) -> str:
        record = dict(event)
        flattenEvent(record)
        record["node"] = node
        return f"\x1e{eventAsJSON(record)}\n"

    return FileLogObserver(stream, format_event)


@dataclass(frozen=True)
class LogTarget:
    """Where twistd was told to send the log: ``--logfile PATH`` (``-``: standard output), ``--syslog``, or the
    daemon's default ``twistd.log``. Our observer replaces twistd's, so it must honour these itself."""

    logfile: str | None = None
    syslog: bool = False
    daemon: bool = False
    #: twistd's ``--prefix``: the syslog identity.
    prefix: str = "nanoiot"
    #: Bytes after which the file rotates (twistd's own default: 1,000,000; 0: only when asked, by SIGUSR1).
    rotate_length: int = 1_000_000
    #: Rotated files kept (0: all), as twistd's LogFile counts them.
    max_rotated: int = 0

    def open(self) -> IO[str] | None:
        """The stream to write to (None: standard output); a file rotates as twistd's own log does: by size, and
        on SIGUSR1 (see :func:`rotate_on_signal`)."""
        name = self.logfile or ("twistd.log" if self.daemon else None)
        if not name or name == "-":
            return None
        return LogFile.fromFullPath(os.path.abspath(name), rotateLength=self.rotate_length or None,  # type: ignore
                                    maxRotatedFiles=self.max_rotated or None)

    def syslog_observer(self) -> ILogObserver:
        """twistd's ``--syslog`` destination (the system's syslog under ``--prefix``), as a new-style observer so
        that our level filter sits in front of it."""
        from twisted.python.syslog import SyslogObserver

        legacy = LegacyLogObserverWrapper(SyslogObserver(self.prefix).emit)

        def observe(event: Any) -> None:
            # The legacy line shows "[system]": make that the namespace, as our text lines show it.
            legacy({**event, "log_system": event.get("log_system") or event.get("log_namespace", "-")})

        return observe


def rotate_on_signal(logfile: Any, reactor: Any, signum: int = signal.SIGUSR1) -> None:
    """``kill -USR1`` rotates the log file, as it does for twistd's own log (for logrotate's ``postrotate``)."""
    signal.signal(signum, lambda *_: reactor.callFromThread(logfile.rotate))


def make_observer(level: str = "info", fmt: str = "text", stream: IO[str] | None = None,
                  node: str = "", base: ILogObserver | None = None) -> ILogObserver:
    """The process's log observer; ``node`` (the cluster node name, empty outside a cluster) goes on every line.
    ``base``: where filtered events go instead of a stream (syslog)."""
    stream = stream or sys.stdout
    if base is None and node:
        base = _json_with_node(stream, node) if fmt == "json" else _text_with_node(stream, node)
    elif base is None:
        base = jsonFileLogObserver(stream) if fmt == "json" else textFileLogObserver(stream)
    predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[level])
    if level != "debug":
        # Twisted's own start/stop lines and legacy log.msg calls are noise for an operator.
        for namespace in ("log_legacy", "twisted", "twisted.web", "twisted.internet", "autobahn"):
            predicate.setLogLevelForNamespace(namespace, _LEVELS[level] if level in _QUIETER else LogLevel.warn)
    return FilteringLogObserver(base, [predicate])
