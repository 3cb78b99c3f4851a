"""Overlay figure: real marrow fields, the cells two pipelines find, drawn from each run's GeoJSON.

A few SegPC-2021 fields (held-out split; CC BY-NC-SA 4.0 — the figure carries that licence,
the fields themselves are never committed) are laid side by side into a small Aperio-style
slide at ``--mpp`` (``../shared/tools/composite_slide.py``'s writer), run through
``wsiflow run`` once per pipeline, and each run's ``cells.geojson.gz`` polygons are drawn
(green) over the fields, with the expert plasma-cell masks outlined (yellow). One row per
pipeline, downscaled by ``--scale``.

    python benchmarks/seg_overlay.py docs/marrow-overlay.png --pipelines mds-demo,mds
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from seg_real import run_slide

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "segpc-marrow"
TOOLS = ROOT.parent / "shared" / "tools"


def _write_svs(path: Path, rgb: np.ndarray, mpp: float) -> None:
    spec = importlib.util.spec_from_file_location("composite_slide", TOOLS / "composite_slide.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.write_svs(path, rgb, mpp)


def _polygons(geojson: Path) -> list[np.ndarray]:
    with gzip.open(geojson, "rt", encoding="utf-8") as f:
        doc = json.load(f)
    feats = doc["features"] if isinstance(doc, dict) else doc
    out = []
    for ft in feats:
        g = ft["geometry"]
        rings = [g["coordinates"][0]] if g["type"] == "Polygon" else [p[0] for p in g["coordinates"]]
        out += [np.asarray(r, float) for r in rings]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--pipelines", default="mds-demo,mds")
    ap.add_argument("--labels", default="", help="comma-separated row labels (default: pipeline names)")
    ap.add_argument("--fields", default="", help="comma-separated SegPC field names (default: 3 held-out)")
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--scale", type=float, default=0.5)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wsiflow-seg-overlay")
    a = ap.parse_args(argv)

    from skimage.segmentation import find_boundaries

    from wsiflow.train.seg_partial import partial_split, truth_cells

    names = sorted(p.stem for p in (DATA / "images").iterdir())
    split = partial_split(names)
    fields = a.fields.split(",") if a.fields else [n for n in names if split[n] == "test"][:3]
    imgs = [np.asarray(Image.open(DATA / "images" / f"{n}.jpg").convert("RGB")) for n in fields]
    masks = [np.asarray(Image.open(DATA / "masks" / f"{n}.jpg").convert("L")) > 128 for n in fields]
    strip = np.concatenate(imgs, axis=1)
    outline = np.concatenate([find_boundaries(truth_cells(m, a.mpp), mode="outer") for m in masks], axis=1)
    a.work.mkdir(parents=True, exist_ok=True)
    slide = a.work / "segpc-strip.svs"
    _write_svs(slide, strip, a.mpp)
    pipes = a.pipelines.split(",")
    labels = a.labels.split(",") if a.labels else pipes
    rows = []
    for pipe, label in zip(pipes, labels, strict=True):
        out = a.work / f"run-{Path(pipe).stem}"
        run_slide(slide, out, pipe)
        polys = _polygons(out / slide.stem / "cells.geojson.gz")
        im = strip.copy()
        im[outline] = (255, 220, 0)
        canvas = Image.fromarray(im)
        d = ImageDraw.Draw(canvas)
        for p in polys:
            d.line([tuple(v) for v in np.vstack([p, p[:1]])], fill=(0, 200, 0), width=2)
        w, h = canvas.size
        canvas = canvas.resize((round(w * a.scale), round(h * a.scale)), Image.LANCZOS)
        d = ImageDraw.Draw(canvas)
        text = f"{label}: {len(polys)} cells"
        font = ImageFont.load_default()
        d.rectangle((0, 0, 8 + 7 * len(text), 16), fill=(255, 255, 255))
        d.text((4, 2), text, fill=(0, 0, 0), font=font)
        rows.append(np.asarray(canvas))
    fig = np.concatenate(rows, axis=0)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(f".{a.out.name}.tmp.png")
    # a 256-colour palette keeps the committed PNG small
    Image.fromarray(fig).quantize(256, method=Image.Quantize.MEDIANCUT).save(tmp, optimize=True)
    tmp.replace(a.out)
    print(json.dumps({"out": str(a.out), "fields": fields, "pipelines": pipes, "px": list(fig.shape[1::-1])}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
