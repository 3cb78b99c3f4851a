"""Where the nucleated cells go and what they are: exact class counts, placement, seams, touching.

Class counts are fixed before placement (largest-remainder rounding of the requested mix), so
the truth is known exactly: ``n_blast = round(blasts · N)``; the remaining cells are split by
lineage mix; within each lineage ``n_dysplastic = round(fraction · n_lineage)``. Cells are
placed largest first by rejection sampling on the smear density, never overlapping except
on purpose: a share of cells is placed touching an earlier cell, and a share is centred
near a tile seam (multiples of ``seam_um``) so the pipeline's ownership rule is exercised.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from wsiflow.errors import ConfigError
from wsiflow.synth.cells import (
    CLASS_CODES,
    CLASS_INDEX,
    DYSPLASTIC_OF,
    MAX_EXTENT,
    NORMAL_OF,
    CellDesign,
    design_cell,
    sample_subtype,
)
from wsiflow.synth.smear import DensityField

LINEAGES: tuple[str, ...] = ("erythroid", "granulocytic", "megakaryocytic")
DEFAULT_DYSPLASIA: dict[str, float] = {"erythroid": 0.15, "granulocytic": 0.05, "megakaryocytic": 0.30}
DEFAULT_MIX: dict[str, float] = {
    "erythroid": 0.30,
    "granulocytic": 0.48,
    "megakaryocytic": 0.07,
    "other": 0.15,
}


@dataclass(frozen=True)
class SynthParams:
    """Everything that determines a generated slide (same params → same slide)."""

    width: int = 12000
    height: int = 12000
    mpp: float = 0.25
    seed: int = 0
    dysplasia: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_DYSPLASIA))
    blasts: float = 0.07
    lineage_mix: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    cells_per_mm2: float = 1600.0  # nucleated cells per mm² where the smear is at full density
    seam_um: float = 512.0  # tile_um of pipelines/mds.yaml
    seam_fraction: float = 0.06
    touching_fraction: float = 0.10
    class_counts: Mapping[str, int] | None = None  # explicit counts (crop data sets); overrides the mix

    def validate(self) -> None:
        src = "wsiflow synth"
        if self.width < 256 or self.height < 256:
            raise ConfigError(src, "--size", "each side must be at least 256 px")
        if not 0.05 <= self.mpp <= 2.0:
            raise ConfigError(src, "--mpp", "must be within 0.05..2 µm/px")
        for k, v in self.dysplasia.items():
            if k not in LINEAGES:
                raise ConfigError(src, "--dysplasia", f"unknown lineage {k!r} (use {', '.join(LINEAGES)})")
            if not 0.0 <= v <= 1.0:
                raise ConfigError(src, "--dysplasia", f"{k}={v} is not a fraction within 0..1")
        if not 0.0 <= self.blasts < 1.0:
            raise ConfigError(src, "--blasts", "must be a fraction within 0..1")
        if self.cells_per_mm2 <= 0:
            raise ConfigError(src, "cells_per_mm2", "must be positive")
        if self.class_counts is not None:
            bad = [c for c in self.class_counts if c not in CLASS_INDEX]
            if bad:
                raise ConfigError(src, "class_counts", f"unknown classes {bad}")

    def to_dict(self) -> dict[str, object]:
        return {
            "width": self.width,
            "height": self.height,
            "mpp": self.mpp,
            "seed": self.seed,
            "dysplasia": dict(self.dysplasia),
            "blasts": self.blasts,
            "lineage_mix": dict(self.lineage_mix),
            "cells_per_mm2": self.cells_per_mm2,
            "seam_um": self.seam_um,
            "seam_fraction": self.seam_fraction,
            "touching_fraction": self.touching_fraction,
            "class_counts": dict(self.class_counts) if self.class_counts is not None else None,
        }


def _largest_remainder(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    keys = list(weights)
    w = np.array([max(0.0, float(weights[k])) for k in keys])
    if total <= 0 or w.sum() <= 0:
        return dict.fromkeys(keys, 0)
    exact = w / w.sum() * total
    base = np.floor(exact).astype(int)
    rem = total - int(base.sum())
    order = np.argsort(-(exact - base), kind="stable")
    base[order[:rem]] += 1
    return {k: int(b) for k, b in zip(keys, base, strict=True)}


def class_counts_for(n_total: int, params: SynthParams) -> dict[str, int]:
    """Exact per-class counts for ``n_total`` nucleated cells under ``params``."""
    if params.class_counts is not None:
        return {c: int(params.class_counts.get(c, 0)) for c in CLASS_CODES}
    counts = dict.fromkeys(CLASS_CODES, 0)
    counts["blast"] = round(params.blasts * n_total)
    mix = _largest_remainder(n_total - counts["blast"], params.lineage_mix)
    counts["other"] = mix.get("other", 0)
    for lin in LINEAGES:
        n = mix.get(lin, 0)
        f = float(params.dysplasia.get(lin, DEFAULT_DYSPLASIA[lin]))
        counts[DYSPLASTIC_OF[lin]] = round(f * n)
        counts[NORMAL_OF[lin]] = n - counts[DYSPLASTIC_OF[lin]]
    return counts


@dataclass(frozen=True)
class CellLayout:
    """The nucleated cells of a slide, in drawing order."""

    x: NDArray[np.float64]  # centre, level-0 px
    y: NDArray[np.float64]
    class_idx: NDArray[np.int16]
    subtype: tuple[str, ...]
    diameter_um: NDArray[np.float64]
    seed: NDArray[np.int64]
    touching: NDArray[np.bool_]
    mpp: float
    requested: dict[str, int]
    dropped: int

    def __len__(self) -> int:
        return len(self.x)

    def design(self, i: int) -> CellDesign:
        code = CLASS_CODES[int(self.class_idx[i])]
        return design_cell(
            code,
            self.subtype[i],
            float(self.diameter_um[i]),
            float(self.x[i]),
            float(self.y[i]),
            int(self.seed[i]),
            self.mpp,
        )

    def extent_px(self) -> NDArray[np.float64]:
        return self.diameter_um / 2 / self.mpp * MAX_EXTENT + 3.0


class _Grid:
    """A spatial hash of placed cells for overlap checks."""

    def __init__(self, bucket: float) -> None:
        self.bucket = bucket
        self.cells: dict[tuple[int, int], list[int]] = {}

    def add(self, i: int, x: float, y: float) -> None:
        self.cells.setdefault((int(x // self.bucket), int(y // self.bucket)), []).append(i)

    def near(self, x: float, y: float) -> list[int]:
        bx, by = int(x // self.bucket), int(y // self.bucket)
        out: list[int] = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                out.extend(self.cells.get((bx + dx, by + dy), ()))
        return out


def place_cells(params: SynthParams, field: DensityField, rng: np.random.Generator) -> CellLayout:
    """Choose every nucleated cell's class, size and position."""
    mpp = params.mpp
    w, h = params.width, params.height
    area_mm2 = w * h * (mpp / 1000.0) ** 2
    usable = float(np.where(field.grid > 0.15, field.grid, 0.0).mean())
    n_total = max(1, round(params.cells_per_mm2 * area_mm2 * usable))
    counts = class_counts_for(n_total, params)
    codes = [c for c in CLASS_CODES for _ in range(counts[c])]
    rng.shuffle(codes)  # type: ignore[arg-type]
    subs, diams = [], []
    for c in codes:
        s, d = sample_subtype(c, rng)
        subs.append(s)
        diams.append(d)
    diam = np.array(diams, np.float64)
    order = np.argsort(-diam, kind="stable")
    r_px = diam / 2 / mpp
    max_r = float(r_px.max()) * MAX_EXTENT if len(r_px) else 1.0
    grid = _Grid(2 * max_r + 8)
    seam = params.seam_um / mpp
    seams_x = np.arange(seam, w - 1, seam) if seam > 0 else np.zeros(0)
    seams_y = np.arange(seam, h - 1, seam) if seam > 0 else np.zeros(0)
    gap = 1.0 / mpp  # at least 1 µm between cells that are not meant to touch

    px: list[float] = []
    py: list[float] = []
    pr: list[float] = []
    kept: list[int] = []
    touching: list[bool] = []
    dropped = 0
    for i in order:
        ri = r_px[i]
        ext = ri * MAX_EXTENT + 2.0
        placed = False
        for _attempt in range(80):
            mode = rng.random()
            anchor = -1
            if mode < params.touching_fraction and px:
                anchor = int(rng.integers(0, len(px)))
                ang = rng.uniform(0, 2 * math.pi)
                dist = (ri + pr[anchor]) * rng.uniform(0.97, 1.02)
                x, y = px[anchor] + dist * math.cos(ang), py[anchor] + dist * math.sin(ang)
            elif mode < params.touching_fraction + params.seam_fraction and (len(seams_x) or len(seams_y)):
                off = rng.uniform(-0.7, 0.7) * ri
                if len(seams_x) and (rng.random() < 0.5 or not len(seams_y)):
                    x, y = float(rng.choice(seams_x)) + off, rng.uniform(0, h)
                else:
                    x, y = rng.uniform(0, w), float(rng.choice(seams_y)) + off
            else:
                x, y = rng.uniform(0, w), rng.uniform(0, h)
            if not (ext <= x <= w - ext and ext <= y <= h - ext):
                continue
            dens = field.at1(x, y)
            if dens < 0.15 or rng.random() > dens:
                continue
            ok = True
            for j in grid.near(x, y):
                need = (ri + pr[j]) * (0.96 if j == anchor else MAX_EXTENT) + (0 if j == anchor else gap)
                if (x - px[j]) ** 2 + (y - py[j]) ** 2 < need * need:
                    ok = False
                    break
            if not ok:
                continue
            grid.add(len(px), x, y)
            px.append(x)
            py.append(y)
            pr.append(ri)
            kept.append(int(i))
            touching.append(anchor >= 0)
            placed = True
            break
        if not placed:
            dropped += 1
    idx = np.array(kept, np.int64)
    return CellLayout(
        x=np.array(px, np.float64),
        y=np.array(py, np.float64),
        class_idx=np.array([CLASS_INDEX[codes[i]] for i in idx], np.int16),
        subtype=tuple(subs[i] for i in idx),
        diameter_um=diam[idx] if len(idx) else np.zeros(0),
        seed=rng.integers(0, 2**62, len(idx), dtype=np.int64),
        touching=np.array(touching, bool),
        mpp=mpp,
        requested=counts,
        dropped=dropped,
    )
