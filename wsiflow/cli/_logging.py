"""Logging set-up: the CLI is the only place that configures loggers (DESIGN §4).

Library modules only create loggers (``logging.getLogger(__name__)``); what reaches
stderr, and how loud Dask and the slide readers are, is decided here.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["configure", "quiet_dask", "quiet_readers"]

# libraries that log what wsiflow already reports in one line per slide or tile
_READER_LOGGERS = ("tifffile", "tiffslide", "asyncio")


def configure(debug: bool) -> None:
    """Root logging to stderr: WARNING, or DEBUG with ``--debug``."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def quiet_readers(debug: bool) -> None:
    """Silence the slide readers' own warnings unless ``--debug``."""
    if not debug:
        for name in _READER_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)


@contextmanager
def quiet_dask(debug: bool) -> Iterator[None]:
    """Dask configures ``distributed`` at INFO; keep its chatter (a traceback per failed
    task, which the runner reports in one line) off stderr unless ``--debug``."""
    logger = logging.getLogger("distributed")
    before = logger.level
    logger.setLevel(logging.WARNING if debug else logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(before)
