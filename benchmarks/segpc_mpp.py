"""SegPC µm/px from red-cell diameters: isolated, round red cells measured per field group.

Red-cell pixels (smoothed σ 1 px): darker than the background (1 − (R+G+B)/background > 0.05)
and not blue/purple (B/G at most 0.06 above the background's), closed, holes filled, opened
(3 px). Isolated red cells: components of 200–4000 px with solidity > 0.96, eccentricity
< 0.45, not touching the field or the letterbox band. A normal red cell is ≈ 7.5 µm across,
so µm/px ≈ 7.5 / median equivalent diameter. The fields come from more than one microscope
(the file numbers fall in groups); each group is reported on its own.

    python benchmarks/segpc_mpp.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage import filters, measure, morphology

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "segpc-marrow"
RBC_UM = 7.5
GROUPS = {"0-999": (0, 1000), "1000-8999": (1000, 9000), "9000+": (9000, 10**9)}


def isolated_rbc_diameters(rgb: np.ndarray) -> list[float]:
    from wsiflow.train.seg_partial import band_rows

    top, bottom = band_rows(rgb)
    im0 = rgb[top + 6 : rgb.shape[0] - bottom - 6]
    im = filters.gaussian(im0.astype(float), 1, channel_axis=-1, preserve_range=True)
    flat = im.reshape(-1, 3)
    bright = flat.sum(1)
    bg = np.median(flat[bright > np.percentile(bright, 70)], axis=0)
    r, g, b = im[..., 0] + 1, im[..., 1] + 1, im[..., 2] + 1
    dark = 1 - (r + g + b) / bg.sum()
    bluish = b / g - bg[2] / bg[1] > 0.06
    rbc = ndi.binary_fill_holes(ndi.binary_closing((dark > 0.05) & ~bluish, morphology.disk(1)))
    rbc = ndi.binary_opening(rbc, morphology.disk(3))
    h, w = rbc.shape
    out = []
    for p in measure.regionprops(measure.label(rbc)):
        y0, x0, y1, x1 = p.bbox
        if 200 < p.area < 4000 and p.solidity > 0.96 and p.eccentricity < 0.45 and y0 > 1 and x0 > 1:
            if y1 < h - 1 and x1 < w - 1:
                out.append(float(p.equivalent_diameter_area))
    return out


def main() -> int:
    per: dict[str, list[float]] = {g: [] for g in GROUPS}
    fields: dict[str, int] = dict.fromkeys(GROUPS, 0)
    for f in sorted((DATA / "images").iterdir()):
        if not f.stem.isdigit():
            continue
        n = int(f.stem)
        g = next(k for k, (lo, hi) in GROUPS.items() if lo <= n < hi)
        fields[g] += 1
        per[g] += isolated_rbc_diameters(np.asarray(Image.open(f).convert("RGB")))
    res = {}
    for g, d in per.items():
        med = float(np.median(d)) if d else None
        res[g] = {
            "fields": fields[g],
            "isolated_red_cells": len(d),
            "median_diameter_px": round(med, 1) if med else None,
            "iqr_px": [round(float(v), 1) for v in np.percentile(d, [25, 75])] if d else None,
            "um_per_px": round(RBC_UM / med, 3) if med else None,
        }
    allv = [v for d in per.values() for v in d]
    res["all"] = {
        "isolated_red_cells": len(allv),
        "median_diameter_px": round(float(np.median(allv)), 1),
        "um_per_px": round(RBC_UM / float(np.median(allv)), 3),
    }
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
