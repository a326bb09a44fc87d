"""The `dlmin` command line: one Typer app, commands registered by group.

Heavy libraries (NumPy, SciPy, h5py, pydantic) are imported inside the
commands so that `dlmin --help` answers at once.
"""

from __future__ import annotations

import sys

import typer

from . import (
    collapsecmd,
    gathercmd,
    plotcmd,
    predictcmd,
    runcmd,
    showcmd,
    speccmd,
    truncatecmd,
)
from .common import EXIT_INTERRUPTED, err_console

app = typer.Typer(
    name="dlmin",
    help="Explicit minimizers, gradient flows, trapping and neural collapse of ReLU "
    "networks, as experiments you can run, sweep, store and inspect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

runcmd.register(app)
collapsecmd.register(app)
speccmd.register(app)
showcmd.register(app)
predictcmd.register(app)
gathercmd.register(app)
plotcmd.register(app)
truncatecmd.register(app)


def _version(value: bool):
    if value:
        from importlib.metadata import version

        print(f"dlmin {version('dlmin')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
):
    """Explicit minimizers, gradient flows, trapping and neural collapse."""


def main():
    """Console entry point: Ctrl-C exits 130 with no traceback."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted; no partial file was left as complete")
        sys.exit(EXIT_INTERRUPTED)
