"""The WsiflowError hierarchy.

Every error a user can trigger derives from :class:`WsiflowError` and carries a one-line
message; the CLI prints ``str(error)`` and never a traceback (unless ``--debug``). Where a
builtin matches, the error also inherits it (``SlideNotFound`` is a ``FileNotFoundError``).
"""

from __future__ import annotations

from os import PathLike


class WsiflowError(Exception):
    """Base class of every error wsiflow raises on purpose."""


class ConfigError(WsiflowError, ValueError):
    """A pipeline or option is invalid; the message names the bad key."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {reason}" if key else f"{where}{reason}")

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, str, str]]:
        # Picklable, so Dask can return it from a worker.
        return (type(self), (self.source, self.key, self.reason))


class SlideError(WsiflowError):
    """A slide cannot be opened or read. One type for every backend failure."""

    def __init__(self, path: str | PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = " ".join(str(reason).split()) or "unknown error"
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self) -> tuple[type[SlideError], tuple[str, str]]:
        # Picklable, so Dask can return it from a worker.
        return (type(self), (self.path, self.reason))


class SlideNotFound(SlideError, FileNotFoundError):
    """The slide path does not exist."""


class MppError(SlideError):
    """The slide has no trustworthy µm/px and none was supplied."""


class ModelError(WsiflowError):
    """A model bundle is missing, unsafe, or does not match the pipeline."""


class BundleIntegrityError(ModelError):
    """A bundle's sha256 does not match the pin."""


class OutputError(WsiflowError, OSError):
    """An output location cannot be written."""
