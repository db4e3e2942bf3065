"""``nanoiot``: the console script. ``nanoiot run [options]`` is ``twistd -n nanoiot [options]``;
``nanoiot run --processes N [options]`` runs N such servers as the nodes of one cluster on this host."""

from __future__ import annotations

import os
import socket
import sys
from typing import Callable, Mapping, Sequence

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


@main.group()
@click.option("--database", metavar="URL", default=None,
              help="SQLAlchemy URL, as the server's --database (default: $NANOIOT_DATABASE, else sqlite:///nanoiot.db)")
@click.pass_context
def db(ctx: click.Context, database: str | None) -> None:
    """The database schema (Alembic revisions): upgrade, current, history."""
    from nanoiot.config import Config
    from nanoiot.errors import ConfigError

    try:
        ctx.obj = Config.from_sources({"database": database}).database
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _schema_command(action: Callable[[], str]) -> None:
    from nanoiot.errors import ConfigError

    try:
        click.echo(action())
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@db.command()
@click.pass_obj
def upgrade(url: str) -> None:
    """Create the schema, or upgrade it to the head revision (the server also does this at start)."""
    from nanoiot.persistence import bootstrap

    def action() -> str:
        done = bootstrap.upgrade_database(url)
        if done.found is None:
            return f"Created the schema at revision {done.head}"
        if done.found == done.head:
            return f"Already at revision {done.head} (head)"
        was = f"schema version {done.legacy}" if done.legacy is not None else f"revision {done.found}"
        return f"Upgraded from {was} to revision {done.head}"

    _schema_command(action)


@db.command()
@click.pass_obj
def current(url: str) -> None:
    """Print the database's revision."""
    from nanoiot.persistence import bootstrap

    _schema_command(lambda: bootstrap.describe_current(url))


@db.command()
def history() -> None:
    """List the revisions this NanoIoT knows, newest first."""
    from nanoiot.persistence import bootstrap

    _schema_command(lambda: "\n".join(bootstrap.history()))


@db.command()
@click.option("-m", "--message", required=True, help="what the revision changes (also its file name)")
@click.option("--autogenerate", is_flag=True, help="draft it from schema.py's Tables vs. the database (at head)")
@click.pass_obj
def revision(url: str, message: str, autogenerate: bool) -> None:
    """For developers: write the next revision file into nanoiot/persistence/migrations/versions/."""
    from nanoiot.persistence import bootstrap

    _schema_command(lambda: f"Wrote {bootstrap.new_revision(url, message, autogenerate)}")


if __name__ == "__main__":  # pragma: no cover
    main()
