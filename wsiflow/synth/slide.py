"""A generated bone-marrow aspirate slide: render any region, stream it to a pyramidal TIFF,
and write its truth (``OUT.truth.geojson`` and ``OUT.truth.json``).

Rendering is region-based and position-deterministic (see :mod:`wsiflow.synth.smear`), so
the slide is written one tile row at a time: each row is rendered in column chunks, only the
cells overlapping a chunk are drawn (a cell crossing rows is rendered once and cached until
the rows pass it), and memory stays bounded whatever the slide size.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

from wsiflow._version import __version__
from wsiflow.atomic import atomic_open, atomic_write_bytes
from wsiflow.synth.cells import CLASS_CODES, LINEAGE_OF, CellPatch, render_cell
from wsiflow.synth.layout import LINEAGES, CellLayout, SynthParams, place_cells
from wsiflow.synth.smear import DensityField, RedCells, SmearStyle, background_od, pixel_noise

CHUNK = 4096  # columns rendered at once inside a tile row
TRUTH_FORMAT = "wsiflow-synth-truth/1"

# QuPath display names and colours of pipelines/mds.yaml (kept here so synth needs no YAML).
CLASS_NAMES: dict[str, str] = {
    "EN": "Erythroid (normal)",
    "GN": "Granulocytic (normal)",
    "MN": "Megakaryocytic (normal)",
    "ED": "Erythroid (dysplastic)",
    "GD": "Granulocytic (dysplastic)",
    "MD": "Megakaryocytic (dysplastic)",
    "blast": "Blast",
    "other": "Other nucleated cell",
}
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "EN": (200, 60, 60),
    "GN": (60, 120, 220),
    "MN": (60, 170, 80),
    "ED": (255, 140, 0),
    "GD": (160, 60, 200),
    "MD": (230, 200, 0),
    "blast": (255, 0, 160),
    "other": (128, 128, 128),
}


def truth_paths(slide_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``OUT.svs`` → (``OUT.truth.geojson``, ``OUT.truth.json``)."""
    p = Path(slide_path)
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return p.with_name(stem + ".truth.geojson"), p.with_name(stem + ".truth.json")


def polygon_area_centroid(poly: NDArray[np.float64]) -> tuple[float, float, float]:
    """Shoelace area (px²) and centroid of an open ring."""
    x, y = poly[:, 0], poly[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    a = cross.sum() / 2.0
    if abs(a) < 1e-12:
        return 0.0, float(x.mean()), float(y.mean())
    cx = ((x + xn) * cross).sum() / (6.0 * a)
    cy = ((y + yn) * cross).sum() / (6.0 * a)
    return float(abs(a)), float(cx), float(cy)


@dataclass
class SyntheticSlide:
    params: SynthParams
    density: DensityField
    style: SmearStyle
    red: RedCells
    layout: CellLayout
    bbox: NDArray[np.float64]  # (n, 4) conservative level-0 extent of each cell
    _cache: dict[int, CellPatch] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def generate(cls, params: SynthParams) -> SyntheticSlide:
        params.validate()
        rng = np.random.default_rng(params.seed)
        density = DensityField.generate(params.width, params.height, params.mpp, rng)
        style = SmearStyle.generate(rng)
        red = RedCells.generate(density, params.width, params.height, params.mpp, rng)
        layout = place_cells(params, density, rng)
        ext = layout.extent_px()
        bbox = np.stack([layout.x - ext, layout.y - ext, layout.x + ext, layout.y + ext], axis=1)
        return cls(params, density, style, red, layout, bbox)

    @property
    def size(self) -> tuple[int, int]:
        return self.params.width, self.params.height

    # ------------------------------------------------------------------ rendering

    def _patch(self, i: int) -> CellPatch:
        p = self._cache.get(i)
        if p is None:
            if len(self._cache) > 20000:
                self._cache.clear()
            p = render_cell(self.layout.design(i))
            self._cache[i] = p
        return p

    def _forget_above(self, y: int) -> None:
        for i in [i for i in self._cache if self.bbox[i, 3] < y]:
            del self._cache[i]

    def _cells_in(self, x0: int, y0: int, w: int, h: int) -> NDArray[np.int64]:
        b = self.bbox
        hit = (b[:, 0] < x0 + w) & (b[:, 2] > x0) & (b[:, 1] < y0 + h) & (b[:, 3] > y0)
        return np.flatnonzero(hit)

    def region_od(self, x0: int, y0: int, w: int, h: int) -> NDArray[np.float32]:
        od = background_od(self.density, self.style, self.red, x0, y0, w, h)
        for _, p, inner, outer in self._patches_in(x0, y0, w, h):
            a = p.alpha[inner][..., None]
            dst = od[outer]
            dst += a * (p.od[inner] - dst)
        return od

    def _patches_in(
        self, x0: int, y0: int, w: int, h: int
    ) -> Iterator[tuple[int, CellPatch, tuple[slice, slice], tuple[slice, slice]]]:
        """Each cell (index, patch) overlapping the region, with the overlap as (patch,
        region) slices."""
        for i in self._cells_in(x0, y0, w, h):
            p = self._patch(int(i))
            ph, pw = p.alpha.shape
            ax0, ay0 = p.x0 - x0, p.y0 - y0
            bx0, by0 = max(ax0, 0), max(ay0, 0)
            bx1, by1 = min(ax0 + pw, w), min(ay0 + ph, h)
            if bx1 <= bx0 or by1 <= by0:
                continue
            inner = (slice(by0 - ay0, by1 - ay0), slice(bx0 - ax0, bx1 - ax0))
            yield int(i), p, inner, (slice(by0, by1), slice(bx0, bx1))

    def region(self, x0: int, y0: int, w: int, h: int) -> NDArray[np.uint8]:
        """RGB uint8 (h, w, 3) of a level-0 region (outside the slide: background)."""
        if w * h > CHUNK * 1024:
            out = np.empty((h, w, 3), np.uint8)
            step = max(1, (CHUNK * 1024) // max(w, 1))
            for yy in range(0, h, step):
                hh = min(step, h - yy)
                out[yy : yy + hh] = self.region(x0, y0 + yy, w, hh)
            return out
        od = self.region_od(x0, y0, w, h)
        return self.style.to_rgb(od, pixel_noise(x0, y0, w, h))

    def labels(self, x0: int, y0: int, w: int, h: int) -> NDArray[np.int32]:
        """Instance labels (cell index + 1; later cells drawn over earlier ones) of a region."""
        lab = np.zeros((h, w), np.int32)
        for i, p, inner, outer in self._patches_in(x0, y0, w, h):
            m = p.alpha[inner] >= 0.5
            lab[outer][m] = i + 1
        return lab

    def tile_rows(self, tile: int = 256) -> Iterator[tuple[int, NDArray[np.uint8]]]:
        """(y, band) for each tile row of the slide, rendered in column chunks."""
        w, h = self.size
        for y in range(0, h, tile):
            th = min(tile, h - y)
            band = np.empty((th, w, 3), np.uint8)
            for x in range(0, w, CHUNK):
                cw = min(CHUNK, w - x)
                band[:, x : x + cw] = self.style.to_rgb(
                    self.region_od(x, y, cw, th), pixel_noise(x, y, cw, th)
                )
            self._forget_above(y)
            yield y, band

    def region_fn(self, tile: int = 256) -> _BandRegion:
        return _BandRegion(self, tile)

    # ------------------------------------------------------------------ truth

    def truth_summary(self) -> dict[str, Any]:
        lay = self.layout
        counts = {c: int(np.count_nonzero(lay.class_idx == i)) for i, c in enumerate(CLASS_CODES)}
        total = len(lay)
        fractions: dict[str, Any] = {}
        for lin in LINEAGES:
            codes = [c for c in CLASS_CODES if LINEAGE_OF[c] == lin]
            dys = [c for c in codes if c.endswith("D")]
            n = sum(counts[c] for c in codes)
            d = sum(counts[c] for c in dys)
            fractions[lin] = {"dysplastic": d, "total": n, "fraction": d / n if n else None}
        seam = self.params.seam_um / self.params.mpp
        crosses = 0
        if seam > 0 and total:
            b = self.bbox
            crosses = int(
                np.count_nonzero(
                    (np.floor(b[:, 0] / seam) != np.floor(b[:, 2] / seam))
                    | (np.floor(b[:, 1] / seam) != np.floor(b[:, 3] / seam))
                )
            )
        sub_counts: dict[str, int] = {}
        for s in lay.subtype:
            sub_counts[s] = sub_counts.get(s, 0) + 1
        return {
            "format": TRUTH_FORMAT,
            "wsiflow_version": __version__,
            "seed": self.params.seed,
            "params": self.params.to_dict(),
            "dimensions": list(self.size),
            "mpp": self.params.mpp,
            "classes": list(CLASS_CODES),
            "counts": counts,
            "subtype_counts": dict(sorted(sub_counts.items())),
            "requested_counts": lay.requested,
            "dropped": lay.dropped,
            "nucleated": total,
            "lineages": fractions,
            "blasts": {"count": counts["blast"], "fraction": counts["blast"] / total if total else None},
            "red_cells": len(self.red),
            "touching": int(np.count_nonzero(lay.touching)),
            "near_seams": crosses,
            "seam_um": self.params.seam_um,
        }

    def truth_features(self) -> Iterator[dict[str, Any]]:
        mpp2 = self.params.mpp**2
        for i in range(len(self.layout)):
            d = self.layout.design(i)
            poly = d.polygon()
            area, cx, cy = polygon_area_centroid(poly)
            ring = np.vstack([poly, poly[:1]]).round(2).tolist()
            code = d.code
            yield {
                "type": "Feature",
                "id": f"truth-{self.params.seed}-{i}",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "annotation",
                    "name": code,
                    "classification": {"name": CLASS_NAMES[code], "color": list(CLASS_COLORS[code])},
                    "code": code,
                    "subtype": d.subtype,
                    "cell": i,
                    "x": round(cx, 2),
                    "y": round(cy, 2),
                    "area_um2": round(area * mpp2, 2),
                    "touching": bool(self.layout.touching[i]),
                },
            }

    def write_truth(self, slide_path: str | os.PathLike[str]) -> tuple[Path, Path]:
        gj, js = truth_paths(slide_path)
        with atomic_open(gj, fsync=False) as f:
            f.write(b'{"type":"FeatureCollection","features":[')
            for k, feat in enumerate(self.truth_features()):
                if k:
                    f.write(b",\n")
                f.write(orjson.dumps(feat))
            f.write(b"]}\n")
        summary = orjson.dumps(self.truth_summary(), option=orjson.OPT_INDENT_2) + b"\n"
        atomic_write_bytes(js, summary, fsync=False)
        return gj, js


class _BandRegion:
    """``region(x, y, w, h)`` for the writer: serves tiles from the current rendered tile row."""

    def __init__(self, slide: SyntheticSlide, tile: int) -> None:
        self.slide = slide
        self.tile = tile
        self.rows = slide.tile_rows(tile)
        self.y = -1
        self.band: NDArray[np.uint8] | None = None

    def __call__(self, x: int, y: int, w: int, h: int) -> NDArray[np.uint8]:
        if self.band is not None and y == self.y and h <= self.band.shape[0]:
            return self.band[:h, x : x + w]
        if y % self.tile == 0 and y > self.y:
            for yy, band in self.rows:
                if yy == y:
                    self.y, self.band = yy, band
                    return band[:h, x : x + w]
        return self.slide.region(x, y, w, h)


@dataclass(frozen=True)
class SynthResult:
    slide: Path
    truth_geojson: Path
    truth_json: Path
    summary: dict[str, Any]
    seconds: float


def synthesize(path: str | os.PathLike[str], params: SynthParams, quality: int = 90) -> SynthResult:
    """Generate a slide and its truth; the TIFF is written streaming, atomically."""
    from wsiflow.slide.writer import write_pyramid_tiff

    t0 = time.perf_counter()
    out = Path(path)
    slide = SyntheticSlide.generate(params)
    app_mag = round(10.0 / params.mpp) if params.mpp > 0 else None
    write_pyramid_tiff(
        out,
        slide.region_fn(256),
        size=slide.size,
        mpp=params.mpp,
        tile=256,
        compression="jpeg",
        quality=quality,
        aperio=True,
        app_mag=float(app_mag) if app_mag else None,
    )
    gj, js = slide.write_truth(out)
    return SynthResult(out, gj, js, slide.truth_summary(), time.perf_counter() - t0)


def lineage_fraction(summary: dict[str, Any], lineage: str) -> float | None:
    v = summary["lineages"][lineage]["fraction"]
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
