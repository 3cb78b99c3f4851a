"""The ``wsiflow`` console script.

Each sub-command lives in its own module and registers itself on :data:`app`
(:mod:`wsiflow.cli._app`); heavy imports (torch, dask) happen inside the command
functions, so ``wsiflow info`` stays fast. This is the one place where an error becomes
an exit code: a :class:`~wsiflow.errors.WsiflowError` is one line on stderr (exit 2 for
usage and config errors, 1 otherwise), any other exception one "internal error" line
(exit 1); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import typer

from wsiflow.cli._app import app
from wsiflow.errors import ConfigError, WsiflowError

__all__ = ["app", "main"]


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


def _debug_requested(argv: Sequence[str]) -> bool:
    """``--debug`` among the root options (before the command name)."""
    for arg in argv:
        if arg == "--debug":
            return True
        if not arg.startswith("-"):
            return False
    return False


def main() -> None:
    _register()
    debug = _debug_requested(sys.argv[1:])
    try:
        app()
    except WsiflowError as exc:
        if debug:
            raise
        typer.echo(f"wsiflow: error: {' '.join(str(exc).split())}", err=True)
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    except KeyboardInterrupt:
        typer.echo("wsiflow: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        reason = " ".join(str(exc).split())
        typer.echo(f"wsiflow: error: internal error: {type(exc).__name__}: {reason}", err=True)
        sys.exit(1)
