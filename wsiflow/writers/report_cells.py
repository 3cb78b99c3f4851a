"""The cells a report needs, read from a cell store without loading every polygon.

:func:`read_cell_columns` reads a few numpy columns (centroid, bbox, area, class,
probabilities, id) of the committed cells of done tiles; :meth:`CellColumns.polygons`
then reads the vertices of chosen cells only. :func:`select_gallery` picks example cells
per class and :func:`densest_window` the region worth zooming into, both vectorised.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsiflow.writers.zarr_store import CellStore

__all__ = [
    "GALLERY_PER_KIND",
    "CellColumns",
    "Gallery",
    "densest_window",
    "read_cell_columns",
    "select_gallery",
]

GALLERY_PER_KIND = 6  # most confident + borderline: ≤ 12 cells per class
_BLOCK = 1 << 16  # cells per block of the vectorised per-cell steps


@dataclass(frozen=True)
class CellColumns:
    """The per-cell columns the report needs (no polygons), committed cells of done tiles."""

    path: Path
    row: NDArray[np.int64]  # index into the stored arrays (for reading polygons later)
    id: NDArray[np.int64]
    x: NDArray[np.float64]
    y: NDArray[np.float64]
    bbox: NDArray[np.float64]
    area_um2: NDArray[np.float32]
    class_id: NDArray[np.int16]
    probs: NDArray[np.float32]

    def __len__(self) -> int:
        return len(self.id)

    def polygons(self, index: NDArray[np.integer]) -> list[NDArray[np.float32]]:
        """Polygons (level-0 px) of the cells at ``index``; reads only their vertices."""
        idx = np.asarray(index, np.int64)
        if idx.size == 0:
            return []
        return CellStore.open(self.path).polygons(self.row[idx])


def read_cell_columns(path: str | os.PathLike[str]) -> tuple[dict[str, Any], CellColumns]:
    """Attributes and report columns of a cell store (read-only; nothing is rolled back)."""
    p = Path(path)
    store = CellStore.open(p)  # read-only; validates the format
    row = store.kept_rows()
    c = store.read_columns(("id", "x", "y", "bbox", "area_um2", "class_id", "probs"), rows=row)
    cols = CellColumns(path=p, row=row, **c)
    return store.attrs, cols


@dataclass(frozen=True)
class Gallery:
    """Indices (into the columns) of example cells per class index."""

    top: dict[int, NDArray[np.int64]]
    borderline: dict[int, NDArray[np.int64]]

    def all_indices(self) -> NDArray[np.int64]:
        parts = [*self.top.values(), *self.borderline.values()]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def select_gallery(
    class_id: NDArray[np.integer],
    probs: NDArray[np.floating],
    n_classes: int,
    per_kind: int = GALLERY_PER_KIND,
) -> Gallery:
    """Per class: the ``per_kind`` most confident cells and the ``per_kind`` borderline ones.

    Confidence is the probability of the assigned class; borderline cells are the others of
    that class with the smallest margin to the runner-up class. Ties break on row order,
    so the choice is deterministic. Cost: a few vectorised passes over the columns.
    """
    cid = np.asarray(class_id, np.int64)
    top: dict[int, NDArray[np.int64]] = {}
    border: dict[int, NDArray[np.int64]] = {}
    if cid.size == 0 or probs.shape[1] == 0:
        return Gallery(
            {k: np.zeros(0, np.int64) for k in range(n_classes)},
            {k: np.zeros(0, np.int64) for k in range(n_classes)},
        )
    valid = cid >= 0
    conf = np.zeros(len(cid), np.float32)
    conf[valid] = probs[np.flatnonzero(valid), cid[valid]]
    if probs.shape[1] > 1:
        margin = np.empty(len(conf), np.result_type(conf, probs))
        for a in range(0, len(cid), _BLOCK):  # the partitioned copy of one block at a time
            part = np.partition(probs[a : a + _BLOCK], probs.shape[1] - 2, axis=1)
            c = conf[a : a + _BLOCK]
            margin[a : a + _BLOCK] = c - np.where(part[:, -1] >= c, part[:, -2], part[:, -1])
    else:
        margin = conf.copy()
    for k in range(n_classes):
        members = np.flatnonzero(cid == k)
        top[k] = _smallest(-conf, members, per_kind)
        rest = members[~np.isin(members, top[k])] if members.size > per_kind else members[:0]
        border[k] = _smallest(margin, rest, per_kind)
    return Gallery(top, border)


def _smallest(keys: NDArray[np.floating], idx: NDArray[np.int64], k: int) -> NDArray[np.int64]:
    """The ``k`` entries of ``idx`` with the smallest ``keys`` (ties: lower index first).

    A partition finds the k-th key, so only the candidates at or below it are sorted.
    """
    idx = np.asarray(idx, np.int64)
    if k <= 0 or idx.size == 0:
        return np.zeros(0, np.int64)
    vals = keys[idx]
    if idx.size > k:
        kth = np.partition(vals, k - 1)[k - 1]
        keep = vals <= kth
        idx, vals = idx[keep], vals[keep]
    return idx[np.lexsort((idx, vals))][:k].astype(np.int64)


def densest_window(
    x: NDArray[np.float64], y: NDArray[np.float64], size: tuple[float, float], dims: tuple[int, int]
) -> tuple[float, float]:
    """Top-left (level-0) of a ``size`` window holding the most cell centroids (half-window steps)."""
    ww, wh = size
    W, H = dims
    if len(x) == 0:
        return max(0.0, (W - ww) / 2), max(0.0, (H - wh) / 2)
    bx, by = ww / 2, wh / 2
    nx, ny = max(1, math.ceil(W / bx)), max(1, math.ceil(H / by))
    hist = np.zeros((ny, nx))
    for a in range(0, len(x), _BLOCK):  # counts add up: one block's temporaries at a time
        part, _, _ = np.histogram2d(
            y[a : a + _BLOCK], x[a : a + _BLOCK], bins=(ny, nx), range=((0, ny * by), (0, nx * bx))
        )
        hist += part
    if ny > 1 and nx > 1:
        win = hist[:-1, :-1] + hist[1:, :-1] + hist[:-1, 1:] + hist[1:, 1:]
    elif ny > 1:
        win = hist[:-1] + hist[1:]
    elif nx > 1:
        win = hist[:, :-1] + hist[:, 1:]
    else:
        win = hist
    iy, ix = np.unravel_index(int(np.argmax(win)), win.shape)
    x0 = min(ix * bx, max(0.0, W - ww)) if W > ww else (W - ww) / 2
    y0 = min(iy * by, max(0.0, H - wh)) if H > wh else (H - wh) / 2
    return float(x0), float(y0)
