"""Structured, quiet-by-default logging: our events at the chosen level, Twisted's chatter only when it matters."""

from __future__ import annotations

import sys
from typing import IO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)

_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error,
           "critical": LogLevel.critical}


_QUIETER = ("warn", "error", "critical")


def make_observer(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> ILogObserver:
    stream = stream or sys.stdout
    base = jsonFileLogObserver(stream) if fmt == "json" else textFileLogObserver(stream)
    predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[level])
    if level != "debug":
        # Twisted's own start/stop lines and legacy log.msg calls are noise for an operator.
        for namespace in ("log_legacy", "twisted", "twisted.web", "twisted.internet", "autobahn"):
            predicate.setLogLevelForNamespace(namespace, _LEVELS[level] if level in _QUIETER else LogLevel.warn)
    return FilteringLogObserver(base, [predicate])
