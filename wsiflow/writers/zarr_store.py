"""CellStore: a slide's cells in a Zarr v3 group, appended as batches arrive (DESIGN §5).

Layout of ``OUT/<slide>/cells.zarr``::

    cells/<column>     one resizable array per CellTable column (id, x, y, bbox (n,4), …,
                       probs (n,K), tile); polygons as cells/poly_counts (vertices per cell,
                       int32) + cells/poly_xy (m,2) float32, open rings in level-0 px
    tiles/done         bool per tile: its cells are committed (resume skips it)
    tiles/failed       bool per tile: it failed and its area is excluded
    zarr.json attrs    format, wsiflow_version, n_tiles, n_classes, n_cells, n_vertices,
                       complete, plus the caller's attrs (pipeline, model sha256s, slide, taxonomy)

Crash safety. Rows are committed by one attribute write (``n_cells``/``n_vertices``, an
atomic file replace), *then* their tiles are marked done. Opening a store therefore
truncates every array to the committed length (dropping rows of an interrupted write) and
drops committed rows whose tile is not done (a crash between the two steps), so a resumed
run re-does exactly the tiles not marked done and never duplicates a cell. ``complete``
stays False until :meth:`CellStore.finalize`; :meth:`CellStore.is_complete` detects the
store of a killed run.

Appends are buffered in memory up to ``buffer_rows`` cells or ``flush_seconds`` (each
flush rewrites the tail chunk of every array, so many small appends would otherwise cost
a chunk rewrite each); buffered tiles count as done for idempotency but only become
durable at the next flush. Appending a tile that is already done is a no-op (Dask may
deliver a task twice).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import zarr
from numpy.typing import ArrayLike, NDArray

from wsiflow._version import __version__
from wsiflow.atomic import output_error
from wsiflow.cells import COLUMNS, DTYPES, CellTable, ragged_take
from wsiflow.errors import OutputError

__all__ = ["FORMAT", "CellStore"]

FORMAT = "wsiflow-cells/1"
CHUNK_ROWS = 65536
VERTEX_CHUNK_ROWS = 1 << 18
SORTED_ROWS = 8192  # cells per table of iter_sorted (the GeoJSON stream)
CACHED_CHUNKS = 1  # decoded Zarr chunks kept per array while reading in id order
ROW_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c not in ("poly_offsets", "poly_xy"))
RESERVED = ("format", "wsiflow_version", "n_tiles", "n_classes", "n_cells", "n_vertices", "complete")


class CellStore:
    """Append-only, resumable cell store; see the module docstring for the commit rule."""

    def __init__(
        self,
        group: zarr.Group,
        path: Path,
        writable: bool,
        buffer_rows: int = CHUNK_ROWS,
        flush_seconds: float = 10.0,
    ) -> None:
        self._group = group
        self.path = path
        self.writable = writable
        self.buffer_rows = buffer_rows
        self.flush_seconds = flush_seconds
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT:
            raise OutputError(f"{path}: not a wsiflow cell store (format {attrs.get('format')!r})")
        self.n_tiles = _int_attr(attrs, "n_tiles")
        self.n_classes = _int_attr(attrs, "n_classes")
        self._n_cells = _int_attr(attrs, "n_cells")
        self._n_vertices = _int_attr(attrs, "n_vertices")
        self._done = np.asarray(_array(group, "tiles/done")[:], bool)
        self._failed = np.asarray(_array(group, "tiles/failed")[:], bool)
        self._pending: list[CellTable] = []
        self._pending_tiles: list[NDArray[np.int64]] = []
        self._pending_rows = 0
        self._pending_mask = np.zeros(self.n_tiles, bool)
        self._last_flush = time.monotonic()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        n_tiles: int,
        n_classes: int,
        attrs: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
        buffer_rows: int = CHUNK_ROWS,
        flush_seconds: float = 10.0,
    ) -> CellStore:
        """A new, empty store. An existing path is refused unless ``overwrite``."""
        p = Path(path)
        if p.exists() and not overwrite:
            raise OutputError(f"{p}: already exists (use --resume or --overwrite)")
        if n_tiles < 0 or n_classes < 0:
            raise ValueError("n_tiles and n_classes must be >= 0")
        user = dict(attrs or {})
        bad = [k for k in user if k in RESERVED]
        if bad:
            raise ValueError(f"reserved attribute names: {bad}")
        try:
            g = zarr.open_group(p, mode="w", zarr_format=3)
            for name in ROW_COLUMNS:
                shape: tuple[int, ...] = (0,)
                chunks: tuple[int, ...] = (CHUNK_ROWS,)
                if name == "bbox":
                    shape, chunks = (0, 4), (CHUNK_ROWS, 4)
                elif name == "probs":
                    shape, chunks = (0, n_classes), (CHUNK_ROWS // 4, max(n_classes, 1))
                g.create_array(f"cells/{name}", shape=shape, chunks=chunks, dtype=DTYPES[name], fill_value=0)
            g.create_array(
                "cells/poly_counts", shape=(0,), chunks=(CHUNK_ROWS,), dtype=np.int32, fill_value=0
            )
            g.create_array(
                "cells/poly_xy", shape=(0, 2), chunks=(VERTEX_CHUNK_ROWS, 2), dtype=np.float32, fill_value=0
            )
            tchunk = (max(1, min(n_tiles, 1 << 22)),)
            for name in ("done", "failed"):
                a = g.create_array(
                    f"tiles/{name}", shape=(n_tiles,), chunks=tchunk, dtype=bool, fill_value=False
                )
                if n_tiles:
                    a[:] = np.zeros(n_tiles, bool)
            g.attrs.update(
                {
                    **user,
                    "format": FORMAT,
                    "wsiflow_version": __version__,
                    "n_tiles": int(n_tiles),
                    "n_classes": int(n_classes),
                    "n_cells": 0,
                    "n_vertices": 0,
                    "complete": False,
                }
            )
        except OSError as exc:
            raise output_error(p, exc) from exc
        return cls(g, p, True, buffer_rows, flush_seconds)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        mode: Literal["r", "r+"] = "r",
        *,
        buffer_rows: int = CHUNK_ROWS,
        flush_seconds: float = 10.0,
    ) -> CellStore:
        """Open an existing store, read-only by default; ``r+`` (to append: resume) first
        rolls back anything not committed."""
        p = Path(path)
        if not (p / "zarr.json").is_file():
            raise OutputError(f"{p}: no cell store here")
        if mode not in ("r", "r+"):
            raise ValueError("mode must be 'r' or 'r+'")
        try:
            g = zarr.open_group(p, mode=mode, zarr_format=3)
            store = cls(g, p, mode == "r+", buffer_rows, flush_seconds)
            if store.writable:
                store._recover()
        except OSError as exc:
            raise output_error(p, exc) from exc
        return store

    @staticmethod
    def is_complete(path: str | os.PathLike[str]) -> bool:
        """True only for a store that was finalized (False if missing, foreign or incomplete)."""
        try:
            g = zarr.open_group(Path(path), mode="r", zarr_format=3)
            return g.attrs.get("format") == FORMAT and g.attrs.get("complete") is True
        except Exception:
            return False

    # ------------------------------------------------------------------ properties
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._group.attrs)

    @property
    def complete(self) -> bool:
        return self._group.attrs.get("complete") is True

    @property
    def done(self) -> NDArray[np.bool_]:
        """Tiles whose cells were accepted (committed, or buffered until the next flush)."""
        return self._done | self._pending_mask

    @property
    def failed(self) -> NDArray[np.bool_]:
        return self._failed.copy()

    @property
    def n_cells(self) -> int:
        """Committed cells (buffered cells are not counted until flushed)."""
        return self._n_cells

    # ------------------------------------------------------------------ writing
    def append(self, table: CellTable, tile_ids: ArrayLike) -> int:
        """Accept the cells of ``tile_ids`` (all their cells); returns the number accepted.

        Tiles already done (or buffered) are skipped with their cells, so a repeated
        delivery is a no-op. Every cell must belong to one of ``tile_ids``.
        """
        self._check_writable()
        tiles = np.unique(np.asarray(tile_ids, np.int64).ravel())
        if tiles.size and (tiles[0] < 0 or tiles[-1] >= self.n_tiles):
            raise ValueError(f"tile ids must be within 0..{self.n_tiles - 1}")
        if table.n_classes != self.n_classes:
            raise ValueError(f"table has {table.n_classes} classes, store has {self.n_classes}")
        if len(table) and not np.isin(table.tile, tiles).all():
            raise ValueError("table holds cells of tiles not listed in tile_ids")
        new = tiles[~(self._done[tiles] | self._pending_mask[tiles])]
        if new.size == 0:
            return 0
        if new.size != tiles.size and len(table):
            table = table.take(np.isin(table.tile, new))
        if len(table):
            self._pending.append(table)
        self._pending_tiles.append(new)
        self._pending_mask[new] = True
        self._pending_rows += len(table)
        if (
            self._pending_rows >= self.buffer_rows
            or time.monotonic() - self._last_flush >= self.flush_seconds
        ):
            self.flush()
        return len(table)

    def mark_failed(self, tile_ids: ArrayLike) -> None:
        """Record tiles that failed for good (their area is excluded from the counts)."""
        self._check_writable()
        tiles = np.unique(np.asarray(tile_ids, np.int64).ravel())
        if tiles.size and (tiles[0] < 0 or tiles[-1] >= self.n_tiles):
            raise ValueError(f"tile ids must be within 0..{self.n_tiles - 1}")
        self._failed[tiles] = True
        self._write_tile_array("failed", self._failed)

    def flush(self) -> None:
        """Commit buffered cells, then mark their tiles done (in that order)."""
        self._check_writable()
        self._last_flush = time.monotonic()
        if not self._pending_tiles:
            return
        table = CellTable.concat(self._pending, n_classes=self.n_classes)
        tiles = np.concatenate(self._pending_tiles)
        n0, m0 = self._n_cells, self._n_vertices
        n1, m1 = n0 + len(table), m0 + len(table.poly_xy)
        try:
            if self._group.attrs.get("complete") is True:  # new data: no longer a finished store
                self._group.attrs.update({"complete": False})
            if len(table):
                cols = table.columns()
                for name in ROW_COLUMNS:
                    self._write_rows(f"cells/{name}", cols[name], n0, n1)
                counts = np.diff(table.poly_offsets).astype(np.int32)
                self._write_rows("cells/poly_counts", counts, n0, n1)
                self._write_rows("cells/poly_xy", table.poly_xy, m0, m1)
                self._group.attrs.update({"n_cells": n1, "n_vertices": m1})  # commit point
            self._n_cells, self._n_vertices = n1, m1
            self._done[tiles] = True
            self._failed[tiles] = False
            self._write_tile_array("done", self._done)
            self._write_tile_array("failed", self._failed)
        except OSError as exc:
            raise output_error(self.path, exc) from exc
        self._pending.clear()
        self._pending_tiles.clear()
        self._pending_rows = 0
        self._pending_mask[:] = False

    def finalize(self, attrs: Mapping[str, Any] | None = None) -> None:
        """Flush, store the final attributes and set ``complete = True``."""
        self.flush()
        user = dict(attrs or {})
        bad = [k for k in user if k in RESERVED]
        if bad:
            raise ValueError(f"reserved attribute names: {bad}")
        try:
            self._group.attrs.update({**user, "complete": True})
        except OSError as exc:
            raise output_error(self.path, exc) from exc

    def update_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Merge user attributes into the group now (reserved names refused)."""
        self._check_writable()
        bad = [k for k in attrs if k in RESERVED]
        if bad:
            raise ValueError(f"reserved attribute names: {bad}")
        try:
            self._group.attrs.update(dict(attrs))
        except OSError as exc:
            raise output_error(self.path, exc) from exc

    def mark_incomplete(self) -> None:
        """Set ``complete = False`` before adding to a finalized store (e.g. retrying its
        failed tiles), so a run that stops half-way is not mistaken for a finished one."""
        self._check_writable()
        try:
            self._group.attrs.update({"complete": False})
        except OSError as exc:
            raise output_error(self.path, exc) from exc

    def close(self) -> None:
        if self.writable and self._pending_tiles:
            self.flush()

    def __enter__(self) -> CellStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the tiles accepted so far; do not mask the original error
            with contextlib.suppress(Exception):
                self.close()

    # ------------------------------------------------------------------ reading
    def read_table(self) -> CellTable:
        """All committed cells of done tiles, in commit order."""
        n, m = self._n_cells, self._n_vertices
        cols: dict[str, np.ndarray] = {}
        for name in ROW_COLUMNS:
            cols[name] = np.asarray(self._arr(f"cells/{name}")[:n], DTYPES[name])
        counts = np.asarray(self._arr("cells/poly_counts")[:n], np.int64)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        cols["poly_offsets"] = offsets
        cols["poly_xy"] = np.asarray(self._arr("cells/poly_xy")[:m], np.float32)
        if cols["probs"].shape != (n, self.n_classes):
            cols["probs"] = cols["probs"].reshape(n, self.n_classes)
        table = CellTable(**cols)
        keep = self._done[table.tile] if n else np.zeros(0, bool)
        return table if keep.all() else table.take(keep)

    def read_column(self, name: str) -> np.ndarray:
        """One per-cell column (e.g. ``class_id``) of the cells :meth:`read_table` returns,
        without reading the others (no polygons)."""
        if name not in ROW_COLUMNS:
            raise ValueError(f"not a per-cell column: {name!r}")
        n = self._n_cells
        values = np.asarray(self._arr(f"cells/{name}")[:n], DTYPES[name])
        if name == "probs":
            values = values.reshape(n, self.n_classes)
        tile = values if name == "tile" else np.asarray(self._arr("cells/tile")[:n], DTYPES["tile"])
        keep = self._done[tile] if n else np.zeros(0, bool)
        return values if keep.all() else values[keep]

    def kept_rows(self) -> NDArray[np.int64]:
        """Store row numbers of the cells :meth:`read_table` returns (committed, tile done)."""
        n = self._n_cells
        if not n:
            return np.zeros(0, np.int64)
        tile = np.asarray(self._arr("cells/tile")[:n], DTYPES["tile"])
        return np.flatnonzero(self._done[tile]).astype(np.int64)

    def read_columns(
        self, names: Sequence[str], rows: NDArray[np.integer] | None = None
    ) -> dict[str, np.ndarray]:
        """Per-cell columns (no polygons) of the cells at store ``rows`` (default:
        :meth:`kept_rows`), each in its CellTable dtype, ``bbox`` (n, 4), ``probs`` (n, K)."""
        bad = [name for name in names if name not in ROW_COLUMNS]
        if bad:
            raise ValueError(f"not per-cell columns: {bad!r}")
        n = self._n_cells
        sel = self.kept_rows() if rows is None else np.asarray(rows, np.int64)
        # all rows in order (kept rows are distinct and sorted): the columns as read, no copy
        whole = len(sel) == n and (rows is None or bool((sel == np.arange(n)).all()))
        out: dict[str, np.ndarray] = {}
        for name in names:
            values = np.asarray(self._arr(f"cells/{name}")[:n], DTYPES[name])
            if name == "probs":
                values = values.reshape(n, self.n_classes)
            elif name == "bbox":
                values = values.reshape(n, 4)
            out[name] = values if whole else values[sel]
        return out

    def polygons(self, rows: NDArray[np.integer]) -> list[NDArray[np.float32]]:
        """Polygons (level-0 px, open rings) of the cells at store ``rows``; reads only
        their vertices."""
        sel = np.asarray(rows, np.int64)
        if sel.size == 0:
            return []
        offsets, vert = ragged_take(self._vertex_ends(), sel)
        xy = self._arr("cells/poly_xy")
        pts = (
            np.asarray(xy.get_orthogonal_selection((vert, slice(None))), np.float32)
            if vert.size
            else np.zeros((0, 2), np.float32)
        )
        return [pts[offsets[i] : offsets[i + 1]] for i in range(len(sel))]

    def _vertex_ends(self) -> NDArray[np.int64]:
        """Vertex range of committed row i: ``ends[i]:ends[i + 1]``."""
        n = self._n_cells
        ends = np.zeros(n + 1, np.int64)
        np.cumsum(np.asarray(self._arr("cells/poly_counts")[:n], np.int64), out=ends[1:])
        return ends

    def iter_sorted(self, rows: int = SORTED_ROWS) -> Iterator[CellTable]:
        """The cells of :meth:`read_table` in id order (``CellTable.sorted``), ``rows`` at a
        time: memory holds the id column, its sort order, one chunk and a few decoded Zarr
        chunks per array, never all cells.

        Rows are gathered from decoded Zarr chunks kept in a small cache (:class:`_RowReader`):
        id order is close to commit order (tiles are committed about in grid order), so each
        stored chunk is decoded about once however small ``rows`` is, and a store committed
        in any other order gives the same cells, decoding more.
        """
        n, m = self._n_cells, self._n_vertices
        ends = self._vertex_ends()
        if ends[-1] != m:
            raise OutputError(f"{self.path}: polygon vertex count disagrees with the committed rows")
        ids = np.asarray(self._arr("cells/id")[:n], np.int64)
        keep = self.kept_rows()
        if len(keep) == n:  # every committed row is kept (the usual case): no copy of the ids
            order = np.argsort(ids, kind="stable")
        else:
            order = keep[np.argsort(ids[keep], kind="stable")]
        del ids, keep
        readers = {name: _RowReader(self._arr(f"cells/{name}")) for name in ROW_COLUMNS}
        vertices = _RowReader(self._arr("cells/poly_xy"))
        step = max(1, rows)
        for a in range(0, len(order), step):
            sel = order[a : a + step]
            cols: dict[str, np.ndarray] = {
                name: np.asarray(reader.take(sel), DTYPES[name]) for name, reader in readers.items()
            }
            cols["probs"] = cols["probs"].reshape(len(sel), self.n_classes)
            offsets, vidx = ragged_take(ends, sel)
            cols["poly_offsets"] = offsets
            cols["poly_xy"] = np.asarray(vertices.take(vidx), np.float32).reshape(-1, 2)
            yield CellTable(**cols)

    def iter_tables(self, rows: int = CHUNK_ROWS) -> Iterator[CellTable]:
        """The same cells as :meth:`read_table`, ``rows`` at a time (bounded memory)."""
        n, m = self._n_cells, self._n_vertices
        counts = np.asarray(self._arr("cells/poly_counts")[:n], np.int64)
        ends = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=ends[1:])
        if ends[-1] != m:
            raise OutputError(f"{self.path}: polygon vertex count disagrees with the committed rows")
        for a in range(0, n, max(1, rows)):
            b = min(n, a + rows)
            cols: dict[str, np.ndarray] = {}
            for name in ROW_COLUMNS:
                cols[name] = np.asarray(self._arr(f"cells/{name}")[a:b], DTYPES[name])
            cols["probs"] = cols["probs"].reshape(b - a, self.n_classes)
            cols["poly_offsets"] = ends[a : b + 1] - ends[a]
            cols["poly_xy"] = np.asarray(self._arr("cells/poly_xy")[ends[a] : ends[b]], np.float32)
            table = CellTable(**cols)
            keep = self._done[table.tile]
            yield table if keep.all() else table.take(keep)

    # ------------------------------------------------------------------ internals
    def _arr(self, key: str) -> zarr.Array:
        arr = self._group[key]
        if not isinstance(arr, zarr.Array):
            raise OutputError(f"{self.path}: {key} is not an array")
        return arr

    def _check_writable(self) -> None:
        if not self.writable:
            raise OutputError(f"{self.path}: opened read-only")

    def _write_rows(self, key: str, data: np.ndarray, start: int, stop: int) -> None:
        arr = self._arr(key)
        if arr.shape[0] != stop:
            arr.resize((stop, *arr.shape[1:]))
        if stop > start:
            arr[start:stop] = data

    def _write_tile_array(self, name: str, values: NDArray[np.bool_]) -> None:
        if self.n_tiles:
            self._arr(f"tiles/{name}")[:] = values

    def _recover(self) -> None:
        """Roll back uncommitted rows and rows whose tile was not marked done."""
        for part in self.path.rglob("*.partial"):  # zarr's temp files from a killed write
            with contextlib.suppress(OSError):
                part.unlink()
        n, m = self._n_cells, self._n_vertices
        tile = np.asarray(self._arr("cells/tile")[:n], np.int64) if n else np.zeros(0, np.int64)
        bad = ~self._done[tile] if n else np.zeros(0, bool)
        if bad.any():
            first = int(np.argmax(bad))
            if bad[first:].all():  # the usual case: the tail of the last flush
                counts = np.asarray(self._arr("cells/poly_counts")[:first], np.int64)
                n, m = first, int(counts.sum())
            else:  # not expected from this writer; rewrite the good rows
                table = self.read_table()
                self._truncate(0, 0)
                self._group.attrs.update({"n_cells": 0, "n_vertices": 0})
                self._n_cells = self._n_vertices = 0
                saved_done = self._done.copy()
                self._done[:] = False
                self._pending = [table]
                self._pending_tiles = [np.flatnonzero(saved_done)]
                self._pending_mask[saved_done] = True
                self._pending_rows = len(table)
                self.flush()
                return
        self._truncate(n, m)
        if (n, m) != (self._n_cells, self._n_vertices):
            self._group.attrs.update({"n_cells": n, "n_vertices": m})
            self._n_cells, self._n_vertices = n, m

    def _truncate(self, n: int, m: int) -> None:
        for name in (*ROW_COLUMNS, "poly_counts"):
            arr = self._arr(f"cells/{name}")
            if arr.shape[0] != n:
                arr.resize((n, *arr.shape[1:]))
        xy = self._arr("cells/poly_xy")
        if xy.shape[0] != m:
            xy.resize((m, 2))


class _RowReader:
    """Rows of one stored array at any indices, gathered from its decoded Zarr chunks; the
    last :data:`CACHED_CHUNKS` decoded chunks are kept, so reading nearby rows again (the next
    chunk of a near-sorted order) decodes nothing new."""

    def __init__(self, arr: zarr.Array) -> None:
        self._arr = arr
        self._rows = int(arr.chunks[0])
        self._cache: dict[int, np.ndarray] = {}  # chunk number → decoded rows (insertion = age)

    def take(self, index: NDArray[np.int64]) -> np.ndarray:
        idx = np.asarray(index, np.int64)
        out = np.empty((len(idx), *self._arr.shape[1:]), self._arr.dtype)
        if not len(idx):
            return out
        which = idx // self._rows
        pos = np.argsort(which, kind="stable")  # rows grouped by chunk, in their order within it
        starts = np.flatnonzero(np.diff(which[pos], prepend=which[pos[0]] - 1))
        for s, e in zip(starts.tolist(), [*starts[1:].tolist(), len(idx)], strict=True):
            at = pos[s:e]
            k = int(which[at[0]])
            out[at] = self._chunk(k)[idx[at] - k * self._rows]
        return out

    def _chunk(self, k: int) -> np.ndarray:
        if k in self._cache:
            return self._cache[k]
        while len(self._cache) >= CACHED_CHUNKS:
            del self._cache[next(iter(self._cache))]  # the oldest
        start = k * self._rows
        data = np.asarray(self._arr[start : min(start + self._rows, self._arr.shape[0])])
        self._cache[k] = data
        return data


def read_done(path: str | os.PathLike[str]) -> NDArray[np.bool_]:
    """The committed ``tiles/done`` of a store (for planning a resume)."""
    with contextlib.closing(CellStore.open(path, mode="r")) as store:
        return store.done


def _array(group: zarr.Group, key: str) -> zarr.Array:
    arr = group[key]
    if not isinstance(arr, zarr.Array):
        raise OutputError(f"{key} is not an array")
    return arr


def _int_attr(attrs: Mapping[str, Any], key: str) -> int:
    value = attrs.get(key)
    if not isinstance(value, int | float):
        raise OutputError(f"cell store attribute {key!r} is missing or invalid")
    return int(value)
