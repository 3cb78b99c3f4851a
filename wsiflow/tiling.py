"""TileGrid: a regular grid of tiles at ``seg_mpp`` over a slide's level-0 extent.

Ownership rule (DESIGN §3, as stardist's ``big.py``)
----------------------------------------------------
The slide ``[0, width) × [0, height)`` (level-0 px) is cut into tile *cores*: a regular
grid of ``core_px × core_px`` pixels at ``seg_mpp`` (``tile_um`` µm), row-major, the last
row and column clipped to the slide. Core boundaries are one shared array per axis, so
cores are half-open, never overlap and leave no gap: **every point of the slide is owned
by exactly one tile**. A cell is kept by the one tile whose core contains its centroid
(:meth:`TileGrid.owns`); a cell touching the outer edge of a tile's read region is dropped
there, because the owner sees it whole.

Each grid tile's read box (``Tile.read``) is its full-size core grown by a halo of
``halo_px`` pixels at ``seg_mpp``, the same pixel size ``read_px`` for every tile. A tile is
read clipped to the slide (:meth:`Tile.within`): a side that reaches past the slide edge is
pulled in to keep only a white margin there (the segmenter's measured context, so pixels of
the slide are seen as with the whole white halo, to within the context's tolerance), on the
U-Net's pooling grid; a small slide then does not pay a whole tile's segmentation of white.
``Tile.cuts`` says which sides of a read box lie inside the slide: only there does the read
edge cut anything, and a cell touching a side on or past the slide edge is whole.

Invariant: ``halo_um > max_object_um / 2``. A cell whose centroid lies in a core reaches at
most ``max_object_um / 2`` from that centroid, so it lies entirely inside the core grown
by the halo and never touches the read edge: the owning tile always sees it whole, and
counts are exact with no cross-tile merge. The halo is rounded *up* to whole pixels, so
rounding never breaks the invariant. Violations raise :class:`~wsiflow.errors.ConfigError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from wsiflow.config import Pipeline
from wsiflow.errors import ConfigError
from wsiflow.types import Box

__all__ = ["Tile", "TileGrid", "halo_pixels"]


def halo_pixels(halo_um: float, seg_mpp: float) -> int:
    """A halo of ``halo_um`` in px at ``seg_mpp``, rounded *up* (so the invariant survives rounding)."""
    return math.ceil(halo_um / seg_mpp - 1e-9)


@dataclass(frozen=True, slots=True)
class Tile:
    """One tile. ``core`` and ``read`` (the box read: a grid tile's full-size core + halo,
    :meth:`within` clips it to a slide) are in level-0 px; ``*_px`` are (w, h) at ``seg_mpp``."""

    id: int
    row: int
    col: int
    core: Box
    read: Box
    core_px: tuple[int, int]
    read_px: tuple[int, int]
    cuts: tuple[bool, bool, bool, bool] = (True, True, True, True)
    """Per side of ``read`` (left, top, right, bottom): whether it lies inside the slide, so
    that the read edge there cuts what crosses it; past or on the slide edge only white lies
    beyond, and a cell touching that side of the image is whole."""

    def within(self, width: float, height: float, margin_px: int, align: int = 1) -> Tile:
        """This tile as read from a slide of ``width`` × ``height`` level-0 px: each side of
        ``read`` that reaches past the slide edge pulled in to keep ``margin_px`` pixels (at
        ``seg_mpp``) of white beyond the edge, no less. The box stays on the grid of ``read``'s
        pixels, moved by whole multiples of ``align`` px (a U-Net that pools ``depth`` times
        sees the same pooling grid for ``align = 2**depth``), and a clipped size is rounded up
        to a multiple of ``align`` (the extra on the slide-edge side, white). The core is
        unchanged; ``cuts`` is recomputed for the new box."""
        if margin_px < 0 or align < 1:
            raise ValueError(f"margin_px must be >= 0 and align >= 1, got {margin_px}, {align}")
        r = self.read
        s = r.w / self.read_px[0]  # level-0 px per seg px
        a_x, n_x = _clip_axis(r.x, self.read_px[0], s, width, margin_px, align)
        a_y, n_y = _clip_axis(r.y, self.read_px[1], s, height, margin_px, align)
        read = Box(r.x + a_x * s, r.y + a_y * s, n_x * s, n_y * s)
        return Tile(
            self.id, self.row, self.col, self.core, read, self.core_px, (n_x, n_y), _cuts(read, width, height)
        )

    def owns(self, x: ArrayLike, y: ArrayLike) -> NDArray[np.bool_]:
        """The ownership rule, vectorised: which points (level-0 px) lie in this tile's core,
        half-open ``[x, x1) × [y, y1)``. A cell belongs to the tile that owns its centroid."""
        xa, ya = np.asarray(x, np.float64), np.asarray(y, np.float64)
        c = self.core
        return np.asarray((xa >= c.x) & (xa < c.x1) & (ya >= c.y) & (ya < c.y1), bool)


@dataclass(frozen=True)
class TileGrid:
    """A regular grid of tiles at ``seg_mpp`` with halo; see the module docstring for the rule.

    ``width``/``height`` are the slide's level-0 size in px and ``slide_mpp`` its µm per
    level-0 px; ``tile_um``, ``halo_um`` and ``max_object_um`` are in µm.
    """

    width: int
    height: int
    slide_mpp: float
    seg_mpp: float
    tile_um: float
    halo_um: float
    max_object_um: float
    tiles: list[Tile] = field(init=False, repr=False, compare=False)
    x_edges: NDArray[np.float64] = field(init=False, repr=False, compare=False)
    y_edges: NDArray[np.float64] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key in ("slide_mpp", "seg_mpp", "tile_um", "halo_um", "max_object_um"):
            value = getattr(self, key)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError("tiling", key, f"must be a positive number, got {value!r}")
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise ConfigError("slide", "dimensions", f"slide has zero size ({self.width}×{self.height})")
        if self.halo_um <= self.max_object_um / 2:
            raise ConfigError(
                "tiling",
                "tiling.halo_um",
                f"halo ({self.halo_um:g} µm) must exceed half of the largest object "
                f"(max_object_um {self.max_object_um:g} µm / 2 = {self.max_object_um / 2:g} µm): "
                "a cell on a tile seam would otherwise be cut",
            )
        if self.core_px < 1:
            raise ConfigError("tiling", "tiling.tile_um", f"tile ({self.tile_um:g} µm) is under one pixel")
        step = self.core_px * self.scale
        xs = _edges(int(self.width), step)
        ys = _edges(int(self.height), step)
        object.__setattr__(self, "x_edges", xs)
        object.__setattr__(self, "y_edges", ys)
        halo0 = self.halo_px * self.scale
        read_side = self.core_px + 2 * self.halo_px
        tiles: list[Tile] = []
        n_cols = len(xs) - 1
        for r in range(len(ys) - 1):
            y0, y1 = float(ys[r]), float(ys[r + 1])
            for c in range(n_cols):
                x0, x1 = float(xs[c]), float(xs[c + 1])
                core = Box(x0, y0, x1 - x0, y1 - y0)
                read = Box(x0 - halo0, y0 - halo0, step + 2 * halo0, step + 2 * halo0)
                core_px = (
                    min(self.core_px, math.ceil((x1 - x0) / self.scale - 1e-9)),
                    min(self.core_px, math.ceil((y1 - y0) / self.scale - 1e-9)),
                )
                cuts = _cuts(read, self.width, self.height)
                tiles.append(Tile(r * n_cols + c, r, c, core, read, core_px, (read_side, read_side), cuts))
        object.__setattr__(self, "tiles", tiles)

    @classmethod
    def from_pipeline(cls, width: int, height: int, slide_mpp: float, pipeline: Pipeline) -> TileGrid:
        t = pipeline.tiling
        return cls(
            width, height, slide_mpp, pipeline.resolution.seg_mpp, t.tile_um, t.halo_um, t.max_object_um
        )

    @property
    def scale(self) -> float:
        """Level-0 px per pixel at ``seg_mpp``."""
        return self.seg_mpp / self.slide_mpp

    @property
    def core_px(self) -> int:
        """Full core side in pixels at ``seg_mpp``."""
        return max(1, round(self.tile_um / self.seg_mpp))

    @property
    def halo_px(self) -> int:
        """Halo in pixels at ``seg_mpp`` (rounded up, so the invariant survives rounding)."""
        return halo_pixels(self.halo_um, self.seg_mpp)

    @property
    def n_rows(self) -> int:
        return len(self.y_edges) - 1

    @property
    def n_cols(self) -> int:
        return len(self.x_edges) - 1

    def __len__(self) -> int:
        return len(self.tiles)

    def owns(self, tile: Tile, x: float, y: float) -> bool:
        """Whether ``tile``'s core contains the point (level-0 px), half-open."""
        return self.owner(x, y) == tile.id

    def owner(self, x: float, y: float) -> int:
        """Id of the tile whose core contains (x, y); -1 outside the slide."""
        return int(self.owners(np.array([x]), np.array([y]))[0])

    def owners(self, x: ArrayLike, y: ArrayLike) -> NDArray[np.int64]:
        """Vectorised :meth:`owner`: tile id per point, -1 for points outside the slide."""
        xa = np.asarray(x, np.float64)
        ya = np.asarray(y, np.float64)
        col = np.searchsorted(self.x_edges, xa, side="right") - 1
        row = np.searchsorted(self.y_edges, ya, side="right") - 1
        inside = (col >= 0) & (col < self.n_cols) & (row >= 0) & (row < self.n_rows)
        inside &= np.isfinite(xa) & np.isfinite(ya)
        return np.where(inside, row * self.n_cols + col, -1).astype(np.int64)


def _edges(extent: int, step: float) -> NDArray[np.float64]:
    """Shared core boundaries 0, step, 2·step, … clipped so the last one is ``extent``."""
    n = max(1, math.ceil(extent / step - 1e-9))
    edges = np.arange(n + 1, dtype=np.float64) * step
    edges[-1] = float(extent)  # n was rounded so that edges[-2] < extent
    return edges


EDGE_EPS = 1e-6  # level-0 px: a read side this close to the slide edge is on it


def _cuts(read: Box, width: float, height: float) -> tuple[bool, bool, bool, bool]:
    """Which sides of ``read`` (left, top, right, bottom) lie strictly inside the slide."""
    return (
        read.x > EDGE_EPS,
        read.y > EDGE_EPS,
        read.x1 < width - EDGE_EPS,
        read.y1 < height - EDGE_EPS,
    )


def _clip_axis(
    origin: float, n_px: int, scale: float, extent: float, margin_px: int, align: int
) -> tuple[int, int]:
    """One axis of :meth:`Tile.within`: (first pixel kept, pixels kept) of a read of ``n_px``
    pixels from level-0 ``origin`` (``scale`` level-0 px each) over a slide ``extent`` long."""
    start = (0.0 - origin) / scale  # the slide's first pixel, in read pixels (> 0: white before it)
    end = (extent - origin) / scale  # the slide's end, in read pixels (< n_px: white after it)
    a = max(0, math.floor((start - margin_px) / align + 1e-9) * align)
    if end >= n_px - 1e-9:
        return a, n_px - a
    b = a + max(1, math.ceil((end + margin_px - a) / align - 1e-9)) * align
    return a, min(b, n_px) - a
