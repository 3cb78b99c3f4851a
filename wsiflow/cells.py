"""CellTable: the columnar, numpy-only result of one batch (DESIGN §5).

One row per cell. Polygons are stored ragged: the vertices of cell ``i`` are
``poly_xy[poly_offsets[i]:poly_offsets[i + 1]]`` (level-0 px, open ring: the first
vertex is not repeated). No Python object per cell, so a task's result pickles small and
the client never holds cells as dicts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "COLUMNS",
    "DTYPES",
    "ID_TILE_SHIFT",
    "CellTable",
    "closing_index",
    "make_ids",
    "ragged_take",
]

ID_TILE_SHIFT = 24  # id = tile << 24 | index within tile (≤ 16.7M cells per tile)

COLUMNS: tuple[str, ...] = (
    "id",
    "x",
    "y",
    "bbox",
    "poly_offsets",
    "poly_xy",
    "area_um2",
    "perimeter_um",
    "circularity",
    "seg_score",
    "class_id",
    "probs",
    "tile",
)

DTYPES: dict[str, np.dtype] = {
    "id": np.dtype(np.int64),
    "x": np.dtype(np.float64),
    "y": np.dtype(np.float64),
    "bbox": np.dtype(np.float64),
    "poly_offsets": np.dtype(np.int64),
    "poly_xy": np.dtype(np.float32),
    "area_um2": np.dtype(np.float32),
    "perimeter_um": np.dtype(np.float32),
    "circularity": np.dtype(np.float32),
    "seg_score": np.dtype(np.float32),
    "class_id": np.dtype(np.int16),
    "probs": np.dtype(np.float32),
    "tile": np.dtype(np.int64),
}


def make_ids(tile: int, n: int) -> NDArray[np.int64]:
    """Deterministic per-slide ids: tile id in the high bits, index within the tile below."""
    return (np.int64(tile) << ID_TILE_SHIFT) + np.arange(n, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class CellTable:
    id: NDArray[np.int64]
    x: NDArray[np.float64]
    y: NDArray[np.float64]
    bbox: NDArray[np.float64]  # (n, 4): x0, y0, x1, y1
    poly_offsets: NDArray[np.int64]  # (n + 1,)
    poly_xy: NDArray[np.float32]  # (m, 2)
    area_um2: NDArray[np.float32]
    perimeter_um: NDArray[np.float32]
    circularity: NDArray[np.float32]
    seg_score: NDArray[np.float32]
    class_id: NDArray[np.int16]  # -1: not classified
    probs: NDArray[np.float32]  # (n, K)
    tile: NDArray[np.int64]

    def __post_init__(self) -> None:
        n = len(self.id)
        for f in fields(self):
            arr = getattr(self, f.name)
            if not isinstance(arr, np.ndarray):
                raise TypeError(f"CellTable.{f.name} must be a numpy array")
            if arr.dtype != DTYPES[f.name]:
                object.__setattr__(self, f.name, arr.astype(DTYPES[f.name]))
        if self.poly_offsets.shape != (n + 1,):
            raise ValueError("poly_offsets must have n + 1 entries")
        if n and (self.poly_offsets[0] != 0 or self.poly_offsets[-1] != len(self.poly_xy)):
            raise ValueError("poly_offsets must start at 0 and end at len(poly_xy)")
        for name in ("x", "y", "area_um2", "perimeter_um", "circularity", "seg_score", "class_id", "tile"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"CellTable.{name} must have shape ({n},)")
        if self.bbox.shape != (n, 4):
            raise ValueError("bbox must be (n, 4)")
        if self.probs.ndim != 2 or self.probs.shape[0] != n:
            raise ValueError("probs must be (n, K)")
        if self.poly_xy.ndim != 2 or self.poly_xy.shape[1] != 2:
            raise ValueError("poly_xy must be (m, 2)")

    def __len__(self) -> int:
        return len(self.id)

    @property
    def n_classes(self) -> int:
        return int(self.probs.shape[1])

    @classmethod
    def empty(cls, n_classes: int) -> CellTable:
        return cls(
            id=np.zeros(0, np.int64),
            x=np.zeros(0),
            y=np.zeros(0),
            bbox=np.zeros((0, 4)),
            poly_offsets=np.zeros(1, np.int64),
            poly_xy=np.zeros((0, 2), np.float32),
            area_um2=np.zeros(0, np.float32),
            perimeter_um=np.zeros(0, np.float32),
            circularity=np.zeros(0, np.float32),
            seg_score=np.zeros(0, np.float32),
            class_id=np.zeros(0, np.int16),
            probs=np.zeros((0, n_classes), np.float32),
            tile=np.zeros(0, np.int64),
        )

    def polygon(self, i: int) -> NDArray[np.float32]:
        return self.poly_xy[self.poly_offsets[i] : self.poly_offsets[i + 1]]

    def polygons(self) -> Iterator[NDArray[np.float32]]:
        for i in range(len(self)):
            yield self.polygon(i)

    def take(self, index: NDArray[np.bool_] | NDArray[np.integer] | Sequence[int]) -> CellTable:
        """Rows selected by a boolean mask or integer indices, polygons included."""
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64)
        offsets, vert = ragged_take(self.poly_offsets, idx)
        poly_xy = self.poly_xy[vert] if len(idx) else np.zeros((0, 2), np.float32)
        return CellTable(
            id=self.id[idx],
            x=self.x[idx],
            y=self.y[idx],
            bbox=self.bbox[idx],
            poly_offsets=offsets,
            poly_xy=poly_xy,
            area_um2=self.area_um2[idx],
            perimeter_um=self.perimeter_um[idx],
            circularity=self.circularity[idx],
            seg_score=self.seg_score[idx],
            class_id=self.class_id[idx],
            probs=self.probs[idx],
            tile=self.tile[idx],
        )

    def with_classes(self, probs: NDArray[np.float32], min_confidence: float | None = None) -> CellTable:
        """A copy with class probabilities filled in and class_id = argmax, or -1 (unclassified)
        where the top probability is below ``min_confidence``."""
        probs = np.asarray(probs, np.float32)
        if probs.shape[0] != len(self):
            raise ValueError("one probability row per cell is required")
        class_id = probs.argmax(axis=1).astype(np.int16) if len(self) else np.zeros(0, np.int16)
        if min_confidence is not None and len(self):
            class_id[probs.max(axis=1) < np.float32(min_confidence)] = -1
        cols = {f.name: getattr(self, f.name) for f in fields(self)}
        cols.update(probs=probs, class_id=class_id)
        return CellTable(**cols)

    def sorted(self) -> CellTable:
        """Rows ordered by id (the canonical order for comparisons)."""
        return self.take(np.argsort(self.id, kind="stable"))

    @staticmethod
    def concat(tables: Sequence[CellTable], n_classes: int | None = None) -> CellTable:
        tables = [t for t in tables if t is not None]
        if not tables:
            if n_classes is None:
                raise ValueError("n_classes is needed to concatenate nothing")
            return CellTable.empty(n_classes)
        shift = np.cumsum([0] + [len(t.poly_xy) for t in tables[:-1]])
        offsets = np.concatenate(
            [np.zeros(1, np.int64)] + [t.poly_offsets[1:] + s for t, s in zip(tables, shift, strict=True)]
        )
        cols: dict[str, np.ndarray] = {"poly_offsets": offsets}
        for name in COLUMNS:
            if name != "poly_offsets":
                cols[name] = np.concatenate([getattr(t, name) for t in tables])
        return CellTable(**cols)

    def columns(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in COLUMNS}

    def equals(self, other: CellTable, atol: float = 0.0) -> bool:
        if len(self) != len(other):
            return False
        for name in COLUMNS:
            a, b = getattr(self, name), getattr(other, name)
            if a.shape != b.shape:
                return False
            if atol and a.dtype.kind == "f":
                if not np.allclose(a, b, atol=atol, rtol=0):
                    return False
            elif not np.array_equal(a, b):
                return False
        return True


# --------------------------------------------------------------------------- ragged polygons
# The one place that indexes the ragged polygon layout (offsets + vertices); CellTable.take,
# the cell store's readers, the GeoJSON and the GeoParquet writers all go through these.


def ragged_take(
    offsets: NDArray[np.int64], rows: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """The offsets of the polygons of ``rows`` (in that order) and the index of their
    vertices into the vertex array that ``offsets`` describes."""
    rows = np.asarray(rows, np.int64)
    counts = (offsets[rows + 1] - offsets[rows]).astype(np.int64)
    new = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(counts, out=new[1:])
    # each output vertex: its row's first vertex plus its rank within the row
    vert = np.repeat(offsets[rows] - new[:-1], counts) + np.arange(int(new[-1]), dtype=np.int64)
    return new, vert


def closing_index(offsets: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Index of the closed rings' vertices (first vertex repeated at the end) into the open
    ones, and where each closed ring's repeated vertex lies in it."""
    n = len(offsets) - 1
    counts = np.diff(offsets)
    last = offsets[1:] + np.arange(n, dtype=np.int64)  # the repeated first vertex of ring i
    index = np.arange(int(offsets[-1]) + n, dtype=np.int64) - np.repeat(
        np.arange(n, dtype=np.int64), counts + 1
    )
    index[last] = offsets[:-1]
    return index, last
