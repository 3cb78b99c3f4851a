"""One writer per output folder: an advisory lock on ``OUT/.wsiflow.lock``.

Two runs writing one output (e.g. two ``wsiflow run --resume`` started on the same folder)
would append the same tiles to one Zarr store and rewrite ``summary.csv`` over each other.
:func:`output_lock` takes an exclusive ``flock`` on ``OUT/.wsiflow.lock`` for as long as a
run writes there; a second run refuses with one line naming the folder and the holder's pid.

``flock`` locks belong to the open file, so the kernel releases them when the holder exits,
killed or not: a crashed run never leaves a stale lock behind (the file itself stays; its
content is only the last holder's pid, for the message). Within one process the lock is
re-entrant (the CLI takes it before starting a cluster, the runner again around its work).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from wsiflow.errors import OutputError

__all__ = ["LOCK_NAME", "output_lock"]

LOCK_NAME = ".wsiflow.lock"

_held: dict[str, tuple[int, int]] = {}  # folder → (fd, depth) held by this process
_guard = threading.Lock()


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the output folder's lock; raise :class:`OutputError` when another run holds it."""
    import fcntl

    path = Path(folder) / LOCK_NAME
    key = os.path.realpath(folder)
    with _guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
        else:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(f"{path}: cannot create the lock file ({exc.strerror or exc})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                who = f" (pid {holder})" if holder else ""
                raise OutputError(
                    f"{folder}: another wsiflow run is writing to this output folder{who}; "
                    "wait for it to finish or choose another -o"
                ) from None
            except OSError as exc:
                os.close(fd)
                raise OutputError(f"{path}: cannot lock ({exc.strerror or exc})") from None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            _held[key] = (fd, 1)
    try:
        yield
    finally:
        with _guard:
            fd, depth = _held[key]
            if depth > 1:
                _held[key] = (fd, depth - 1)
            else:
                del _held[key]
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None
