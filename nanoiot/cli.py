"""``nanoiot``: the console script. ``nanoiot run [options]`` is ``twistd -n nanoiot [options]``."""

from __future__ import annotations

import os
import sys

import click

from nanoiot import __version__


@click.group()
@click.version_option(__version__, prog_name="nanoiot")
def main() -> None:
    """NanoIoT device-command (RPC) server."""


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("options", nargs=-1, type=click.UNPROCESSED)
def run(options: tuple[str, ...]) -> None:
    """Run the server in the foreground (options as for twistd nanoiot, see --help)."""
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    argv = [twistd, "-n", "--pidfile=", "nanoiot", *options]
    os.execv(twistd, argv)


if __name__ == "__main__":  # pragma: no cover
    main()
