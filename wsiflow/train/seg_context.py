"""A segmenter's border context, measured: how far from a cut its probabilities change.

The tile halo must cover the farthest a cell reaches from its centroid *plus* the distance
over which the U-Net still sees the pixels past the read edge (DESIGN §3). That distance is
measured, not assumed: the probability maps of an image and of the same image cut at a line
are compared column by column (and row by row) as a function of the distance to the cut.
The context is the smallest distance from which every difference stays below ``tol``.

``python -m wsiflow.train.seg_context BUNDLE IMAGE [--mpp M] [--tol T]`` prints the profile
and the context as JSON; the result is stored in the bundle card as ``context_um`` (with
``context_tol``), which the pipeline's halo is checked against when the models are resolved.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["ContextProfile", "context_profile", "main"]

DEFAULT_TOL = 1e-3


@dataclass(frozen=True)
class ContextProfile:
    mpp: float  # µm/px of the measured maps (the segmenter's own)
    max_diff: NDArray[np.float64]  # [d]: largest |Δp| over cuts at distance d px from the cut
    tol: float

    @property
    def context_px(self) -> int:
        """Smallest d with max_diff[d'] < tol for every d' ≥ d."""
        above = np.flatnonzero(self.max_diff >= self.tol)
        return int(above[-1] + 1) if above.size else 0

    @property
    def context_um(self) -> float:
        return self.context_px * self.mpp

    def at(self, d_px: int) -> float:
        return float(self.max_diff[d_px]) if d_px < len(self.max_diff) else 0.0


def _maps(probability_maps: object, rgb: NDArray[np.uint8]) -> list[NDArray[np.float32]]:
    cell, nucleus = probability_maps(rgb)  # type: ignore[operator]
    return [m for m in (cell, nucleus) if m is not None]


def context_profile(
    probability_maps: object,
    rgb: NDArray[np.uint8],
    mpp: float,
    cuts: Sequence[float] = (0.35, 0.5, 0.65),
    tol: float = DEFAULT_TOL,
    align: int = 1,
) -> ContextProfile:
    """Profile of ``probability_maps(rgb) -> (cell, nucleus | None)`` (at ``mpp``) against
    cuts at the given fractions of the width and of the height, keeping either side.

    ``align``: a U-Net that pools ``depth`` times is equivariant to shifts of multiples of
    2**depth px only, so the image and every cut are aligned to that (the tile grid's read
    boxes are too); otherwise the pooling grid's phase, not the cut, makes the difference."""
    h0, w0 = rgb.shape[:2]
    h, w = h0 - h0 % align, w0 - w0 % align
    rgb = np.ascontiguousarray(rgb[:h, :w])
    full = _maps(probability_maps, rgb)
    n = max(h, w)
    worst = np.zeros(n, np.float64)
    for frac in cuts:
        c = round(w * frac / align) * align
        r = round(h * frac / align) * align
        # (kept part, its place in the full image, distance of each column/row to the cut, axis)
        parts = (
            (rgb[:, :c], (slice(None), slice(0, c)), c - 1 - np.arange(c), 0),
            (rgb[:, c:], (slice(None), slice(c, w)), np.arange(w - c), 0),
            (rgb[:r], (slice(0, r), slice(None)), r - 1 - np.arange(r), 1),
            (rgb[r:], (slice(r, h), slice(None)), np.arange(h - r), 1),
        )
        for part, sl, dist, axis in parts:
            for fm, pm in zip(full, _maps(probability_maps, np.ascontiguousarray(part)), strict=True):
                np.maximum.at(worst, dist, np.abs(fm[sl].astype(np.float64) - pm).max(axis=axis))
    return ContextProfile(mpp=mpp, max_diff=worst, tol=tol)


def main(argv: Sequence[str] | None = None) -> int:
    from PIL import Image

    from wsiflow.config import SegmenterSpec
    from wsiflow.segment import Segmenter

    ap = argparse.ArgumentParser(prog="python -m wsiflow.train.seg_context", description=__doc__)
    ap.add_argument("bundle", help="segmenter bundle name or path")
    ap.add_argument("image", help="an RGB image with cells (a field, a mosaic crop)")
    ap.add_argument("--mpp", type=float, default=None, help="µm/px of IMAGE (default: the bundle's)")
    ap.add_argument("--tol", type=float, default=DEFAULT_TOL)
    a = ap.parse_args(argv)
    seg = Segmenter(a.bundle, SegmenterSpec(bundle=a.bundle))
    rgb = np.asarray(Image.open(a.image).convert("RGB"))
    if a.mpp is not None and abs(a.mpp / seg.mpp - 1) > 0.01:
        f = a.mpp / seg.mpp
        size = (max(1, round(rgb.shape[1] * f)), max(1, round(rgb.shape[0] * f)))
        resample = Image.Resampling.BOX if f < 1 else Image.Resampling.BILINEAR
        rgb = np.asarray(Image.fromarray(rgb).resize(size, resample))
    align = 2 ** int(seg.bundle.model_card.kwargs.get("depth", 0))
    prof = context_profile(seg.probability_maps, rgb, seg.mpp, tol=a.tol, align=align)
    marks = [0, 8, 16, 32, 48, 64, 96, 128]
    out = {
        "bundle": seg.bundle.name,
        "image": a.image,
        "image_px": list(rgb.shape[:2]),
        "mpp": seg.mpp,
        "align_px": align,
        "tol": a.tol,
        "max_diff_at_px": {str(d): round(prof.at(d), 5) for d in marks},
        "context_px": prof.context_px,
        "context_um": round(prof.context_um, 2),
        "context_um_rounded_up": float(math.ceil(prof.context_um)),
    }
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
