"""``nanoiot``: the console script. ``nanoiot run [options]`` is ``twistd -n nanoiot [options]``;
``nanoiot run --processes N [options]`` runs N such servers as the nodes of one cluster on this host."""

from __future__ import annotations

import os
import socket
import sys
from typing import Mapping, Sequence

import click

from nanoiot import __version__


@click.group()
@click.version_option(__version__, prog_name="nanoiot")
def main() -> None:
    """NanoIoT device-command (RPC) server."""


def _twistd() -> str:
    return os.path.join(os.path.dirname(sys.executable), "twistd")


def _server_command(twistd: str, options: Sequence[str]) -> list[str]:
    return [twistd, "-n", "--pidfile=", "nanoiot", *options]


def _take_option(options: list[str], name: str) -> str | None:
    """Remove every ``--name value`` / ``--name=value`` from ``options``; the last value given (as twistd keeps)."""
    value, kept, i = None, [], 0
    while i < len(options):
        arg = options[i]
        if arg == f"--{name}" and i + 1 < len(options):
            value, i = options[i + 1], i + 2
            continue
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        else:
            kept.append(arg)
        i += 1
    options[:] = kept
    return value


def _option_value(options: Sequence[str], name: str) -> str | None:
    return _take_option(list(options), name)


def cluster_commands(
    twistd: str, options: Sequence[str], processes: int, environ: Mapping[str, str], hostname: str | None = None
) -> list[list[str]]:
    """One twistd command per node: the given options plus ``--cluster --reuse-port --node-id <base>-<i>``.

    ``<base>`` is the ``--node-id`` given (option or NANOIOT_NODE_ID), else ``<host name>:<HTTP port>``, so that
    the nodes' names stay unique across the hosts of a cluster and stable across restarts.
    """
    rest = list(options)
    base = _take_option(rest, "node-id") or environ.get("NANOIOT_NODE_ID")
    if not base:
        port = _option_value(rest, "http-port") or environ.get("NANOIOT_HTTP_PORT") or "8080"
        base = f"{hostname or socket.gethostname()}:{port}"
    flags = [flag for flag in ("--cluster", "--reuse-port") if flag not in rest]
    return [_server_command(twistd, [*rest, *flags, "--node-id", f"{base}-{i}"]) for i in range(1, processes + 1)]


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="run this many cluster nodes sharing the ports (needs a PostgreSQL --database)")
@click.argument("options", nargs=-1, type=click.UNPROCESSED)
def run(processes: int, options: tuple[str, ...]) -> None:
    """Run the server in the foreground (options as for twistd nanoiot, see --help)."""
    twistd = _twistd()
    if processes == 1:
        os.execv(twistd, _server_command(twistd, options))
    else:
        from nanoiot.supervisor import Supervisor

        raise SystemExit(Supervisor(cluster_commands(twistd, options, processes, os.environ)).run())


if __name__ == "__main__":  # pragma: no cover
    main()
