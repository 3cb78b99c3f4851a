"""Segmenter evaluation on fields whose masks mark only some of the cells (the SegPC layout).

Layout: ``DATA/images/NAME.jpg`` + ``DATA/masks/NAME.jpg`` (mask > 128 = a masked cell; the
other nucleated cells in the field are present and unmasked), fields letterboxed with plain
bands. Each field is segmented as the pipeline does (read at the segmenter's µm/px, cells
as polygons, drawn back onto the field's pixel grid), then per field:

- masked cells: connected components of the hole-filled mask of at least ``MIN_CELL_UM2``
  (smaller ones are JPEG specks). The masks are not split: where a mask joins two touching
  cells into one component it counts as one masked cell, so a detection pair that splits it
  correctly fails the one-to-one test (``merged_suspects`` counts such components, solidity
  < ``MERGED_SOLIDITY``, so the reader knows how many there are);
- a masked cell is *found* when some detection's centroid lies inside it (grown by
  ``GROW_UM``); it is matched *one to one* when exactly one detection's centroid lies inside
  it and that detection overlaps it with IoU ≥ 0.5 (a detection that merges it with a
  neighbour, or two detections that split it, fail);
- *band detections*: detections whose centroid lies on the letterbox band (the plain rows
  at the top and bottom, :func:`band_rows`), or whose outline covers more than half band.

Detections elsewhere are other nucleated cells or false positives; they are counted
("unmatched"), not scored, since the masks say nothing about them.

Nuclei per masked cell (:func:`nuclei_in_masks`, a rough classical count independent of the
segmenter: the hematoxylin channel of a colour deconvolution above its Otsu threshold over the
field's masked pixels, opened by ``NUCLEUS_OPEN_UM``, pieces of at least ``MIN_NUCLEUS_UM2``):
a mask holding two or more nuclei is touching cells joined, or a binucleate cell; the
one-to-one share is also reported over the masks holding exactly one.

The held-out split is fixed: :func:`partial_split` orders the field names by a seeded
permutation (seed ``SPLIT_SEED``) and holds out the first half ("test"); the rest ("tune")
is for choosing post-processing settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi
from skimage import draw, measure
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu
from skimage.morphology import disk, opening

from wsiflow.segment import Segmenter, plain_runs
from wsiflow.train.seg_data import SegDataError, find_pairs, read_rgb, resample_pair

__all__ = [
    "band_rows",
    "evaluate_partial",
    "merged_suspects",
    "nuclei_in_masks",
    "partial_split",
    "rasterise",
    "score_field",
    "truth_cells",
]

SPLIT_SEED = 14
MIN_CELL_UM2 = 20.0  # mask components below this are JPEG specks, not cells
MERGED_SOLIDITY = 0.85
GROW_UM = 1.0
NUCLEUS_OPEN_UM = 0.5
MIN_NUCLEUS_UM2 = 12.0
BAND_STD = 6.0  # a band row: every channel's std along the row below this (grey levels)


def band_rows(rgb: NDArray[np.uint8], tol: float = BAND_STD) -> tuple[int, int]:
    """Number of plain rows at the top and at the bottom of ``rgb`` (the letterbox band)."""
    return plain_runs(rgb.astype(np.float32), 1, tol)


def truth_cells(mask: NDArray[np.bool_], mpp: float) -> NDArray[np.int32]:
    """Masked cells: connected components of the hole-filled mask of at least ``MIN_CELL_UM2``."""
    lab, n = ndi.label(ndi.binary_fill_holes(mask))
    if n == 0:
        return lab.astype(np.int32)
    area = np.bincount(lab.ravel(), minlength=n + 1) * (mpp * mpp)
    keep = area >= MIN_CELL_UM2
    keep[0] = False
    lut = np.zeros(n + 1, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[lab]


def merged_suspects(truth: NDArray[np.int32]) -> int:
    """Masked cells whose solidity is below ``MERGED_SOLIDITY``: likely two touching cells in one
    mask component, which no detection can match one to one if it splits them correctly."""
    return int((~single_masks(truth)).sum())


def single_masks(truth: NDArray[np.int32]) -> NDArray[np.bool_]:
    """Per masked cell 1..n: solidity ≥ ``MERGED_SOLIDITY`` (not a merged suspect)."""
    out = np.ones(int(truth.max()), bool)
    for p in measure.regionprops(truth):
        out[p.label - 1] = p.solidity >= MERGED_SOLIDITY
    return out


def nuclei_in_masks(rgb: NDArray[np.uint8], truth: NDArray[np.int32], mpp: float) -> NDArray[np.int64]:
    """Nuclei counted in each masked cell 1..n (see the module docstring): each nucleus piece
    goes to the masked cell holding most of it."""
    n = int(truth.max())
    if n == 0:
        return np.zeros(0, np.int64)
    inside = truth > 0
    hema = rgb2hed(rgb)[..., 0]
    values = hema[inside]
    if values.min() == values.max():
        return np.zeros(n, np.int64)
    nuc = opening((hema > threshold_otsu(values)) & inside, disk(max(1, round(NUCLEUS_OPEN_UM / mpp))))
    lab, m = ndi.label(nuc)
    if m == 0:
        return np.zeros(n, np.int64)
    area = np.bincount(lab.ravel(), minlength=m + 1)
    pair = np.bincount((lab.astype(np.int64) * (n + 1) + truth).ravel(), minlength=(m + 1) * (n + 1))
    pair = pair.reshape(m + 1, n + 1)[1:, 1:]
    big = area[1:] * (mpp * mpp) >= MIN_NUCLEUS_UM2
    owner = np.argmax(pair, axis=1)
    return np.bincount(owner[big], minlength=n).astype(np.int64)


def rasterise(
    poly_offsets: NDArray[np.int64], poly_xy: NDArray[np.float32], shape: tuple[int, int]
) -> NDArray[np.int32]:
    """Detection polygons (image px, pixel centres at integer + 0.5) → label image (1..n)."""
    out = np.zeros(shape, np.int32)
    for k in range(len(poly_offsets) - 1):
        xy = poly_xy[poly_offsets[k] : poly_offsets[k + 1]].astype(np.float64) - 0.5
        rr, cc = draw.polygon(xy[:, 1], xy[:, 0], shape=shape)
        out[rr, cc] = k + 1
    return out


@dataclass(frozen=True)
class FieldScore:
    masked: int
    found: int
    one_to_one: int
    detections: int
    band_detections: int
    unmatched: int
    band_rows: tuple[int, int]
    ious: list[float]
    matched: list[bool]  # per masked cell 1..n: matched one to one


def score_field(
    det: NDArray[np.int32],
    centroids: NDArray[np.float64],
    truth: NDArray[np.int32],
    band: tuple[int, int],
    mpp: float,
) -> FieldScore:
    """Score detections (label image ``det`` 1..n, ``centroids`` (n, 2) as (x, y) image px)."""
    h, w = truth.shape
    n_det = len(centroids)
    grown = truth.copy()
    if GROW_UM > 0 and truth.max() > 0:
        # grow each cell by GROW_UM into background only (nearest cell wins)
        dist, idx = ndi.distance_transform_edt(truth == 0, return_indices=True)
        near = truth[idx[0], idx[1]]
        grown = np.where((truth == 0) & (dist <= GROW_UM / mpp), near, truth)
    cx = np.clip(np.floor(centroids[:, 0]).astype(np.int64), 0, w - 1) if n_det else np.zeros(0, np.int64)
    cy = np.clip(np.floor(centroids[:, 1]).astype(np.int64), 0, h - 1) if n_det else np.zeros(0, np.int64)
    hit = grown[cy, cx] if n_det else np.zeros(0, np.int32)  # truth id under each centroid (0: none)
    top, bottom = band
    band_mask = np.zeros((h, w), bool)
    band_mask[:top] = True
    if bottom:
        band_mask[h - bottom :] = True
    on_band = np.zeros(n_det, bool)
    if n_det and band_mask.any():
        on_band = band_mask[cy, cx]
        det_area = np.bincount(det.ravel(), minlength=n_det + 1)[1:]
        band_area = np.bincount(det[band_mask], minlength=n_det + 1)[1:]
        on_band |= band_area > 0.5 * np.maximum(det_area, 1)
    n_truth = int(truth.max())
    found = one = 0
    ious: list[float] = []
    matched: list[bool] = []
    if n_truth:
        t_area = np.bincount(truth.ravel(), minlength=n_truth + 1)
        d_area = np.bincount(det.ravel(), minlength=n_det + 1)
        pair = truth.astype(np.int64) * (n_det + 1) + det
        inter = np.bincount(pair.ravel(), minlength=(n_truth + 1) * (n_det + 1)).reshape(
            n_truth + 1, n_det + 1
        )
        for t in range(1, n_truth + 1):
            if t_area[t] == 0:
                matched.append(False)
                continue
            inside = np.flatnonzero(hit == t)
            best = 0.0
            for d in inside:
                iou = inter[t, d + 1] / (t_area[t] + d_area[d + 1] - inter[t, d + 1])
                best = max(best, float(iou))
            found += int(len(inside) > 0)
            ok = len(inside) == 1 and best >= 0.5
            one += int(ok)
            matched.append(ok)
            ious.append(best)
    return FieldScore(
        masked=n_truth,
        found=found,
        one_to_one=one,
        detections=n_det,
        band_detections=int(on_band.sum()),
        unmatched=int(((hit == 0) & ~on_band).sum()),
        band_rows=(top, bottom),
        ious=ious,
        matched=matched,
    )


def partial_split(names: list[str], seed: int = SPLIT_SEED) -> dict[str, str]:
    """Field name → "test" (held out: the first half of a seeded permutation) or "tune"."""
    ordered = sorted(names)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    n_test = (len(ordered) + 1) // 2
    return {ordered[int(i)]: ("test" if r < n_test else "tune") for r, i in enumerate(perm)}


def detect(
    seg: Segmenter, rgb: NDArray[np.uint8], mpp: float
) -> tuple[NDArray[np.int32], NDArray[np.float64]]:
    """Cells of a field as the pipeline finds them → (label image at the field's px, centroids (x, y))."""
    small, _ = resample_pair(rgb, (), mpp, seg.mpp) if abs(mpp / seg.mpp - 1) > 0.02 else (rgb, ())
    scale = rgb.shape[1] / small.shape[1]
    table, _ = seg.segment(small, (0.0, 0.0), scale, seg.mpp)
    det = rasterise(table.poly_offsets, table.poly_xy, rgb.shape[:2])
    return det, np.column_stack([table.x, table.y]).astype(np.float64)


def evaluate_partial(seg: Segmenter, data: Path, mpp: float, split: str = "test") -> dict[str, Any]:
    """Partial-mask scores of ``seg`` on ``DATA/images`` + ``DATA/masks`` (see the module docstring).

    ``split``: "test" (held out), "tune", or "all"."""
    if split not in ("test", "tune", "all"):
        raise SegDataError(f"{data}: --split must be test, tune or all for partial masks, got {split!r}")
    pairs = find_pairs(data / "images", data / "masks")
    which = partial_split([p.stem for p, _ in pairs])
    rows: list[dict[str, Any]] = []
    ious: list[float] = []
    for img_path, mask_path in pairs:
        if split != "all" and which[img_path.stem] != split:
            continue
        rgb = read_rgb(img_path)
        mask = read_rgb(mask_path)[..., 0] > 128
        if mask.shape != rgb.shape[:2]:
            raise SegDataError(
                f"{mask_path}: mask is {mask.shape[::-1]} px but the image is {rgb.shape[1::-1]} px"
            )
        det, cent = detect(seg, rgb, mpp)
        row, field_ious = field_row(img_path.name, rgb, mask, det, cent, mpp)
        rows.append(row)
        ious += field_ious
    return summarise_partial(rows, ious, split, mpp)


def field_row(
    name: str,
    rgb: NDArray[np.uint8],
    mask: NDArray[np.bool_],
    det: NDArray[np.int32],
    centroids: NDArray[np.float64],
    mpp: float,
) -> tuple[dict[str, Any], list[float]]:
    """One field's per-image row (:func:`summarise_partial` pools them) and its matched IoUs, for
    detections found any way: by :func:`detect` on the field, or cut from a slide's run."""
    truth = truth_cells(mask, mpp)
    s = score_field(det, centroids, truth, band_rows(rgb), mpp)
    single = single_masks(truth)
    nuclei = nuclei_in_masks(rgb, truth, mpp)
    matched = np.asarray(s.matched, bool)
    row = {
        "image": name,
        "masked": s.masked,
        "merged_suspects": int((~single).sum()),
        "one_to_one_single": int(matched[single].sum()),
        "one_nucleus": int((nuclei == 1).sum()),
        "multi_nucleus": int((nuclei >= 2).sum()),
        "one_to_one_one_nucleus": int(matched[nuclei == 1].sum()),
        "found": s.found,
        "one_to_one": s.one_to_one,
        "detections": s.detections,
        "band_detections": s.band_detections,
        "unmatched": s.unmatched,
        "band_top": s.band_rows[0],
        "band_bottom": s.band_rows[1],
    }
    return row, s.ious


def summarise_partial(
    rows: list[dict[str, Any]], ious: list[float], split: str, mpp: float
) -> dict[str, Any]:
    """The pooled scores of :func:`evaluate_partial` from its fields' rows."""
    masked = sum(r["masked"] for r in rows)
    merged = sum(r["merged_suspects"] for r in rows)
    tot = {
        k: sum(r[k] for r in rows)
        for k in ("found", "one_to_one", "detections", "band_detections", "unmatched")
    }
    return {
        "split": split,
        "split_rule": f"seeded permutation (seed {SPLIT_SEED}) of the sorted field names; first half = test",
        "mpp": mpp,
        "n_images": len(rows),
        "masked_cells": masked,
        "merged_suspects": merged,
        "recall": tot["found"] / masked if masked else float("nan"),
        "one_to_one": tot["one_to_one"] / masked if masked else float("nan"),
        # the same over masks that are one cell (solidity ≥ MERGED_SOLIDITY): where a mask joins
        # touching cells, a detection pair that splits them correctly cannot match one to one
        "one_to_one_single_masks": (
            sum(r["one_to_one_single"] for r in rows) / (masked - merged) if masked > merged else float("nan")
        ),
        # and over masks holding exactly one nucleus (nuclei_in_masks, a rough classical count)
        "multi_nucleus_masks": sum(r["multi_nucleus"] for r in rows),
        "one_nucleus_masks": (one := sum(r["one_nucleus"] for r in rows)),
        "one_to_one_one_nucleus": (
            sum(r["one_to_one_one_nucleus"] for r in rows) / one if one else float("nan")
        ),
        "median_best_iou": float(np.median(ious)) if ious else float("nan"),
        "detections": tot["detections"],
        "band_detections": tot["band_detections"],
        "fields_with_band_detections": sum(1 for r in rows if r["band_detections"]),
        "unmatched_detections": tot["unmatched"],
        "per_image": rows,
    }
