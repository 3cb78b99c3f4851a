"""wbc-seg µm/px from red-cell diameters, as ``segpc_mpp.py`` does for SegPC, with PBC as a check.

Red-cell pixels: darker than Otsu's threshold on the grey image; the white cell is left out
(wbc-seg: its expert mask dilated 3 px; PBC: any component holding nucleus-dark pixels, grey
below half the background's); holes filled. Isolated red cells: components with solidity
> 0.95, eccentricity < 0.6, area over 200 px, not touching the image edge. A normal red cell
is ≈ 7.5 µm across, so µm/px ≈ 7.5 / median equivalent diameter (``um_per_px``). PBC
(CellaVision DM96, 0.1 µm/px by its README) measures the method on a known scale: it reads
PBC about 5 % high, so ``um_per_px_vs_pbc`` also scales PBC's 0.1 by the ratio of the two
medians (Dataset 2 comes from the CellaVision blog). Dataset 1's red cells are pale lysed
rings that Otsu's threshold does not fill; it is reported with the count found.

    python benchmarks/wbc_mpp.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage import filters, measure, morphology

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RBC_UM = 7.5
PBC_MPP = 0.1
PBC_EVERY = 20  # every 20th PBC image (344 of 6,876)


def isolated_rbc_diameters(rgb: np.ndarray, wbc: np.ndarray | None = None) -> list[float]:
    """Equivalent diameters (px) of the isolated round red cells of one image. ``wbc``: the
    white cell's mask, when known."""
    grey = rgb.astype(float).mean(axis=2)
    dark = grey < filters.threshold_otsu(grey)
    if wbc is not None:
        dark &= ~ndi.binary_dilation(wbc, morphology.disk(3))
    dark = ndi.binary_fill_holes(dark)
    lab = measure.label(dark)
    background = np.percentile(grey, 95)
    h, w = grey.shape
    out = []
    for p in measure.regionprops(lab, intensity_image=grey):
        y0, x0, y1, x1 = p.bbox
        if y0 == 0 or x0 == 0 or y1 == h or x1 == w:
            continue
        if wbc is None and p.intensity_min < background / 2:
            continue  # holds a nucleus: a white cell
        if p.solidity > 0.95 and p.eccentricity < 0.6 and p.area > 200:
            out.append(float(p.equivalent_diameter_area))
    return out


def _summary(d: list[float], images: int) -> dict[str, object]:
    med = float(np.median(d)) if d else None
    return {
        "images": images,
        "isolated_red_cells": len(d),
        "median_diameter_px": round(med, 1) if med else None,
        "iqr_px": [round(float(v), 1) for v in np.percentile(d, [25, 75])] if d else None,
        "um_per_px": round(RBC_UM / med, 3) if med else None,
    }


def main() -> int:
    res: dict[str, dict[str, object]] = {}
    for ds in ("Dataset 1", "Dataset 2"):
        d: list[float] = []
        images = sorted((DATA / "wbc-seg" / ds).glob("*.bmp"))
        for f in images:
            mask = np.asarray(Image.open(f.with_suffix(".png")).convert("L")) > 0
            d += isolated_rbc_diameters(np.asarray(Image.open(f).convert("RGB")), mask)
        res[ds] = _summary(d, len(images))
    pbc = sorted((DATA / "pbc").glob("*/*.jpg"))[::PBC_EVERY]
    d = []
    for f in pbc:
        d += isolated_rbc_diameters(np.asarray(Image.open(f).convert("RGB")))
    res["pbc (0.1 um/px by its README)"] = _summary(d, len(pbc))
    pbc_med = float(np.median(d))
    for ds in ("Dataset 1", "Dataset 2"):
        med = res[ds]["median_diameter_px"]
        res[ds]["um_per_px_vs_pbc"] = round(PBC_MPP * pbc_med / float(med), 3) if med else None  # type: ignore[arg-type]
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
