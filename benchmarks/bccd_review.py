"""Draw the BCCD test fields where a segmenter's detections fall outside every WBC box, for
reviewing them by eye (issue 14): WBC boxes green, platelet boxes yellow, detections inside a
WBC box blue, outside red. The white cells found this way without a box are listed in
``bccd_review.json`` (what ``seg_real.py`` counts as ``precision_reviewed``).

    python benchmarks/bccd_review.py marrow-seg --pipeline mds --out docs/bccd-unboxed.png

BCCD (Shenggan/BCCD_Dataset) is MIT-licensed; the PNG is a derivative and says so.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", help="segmenter bundle (shipped name or path)")
    ap.add_argument("--pipeline", default="mds", help="post-processing settings from this pipeline")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    a = ap.parse_args(argv)

    import torch
    from PIL import Image, ImageDraw

    from wsiflow.config import load_pipeline
    from wsiflow.models.bundle import ModelBundle
    from wsiflow.segment import Segmenter
    from wsiflow.train.seg_data import BCCD_MPP, read_rgb, resample_pair, voc_boxes

    torch.set_num_threads(1)
    b = ModelBundle.load(a.bundle)
    cfg = load_pipeline(a.pipeline).segmenter.model_copy(
        update={"bundle": str(b.weights_path), "sha256": None}
    )
    seg = Segmenter(b, cfg)
    root = DATA / "bccd"
    panels = []
    for stem in (root / "ImageSets" / "Main" / "test.txt").read_text().split():
        rgb = read_rgb(root / "JPEGImages" / f"{stem}.jpg")
        ann = root / "Annotations" / f"{stem}.xml"
        wbc = np.array(voc_boxes(ann, "WBC"), float).reshape(-1, 4)
        plt = np.array(voc_boxes(ann, "Platelets"), float).reshape(-1, 4)
        small, _ = resample_pair(rgb, (), BCCD_MPP, seg.mpp)
        table, _ = seg.segment(small, (0.0, 0.0), rgb.shape[1] / small.shape[1], seg.mpp)
        x, y = table.x, table.y
        inside = (x[:, None] >= wbc[None, :, 0]) & (x[:, None] <= wbc[None, :, 2])
        inside &= (y[:, None] >= wbc[None, :, 1]) & (y[:, None] <= wbc[None, :, 3])
        good = inside.any(axis=1)
        if good.all():
            continue
        im = Image.fromarray(rgb)
        d = ImageDraw.Draw(im)
        for box in wbc:
            d.rectangle(list(box), outline=(0, 200, 0), width=3)
        for box in plt:
            d.rectangle(list(box), outline=(230, 200, 0), width=2)
        for k in range(len(table)):
            r = 9
            d.ellipse(
                [x[k] - r, y[k] - r, x[k] + r, y[k] + r],
                outline=(0, 0, 255) if good[k] else (255, 0, 0),
                width=4,
            )
            if not good[k]:
                d.text((x[k] + 12, y[k] - 6), f"({x[k]:.0f}, {y[k]:.0f})", fill=(0, 0, 0))
        d.text((6, 6), stem, fill=(0, 0, 0))
        panels.append(im)
        print(stem, [(round(float(x[k])), round(float(y[k]))) for k in np.flatnonzero(~good)])
    if not panels:
        print("every detection lies in a WBC box")
        return 0
    cols = 3
    w, h = panels[0].size
    sheet = Image.new("RGB", (cols * w, -(-len(panels) // cols) * h + 20), "white")
    for i, p in enumerate(panels):
        sheet.paste(p, ((i % cols) * w, (i // cols) * h))
    ImageDraw.Draw(sheet).text(
        (6, sheet.size[1] - 16),
        f"BCCD test fields (Shenggan/BCCD_Dataset, MIT); {b.name} detections outside every WBC box in red",
        fill=(0, 0, 0),
    )
    sheet = sheet.resize((sheet.size[0] * 2 // 3, sheet.size[1] * 2 // 3))
    tmp = a.out.with_suffix(".tmp.png")
    sheet.save(tmp)
    tmp.replace(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
