"""Atomic file writes: write to a temporary name in the same folder, fsync, rename.

A reader (or a resumed run) therefore sees either the previous file or the complete new
one, never a half-written file, even if the process is killed mid-write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from wsiflow.errors import OutputError

__all__ = ["atomic_open", "atomic_write_bytes", "fsync_dir", "output_error"]


def output_error(path: str | os.PathLike[str], exc: OSError) -> OutputError:
    """One-line OutputError naming the path; keeps the errno (e.g. ENOSPC)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        reason += "; free some space, then rerun with --resume"
    err = OutputError(f"{os.fspath(path)}: cannot write ({reason})")
    err.errno = exc.errno
    return err


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


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], fsync: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file; on success it replaces ``path`` atomically, on error it vanishes."""
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise output_error(target, exc) from exc
    ok = False
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
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


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, fsync: bool = True) -> None:
    with atomic_open(path, fsync=fsync) as f:
        f.write(data)
