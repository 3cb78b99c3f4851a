"""Atomic file writes: write to a temporary name in the same folder, (fsync,) rename.

A reader (or a resumed run) therefore sees either the previous file or the complete new
one, never a half-written file, even if the process is killed mid-write. This is the one
helper every writer in the package uses:

* :func:`atomic_path` yields a temporary *path* for libraries that write to a path
  themselves (safetensors, PIL, tifffile, pyarrow, ``shutil.copyfile``);
* :func:`atomic_open` yields a binary file object (streamed writers);
* :func:`atomic_write_bytes` writes one ``bytes`` value.

The file ends with the permissions a plain ``open`` would give it (``0o666 & ~umask``;
``mkstemp`` alone makes them 0600). An ``OSError`` becomes one :class:`OutputError`
naming the target (the errno, e.g. ENOSPC, is kept); on any error the temporary file is
removed and ``path`` is left as it was.

Its reading counterparts: :func:`read_json_object` reads a JSON file that must hold an
object (``summary.json``, a model card, store attributes), :func:`read_csv_rows` a CSV file
that must have some columns (labels, manifests), each with one error line naming the file.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from wsiflow.errors import ConfigError, OutputError, WsiflowError

__all__ = ["atomic_open", "atomic_path", "atomic_write_bytes", "fsync_dir", "output_error"]


def output_error(path: str | os.PathLike[str], exc: OSError) -> OutputError:
    """One-line OutputError naming the path; keeps the errno (e.g. ENOSPC)."""
    if isinstance(exc, OutputError):
        return exc
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        reason += "; free some space, then rerun with --resume"
    err = OutputError(f"{os.fspath(path)}: cannot write ({reason})")
    err.errno = exc.errno
    return err


def read_json_object(
    path: str | os.PathLike[str], error: Callable[[str], WsiflowError] = OutputError
) -> dict[str, Any]:
    """The JSON object in the file at ``path``; a file that cannot be read, is not JSON or
    holds something else is one ``error`` line naming it."""
    p = os.fspath(path)
    try:
        data = orjson.loads(Path(p).read_bytes())
    except OSError as exc:
        raise error(f"{p}: cannot read ({exc.strerror or exc})") from None
    except orjson.JSONDecodeError as exc:
        raise error(f"{p}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{p}: expected a JSON object")
    return data


def read_csv_rows(path: Path, required: set[str], problem: str) -> tuple[list[dict[str, str]], set[str]]:
    """The rows of the CSV file at ``path`` and its columns; a file without every column in
    ``required`` is one :class:`ConfigError` naming it, with ``problem`` as the reason."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        if not required <= cols:
            raise ConfigError(str(path), "", problem)
        return list(reader), cols


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename inside it survives a power cut (best effort)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.cache
def _file_mode() -> int:
    """What a plain ``open`` gives a new file under this process's umask (read once)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike[str], *, suffix: str = ".tmp", fsync: bool = True, mkdir: bool = False
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    ``suffix`` ends the temporary name (e.g. ``".tmp.png"`` for a writer that picks its
    format from the name). ``mkdir`` creates the parent folder first.
    """
    target = Path(path)
    try:
        if mkdir:
            target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise output_error(target, exc) from exc
    ok = False
    try:
        yield Path(tmp)
        if fsync:
            _fsync_file(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, target)
        ok = True
    except OSError as exc:
        raise output_error(target, exc) from exc
    finally:
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    if fsync:
        fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], fsync: bool = True, mkdir: bool = False
) -> Iterator[BinaryIO]:
    """Yield a binary file; on success it replaces ``path`` atomically, on error it vanishes."""
    target = Path(path)
    with atomic_path(target, fsync=False, mkdir=mkdir) as tmp:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    if fsync:
        fsync_dir(target.parent)


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes, fsync: bool = True, mkdir: bool = False
) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, fsync=fsync, mkdir=mkdir) as f:
        f.write(data)
