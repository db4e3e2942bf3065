"""twistd plugin: ``twistd -n nanoiot [options]``. Only wiring lives here; the service is nanoiot.service."""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


def _fail(message: str, code: int) -> None:
    """One line and a non-zero exit: an operator needs the reason, not a traceback or the whole usage text."""
    sys.stderr.write(f"nanoiot: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def _env(name: str) -> str:
    return "NANOIOT_" + name.upper().replace("-", "_")


def _parameters() -> list[list[Any]]:
    from nanoiot.config import OPTIONS

    return [
        [opt.name, None, None, f"{opt.help} [default {opt.default}; env {_env(opt.name)}]"]
        for opt in OPTIONS
        if not opt.flag
    ]


def _flags() -> list[list[Any]]:
    """Booleans that default to off are bare flags (``--demo``); the others (``--gc-freeze false``) take a value."""
    from nanoiot.config import OPTIONS

    return [[opt.name, None, f"{opt.help} [env {_env(opt.name)}]"] for opt in OPTIONS if opt.flag]


class Options(usage.Options):
    optFlags = _flags()
    optParameters = _parameters()
    config: Any = None

    def parseOptions(self, options: Any = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as exc:
            _fail(f"{exc} (see twistd nanoiot --help)", 2)

    def postOptions(self) -> None:
        from nanoiot.config import OPTIONS, Config
        from nanoiot.errors import ConfigError

        # An absent flag is "not given" (None), so that its NANOIOT_* variable can still turn it on.
        given = {opt.name: (True if self[opt.name] else None) if opt.flag else self.get(opt.name) for opt in OPTIONS}
        try:
            self.config = Config.from_sources(given)
        except ConfigError as exc:
            _fail(str(exc), 2)


def _log_target(twistd_options: Any, config: Any) -> Any:
    """What twistd's own options say about logging (--logfile, --syslog, --prefix, -n), for the service's
    observer, with our rotation settings."""
    from nanoiot.logs import LogTarget

    if twistd_options is None:
        return None
    prefix = twistd_options.get("prefix") or "nanoiot"
    return LogTarget(logfile=twistd_options.get("logfile"), syslog=bool(twistd_options.get("syslog")),
                     daemon=not twistd_options.get("nodaemon"), prefix="nanoiot" if prefix == "twisted" else prefix,
                     rotate_length=config.log_rotate_length, max_rotated=config.log_max_rotated)


@implementer(IServiceMaker, IPlugin)
class NanoServiceMaker:
    tapname = "nanoiot"
    description = "NanoIoT device-command (RPC) server: REST API, MQTT devices, ThingsBoard-compatible"
    options = Options

    def makeService(self, options: Options) -> Any:
        from twisted.internet import reactor

        from nanoiot.errors import ConfigError
        from nanoiot.persistence.bootstrap import check_database
        from nanoiot.service import NanoService

        config = options.config
        try:
            check_database(config.database)
            service = NanoService(config, reactor)
            service.stop_reactor_on_failure = True
            service.log_target = _log_target(getattr(options, "parent", None), config)
        except ConfigError as exc:
            _fail(str(exc), 1)

        def exit_if_failed() -> None:
            if service.failed:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)

        reactor.addSystemEventTrigger("after", "shutdown", exit_if_failed)
        return service


serviceMaker = NanoServiceMaker()
