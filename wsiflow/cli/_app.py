"""The typer application object and the root options (``--debug``, ``--version``).

Command modules import :data:`app` from here and register on it; :mod:`wsiflow.cli.app`
imports the command modules and runs :data:`app`, so no command module imports another
and none imports :mod:`wsiflow.cli.app`. ``--debug`` is kept on the click context of the
invocation (:func:`debug_enabled`), not in a module global.
"""

from __future__ import annotations

from dataclasses import dataclass

import click
import typer

from wsiflow._version import __version__
from wsiflow.cli._logging import configure as configure_logging

__all__ = ["CliState", "app", "debug_enabled"]

app = typer.Typer(
    name="wsiflow",
    help="Bone-marrow aspirate slides → cell-level evidence for MDS. Research use only.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@dataclass(frozen=True)
class CliState:
    debug: bool = False


def _version(value: bool) -> None:
    if value:
        typer.echo(f"wsiflow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True),
) -> None:
    ctx.obj = CliState(debug=debug)
    configure_logging(debug)


def debug_enabled() -> bool:
    """Whether this invocation was given ``--debug`` (False outside a command)."""
    ctx = click.get_current_context(silent=True)
    state = ctx.find_root().obj if ctx is not None else None
    return isinstance(state, CliState) and state.debug
