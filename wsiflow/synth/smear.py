"""The smear around the nucleated cells: density, plasma, red cells, platelets, stain.

Everything is a function of level-0 position (never of how the slide is cut into render
regions), so any region renders the same pixels whichever way it is requested:

* :class:`DensityField` — smear thickness in [0, 1] on a coarse grid (32 µm), interpolated
  bilinearly: thick end on the left thinning to a feathered edge on the right, blotchy
  variation, empty margins and a few empty holes (so tissue detection matters).
* :class:`SmearStyle` — per-slide stain and brightness variation (white point, per-channel
  optical-density gain, plasma and red-cell colours).
* :class:`RedCells` — pale-centred discs ~7.5 µm (and a few platelets) at a density that follows
  the field, drawn from a small library of stamps, accumulated in optical density (overlaps
  darken as in a thick smear).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from wsiflow.synth.cells import od_of

FIELD_STEP_UM = 32.0
RBC_DIAMETER_UM = 7.5


@dataclass(frozen=True)
class DensityField:
    grid: NDArray[np.float32]  # (gh, gw), value at level-0 ((j + 0.5) * step, (i + 0.5) * step)
    step: float  # level-0 px per grid cell

    @classmethod
    def generate(cls, width: int, height: int, mpp: float, rng: np.random.Generator) -> DensityField:
        step = FIELD_STEP_UM / mpp
        gw, gh = math.ceil(width / step), math.ceil(height / step)
        gx = (np.arange(gw) + 0.5) * step / width  # 0..1 across the slide
        gy = (np.arange(gh) + 0.5) * step / height
        # thick end (left) → feathered edge (right), ending a little before the right border
        edge = rng.uniform(0.86, 0.95)
        thick = np.clip((edge - gx) / (edge - 0.25), 0.0, 1.0) ** 0.7
        base = 0.35 + 0.65 * thick
        base = np.where(gx > edge, 0.0, base)
        # blotches: smooth noise, 150–400 µm scale
        sigma = max(1.0, rng.uniform(150, 400) / FIELD_STEP_UM)
        noise = ndi.gaussian_filter(rng.standard_normal((gh, gw)), sigma, mode="reflect")
        noise = noise / (noise.std() + 1e-9)
        d = base[None, :] * np.clip(1.0 + 0.22 * noise, 0.4, 1.5)
        # empty margins top and bottom (the smear does not reach the slide's long edges)
        m = rng.uniform(0.02, 0.05)
        ramp = np.clip(np.minimum(gy - m, 1 - m - gy) / 0.03, 0, 1)
        d = d * ramp[:, None]
        # empty holes
        area_mm2 = width * height * (mpp / 1000) ** 2
        n_holes = int(rng.poisson(1.0 * area_mm2)) + 1
        yy, xx = np.mgrid[0:gh, 0:gw]
        for _ in range(n_holes):
            hx, hy = rng.uniform(0.1, 0.85) * gw, rng.uniform(0.1, 0.9) * gh
            ra = rng.uniform(50, 150) / FIELD_STEP_UM
            rb = ra * rng.uniform(0.5, 1.0)
            q = ((xx - hx) / ra) ** 2 + ((yy - hy) / rb) ** 2
            d = d * np.clip(q - 0.6, 0, 1) ** 0.5
        return cls(np.clip(d, 0, 1).astype(np.float32), float(step))

    def at(self, x: NDArray[np.float64], y: NDArray[np.float64]) -> NDArray[np.float32]:
        coords = np.stack([np.asarray(y) / self.step - 0.5, np.asarray(x) / self.step - 0.5])
        return ndi.map_coordinates(self.grid, coords, order=1, mode="nearest").astype(np.float32)

    def region(self, x0: int, y0: int, w: int, h: int) -> NDArray[np.float32]:
        """Bilinear field on a level-0 pixel region, separable (rows then columns)."""
        gy = (np.arange(y0, y0 + h) + 0.5) / self.step - 0.5
        gx = (np.arange(x0, x0 + w) + 0.5) / self.step - 0.5
        gh, gw = self.grid.shape
        iy = np.clip(np.floor(gy).astype(int), 0, gh - 1)
        fy = np.clip(gy - iy, 0, 1).astype(np.float32)
        iy1 = np.clip(iy + 1, 0, gh - 1)
        fy = np.where(gy < 0, 0, fy).astype(np.float32)
        rows = self.grid[iy] * (1 - fy)[:, None] + self.grid[iy1] * fy[:, None]
        ix = np.clip(np.floor(gx).astype(int), 0, gw - 1)
        fx = np.clip(gx - ix, 0, 1).astype(np.float32)
        fx = np.where(gx < 0, 0, fx).astype(np.float32)
        ix1 = np.clip(ix + 1, 0, gw - 1)
        return (rows[:, ix] * (1 - fx)[None, :] + rows[:, ix1] * fx[None, :]).astype(np.float32)

    def at1(self, x: float, y: float) -> float:
        """Bilinear value at one level-0 point."""
        gh, gw = self.grid.shape
        gx = min(max(x / self.step - 0.5, 0.0), gw - 1.0)
        gy = min(max(y / self.step - 0.5, 0.0), gh - 1.0)
        ix, iy = min(int(gx), gw - 1), min(int(gy), gh - 1)
        ix1, iy1 = min(ix + 1, gw - 1), min(iy + 1, gh - 1)
        fx, fy = gx - ix, gy - iy
        g = self.grid
        top = float(g[iy, ix]) * (1 - fx) + float(g[iy, ix1]) * fx
        bot = float(g[iy1, ix]) * (1 - fx) + float(g[iy1, ix1]) * fx
        return top * (1 - fy) + bot * fy

    def mean(self) -> float:
        return float(self.grid.mean())

    def area_weight(self) -> NDArray[np.float64]:
        return self.grid.astype(np.float64)


@dataclass(frozen=True)
class SmearStyle:
    white: NDArray[np.float32]  # (3,) background brightness per channel
    gain: NDArray[np.float32]  # (3,) per-channel optical-density gain (stain strength / hue)
    plasma_od: NDArray[np.float32]
    rbc_od: NDArray[np.float32]
    platelet_od: NDArray[np.float32]

    @classmethod
    def generate(cls, rng: np.random.Generator) -> SmearStyle:
        white = np.clip(rng.uniform(238, 252) + rng.normal(0, 3, 3), 225, 255).astype(np.float32)
        gain = (rng.uniform(0.88, 1.12) * rng.uniform(0.93, 1.07, 3)).astype(np.float32)
        plasma = od_of((245 + rng.normal(0, 2), 222 + rng.normal(0, 4), 225 + rng.normal(0, 4)))
        rbc = od_of((240 + rng.normal(0, 4), 168 + rng.normal(0, 7), 178 + rng.normal(0, 7)))
        platelet = od_of((150, 110, 185))
        return cls(white, gain, plasma, rbc, platelet)

    def to_rgb(self, od: NDArray[np.float32], noise: NDArray[np.float32] | None = None) -> NDArray[np.uint8]:
        """RGB = white · exp(−gain · OD) (+ noise); ``od`` is used as scratch space."""
        v = od
        np.multiply(v, -self.gain, out=v)
        np.exp(v, out=v)
        np.multiply(v, self.white, out=v)
        v += noise[..., None] if noise is not None else np.float32(0.5)
        if noise is not None:
            v += np.float32(0.5)
        np.clip(v, 0, 255, out=v)
        return v.astype(np.uint8)


_NOISE = 256


def pixel_noise(x0: int, y0: int, w: int, h: int) -> NDArray[np.float32]:
    """Sensor noise (σ ≈ 2 levels) from a fixed tile indexed by level-0 position."""
    t = _noise_tile()
    return t[np.ix_((np.arange(y0, y0 + h) % _NOISE), (np.arange(x0, x0 + w) % _NOISE))]


_noise_cache: dict[str, NDArray[np.float32]] = {}


def _noise_tile() -> NDArray[np.float32]:
    if "t" not in _noise_cache:
        rng = np.random.default_rng(7)
        _noise_cache["t"] = (rng.standard_normal((_NOISE, _NOISE)) * 2.0).astype(np.float32)
    return _noise_cache["t"]


def _rbc_stamps(mpp: float, rng: np.random.Generator, n: int = 24) -> list[NDArray[np.float32]]:
    """Red-cell optical-density profiles (relative to the red-cell colour): a disc whose centre is pale."""
    out = []
    for _ in range(n):
        r = RBC_DIAMETER_UM / 2 / mpp * rng.uniform(0.88, 1.12)
        e = rng.uniform(1.0, 1.18)
        ang = rng.uniform(0, math.pi)
        ext = math.ceil(r * e) + 2
        yy, xx = np.mgrid[-ext : ext + 1, -ext : ext + 1].astype(np.float32)
        c, s = math.cos(ang), math.sin(ang)
        u = (xx * c + yy * s) / e
        v = (-xx * s + yy * c) * e
        d = np.hypot(u, v)
        edge = np.clip(r - d + 0.5, 0, 1)
        pallor = 1.0 - rng.uniform(0.55, 0.75) * np.exp(-((d / (0.45 * r)) ** 2))
        rim = 1.0 + 0.15 * np.exp(-(((d - 0.8 * r) / (0.15 * r)) ** 2))
        out.append((edge * pallor * rim).astype(np.float32))
    return out


def _platelet_stamps(mpp: float, rng: np.random.Generator, n: int = 8) -> list[NDArray[np.float32]]:
    out = []
    for _ in range(n):
        r = rng.uniform(0.8, 1.4) / mpp
        ext = math.ceil(r * 1.3) + 2
        yy, xx = np.mgrid[-ext : ext + 1, -ext : ext + 1].astype(np.float32)
        ang = np.arctan2(yy, xx)
        rr = r * (1 + 0.2 * np.cos(3 * ang + rng.uniform(0, 6)))
        out.append(np.clip(rr - np.hypot(xx, yy) + 0.5, 0, 1).astype(np.float32))
    return out


@dataclass(frozen=True)
class RedCells:
    """Red cells and platelets: positions sorted by y, stamp index, per-cell strength."""

    x: NDArray[np.float64]
    y: NDArray[np.float64]
    stamp: NDArray[np.int32]
    strength: NDArray[np.float32]
    platelet: NDArray[np.bool_]
    stamps: tuple[NDArray[np.float32], ...]
    n_rbc_stamps: int
    max_half: int

    @classmethod
    def generate(
        cls,
        field: DensityField,
        width: int,
        height: int,
        mpp: float,
        rng: np.random.Generator,
        coverage: float = 1.1,
    ) -> RedCells:
        rbc_area_px = math.pi * (RBC_DIAMETER_UM / 2 / mpp) ** 2
        gh, gw = field.grid.shape
        # expected red cells per grid cell (coverage of the slide by red cells grows with density)
        lam = coverage * field.grid.astype(np.float64) * field.step**2 / rbc_area_px
        counts = rng.poisson(lam)
        n = int(counts.sum())
        gi = np.repeat(np.arange(gh * gw), counts.ravel())
        xs = (gi % gw + rng.random(n)) * field.step
        ys = (gi // gw + rng.random(n)) * field.step
        # platelets: a few per grid cell in the smear
        pl = rng.poisson(0.15 * field.grid.astype(np.float64) * (field.step * mpp / 32.0) ** 2)
        pn = int(pl.sum())
        pi = np.repeat(np.arange(gh * gw), pl.ravel())
        pxs = (pi % gw + rng.random(pn)) * field.step
        pys = (pi // gw + rng.random(pn)) * field.step
        rbc = _rbc_stamps(mpp, rng)
        plt = _platelet_stamps(mpp, rng)
        x = np.concatenate([xs, pxs])
        y = np.concatenate([ys, pys])
        stamp = np.concatenate([rng.integers(0, len(rbc), n), len(rbc) + rng.integers(0, len(plt), pn)])
        strength = np.concatenate([rng.uniform(0.85, 1.15, n), rng.uniform(0.8, 1.2, pn)]).astype(np.float32)
        platelet = np.concatenate([np.zeros(n, bool), np.ones(pn, bool)])
        keep = (x < width) & (y < height)
        order = np.argsort(y[keep], kind="stable")
        stamps = tuple(rbc + plt)
        return cls(
            x=x[keep][order],
            y=y[keep][order],
            stamp=stamp[keep][order].astype(np.int32),
            strength=strength[keep][order],
            platelet=platelet[keep][order],
            stamps=stamps,
            n_rbc_stamps=len(rbc),
            max_half=max(s.shape[0] // 2 for s in stamps) + 1,
        )

    def __len__(self) -> int:
        return int(np.count_nonzero(~self.platelet))

    def accumulate(self, x0: int, y0: int, w: int, h: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """(red-cell, platelet) optical-density multipliers on the region."""
        rbc = np.zeros((h, w), np.float32)
        plt = np.zeros((h, w), np.float32)
        m = self.max_half
        lo = np.searchsorted(self.y, y0 - m, side="left")
        hi = np.searchsorted(self.y, y0 + h + m, side="right")
        if hi <= lo:
            return rbc, plt
        xs = self.x[lo:hi]
        sel = np.flatnonzero((xs > x0 - m) & (xs < x0 + w + m)) + lo
        for i in sel:
            s = self.stamps[self.stamp[i]]
            half = s.shape[0] // 2
            cx, cy = round(float(self.x[i])), round(float(self.y[i]))
            ax0, ay0 = cx - half - x0, cy - half - y0
            bx0, by0 = max(ax0, 0), max(ay0, 0)
            bx1, by1 = min(ax0 + s.shape[1], w), min(ay0 + s.shape[0], h)
            if bx1 <= bx0 or by1 <= by0:
                continue
            dst = plt if self.platelet[i] else rbc
            dst[by0:by1, bx0:bx1] += self.strength[i] * s[by0 - ay0 : by1 - ay0, bx0 - ax0 : bx1 - ax0]
        return rbc, plt


def background_od(
    field: DensityField, style: SmearStyle, cells: RedCells, x0: int, y0: int, w: int, h: int
) -> NDArray[np.float32]:
    """Optical density of plasma, red cells and platelets on a level-0 region, (h, w, 3)."""
    d = field.region(x0, y0, w, h)
    rbc, plt = cells.accumulate(x0, y0, w, h)
    mix = np.stack([style.plasma_od, style.rbc_od, style.platelet_od]).astype(np.float32)
    return np.stack([d, rbc, plt], axis=-1) @ mix
