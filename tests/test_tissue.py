"""Smear-area mask on generated thumbnails and tile selection with exact expectations."""

from __future__ import annotations

import numpy as np
import pytest

from wsiflow.config import Tissue
from wsiflow.tiling import TileGrid
from wsiflow.tissue import TissueMask, select_tiles, tissue_mask

DS = 16  # thumbnail at 8 µm/px of a 0.5 µm/px slide
PINK = (228, 168, 188)  # red cells under Wright-Giemsa
PURPLE = (110, 50, 150)  # nuclei


def _disc(img: np.ndarray, cx: float, cy: float, r: float, color: tuple[int, int, int]) -> None:
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    img[(xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r] = color


def _smear() -> np.ndarray:
    """96×64 thumbnail = 3×2 tiles of 32×32 thumbnail px (512 µm cores at 8 µm/px)."""
    rng = np.random.default_rng(1)
    img = np.clip(rng.normal(242, 2.0, (64, 96, 3)), 0, 255).astype(np.uint8)  # glass
    _disc(img, 16, 16, 8, PINK)  # tile 0: a cluster of red cells ...
    _disc(img, 14, 14, 3, PURPLE)  # ... with a nucleus
    img[20, 48] = PURPLE  # tile 1: a single-pixel speck (dust) -> removed
    _disc(img, 16, 48, 6, (95, 95, 95))  # tile 3: grey (unstained) smudge: dark but not coloured
    _disc(img, 80, 48, 7, PURPLE)  # tile 5: stained cells
    return img


def _grid() -> TileGrid:
    return TileGrid(96 * DS, 64 * DS, 0.5, 0.5, tile_um=256, halo_um=60, max_object_um=100)


def test_mask_marks_stained_material_only() -> None:
    tm = tissue_mask(_smear(), Tissue(), slide_size=(96 * DS, 64 * DS))
    assert tm.downsample == (16.0, 16.0)
    m = tm.mask
    assert m.shape == (64, 96) and m.dtype == bool
    assert m[16, 16] and m[14, 14] and m[48, 80]  # pink and purple discs
    assert not m[20, 48]  # lone speck removed
    assert not m[48, 16]  # grey smudge: no saturation
    assert not m[2, 2] and not m[40, 40]  # glass
    assert 0.05 < tm.fraction < 0.12


def test_select_tiles_keeps_exactly_the_stained_tiles() -> None:
    grid = _grid()
    assert (grid.n_rows, grid.n_cols) == (2, 3)
    tm = tissue_mask(_smear(), Tissue(), slide_size=(grid.width, grid.height))
    kept, frac = select_tiles(grid, tm, min_fraction=0.01)
    assert [t.id for t in kept] == [0, 5]
    assert frac == pytest.approx(2 / 6)


def test_select_tiles_threshold_is_inclusive_and_exact() -> None:
    grid = _grid()  # each core covers 32 × 32 = 1024 mask pixels
    mask = np.zeros((64, 96), bool)
    mask[0, 0:10] = True  # tile 0: 10 px
    mask[0, 32:43] = True  # tile 1: 11 px
    mask[63, 95] = True  # tile 5: 1 px
    tm = TissueMask(mask, (16.0, 16.0))
    kept, _ = select_tiles(grid, tm, 10 / 1024)
    assert [t.id for t in kept] == [0, 1]
    kept, _ = select_tiles(grid, tm, 11 / 1024)
    assert [t.id for t in kept] == [1]
    kept, frac = select_tiles(grid, tm, 0.0)
    assert len(kept) == 6 and frac == 1.0


def test_pixel_centre_rule_on_non_aligned_cores() -> None:
    # cores of 24 level-0 px over mask pixels of 16 px: mask column j counts for the
    # core containing its centre 16·j + 8.
    grid = TileGrid(48, 16, 1.0, 1.0, tile_um=24, halo_um=60, max_object_um=100)
    mask = np.zeros((1, 3), bool)
    mask[0, 1] = True  # centre at x = 24: first pixel of tile 1
    kept, _ = select_tiles(grid, TissueMask(mask, (16.0, 16.0)), 0.5)
    assert [t.id for t in kept] == [1]


def test_blank_glass_with_noise_selects_nothing() -> None:
    rng = np.random.default_rng(2)
    glass = np.clip(rng.normal(240, 3.0, (64, 96, 3)), 0, 255).astype(np.uint8)
    tm = tissue_mask(glass, Tissue(), slide_size=(96 * DS, 64 * DS))
    assert tm.fraction == 0.0
    kept, frac = select_tiles(_grid(), tm, 0.01)
    assert kept == [] and frac == 0.0


def test_method_none_keeps_everything() -> None:
    tm = tissue_mask(_smear(), Tissue(method="none"), slide_size=(96 * DS, 64 * DS))
    assert tm.mask.all()
    kept, frac = select_tiles(_grid(), tm, 0.5)
    assert len(kept) == 6 and frac == 1.0


def test_rejects_non_rgb_input() -> None:
    with pytest.raises(ValueError, match="uint8 RGB"):
        tissue_mask(np.zeros((10, 10), np.uint8), Tissue())
    with pytest.raises(ValueError, match="uint8 RGB"):
        tissue_mask(np.zeros((10, 10, 3), np.float32), Tissue())


def _closing_whole(mask: np.ndarray, radius: int) -> np.ndarray:
    """The closing on the whole image at once (what the banded one must reproduce)."""
    from scipy import ndimage as ndi

    if not mask.any():
        return mask
    dilated = ndi.distance_transform_edt(~mask) <= radius
    if dilated.all():
        return dilated
    return np.asarray(ndi.distance_transform_edt(dilated) > radius, bool)


def test_banded_closing_is_the_whole_image_closing(monkeypatch: pytest.MonkeyPatch) -> None:
    from wsiflow import tissue

    rng = np.random.default_rng(3)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 120, 2))
        radius = int(rng.integers(1, 9))
        mask = rng.random((h, w)) < rng.choice([0.0, 0.001, 0.02, 0.3, 0.9, 0.999, 1.0])
        monkeypatch.setattr(tissue, "BAND_PX", int(rng.integers(1, 2000)))  # 1 row … whole image
        assert np.array_equal(tissue._closing(mask, radius), _closing_whole(mask, radius)), (h, w, radius)


def test_mask_does_not_depend_on_the_band_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from wsiflow import tissue

    want = tissue_mask(_smear(), Tissue(), slide_size=(96 * DS, 64 * DS)).mask
    for band in (1, 96 * 5, 96 * 64 - 1):
        monkeypatch.setattr(tissue, "BAND_PX", band)
        assert np.array_equal(tissue_mask(_smear(), Tissue(), slide_size=(96 * DS, 64 * DS)).mask, want)
