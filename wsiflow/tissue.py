"""Smear-area (stained material) mask from a low-resolution thumbnail.

On a Wright-Giemsa smear the glass is near-white and unstained, red cells are pink and
nuclei purple: stained material is both *coloured* (HSV saturation) and *absorbing*
(optical density). A thumbnail pixel is kept when its saturation reaches a threshold
(Otsu on the thumbnail, never below a floor, so an empty slide does not become all
tissue, and never above a ceiling, so purple nuclei cannot push the cut above pale pink
red cells) and its mean optical density reaches ``min_od``. Nearby specks are joined by a
morphological closing and lone specks (dust, single stray cells) removed, both sized in µm.
Tiles whose core holds less than ``min_tile_fraction`` stained pixels are never read at
full resolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_objects

from wsiflow.config import Tissue
from wsiflow.types import Box

__all__ = [
    "THUMBNAIL_MAX_PX",
    "TissueMask",
    "core_fractions",
    "select_tiles",
    "slide_tissue_mask",
    "tissue_mask",
]

SATURATION_FLOOR = 0.05  # glass in brightfield scans sits below this
SATURATION_CEILING = 0.15  # pale pink red cells sit above this; Otsu never cuts higher
CLOSING_UM = 16.0  # join stained specks up to about two cell diameters apart
MIN_OBJECT_UM = 24.0  # drop stained specks smaller than a square of this side
THUMBNAIL_MAX_PX = 4096  # longest side of the thumbnail the mask is computed on
THUMBNAIL_MIN_PX = 64
BAND_PX = 1 << 18  # thumbnail pixels per band of rows for the per-pixel steps (bounded temporaries)


@dataclass(frozen=True)
class TissueMask:
    """A boolean mask over the slide; ``downsample`` = level-0 px per mask px (x, y)."""

    mask: NDArray[np.bool_]
    downsample: tuple[float, float]

    @property
    def fraction(self) -> float:
        """Fraction of the slide area marked as stained material."""
        return float(self.mask.mean()) if self.mask.size else 0.0


class _HasCore(Protocol):
    @property
    def core(self) -> Box: ...


T = TypeVar("T", bound=_HasCore)
T_co = TypeVar("T_co", bound=_HasCore, covariant=True)


class _Grid(Protocol[T_co]):
    @property
    def tiles(self) -> Sequence[T_co]: ...


def tissue_mask(
    thumbnail_rgb: NDArray[np.uint8],
    cfg: Tissue,
    *,
    mpp: float | None = None,
    slide_size: tuple[int, int] | None = None,
) -> TissueMask:
    """Mask of stained material on an RGB uint8 thumbnail.

    ``mpp`` is the thumbnail's µm/px (default ``cfg.thumbnail_mpp``), used to size the
    morphology. ``slide_size`` (level-0 w, h) sets the downsample; without it it is 1.
    """
    rgb = np.asarray(thumbnail_rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.dtype != np.uint8:
        raise ValueError("thumbnail must be an (h, w, 3) uint8 RGB array")
    rgb = rgb[..., :3]
    h, w = rgb.shape[:2]
    if slide_size is not None:
        downsample = (slide_size[0] / max(w, 1), slide_size[1] / max(h, 1))
    else:
        downsample = (1.0, 1.0)
    if cfg.method == "none" or rgb.size == 0:
        return TissueMask(np.ones((h, w), bool), downsample)

    # per pixel, a band of rows at a time (rgb2hsv alone holds ~90 bytes per pixel): what
    # stays is the saturation (float64, for Otsu on the whole thumbnail) and a bool per pixel
    sat = np.empty((h, w), np.float64)
    absorbing = np.empty((h, w), bool)
    for r0, r1 in _bands(h, w):
        band = rgb[r0:r1]
        sat[r0:r1] = rgb2hsv(band)[..., 1]
        od = -np.log10(np.maximum(band.astype(np.float32), 1.0) / 255.0).mean(axis=2)
        absorbing[r0:r1] = od >= cfg.min_od
    floor = cfg.min_saturation if cfg.min_saturation is not None else SATURATION_FLOOR
    t_sat = floor
    if np.ptp(sat) > 0:
        t_sat = max(floor, min(float(threshold_otsu(sat)), SATURATION_CEILING))
    mask = (sat >= t_sat) & absorbing
    del sat, absorbing

    px_um = float(mpp if mpp is not None else cfg.thumbnail_mpp)
    radius = math.ceil(CLOSING_UM / px_um - 1e-9)
    if radius >= 1:
        mask = _closing(mask, radius)
    max_small = math.floor((MIN_OBJECT_UM / px_um) ** 2) - 1
    if max_small >= 1 and mask.any():
        mask = remove_small_objects(mask, max_size=max_small)
    return TissueMask(np.asarray(mask, bool), downsample)


class _Thumbnails(Protocol):
    """What :func:`slide_tissue_mask` needs of a slide (:class:`wsiflow.slide.Slide` has it)."""

    def thumbnail(self, max_px: int = ...) -> NDArray[np.uint8]: ...


def slide_tissue_mask(slide: _Thumbnails, size: tuple[int, int], mpp: float, cfg: Tissue) -> TissueMask:
    """The tissue mask of a slide of level-0 ``size`` at ``mpp`` µm/px, from a thumbnail near
    ``cfg.thumbnail_mpp`` (its longest side bounded to 64…4096 px); the thumbnail's true
    µm/px comes from its size, not from the request."""
    w, h = size
    want = max(w, h) * mpp / cfg.thumbnail_mpp
    thumb = slide.thumbnail(int(min(THUMBNAIL_MAX_PX, max(THUMBNAIL_MIN_PX, round(want)))))
    thumb_mpp = w * mpp / max(1, thumb.shape[1])
    return tissue_mask(thumb, cfg, mpp=thumb_mpp, slide_size=(w, h))


def _bands(h: int, w: int) -> Iterator[tuple[int, int]]:
    """Row ranges of about :data:`BAND_PX` pixels covering an image of ``h`` rows of ``w``."""
    step = max(1, BAND_PX // max(1, w))
    for r0 in range(0, h, step):
        yield r0, min(h, r0 + step)


def _closing(mask: NDArray[np.bool_], radius: int) -> NDArray[np.bool_]:
    """Binary closing with a disc of ``radius`` px via distance transforms (cost independent of
    radius), a band of rows at a time: a pixel's result depends only on the pixels within
    ``radius`` of it, so each band is computed with ``radius`` rows of context either side
    and the result is the whole image's (the transform holds ~40 bytes per pixel)."""
    if not mask.any():
        return mask
    dilated = _by_bands(mask, radius, _dilate)
    if dilated.all():
        return dilated
    return _by_bands(dilated, radius, _erode)


def _dilate(mask: NDArray[np.bool_], radius: int) -> NDArray[np.bool_]:
    """Pixels within ``radius`` of a set pixel (none set: none)."""
    if not mask.any():
        return np.zeros_like(mask)
    return np.asarray(ndi.distance_transform_edt(~mask) <= radius, bool)


def _erode(mask: NDArray[np.bool_], radius: int) -> NDArray[np.bool_]:
    """Pixels farther than ``radius`` from every unset pixel of the image (none unset: all;
    beyond the image's edge counts as set, as the transform has it)."""
    if mask.all():
        return np.ones_like(mask)
    return np.asarray(ndi.distance_transform_edt(mask) > radius, bool)


def _by_bands(
    mask: NDArray[np.bool_],
    radius: int,
    op: Callable[[NDArray[np.bool_], int], NDArray[np.bool_]],
) -> NDArray[np.bool_]:
    h, w = mask.shape
    out = np.empty_like(mask)
    for r0, r1 in _bands(h, w):
        a, b = max(0, r0 - radius), min(h, r1 + radius)
        out[r0:r1] = op(mask[a:b], radius)[r0 - a : r1 - a]
    return out


def core_fractions(grid: _Grid[T], mask: TissueMask) -> NDArray[np.float64]:
    """The stained fraction of each of ``grid``'s tile cores (in ``grid.tiles`` order).

    A mask pixel counts for a core when its centre lies inside the core; a core too small
    to contain any pixel centre uses the pixel under its own centre.
    """
    tiles = list(grid.tiles)
    if not tiles:
        return np.zeros(0, np.float64)
    m = np.asarray(mask.mask, bool)
    mh, mw = m.shape
    # a summed-area table; int32 holds any thumbnail's count (≤ 4096² pixels), at half the memory
    integral = np.zeros((mh + 1, mw + 1), np.int32 if m.size < 2**31 else np.int64)
    np.cumsum(m, axis=0, dtype=integral.dtype, out=integral[1:, 1:])
    np.cumsum(integral[1:, 1:], axis=1, out=integral[1:, 1:])
    dx, dy = mask.downsample
    x0 = np.array([t.core.x for t in tiles]) / dx
    x1 = np.array([t.core.x1 for t in tiles]) / dx
    y0 = np.array([t.core.y for t in tiles]) / dy
    y1 = np.array([t.core.y1 for t in tiles]) / dy
    # pixel j's centre (j + 0.5) lies in [a, b)  <=>  ceil(a - 0.5) <= j < ceil(b - 0.5)
    c0 = np.clip(np.ceil(x0 - 0.5), 0, mw).astype(np.int64)
    c1 = np.clip(np.ceil(x1 - 0.5), 0, mw).astype(np.int64)
    r0 = np.clip(np.ceil(y0 - 0.5), 0, mh).astype(np.int64)
    r1 = np.clip(np.ceil(y1 - 0.5), 0, mh).astype(np.int64)
    empty = (c1 <= c0) | (r1 <= r0)
    if empty.any():
        cx = np.clip(np.floor((x0 + x1) / 2), 0, mw - 1).astype(np.int64)
        cy = np.clip(np.floor((y0 + y1) / 2), 0, mh - 1).astype(np.int64)
        c0 = np.where(empty, cx, c0)
        c1 = np.where(empty, cx + 1, c1)
        r0 = np.where(empty, cy, r0)
        r1 = np.where(empty, cy + 1, r1)
    stained = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    total = (r1 - r0) * (c1 - c0)
    frac = np.where(total > 0, stained / np.maximum(total, 1), 0.0)
    return np.asarray(frac, np.float64)


def select_tiles(
    grid: _Grid[T], mask: TissueMask, min_fraction: float, fractions: NDArray[np.float64] | None = None
) -> tuple[list[T], float]:
    """Tiles whose core has ≥ ``min_fraction`` stained pixels, and the fraction of tiles kept;
    ``fractions``: :func:`core_fractions` of ``grid`` and ``mask`` if already computed."""
    tiles = list(grid.tiles)
    if not tiles:
        return [], 0.0
    keep = (core_fractions(grid, mask) if fractions is None else fractions) >= min_fraction
    kept = [t for t, k in zip(tiles, keep, strict=True) if k]
    return kept, len(kept) / len(tiles)
