"""TileGrid: the ownership rule (every point owned exactly once), ids, halo, invariant."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from wsiflow.config import load_pipeline
from wsiflow.errors import ConfigError
from wsiflow.tiling import TileGrid


@st.composite
def grids(draw: st.DrawFn) -> TileGrid:
    width = draw(st.integers(1, 60_000))
    height = draw(st.integers(1, 60_000))
    slide_mpp = draw(st.floats(0.1, 2.0))
    seg_mpp = draw(st.floats(0.1, 4.0))
    tile_um = draw(st.floats(4.0, 4000.0))
    max_object_um = draw(st.floats(1.0, 200.0))
    halo_um = max_object_um / 2 + draw(st.floats(0.01, 100.0))
    core0 = max(1, round(tile_um / seg_mpp)) * seg_mpp / slide_mpp
    assume(math.ceil(width / core0) * math.ceil(height / core0) <= 4000)
    return TileGrid(width, height, slide_mpp, seg_mpp, tile_um, halo_um, max_object_um)


def _points(grid: TileGrid, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random points plus the nastiest ones: exactly on and just below every core edge."""
    w, h = grid.width, grid.height
    xs: list[np.ndarray] = [
        rng.uniform(0, w, 300),
        grid.x_edges[:-1],
        np.nextafter(grid.x_edges[1:], -np.inf),
        np.zeros(1),
    ]
    ys: list[np.ndarray] = [
        rng.uniform(0, h, 300),
        grid.y_edges[:-1],
        np.nextafter(grid.y_edges[1:], -np.inf),
        np.zeros(1),
    ]
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    n = max(len(x), len(y))
    x = np.resize(x, n)
    y = np.resize(rng.permutation(np.resize(y, n)), n)
    keep = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    return x[keep], y[keep]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(grid=grids(), seed=st.integers(0, 2**32 - 1))
def test_every_point_of_the_slide_is_owned_by_exactly_one_tile(grid: TileGrid, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x, y = _points(grid, rng)
    cx0 = np.array([t.core.x for t in grid.tiles])
    cy0 = np.array([t.core.y for t in grid.tiles])
    cx1 = np.array([t.core.x1 for t in grid.tiles])  # Box arithmetic, not the edge arrays
    cy1 = np.array([t.core.y1 for t in grid.tiles])
    inside = (
        (cx0[None] <= x[:, None])
        & (x[:, None] < cx1[None])
        & (cy0[None] <= y[:, None])
        & (y[:, None] < cy1[None])
    )
    assert (inside.sum(axis=1) == 1).all()
    owners = grid.owners(x, y)
    assert np.array_equal(owners, inside.argmax(axis=1))
    for i in range(0, len(x), max(1, len(x) // 20)):
        tid = int(owners[i])
        assert grid.owner(float(x[i]), float(y[i])) == tid
        assert grid.owns(grid.tiles[tid], float(x[i]), float(y[i]))
        other = grid.tiles[(tid + 1) % len(grid)]
        assert other.id == tid or not grid.owns(other, float(x[i]), float(y[i]))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(grid=grids())
def test_cores_tile_the_slide_and_reads_hold_the_halo(grid: TileGrid) -> None:
    area = sum(t.core.w * t.core.h for t in grid.tiles)
    assert area == pytest.approx(grid.width * grid.height, rel=1e-9)
    assert grid.tiles[0].core.x == 0 and grid.tiles[0].core.y == 0
    assert grid.tiles[-1].core.x1 == grid.width and grid.tiles[-1].core.y1 == grid.height
    halo0 = grid.halo_um / grid.slide_mpp  # the halo in level-0 px before rounding up
    side = grid.core_px + 2 * grid.halo_px
    for t in grid.tiles:
        assert t.core.w > 0 and t.core.h > 0
        assert t.read.x <= t.core.x - halo0 + 1e-6 and t.read.y <= t.core.y - halo0 + 1e-6
        assert t.read.x1 >= t.core.x1 + halo0 - 1e-6 and t.read.y1 >= t.core.y1 + halo0 - 1e-6
        assert t.read_px == (side, side)
        assert t.read.w == pytest.approx(side * grid.scale)
        assert 1 <= t.core_px[0] <= grid.core_px and 1 <= t.core_px[1] <= grid.core_px
        assert t.core_px[0] * grid.scale >= t.core.w - 1e-6


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(grid=grids(), margin=st.integers(0, 300), align=st.sampled_from([1, 2, 16]))
def test_reads_clipped_to_the_slide_keep_the_slide_the_margin_and_the_pixel_grid(
    grid: TileGrid, margin: int, align: int
) -> None:
    s = grid.scale
    w, h = grid.width, grid.height
    for t in grid.tiles[:: max(1, len(grid) // 25)]:
        c = t.within(w, h, margin, align)
        r, cr = t.read, c.read
        assert (c.id, c.core, c.core_px) == (t.id, t.core, t.core_px)
        assert cr.x >= r.x - 1e-6 and cr.y >= r.y - 1e-6 and cr.x1 <= r.x1 + 1e-6 and cr.y1 <= r.y1 + 1e-6
        assert cr.w == pytest.approx(c.read_px[0] * s) and cr.h == pytest.approx(c.read_px[1] * s)
        for lo, lo_c, hi, hi_c, n_c, extent in (
            (r.x, cr.x, r.x1, cr.x1, c.read_px[0], w),
            (r.y, cr.y, r.y1, cr.y1, c.read_px[1], h),
        ):
            shift = (lo_c - lo) / s  # whole multiples of align px: the same pixel (and pooling) grid
            assert abs(shift - round(shift)) < 1e-6 and round(shift) % align == 0
            assert n_c % align == 0 or hi_c == pytest.approx(hi)  # rounded up unless at the end
            # everything of the slide the full box holds, and margin px of white (or all of it)
            assert lo_c <= max(lo, min(0.0, 0.0 - margin * s)) + 1e-6
            assert hi_c >= min(hi, extent + margin * s) - 1e-6
            # and no more white than the margin and the rounding need
            assert lo_c > -(margin + align) * s - 1e-6 or lo_c == pytest.approx(lo)
            assert hi_c < extent + (margin + 2 * align) * s + 1e-6 or hi_c == pytest.approx(hi)
        assert c.cuts == (cr.x > 1e-6, cr.y > 1e-6, cr.x1 < w - 1e-6, cr.y1 < h - 1e-6)
        again = c.within(w, h, margin, align)  # clipping twice changes nothing
        assert (again.read_px, again.cuts) == (c.read_px, c.cuts)
        assert (again.read.x, again.read.y, again.read.w) == pytest.approx((cr.x, cr.y, cr.w))


def test_known_clipped_reads() -> None:
    g = TileGrid(5000, 3000, 0.25, 0.5, tile_um=512, halo_um=64, max_object_um=100)
    first, last = g.tiles[0], g.tiles[5]
    assert first.cuts == (False, False, True, True) and last.cuts == (True, True, False, False)
    assert g.tiles[1].cuts == (True, False, True, True)
    # 40 px of margin on a 16-px grid: 48 px of white kept left of and above tile 0
    c = first.within(5000, 3000, 40, 16)
    assert (c.read.x, c.read.y, c.read_px) == (-96, -96, (1200, 1200))
    assert c.cuts == (False, False, True, True)
    # tile 5 (core 452 × 476 px, slide edge 580 / 604 px into its read): 620 → 624, 644 → 656
    c = last.within(5000, 3000, 40, 16)
    assert (c.read.x, c.read.y, c.read.w, c.read.h) == (3840, 1792, 1248, 1312)
    assert c.read_px == (624, 656) and c.cuts == (True, True, False, False)
    # the whole halo as the margin: left and top as they were, right and bottom at halo past the edge
    c = last.within(5000, 3000, g.halo_px, 1)
    assert (c.read.x, c.read.y, c.read_px) == (last.read.x, last.read.y, (708, 732))
    # a slide smaller than a tile: one read, white margin on every side, nothing cut
    small = TileGrid(2000, 2000, 0.25, 0.5, tile_um=512, halo_um=96, max_object_um=100).tiles[0]
    assert small.read_px == (1408, 1408)
    c = small.within(2000, 2000, 87, 16)
    assert c.read_px == (1184, 1184) and (c.read.x, c.read.y) == (-192, -192)
    assert c.cuts == (False, False, False, False)
    with pytest.raises(ValueError, match="margin_px"):
        small.within(2000, 2000, -1, 16)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(grid=grids())
def test_ids_are_row_major_and_deterministic(grid: TileGrid) -> None:
    again = TileGrid(
        grid.width, grid.height, grid.slide_mpp, grid.seg_mpp, grid.tile_um, grid.halo_um, grid.max_object_um
    )
    assert again.tiles == grid.tiles
    for i, t in enumerate(grid.tiles):
        assert t.id == i == t.row * grid.n_cols + t.col


def test_known_grid() -> None:
    # 0.25 µm/px slide, segmentation at 0.5 µm/px: 1 seg px = 2 level-0 px.
    g = TileGrid(5000, 3000, 0.25, 0.5, tile_um=512, halo_um=64, max_object_um=100)
    assert g.core_px == 1024 and g.halo_px == 128 and g.scale == 2.0
    assert (g.n_rows, g.n_cols) == (2, 3)
    t = g.tiles[5]
    assert (t.row, t.col) == (1, 2)
    assert (t.core.x, t.core.y, t.core.w, t.core.h) == (4096, 2048, 904, 952)
    assert (t.read.x, t.read.y, t.read.w, t.read.h) == (4096 - 256, 2048 - 256, 2560, 2560)
    assert t.core_px == (452, 476) and t.read_px == (1280, 1280)
    assert g.owner(2047.999, 0) == 0 and g.owner(2048, 0) == 1 and g.owner(4999.5, 2999.5) == 5
    assert g.owner(-0.1, 10) == -1 and g.owner(5000, 10) == -1 and g.owner(10, 3000) == -1
    assert g.owners([np.nan], [1.0]).tolist() == [-1]


def test_single_tile_when_the_slide_is_smaller_than_a_tile() -> None:
    g = TileGrid(100, 50, 0.5, 0.5, tile_um=512, halo_um=60, max_object_um=100)
    assert len(g) == 1
    assert (g.tiles[0].core.w, g.tiles[0].core.h) == (100, 50)
    assert g.tiles[0].core_px == (100, 50)


def test_halo_invariant_is_enforced() -> None:
    with pytest.raises(ConfigError, match=r"tiling\.halo_um.*must exceed half"):
        TileGrid(1000, 1000, 0.25, 0.5, tile_um=512, halo_um=50, max_object_um=100)
    with pytest.raises(ConfigError, match="halo"):
        TileGrid(1000, 1000, 0.25, 0.5, tile_um=512, halo_um=10, max_object_um=100)
    TileGrid(1000, 1000, 0.25, 0.5, tile_um=512, halo_um=50.01, max_object_um=100)  # just enough


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"slide_mpp": 0.0}, "slide_mpp"),
        ({"seg_mpp": -1.0}, "seg_mpp"),
        ({"tile_um": float("nan")}, "tile_um"),
        ({"width": 0}, "dimensions"),
    ],
)
def test_bad_parameters_raise_config_error(kwargs: dict, key: str) -> None:
    args: dict[str, Any] = {
        "width": 100,
        "height": 100,
        "slide_mpp": 0.25,
        "seg_mpp": 0.5,
        "tile_um": 512.0,
        "halo_um": 64.0,
        "max_object_um": 100.0,
    }
    args.update(kwargs)
    with pytest.raises(ConfigError, match=key):
        TileGrid(**args)


def test_from_pipeline_uses_the_pipeline_tiling() -> None:
    p = load_pipeline("mds")
    g = TileGrid.from_pipeline(4096, 4096, 0.25, p)
    assert g.seg_mpp == p.resolution.seg_mpp and g.tile_um == p.tiling.tile_um
    assert g.core_px == round(p.tiling.tile_um / p.resolution.seg_mpp)
    assert len(g) == 4


def test_grid_and_tiles_pickle_for_dask() -> None:
    import pickle

    g = TileGrid(5000, 3000, 0.25, 0.5, tile_um=512, halo_um=64, max_object_um=100)
    again = pickle.loads(pickle.dumps(g))
    assert again == g and again.tiles == g.tiles
    assert again.owner(4000, 2500) == g.owner(4000, 2500) == 4
    assert pickle.loads(pickle.dumps(g.tiles[3])) == g.tiles[3]
