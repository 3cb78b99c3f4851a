"""Safe, unique per-slide output folders inside OUT.

A slide's folder name comes from its file stem with every character outside
``[A-Za-z0-9._-]`` replaced by ``_`` (so no ``/``, ``..`` or absolute path can come
through), a leading dot or dash removed, and the length capped. When two slides give the
same name (same stem in different folders, or names that differ only in replaced
characters), every slide after the first gets a suffix with a short hash of its resolved
path, so outputs never overwrite each other and the same slide always maps to the same
folder. The result is checked to lie inside OUT.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import MutableSet
from pathlib import Path

from wsiflow.errors import OutputError

__all__ = ["safe_name", "slide_output_dir", "slide_stem"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 80
_MULTI_EXT = (".ome.tiff", ".ome.tif", ".ome.zarr")


def slide_stem(slide_path: str | os.PathLike[str]) -> str:
    """File name without its extension (``a.ome.tiff`` → ``a``); URLs use their last part."""
    text = os.fspath(slide_path)
    if "://" in text:
        text = text.split("://", 1)[1].split("?", 1)[0].rstrip("/")
    name = text.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    low = name.lower()
    for ext in _MULTI_EXT:
        if low.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    stem, dot, _ = name.rpartition(".")
    return stem if dot and stem else name


def safe_name(text: str) -> str:
    """``text`` reduced to ``[A-Za-z0-9._-]``, never empty, ``.``/``..`` or hidden."""
    name = _UNSAFE.sub("_", text).strip("._-")
    name = re.sub(r"\.{2,}", ".", name)[:MAX_NAME].strip("._-")
    return name or "slide"


def _path_hash(slide_path: str | os.PathLike[str]) -> str:
    text = os.fspath(slide_path)
    if "://" not in text:
        try:
            text = str(Path(text).resolve())
        except OSError:
            text = os.path.abspath(text)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def slide_output_dir(
    out: str | os.PathLike[str], slide_path: str | os.PathLike[str], taken: MutableSet[str]
) -> Path:
    """A folder under ``out`` for this slide; its name is added to ``taken``.

    ``taken`` holds the names already given in this run (compared case-insensitively, so
    outputs stay apart on case-insensitive file systems too).
    """
    root = Path(out).resolve()
    base = safe_name(slide_stem(slide_path))
    used = {t.lower() for t in taken}
    name = base
    if name.lower() in used:
        name = f"{base}-{_path_hash(slide_path)}"
        i = 2
        while name.lower() in used:
            name = f"{base}-{_path_hash(slide_path)}-{i}"
            i += 1
    target = (root / name).resolve()
    if target.parent != root:
        raise OutputError(f"{slide_path}: output folder {target} would lie outside {root}")
    taken.add(name)
    return target
