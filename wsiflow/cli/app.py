"""The ``wsiflow`` console script.

Each sub-command lives in its own module and registers itself on :data:`app`; heavy
imports (torch, dask) happen inside the command functions, so ``wsiflow info`` stays fast.
A :class:`~wsiflow.errors.WsiflowError` becomes one line on stderr (exit 2 for usage and
config errors, 1 otherwise); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys

import typer

from wsiflow._version import __version__
from wsiflow.errors import ConfigError, WsiflowError

app = typer.Typer(
    name="wsiflow",
    help="Bone-marrow aspirate slides → cell-level evidence for MDS. Research use only.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"wsiflow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True),
) -> None:
    _state["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def debug_enabled() -> bool:
    return bool(_state["debug"])


def _register() -> None:
    # Importing a command module registers its commands on ``app``.
    from wsiflow.cli import (
        compare,  # noqa: F401
        demo,  # noqa: F401
        evaluate,  # noqa: F401
        explain,  # noqa: F401
        info,  # noqa: F401
        lab,  # noqa: F401
        pipeline,  # noqa: F401
        report,  # noqa: F401
        run,  # noqa: F401
        synth,  # noqa: F401
        train,  # noqa: F401
    )


def main() -> None:
    _register()
    try:
        app()
    except WsiflowError as exc:
        if debug_enabled():
            raise
        typer.echo(f"wsiflow: error: {exc}", err=True)
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    except KeyboardInterrupt:
        typer.echo("wsiflow: interrupted", err=True)
        sys.exit(130)
