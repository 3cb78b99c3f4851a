"""SegPC held-out fields as one slide through ``wsiflow run``: do the per-field figures hold on a slide?

``seg_real.py`` scores the segmenter on each SegPC field as a whole image (``wsiflow evaluate``).
A lab runs ``wsiflow run`` on slides instead: tiles with halos, seams, the cytoplasm growth's
background taken per read, and no plain-border trim (that is for whole images only). Here the
held-out fields (``--split``) are laid edge to edge in a grid (white where the grid has no field)
into one Aperio-style slide at ``--mpp`` (``../shared/tools/composite_slide.py``'s writer), the
slide is run once (1 worker × 1 thread), and each detection is given to the field its outline's
centroid falls in, drawn in that field's pixels and scored against its masks exactly as a field
is (``wsiflow.train.seg_partial.field_row``): recall, one to one, detections on the letterbox
bands, which now lie inside the slide. SegPC is CC BY-NC-SA 4.0: the slide stays in ``--work``.

    python benchmarks/segpc_slide.py --pipeline mds --mpp 0.175
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from seg_overlay import _polygons, _write_svs
from seg_real import print_result, run_slide
from shapely import Polygon

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "segpc-marrow"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default="mds")
    ap.add_argument("--mpp", type=float, default=0.175)
    ap.add_argument("--split", default="test", help="test (held out) | tune | all")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wsiflow-segpc-slide")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)

    from wsiflow.train.seg_partial import field_row, partial_split, rasterise, summarise_partial

    names = sorted(p.stem for p in (DATA / "images").iterdir())
    which = partial_split(names)
    fields = [n for n in names if a.split == "all" or which[n] == a.split]
    imgs = [np.asarray(Image.open(DATA / "images" / f"{n}.jpg").convert("RGB")) for n in fields]
    masks = [np.asarray(Image.open(DATA / "masks" / f"{n}.jpg").convert("L")) > 128 for n in fields]
    fh, fw = imgs[0].shape[:2]
    if any(im.shape[:2] != (fh, fw) for im in imgs):
        raise SystemExit("SegPC fields differ in size; this layout needs one size")
    cols = math.ceil(math.sqrt(len(fields)))
    rows_n = math.ceil(len(fields) / cols)
    slide_rgb = np.full((rows_n * fh, cols * fw, 3), 255, np.uint8)
    origin = []
    for k, im in enumerate(imgs):
        y0, x0 = (k // cols) * fh, (k % cols) * fw
        slide_rgb[y0 : y0 + fh, x0 : x0 + fw] = im
        origin.append((x0, y0))
    a.work.mkdir(parents=True, exist_ok=True)
    slide = a.work / f"segpc-{a.split}.svs"
    _write_svs(slide, slide_rgb, a.mpp)
    out = a.work / f"run-{Path(a.pipeline).stem}"
    t0 = time.perf_counter()
    run_slide(slide, out, a.pipeline)
    wall = time.perf_counter() - t0

    polys = _polygons(out / slide.stem / "cells.geojson.gz")
    cent = np.array([Polygon(p).centroid.coords[0] for p in polys], float).reshape(-1, 2)  # slide px
    col = np.floor(cent[:, 0] / fw).astype(int)
    row = np.floor(cent[:, 1] / fh).astype(int)
    slot = row * cols + col
    rows: list[dict[str, Any]] = []
    ious: list[float] = []
    for k, (name, rgb, mask) in enumerate(zip(fields, imgs, masks, strict=True)):
        x0, y0 = origin[k]
        mine = np.flatnonzero(slot == k)
        xy = [polys[i] - (x0, y0) for i in mine]
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in xy])]).astype(np.int64)
        flat = np.concatenate(xy).astype(np.float32) if xy else np.zeros((0, 2), np.float32)
        det = rasterise(offsets, flat, (fh, fw))
        r, field_ious = field_row(f"{name}.jpg", rgb, mask, det, cent[mine] - (x0, y0), a.mpp)
        rows.append(r)
        ious += field_ious
    res = summarise_partial(rows, ious, a.split, a.mpp)
    res.pop("per_image")
    res = {
        "pipeline": a.pipeline,
        "slide": {
            "px": [cols * fw, rows_n * fh],
            "fields": len(fields),
            "grid": [cols, rows_n],
            "mpp": a.mpp,
        },
        "wsiflow_run_s": round(wall, 1),
        "detections_on_slide": len(polys),
        "detections_in_no_field": int(np.sum(slot >= len(fields))),
        "segpc": res,
    }
    print_result(res, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
